//! Storage: the one `Store` trait every backend implements, and the plain rows it takes and
//! gives. Nothing generated from the proto files crosses this boundary.

pub mod body_block;
pub mod open;
#[doc(hidden)]
pub mod pg_testdb;
pub mod postgres;
pub mod postgres_commit;
pub mod postgres_compact;
pub mod postgres_integrity;
pub mod postgres_ledger;
pub mod postgres_retention;
pub mod postgres_rollup;
pub mod postgres_schema;
pub mod rollup_sql;
pub mod sqlite;
pub mod sqlite_compact;
pub mod sqlite_integrity;
pub mod sqlite_ledger;
pub mod sqlite_names;
pub mod sqlite_retention;
pub mod sqlite_rollup;
#[cfg(test)]
mod suite;
pub mod writer;

use gpumeter_proto::chain::Hash;

pub use open::{open_ledger, open_store};

use crate::grants::{AmendError, Amendment, Grant};

/// Why the store could not do something.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("database: {0}")]
    Db(String),
    #[error("database schema version {found} is newer than this collector knows ({known})")]
    SchemaTooNew { found: i64, known: i64 },
    #[error(
        "agent {agent_id} presented a public key that differs from the one pinned for it; an admin must re-register the agent"
    )]
    KeyMismatch { agent_id: String },
    #[error("agent {agent_id} is unknown")]
    UnknownAgent { agent_id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    /// What was asked for needs raw windows that retention dropped (see `crate::retention`).
    #[error("{0}")]
    Retained(String),
    /// An amendment the grant rules refuse; nothing was stored.
    #[error(transparent)]
    Amend(#[from] AmendError),
    #[error("the store is shut down")]
    Closed,
    /// An agent id is bound to the host of its first Hello.
    #[error(
        "agent {agent_id} is bound to host {bound}, not {claimed}; an agent id belongs to one host"
    )]
    HostMismatch {
        agent_id: String,
        bound: String,
        claimed: String,
    },
    /// One batch of a group commit failed to insert; it alone was rolled back.
    #[error("batch of agent {agent_id} ending at seq {seq} was refused by the store: {reason}")]
    BatchRefused {
        agent_id: String,
        seq: u64,
        reason: String,
    },
}

/// A GPU as an agent reported it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GpuRow {
    pub uuid: String,
    pub index: u32,
    pub name: String,
    pub serial: String,
    pub pci_bus_id: String,
    pub memory_total_bytes: Option<u64>,
    pub mig_mode: String,
    /// For a MIG device: its parent GPU, profile and slices (empty/`None` for a whole GPU).
    pub mig: Option<MigRow>,
}

/// Where a MIG device sits on its parent GPU.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MigRow {
    pub parent_uuid: String,
    pub profile: String,
    pub slices: Option<u32>,
    pub parent_slices: Option<u32>,
}

impl MigRow {
    /// The device as a fraction of its GPU: slices ÷ the parent's slices; `None` when either
    /// is unknown.
    pub fn gpu_equivalents(&self) -> Option<f64> {
        match (self.slices, self.parent_slices) {
            (Some(s), Some(p)) if p > 0 => Some(f64::from(s) / f64::from(p)),
            _ => None,
        }
    }
}

/// What an agent says when it connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentHello {
    pub agent_id: String,
    pub host_id: String,
    pub csp: String,
    pub hostname: String,
    pub agent_version: String,
    pub public_key: [u8; 32],
    pub driver_version: String,
    pub gpus: Vec<GpuRow>,
    pub epoch: u64,
    pub received_ms: i64,
}

/// Where an agent's ledger stands in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentState {
    /// Highest seq held, and its hash.
    pub durable_seq: u64,
    pub durable_hash: Hash,
    /// Highest epoch of the agent's stored checkpoints (0 when none).
    pub epoch: u64,
}

/// Per-principal usage in a window.
#[derive(Debug, Clone, PartialEq)]
pub struct PrincipalRow {
    pub principal: String,
    pub uid: Option<u32>,
    pub occupied_ms: u64,
    pub active_ms: u64,
    pub memory_max_bytes: u64,
    pub process_count: u32,
    pub matches_grant: bool,
}

