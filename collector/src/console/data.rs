//! What the console's pages read, computed by the code every report uses: a period's
//! reconciliation ([`crate::query::compute_report_with`] on the rollups, as the Reconcile RPC
//! computes it) held for a short while per period, the last verification run, and the live
//! hub's frames in the compact form the pages' script reads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpumeter_proto::v1;
use serde_json::{Value, json};

use crate::heads::SignedHead;
use crate::reconcile::Reconciliation;
use crate::render::CardDay;
use crate::store::Store;
use crate::verify::VerifyReport;
use crate::watch::{CardLive, Frame, GrantLive};

/// A period's figures as of a signed head.
#[derive(Debug)]
pub struct Report {
    pub period: String,
    pub rec: Reconciliation,
    pub days: Vec<CardDay>,
    pub head: SignedHead,
    /// The hosts and their cards as the store held them then (`Store::hosts`, read with the
    /// figures: at national scale it is a read of its own worth sharing).
    pub hosts: Vec<crate::store::HostRow>,
    /// The query it answers (for the downloads' provenance).
    pub query: v1::ReconcileRequest,
    /// When it was computed (Unix ms), and how long that took.
    pub computed_ms: i64,
    pub took: Duration,
}

/// The period a page asks for, or the Korean calendar month holding `now_ms`.
pub fn period_or_month(period: &str, now_ms: i64) -> String {
    let p = period.trim();
    if !p.is_empty() {
        return p.to_string();
    }
    chrono::DateTime::from_timestamp_millis(now_ms)
        .map(|t| {
            t.with_timezone(&crate::report::kst())
                .format("%Y-%m")
                .to_string()
        })
        .unwrap_or_default()
}

/// Computes `period`'s report as the Reconcile RPC does (a fresh or reused head, rollups).
pub fn compute(store: &dyn Store, period: &str, now_ms: i64) -> Result<Report, String> {
    let query = v1::ReconcileRequest {
        period: period.to_string(),
        ..Default::default()
    };
    let t = Instant::now();
    let (rec, days, head) = crate::query::compute_report_with(store, &query, true)
        .map_err(|e| e.message().to_string())?;
    let hosts = store.hosts().map_err(|e| e.to_string())?;
    let mut query = query;
    query.as_of_head = head.id;
    Ok(Report {
        period: period.to_string(),
        rec,
        days,
        head,
        hosts,
        query,
        computed_ms: now_ms,
        took: t.elapsed(),
    })
}

/// Periods' reports. A period asked for the first time is computed while the page waits
/// (one computation at a time: a second page asking for it waits for the first's result).
/// After `ttl` the report held is still served at once, marked by its head and computation
/// time, while one refresh runs in the background, so no page waits for a national-scale
/// recomputation once its period is held.
#[derive(Debug, Clone)]
pub struct ReportCache {
    inner: Arc<CacheInner>,
}

#[derive(Debug)]
struct CacheInner {
    ttl: Duration,
    held: tokio::sync::Mutex<HashMap<String, (Instant, Arc<Report>)>>,
    /// Periods whose background refresh is running.
    refreshing: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Periods held at most.
const PERIODS_HELD: usize = 8;

impl ReportCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            inner: Arc::new(CacheInner {
                ttl,
                held: tokio::sync::Mutex::new(HashMap::new()),
                refreshing: std::sync::Mutex::new(Default::default()),
            }),
        }
    }

    pub async fn get(
        &self,
        store: Arc<dyn Store>,
        period: &str,
        now_ms: i64,
    ) -> Result<Arc<Report>, String> {
        let mut held = self.inner.held.lock().await;
        if let Some((at, r)) = held.get(period) {
            if at.elapsed() >= self.inner.ttl {
                self.refresh(store, period, now_ms);
            }
            return Ok(r.clone());
        }
        let p = period.to_string();
        let r = tokio::task::spawn_blocking(move || compute(store.as_ref(), &p, now_ms))
            .await
            .map_err(|e| e.to_string())??;
        let r = Arc::new(r);
        Self::hold(&mut held, period, r.clone());
        Ok(r)
    }

    /// Computes `period` in the background (the current month when the console starts, so
    /// its first visitor does not wait either), unless a refresh of it is running already.
    pub fn refresh(&self, store: Arc<dyn Store>, period: &str, now_ms: i64) {
        {
            let Ok(mut running) = self.inner.refreshing.lock() else {
                return;
            };
            if !running.insert(period.to_string()) {
                return;
            }
        }
        let inner = self.inner.clone();
        let p = period.to_string();
        tokio::spawn(async move {
            let q = p.clone();
            let r = tokio::task::spawn_blocking(move || compute(store.as_ref(), &q, now_ms)).await;
            match r {
                Ok(Ok(r)) => {
                    let mut held = inner.held.lock().await;
                    Self::hold(&mut held, &p, Arc::new(r));
                }
                Ok(Err(e)) => {
                    tracing::warn!(period = %p, error = %e, "console: refreshing a period's figures failed; the last ones stay shown");
                }
                Err(e) => {
                    tracing::warn!(period = %p, error = %e, "console: the refresh of a period's figures stopped");
                }
            }
            if let Ok(mut running) = inner.refreshing.lock() {
                running.remove(&p);
            }
        });
    }

    fn hold(held: &mut HashMap<String, (Instant, Arc<Report>)>, period: &str, r: Arc<Report>) {
        if !held.contains_key(period) && held.len() >= PERIODS_HELD {
            if let Some(oldest) = held
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone())
            {
                held.remove(&oldest);
            }
        }
        held.insert(period.to_string(), (Instant::now(), r));
    }
}

