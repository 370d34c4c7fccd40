//! Enforcement: decides, card by card, which GPU processes may not be there, records each
//! violation, and in `terminate` mode ends the process (SIGTERM, grace period, SIGKILL) from
//! async tasks, so a grace period never delays sampling. Optionally locks cards that have no
//! valid assignment (compute mode PROHIBITED).
//!
//! Rules (DESIGN.md §3):
//! - A process on a card is a violation when the card has no valid assignment at the slot
//!   (unassigned, expired, revoked), or when its principal does not match the grant's. A
//!   process whose identity cannot be read matches no grant.
//! - A violation is recorded once per episode, not once per sample. An episode is one
//!   (card, pid, process start time and uid, principal, assignment status, grant): it stays
//!   open while consecutive good readings show the same thing, and any change (the pid leaves
//!   the card or turns legal, the assignment changes, the pid is reused) ends it; a violation
//!   seen again after that is a new episode. A lost or failed reading changes nothing.
//! - A process that exited since the reading (gone, or a zombie) holds nothing and is skipped.
//! - Before the agent holds any assignment set (a fresh state directory: no cache, and no
//!   Welcome yet) every card only looks unassigned: violations are recorded (`skipped: no
//!   assignment set from the collector yet`), no process is ended and no card is locked. The
//!   first set starts new episodes, so what is still a violation then is acted on.
//! - `observe` signals nothing. `terminate` never signals pid 0, pid 1, the agent itself, a
//!   process whose identity could not be read, or a simulated process (a replayable source's
//!   pids are not processes of this host), and re-checks before every signal that the pid
//!   is still an open violation on that card in the latest reading and is still the same
//!   process (uid and start time, `/proc/<pid>/stat` field 22). The signal goes through a
//!   pidfd opened before that check, so a pid reused in between is never hit.
//! - Every action and its outcome is an `ENFORCEMENT` event: the violation (action `none`,
//!   result `recorded` or `skipped: …`), then `sigterm`/`sent`, and one of `sigterm`/`exited`,
//!   `sigkill`/`killed`, `…`/`failed: …` or `…`/`skipped: …`; lock changes are
//!   `lock_compute_mode`/`unlock_compute_mode` with `applied` or `failed: …`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use gpumeter_proto::v1;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::assignments::{Assignments, CardAssignment, Status};
use crate::attribution::{Identity, PrincipalSpec, parse_stat, parse_status};
use crate::clock::{Clock, UnixMs};
use crate::config::{EnforcementConfig, EnforcementMode};
use crate::gpu::{CardReading, GpuSource};
use crate::record::{event_body, status_to_wire};

/// How often a termination task looks whether its process is gone (clock milliseconds).
const POLL_MS: i64 = 100;
/// How long after SIGKILL a process may take to disappear before the kill counts as failed.
const KILL_CONFIRM_MS: i64 = 5_000;

/// Why a signal was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error("pid {pid} is protected (pid 0, init or the agent itself)")]
    Protected { pid: u32 },
    #[error("process {pid} is gone")]
    Gone { pid: u32 },
    #[error("pid {pid} now belongs to another process")]
    Replaced { pid: u32 },
    #[error("cannot send {signal} to process {pid}: {reason}")]
    Signal {
        pid: u32,
        signal: &'static str,
        reason: String,
    },
}

/// The signals enforcement sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    Term,
    Kill,
}

impl Sig {
    pub fn name(self) -> &'static str {
        match self {
            Sig::Term => "sigterm",
            Sig::Kill => "sigkill",
        }
    }
}

/// Which process a pid is: real uid and start time. A pid whose stamp changed was reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStamp {
    pub uid: Option<u32>,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
    /// The process has exited and waits to be reaped (zombie), or is being torn down.
    pub exited: bool,
}

impl ProcStamp {
    pub fn same_process(&self, other: &ProcStamp) -> bool {
        self.uid == other.uid && self.start_ticks == other.start_ticks
    }
}

/// The edge where enforcement touches processes; a fake stands in for it in unit tests.
pub trait ProcessControl: Send + Sync + 'static {
    /// The process now at `pid`; `None` when there is none.
    fn stamp(&self, pid: u32) -> Option<ProcStamp>;
    /// Sends `sig` to `pid` only if it is still the process `expect` describes.
    fn signal(&self, pid: u32, expect: &ProcStamp, sig: Sig) -> Result<(), EnforceError>;
}

/// The stamp of a process as its identity was read, when the attributor read its start time.
fn seen_stamp(id: &Identity) -> Option<ProcStamp> {
    Some(ProcStamp {
        uid: id.id.uid,
        start_ticks: id.start_ticks?,
        exited: id.exited,
    })
}

/// pid 0 (the process group), 1 (init) and the agent itself are never signalled.
pub fn is_protected(pid: u32, own_pid: u32) -> bool {
    pid <= 1 || pid == own_pid
}

/// Processes through procfs and pidfds.
#[derive(Debug, Clone)]
pub struct ProcControl {
    proc_root: PathBuf,
    own_pid: u32,
}

impl Default for ProcControl {
    fn default() -> Self {
        Self::new(Path::new("/proc"))
    }
}

impl ProcControl {
    pub fn new(proc_root: &Path) -> Self {
        Self {
            proc_root: proc_root.to_path_buf(),
            own_pid: std::process::id(),
        }
    }
}

impl ProcessControl for ProcControl {
    fn stamp(&self, pid: u32) -> Option<ProcStamp> {
        let dir = self.proc_root.join(pid.to_string());
        let (state, start_ticks) = parse_stat(&std::fs::read_to_string(dir.join("stat")).ok()?)?;
        let uid = parse_status(&std::fs::read_to_string(dir.join("status")).ok()?).uid;
        Some(ProcStamp {
            uid,
            start_ticks,
            exited: matches!(state, 'Z' | 'X' | 'x'),
        })
    }