/// A card window's figures, as columns.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowRow {
    pub gpu_uuid: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub interval_ms: u64,
    pub expected_samples: u32,
    pub good_samples: u32,
    pub util_avg_pct: Option<f64>,
    pub util_max_pct: Option<f64>,
    pub mem_util_avg_pct: Option<f64>,
    pub memory_used_max_bytes: Option<u64>,
    pub energy_mj: Option<u64>,
    pub energy_estimated: bool,
    pub power_avg_w: Option<f64>,
    pub temperature_max_c: Option<u32>,
    pub throttle_reasons: Option<u64>,
    /// "ok", "degraded", "lost".
    pub health: &'static str,
    pub unavailable_ms: u64,
    /// "assigned", "unassigned", "expired", "revoked".
    pub assignment_status: &'static str,
    pub grant_id: String,
    pub principal: String,
    pub active_ms: u64,
    pub occupied_ms: u64,
    pub foreign_ms: u64,
    /// Time with at least one process of the grantee on the card; `None` from agents older
    /// than the field.
    pub grantee_occupied_ms: Option<u64>,
    /// Time the card was used with no process visible to the agent (records.proto); `None`
    /// from agents older than the field.
    pub unattributed_ms: Option<u64>,
    /// Energy estimated from power × time where the card's energy counter was frozen (and
    /// `energy_mj` is absent); `None` otherwise.
    pub energy_estimated_mj: Option<u64>,
    pub principals: Vec<PrincipalRow>,
}

/// An event, as columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub gpu_uuid: String,
    pub at_ms: i64,
    /// "xid", "ecc_single_bit", "gpu_lost", "enforcement", ...
    pub kind: &'static str,
    pub code: i64,
    pub detail: String,
    pub pid: Option<u32>,
    pub principal: String,
    pub grant_id: String,
    pub mode: String,
    pub action: String,
    pub result: String,
}

/// What a record body decoded to.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordContent {
    Window(WindowRow),
    Event(EventRow),
    Gap {
        from_ms: i64,
        until_ms: i64,
        reason: String,
    },
    EpochStart {
        epoch: u64,
        last_acked_seq: u64,
    },
    /// A body this collector cannot decode (a newer agent, or damage); kept verbatim.
    Unknown,
}

impl RecordContent {
    pub fn kind(&self) -> &'static str {
        match self {
            RecordContent::Window(_) => "window",
            RecordContent::Event(_) => "event",
            RecordContent::Gap { .. } => "gap",
            RecordContent::EpochStart { .. } => "epoch_start",
            RecordContent::Unknown => "unknown",
        }
    }
}

/// One verified record.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestRecord {
    pub seq: u64,
    pub prev_hash: Hash,
    pub hash: Hash,
    pub body: Vec<u8>,
    pub created_ms: i64,
    pub content: RecordContent,
}

/// A signed checkpoint, stored verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRow {
    pub epoch: u64,
    pub seq: u64,
    pub chain_hash: Hash,
    pub signature: Vec<u8>,
}

/// A window's signed body with where it came from: (agent, host, seq, body).
pub type WindowBody = (String, String, u64, Vec<u8>);

/// Something an operator or auditor must see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alarm {
    pub agent_id: String,
    pub at_ms: i64,
    /// "equivocation", "seq_gap", "clock_skew", ...
    pub kind: String,
    pub seq: Option<u64>,
    pub detail: String,
}

/// A verified batch from one agent: committed whole or not at all.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestBatch {
    pub agent_id: String,
    pub records: Vec<IngestRecord>,
    pub checkpoint: CheckpointRow,
    pub received_ms: i64,
    pub alarms: Vec<Alarm>,
}

/// What committing a batch did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommitOutcome {
    pub durable_seq: u64,
    pub durable_hash: Hash,
    /// Records already held with identical bytes.
    pub duplicates: u64,
    /// Seqs already held with different bytes (the first copy is kept).
    pub equivocations: Vec<u64>,
}

