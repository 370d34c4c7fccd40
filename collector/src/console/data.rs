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

/// A hub frame as the pages' script reads it.
pub fn live_json(frame: &Frame) -> Value {
    match frame {
        Frame::Snapshot(v) => json!({
            "snapshot": true,
            "version": v.version,
            "cards": v.cards.iter().map(card_json).collect::<Vec<_>>(),
            "grants": v.grants.iter().map(grant_json).collect::<Vec<_>>(),
        }),
        Frame::Update(u) => json!({
            "snapshot": false,
            "version": u.version,
            "cards": u.cards.iter().map(card_json).collect::<Vec<_>>(),
            "grants": u.grants.iter().map(grant_json).collect::<Vec<_>>(),
            "removed_cards": u.removed_cards,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