/// Where the console's verification of the ledger stands.
#[derive(Debug, Clone, Default)]
pub struct VerifyState {
    pub running: bool,
    /// The last finished run: when it started and ended (Unix ms), and what it found.
    pub last: Option<(i64, i64, Result<Arc<VerifyReport>, String>)>,
}

/// The console's verification runs ([`crate::verify::verify`] over the store's ledger, as
/// `verify --server` runs it), one at a time, in a thread of their own.
#[derive(Debug, Default)]
pub struct Verification {
    state: Arc<Mutex<VerifyState>>,
}

impl Verification {
    pub fn state(&self) -> VerifyState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Starts a run unless one is running.
    pub fn start(&self, store: Arc<dyn Store>, now: Arc<dyn Fn() -> i64 + Send + Sync>) {
        {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.running {
                return;
            }
            s.running = true;
        }
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            let started = now();
            let r = store
                .ledger()
                .and_then(|l| crate::verify::verify(l.as_ref()))
                .map(Arc::new)
                .map_err(|e| e.to_string());
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            s.running = false;
            s.last = Some((started, now(), r));
        });
    }
}

/// A card's state in one word, as the pages and their script show it: `off` (not
/// reporting), `lost`, `violating`, `idle`, `unassigned` or `ok`.
pub fn card_state(c: &CardLive) -> &'static str {
    if !c.reporting {
        "off"
    } else if c.health == "lost" {
        "lost"
    } else if c.violating {
        "violating"
    } else if c.idle {
        "idle"
    } else if c.grant_id.is_empty() {
        "unassigned"
    } else {
        "ok"
    }
}

fn card_json(c: &CardLive) -> Value {
    json!({
        "uuid": c.gpu_uuid,
        "host": c.host_id,
        "agent": c.agent_id,
        "grant": c.grant_id,
        "state": card_state(c),
        "connected": c.connected,
        "util": c.util_pct,
        "power": c.power_w,
        "mem": c.memory_used_bytes,
        "end": c.window_end_ms,
        "end_kst": crate::console::html::kst(c.window_end_ms),
    })
}

fn grant_json(g: &GrantLive) -> Value {
    json!({
        "id": g.grant_id,
        "cards": g.cards,
        "reporting": g.reporting_cards,
        "idle": g.idle_cards,
        "violating": g.violating_cards,
    })
}

/// What a page's live stream carries (`/live?view=`): every card's figures (`cards`, the
/// default: the card and grant pages, whose rows are cards), the grants' alone (`grants`: the
/// grants list), or the grants and each host's connection state (`hosts`: the fleet page). A
/// page of the whole fleet is so never sent every card of it at each window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LiveView {
    #[default]
    Cards,
    Grants,
    Hosts,
}

impl LiveView {
    pub fn parse(s: &str) -> Option<LiveView> {
        match s {
            "" | "cards" => Some(LiveView::Cards),
            "grants" => Some(LiveView::Grants),
            "hosts" => Some(LiveView::Hosts),
            _ => None,
        }
    }
}