/// Usage per card over a period.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CardUsageRow {
    pub agent_id: String,
    pub host_id: String,
    pub csp: String,
    pub gpu_uuid: String,
    pub gpu_name: String,
    pub windows: u32,
    pub metered_ms: u64,
    pub occupied_ms: u64,
    pub active_ms: u64,
    pub foreign_ms: u64,
    pub unavailable_ms: u64,
    pub util_avg_pct: Option<f64>,
    pub energy_mj: u64,
    pub memory_used_max_bytes: u64,
}

/// Usage per tenant per card over a period.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TenantUsageRow {
    pub host_id: String,
    pub gpu_uuid: String,
    pub principal: String,
    pub grant_id: String,
    pub occupied_ms: u64,
    pub active_ms: u64,
    pub memory_max_bytes: u64,
    pub matches_grant: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Usage {
    pub cards: Vec<CardUsageRow>,
    pub tenants: Vec<TenantUsageRow>,
}

/// A host as the collector knows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostRow {
    pub agent_id: String,
    pub host_id: String,
    pub csp: String,
    pub hostname: String,
    pub agent_version: String,
    pub durable_seq: u64,
    /// The agent's last Hello.
    pub last_seen_ms: i64,
    /// When the collector received the record at `durable_seq` (`None`: no record yet).
    pub last_record_ms: Option<i64>,
    pub gpus: Vec<GpuRow>,
}

/// One entry of a grant's history: who changed what, when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantChangeRow {
    /// When the change was made (not when it takes effect; `detail` says that).
    pub at_ms: i64,
    pub actor: String,
    /// "import", "revoke", "extend", "move_card".
    pub action: String,
    pub detail: String,
}

/// A grant with its whole history, oldest change first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRecord {
    pub grant: Grant,
    pub history: Vec<GrantChangeRow>,
}

/// One card's assignment for a host's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignmentRow {
    pub gpu_uuid: String,
    pub grant_id: String,
    pub program: String,
    pub principal: String,
    pub valid_from_ms: i64,
    pub valid_until_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

/// A card moved to another host by an admin (`hosts move-card`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardMoveRow {
    pub gpu_uuid: String,
    /// Empty when the card was not held by any host before.
    pub from_host_id: String,
    pub to_host_id: String,
    pub at_ms: i64,
    pub actor: String,
    pub reason: String,
}