    fn signal(&self, pid: u32, expect: &ProcStamp, sig: Sig) -> Result<(), EnforceError> {
        use rustix::io::Errno;
        use rustix::process::{
            Pid, PidfdFlags, Signal, kill_process, pidfd_open, pidfd_send_signal,
        };
        if is_protected(pid, self.own_pid) {
            return Err(EnforceError::Protected { pid });
        }
        let raw = i32::try_from(pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or(EnforceError::Gone { pid })?;
        let failed = |e: Errno| EnforceError::Signal {
            pid,
            signal: sig.name(),
            reason: e.to_string(),
        };
        // Opened before the identity check: the pidfd pins the process that had the pid then,
        // so if the check passes, the signal reaches that process even if the pid is reused.
        let pidfd = match pidfd_open(raw, PidfdFlags::empty()) {
            Ok(fd) => Some(fd),
            Err(Errno::SRCH) => return Err(EnforceError::Gone { pid }),
            // Kernels before 5.3: plain kill right after the check (a far smaller window
            // than the sampling interval, but not none).
            Err(Errno::NOSYS) => None,
            Err(e) => return Err(failed(e)),
        };
        match self.stamp(pid) {
            None => return Err(EnforceError::Gone { pid }),
            Some(s) if !s.same_process(expect) => return Err(EnforceError::Replaced { pid }),
            Some(s) if s.exited => return Err(EnforceError::Gone { pid }),
            Some(_) => {}
        }
        let signal = match sig {
            Sig::Term => Signal::TERM,
            Sig::Kill => Signal::KILL,
        };
        let sent = match &pidfd {
            Some(fd) => pidfd_send_signal(fd, signal),
            None => kill_process(raw, signal),
        };
        match sent {
            Ok(()) => Ok(()),
            Err(Errno::SRCH) => Err(EnforceError::Gone { pid }),
            Err(e) => Err(failed(e)),
        }
    }
}

/// Whether a process on a card in `status`, whose grant names `spec`, is a violation.
pub fn is_violation(
    status: Status,
    spec: Option<&PrincipalSpec>,
    identity: Option<&Identity>,
) -> bool {
    match (status, spec, identity) {
        (Status::Assigned, Some(s), Some(i)) => !s.matches(&i.id),
        _ => true,
    }
}

/// What to do about a new violation episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Record it and do nothing else (observe mode).
    Record,
    /// Record it and end the process described by the stamp.
    Terminate(ProcStamp),
    /// Terminate mode, but the process may not or cannot be signalled; record why.
    Skip(&'static str),
}

/// `live` is false for simulated processes, whose pids are not processes of this host.
pub fn plan(
    mode: EnforcementMode,
    live: bool,
    pid: u32,
    own_pid: u32,
    identity: Option<&Identity>,
    stamp: Option<ProcStamp>,
) -> Plan {
    if mode == EnforcementMode::Observe {
        return Plan::Record;
    }
    if !live {
        return Plan::Skip("simulated process");
    }
    if is_protected(pid, own_pid) {
        return Plan::Skip("protected pid");
    }
    // Unreadable: possibly another pid namespace, where this number is someone else.
    let Some(id) = identity else {
        return Plan::Skip("process not readable");
    };
    match stamp {
        None => Plan::Skip("process gone"),
        Some(s) if s.exited => Plan::Skip("process gone"),
        Some(s) if s.uid != id.id.uid => Plan::Skip("process changed between reads"),
        Some(s) => Plan::Terminate(s),
    }
}

/// One open violation: see the module doc for what starts and ends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Episode {
    pub status: Status,
    /// The card's grant, also when expired or revoked; empty when unassigned.
    pub grant_id: String,
    /// The process's principal label (`user:NAME`, `uid:N`, `unknown`).
    pub principal: String,
    pub uid: Option<u32>,
    pub start_ticks: Option<u64>,
    /// Judged against an assignment set the collector sent: the first set starts a new
    /// episode, so a violation seen before it (recorded only) is then acted on.
    pub judged: bool,
}

/// Replaces a card's open episodes with those seen now; returns the pids whose episode is new.
pub fn track(open: &mut BTreeMap<u32, Episode>, now: BTreeMap<u32, Episode>) -> Vec<u32> {
    let new = now
        .iter()
        .filter(|(pid, ep)| open.get(pid) != Some(ep))
        .map(|(pid, _)| *pid)
        .collect();
    *open = now;
    new
}

/// A compute-mode lock to set on a card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockChange {
    pub uuid: String,
    pub prohibit: bool,
    pub status: Status,
    pub grant_id: String,
}

/// A lock change and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockResult {
    pub change: LockChange,
    pub result: Result<(), String>,
}

/// Applies lock changes to the source; runs on the blocking thread that owns the source.
pub fn apply_locks(source: &mut dyn GpuSource, changes: Vec<LockChange>) -> Vec<LockResult> {
    changes
        .into_iter()
        .map(|change| LockResult {
            result: source
                .set_compute_prohibited(&change.uuid, change.prohibit)
                .map_err(|e| e.to_string()),
            change,
        })
        .collect()
}

/// The `ASSIGNMENT_CHANGED` event for going from `previous` to `next`: the version goes in
/// `code`, the cards whose assignment changed in `detail`.
pub fn assignment_changed(previous: &Assignments, next: &Assignments, at: UnixMs) -> v1::Event {
    let changed: Vec<&str> = next
        .cards
        .keys()
        .chain(previous.cards.keys())
        .filter(|u| previous.cards.get(*u) != next.cards.get(*u))
        .map(String::as_str)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    v1::Event {
        kind: v1::EventKind::AssignmentChanged as i32,
        gpu_uuid: String::new(),
        at_unix_ms: at,
        code: i64::try_from(next.version).unwrap_or(i64::MAX),
        detail: format!(
            "assignment version {} (was {}): {} cards; changed: {}",
            next.version,
            previous.version,
            next.cards.len(),
            if changed.is_empty() {
                "none".to_string()
            } else {
                changed.join(", ")
            }
        ),
        enforcement: None,
    }
}

fn mode_to_wire(m: EnforcementMode) -> v1::EnforcementMode {
    match m {
        EnforcementMode::Observe => v1::EnforcementMode::Observe,
        EnforcementMode::Terminate => v1::EnforcementMode::Terminate,
    }
}

