//! Wiring: config → built agent (binds nothing, opens its files) → run until shutdown.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use gpumeter_proto::v1;
use gpumeter_telemetry::http::Readiness;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::assignments::Assignments;
use crate::attribution::{Attributor, ProcAttributor};
use crate::clock::{Clock, ScaledClock, SystemClock, UnixMs, align_down};
use crate::config::{AgentConfig, SourceConfig};
use crate::enforce::{Enforcer, ProcControl, ProcessControl};
use crate::gpu::sim::{Scenario, SimSource};
use crate::gpu::{GpuSource, Inventory};
use crate::ledger::Ledger;
use crate::record::event_body;
use crate::sampler::{Reader, SamplerSettings, run_sampler};
use crate::spool::{Spool, SpoolConfig};
use crate::uplink::{Uplink, UplinkStatus};
use crate::window::Periods;

/// The GPU source, attributor and clock a config asks for.
pub struct Parts {
    pub source: Box<dyn GpuSource>,
    pub attributor: Box<dyn Attributor>,
    pub clock: Arc<dyn Clock>,
}

/// Opens the configured source. For a simulation, scenario time 0 is the start of the current
/// window.
pub fn open_parts(cfg: &AgentConfig) -> anyhow::Result<Parts> {
    Ok(match &cfg.source {
        SourceConfig::Nvml => Parts {
            source: Box::new(crate::gpu::nvml::NvmlSource::open(None)?),
            attributor: Box::new(ProcAttributor::new(&cfg.attribution.proc_root)),
            clock: Arc::new(SystemClock),
        },
        SourceConfig::NvmlLib { path } => Parts {
            source: Box::new(crate::gpu::nvml::NvmlSource::open(Some(path))?),
            attributor: Box::new(ProcAttributor::new(&cfg.attribution.proc_root)),
            clock: Arc::new(SystemClock),
        },
        SourceConfig::Sim { scenario, speed } => {
            let sc = Scenario::load(scenario)?;
            let now = SystemClock.now_ms();
            let clock: Arc<dyn Clock> = if (*speed - 1.0).abs() < f64::EPSILON {
                Arc::new(SystemClock)
            } else {
                Arc::new(ScaledClock::new(now, *speed))
            };
            let t0 = align_down(now, cfg.sampling.window_ms);
            Parts {
                attributor: Box::new(sc.attributor()),
                source: Box::new(SimSource::new(sc, t0)),
                clock,
            }
        }
    })
}

/// How long to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop sampling after the slot at this instant.
    pub stop_at: Option<UnixMs>,
    /// First slot for a simulated source (see [`SamplerSettings::start_at`]).
    pub start_at: Option<UnixMs>,
    /// After sampling stops, keep the uplink running until every record is acknowledged.
    pub drain: bool,
    /// Before sampling, wait up to this long for the collector's first assignment set. For
    /// simulations, whose clock runs ahead of the network; a real agent meters at once.
    pub await_assignments: Option<std::time::Duration>,
}

/// A built agent, ready to run.
pub struct Agent {
    cfg: AgentConfig,
    parts: Parts,
    inventory: Inventory,
    ledger: Ledger,
    key: ed25519_dalek::SigningKey,
    assignments: watch::Sender<Arc<Assignments>>,
    status: watch::Sender<UplinkStatus>,
}