/// The backends' common interface. Calls block; async callers use `spawn_blocking` or the
/// [`writer::Writer`].
pub trait Store: Send + Sync + 'static {
    /// Registers or refreshes an agent, its host and its cards; pins its public key on first
    /// use. Returns where its ledger stands.
    fn hello(&self, hello: &AgentHello) -> Result<AgentState, StoreError>;

    /// Commits verified batches in one transaction (group commit). Idempotent on
    /// (agent_id, seq).
    fn commit(&self, batches: &[IngestBatch]) -> Result<Vec<CommitOutcome>, StoreError>;

    /// Hash of a stored record.
    fn record_hash(&self, agent_id: &str, seq: u64) -> Result<Option<Hash>, StoreError>;

    /// Records an alarm outside a batch.
    fn alarm(&self, alarm: &Alarm) -> Result<(), StoreError>;

    fn alarms(&self, agent_id: Option<&str>) -> Result<Vec<Alarm>, StoreError>;

    /// Usage of windows starting in [from, until).
    fn usage(&self, from_ms: i64, until_ms: i64) -> Result<Usage, StoreError>;
    /// The signed bodies of the windows that count (no flag; not reported for a card another
    /// host holds) starting in `[from, until)`, as (agent, host, seq, body), in (agent, seq)
    /// order: what `verify` proves, for readers that need fields no derived row keeps. With
    /// `cards`, only those cards' windows (read through the by-card index: a grant's day is a
    /// few thousand windows, not the fleet's).
    fn window_bodies(
        &self,
        from_ms: i64,
        until_ms: i64,
        cards: Option<&[String]>,
    ) -> Result<Vec<WindowBody>, StoreError>;

    fn hosts(&self) -> Result<Vec<HostRow>, StoreError>;

    /// Whether the collector has seen this card on this host.
    fn known_card(&self, host_id: &str, gpu_uuid: &str) -> Result<bool, StoreError>;

    fn grants(&self) -> Result<Vec<Grant>, StoreError>;

    /// Stores new grants (already validated) and their history; bumps the assignments version.
    fn insert_grants(&self, grants: &[Grant], actor: &str, at_ms: i64) -> Result<(), StoreError>;

    /// The assignment map of a host, with the current assignments version. A card moved into
    /// or out of a grant is assigned only for its own part of the grant's validity; a card that
    /// never belonged (moved away the instant it would start) is left out.
    fn assignments(&self, host_id: &str) -> Result<(u64, Vec<AssignmentRow>), StoreError>;

    /// Pins `public_key` for `agent_id` (creating the agent when unknown, replacing a pinned
    /// key otherwise) and records the change as an alarm-level event for auditors. Returns
    /// (created, replaced).
    fn register_agent(
        &self,
        agent_id: &str,
        public_key: &[u8; 32],
        actor: &str,
        reason: &str,
        at_ms: i64,
    ) -> Result<(bool, bool), StoreError>;

    /// A read-only view of the ledger for verification.
    fn ledger(&self) -> Result<Box<dyn crate::verify::ChainSource + Send>, StoreError>;

    /// One grant with its history; `Ok(None)` when there is no such grant.
    fn grant(&self, grant_id: &str) -> Result<Option<GrantRecord>, StoreError>;

    /// Applies an amendment in one transaction: reads the grant and every other grant held,
    /// decides with [`crate::grants::amend`], stores the amended grant, appends a history row
    /// (`actor`, `at_ms`: when the change is made) and bumps the assignments version. Errors:
    /// [`StoreError::NotFound`] for an unknown grant, [`StoreError::Amend`] for a refusal.
    fn amend_grant(
        &self,
        grant_id: &str,
        amendment: &Amendment,
        actor: &str,
        at_ms: i64,
    ) -> Result<GrantRecord, StoreError>;

    /// Windows that overlap `[from, until)` (a window lasts at most a day), of one card when
    /// `gpu_uuid` names it; ordered by card, then start, then agent and seq.
    fn windows(
        &self,
        from_ms: i64,
        until_ms: i64,
        gpu_uuid: Option<&str>,
    ) -> Result<Vec<MeteredWindow>, StoreError>;

    /// Events at instants in `[from, until)`, of one kind and one card when named; ordered by
    /// time, then agent and seq.
    fn events(
        &self,
        from_ms: i64,
        until_ms: i64,
        kind: Option<&str>,
        gpu_uuid: Option<&str>,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Stores an invoice import (already validated) in one transaction.
    fn insert_invoices(
        &self,
        invoices: &[Invoice],
        actor: &str,
        at_ms: i64,
    ) -> Result<(), StoreError>;

    /// The invoices that count: the latest import for each (csp, grant_id, period), ordered by
    /// CSP, grant and period.
    fn invoices(&self) -> Result<Vec<StoredInvoice>, StoreError>;

    /// Bytes the ledger takes on disk, where the backend can tell.
    fn size_bytes(&self) -> Option<u64> {
        None
    }

    /// Signs a ledger head over every agent's last checkpoint and key history, as committed
    /// now, with the collector's key, and keeps it (see [`crate::heads`]).
    fn sign_head(&self, at_ms: i64) -> Result<crate::heads::SignedHead, StoreError>;

    /// Heads signed at or after `since_ms`, oldest first.
    fn heads(&self, since_ms: i64) -> Result<Vec<crate::heads::SignedHead>, StoreError>;

    /// Keeps the model each granted card must be (the grants CSV's `gpu_model`), raising a
    /// `card_model_mismatch` alarm for a card already reported as another model.
    fn set_card_models(
        &self,
        models: &[crate::grants::CardModel],
        at_ms: i64,
    ) -> Result<(), StoreError>;

    /// The head numbered `id`; `Ok(None)` when there is none.
    fn head(&self, id: u64) -> Result<Option<crate::heads::SignedHead>, StoreError>;

    /// Signs `message` with the collector's key (reports); returns (signature, public key).
    fn collector_sign(&self, message: &[u8]) -> Result<(Vec<u8>, Vec<u8>), StoreError>;
    /// Stores a new bearer token (its hash only). [`StoreError::Conflict`] when the name was
    /// ever used.
    fn create_token(&self, token: &TokenRow) -> Result<(), StoreError>;

    /// Every token, revoked ones included, by name.
    fn tokens(&self) -> Result<Vec<TokenRow>, StoreError>;

    /// Revokes the token named `name` from `at_ms`; `Ok(false)` when it was already revoked,
    /// [`StoreError::NotFound`] when there is none.
    fn revoke_token(&self, name: &str, at_ms: i64) -> Result<bool, StoreError>;

    /// The token whose hash is `hash`. Called on every Query and Admin call: backends answer
    /// it without waiting behind long queries or commits.
    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRow>, StoreError>;

    /// Whether the collector holds this agent (an admin registered it, or it connected).
    fn agent_known(&self, agent_id: &str) -> Result<bool, StoreError>;

    /// Commits verified batches in one transaction in which each batch fails alone (a
    /// savepoint each): a batch whose insert fails is rolled back, an alarm says why, and the
    /// others are committed. The outer error is for the transaction itself (nothing stored).
    /// Backends without savepoints fall back to [`Store::commit`], all or nothing.
    fn commit_each(
        &self,
        batches: &[IngestBatch],
    ) -> Result<Vec<Result<CommitOutcome, StoreError>>, StoreError> {
        Ok(self.commit(batches)?.into_iter().map(Ok).collect())
    }

    /// When the agent was first registered (its first Hello or an admin's registration);
    /// `None` for an unknown agent.
    fn agent_registered_ms(&self, agent_id: &str) -> Result<Option<i64>, StoreError>;

    /// Gives a card to another host (an admin's decision, kept in the card history with who
    /// and when). Windows the new host reported for it while another host held it count from
    /// then on. [`StoreError::NotFound`] for a card no host ever reported.
    fn move_host_card(
        &self,
        gpu_uuid: &str,
        to_host_id: &str,
        actor: &str,
        reason: &str,
        at_ms: i64,
    ) -> Result<CardMoveRow, StoreError>;

    /// The card history, oldest first (every card when `gpu_uuid` is `None`).
    fn card_moves(&self, gpu_uuid: Option<&str>) -> Result<Vec<CardMoveRow>, StoreError>;
    /// Visits the rollup rows of `level` whose bucket overlaps `[from, until)`, one card's
    /// bucket (all its rows) at a time (see [`crate::rollup`]). `false`: this store keeps no
    /// rollups (nothing is visited, and reports read windows).
    fn rollups(
        &self,
        level: crate::rollup::Level,
        from_ms: i64,
        until_ms: i64,
        visit: &mut dyn FnMut(Vec<crate::rollup::RollupRow>),
    ) -> Result<bool, StoreError> {
        let _ = (level, from_ms, until_ms, visit);
        Ok(false)
    }

    /// What retention has dropped ([`crate::retention`]); empty where it never ran.
    fn retention(&self) -> Result<crate::retention::Retention, StoreError> {
        Ok(Default::default())
    }

    /// Signs a head, then drops the window rows before `req.horizon_ms` that the rollups
    /// stand in for ([`crate::retention`]); nothing signed is deleted.
    fn retain(
        &self,
        req: &crate::retention::RetainRequest,
    ) -> Result<crate::retention::Retained, StoreError> {
        let _ = req;
        Err(StoreError::Conflict(
            "this store keeps no rollups, so it cannot drop raw windows".into(),
        ))
    }

    /// Stores providers (already validated, ids normalised) in one transaction: a CSP held
    /// before has its names and commitments replaced. Each provider added or changed gets a
    /// `registry_history` row (`actor`, `at_ms`); an unchanged one none.
    fn import_providers(
        &self,
        providers: &[crate::registry::Provider],
        actor: &str,
        at_ms: i64,
    ) -> Result<(), StoreError>;

    /// Every provider held, by CSP id.
    fn providers(&self) -> Result<Vec<crate::registry::Provider>, StoreError>;

    /// Registers hosts (already validated against the providers) in one transaction: a host
    /// held before under another CSP moves to the new one. History as for providers.
    fn register_hosts(
        &self,
        hosts: &[crate::registry::RegisteredHost],
        actor: &str,
        at_ms: i64,
    ) -> Result<(), StoreError>;

    /// Every registered host, by host id.
    fn registered_hosts(&self) -> Result<Vec<crate::registry::RegisteredHost>, StoreError>;

    /// Every change to the registry, oldest first.
    fn registry_history(&self) -> Result<Vec<crate::registry::RegistryChange>, StoreError>;

    /// Claims the one live session an agent may have across every collector sharing this
    /// store; `Ok(None)` while another collector holds it. The claim lasts until the returned
    /// value is dropped, or its process dies. A store only one collector uses grants every
    /// claim (that collector's own live set already allows one session per agent).
    fn claim_session(&self, agent_id: &str) -> Result<Option<SessionClaim>, StoreError> {
        let _ = agent_id;
        Ok(Some(SessionClaim::default()))
    }

    /// How often to look for grant changes made by other collectors sharing this store (so
    /// sessions here push them); `None` where only this collector changes grants.
    fn shared_poll(&self) -> Option<std::time::Duration> {
        None
    }
}

