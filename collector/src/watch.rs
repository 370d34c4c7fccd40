//! Live figures: an in-process hub that the writer tells of every committed batch, and that
//! publishes per-card and per-grant figures to subscribers (the `Query.Watch` RPC, `top`, the
//! console's pages).
//!
//! Rules:
//! - **Only committed windows.** The writer calls [`CommitObserver::committed`] after a group
//!   commit's transaction committed, with the batches that went through (a batch that failed
//!   alone is not passed). The hub only widens a pending time range there and wakes its worker;
//!   every figure it publishes is then read back from the store, so it sees what any report
//!   would see at that instant and nothing that is not durable. That holds on SQLite and
//!   PostgreSQL alike (the writer is the same). Windows another collector commits to a shared
//!   PostgreSQL database reach this hub at its next refresh ([`HubOptions::refresh`]), which
//!   reads the windows that ended since two refreshes before the last computation.
//! - **One formula per figure.** A card's day figures and a grant's are
//!   [`crate::query::figures_of`] over the current Korean calendar day as of now (the path
//!   every report takes, rollups included); a card's *window* figures are
//!   [`crate::reconcile::reconcile_as_of`] over each card's latest counted window (from
//!   [`Store::windows`], which leaves out flagged and disputed windows as reports do), with
//!   the enforcement events inside that window. `idle` and `violating` are read off those:
//!   a card is idle when a grant holds it, it reports, and its latest window delivered time in
//!   which neither the grantee nor anyone unseen used it (`idle_ms == delivered_ms > 0`); it
//!   is violating when its latest window had a violation episode, time of processes not of
//!   the grantee (`foreign`), or use while no grant held it.
//! - **The writer never waits.** `committed` takes a mutex held for a few instructions and
//!   posts a wake-up into a channel of one slot (dropped when full: the worker is awake
//!   anyway). The worker recomputes at most once per `min_gap` (stretched to four times the
//!   last computation's duration, so a large fleet cannot keep a core busy), and only while
//!   someone subscribes.
//! - **Slow subscribers never block and never grow memory.** Updates go out on a bounded
//!   [`tokio::sync::broadcast`] channel ([`HubOptions::capacity`]); a subscriber that falls
//!   further behind than that is resynchronised: its next frame is a fresh snapshot of the
//!   current state, and the updates it missed are skipped.
//! - **Snapshot, then updates.** A subscription's first frame is a snapshot of every card and
//!   grant its [`Filter`] keeps, computed from the store as above; later frames carry only the
//!   cards and grants whose figures changed (and those that went away), each with a version
//!   one higher than the last, so a reader can tell it missed nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpumeter_proto::v1;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::grants::Grant;
use crate::reconcile::{self, Figures, IdleSettings, Inputs};
use crate::store::writer::CommitObserver;
use crate::store::{IngestBatch, MeteredWindow, RecordContent, Store, StoreError};

const DAY_MS: i64 = 86_400_000;

/// Whether an agent (by id) has a live session with this collector.
pub type Connected = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// [`Connected`] over the ingest service's set of agents with a live session.
pub fn live_set(live: Arc<Mutex<std::collections::HashSet<String>>>) -> Connected {
    Arc::new(move |agent: &str| live.lock().is_ok_and(|l| l.contains(agent)))
}

/// How the hub runs.
#[derive(Clone)]
pub struct HubOptions {
    /// Updates held for subscribers; one further behind is resynchronised.
    pub capacity: usize,
    /// Least time between two recomputations (stretched to 4× the last one's duration).
    pub min_gap: Duration,
    /// Recompute this often while someone subscribes even when this collector committed
    /// nothing: the day's elapsed part grows, cards stop reporting, and other collectors on
    /// a shared database commit windows this one is not told of.
    pub refresh: Duration,
    /// How far back a card's latest window is first looked for (the fleet table's health
    /// look-back, [`crate::query::HEALTH_LOOKBACK_MS`]); a card whose latest window ended
    /// longer ago than this is not `reporting`.
    pub lookback_ms: i64,
    /// The clock (Unix ms).
    pub now: Arc<dyn Fn() -> i64 + Send + Sync>,
    /// Whether an agent has a live session here (the ingest service's live set).
    pub connected: Option<Connected>,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            capacity: 256,
            min_gap: Duration::from_millis(500),
            refresh: Duration::from_secs(15),
            lookback_ms: crate::query::HEALTH_LOOKBACK_MS,
            now: Arc::new(crate::ingest::now_ms),
            connected: None,
        }
    }
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("capacity", &self.capacity)
            .field("min_gap", &self.min_gap)
            .field("refresh", &self.refresh)
            .field("lookback_ms", &self.lookback_ms)
            .finish()
    }
}