impl Agent {
    /// Opens the state directory (key, spool, assignment cache) and reads the inventory.
    pub fn build(cfg: AgentConfig, mut parts: Parts) -> anyhow::Result<Agent> {
        let state = &cfg.state_dir;
        std::fs::create_dir_all(state)
            .with_context(|| format!("creating state_dir {}", state.display()))?;
        let key = crate::keys::load_or_create(&state.join("agent.key"))?;
        let (spool, recovery) = Spool::open(SpoolConfig {
            dir: state.join("spool"),
            max_bytes: cfg.spool.max_bytes,
            segment_bytes: cfg.spool.segment_bytes,
        })?;
        if recovery.corrupt_records > 0 || recovery.torn_tail_bytes > 0 {
            warn!(?recovery, "spool recovered with damage");
        }
        let cache = state.join("assignments.json");
        let cached = match Assignments::load(&cache) {
            Ok(a) => a.unwrap_or_default(),
            Err(e) => {
                warn!(error = %e, "ignoring the assignment cache");
                Assignments::default()
            }
        };
        let inventory = parts.source.inventory()?;
        info!(
            cards = inventory.cards.len(),
            pending = spool.pending(),
            assignments = cached.cards.len(),
            "agent built"
        );
        Ok(Agent {
            ledger: Ledger::new(spool),
            key,
            inventory,
            parts,
            assignments: watch::Sender::new(Arc::new(cached)),
            status: watch::Sender::new(UplinkStatus::default()),
            cfg,
        })
    }

    pub fn status(&self) -> watch::Receiver<UplinkStatus> {
        self.status.subscribe()
    }