/// A held claim on an agent's live session ([`Store::claim_session`]); released on drop.
#[derive(Default)]
pub struct SessionClaim(Option<Box<dyn std::any::Any + Send + Sync>>);

impl SessionClaim {
    /// A claim whose release is `held`'s drop.
    pub fn holding(held: impl std::any::Any + Send + Sync) -> Self {
        Self(Some(Box::new(held)))
    }
}

impl std::fmt::Debug for SessionClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "SessionClaim(held)"
        } else {
            "SessionClaim(local)"
        })
    }
}

/// A bearer token as held: never the secret, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub name: String,
    /// `auditor` or `admin`.
    pub role: String,
    /// SHA-256 of the token, hex.
    pub hash: String,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// A stored window with the host and CSP of the agent that sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct MeteredWindow {
    pub agent_id: String,
    pub host_id: String,
    pub csp: String,
    pub seq: u64,
    pub window: WindowRow,
}

/// A stored event with the host and CSP of the agent that sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub agent_id: String,
    pub host_id: String,
    pub csp: String,
    pub seq: u64,
    pub event: EventRow,
}

/// One line of a CSP's invoice: GPU-hours billed for a grant in a Korean calendar month.
#[derive(Debug, Clone, PartialEq)]
pub struct Invoice {
    pub csp: String,
    pub grant_id: String,
    /// `YYYY-MM`.
    pub period: String,
    pub billed_gpu_hours: f64,
    /// Line of the imported file, for the record.
    pub line: u32,
}