/// One stream's hosts, for [`LiveView::Hosts`]: which cards each host has and whether each
/// card's agent is connected, kept from the frames so an update (which names only the cards
/// that changed) still gives each touched host's whole state.
#[derive(Debug, Default)]
pub struct LiveHosts {
    host_of: HashMap<String, String>,
    cards: HashMap<String, HashMap<String, bool>>,
}

impl LiveHosts {
    /// Takes `frame` in; returns each host it touched with its state now (connected when any
    /// of its cards is), sorted by host.
    pub fn apply(&mut self, frame: &Frame) -> Vec<(String, bool)> {
        let mut touched: Vec<String> = Vec::new();
        let (cards, removed): (&[CardLive], &[String]) = match frame {
            Frame::Snapshot(v) => {
                touched.extend(self.cards.keys().cloned());
                self.host_of.clear();
                self.cards.clear();
                (&v.cards, &[])
            }
            Frame::Update(u) => (&u.cards, &u.removed_cards),
        };
        for uuid in removed {
            if let Some(host) = self.host_of.remove(uuid) {
                if let Some(m) = self.cards.get_mut(&host) {
                    m.remove(uuid);
                }
                touched.push(host);
            }
        }
        for c in cards {
            if let Some(old) = self.host_of.insert(c.gpu_uuid.clone(), c.host_id.clone())
                && old != c.host_id
            {
                if let Some(m) = self.cards.get_mut(&old) {
                    m.remove(&c.gpu_uuid);
                }
                touched.push(old);
            }
            self.cards
                .entry(c.host_id.clone())
                .or_default()
                .insert(c.gpu_uuid.clone(), c.connected);
            touched.push(c.host_id.clone());
        }
        touched.sort();
        touched.dedup();
        touched
            .into_iter()
            .map(|h| {
                let connected = match self.cards.get(&h) {
                    Some(m) if m.is_empty() => {
                        self.cards.remove(&h);
                        false
                    }
                    Some(m) => m.values().any(|c| *c),
                    None => false,
                };
                (h, connected)
            })
            .collect()
    }
}

/// A frame as `view` carries it; `hosts` is the stream's own [`LiveHosts`].
pub fn live_json_as(frame: &Frame, view: LiveView, hosts: &mut LiveHosts) -> Value {
    let mut v = frame_json(frame, view == LiveView::Cards);
    match view {
        LiveView::Cards | LiveView::Grants => {}
        LiveView::Hosts => {
            v["hosts"] = hosts
                .apply(frame)
                .into_iter()
                .map(|(host, connected)| json!({ "host": host, "connected": connected }))
                .collect();
        }
    }
    v
}

/// A hub frame as the pages' script reads it.
pub fn live_json(frame: &Frame) -> Value {
    frame_json(frame, true)
}