/// One card as it stands.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct CardLive {
    pub gpu_uuid: String,
    /// The host and agent of its latest window (or of the inventory that lists it).
    pub host_id: String,
    pub agent_id: String,
    pub csp: String,
    /// The model, as the agent's inventory names it.
    pub gpu_name: String,
    /// The latest counted window, `[start, end)` Unix ms; both 0 when none was seen.
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    /// The latest window's readings, as the agent signed them.
    pub util_pct: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub power_w: Option<f64>,
    /// "ok", "degraded", "lost" (the latest window's); empty when none was seen.
    pub health: String,
    /// Its latest window ended within the look-back ([`HubOptions::lookback_ms`]).
    pub reporting: bool,
    /// Its agent has a live session with this collector (false where the hub is not told).
    pub connected: bool,
    /// The grant that holds the card now (the collector's grants), or empty.
    pub grant_id: String,
    pub program: String,
    pub grantee: String,
    /// The latest window's figures under the grant that held the card then.
    pub window: Figures,
    /// The latest window's use while no grant held the card.
    pub window_unassigned_ms: u64,
    /// Today's figures (Korean calendar day, as of now), summed over the grants that held it;
    /// allocated and unmetered are left 0 (they grow with the clock; the day's report has them).
    pub day: Figures,
    /// Today's use while no grant held the card.
    pub day_unassigned_ms: u64,
    pub idle: bool,
    pub violating: bool,
}

/// One grant as it stands today.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GrantLive {
    pub grant_id: String,
    pub program: String,
    pub grantee: String,
    pub csp: String,
    /// Its cards today and the hosts they are on.
    pub cards: u32,
    pub hosts: Vec<String>,
    pub reporting_cards: u32,
    pub idle_cards: u32,
    pub violating_cards: u32,
    /// Its cards' latest windows, summed.
    pub window: Figures,
    /// Today's figures (the reconciliation of today, as of now; allocated and unmetered 0).
    pub day: Figures,
}

/// Everything the hub knows, at one version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fleet {
    /// 0 before the first computation; one higher at every published change.
    pub version: u64,
    /// The instant the figures were computed as of (Unix ms).
    pub at_ms: i64,
    /// The Korean calendar day of the day figures (`YYYY-MM-DD`) and its start.
    pub day: String,
    pub day_from_ms: i64,
    pub cards: BTreeMap<String, CardLive>,
    pub grants: BTreeMap<String, GrantLive>,
}

/// What a subscription keeps: each field empty keeps all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub program: String,
    pub grant_id: String,
    pub host_id: String,
}

impl Filter {
    pub fn card(&self, c: &CardLive) -> bool {
        (self.program.is_empty() || c.program == self.program)
            && (self.grant_id.is_empty() || c.grant_id == self.grant_id)
            && (self.host_id.is_empty() || c.host_id == self.host_id)
    }

    pub fn grant(&self, g: &GrantLive) -> bool {
        (self.program.is_empty() || g.program == self.program)
            && (self.grant_id.is_empty() || g.grant_id == self.grant_id)
            && (self.host_id.is_empty() || g.hosts.contains(&self.host_id))
    }
}

/// A subscriber's view at one version (what its filter keeps), cards and grants by id.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct View {
    pub version: u64,
    pub at_ms: i64,
    pub day: String,
    pub day_from_ms: i64,
    pub cards: Vec<CardLive>,
    pub grants: Vec<GrantLive>,
}

/// What changed from `version − 1` to `version`, as its filter keeps it. A card that no
/// longer passes the filter (moved to another grant, say) is in `removed_cards`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Update {
    pub version: u64,
    pub at_ms: i64,
    pub day: String,
    pub day_from_ms: i64,
    pub cards: Vec<CardLive>,
    pub grants: Vec<GrantLive>,
    pub removed_cards: Vec<String>,
    pub removed_grants: Vec<String>,
}

/// One frame of a subscription.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Frame {
    /// Replaces everything the subscriber held: the first frame, and after falling behind.
    Snapshot(View),
    Update(Update),
}

/// A published change, before any filter.
#[derive(Debug)]
struct Delta {
    version: u64,
    at_ms: i64,
    day: String,
    day_from_ms: i64,
    cards: Vec<CardLive>,
    grants: Vec<GrantLive>,
    removed_cards: Vec<String>,
    removed_grants: Vec<String>,
}

/// Committed time not yet read back: `[from, until)` over every window committed since.
#[derive(Debug, Default)]
struct Pending {
    range: Option<(i64, i64)>,
    /// Batches committed since the worker last took the range (windows or not).
    commits: u64,
}

struct Shared {
    /// The state and the sender, under one lock: a subscriber takes its receiver and the
    /// snapshot together, so it misses no update after its snapshot and sees none twice.
    state: Mutex<Published>,
    pending: Mutex<Pending>,
    /// Subscribers waiting for a first fresh state.
    waiting: AtomicU64,
    fresh: tokio::sync::Notify,
}