    pub fn ledger(&self) -> Ledger {
        self.ledger.clone()
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    fn hello(&self) -> v1::Hello {
        v1::Hello {
            protocol_version: gpumeter_proto::PROTOCOL_VERSION,
            agent_id: self.cfg.agent_id.clone(),
            host_id: self.cfg.host_id.clone(),
            csp: self.cfg.csp.clone(),
            hostname: hostname(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            public_key: self.key.verifying_key().to_bytes().to_vec(),
            driver_version: self.inventory.driver_version.clone().unwrap_or_default(),
            gpus: self
                .inventory
                .cards
                .iter()
                .map(|c| v1::GpuInfo {
                    uuid: c.uuid.clone(),
                    index: c.index,
                    name: c.name.clone(),
                    serial: c.serial.clone().unwrap_or_default(),
                    pci_bus_id: c.pci_bus_id.clone().unwrap_or_default(),
                    memory_total_bytes: c.memory_total_bytes,
                    mig_mode: match c.mig_enabled {
                        Some(true) => "enabled".into(),
                        Some(false) => "disabled".into(),
                        None => String::new(),
                    },
                    parent_uuid: c
                        .mig
                        .as_ref()
                        .map(|m| m.parent_uuid.clone())
                        .unwrap_or_default(),
                    mig_profile: c
                        .mig
                        .as_ref()
                        .map(|m| m.profile.clone())
                        .unwrap_or_default(),
                    mig_slices: c.mig.as_ref().and_then(|m| m.slices),
                    parent_slices: c.mig.as_ref().and_then(|m| m.parent_slices),
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Runs until `shutdown` turns true (or per `opts`).
    pub async fn run(
        self,
        opts: RunOptions,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let clock = self.parts.clock.clone();
        let started = event_body(
            clock.now_ms(),
            v1::Event {
                kind: v1::EventKind::AgentStarted as i32,
                at_unix_ms: clock.now_ms(),
                detail: format!("gpumeter-agent {}", env!("CARGO_PKG_VERSION")),
                ..Default::default()
            },
        );
        self.ledger.append(&[started])?;
        let hello = self.hello();
        let (stop_uplink_tx, stop_uplink) = watch::channel(false);
        let uplink = Uplink {
            cfg: self.cfg.collector.clone(),
            hello,
            key: self.key,
            ledger: self.ledger.clone(),
            clock: clock.clone(),
            assignments: self.assignments.clone(),
            assignment_cache: self.cfg.state_dir.join("assignments.json"),
            max_in_flight: 8 * u64::from(self.cfg.collector.max_batch_records),
        };
        let status_tx = self.status.clone();
        let uplink_task = tokio::spawn(uplink.run(stop_uplink.clone(), status_tx));
        let (pods, kubelet) = match &self.cfg.attribution.kubelet_pod_resources_socket {
            Some(socket) => {
                let (p, h) = crate::kubelet::start(
                    socket,
                    self.inventory.cards.clone(),
                    std::time::Duration::from_millis(self.cfg.attribution.kubelet_refresh_ms),
                    stop_uplink.clone(),
                );
                (Some(p), Some(h))
            }
            None => (None, None),
        };
        let (ready_tx, ready_rx) = watch::channel(Readiness::NotReady("starting".into()));
        let card_metrics = match &self.cfg.metrics_listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding metrics_listen {addr}"))?;
                let cards = Arc::new(crate::metrics::CardMetrics::default());
                let registry = crate::metrics::registry(crate::metrics::AgentMetrics {
                    cards: cards.clone(),
                    inventory: self.inventory.cards.clone(),
                    assignments: self.assignments.subscribe(),
                    ledger: self.ledger.clone(),
                    status: self.status.subscribe(),
                    clock: clock.clone(),
                    agent_id: self.cfg.agent_id.clone(),
                    hostname: hostname(),
                    csp: self.cfg.csp.clone(),
                    dcgm_compat: self.cfg.metrics_dcgm_compat,
                    kubelet,
                });
                let mut stop = stop_uplink;
                tokio::spawn(gpumeter_telemetry::http::serve(
                    listener,
                    Arc::new(registry),
                    ready_rx,
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                ));
                Some(cards)
            }
            None => None,
        };
        let cards = self
            .inventory
            .cards
            .iter()
            .map(|c| c.uuid.clone())
            .collect();
        // A replayable source answers for past instants, so its pids are simulated, not
        // processes of this host: their violations are recorded and no real pid is touched.
        let control = (!self.parts.source.replayable()).then(|| {
            Arc::new(ProcControl::new(&self.cfg.attribution.proc_root)) as Arc<dyn ProcessControl>
        });
        let reader = Reader {
            source: self.parts.source,
            attributor: self.parts.attributor,
            metrics: card_metrics,
            pods,
        };
        let settings = SamplerSettings {
            periods: Periods {
                interval_ms: self.cfg.sampling.interval_ms,
                window_ms: self.cfg.sampling.window_ms,
            },
            stop_at: opts.stop_at,
            start_at: opts.start_at,
            on_full: self.cfg.spool.on_full,
        };
        if let Some(wait) = opts.await_assignments {
            // A session counts once its Welcome (with the assignments) has been applied.
            let mut rx = self.status.subscribe();
            if tokio::time::timeout(wait, rx.wait_for(|s| s.sessions >= 1))
                .await
                .is_err()
            {
                warn!("no assignments from the collector yet; sampling without them");
            }
        }
        let enforcer = Enforcer::new(self.cfg.enforcement.clone(), control, clock.clone());
        let _ = ready_tx.send(Readiness::Ready);
        run_sampler(
            reader,
            cards,
            settings,
            clock,
            self.ledger.clone(),
            self.assignments.subscribe(),
            enforcer,
            shutdown.clone(),
        )
        .await?;
        let _ = ready_tx.send(Readiness::NotReady("sampling stopped".into()));
        if opts.drain {
            let mut status = self.status.subscribe();
            let mut shutdown = shutdown;
            let head = self.ledger.head().0;
            info!(
                through = head,
                "sampling stopped; waiting for the collector to acknowledge"
            );
            loop {
                if status.borrow().acked_seq >= head || *shutdown.borrow() {
                    break;
                }
                tokio::select! {
                    r = status.changed() => if r.is_err() { break },
                    _ = shutdown.changed() => {}
                }
            }
        }
        let _ = stop_uplink_tx.send(true);
        let _ = uplink_task.await;
        Ok(())
    }
}

/// Loads the config file and builds from it.
pub fn build_from_file(path: &Path) -> anyhow::Result<Agent> {
    let cfg = AgentConfig::load(path)?;
    let parts = open_parts(&cfg)?;
    Agent::build(cfg, parts)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