fn why(status: Status, card: Option<&CardAssignment>, principal: &str) -> String {
    let gid = card.map_or("", |c| c.grant_id.as_str());
    match status {
        Status::Assigned => format!(
            "{principal} does not match grant {gid} ({})",
            card.map_or("", |c| c.principal.as_str())
        ),
        Status::Unassigned => format!("{principal} on a card with no assignment"),
        Status::Expired => format!("{principal} on a card whose grant {gid} is not valid now"),
        Status::Revoked => format!("{principal} on a card whose grant {gid} was revoked"),
    }
}

type OpenEpisodes = BTreeMap<String, BTreeMap<u32, Episode>>;

fn lock_open(m: &Mutex<OpenEpisodes>) -> MutexGuard<'_, OpenEpisodes> {
    // Holders never leave the map half-updated, so a poisoned lock is taken over.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The enforcer of one agent: a field of the sampling loop.
pub struct Enforcer {
    cfg: EnforcementConfig,
    /// `None` when the processes are simulated: violations are recorded, nothing is touched.
    control: Option<Arc<dyn ProcessControl>>,
    clock: Arc<dyn Clock>,
    own_pid: u32,
    /// Open episodes per card; termination tasks re-check it before each signal.
    open: Arc<Mutex<OpenEpisodes>>,
    /// Lock state last applied per card (`true`: prohibited).
    locks: BTreeMap<String, bool>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for Enforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcer")
            .field("cfg", &self.cfg)
            .field("locks", &self.locks)
            .field("in_flight", &self.tasks.len())
            .finish_non_exhaustive()
    }
}