struct Published {
    fleet: Arc<Fleet>,
    /// Whether `fleet` is up to date with every commit the worker was told of (false while
    /// nobody subscribed and commits went by).
    fresh: bool,
    tx: Option<broadcast::Sender<Arc<Delta>>>,
}

/// The hub: cheap to clone. Its worker thread ends when every clone, every observer and every
/// subscription is gone.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
    wake: std::sync::mpsc::SyncSender<()>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hub")
    }
}

/// What the writer holds: tells the hub of committed batches.
struct Observer {
    shared: Arc<Shared>,
    wake: std::sync::mpsc::SyncSender<()>,
}

impl CommitObserver for Observer {
    fn committed(&self, batches: &[&IngestBatch]) {
        let mut range: Option<(i64, i64)> = None;
        for b in batches {
            for r in &b.records {
                let span = match &r.content {
                    RecordContent::Window(w) => (w.start_ms, w.end_ms),
                    RecordContent::Event(e) if e.kind == "enforcement" => (e.at_ms, e.at_ms + 1),
                    _ => continue,
                };
                range = Some(range.map_or(span, |(f, u)| (f.min(span.0), u.max(span.1))));
            }
        }
        if let Ok(mut p) = self.shared.pending.lock() {
            p.commits += batches.len() as u64;
            if let Some((f, u)) = range {
                p.range = Some(p.range.map_or((f, u), |(pf, pu)| (pf.min(f), pu.max(u))));
            }
        }
        // Full: the worker has a wake-up waiting already.
        let _ = self.wake.try_send(());
    }
}

impl Hub {
    /// Starts the hub's worker thread over `store`.
    pub fn start(store: Arc<dyn Store>, opts: HubOptions) -> Hub {
        let (tx, _) = broadcast::channel(opts.capacity.max(1));
        let shared = Arc::new(Shared {
            state: Mutex::new(Published {
                fleet: Arc::new(Fleet {
                    version: 0,
                    at_ms: 0,
                    day: String::new(),
                    day_from_ms: 0,
                    cards: BTreeMap::new(),
                    grants: BTreeMap::new(),
                }),
                fresh: false,
                tx: Some(tx),
            }),
            pending: Mutex::new(Pending::default()),
            waiting: AtomicU64::new(0),
            fresh: tokio::sync::Notify::new(),
        });
        let (wake, woken) = std::sync::mpsc::sync_channel(1);
        let worker = Worker {
            store,
            opts,
            shared: shared.clone(),
            latest: HashMap::new(),
            seeded: false,
            last_now: None,
            last_gap: Duration::ZERO,
        };
        let spawned = std::thread::Builder::new()
            .name("gpumeter-watch".into())
            .spawn(move || worker.run(woken));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the watch hub's thread; live figures are off");
        }
        Hub { shared, wake }
    }

    /// What the writer is given ([`crate::store::writer::Writer::spawn_observed`]).
    pub fn observer(&self) -> Arc<dyn CommitObserver> {
        Arc::new(Observer {
            shared: self.shared.clone(),
            wake: self.wake.clone(),
        })
    }

    /// A subscription keeping what `filter` keeps. Its first frame is a snapshot.
    pub fn subscribe(&self, filter: Filter) -> Subscription {
        Subscription {
            hub: self.clone(),
            filter,
            rx: None,
            version: 0,
            held_cards: Default::default(),
            held_grants: Default::default(),
        }
    }

    /// Ends every subscription (their next frame is `None`) and refuses new ones: the
    /// server's shutdown, so long-lived streams do not hold it up.
    pub fn close(&self) {
        if let Ok(mut s) = self.shared.state.lock() {
            s.tx = None;
        }
        self.shared.fresh.notify_waiters();
    }

    /// The current state, fresh (waits for a recomputation when commits went by unseen);
    /// `None` once the hub has stopped.
    pub async fn current(&self) -> Option<Arc<Fleet>> {
        let mut s = self.subscribe(Filter::default());
        let (_, fleet) = s.attach().await?;
        Some(fleet)
    }
}

/// One subscriber waiting for a first fresh state, counted for as long as it lives.
struct Waiting<'a>(&'a AtomicU64);

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One subscriber's stream of frames.
pub struct Subscription {
    hub: Hub,
    filter: Filter,
    rx: Option<broadcast::Receiver<Arc<Delta>>>,
    /// The version the subscriber holds.
    version: u64,
    /// The cards and grants it holds (what its filter kept).
    held_cards: std::collections::HashSet<String>,
    held_grants: std::collections::HashSet<String>,
}