fn frame_json(frame: &Frame, with_cards: bool) -> Value {
    let cards = |cs: &[CardLive]| -> Vec<Value> {
        if with_cards {
            cs.iter().map(card_json).collect()
        } else {
            Vec::new()
        }
    };
    match frame {
        Frame::Snapshot(v) => json!({
            "snapshot": true,
            "version": v.version,
            "cards": cards(&v.cards),
            "grants": v.grants.iter().map(grant_json).collect::<Vec<_>>(),
        }),
        Frame::Update(u) => json!({
            "snapshot": false,
            "version": u.version,
            "cards": cards(&u.cards),
            "grants": u.grants.iter().map(grant_json).collect::<Vec<_>>(),
            "removed_cards": if with_cards { u.removed_cards.clone() } else { Vec::new() },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live_card(uuid: &str, host: &str, connected: bool) -> CardLive {
        CardLive {
            gpu_uuid: uuid.into(),
            host_id: host.into(),
            connected,
            ..CardLive::default()
        }
    }

    fn update(version: u64, cards: Vec<CardLive>, removed: &[&str]) -> Frame {
        Frame::Update(crate::watch::Update {
            version,
            at_ms: 0,
            day: String::new(),
            day_from_ms: 0,
            cards,
            grants: Vec::new(),
            removed_cards: removed.iter().map(|s| (*s).to_owned()).collect(),
            removed_grants: Vec::new(),
        })
    }

    /// The fleet page's stream names hosts, not cards: a host is connected while any of its
    /// cards is, an update that names one card still gives its host's whole state, and a
    /// card that moves or goes away updates the host it left.
    #[test]
    fn the_hosts_view_keeps_each_hosts_state_from_its_cards() {
        let mut hosts = LiveHosts::default();
        let snapshot = Frame::Snapshot(crate::watch::View {
            version: 1,
            at_ms: 0,
            day: String::new(),
            day_from_ms: 0,
            cards: vec![
                live_card("a1", "h-a", true),
                live_card("a2", "h-a", false),
                live_card("b1", "h-b", false),
            ],
            grants: Vec::new(),
        });
        let v = live_json_as(&snapshot, LiveView::Hosts, &mut hosts);
        assert_eq!(v["cards"], json!([]), "no card is sent");
        assert_eq!(
            v["hosts"],
            json!([{ "host": "h-a", "connected": true }, { "host": "h-b", "connected": false }])
        );
        // a1's agent drops: h-a still has a2, which is not connected either.
        let v = live_json_as(
            &update(2, vec![live_card("a1", "h-a", false)], &[]),
            LiveView::Hosts,
            &mut hosts,
        );
        assert_eq!(v["hosts"], json!([{ "host": "h-a", "connected": false }]));
        // a2 moves to h-b and is connected there; h-a is left with a1 alone.
        let v = live_json_as(
            &update(3, vec![live_card("a2", "h-b", true)], &[]),
            LiveView::Hosts,
            &mut hosts,
        );
        assert_eq!(
            v["hosts"],
            json!([{ "host": "h-a", "connected": false }, { "host": "h-b", "connected": true }])
        );
        // a2 leaves the stream: h-b has only b1, not connected.
        let v = live_json_as(&update(4, Vec::new(), &["a2"]), LiveView::Hosts, &mut hosts);
        assert_eq!(v["hosts"], json!([{ "host": "h-b", "connected": false }]));
        // The grants view carries no card and no host; the cards view every card.
        let frame = update(5, vec![live_card("b1", "h-b", true)], &[]);
        let g = live_json_as(&frame, LiveView::Grants, &mut LiveHosts::default());
        assert_eq!((g["cards"].clone(), g.get("hosts")), (json!([]), None));
        let c = live_json_as(&frame, LiveView::Cards, &mut LiveHosts::default());
        assert_eq!(c["cards"][0]["uuid"], "b1");
        assert_eq!(
            [
                LiveView::parse(""),
                LiveView::parse("hosts"),
                LiveView::parse("x")
            ],
            [Some(LiveView::Cards), Some(LiveView::Hosts), None]
        );
    }

    /// Once a period is held, a page never waits for its recomputation: the held report is
    /// served at once and a fresh one replaces it in the background.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_period_is_served_at_once_and_refreshed_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::sqlite::SqliteStore::open(&dir.path().join("c.db")).unwrap());
        let cache = ReportCache::new(Duration::ZERO);
        let first = cache.get(store.clone(), "2026-11", 1).await.unwrap();
        assert_eq!(first.computed_ms, 1);
        // Expired at once (ttl 0): served as held, a refresh started.
        let again = cache.get(store.clone(), "2026-11", 2).await.unwrap();
        assert!(
            Arc::ptr_eq(&first, &again),
            "the held report, not a new computation"
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = cache.get(store.clone(), "2026-11", 3).await.unwrap();
            if !Arc::ptr_eq(&now, &first) {
                assert!(now.computed_ms >= 2, "{}", now.computed_ms);
                assert_eq!(now.period, "2026-11");
                break;
            }
            assert!(Instant::now() < deadline, "no refresh within 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A period asked for the first time is computed for the page that asks.
        let other = cache.get(store.clone(), "2026-10", 4).await.unwrap();
        assert_eq!((other.period.as_str(), other.computed_ms), ("2026-10", 4));
    }

    #[test]
    fn the_default_period_is_the_korean_month() {
        // 2026-10-31T15:00Z is 2026-11-01 00:00 in Seoul.
        assert_eq!(period_or_month("", 1_793_458_800_000), "2026-11");
        assert_eq!(period_or_month("", 1_793_458_799_999), "2026-10");
        assert_eq!(period_or_month(" 2026-04 ", 0), "2026-04");
    }

    #[test]
    fn a_card_state_is_one_word() {
        let mut c = CardLive {
            reporting: true,
            health: "ok".into(),
            grant_id: "g".into(),
            ..Default::default()
        };
        assert_eq!(card_state(&c), "ok");
        c.idle = true;
        assert_eq!(card_state(&c), "idle");
        c.violating = true;
        assert_eq!(card_state(&c), "violating");
        c.reporting = false;
        assert_eq!(card_state(&c), "off");
    }
}