impl Enforcer {
    /// `control` is `None` for a source whose processes are simulated (see
    /// [`crate::gpu::GpuSource::replayable`]): their pids are not processes of this host.
    pub fn new(
        cfg: EnforcementConfig,
        control: Option<Arc<dyn ProcessControl>>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            cfg,
            control,
            clock,
            own_pid: std::process::id(),
            open: Arc::default(),
            locks: BTreeMap::new(),
            tx,
            rx,
            tasks: JoinSet::new(),
        }
    }

    /// Judges every good reading of the slot at `at`; returns the events of new episodes and
    /// starts a termination task for each that `terminate` mode may end. Call from within the
    /// tokio runtime.
    pub fn on_slot(
        &mut self,
        at: UnixMs,
        assignments: &Assignments,
        readings: &[(CardReading, Vec<Option<Identity>>)],
    ) -> Vec<Vec<u8>> {
        let mut bodies = Vec::new();
        let mut jobs = Vec::new();
        let mut open = lock_open(&self.open);
        for (reading, ids) in readings {
            let CardReading::Ok(sample) = reading else {
                continue;
            };
            let (status, card) = assignments.judge(&sample.uuid, at);
            let spec = card.and_then(|c| c.principal.parse::<PrincipalSpec>().ok());
            let mut now = BTreeMap::new();
            let mut seen = BTreeMap::new();
            for (p, id) in sample.processes.iter().zip(ids) {
                if !is_violation(status, spec.as_ref(), id.as_ref()) {
                    continue;
                }
                let stamp = match (&self.control, id) {
                    // The attributor read the process's stat with this slot's reading.
                    (Some(c), Some(id)) => seen_stamp(id).or_else(|| c.stamp(p.pid)),
                    _ => None,
                };
                if self.control.is_some() && id.is_some() && stamp.is_none_or(|s| s.exited) {
                    // Exited since the reading (or being reaped): it holds nothing any more,
                    // and a dying pid must not open a fresh episode on every sample.
                    continue;
                }
                let principal = id
                    .as_ref()
                    .map_or_else(|| "unknown".into(), Identity::label);
                now.insert(
                    p.pid,
                    Episode {
                        status,
                        grant_id: card.map(|c| c.grant_id.clone()).unwrap_or_default(),
                        principal,
                        uid: id.as_ref().and_then(|i| i.id.uid),
                        start_ticks: stamp.map(|s| s.start_ticks),
                        judged: assignments.known(),
                    },
                );
                seen.insert(p.pid, (id, stamp));
            }
            let card_open = open.entry(sample.uuid.clone()).or_default();
            for pid in track(card_open, now) {
                let (id, stamp) = seen[&pid];
                let ep = &card_open[&pid];
                let template = v1::Enforcement {
                    pid,
                    principal: ep.principal.clone(),
                    // The wire names a grant only while it is valid.
                    grant_id: if status == Status::Assigned {
                        ep.grant_id.clone()
                    } else {
                        String::new()
                    },
                    assignment_status: status_to_wire(status) as i32,
                    mode: mode_to_wire(self.cfg.mode) as i32,
                    action: "none".into(),
                    result: String::new(),
                };
                let detail = why(status, card, &ep.principal);
                let live = self.control.is_some();
                // Until the agent holds an assignment set (from the collector or its cache),
                // every card only looks unassigned: the violation is recorded, nobody's
                // process is ended on that.
                let p = if !assignments.known() && self.cfg.mode == EnforcementMode::Terminate {
                    Plan::Skip("no assignment set from the collector yet")
                } else {
                    plan(self.cfg.mode, live, pid, self.own_pid, id.as_ref(), stamp)
                };
                let result = match p {
                    Plan::Record | Plan::Terminate(_) => "recorded".to_string(),
                    Plan::Skip(reason) => format!("skipped: {reason}"),
                };
                info!(gpu = %sample.uuid, pid, principal = %ep.principal, ?status, %result, "enforcement: violation");
                bodies.push(event_body(
                    self.clock.now_ms(),
                    enforcement_event(&sample.uuid, at, &template, "none", result, &detail),
                ));
                if let Plan::Terminate(expect) = p {
                    jobs.push(Termination {
                        uuid: sample.uuid.clone(),
                        pid,
                        episode: ep.clone(),
                        expect,
                        grace_ms: i64::try_from(self.cfg.grace_ms).unwrap_or(i64::MAX),
                        template,
                        detail,
                    });
                }
            }
        }
        drop(open);
        for job in jobs {
            // A plan to terminate needs a live process, hence a control.
            let Some(control) = &self.control else {
                continue;
            };
            let ctx = TaskCtx {
                open: Arc::clone(&self.open),
                control: Arc::clone(control),
                clock: Arc::clone(&self.clock),
                tx: self.tx.clone(),
            };
            self.tasks.spawn(terminate(job, ctx));
        }
        bodies
    }

    /// Outcomes the termination tasks reported since the last call.
    pub fn drain(&mut self) -> Vec<Vec<u8>> {
        while let Some(r) = self.tasks.try_join_next() {
            if let Err(e) = r {
                warn!(error = %e, "an enforcement task failed");
            }
        }
        let mut out = Vec::new();
        while let Ok(b) = self.rx.try_recv() {
            out.push(b);
        }
        out
    }

    /// Terminations still waiting for their outcome.
    pub fn in_flight(&self) -> usize {
        self.tasks.len()
    }

    /// The lock changes wanted at `at` (empty unless `lock_unassigned` is on): prohibited on
    /// cards without a valid assignment, allowed on the others. Every card is set once at
    /// start, since the agent cannot know what a previous run left behind.
    pub fn lock_changes(
        &self,
        cards: &[String],
        assignments: &Assignments,
        at: UnixMs,
    ) -> Vec<LockChange> {
        // Before any assignment set (no cache, no Welcome yet) nothing is known to be
        // unassigned: no card is locked on ignorance.
        if !self.cfg.lock_unassigned || !assignments.known() {
            return Vec::new();
        }
        cards
            .iter()
            .filter_map(|uuid| {
                let (status, card) = assignments.judge(uuid, at);
                let prohibit = status != Status::Assigned;
                (self.locks.get(uuid) != Some(&prohibit)).then(|| LockChange {
                    uuid: uuid.clone(),
                    prohibit,
                    status,
                    grant_id: card
                        .filter(|_| status == Status::Assigned)
                        .map(|c| c.grant_id.clone())
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Records applied lock changes. A failed change is recorded and not retried until the
    /// wanted state changes again, so a card that cannot be locked does not flood the ledger.
    pub fn locks_applied(&mut self, results: Vec<LockResult>) -> Vec<Vec<u8>> {
        let now = self.clock.now_ms();
        results
            .into_iter()
            .map(|r| {
                let c = r.change;
                self.locks.insert(c.uuid.clone(), c.prohibit);
                let result = match &r.result {
                    Ok(()) => "applied".to_string(),
                    Err(e) => {
                        warn!(gpu = %c.uuid, prohibit = c.prohibit, error = %e, "cannot set the compute mode");
                        format!("failed: {e}")
                    }
                };
                let template = v1::Enforcement {
                    pid: 0,
                    principal: String::new(),
                    grant_id: c.grant_id,
                    assignment_status: status_to_wire(c.status) as i32,
                    mode: mode_to_wire(self.cfg.mode) as i32,
                    action: String::new(),
                    result: String::new(),
                };
                let (action, detail) = if c.prohibit {
                    ("lock_compute_mode", "card has no valid assignment: compute prohibited")
                } else {
                    ("unlock_compute_mode", "card is assigned: compute mode default")
                };
                event_body(
                    now,
                    enforcement_event(&c.uuid, now, &template, action, result, detail),
                )
            })
            .collect()
    }
}

fn enforcement_event(
    uuid: &str,
    at: UnixMs,
    template: &v1::Enforcement,
    action: &str,
    result: String,
    detail: &str,
) -> v1::Event {
    v1::Event {
        kind: v1::EventKind::Enforcement as i32,
        gpu_uuid: uuid.to_string(),
        at_unix_ms: at,
        code: 0,
        detail: detail.to_string(),
        enforcement: Some(v1::Enforcement {
            action: action.to_string(),
            result,
            ..template.clone()
        }),
    }
}

/// One process to end.
struct Termination {
    uuid: String,
    pid: u32,
    episode: Episode,
    expect: ProcStamp,
    grace_ms: i64,
    template: v1::Enforcement,
    detail: String,
}

struct TaskCtx {
    open: Arc<Mutex<OpenEpisodes>>,
    control: Arc<dyn ProcessControl>,
    clock: Arc<dyn Clock>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
}

impl TaskCtx {
    fn report(&self, job: &Termination, action: &str, result: String) {
        info!(gpu = %job.uuid, pid = job.pid, action, %result, "enforcement");
        let now = self.clock.now_ms();
        let ev = enforcement_event(&job.uuid, now, &job.template, action, result, &job.detail);
        // The receiver lives as long as the enforcer; after it is gone nobody records anything.
        let _ = self.tx.send(event_body(now, ev));
    }

    /// The pid is still this open violation on this card in the latest good reading.
    fn still_open(&self, job: &Termination) -> bool {
        lock_open(&self.open)
            .get(&job.uuid)
            .and_then(|c| c.get(&job.pid))
            .is_some_and(|ep| *ep == job.episode)
    }

    fn gone(&self, job: &Termination) -> bool {
        // Procfs reads are in-memory and short; they do not need a blocking thread.
        self.control
            .stamp(job.pid)
            .is_none_or(|s| s.exited || !s.same_process(&job.expect))
    }

    /// Polls until the process is gone (`true`) or the clock passes `deadline`.
    async fn wait_gone(&self, job: &Termination, deadline: UnixMs) -> bool {
        loop {
            if self.gone(job) {
                return true;
            }
            let now = self.clock.now_ms();
            if now >= deadline {
                return false;
            }
            self.clock.sleep_until((now + POLL_MS).min(deadline)).await;
        }
    }
}

async fn terminate(job: Termination, ctx: TaskCtx) {
    const NOT_OPEN: &str = "skipped: no longer a violation on the card";
    if !ctx.still_open(&job) {
        ctx.report(&job, "sigterm", NOT_OPEN.into());
        return;
    }
    match ctx.control.signal(job.pid, &job.expect, Sig::Term) {
        Ok(()) => ctx.report(&job, "sigterm", "sent".into()),
        Err(EnforceError::Gone { .. } | EnforceError::Replaced { .. }) => {
            ctx.report(&job, "sigterm", "skipped: process already gone".into());
            return;
        }
        Err(e) => {
            ctx.report(&job, "sigterm", format!("failed: {e}"));
            return;
        }
    }
    let deadline = ctx.clock.now_ms().saturating_add(job.grace_ms);
    if ctx.wait_gone(&job, deadline).await {
        ctx.report(&job, "sigterm", "exited".into());
        return;
    }
    if !ctx.still_open(&job) {
        ctx.report(&job, "sigkill", NOT_OPEN.into());
        return;
    }
    match ctx.control.signal(job.pid, &job.expect, Sig::Kill) {
        Ok(()) => {}
        Err(EnforceError::Gone { .. } | EnforceError::Replaced { .. }) => {
            ctx.report(&job, "sigterm", "exited".into());
            return;
        }
        Err(e) => {
            ctx.report(&job, "sigkill", format!("failed: {e}"));
            return;
        }
    }
    let deadline = ctx.clock.now_ms().saturating_add(KILL_CONFIRM_MS);
    if ctx.wait_gone(&job, deadline).await {
        ctx.report(&job, "sigkill", "killed".into());
    } else {
        ctx.report(
            &job,
            "sigkill",
            format!("failed: still alive {KILL_CONFIRM_MS} ms after sigkill"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::ProcessIdentity;
    use crate::clock::ScaledClock;
    use crate::gpu::{CardSample, GpuError, GpuEvent, GpuProcess, Inventory};
    use prost::Message;

    const CARD: &str = "GPU-1";
    const OTHER: &str = "GPU-2";

    fn ident(uid: u32, user: &str) -> Identity {
        Identity::from_parts(ProcessIdentity {
            uid: Some(uid),
            user: Some(user.into()),
            ..Default::default()
        })
    }

    fn assignments(valid_until_ms: UnixMs) -> Assignments {
        let mut a = Assignments {
            version: 1,
            ..Default::default()
        };
        a.cards.insert(
            CARD.into(),
            CardAssignment {
                gpu_uuid: CARD.into(),
                grant_id: "G1".into(),
                program: "hpc".into(),
                principal: "user:alice".into(),
                valid_from_ms: 0,
                valid_until_ms,
                revoked_at_ms: None,
            },
        );
        a
    }

    fn reading(
        uuid: &str,
        procs: &[(u32, Option<Identity>)],
    ) -> (CardReading, Vec<Option<Identity>>) {
        (
            CardReading::Ok(CardSample {
                uuid: uuid.into(),
                processes: procs
                    .iter()
                    .map(|(pid, _)| GpuProcess {
                        pid: *pid,
                        used_memory_bytes: None,
                        sm_util_pct: None,
                        graphics: false,
                        accounting: None,
                        seen_in: crate::gpu::ProcessSources {
                            list: true,
                            ..Default::default()
                        },
                    })
                    .collect(),
                ..Default::default()
            }),
            procs.iter().map(|(_, id)| id.clone()).collect(),
        )
    }

    /// Processes in a table; a signal is recorded, and kills the process when it `obeys`.
    #[derive(Default)]
    struct Fake {
        procs: Mutex<BTreeMap<u32, (ProcStamp, bool)>>,
        sent: Mutex<Vec<(u32, Sig)>>,
    }

    impl Fake {
        fn add(&self, pid: u32, uid: u32, obeys_term: bool) {
            let s = ProcStamp {
                uid: Some(uid),
                start_ticks: u64::from(pid) * 10,
                exited: false,
            };
            self.procs.lock().unwrap().insert(pid, (s, obeys_term));
        }
        fn sent(&self) -> Vec<(u32, Sig)> {
            self.sent.lock().unwrap().clone()
        }
    }

    impl ProcessControl for Fake {
        fn stamp(&self, pid: u32) -> Option<ProcStamp> {
            self.procs.lock().unwrap().get(&pid).map(|p| p.0)
        }
        fn signal(&self, pid: u32, expect: &ProcStamp, sig: Sig) -> Result<(), EnforceError> {
            let mut procs = self.procs.lock().unwrap();
            let Some((s, obeys)) = procs.get(&pid).copied() else {
                return Err(EnforceError::Gone { pid });
            };
            if !s.same_process(expect) {
                return Err(EnforceError::Replaced { pid });
            }
            self.sent.lock().unwrap().push((pid, sig));
            if sig == Sig::Kill || obeys {
                procs.remove(&pid);
            }
            Ok(())
        }
    }

    fn enforcer(mode: EnforcementMode, fake: &Arc<Fake>) -> Enforcer {
        let cfg = EnforcementConfig {
            mode,
            grace_ms: 3_000,
            lock_unassigned: false,
        };
        Enforcer::new(
            cfg,
            Some(fake.clone()),
            Arc::new(ScaledClock::new(1_000_000, 1.0)),
        )
    }

    fn events(bodies: &[Vec<u8>]) -> Vec<v1::Event> {
        bodies
            .iter()
            .map(
                |b| match v1::RecordBody::decode(b.as_slice()).unwrap().kind {
                    Some(v1::record_body::Kind::Event(e)) => e,
                    k => panic!("not an event: {k:?}"),
                },
            )
            .collect()
    }

    fn summary(bodies: &[Vec<u8>]) -> Vec<(u32, String, String)> {
        events(bodies)
            .into_iter()
            .map(|e| {
                let x = e.enforcement.unwrap();
                (x.pid, x.action, x.result)
            })
            .collect()
    }

    #[test]
    fn who_is_a_violator() {
        let alice = ident(1001, "alice");
        let bob = ident(1002, "bob");
        let spec: PrincipalSpec = "user:alice".parse().unwrap();
        assert!(!is_violation(Status::Assigned, Some(&spec), Some(&alice)));
        assert!(is_violation(Status::Assigned, Some(&spec), Some(&bob)));
        assert!(is_violation(Status::Assigned, Some(&spec), None));
        assert!(is_violation(Status::Assigned, None, Some(&alice)));
        for s in [Status::Unassigned, Status::Expired, Status::Revoked] {
            assert!(is_violation(s, Some(&spec), Some(&alice)), "{s:?}");
        }
    }

    #[test]
    fn what_to_do() {
        use EnforcementMode::*;
        let bob = ident(1002, "bob");
        let st = |uid, exited| {
            Some(ProcStamp {
                uid: Some(uid),
                start_ticks: 7,
                exited,
            })
        };
        assert_eq!(
            plan(Observe, true, 500, 99, Some(&bob), st(1002, false)),
            Plan::Record
        );
        assert_eq!(plan(Observe, true, 1, 99, None, None), Plan::Record);
        assert_eq!(
            plan(Observe, false, 500, 99, Some(&bob), None),
            Plan::Record
        );
        assert_eq!(
            plan(Terminate, false, 500, 99, Some(&bob), st(1002, false)),
            Plan::Skip("simulated process")
        );
        for pid in [0, 1, 99] {
            assert_eq!(
                plan(Terminate, true, pid, 99, Some(&bob), st(1002, false)),
                Plan::Skip("protected pid")
            );
        }
        assert_eq!(
            plan(Terminate, true, 500, 99, None, st(1002, false)),
            Plan::Skip("process not readable")
        );
        assert_eq!(
            plan(Terminate, true, 500, 99, Some(&bob), None),
            Plan::Skip("process gone")
        );
        assert_eq!(
            plan(Terminate, true, 500, 99, Some(&bob), st(1002, true)),
            Plan::Skip("process gone")
        );
        assert_eq!(
            plan(Terminate, true, 500, 99, Some(&bob), st(0, false)),
            Plan::Skip("process changed between reads")
        );
        assert_eq!(
            plan(Terminate, true, 500, 99, Some(&bob), st(1002, false)),
            Plan::Terminate(st(1002, false).unwrap())
        );
    }

    #[test]
    fn episodes_open_and_close() {
        let ep = |status, principal: &str| Episode {
            status,
            grant_id: "G1".into(),
            principal: principal.into(),
            uid: Some(1),
            start_ticks: Some(5),
            judged: true,
        };
        let mut open = BTreeMap::new();
        let now = |v: &[(u32, Episode)]| v.iter().cloned().collect::<BTreeMap<_, _>>();
        let bob = ep(Status::Assigned, "user:bob");
        assert_eq!(track(&mut open, now(&[(7, bob.clone())])), vec![7]);
        assert_eq!(
            track(&mut open, now(&[(7, bob.clone())])),
            Vec::<u32>::new()
        );
        // The grant expires: same pid, new episode.
        let expired = ep(Status::Expired, "user:bob");
        assert_eq!(track(&mut open, now(&[(7, expired.clone())])), vec![7]);
        // The pid is reused by another process.
        let reused = Episode {
            start_ticks: Some(6),
            ..expired.clone()
        };
        assert_eq!(track(&mut open, now(&[(7, reused.clone())])), vec![7]);
        // It leaves and comes back: a new episode.
        assert_eq!(track(&mut open, BTreeMap::new()), Vec::<u32>::new());
        assert_eq!(track(&mut open, now(&[(7, reused)])), vec![7]);
    }

    #[test]
    fn stat_fields() {
        let line = "4242 (my (odd) prog) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        assert_eq!(parse_stat(line), Some(('S', 987654)));
        let z = "77 (sleep) Z 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 12345 0 0";
        assert_eq!(parse_stat(z), Some(('Z', 12345)));
        assert_eq!(parse_stat("77 (sleep) S 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn observe_records_each_episode_once_and_signals_nothing() {
        let fake = Arc::new(Fake::default());
        fake.add(500, 1001, true);
        fake.add(600, 1002, true);
        let mut e = enforcer(EnforcementMode::Observe, &fake);
        let a = assignments(10_000);
        let slot = |pids: &[(u32, Option<Identity>)]| vec![reading(CARD, pids)];
        let alice = Some(ident(1001, "alice"));
        let bob = Some(ident(1002, "bob"));
        let first = e.on_slot(
            1_000,
            &a,
            &slot(&[(500, alice.clone()), (600, bob.clone())]),
        );
        let ev = events(&first);
        assert_eq!(ev.len(), 1, "{ev:?}");
        let x = ev[0].enforcement.clone().unwrap();
        assert_eq!(
            (
                ev[0].kind,
                ev[0].at_unix_ms,
                x.pid,
                x.principal.as_str(),
                x.grant_id.as_str()
            ),
            (
                v1::EventKind::Enforcement as i32,
                1_000,
                600,
                "user:bob",
                "G1"
            )
        );
        assert_eq!(
            (x.mode, x.action.as_str(), x.result.as_str()),
            (v1::EnforcementMode::Observe as i32, "none", "recorded")
        );
        // The same violation in later samples is the same episode.
        for t in [2_000, 3_000] {
            assert!(
                e.on_slot(t, &a, &slot(&[(500, alice.clone()), (600, bob.clone())]))
                    .is_empty()
            );
        }
        // A lost reading changes nothing.
        let lost = vec![(
            CardReading::Lost {
                uuid: CARD.into(),
                reason: "x".into(),
            },
            vec![],
        )];
        assert!(e.on_slot(4_000, &a, &lost).is_empty());
        assert!(
            e.on_slot(
                5_000,
                &a,
                &slot(&[(500, alice.clone()), (600, bob.clone())])
            )
            .is_empty()
        );
        // At expiry both become violators: one new episode each, timed at the slot.
        let expired = e.on_slot(
            10_000,
            &a,
            &slot(&[(500, alice.clone()), (600, bob.clone())]),
        );
        let ev = events(&expired);
        assert_eq!(ev.len(), 2, "{ev:?}");
        for x in &ev {
            let enf = x.enforcement.as_ref().unwrap();
            assert_eq!(enf.assignment_status, v1::AssignmentStatus::Expired as i32);
            assert_eq!(enf.grant_id, "", "no valid grant");
            assert_eq!(x.at_unix_ms, 10_000);
        }
        // Any process on an unassigned card, including unreadable ones.
        let other = e.on_slot(11_000, &a, &[reading(OTHER, &[(700, None)])]);
        assert_eq!(
            summary(&other),
            vec![(700, "none".into(), "recorded".into())]
        );
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        assert!(e.drain().is_empty());
        assert!(fake.sent().is_empty(), "observe signals nothing");
        assert_eq!(e.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn terminate_ends_violators_only() {
        let fake = Arc::new(Fake::default());
        fake.add(500, 1001, true); // alice, the grantee
        fake.add(600, 1002, true); // bob: exits on SIGTERM
        fake.add(601, 1002, false); // bob: ignores SIGTERM
        fake.add(1, 0, true); // init, shown on the card
        let mut e = enforcer(EnforcementMode::Terminate, &fake);
        let a = assignments(UnixMs::MAX);
        let procs = [
            (500, Some(ident(1001, "alice"))),
            (600, Some(ident(1002, "bob"))),
            (601, Some(ident(1002, "bob"))),
            (1, Some(ident(0, "root"))),
        ];
        let first = summary(&e.on_slot(1_000, &a, &[reading(CARD, &procs)]));
        assert_eq!(
            first,
            vec![
                (1, "none".into(), "skipped: protected pid".into()),
                (600, "none".into(), "recorded".into()),
                (601, "none".into(), "recorded".into()),
            ]
        );
        assert_eq!(e.in_flight(), 2);
        // Sampling goes on while the tasks wait out the grace period.
        let mut outcomes = Vec::new();
        for s in 1..=6 {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            assert!(
                e.on_slot(1_000 + s * 1_000, &a, &[reading(CARD, &procs)])
                    .is_empty()
            );
            outcomes.extend(e.drain());
        }
        let mut got = summary(&outcomes);
        got.sort();
        assert_eq!(
            got,
            vec![
                (600, "sigterm".into(), "exited".into()),
                (600, "sigterm".into(), "sent".into()),
                (601, "sigkill".into(), "killed".into()),
                (601, "sigterm".into(), "sent".into()),
            ]
        );
        let sent = fake.sent();
        assert_eq!(
            sent,
            vec![(600, Sig::Term), (601, Sig::Term), (601, Sig::Kill)]
        );
        let kill_at = events(&outcomes)
            .iter()
            .find(|x| x.enforcement.as_ref().unwrap().action == "sigkill")
            .unwrap()
            .at_unix_ms;
        let term_at = events(&outcomes)
            .iter()
            .find(|x| x.enforcement.as_ref().unwrap().pid == 601)
            .unwrap()
            .at_unix_ms;
        assert!(
            kill_at - term_at >= 3_000,
            "grace waited: {term_at} → {kill_at}"
        );
        assert_eq!(e.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn no_sigkill_once_the_process_left_the_card_or_turned_legal() {
        let fake = Arc::new(Fake::default());
        fake.add(601, 1002, false);
        fake.add(602, 1002, false);
        let mut e = enforcer(EnforcementMode::Terminate, &fake);
        let a = assignments(UnixMs::MAX);
        let bob = Some(ident(1002, "bob"));
        e.on_slot(
            1_000,
            &a,
            &[
                reading(CARD, &[(601, bob.clone())]),
                reading(OTHER, &[(602, bob.clone())]),
            ],
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        // 601 leaves its card; OTHER gets a grant naming bob.
        let mut b = a.clone();
        b.cards.insert(
            OTHER.into(),
            CardAssignment {
                gpu_uuid: OTHER.into(),
                principal: "user:bob".into(),
                grant_id: "G2".into(),
                ..a.cards[CARD].clone()
            },
        );
        e.on_slot(
            2_000,
            &b,
            &[reading(CARD, &[]), reading(OTHER, &[(602, bob.clone())])],
        );
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        let mut got = summary(&e.drain());
        got.sort();
        assert_eq!(
            got,
            vec![
                (
                    601,
                    "sigkill".into(),
                    "skipped: no longer a violation on the card".into()
                ),
                (601, "sigterm".into(), "sent".into()),
                (
                    602,
                    "sigkill".into(),
                    "skipped: no longer a violation on the card".into()
                ),
                (602, "sigterm".into(), "sent".into()),
            ]
        );
        assert_eq!(fake.sent(), vec![(601, Sig::Term), (602, Sig::Term)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_pid_is_not_signalled() {
        let fake = Arc::new(Fake::default());
        fake.add(600, 1002, true);
        let mut e = enforcer(EnforcementMode::Terminate, &fake);
        let a = assignments(UnixMs::MAX);
        let bob = Some(ident(1002, "bob"));
        // Between the reading and the signal the process exits and its pid goes to another.
        fake.procs
            .lock()
            .unwrap()
            .get_mut(&600)
            .unwrap()
            .0
            .start_ticks = 1;
        let bodies = e.on_slot(1_000, &a, &[reading(CARD, &[(600, bob)])]);
        fake.procs
            .lock()
            .unwrap()
            .get_mut(&600)
            .unwrap()
            .0
            .start_ticks = 2;
        assert_eq!(
            summary(&bodies),
            vec![(600, "none".into(), "recorded".into())]
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert_eq!(
            summary(&e.drain()),
            vec![(
                600,
                "sigterm".into(),
                "skipped: process already gone".into()
            )]
        );
        assert!(fake.sent().is_empty());
    }

    #[test]
    fn real_processes_are_signalled_only_when_they_are_who_we_think() {
        let ctl = ProcControl::default();
        let own = ctl.stamp(std::process::id()).unwrap();
        assert_eq!(
            ctl.signal(std::process::id(), &own, Sig::Term)
                .unwrap_err()
                .to_string(),
            format!(
                "pid {} is protected (pid 0, init or the agent itself)",
                std::process::id()
            )
        );
        assert!(matches!(
            ctl.signal(1, &own, Sig::Term),
            Err(EnforceError::Protected { pid: 1 })
        ));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let s = ctl.stamp(pid).unwrap();
        assert!(!s.exited);
        let wrong = ProcStamp {
            start_ticks: s.start_ticks + 1,
            ..s
        };
        assert!(matches!(
            ctl.signal(pid, &wrong, Sig::Term),
            Err(EnforceError::Replaced { .. })
        ));
        assert_eq!(
            child.try_wait().unwrap(),
            None,
            "a mismatched stamp sends nothing"
        );
        ctl.signal(pid, &s, Sig::Term).unwrap();
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(15));
        assert_eq!(ctl.stamp(pid), None, "reaped");
        assert!(matches!(
            ctl.signal(pid, &s, Sig::Kill),
            Err(EnforceError::Gone { .. })
        ));
    }

    /// A source that only records lock calls; the second card refuses.
    #[derive(Default)]
    struct LockSource {
        calls: Vec<(String, bool)>,
    }

    impl GpuSource for LockSource {
        fn inventory(&mut self) -> Result<Inventory, GpuError> {
            Ok(Inventory::default())
        }
        fn read(&mut self, _at: i64) -> Vec<CardReading> {
            Vec::new()
        }
        fn drain_events(&mut self) -> Vec<GpuEvent> {
            Vec::new()
        }
        fn set_compute_prohibited(&mut self, uuid: &str, prohibited: bool) -> Result<(), GpuError> {
            self.calls.push((uuid.into(), prohibited));
            if uuid == OTHER {
                return Err(GpuError::Call {
                    call: "set_compute_mode",
                    reason: "no permission".into(),
                });
            }
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_ended_or_locked_before_the_first_assignment_set() {
        let fake = Arc::new(Fake::default());
        fake.add(600, 1002, true);
        let mut e = enforcer(EnforcementMode::Terminate, &fake);
        e.cfg.lock_unassigned = true;
        let cards = vec![CARD.to_string()];
        // A fresh agent: no cache, no Welcome yet. Every card only looks unassigned.
        let none = Assignments::default();
        assert!(!none.known());
        assert!(e.lock_changes(&cards, &none, 1_000).is_empty());
        let procs = [(600, Some(ident(1002, "bob")))];
        let first = summary(&e.on_slot(1_000, &none, &[reading(CARD, &procs)]));
        assert_eq!(
            first,
            vec![(
                600,
                "none".into(),
                "skipped: no assignment set from the collector yet".into()
            )]
        );
        assert_eq!(e.in_flight(), 0);
        // The collector's first set (version 1) says the card is unassigned: now it is a
        // violation terminate mode ends, and the card is locked.
        let empty = Assignments {
            version: 1,
            ..Default::default()
        };
        assert_eq!(e.lock_changes(&cards, &empty, 2_000).len(), 1);
        let next = summary(&e.on_slot(2_000, &empty, &[reading(CARD, &procs)]));
        assert_eq!(next, vec![(600, "none".into(), "recorded".into())]);
        assert_eq!(e.in_flight(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn unassigned_cards_are_locked_and_unlocked_on_assignment() {
        let fake = Arc::new(Fake::default());
        let mut e = enforcer(EnforcementMode::Observe, &fake);
        let cards = vec![CARD.to_string(), OTHER.to_string()];
        let a = assignments(10_000);
        assert!(
            e.lock_changes(&cards, &a, 1_000).is_empty(),
            "off by default"
        );
        e.cfg.lock_unassigned = true;
        let mut src = LockSource::default();
        let first = e.lock_changes(&cards, &a, 1_000);
        let bodies = e.locks_applied(apply_locks(&mut src, first));
        assert_eq!(src.calls, vec![(CARD.into(), false), (OTHER.into(), true)]);
        let ev = events(&bodies);
        let got: Vec<_> = ev
            .iter()
            .map(|x| {
                let enf = x.enforcement.clone().unwrap();
                (x.gpu_uuid.clone(), enf.action, enf.result, enf.grant_id)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    CARD.into(),
                    "unlock_compute_mode".into(),
                    "applied".into(),
                    "G1".into()
                ),
                (
                    OTHER.into(),
                    "lock_compute_mode".into(),
                    "failed: NVML call set_compute_mode failed: no permission".into(),
                    String::new()
                ),
            ]
        );
        // Nothing changes, nothing to do (a failure is not retried every slot).
        assert!(e.lock_changes(&cards, &a, 2_000).is_empty());
        // The grant expires: lock the card.
        let c = e.lock_changes(&cards, &a, 10_000);
        assert_eq!(
            c,
            vec![LockChange {
                uuid: CARD.into(),
                prohibit: true,
                status: Status::Expired,
                grant_id: String::new()
            }]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn simulated_processes_are_recorded_and_never_touched() {
        let cfg = EnforcementConfig {
            mode: EnforcementMode::Terminate,
            grace_ms: 1_000,
            lock_unassigned: false,
        };
        let mut e = Enforcer::new(cfg, None, Arc::new(ScaledClock::new(0, 1.0)));
        let a = assignments(UnixMs::MAX);
        // pid 4242 need not exist here: nothing looks it up in /proc.
        let bob = Some(ident(1002, "bob"));
        let first = e.on_slot(1_000, &a, &[reading(CARD, &[(4242, bob.clone())])]);
        assert_eq!(
            summary(&first),
            vec![(4242, "none".into(), "skipped: simulated process".into())]
        );
        assert!(
            e.on_slot(2_000, &a, &[reading(CARD, &[(4242, bob)])])
                .is_empty()
        );
        assert_eq!(e.in_flight(), 0);
    }

    #[test]
    fn assignment_change_names_the_cards() {
        let before = assignments(10_000);
        let mut after = before.clone();
        after.version = 2;
        after.cards.get_mut(CARD).unwrap().valid_until_ms = 20_000;
        let e = assignment_changed(&before, &after, 5);
        assert_eq!(e.kind, v1::EventKind::AssignmentChanged as i32);
        assert_eq!((e.code, e.at_unix_ms), (2, 5));
        assert_eq!(
            e.detail,
            "assignment version 2 (was 1): 1 cards; changed: GPU-1"
        );
        let none = assignment_changed(&Assignments::default(), &Assignments::default(), 0);
        assert!(none.detail.ends_with("changed: none"), "{}", none.detail);
    }
}