impl Subscription {
    /// The next frame: a snapshot first (and after falling behind), then updates as windows
    /// commit. `None` once the hub has stopped.
    pub async fn next(&mut self) -> Option<Frame> {
        if self.rx.is_none() {
            return self.resync().await;
        }
        loop {
            let rx = self.rx.as_mut()?;
            match rx.recv().await {
                Ok(d) if d.version <= self.version => continue,
                Ok(d) => {
                    self.version = d.version;
                    let u = self.filtered(&d);
                    if u.cards.is_empty()
                        && u.grants.is_empty()
                        && u.removed_cards.is_empty()
                        && u.removed_grants.is_empty()
                    {
                        continue;
                    }
                    return Some(Frame::Update(u));
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "watch subscriber fell behind; resynchronising");
                    return self.resync().await;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// A fresh snapshot, with a receiver taken under the same lock.
    async fn resync(&mut self) -> Option<Frame> {
        let (rx, fleet) = self.attach().await?;
        self.rx = Some(rx);
        self.version = fleet.version;
        let v = view(&fleet, &self.filter);
        self.held_cards = v.cards.iter().map(|c| c.gpu_uuid.clone()).collect();
        self.held_grants = v.grants.iter().map(|g| g.grant_id.clone()).collect();
        Some(Frame::Snapshot(v))
    }

    async fn attach(&mut self) -> Option<(broadcast::Receiver<Arc<Delta>>, Arc<Fleet>)> {
        let shared = &self.hub.shared;
        // Counted while it waits, and no longer once it returns or is dropped mid-wait (a
        // client gone before its first frame), so the worker never computes for nobody.
        let _waiting = Waiting::enter(&shared.waiting);
        let _ = self.hub.wake.try_send(());
        loop {
            let notified = shared.fresh.notified();
            {
                let Ok(st) = shared.state.lock() else {
                    break None;
                };
                let Some(tx) = st.tx.as_ref() else {
                    break None;
                };
                if st.fresh {
                    break Some((tx.subscribe(), st.fleet.clone()));
                }
            }
            // The worker publishes (and notifies) once it has recomputed.
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
            let _ = self.hub.wake.try_send(());
        }
    }

    /// What of `d` this subscriber sees: changed entries its filter keeps, and removals of
    /// those it holds (gone, or no longer kept: a card moved to another grant, say).
    fn filtered(&mut self, d: &Delta) -> Update {
        let f = &self.filter;
        let (cards, removed_cards) = kept(
            &d.cards,
            &d.removed_cards,
            &mut self.held_cards,
            |c| f.card(c),
            |c| &c.gpu_uuid,
        );
        let (grants, removed_grants) = kept(
            &d.grants,
            &d.removed_grants,
            &mut self.held_grants,
            |g| f.grant(g),
            |g| &g.grant_id,
        );
        Update {
            version: d.version,
            at_ms: d.at_ms,
            day: d.day.clone(),
            day_from_ms: d.day_from_ms,
            cards,
            grants,
            removed_cards,
            removed_grants,
        }
    }
}

/// What `filter` keeps of `fleet`.
pub fn view(fleet: &Fleet, filter: &Filter) -> View {
    View {
        version: fleet.version,
        at_ms: fleet.at_ms,
        day: fleet.day.clone(),
        day_from_ms: fleet.day_from_ms,
        cards: fleet
            .cards
            .values()
            .filter(|c| filter.card(c))
            .cloned()
            .collect(),
        grants: fleet
            .grants
            .values()
            .filter(|g| filter.grant(g))
            .cloned()
            .collect(),
    }
}

struct Worker {
    store: Arc<dyn Store>,
    opts: HubOptions,
    shared: Arc<Shared>,
    /// Each card's latest counted window.
    latest: HashMap<String, MeteredWindow>,
    /// Whether `latest` was read over the whole look-back once.
    seeded: bool,
    /// The instant the last computation was made as of.
    last_now: Option<i64>,
    /// Current least gap between recomputations.
    last_gap: Duration,
}

impl Worker {
    fn run(mut self, woken: std::sync::mpsc::Receiver<()>) {
        use std::sync::mpsc::RecvTimeoutError;
        // Commits not yet read back, and the time range they cover.
        let mut dirty = true;
        let mut range: Option<(i64, i64)> = None;
        let mut last: Option<Instant> = None;
        let mut watched = false;
        loop {
            let wait = match last {
                Some(at) if dirty && watched => self.last_gap.saturating_sub(at.elapsed()),
                None if watched => Duration::ZERO,
                _ => self.opts.refresh,
            };
            match woken.recv_timeout(wait.max(Duration::from_millis(1))) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if let Ok(mut p) = self.shared.pending.lock() {
                if p.commits > 0 {
                    dirty = true;
                    p.commits = 0;
                }
                if let Some((f, u)) = p.range.take() {
                    range = Some(range.map_or((f, u), |(rf, ru)| (rf.min(f), ru.max(u))));
                }
            }
            let (receivers, fresh) = self
                .shared
                .state
                .lock()
                .map(|s| (s.tx.as_ref().map_or(0, |t| t.receiver_count()), s.fresh))
                .unwrap_or((0, false));
            watched = receivers > 0 || self.shared.waiting.load(Ordering::SeqCst) > 0;
            if !watched {
                // Nobody looks: keep what to read, compute nothing.
                if dirty && fresh {
                    if let Ok(mut s) = self.shared.state.lock() {
                        s.fresh = false;
                    }
                }
                continue;
            }
            let since = last.map(|at| at.elapsed());
            let gap_over = since.is_none_or(|s| s >= self.last_gap);
            let refresh_due = since.is_none_or(|s| s >= self.opts.refresh);
            if !((dirty || !fresh) && gap_over || refresh_due) {
                continue;
            }
            let started = Instant::now();
            let reading = range.take();
            match self.compute(reading) {
                Ok(next) => {
                    self.publish(next);
                    dirty = false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "live figures: reading the store failed; retrying");
                    range = reading;
                }
            }
            self.last_gap = self.opts.min_gap.max(started.elapsed() * 4);
            last = Some(Instant::now());
        }
        if let Ok(mut s) = self.shared.state.lock() {
            s.tx = None;
        }
        self.shared.fresh.notify_waiters();
    }

    /// Publishes `next` (versioned one past the last) when anything changed; marks fresh.
    fn publish(&mut self, mut next: Fleet) {
        let Ok(mut st) = self.shared.state.lock() else {
            return;
        };
        let prev = st.fleet.clone();
        let cards: Vec<CardLive> = next
            .cards
            .values()
            .filter(|c| prev.cards.get(&c.gpu_uuid) != Some(*c))
            .cloned()
            .collect();
        let grants: Vec<GrantLive> = next
            .grants
            .values()
            .filter(|g| prev.grants.get(&g.grant_id) != Some(*g))
            .cloned()
            .collect();
        let removed_cards: Vec<String> = prev
            .cards
            .keys()
            .filter(|k| !next.cards.contains_key(*k))
            .cloned()
            .collect();
        let removed_grants: Vec<String> = prev
            .grants
            .keys()
            .filter(|k| !next.grants.contains_key(*k))
            .cloned()
            .collect();
        let changed = !(cards.is_empty()
            && grants.is_empty()
            && removed_cards.is_empty()
            && removed_grants.is_empty())
            || prev.version == 0;
        if changed {
            next.version = prev.version + 1;
            let delta = Arc::new(Delta {
                version: next.version,
                at_ms: next.at_ms,
                day: next.day.clone(),
                day_from_ms: next.day_from_ms,
                cards,
                grants,
                removed_cards,
                removed_grants,
            });
            st.fleet = Arc::new(next);
            if let Some(tx) = &st.tx {
                // No receiver is not an error: nobody is watching this instant.
                let _ = tx.send(delta);
            }
        }
        st.fresh = true;
        drop(st);
        self.shared.fresh.notify_waiters();
    }

    /// Reads the store and computes the whole state as of now; `range` is committed time to
    /// read windows back from.
    fn compute(&mut self, range: Option<(i64, i64)>) -> Result<Fleet, StoreError> {
        let now = (self.opts.now)();
        let store = self.store.as_ref();
        // Latest counted window per card: the whole look-back once, then what was committed.
        let mut reads: Vec<(i64, i64)> = Vec::new();
        if !self.seeded {
            reads.push((now - self.opts.lookback_ms, now + DAY_MS));
        }
        if let Some(r) = range {
            reads.push(r);
        }
        // Other collectors sharing the store commit windows this hub is not told of: read
        // what ended since a little before the last computation (two refreshes back).
        if let (true, Some(last)) = (store.shared_poll().is_some(), self.last_now) {
            let back = 2 * i64::try_from(self.opts.refresh.as_millis()).unwrap_or(i64::MAX / 4);
            reads.push((last.saturating_sub(back), now + DAY_MS));
        }
        for (from, until) in reads {
            for w in store.windows(from, until.max(from + 1), None)? {
                let newer = self.latest.get(&w.window.gpu_uuid).is_none_or(|l| {
                    (w.window.start_ms, w.window.end_ms) >= (l.window.start_ms, l.window.end_ms)
                });
                if newer {
                    self.latest.insert(w.window.gpu_uuid.clone(), w);
                }
            }
        }
        self.seeded = true;
        self.last_now = Some(now);
        let grants = store.grants()?;
        let hosts = store.hosts()?;
        let (day, day_from, day_until) = kst_day(now);
        // Today, as a report of today would count it.
        let idle = IdleSettings {
            threshold_pct: crate::query::DEFAULT_IDLE_THRESHOLD_PCT,
            days: 1,
            as_of_ms: day_until,
        };
        let (today, _) = crate::query::figures_of(
            store,
            &Inputs {
                period: &day,
                from_ms: day_from,
                until_ms: day_until,
                program: None,
                grant_id: None,
                grants: &grants,
                windows: &[],
                events: &[],
                invoices: &[],
                idle,
            },
            now,
            &|_, _| true,
            true,
            false,
        )?;
        let latest: Vec<MeteredWindow> = self.latest.values().cloned().collect();
        let windowed = window_figures(store, &grants, &latest, now)?;
        Ok(assemble(Assembly {
            now,
            day,
            day_from,
            grants: &grants,
            hosts: &hosts,
            latest: &latest,
            today: &today,
            windowed: &windowed,
            lookback_ms: self.opts.lookback_ms,
            connected: self.opts.connected.as_deref(),
        }))
    }
}

/// The Korean calendar day holding `now`: (`YYYY-MM-DD`, start, end).
fn kst_day(now: i64) -> (String, i64, i64) {
    let label = chrono::DateTime::from_timestamp_millis(now)
        .unwrap_or_default()
        .with_timezone(&crate::report::kst())
        .format("%Y-%m-%d")
        .to_string();
    let (from, until) =
        crate::report::parse_period(&label).unwrap_or((now - now.rem_euclid(DAY_MS), now + DAY_MS));
    (label, from, until)
}

/// Per card: its latest window's figures under the grant that held it then, and its use
/// while no grant held it; one reconciliation over the span of every latest window, each
/// card given only its own latest window and the violations inside it.
struct Windowed {
    figures: HashMap<String, (String, Figures)>,
    unassigned: HashMap<String, (u64, u64)>,
}

fn window_figures(
    store: &dyn Store,
    grants: &[Grant],
    latest: &[MeteredWindow],
    now: i64,
) -> Result<Windowed, StoreError> {
    let mut out = Windowed {
        figures: HashMap::new(),
        unassigned: HashMap::new(),
    };
    let Some(from) = latest.iter().map(|w| w.window.start_ms).min() else {
        return Ok(out);
    };
    let until = latest
        .iter()
        .map(|w| w.window.end_ms)
        .max()
        .unwrap_or(from)
        .max(from + 1);
    let spans: HashMap<&str, (i64, i64)> = latest
        .iter()
        .map(|w| {
            (
                w.window.gpu_uuid.as_str(),
                (w.window.start_ms, w.window.end_ms),
            )
        })
        .collect();
    let mut events = store.events(from, until, Some("enforcement"), None)?;
    events.retain(|e| {
        spans
            .get(e.event.gpu_uuid.as_str())
            .is_some_and(|(s, u)| e.event.at_ms >= *s && e.event.at_ms < *u)
    });
    let r = reconcile::reconcile_as_of(
        &Inputs {
            period: "latest windows",
            from_ms: from,
            until_ms: until,
            program: None,
            grant_id: None,
            grants,
            windows: latest,
            events: &events,
            invoices: &[],
            idle: IdleSettings {
                threshold_pct: 0.0,
                days: 1,
                as_of_ms: until,
            },
        },
        now.max(until),
    );
    for g in &r.grants {
        for c in &g.cards {
            // A card's window lies in one grant's interval, or straddles two: keep the one
            // that saw it delivered.
            let e = out
                .figures
                .entry(c.gpu_uuid.clone())
                .or_insert_with(|| (g.grant_id.clone(), Figures::default()));
            if c.figures.delivered_ms > e.1.delivered_ms || e.0 == g.grant_id {
                // A window has no allocation of its own: the span reconciled here is every
                // card's latest window together, so allocated and unmetered say nothing of
                // this card's window and are left 0.
                let f = Figures {
                    allocated_ms: 0,
                    unmetered_ms: 0,
                    ..c.figures
                };
                *e = (g.grant_id.clone(), f);
            }
        }
    }
    for u in &r.unassigned {
        for c in &u.cards {
            out.unassigned
                .insert(c.gpu_uuid.clone(), (c.unassigned_use_ms, c.violations));
        }
    }
    Ok(out)
}

/// A day's figures without the two that grow with the clock rather than with the ledger
/// (allocated, and unmetered with it): kept, they would change every card at every
/// recomputation and send the whole fleet to every subscriber each time. The day's report
/// has them.
fn metered(f: Figures) -> Figures {
    Figures {
        allocated_ms: 0,
        unmetered_ms: 0,
        ..f
    }
}

struct Assembly<'a> {
    now: i64,
    day: String,
    day_from: i64,
    grants: &'a [Grant],
    hosts: &'a [crate::store::HostRow],
    latest: &'a [MeteredWindow],
    today: &'a reconcile::Reconciliation,
    windowed: &'a Windowed,
    lookback_ms: i64,
    connected: Option<&'a (dyn Fn(&str) -> bool + Send + Sync)>,
}

/// The state from what was read (pure).
fn assemble(a: Assembly<'_>) -> Fleet {
    let mut cards: BTreeMap<String, CardLive> = BTreeMap::new();
    let blank = |uuid: &str, host: &str, agent: &str, csp: &str| CardLive {
        gpu_uuid: uuid.to_string(),
        host_id: host.to_string(),
        agent_id: agent.to_string(),
        csp: csp.to_string(),
        ..CardLive::default()
    };
    // The inventory: every card an agent listed.
    for h in a.hosts {
        for g in &h.gpus {
            let c = cards
                .entry(g.uuid.clone())
                .or_insert_with(|| blank(&g.uuid, &h.host_id, &h.agent_id, &h.csp));
            c.gpu_name = g.name.clone();
            c.memory_total_bytes = g.memory_total_bytes;
        }
    }
    // The grants' cards, reported or not.
    let mut holder: HashMap<&str, &Grant> = HashMap::new();
    for g in a.grants {
        for gc in &g.cards {
            let (from, until) = g.card_interval(gc);
            cards
                .entry(gc.gpu_uuid.clone())
                .or_insert_with(|| blank(&gc.gpu_uuid, &gc.host_id, "", &g.csp));
            if from <= a.now && a.now < until {
                holder.insert(gc.gpu_uuid.as_str(), g);
            }
        }
    }
    for w in a.latest {
        let c = cards
            .entry(w.window.gpu_uuid.clone())
            .or_insert_with(|| blank(&w.window.gpu_uuid, &w.host_id, &w.agent_id, &w.csp));
        c.host_id = w.host_id.clone();
        c.agent_id = w.agent_id.clone();
        c.csp = w.csp.clone();
        c.window_start_ms = w.window.start_ms;
        c.window_end_ms = w.window.end_ms;
        c.util_pct = w.window.util_avg_pct;
        c.memory_used_bytes = w.window.memory_used_max_bytes;
        c.power_w = w.window.power_avg_w;
        c.health = w.window.health.to_string();
        c.reporting = w.window.end_ms > a.now - a.lookback_ms;
    }
    for g in &a.today.grants {
        for gc in &g.cards {
            if let Some(c) = cards.get_mut(&gc.gpu_uuid) {
                c.day.add(&metered(gc.figures));
            }
        }
    }
    for u in &a.today.unassigned {
        for uc in &u.cards {
            if let Some(c) = cards.get_mut(&uc.gpu_uuid) {
                c.day_unassigned_ms = uc.unassigned_use_ms;
                c.day.violations += uc.violations;
            }
        }
    }
    for c in cards.values_mut() {
        if let Some(g) = holder.get(c.gpu_uuid.as_str()) {
            c.grant_id = g.grant_id.clone();
            c.program = g.program.to_string();
            c.grantee = g.grantee.clone();
        }
        if let Some((_, f)) = a.windowed.figures.get(&c.gpu_uuid) {
            c.window = *f;
        }
        if let Some((ms, v)) = a.windowed.unassigned.get(&c.gpu_uuid) {
            c.window_unassigned_ms = *ms;
            c.window.violations += v;
        }
        c.connected = !c.agent_id.is_empty() && a.connected.is_some_and(|f| f(&c.agent_id));
        c.idle = !c.grant_id.is_empty()
            && c.reporting
            && c.window.delivered_ms > 0
            && c.window.idle_ms == c.window.delivered_ms;
        c.violating = c.reporting
            && (c.window.violations > 0 || c.window.foreign_ms > 0 || c.window_unassigned_ms > 0);
    }
    let mut grants: BTreeMap<String, GrantLive> = BTreeMap::new();
    for g in &a.today.grants {
        let hosts: BTreeSet<String> = g.cards.iter().map(|c| c.host_id.clone()).collect();
        let mut live = GrantLive {
            grant_id: g.grant_id.clone(),
            program: g.program.clone(),
            grantee: g.grantee.clone(),
            csp: g.csp.clone(),
            cards: g.cards.len() as u32,
            hosts: hosts.into_iter().collect(),
            reporting_cards: 0,
            idle_cards: 0,
            violating_cards: 0,
            window: Figures::default(),
            day: metered(g.figures),
        };
        for gc in &g.cards {
            let Some(c) = cards.get(&gc.gpu_uuid) else {
                continue;
            };
            if a.windowed
                .figures
                .get(&gc.gpu_uuid)
                .is_some_and(|(gid, _)| *gid == g.grant_id)
            {
                live.window.add(&c.window);
            }
            if c.grant_id == g.grant_id {
                live.reporting_cards += u32::from(c.reporting);
                live.idle_cards += u32::from(c.idle);
                live.violating_cards += u32::from(c.violating);
            }
        }
        grants.insert(live.grant_id.clone(), live);
    }
    Fleet {
        version: 0,
        at_ms: a.now,
        day: a.day,
        day_from_ms: a.day_from,
        cards,
        grants,
    }
}

// ---------------------------------------------------------------------------------------------
// The gRPC edge (Query.Watch)

/// Cards (and grants) per message of a snapshot: ~300 bytes each keeps a part far below a
/// client's 4 MiB limit however large the fleet.
pub const SNAPSHOT_PART: usize = 1_000;

/// The filter a `WatchRequest` asks for; a program that is not one of the three is refused,
/// naming the field.
pub fn filter_from_wire(q: &v1::WatchRequest) -> Result<Filter, tonic::Status> {
    let program = q.program.trim().to_ascii_lowercase();
    if !program.is_empty() && program.parse::<crate::grants::Program>().is_err() {
        return Err(tonic::Status::invalid_argument(format!(
            "program {:?}: expected hpc, research or advanced",
            q.program
        )));
    }
    Ok(Filter {
        program,
        grant_id: q.grant_id.trim().to_string(),
        host_id: q.host_id.trim().to_string(),
    })
}

/// The messages of one frame: a snapshot in parts of [`SNAPSHOT_PART`], an update whole.
pub fn frame_to_wire(frame: &Frame) -> Vec<v1::WatchEvent> {
    match frame {
        Frame::Snapshot(v) => {
            let parts = v
                .cards
                .len()
                .max(v.grants.len())
                .div_ceil(SNAPSHOT_PART)
                .max(1);
            (0..parts)
                .map(|i| {
                    let slice =
                        |n: usize| (i * SNAPSHOT_PART).min(n)..((i + 1) * SNAPSHOT_PART).min(n);
                    v1::WatchEvent {
                        reset: i == 0,
                        complete: i + 1 == parts,
                        version: v.version,
                        at_unix_ms: v.at_ms,
                        day: v.day.clone(),
                        day_from_unix_ms: v.day_from_ms,
                        cards: v.cards[slice(v.cards.len())]
                            .iter()
                            .map(card_to_wire)
                            .collect(),
                        grants: v.grants[slice(v.grants.len())]
                            .iter()
                            .map(grant_to_wire)
                            .collect(),
                        removed_cards: vec![],
                        removed_grants: vec![],
                    }
                })
                .collect()
        }
        Frame::Update(u) => vec![v1::WatchEvent {
            reset: false,
            complete: true,
            version: u.version,
            at_unix_ms: u.at_ms,
            day: u.day.clone(),
            day_from_unix_ms: u.day_from_ms,
            cards: u.cards.iter().map(card_to_wire).collect(),
            grants: u.grants.iter().map(grant_to_wire).collect(),
            removed_cards: u.removed_cards.clone(),
            removed_grants: u.removed_grants.clone(),
        }],
    }
}

pub fn card_to_wire(c: &CardLive) -> v1::LiveCard {
    let f = crate::query::figures_to_wire;
    v1::LiveCard {
        gpu_uuid: c.gpu_uuid.clone(),
        host_id: c.host_id.clone(),
        agent_id: c.agent_id.clone(),
        csp: c.csp.clone(),
        gpu_name: c.gpu_name.clone(),
        window_start_unix_ms: c.window_start_ms,
        window_end_unix_ms: c.window_end_ms,
        util_pct: c.util_pct,
        memory_used_bytes: c.memory_used_bytes,
        memory_total_bytes: c.memory_total_bytes,
        power_w: c.power_w,
        health: c.health.clone(),
        reporting: c.reporting,
        connected: c.connected,
        grant_id: c.grant_id.clone(),
        program: c.program.clone(),
        grantee: c.grantee.clone(),
        window: Some(f(&c.window)),
        window_unassigned_ms: c.window_unassigned_ms,
        day: Some(f(&c.day)),
        day_unassigned_ms: c.day_unassigned_ms,
        idle: c.idle,
        violating: c.violating,
    }
}

pub fn grant_to_wire(g: &GrantLive) -> v1::LiveGrant {
    let f = crate::query::figures_to_wire;
    v1::LiveGrant {
        grant_id: g.grant_id.clone(),
        program: g.program.clone(),
        grantee: g.grantee.clone(),
        csp: g.csp.clone(),
        cards: g.cards,
        hosts: g.hosts.clone(),
        reporting_cards: g.reporting_cards,
        idle_cards: g.idle_cards,
        violating_cards: g.violating_cards,
        window: Some(f(&g.window)),
        day: Some(f(&g.day)),
    }
}

/// The changed entries a filter keeps (now held) and the ids the subscriber must drop: those
/// it held that are gone, or changed into ones the filter no longer keeps.
fn kept<T: Clone>(
    changed: &[T],
    removed: &[String],
    held: &mut std::collections::HashSet<String>,
    keeps: impl Fn(&T) -> bool,
    id: impl Fn(&T) -> &String,
) -> (Vec<T>, Vec<String>) {
    let mut out = Vec::new();
    let mut dropped = Vec::new();
    for item in changed {
        if keeps(item) {
            held.insert(id(item).clone());
            out.push(item.clone());
        } else if held.remove(id(item)) {
            dropped.push(id(item).clone());
        }
    }
    dropped.extend(removed.iter().filter(|r| held.remove(*r)).cloned());
    (out, dropped)
}

#[cfg(test)]
mod tests;