/// An invoice as held, with who imported it when.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredInvoice {
    pub invoice: Invoice,
    pub actor: String,
    pub imported_at_ms: i64,
}

impl IngestBatch {
    /// A placeholder left behind when a batch is moved out of a queue entry.
    pub fn empty() -> Self {
        Self {
            agent_id: String::new(),
            records: Vec::new(),
            checkpoint: CheckpointRow {
                epoch: 0,
                seq: 0,
                chain_hash: [0; 32],
                signature: Vec::new(),
            },
            received_ms: 0,
            alarms: Vec::new(),
        }
    }
}

#[cfg(test)]
mod mig_tests {
    use super::MigRow;

    #[test]
    fn a_mig_device_is_its_slices_over_its_parents_in_gpu_equivalents() {
        let row = |slices, parent_slices| MigRow {
            slices,
            parent_slices,
            ..MigRow::default()
        };
        assert_eq!(row(Some(1), Some(7)).gpu_equivalents(), Some(1.0 / 7.0));
        assert_eq!(row(Some(3), Some(7)).gpu_equivalents(), Some(3.0 / 7.0));
        assert_eq!(row(Some(1), None).gpu_equivalents(), None);
        assert_eq!(row(Some(1), Some(0)).gpu_equivalents(), None);
    }
}
