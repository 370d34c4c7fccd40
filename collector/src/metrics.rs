//! The collector's Prometheus metrics, served by gpumeter-telemetry's endpoint (`/metrics`,
//! `/healthz`, `/readyz`): ingest (records and commits, failed commits, the commit-latency
//! histogram, live sessions), each agent's last-seen age and durable seq, alarms by kind,
//! violation episodes by the action taken (`crate::episodes`), the database's size and build
//! info. Read at scrape time from the writer's counters and the
//! store; a store that cannot answer leaves its series out of that scrape and counts a
//! `gpumeter_collector_scrape_errors_total`.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use gpumeter_telemetry::prometheus_client::collector::Collector;
use gpumeter_telemetry::prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use gpumeter_telemetry::prometheus_client::registry::Registry;

use crate::ingest::now_ms;
use crate::store::Store;
use crate::store::writer::WriterStats;

/// Everything the collector's scrape reads.
pub struct CollectorMetrics {
    pub collector_id: String,
    pub live: Arc<Mutex<HashSet<String>>>,
    pub writer: Arc<WriterStats>,
    pub store: Arc<dyn Store>,
    scrape_errors: AtomicU64,
}

impl std::fmt::Debug for CollectorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectorMetrics")
            .field("collector_id", &self.collector_id)
            .finish()
    }
}

impl CollectorMetrics {
    pub fn new(
        collector_id: String,
        live: Arc<Mutex<HashSet<String>>>,
        writer: Arc<WriterStats>,
        store: Arc<dyn Store>,
    ) -> Self {
        Self {
            collector_id,
            live,
            writer,
            store,
            scrape_errors: AtomicU64::new(0),
        }
    }
}

/// A registry holding the collector's metrics.
pub fn registry(m: CollectorMetrics) -> Registry {
    let mut r = Registry::default();
    r.register(
        "gpumeter_collector_commit_latency_seconds",
        "Seconds from a verified batch's hand-over to the writer until its transaction committed (or failed).",
        HistogramHandle(m.writer.clone()),
    );
    r.register_collector(Box::new(m));
    r
}

/// The writer's histogram, registered by reference.
#[derive(Debug)]
struct HistogramHandle(Arc<WriterStats>);

impl EncodeMetric for HistogramHandle {
    fn encode(
        &self,
        encoder: gpumeter_telemetry::prometheus_client::encoding::MetricEncoder,
    ) -> std::fmt::Result {
        self.0.commit_latency.encode(encoder)
    }
    fn metric_type(&self) -> gpumeter_telemetry::prometheus_client::metrics::MetricType {
        self.0.commit_latency.metric_type()
    }
}

type Series = Vec<gpumeter_telemetry::series::Series>;

fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    counter: bool,
    series: &Series,
) -> std::fmt::Result {
    if counter {
        gpumeter_telemetry::series::counter(enc, name, help, series)
    } else {
        gpumeter_telemetry::series::gauge(enc, name, help, series)
    }
}

impl Collector for CollectorMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let id = vec![("collector_id", self.collector_id.clone())];
        let one = |v: f64| vec![(id.clone(), v)];
        let sessions = self.live.lock().map(|l| l.len()).unwrap_or(0);
        family(
            &mut enc,
            "gpumeter_collector_live_sessions",
            "Agents with an open session.",
            false,
            &one(sessions as f64),
        )?;
        family(
            &mut enc,
            "gpumeter_collector_commits",
            "Ingest transactions committed.",
            true,
            &one(self.writer.commits.load(Relaxed) as f64),
        )?;
        family(
            &mut enc,
            "gpumeter_collector_records_committed",
            "Records committed (duplicates included).",
            true,
            &one(self.writer.records.load(Relaxed) as f64),
        )?;
        family(
            &mut enc,
            "gpumeter_collector_failed_commits",
            "Ingest transactions that failed (nothing of them acknowledged).",
            true,
            &one(self.writer.failed_commits.load(Relaxed) as f64),
        )?;
        let now = now_ms();
        match self.store.hosts() {
            Ok(hosts) => {
                let mut seen = Series::new();
                let mut durable = Series::new();
                for h in hosts {
                    let l = vec![
                        ("agent_id", h.agent_id.clone()),
                        ("host_id", h.host_id.clone()),
                        ("csp", h.csp.clone()),
                    ];
                    let last = h
                        .last_record_ms
                        .map_or(h.last_seen_ms, |r| r.max(h.last_seen_ms));
                    seen.push((l.clone(), ((now - last).max(0) as f64) / 1000.0));
                    durable.push((l, h.durable_seq as f64));
                }
                family(
                    &mut enc,
                    "gpumeter_collector_agent_last_seen_age_seconds",
                    "Time since each agent last said Hello or sent records.",
                    false,
                    &seen,
                )?;
                family(
                    &mut enc,
                    "gpumeter_collector_agent_durable_seq",
                    "Highest seq held durably for each agent.",
                    false,
                    &durable,
                )?;
            }
            Err(_) => {
                self.scrape_errors.fetch_add(1, Relaxed);
            }
        }
        match self.store.alarms(None) {
            Ok(alarms) => {
                let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
                for a in alarms {
                    *by_kind.entry(a.kind).or_default() += 1;
                }
                let series: Series = by_kind
                    .into_iter()
                    .map(|(k, n)| {
                        (
                            vec![("collector_id", self.collector_id.clone()), ("kind", k)],
                            n as f64,
                        )
                    })
                    .collect();
                family(
                    &mut enc,
                    "gpumeter_collector_alarms",
                    "Alarms stored, by kind.",
                    true,
                    &series,
                )?;
            }
            Err(_) => {
                self.scrape_errors.fetch_add(1, Relaxed);
            }
        }
        // Violations are rare (one event per episode and a few per termination), so reading
        // them at each scrape is cheap next to the alarms above.
        match self
            .store
            .events(i64::MIN, i64::MAX, Some("enforcement"), None)
        {
            Ok(events) => {
                let mut by_action: BTreeMap<String, u64> = BTreeMap::new();
                for e in crate::episodes::episodes(&events) {
                    *by_action.entry(e.action().to_string()).or_default() += 1;
                }
                let series: Series = by_action
                    .into_iter()
                    .map(|(a, n)| {
                        (
                            vec![("collector_id", self.collector_id.clone()), ("action", a)],
                            n as f64,
                        )
                    })
                    .collect();
                // A gauge, not a counter: an episode moves from `none` to `sigterm` (say)
                // when its follow-up arrives.
                family(
                    &mut enc,
                    "gpumeter_collector_violation_episodes",
                    "Violation episodes in the ledger, by the action taken so far (none: recorded only).",
                    false,
                    &series,
                )?;
            }
            Err(_) => {
                self.scrape_errors.fetch_add(1, Relaxed);
            }
        }
        if let Some(size) = self.store.size_bytes() {
            family(
                &mut enc,
                "gpumeter_collector_database_bytes",
                "Size of the ledger database on disk.",
                false,
                &one(size as f64),
            )?;
        }
        family(
            &mut enc,
            "gpumeter_collector_scrape_errors",
            "Scrapes in which the store could not answer (those series were left out).",
            true,
            &one(self.scrape_errors.load(Relaxed) as f64),
        )?;
        family(
            &mut enc,
            "gpumeter_collector_build_info",
            "The collector's version, as a label; always 1.",
            false,
            &vec![(
                vec![
                    ("collector_id", self.collector_id.clone()),
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                ],
                1.0,
            )],
        )?;
        Ok(())
    }
}
