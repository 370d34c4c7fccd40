//! `gpumeter-collector`: parses the command line, loads config, starts logging, calls the
//! library. Exit codes: 0 ok, 1 failure, 2 usage error, 64 bad config.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

mod registry_cli;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use gpumeter_collector::config::CollectorConfig;
#[cfg(feature = "demo")]
use gpumeter_collector::demo::{DemoOptions, run_demo};
use gpumeter_collector::grants::{fmt_kst, parse_gpu_uuid, parse_valid_from, parse_valid_until};
use gpumeter_collector::listing;
use gpumeter_collector::report::{UsageJson, idle_table, parse_period};
use gpumeter_collector::store::sqlite::SqliteStore;
use gpumeter_proto::v1;
use gpumeter_telemetry::docs::Shell;
use gpumeter_telemetry::logging::LogFormat;

/// Standard output, quietly: when whoever reads it has gone (`… | head -1`), the command ends
/// with code 0 instead of panicking, since the reader saw all it wanted. Every `print!` and
/// `println!` below goes through here (the macros shadow std's).
fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("gpumeter-collector: writing standard output: {e}");
        std::process::exit(1);
    }
}

macro_rules! print {
    ($($arg:tt)*) => { $crate::write_stdout(format_args!($($arg)*)) };
}

macro_rules! println {
    () => { $crate::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

#[derive(Parser)]
#[command(
    name = "gpumeter-collector",
    version,
    about = "gpumeter collector: the GPU usage ledger, grants and reports"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Client commands (`--server https://…`): the CA certificate to trust (the collector's
    /// ca.pem).
    #[arg(long, global = true, env = "GPUMETER_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Client commands: a file holding the bearer token [default: the token in
    /// $GPUMETER_TOKEN].
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

/// The client credentials the command line gave (`--ca-cert`, `--token-file`, GPUMETER_TOKEN).
static CLIENT: std::sync::OnceLock<(Option<PathBuf>, Option<PathBuf>)> = std::sync::OnceLock::new();

fn client_auth() -> Result<gpumeter_collector::client::ClientAuth, Failure> {
    let (ca, token_file) = CLIENT.get().cloned().unwrap_or_default();
    gpumeter_collector::client::ClientAuth::load(
        ca.as_deref(),
        token_file.as_deref(),
        std::env::var("GPUMETER_TOKEN").ok(),
    )
    .map_err(|e| Failure {
        code: 64,
        error: e.into(),
    })
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Csv,
    Json,
    Focus,
    Html,
    /// The HTML page printed to A4-landscape PDF by headless Chromium (needs `chromium`).
    Pdf,
}

/// What `report` shows.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum View {
    /// Metered figures against grants: per grant (and card), program and CSP; use of
    /// unassigned cards; idle grants; invoices against delivery.
    Reconcile,
    /// Raw metered usage per card and per tenant (table or json only).
    Usage,
    /// GPU-hours, active time and peak memory per Slurm job, Kubernetes pod or container, like
    /// sacct (table, csv, json or html; `--grant` keeps one grant's windows).
    Jobs,
}

/// Language of a report's labels.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ReportLang {
    Ko,
    En,
}

/// Formats the idle-grant list comes in.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum IdleFormat {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve Ingest, Query and Admin, over TLS: `--ca-dir DIR` (from `ca init` and `ca
    /// issue-server`), or `--tls-cert`, `--tls-key` and `--client-ca` from a CA of your own.
    Serve {
        #[arg(long)]
        listen: Option<String>,
        /// SQLite file path, or a PostgreSQL database: postgres://USER@HOST/DB.
        #[arg(long)]
        db: Option<String>,
        /// The collector's signing key file (heads, signed reports; created 0600 on first
        /// use). Required with a PostgreSQL --db, which never holds the key; a SQLite --db
        /// keeps it beside the file.
        #[arg(long, value_name = "PATH")]
        collector_key: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
        /// How log lines are written to stderr (colour only on a terminal; level from
        /// RUST_LOG, default info).
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Same as `--log-format json`.
        #[arg(long, hide = true)]
        log_json: bool,
        /// A built-in CA directory: serves server.pem/server.key, trusts ca.pem for agents,
        /// reads revoked.txt at every handshake.
        #[arg(long, value_name = "DIR")]
        ca_dir: Option<PathBuf>,
        /// The collector's certificate chain (PEM) [default: DIR/server.pem].
        #[arg(long, value_name = "FILE")]
        tls_cert: Option<PathBuf>,
        /// Its private key (PEM) [default: DIR/server.key].
        #[arg(long, value_name = "FILE")]
        tls_key: Option<PathBuf>,
        /// The CA agents' certificates chain to (PEM) [default: DIR/ca.pem].
        #[arg(long, value_name = "FILE")]
        client_ca: Option<PathBuf>,
        /// Revoked serials, one per line, read at every handshake [default: DIR/revoked.txt].
        #[arg(long, value_name = "FILE")]
        revoked: Option<PathBuf>,
        /// Serve without TLS (tests on one machine only): tokens are still checked, and only
        /// agents an admin registered are admitted.
        #[arg(long)]
        insecure: bool,
        /// Write each closed month's reports here once the month has ended in Korea (every
        /// format, Korean and English, signed provenance) and an idle-grants notice;
        /// existing files are never rewritten, and missed months are caught up at start.
        #[arg(long, value_name = "DIR")]
        reports_dir: Option<PathBuf>,
        /// Serve the read-only web console on this address (HTTPS with the collector's
        /// certificate; auditor and admin tokens log in); off by default. See docs/console.md.
        #[arg(long, value_name = "ADDR")]
        console_listen: Option<String>,
    },
    /// The built-in certificate authority: make it, issue agent and server certificates,
    /// revoke them.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Bearer tokens for people: `auditor` (Query) or `admin` (Admin and Query). Works on the
    /// database file directly, so the first admin token needs no running server.
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Grants: import, list, show, and amend (revoke, extend, move a card).
    Grants {
        #[command(subcommand)]
        command: GrantsCommand,
    },
    /// Reconciliation report for a period (Korean calendar): allocated, unmetered, unavailable,
    /// delivered, occupied, active, idle and foreign GPU-hours, utilization, energy and
    /// violations per grant and card, program and CSP; use of unassigned cards; idle grants;
    /// invoices against delivery. `--view usage` shows raw usage per card and tenant instead.
    /// A period still in progress is reconciled up to now (or --as-of); the rest of it is not
    /// yet elapsed and counts in no figure.
    #[command(after_help = gpumeter_collector::render::glossary::help_text())]
    Report {
        /// YYYY-MM (a Korean calendar month), YYYY-MM-DD, or FROM..UNTIL (dates or RFC 3339).
        #[arg(long, required_unless_present = "trend", conflicts_with = "trend")]
        period: Option<String>,
        /// Month-by-month trends instead: FROM..UNTIL in months (2026-04..2026-09), per
        /// program, CSP, grant, grantee and principal (table, csv, json or html).
        #[arg(long, value_name = "MONTHS")]
        trend: Option<String>,
        /// Reconcile as of this time (RFC 3339, or a KST date meaning its midnight) instead of
        /// now: only the part of the period elapsed by then counts.
        #[arg(long, value_name = "TIME")]
        as_of: Option<String>,
        /// Terminal tables: every column and whole GPU UUIDs (the default fits 120 columns).
        #[arg(long)]
        wide: bool,
        /// Only this program's grants: hpc, research or advanced (leaves unassigned use out).
        #[arg(long)]
        program: Option<String>,
        /// Only this grant.
        #[arg(long = "grant", value_name = "ID")]
        grant: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Language of the labels (figures and ids are the same in both).
        #[arg(long, value_enum, default_value = "en")]
        lang: ReportLang,
        #[arg(long, value_enum, default_value = "reconcile")]
        view: View,
        /// Idle grants: utilization under this percent ...
        #[arg(long, default_value_t = 10.0)]
        idle_threshold: f64,
        /// ... over this many days up to the period's end (or now, if earlier).
        #[arg(long, default_value_t = 14)]
        idle_days: u32,
        /// Write the report to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Have the collector sign the report (it recomputes it first).
        #[arg(long)]
        sign: bool,
        /// The collector, e.g. http://127.0.0.1:7400.
        #[arg(long)]
        server: String,
    },
    /// Check a report file: its content against its own hash (and signature), then against
    /// the ledger, recomputed as of the head it names. Exit 1 when it does not match.
    VerifyReport {
        file: PathBuf,
        #[arg(long, conflicts_with = "db", required_unless_present = "db")]
        server: Option<String>,
        /// A copy of the ledger database (a scratch copy of it is opened; the file is not
        /// touched), or a PostgreSQL database (postgres://…), read as of the report's head.
        #[arg(long)]
        db: Option<String>,
        /// An auditor's heads file (from `heads --out`): the head the report names must be in
        /// it, exactly as the ledger holds it.
        #[arg(long)]
        heads: Option<PathBuf>,
    },
    /// Grants to reclaim: utilization under a threshold over the last days up to now, with
    /// the cards that could be reassigned. (`report` lists them for its period too.)
    Idle {
        /// Utilization threshold, percent.
        #[arg(long, default_value_t = 10.0)]
        threshold: f64,
        /// Look-back window, days; a grant must have held its cards for all of it.
        #[arg(long, default_value_t = 14)]
        days: u32,
        #[arg(long)]
        program: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: IdleFormat,
        #[arg(long, value_enum, default_value = "en")]
        lang: ReportLang,
        #[arg(long)]
        server: String,
    },
    /// The providers registry: CSPs, their names and committed cards per program.
    Providers {
        #[command(subcommand)]
        command: registry_cli::ProvidersCommand,
    },
    /// CSP invoices: import billed GPU-hours per grant and month.
    Invoices {
        #[command(subcommand)]
        command: InvoicesCommand,
    },
    /// Agents: pin or replace an agent's public key.
    Agents {
        #[command(subcommand)]
        command: AgentsCommand,
    },
    /// Re-verify every agent's chain and signatures; exit 1 if anything is wrong.
    Verify {
        /// A running collector.
        #[arg(long, conflicts_with = "db", required_unless_present = "db")]
        server: Option<String>,
        /// A copy of the ledger database, opened read-only (a SQLite file, or postgres://…,
        /// read in one snapshot).
        #[arg(long)]
        db: Option<String>,
        /// An auditor's heads file (from `heads --out`): the ledger must still extend each.
        #[arg(long)]
        heads: Option<PathBuf>,
        /// A retention archive (from `retain --archive`) to check against the ledger
        /// (with --db; repeatable).
        #[arg(long, requires = "db")]
        archive: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Move the bodies of records stored before the compact ledger (schema version 11) into
    /// compressed blocks, as bodies are stored since; no signed byte changes, and `verify`
    /// gives the same answer. Runs beside serving collectors, a chunk of records at a time.
    Compact {
        /// The ledger: a SQLite file, or postgres://….
        #[arg(long)]
        db: PathBuf,
        /// Then give the freed space back: SQLite rewrites the file without its free pages
        /// (`VACUUM`: as much free disk as the file, the database held for its length);
        /// PostgreSQL vacuums `records`, so the space is reused.
        #[arg(long)]
        vacuum: bool,
        /// Records per block (and per transaction).
        #[arg(long, default_value_t = gpumeter_collector::store::sqlite_compact::PER_BLOCK as u64, value_parser = clap::value_parser!(u64).range(1..=65536))]
        per_block: u64,
    },
    /// Drop raw windows older than an age where the rollups stand in for them exactly: a head
    /// is signed first, and records, bodies, checkpoints and events are all kept, so `verify`
    /// and every report give the same answers (a report that would need a dropped window says
    /// so). Runs beside serving collectors, a range of rows at a time.
    Retain {
        /// The ledger: a SQLite file, or postgres://….
        #[arg(long)]
        db: String,
        /// Keep raw windows of this many days back (whole Korean days).
        #[arg(long, default_value_t = gpumeter_collector::retention::DEFAULT_MAX_AGE_DAYS, value_parser = clap::value_parser!(u32).range(1..=36500))]
        max_age_days: u32,
        /// The instant the age counts back from (RFC 3339 or a Korean calendar day) [default: now].
        #[arg(long)]
        now: Option<String>,
        /// The collector's signing key (PostgreSQL: required, it is kept in a file).
        #[arg(long)]
        collector_key: Option<PathBuf>,
        /// Write the signed records this run puts below the cuts, with their checkpoints, to
        /// this archive file (`verify --archive` checks it against the ledger).
        #[arg(long)]
        archive: Option<PathBuf>,
        /// Then give the freed space back (SQLite: `VACUUM`).
        #[arg(long)]
        vacuum: bool,
        #[arg(long)]
        json: bool,
    },
    /// Fetch the collector's signed ledger heads and append the new ones to an append-only
    /// file an auditor keeps (with --server, a fresh head is signed first).
    Heads {
        /// Heads signed at or after this time (RFC 3339 or a Korean calendar day) [default: all].
        #[arg(long)]
        since: Option<String>,
        /// The heads file; created when missing, only ever appended to.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, conflicts_with = "db", required_unless_present = "db")]
        server: Option<String>,
        /// A copy of the ledger database, opened read-only (its stored heads): a SQLite file
        /// or postgres://….
        #[arg(long)]
        db: Option<String>,
    },
    /// What the collector flagged for operators and auditors: equivocations, sequence gaps,
    /// rejected batches, clock skew, agents' gap and epoch records, key registrations.
    Alarms {
        /// Only this agent's.
        #[arg(long)]
        agent: Option<String>,
        /// Print JSON: an array of objects, instants in ms and RFC 3339.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        server: String,
    },
    /// Agents and cards the collector has seen, with when each was last seen and how far
    /// behind it is (`hosts --server URL`); `hosts move-card` gives a card to another host.
    #[command(args_conflicts_with_subcommands = true)]
    Hosts {
        #[arg(long)]
        server: Option<String>,
        /// Print JSON: an array of objects, instants in ms and RFC 3339.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: Option<HostsCommand>,
    },
    /// Events in the ledger: XIDs, ECC errors, card health counters, lost and recovered
    /// cards, enforcement, assignment changes, agent starts, spool full.
    Events {
        /// YYYY-MM, YYYY-MM-DD, or FROM..UNTIL (KST dates, end inclusive, or RFC 3339)
        /// [default: the last 30 days].
        #[arg(long)]
        period: Option<String>,
        /// Only this agent's.
        #[arg(long)]
        agent: Option<String>,
        /// Only this card's (GPU or MIG UUID).
        #[arg(long = "gpu", value_name = "UUID")]
        gpu: Option<String>,
        /// Only this kind: xid, ecc_single_bit, ecc_double_bit, card_health, gpu_lost,
        /// gpu_recovered, enforcement, assignment_changed, agent_started, spool_full,
        /// pod_device_mismatch.
        #[arg(long)]
        kind: Option<String>,
        /// Print JSON: an array of objects, instants in ms and RFC 3339.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        server: String,
    },
    /// A card's windows in time order, as counted (start, end, agent, seq, health, assignment
    /// status, grant, utilization, occupied time, memory, energy, flags), and the grants that
    /// held it: what ran on the card. Windows the collector flagged (impossible values, card
    /// time counted twice, a card another host holds) count in no figure and are not listed;
    /// `alarms` and `verify` name them.
    Timeline {
        #[arg(long = "gpu", value_name = "UUID")]
        gpu: String,
        /// As for `events` [default: the last 30 days].
        #[arg(long)]
        period: Option<String>,
        /// Print JSON: an array of windows, instants in ms and RFC 3339.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        server: String,
    },
    /// Violation episodes: card, host, grant (or none), principal and pid as the agent
    /// recorded them, the enforcement mode and the action taken (its last signal and
    /// outcome). One row per episode, as `report` counts them.
    Violations {
        /// As for `events` [default: the last 30 days].
        #[arg(long)]
        period: Option<String>,
        /// Only violations on this grant's cards while it held them.
        #[arg(long = "grant", value_name = "ID")]
        grant: Option<String>,
        /// Print JSON: an array of episodes, instants in ms and RFC 3339.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        server: String,
    },
    /// The whole system on one machine with simulated GPUs.
    Demo {
        /// Simulated minutes to meter.
        #[arg(long, default_value_t = 30)]
        minutes: u32,
        /// Simulated seconds per real second.
        #[arg(long, default_value_t = 150.0)]
        speed: f64,
        /// Keep the SQLite ledger at this path.
        #[arg(long)]
        db: Option<PathBuf>,
    },
    /// Write the man pages (gpumeter-collector.1 and one per subcommand) into a directory.
    Man {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the configuration file's reference (Markdown), generated from the config types.
    ConfigReference,
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// The fleet live in the terminal, like nvtop for every card the collector meters (fed by
    /// Query.Watch): grouped by program, grant or host, sortable, idle (IDLE) and violating
    /// (VIOL) cards marked and coloured. Keys: g group, s sort, u/p/m/a/n/h/x sort by
    /// util/power/memory/active/card/host/state, r reverse, arrows scroll, q quit.
    Top {
        #[arg(long)]
        server: String,
        /// Only this program's grants and cards (hpc, research, advanced).
        #[arg(long)]
        program: Option<String>,
        /// Only this grant and its cards.
        #[arg(long)]
        grant: Option<String>,
        /// Only this host's cards (and the grants with a card on it).
        #[arg(long)]
        host: Option<String>,
        /// Grouping to start with (the `g` key cycles it).
        #[arg(long, value_enum, default_value = "grant")]
        group: gpumeter_collector::top::Group,
        /// Sort to start with (the `s` key cycles it).
        #[arg(long, value_enum, default_value = "util")]
        sort: gpumeter_collector::top::Sort,
        /// Print the view once as text and exit (for scripts; needs no terminal).
        #[arg(long, conflicts_with = "json")]
        once: bool,
        /// Print the first snapshot as JSON and exit.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Make a new CA in DIR (ca.pem, ca.key 0600, revoked.txt).
    Init {
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// Validity of the CA certificate, days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue an agent's client certificate, naming its agent id and host id.
    IssueAgent {
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        #[arg(long)]
        agent_id: String,
        #[arg(long)]
        host_id: String,
        /// Where to write AGENT_ID.pem and AGENT_ID.key [default: DIR/agents].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 397)]
        days: u32,
    },
    /// Issue the collector's server certificate (DIR/server.pem, DIR/server.key).
    IssueServer {
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// A DNS name agents and people connect to (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// An IP address they connect to (repeatable).
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        #[arg(long, default_value_t = 397)]
        days: u32,
    },
    /// Revoke a certificate by serial (see DIR/issued.tsv); the running collector refuses it
    /// from its next handshake.
    Revoke {
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        serial: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TokenRole {
    Auditor,
    Admin,
}

#[derive(Subcommand)]
enum TokensCommand {
    /// Make a token and print it (once: only its hash is stored).
    Create {
        #[arg(long, value_enum)]
        role: TokenRole,
        /// Who holds it; recorded as the actor of what it changes. Never reused.
        #[arg(long)]
        name: String,
        /// The collector's database: a SQLite file or postgres://….
        #[arg(long)]
        db: String,
    },
    /// Every token: name, role, created, revoked.
    List {
        #[arg(long)]
        db: String,
    },
    /// Revoke a token by name; calls with it are refused from the next one on.
    Revoke {
        name: String,
        #[arg(long)]
        db: String,
    },
}

#[derive(Subcommand)]
enum HostsCommand {
    /// Give a card (GPU or MIG UUID) to another host. A card belongs to the host that first
    /// reported it; another host's windows for it count in no figure until it is moved there.
    MoveCard {
        gpu_uuid: String,
        #[arg(long)]
        to_host: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// Who is making the change, for the card history [default: $USER, or admin].
        #[arg(long)]
        actor: Option<String>,
        #[arg(long)]
        server: String,
    },
    /// Register a host to a CSP (a registered provider); grant imports then refuse the host
    /// under any other CSP. Kept in the registry history.
    Register {
        host_id: String,
        #[arg(long)]
        csp: String,
        #[arg(long)]
        server: String,
    },
    /// Register hosts from CSV (host_id,csp); all or nothing.
    Import {
        file: PathBuf,
        #[arg(long)]
        server: String,
        /// Check the file only; store nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The registered hosts and their CSP.
    Registered {
        #[arg(long)]
        server: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AgentsCommand {
    /// Pin an agent's key before it first connects, or replace the pinned key of a
    /// reinstalled agent (`gpumeter-agent key --config agent.toml` prints it).
    Register {
        agent_id: String,
        /// The agent's ed25519 public key, 64 hex digits.
        #[arg(long)]
        key: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// Ignored: the history records the token's name.
        #[arg(long, hide = true)]
        actor: Option<String>,
        #[arg(long)]
        server: String,
    },
}

#[derive(Subcommand)]
enum GrantsCommand {
    /// Import grants from CSV (all or nothing).
    Import {
        file: PathBuf,
        #[arg(long)]
        server: String,
        #[arg(long)]
        dry_run: bool,
        /// Who is making the change, for the history [default: $USER, or admin].
        #[arg(long)]
        actor: Option<String>,
    },
    /// List grants.
    List {
        #[arg(long)]
        server: String,
        #[arg(long, default_value = "")]
        program: String,
        /// Print JSON (every field, cards with their own bounds).
        #[arg(long)]
        json: bool,
    },
    /// One grant: its cards (with when each belonged to it) and its history.
    Show {
        grant_id: String,
        #[arg(long)]
        server: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a grant from an instant (past or future, not before it starts).
    Revoke {
        grant_id: String,
        /// RFC 3339, YYYY-MM-DD (00:00 KST of that day), or now.
        #[arg(long)]
        at: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long)]
        server: String,
        /// Who is making the change, for the history [default: $USER, or admin].
        #[arg(long)]
        actor: Option<String>,
    },
    /// Move a grant's end later (the program rules and card overlaps are checked again).
    Extend {
        grant_id: String,
        /// YYYY-MM-DD (a Korean calendar day, inclusive) or RFC 3339 (the exclusive end).
        #[arg(long)]
        until: String,
        #[arg(long)]
        server: String,
        /// Who is making the change, for the history [default: $USER, or admin].
        #[arg(long)]
        actor: Option<String>,
    },
    /// Replace one card of a grant by another from an instant on; the old card's time in the
    /// grant is kept.
    Move {
        grant_id: String,
        /// The card leaving the grant.
        #[arg(long)]
        card: String,
        /// Host of the card joining the grant.
        #[arg(long)]
        to_host: String,
        /// The card joining the grant.
        #[arg(long)]
        to_card: String,
        /// RFC 3339, YYYY-MM-DD (00:00 KST of that day), or now.
        #[arg(long, default_value = "now")]
        at: String,
        #[arg(long)]
        server: String,
        /// Who is making the change, for the history [default: $USER, or admin].
        #[arg(long)]
        actor: Option<String>,
    },
}

#[cfg(feature = "demo")]
async fn demo(minutes: u32, speed: f64, db: Option<PathBuf>) -> Result<(), Failure> {
    let text = run_demo(DemoOptions { minutes, speed, db }).await?;
    print!("{text}");
    Ok(())
}

/// A packaged collector is built without the demo, so it carries no agent code.
#[cfg(not(feature = "demo"))]
async fn demo(_minutes: u32, _speed: f64, _db: Option<PathBuf>) -> Result<(), Failure> {
    Err(usage(anyhow::anyhow!(
        "this gpumeter-collector was built without the demo (cargo feature `demo`); run it from a source checkout: cargo run -p gpumeter-collector -- demo"
    )))
}

/// Writes the man pages of this binary into `dir`.
fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, roff) in gpumeter_telemetry::docs::man_pages(Cli::command())? {
        let path = dir.join(name);
        std::fs::write(&path, roff).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: 1,
            error: e.into(),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gpumeter-collector: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let _ = CLIENT.set((cli.ca_cert.clone(), cli.token_file.clone()));
    match rt.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("gpumeter-collector: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

fn write_out(text: &str, out: Option<&PathBuf>) -> Result<(), Failure> {
    match out {
        Some(p) => std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{text}"),
    }
    Ok(())
}

fn write_bytes(bytes: &[u8], out: Option<&PathBuf>) -> Result<(), Failure> {
    use std::io::Write;
    match out {
        Some(p) => std::fs::write(p, bytes).with_context(|| format!("writing {}", p.display()))?,
        None => std::io::stdout()
            .write_all(bytes)
            .context("writing to standard output")?,
    }
    Ok(())
}

async fn dispatch(cmd: Command) -> Result<(), Failure> {
    match cmd {
        Command::Serve {
            listen,
            db,
            collector_key,
            config,
            log_format,
            log_json,
            ca_dir,
            tls_cert,
            tls_key,
            client_ca,
            revoked,
            insecure,
            reports_dir,
            console_listen,
        } => {
            let cfg = match &config {
                Some(p) => CollectorConfig::load(p).map_err(|e| Failure {
                    code: 64,
                    error: e.into(),
                })?,
                None => CollectorConfig::default(),
            };
            let listen = listen.or(cfg.listen.clone()).ok_or_else(|| Failure {
                code: 64,
                error: anyhow::anyhow!(
                    "config field listen: give --listen ADDR or listen in the config file"
                ),
            })?;
            let db = db.or(cfg.db.clone()).ok_or_else(|| Failure {
                code: 64,
                error: anyhow::anyhow!("config field db: give --db PATH or db in the config file"),
            })?;
            let collector_key = collector_key.or(cfg.collector_key.clone());
            if gpumeter_collector::store::postgres::is_postgres_url(&db) && collector_key.is_none()
            {
                return Err(Failure {
                    code: 64,
                    error: anyhow::anyhow!(
                        "config field collector_key: a PostgreSQL db needs --collector-key PATH (or collector_key in the config file): the collector's signing key is kept in a file, never in the database"
                    ),
                });
            }
            let tls = serve_tls(TlsArgs {
                ca_dir,
                tls_cert,
                tls_key,
                client_ca,
                revoked,
                insecure,
            })?;
            gpumeter_telemetry::logging::init(if log_json {
                LogFormat::Json
            } else {
                log_format
            });
            let mut options = cfg.server_options();
            options.tls = tls;
            if let Some(dir) = &reports_dir {
                std::fs::create_dir_all(dir).map_err(|e| Failure {
                    code: 64,
                    error: anyhow::anyhow!("--reports-dir {}: {e}", dir.display()),
                })?;
            }
            options.reports_dir = reports_dir;
            if let Some(addr) = console_listen {
                let addr = addr.parse().map_err(|_| Failure {
                    code: 64,
                    error: anyhow::anyhow!(
                        "config field console_listen: --console-listen must be an address like 127.0.0.1:7443"
                    ),
                })?;
                options.console = Some(gpumeter_collector::server::ConsoleListen::Addr(addr));
            }
            if options.console.is_some() && options.tls.is_none() {
                return Err(Failure {
                    code: 64,
                    error: anyhow::anyhow!(
                        "config field console_listen: the console needs TLS (its cookie is Secure); it is not served with --insecure"
                    ),
                });
            }
            let store = gpumeter_collector::store::open_store(&db, collector_key.as_deref())
                .with_context(|| {
                    format!(
                        "opening {}",
                        gpumeter_collector::store::open::display_db(&db)
                    )
                })?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            gpumeter_collector::server::run(listener, store, options, async {
                // SIGTERM (systemd, docker, kill) stops as cleanly as Ctrl-C.
                let term = async {
                    use tokio::signal::unix::{SignalKind, signal};
                    match signal(SignalKind::terminate()) {
                        Ok(mut s) => {
                            s.recv().await;
                        }
                        Err(_) => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term => {}
                }
                tracing::info!("shutting down: ending sessions");
            })
            .await?;
            Ok(())
        }
        Command::Grants { command } => grants(command).await,
        Command::Ca { command } => ca(command),
        Command::Tokens { command } => tokens(command),
        Command::Report {
            period,
            trend,
            as_of,
            wide,
            program,
            grant,
            format,
            lang,
            view,
            idle_threshold,
            idle_days,
            out,
            sign,
            server,
        } => {
            let args = ReportArgs {
                period: period.unwrap_or_default(),
                trend,
                as_of,
                wide,
                program,
                grant,
                format,
                lang,
                view,
                idle_threshold,
                idle_days,
                out,
                sign,
                server,
            };
            report(args).await
        }
        Command::VerifyReport {
            file,
            server,
            db,
            heads,
        } => verify_report(&file, server, db, heads).await,
        Command::Idle {
            threshold,
            days,
            program,
            format,
            lang,
            server,
        } => {
            let mut c = query_client(&server).await?;
            let r = c
                .idle_grants(v1::IdleGrantsRequest {
                    threshold_pct: Some(threshold),
                    days: Some(days),
                    program: program.unwrap_or_default(),
                })
                .await
                .map_err(|s| refused("idle grants", s))?
                .into_inner();
            let idle = gpumeter_collector::query::idle_from_wire(&r);
            let text = match format {
                IdleFormat::Table => idle_table(&idle, lang == ReportLang::Ko),
                IdleFormat::Json => serde_json::to_string_pretty(&idle)? + "\n",
            };
            write_out(&text, None)
        }
        Command::Invoices {
            command:
                InvoicesCommand::Import {
                    file,
                    server,
                    dry_run,
                    actor,
                },
        } => {
            let csv = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut c = admin_client(&server).await?;
            let r = c
                .import_invoices(v1::ImportInvoicesRequest {
                    csv,
                    actor: actor_or_default(actor),
                    dry_run,
                })
                .await
                .map_err(|s| refused("invoice import", s))?
                .into_inner();
            if !r.errors.is_empty() {
                for e in &r.errors {
                    eprintln!("{}:{}: {}: {}", file.display(), e.line, e.field, e.message);
                }
                return Err(anyhow::anyhow!(
                    "{} problems in {}; nothing was imported",
                    r.errors.len(),
                    file.display()
                )
                .into());
            }
            println!(
                "{} invoices {}",
                r.invoices,
                if r.applied {
                    "imported"
                } else {
                    "valid (dry run, nothing stored)"
                }
            );
            Ok(())
        }
        Command::Agents {
            command:
                AgentsCommand::Register {
                    agent_id,
                    key,
                    reason,
                    actor,
                    server,
                },
        } => {
            ignored_actor(actor.as_deref());
            let public_key = hex::decode(key.trim()).map_err(|e| Failure {
                code: 2,
                error: anyhow::anyhow!("--key: not hex: {e}"),
            })?;
            let mut c = admin_client(&server).await?;
            let r = c
                .register_agent(v1::RegisterAgentRequest {
                    agent_id: agent_id.clone(),
                    public_key,
                    actor: String::new(),
                    reason,
                })
                .await
                .map_err(|s| refused("register", s))?
                .into_inner();
            println!(
                "agent {agent_id}: key {}",
                if r.created {
                    "pinned (new agent)"
                } else if r.replaced {
                    "replaced"
                } else {
                    "unchanged"
                }
            );
            Ok(())
        }
        Command::Compact {
            db,
            vacuum,
            per_block,
        } => {
            let url = db.to_string_lossy().to_string();
            let report = |done: gpumeter_collector::store::body_block::Compacted| {
                println!(
                    "compacted {} records of {} agents into {} blocks: {} bytes of bodies now {} bytes; {} prev_hashes restored from the record before instead of stored",
                    done.records,
                    done.agents,
                    done.blocks,
                    done.body_bytes,
                    done.block_bytes,
                    done.links_dropped
                );
            };
            if gpumeter_collector::store::postgres::is_postgres_url(&url) {
                let store = gpumeter_collector::store::postgres::PgStore::open(&url, None)?;
                report(store.compact_verbatim(per_block as usize)?);
                if vacuum {
                    store.vacuum()?;
                    println!("vacuumed: the freed space in records is reusable");
                }
                return Ok(());
            }
            if !db.exists() {
                return Err(Failure {
                    code: 2,
                    error: anyhow::anyhow!("--db {}: no such ledger file", db.display()),
                });
            }
            let store = gpumeter_collector::store::sqlite::SqliteStore::open(&db)?;
            let before = file_len(&db);
            report(store.compact_verbatim(per_block as usize)?);
            if vacuum {
                store.vacuum()?;
                println!("vacuumed: {} bytes before, {} after", before, file_len(&db));
            }
            Ok(())
        }
        Command::Retain {
            db,
            max_age_days,
            now,
            collector_key,
            archive,
            vacuum,
            json,
        } => {
            if let Some(path) = archive.as_ref().filter(|p| p.exists()) {
                return Err(usage(anyhow::anyhow!(
                    "--archive {}: the file exists; an archive is never overwritten",
                    path.display()
                )));
            }
            let now = match now {
                Some(t) => parse_as_of(&t)?,
                None => gpumeter_collector::ingest::now_ms(),
            };
            let is_pg = gpumeter_collector::store::postgres::is_postgres_url(&db);
            if is_pg && collector_key.is_none() {
                return Err(usage(anyhow::anyhow!(
                    "--collector-key PATH: a PostgreSQL db needs the collector's signing key, kept in a file, to sign the head retention runs under"
                )));
            }
            if !is_pg && !std::path::Path::new(&db).exists() {
                return Err(Failure {
                    code: 2,
                    error: anyhow::anyhow!("--db {db}: no such ledger file"),
                });
            }
            let store = gpumeter_collector::store::open_store(&db, collector_key.as_deref())?;
            let req = gpumeter_collector::retention::RetainRequest {
                horizon_ms: gpumeter_collector::retention::horizon(now, max_age_days),
                at_ms: gpumeter_collector::ingest::now_ms(),
                actor: "gpumeter-collector retain".into(),
                edges: store
                    .grants()?
                    .iter()
                    .flat_map(|g| {
                        g.cards.iter().flat_map(move |c| {
                            let (from, until) = g.card_interval(c);
                            [(c.gpu_uuid.clone(), from), (c.gpu_uuid.clone(), until)]
                        })
                    })
                    .collect(),
            };
            let done = store.retain(&req)?;
            drop(store);
            let archived = match &archive {
                Some(path) => {
                    let ranges: Vec<(String, u64, u64)> = done
                        .cuts
                        .iter()
                        .map(|c| (c.agent_id.clone(), c.above, c.cut))
                        .collect();
                    let ledger = gpumeter_collector::store::open_ledger(&db)?;
                    let written = gpumeter_collector::archive::write(
                        ledger.source(),
                        path,
                        &ranges,
                        (done.horizon_ms, done.head_id, req.at_ms),
                    )
                    .map_err(|e| anyhow::anyhow!("--archive {}: {e}", path.display()))?;
                    Some(written)
                }
                None => None,
            };
            if vacuum && !is_pg {
                gpumeter_collector::store::sqlite::SqliteStore::open(std::path::Path::new(&db))?
                    .vacuum()?;
            }
            if json {
                let mut v = serde_json::to_value(&done).map_err(anyhow::Error::from)?;
                v["archive"] = serde_json::to_value(&archived).map_err(anyhow::Error::from)?;
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).map_err(anyhow::Error::from)?
                );
            } else {
                if let (Some(a), Some(path)) = (&archived, &archive) {
                    println!(
                        "archived {} records and {} checkpoints to {} ({} bytes)",
                        a.records,
                        a.checkpoints,
                        path.display(),
                        a.bytes
                    );
                }
                println!(
                    "raw windows before {} retained as rollups only (under head {}): {} agents' cuts moved, {} window rows dropped, {} card-hours pinned",
                    gpumeter_collector::retention::kst(done.horizon_ms),
                    done.head_id,
                    done.cuts.len(),
                    done.windows_dropped,
                    done.pins_added
                );
            }
            Ok(())
        }
        Command::Verify {
            server,
            db,
            heads,
            archive,
            json,
        } => {
            let heads = match &heads {
                Some(path) => gpumeter_collector::heads::read_heads_file(path)
                    .map_err(|e| anyhow::anyhow!("--heads: {e}"))?,
                None => Vec::new(),
            };
            let mut archives = Vec::new();
            let reply = match (server, db) {
                (Some(server), _) => {
                    let mut c = query_client(&server)
                        .await?
                        .max_decoding_message_size(64 << 20);
                    c.verify(v1::VerifyRequest {
                        agent_id: String::new(),
                        heads: heads
                            .iter()
                            .map(gpumeter_collector::convert::head_to_wire)
                            .collect(),
                    })
                    .await
                    .map_err(|s| refused("verify", s))?
                    .into_inner()
                }
                (None, Some(db)) => {
                    let opened = gpumeter_collector::store::open_ledger(&db)?;
                    let ledger = opened.source();
                    let started = std::time::Instant::now();
                    let mut report = gpumeter_collector::verify::verify(ledger)?;
                    report.heads = gpumeter_collector::heads::verify_heads(&heads, ledger)?;
                    report.ok &= report.heads.is_empty();
                    for path in &archive {
                        archives.push(gpumeter_collector::archive::check(ledger, path)?);
                    }
                    eprintln!("verified in {:.2} s", started.elapsed().as_secs_f64());
                    gpumeter_collector::query::report_to_wire(&report)
                }
                (None, None) => {
                    return Err(Failure {
                        code: 2,
                        error: anyhow::anyhow!("give --server URL or --db PATH"),
                    });
                }
            };
            let archives_ok = archives.iter().all(|a| a.findings.is_empty());
            if json && archive.is_empty() {
                println!("{}", verify_json(&reply));
            } else if json {
                let mut v: serde_json::Value =
                    serde_json::from_str(&verify_json(&reply)).map_err(anyhow::Error::from)?;
                v["archives"] = serde_json::to_value(&archives).map_err(anyhow::Error::from)?;
                v["ok"] = (reply.ok && archives_ok).into();
                println!("{v}");
            } else {
                print!("{}", render_verify(&reply));
                for a in &archives {
                    if a.findings.is_empty() {
                        println!(
                            "archive {}: {} records and {} checkpoints of {} agents: every chain and signature verifies, and every record is the ledger's",
                            a.path, a.records, a.checkpoints, a.agents
                        );
                    } else {
                        println!("archive {}: {} problems", a.path, a.findings.len());
                        for f in &a.findings {
                            println!("  {f}");
                        }
                    }
                }
            }
            if !reply.ok {
                Err(anyhow::anyhow!("the ledger does not verify").into())
            } else if !archives_ok {
                Err(anyhow::anyhow!("an archive does not verify against the ledger").into())
            } else {
                Ok(())
            }
        }
        Command::Heads {
            since,
            out,
            server,
            db,
        } => {
            let since_ms = match since.as_deref() {
                None => 0,
                Some(s) => parse_valid_from(s.trim())
                    .map_err(|e| usage(anyhow::anyhow!("--since: {e}")))?,
            };
            let heads = match (server, db) {
                (Some(server), _) => {
                    let mut c = query_client(&server)
                        .await?
                        .max_decoding_message_size(64 << 20);
                    c.heads(v1::HeadsRequest {
                        since_unix_ms: since_ms,
                        sign_now: true,
                    })
                    .await?
                    .into_inner()
                    .heads
                    .into_iter()
                    .map(gpumeter_collector::convert::head_from_wire)
                    .collect::<Vec<_>>()
                }
                (None, Some(db)) => gpumeter_collector::store::open_ledger(&db)?.heads(since_ms)?,
                (None, None) => {
                    return Err(usage(anyhow::anyhow!("give --server URL or --db PATH")));
                }
            };
            let n = gpumeter_collector::heads::append_heads(&out, &heads)
                .map_err(|e| anyhow::anyhow!(e))?;
            println!(
                "{n} new heads appended to {} (latest: {})",
                out.display(),
                heads
                    .last()
                    .map(|h| format!(
                        "head {} over {} agents, root {}",
                        h.id,
                        h.agents,
                        hex::encode(&h.root)
                    ))
                    .unwrap_or_else(|| "none".into())
            );
            Ok(())
        }
        Command::Alarms {
            agent,
            json,
            server,
        } => {
            let mut c = query_client(&server).await?;
            let mut stream = c
                .stream_alarms(v1::AlarmsRequest {
                    agent_id: agent.unwrap_or_default(),
                })
                .await
                .map_err(|s| refused("alarms", s))?
                .into_inner();
            let mut alarms = Vec::new();
            while let Some(a) = stream.message().await.map_err(|s| refused("alarms", s))? {
                alarms.push(a);
            }
            let text = if json {
                listing::alarms_json(&alarms)?
            } else {
                listing::alarms_table(&alarms)
            };
            write_out(&text, None)
        }
        Command::Events {
            period,
            agent,
            gpu,
            kind,
            json,
            server,
        } => {
            // As the agent reported it: the ledger is searched, not a grant validated.
            let gpu_uuid = gpu.map(|g| g.trim().to_owned());
            let mut c = query_client(&server).await?;
            let mut stream = c
                .stream_events(v1::EventsRequest {
                    period: period_or_default(period),
                    kind: kind.unwrap_or_default(),
                    gpu_uuid: gpu_uuid.unwrap_or_default(),
                    agent_id: agent.unwrap_or_default(),
                })
                .await
                .map_err(|s| refused("events", s))?
                .into_inner();
            let mut events = Vec::new();
            while let Some(e) = stream.message().await.map_err(|s| refused("events", s))? {
                events.push(e);
            }
            let text = if json {
                listing::events_json(&events)?
            } else {
                listing::events_table(&events)
            };
            write_out(&text, None)
        }
        Command::Timeline {
            gpu,
            period,
            json,
            server,
        } => {
            let gpu_uuid = gpu.trim().to_owned();
            // A month of one-minute windows is several MiB: more than the usual reply limit.
            let mut c = query_client(&server)
                .await?
                .max_decoding_message_size(256 << 20);
            let t = c
                .card_timeline(v1::CardTimelineRequest {
                    gpu_uuid,
                    period: period_or_default(period),
                })
                .await
                .map_err(|s| refused("timeline", s))?
                .into_inner();
            let text = if json {
                listing::timeline_json(&t)?
            } else {
                listing::timeline_table(&t)
            };
            write_out(&text, None)
        }
        Command::Violations {
            period,
            grant,
            json,
            server,
        } => {
            let mut c = query_client(&server).await?;
            let mut stream = c
                .stream_violations(v1::ViolationsRequest {
                    period: period_or_default(period),
                    grant_id: grant.unwrap_or_default(),
                })
                .await
                .map_err(|s| refused("violations", s))?
                .into_inner();
            let mut events = Vec::new();
            while let Some(e) = stream
                .message()
                .await
                .map_err(|s| refused("violations", s))?
            {
                events.push(e);
            }
            let text = if json {
                listing::violations_json(&events)?
            } else {
                listing::violations_table(&events)
            };
            write_out(&text, None)
        }
        Command::Hosts {
            command:
                Some(HostsCommand::MoveCard {
                    gpu_uuid,
                    to_host,
                    reason,
                    actor,
                    server,
                }),
            ..
        } => {
            let mut c = admin_client(&server).await?;
            let r = c
                .move_host_card(v1::MoveHostCardRequest {
                    gpu_uuid,
                    to_host_id: to_host,
                    actor: actor_or_default(actor),
                    reason,
                })
                .await
                .map_err(|s| refused("move-card", s))?
                .into_inner();
            println!(
                "card {} moved from host {} to host {} (by {}, at {})",
                r.gpu_uuid,
                if r.from_host_id.is_empty() {
                    "-"
                } else {
                    &r.from_host_id
                },
                r.to_host_id,
                r.actor,
                kst(r.at_unix_ms)
            );
            Ok(())
        }
        Command::Providers { command } => registry_cli::providers(command).await,
        Command::Hosts {
            command:
                Some(HostsCommand::Register {
                    host_id,
                    csp,
                    server,
                }),
            ..
        } => {
            registry_cli::hosts(registry_cli::HostsRegistry::Register {
                host_id,
                csp,
                server,
            })
            .await
        }
        Command::Hosts {
            command:
                Some(HostsCommand::Import {
                    file,
                    server,
                    dry_run,
                }),
            ..
        } => {
            registry_cli::hosts(registry_cli::HostsRegistry::Import {
                file,
                server,
                dry_run,
            })
            .await
        }
        Command::Hosts {
            command: Some(HostsCommand::Registered { server, json }),
            ..
        } => registry_cli::hosts(registry_cli::HostsRegistry::List { server, json }).await,
        Command::Hosts {
            server: None,
            command: None,
            ..
        } => Err(usage(anyhow::anyhow!(
            "hosts: give --server URL (or a subcommand: move-card)"
        ))),
        Command::Hosts {
            server: Some(server),
            json,
            command: None,
        } => {
            let mut c = query_client(&server).await?;
            let mut stream = c
                .stream_hosts(v1::HostsRequest {})
                .await
                .map_err(|s| refused("hosts", s))?
                .into_inner();
            let mut hosts = Vec::new();
            while let Some(h) = stream.message().await.map_err(|s| refused("hosts", s))? {
                hosts.push(h);
            }
            let now = gpumeter_collector::ingest::now_ms();
            let text = if json {
                listing::hosts_json(&hosts, now)?
            } else {
                listing::hosts_table(&hosts, now)
            };
            write_out(&text, None)
        }
        Command::Demo { minutes, speed, db } => {
            if minutes == 0 || minutes > 24 * 60 || !(speed > 0.0 && speed <= 10_000.0) {
                return Err(Failure {
                    code: 2,
                    error: anyhow::anyhow!("--minutes must be 1..=1440 and --speed in (0, 10000]"),
                });
            }
            if db.as_deref().is_some_and(|d| {
                gpumeter_collector::store::postgres::is_postgres_url(&d.to_string_lossy())
            }) {
                return Err(usage(anyhow::anyhow!(
                    "--db: the demo keeps its ledger in a SQLite file; serve runs on PostgreSQL"
                )));
            }
            demo(minutes, speed, db).await
        }
        Command::Man { out } => Ok(write_man_pages(&out)?),
        Command::ConfigReference => {
            print!("{}", gpumeter_collector::config::reference());
            Ok(())
        }
        Command::Completions { shell } => {
            gpumeter_telemetry::docs::completions(shell, Cli::command(), &mut std::io::stdout())
                .context("writing the completion script")?;
            Ok(())
        }
        Command::Top {
            server,
            program,
            grant,
            host,
            group,
            sort,
            once,
            json,
        } => {
            use gpumeter_collector::top::{self, TopError};
            let auth = client_auth()?;
            warn_clear_text(&server, &auth);
            let q = v1::WatchRequest {
                program: program.unwrap_or_default(),
                grant_id: grant.unwrap_or_default(),
                host_id: host.unwrap_or_default(),
            };
            let failed = |e: TopError| match e {
                TopError::Client(c) => client_failure(c),
                other => Failure {
                    code: 1,
                    error: other.into(),
                },
            };
            if once || json {
                let m = top::snapshot(&server, &auth, &q).await.map_err(failed)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&top::json(&m))?);
                } else {
                    print!("{}", top::text(&m, &server, group, sort, false));
                }
                return Ok(());
            }
            top::run(&server, &auth, &q, group, sort)
                .await
                .map_err(failed)
        }
    }
}

/// `--actor` is accepted for old scripts and ignored: the collector records the name of the
/// token that made a change, never what a caller says.
fn actor_or_default(actor: Option<String>) -> String {
    ignored_actor(actor.as_deref());
    String::new()
}

fn ignored_actor(actor: Option<&str>) {
    if actor.is_some() {
        eprintln!("gpumeter-collector: --actor is ignored; the collector records the token's name");
    }
}

fn usage(error: anyhow::Error) -> Failure {
    Failure { code: 2, error }
}

/// `--at`: `now` (absent, so the collector's clock decides), an RFC 3339 timestamp, or a
/// Korean calendar day meaning its first instant.
fn parse_at(at: &str) -> Result<Option<i64>, Failure> {
    let at = at.trim();
    if at == "now" {
        return Ok(None);
    }
    parse_valid_from(at)
        .map(Some)
        .map_err(|e| usage(anyhow::anyhow!("--at: {e}, or now")))
}

/// `--period` of the listings, or the last 30 Korean calendar days.
fn period_or_default(period: Option<String>) -> String {
    period.unwrap_or_else(|| listing::last_days(gpumeter_collector::ingest::now_ms(), 30))
}

fn parse_card(flag: &str, uuid: &str) -> Result<String, Failure> {
    parse_gpu_uuid(uuid.trim()).map_err(|e| usage(anyhow::anyhow!("{flag}: {e}")))
}

/// A refusal or failure from the collector, as the operator should read it.
fn refused(what: &str, s: tonic::Status) -> Failure {
    let error = match s.code() {
        tonic::Code::InvalidArgument
        | tonic::Code::FailedPrecondition
        | tonic::Code::NotFound
        | tonic::Code::PermissionDenied
        | tonic::Code::Unauthenticated => anyhow::anyhow!("{what} refused: {}", s.message()),
        _ => anyhow::anyhow!("{what} failed: {} ({:?})", s.message(), s.code()),
    };
    Failure { code: 1, error }
}

/// An Admin client with the command line's CA and token.
async fn admin_client(
    server: &str,
) -> Result<v1::admin_client::AdminClient<gpumeter_collector::client::AuthChannel>, Failure> {
    let auth = client_auth()?;
    warn_clear_text(server, &auth);
    gpumeter_collector::client::admin(server, &auth)
        .await
        .map_err(client_failure)
}

/// A client that cannot start for want of configuration exits 64; one that cannot reach
/// the collector, 1.
fn client_failure(e: gpumeter_collector::client::ClientError) -> Failure {
    use gpumeter_collector::client::ClientError;
    let code = match e {
        ClientError::Connect { .. } => 1,
        _ => 64,
    };
    Failure {
        code,
        error: e.into(),
    }
}

fn warn_clear_text(server: &str, auth: &gpumeter_collector::client::ClientAuth) {
    if server.starts_with("http://") && auth.token.is_some() {
        eprintln!(
            "gpumeter-collector: warning: {server} is not TLS; the token travels in clear text"
        );
    }
}

/// `serve`'s TLS flags.
struct TlsArgs {
    ca_dir: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    revoked: Option<PathBuf>,
    insecure: bool,
}

/// The server's TLS from its flags; refuses (exit 64) to serve without TLS unless
/// `--insecure` says so.
fn serve_tls(a: TlsArgs) -> Result<Option<Arc<gpumeter_collector::auth::tls::ServerTls>>, Failure> {
    use gpumeter_collector::auth::tls::{ServerTls, TlsFiles};
    let bad = |error: anyhow::Error| Failure { code: 64, error };
    let any_file = a.ca_dir.is_some()
        || a.tls_cert.is_some()
        || a.tls_key.is_some()
        || a.client_ca.is_some()
        || a.revoked.is_some();
    if a.insecure {
        if any_file {
            return Err(bad(anyhow::anyhow!(
                "--insecure serves without TLS; drop it or the TLS flags"
            )));
        }
        return Ok(None);
    }
    let base = a.ca_dir.as_deref().map(TlsFiles::from_ca_dir);
    let pick = |flag: Option<PathBuf>, from_dir: Option<PathBuf>, name: &str| {
        flag.or(from_dir).ok_or_else(|| {
            bad(anyhow::anyhow!(
                "no TLS material: pass --ca-dir DIR (made by `gpumeter-collector ca init` and `ca issue-server`), or --tls-cert, --tls-key and --client-ca ({name} is missing); --insecure serves without TLS"
            ))
        })
    };
    let files = TlsFiles {
        cert: pick(
            a.tls_cert,
            base.as_ref().map(|b| b.cert.clone()),
            "--tls-cert",
        )?,
        key: pick(a.tls_key, base.as_ref().map(|b| b.key.clone()), "--tls-key")?,
        client_ca: pick(
            a.client_ca,
            base.as_ref().map(|b| b.client_ca.clone()),
            "--client-ca",
        )?,
        revoked: a.revoked.or(base.and_then(|b| b.revoked)),
    };
    let tls = ServerTls::load(&files).map_err(|e| bad(e.into()))?;
    Ok(Some(Arc::new(tls)))
}

fn ca_failure(e: gpumeter_collector::auth::ca::CaError) -> Failure {
    use gpumeter_collector::auth::ca::CaError;
    let code = match e {
        CaError::Invalid { .. } => 2,
        CaError::NoCa { .. } | CaError::Exists { .. } => 64,
        _ => 1,
    };
    Failure {
        code,
        error: e.into(),
    }
}

fn ca(command: CaCommand) -> Result<(), Failure> {
    use gpumeter_collector::auth::ca::{self, CaDir};
    match command {
        CaCommand::Init { ca_dir, days } => {
            let dir = CaDir::new(&ca_dir);
            ca::init(&dir, days).map_err(ca_failure)?;
            println!(
                "CA made in {}: ca.pem (give it to agents and people), ca.key (0600; keep it safe)\nnext: gpumeter-collector ca issue-server --ca-dir {} --dns NAME --ip ADDR",
                ca_dir.display(),
                ca_dir.display()
            );
            Ok(())
        }
        CaCommand::IssueAgent {
            ca_dir,
            agent_id,
            host_id,
            out,
            days,
        } => {
            let dir = CaDir::new(&ca_dir);
            let (cert, key, issued) =
                ca::issue_agent(&dir, &agent_id, &host_id, days, out.as_deref())
                    .map_err(ca_failure)?;
            println!(
                "agent {agent_id} on host {host_id}: serial {}\n  {}\n  {} (0600)\ncopy both and {} to the host; in agent.toml [collector]: url = \"https://…\", ca_cert, client_cert, client_key",
                issued.serial,
                cert.display(),
                key.display(),
                dir.ca_cert().display()
            );
            Ok(())
        }
        CaCommand::IssueServer {
            ca_dir,
            dns,
            ip,
            days,
        } => {
            let dir = CaDir::new(&ca_dir);
            let issued = ca::issue_server(&dir, &dns, &ip, days).map_err(ca_failure)?;
            println!(
                "server certificate serial {}: {} and {} (0600)\nserve with: gpumeter-collector serve --ca-dir {} --listen ADDR --db PATH",
                issued.serial,
                dir.server_cert().display(),
                dir.server_key().display(),
                ca_dir.display()
            );
            Ok(())
        }
        CaCommand::Revoke {
            ca_dir,
            serial,
            reason,
        } => {
            let dir = CaDir::new(&ca_dir);
            let added = ca::revoke(&dir.revoked(), &serial, &reason).map_err(ca_failure)?;
            println!(
                "{}: {}",
                serial,
                if added {
                    "revoked; refused from the next handshake"
                } else {
                    "was already revoked"
                }
            );
            Ok(())
        }
    }
}

fn tokens(command: TokensCommand) -> Result<(), Failure> {
    use gpumeter_collector::auth::tokens::{self, Role};
    use gpumeter_collector::store::Store;
    use gpumeter_collector::store::open::display_db;
    let open = |db: &str| -> Result<Arc<dyn Store>, Failure> {
        if !gpumeter_collector::store::postgres::is_postgres_url(db)
            && !std::path::Path::new(db).exists()
        {
            return Err(Failure {
                code: 64,
                error: anyhow::anyhow!("--db {db}: no such database"),
            });
        }
        Ok(gpumeter_collector::store::open_store(db, None)
            .with_context(|| format!("opening {}", display_db(db)))?)
    };
    let now = gpumeter_collector::ingest::now_ms();
    match command {
        TokensCommand::Create { role, name, db } => {
            if !tokens::valid_name(&name) {
                return Err(usage(anyhow::anyhow!(
                    "--name: 1-64 letters, digits, '-', '_', '.', '@'"
                )));
            }
            let role = match role {
                TokenRole::Auditor => Role::Auditor,
                TokenRole::Admin => Role::Admin,
            };
            // Bootstrapping: the first token is made before the collector ever ran.
            let store = gpumeter_collector::store::open_store(&db, None)
                .with_context(|| format!("opening {}", display_db(&db)))?;
            let token = tokens::create(store.as_ref(), &name, role, now)?;
            eprintln!(
                "token {name} ({}) made; it is shown once, only its hash is kept:",
                role.as_str()
            );
            println!("{token}");
            Ok(())
        }
        TokensCommand::List { db } => {
            let store = open(&db)?;
            for t in store.tokens()? {
                println!(
                    "{}\t{}\tcreated {}\t{}",
                    t.name,
                    t.role,
                    kst(t.created_ms),
                    t.revoked_ms
                        .map_or("active".to_string(), |r| format!("revoked {}", kst(r)))
                );
            }
            Ok(())
        }
        TokensCommand::Revoke { name, db } => {
            let store = open(&db)?;
            let changed = store.revoke_token(&name, now)?;
            println!(
                "token {name}: {}",
                if changed {
                    "revoked"
                } else {
                    "was already revoked"
                }
            );
            Ok(())
        }
    }
}

fn kst(ms: i64) -> String {
    fmt_kst(ms)
}

#[derive(serde::Serialize)]
struct CardJson<'a> {
    host_id: &'a str,
    gpu_uuid: &'a str,
    /// The card's own start when it was moved in; null: the grant's start.
    from_unix_ms: Option<i64>,
    /// The card's own end when it was moved out; null: the grant's end.
    until_unix_ms: Option<i64>,
}

#[derive(serde::Serialize)]
struct GrantJson<'a> {
    grant_id: &'a str,
    program: &'a str,
    grantee: &'a str,
    principal: &'a str,
    csp: &'a str,
    valid_from_unix_ms: i64,
    /// Exclusive.
    valid_until_unix_ms: i64,
    revoked_at_unix_ms: Option<i64>,
    cards: Vec<CardJson<'a>>,
}

impl<'a> From<&'a v1::Grant> for GrantJson<'a> {
    fn from(g: &'a v1::Grant) -> Self {
        GrantJson {
            grant_id: &g.grant_id,
            program: &g.program,
            grantee: &g.grantee,
            principal: &g.principal,
            csp: &g.csp,
            valid_from_unix_ms: g.valid_from_unix_ms,
            valid_until_unix_ms: g.valid_until_unix_ms,
            revoked_at_unix_ms: g.revoked.then_some(g.revoked_at_unix_ms),
            cards: g
                .cards
                .iter()
                .map(|c| CardJson {
                    host_id: &c.host_id,
                    gpu_uuid: &c.gpu_uuid,
                    from_unix_ms: c.from_unix_ms,
                    until_unix_ms: c.until_unix_ms,
                })
                .collect(),
        }
    }
}

#[derive(serde::Serialize)]
struct ChangeJson<'a> {
    at_unix_ms: i64,
    actor: &'a str,
    action: &'a str,
    detail: &'a str,
}

impl<'a> From<&'a v1::GrantChange> for ChangeJson<'a> {
    fn from(c: &'a v1::GrantChange) -> Self {
        ChangeJson {
            at_unix_ms: c.at_unix_ms,
            actor: &c.actor,
            action: &c.action,
            detail: &c.detail,
        }
    }
}

/// `grants show` as text: the grant, each card with when it belonged, then the history.
fn show_text(g: &v1::Grant, history: &[v1::GrantChange]) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<12} {v}\n"));
    line("grant_id", g.grant_id.clone());
    line("program", g.program.clone());
    line("grantee", g.grantee.clone());
    line("principal", g.principal.clone());
    line("csp", g.csp.clone());
    line("valid_from", kst(g.valid_from_unix_ms));
    line(
        "valid_until",
        format!("{} (exclusive)", kst(g.valid_until_unix_ms)),
    );
    line(
        "revoked_at",
        if g.revoked {
            kst(g.revoked_at_unix_ms)
        } else {
            "-".to_string()
        },
    );
    out.push_str("cards:\n");
    for c in &g.cards {
        let from = c.from_unix_ms.map_or("grant start".to_string(), kst);
        let until = c.until_unix_ms.map_or("grant end".to_string(), kst);
        out.push_str(&format!(
            "  {}\t{}\tfrom {from}\tuntil {until}\n",
            c.host_id, c.gpu_uuid
        ));
    }
    out.push_str("history:\n");
    for h in history {
        out.push_str(&format!(
            "  {}\t{}\t{}\t{}\n",
            kst(h.at_unix_ms),
            h.actor,
            h.action,
            h.detail
        ));
    }
    out
}

/// Prints what an amendment did.
fn print_amended(r: v1::AmendGrantReply) {
    let id = r.grant.map(|g| g.grant_id).unwrap_or_default();
    match r.change {
        Some(c) => println!(
            "{} {id}: {} (by {}, at {})",
            c.action,
            c.detail,
            c.actor,
            kst(c.at_unix_ms)
        ),
        None => println!("amended {id}"),
    }
}

async fn grants(command: GrantsCommand) -> Result<(), Failure> {
    match command {
        GrantsCommand::Import {
            file,
            server,
            dry_run,
            actor,
        } => {
            let csv = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut c = admin_client(&server).await?;
            let r = c
                .import_grants(v1::ImportGrantsRequest {
                    csv,
                    actor: actor_or_default(actor),
                    dry_run,
                })
                .await
                .map_err(|s| refused("import", s))?
                .into_inner();
            for w in &r.warnings {
                eprintln!(
                    "warning: {}:{}: field {}: {}",
                    file.display(),
                    w.line,
                    w.field,
                    w.message
                );
            }
            if !r.errors.is_empty() {
                for e in &r.errors {
                    eprintln!(
                        "error: {}:{}: field {}: {}",
                        file.display(),
                        e.line,
                        e.field,
                        e.message
                    );
                }
                return Err(anyhow::anyhow!("{} errors; nothing imported", r.errors.len()).into());
            }
            println!(
                "{} {} grants ({} cards)",
                if r.applied { "imported" } else { "validated" },
                r.grants,
                r.cards
            );
            Ok(())
        }
        GrantsCommand::List {
            server,
            program,
            json,
        } => {
            let mut c = admin_client(&server).await?;
            let mut stream = c
                .stream_grants(v1::ListGrantsRequest { program })
                .await
                .map_err(|s| refused("list", s))?
                .into_inner();
            let mut grants = Vec::new();
            while let Some(g) = stream.message().await.map_err(|s| refused("list", s))? {
                grants.push(g);
            }
            if json {
                let all: Vec<GrantJson> = grants.iter().map(GrantJson::from).collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(());
            }
            for g in grants {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{} cards{}",
                    g.grant_id,
                    g.program,
                    g.grantee,
                    g.principal,
                    g.csp,
                    g.cards.len(),
                    if g.revoked { "\trevoked" } else { "" }
                );
            }
            Ok(())
        }
        GrantsCommand::Show {
            grant_id,
            server,
            json,
        } => {
            let mut c = admin_client(&server).await?;
            let r = c
                .get_grant(v1::GetGrantRequest {
                    grant_id: grant_id.clone(),
                })
                .await
                .map_err(|s| refused("show", s))?
                .into_inner();
            let g = r
                .grant
                .ok_or_else(|| anyhow::anyhow!("collector answered without grant {grant_id}"))?;
            if json {
                let v = serde_json::json!({
                    "grant": GrantJson::from(&g),
                    "history": r.history.iter().map(ChangeJson::from).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", show_text(&g, &r.history));
            }
            Ok(())
        }
        GrantsCommand::Revoke {
            grant_id,
            at,
            reason,
            server,
            actor,
        } => {
            let at_unix_ms = parse_at(&at)?;
            let mut c = admin_client(&server).await?;
            let r = c
                .revoke_grant(v1::RevokeGrantRequest {
                    grant_id,
                    at_unix_ms,
                    actor: actor_or_default(actor),
                    reason,
                })
                .await
                .map_err(|s| refused("revoke", s))?;
            print_amended(r.into_inner());
            Ok(())
        }
        GrantsCommand::Extend {
            grant_id,
            until,
            server,
            actor,
        } => {
            // Checked here too so that a typo is a usage error, not a refused change.
            parse_valid_until(until.trim()).map_err(|e| usage(anyhow::anyhow!("--until: {e}")))?;
            let mut c = admin_client(&server).await?;
            let r = c
                .extend_grant(v1::ExtendGrantRequest {
                    grant_id,
                    valid_until: until,
                    actor: actor_or_default(actor),
                })
                .await
                .map_err(|s| refused("extend", s))?;
            print_amended(r.into_inner());
            Ok(())
        }
        GrantsCommand::Move {
            grant_id,
            card,
            to_host,
            to_card,
            at,
            server,
            actor,
        } => {
            let from_gpu_uuid = parse_card("--card", &card)?;
            let to_gpu_uuid = parse_card("--to-card", &to_card)?;
            if to_host.trim().is_empty() {
                return Err(usage(anyhow::anyhow!("--to-host: must not be empty")));
            }
            let at_unix_ms = parse_at(&at)?;
            let mut c = admin_client(&server).await?;
            let r = c
                .move_card(v1::MoveCardRequest {
                    grant_id,
                    from_gpu_uuid,
                    to_host_id: to_host,
                    to_gpu_uuid,
                    at_unix_ms,
                    actor: actor_or_default(actor),
                })
                .await
                .map_err(|s| refused("move", s))?;
            print_amended(r.into_inner());
            Ok(())
        }
    }
}

fn render_verify(r: &v1::VerifyReply) -> String {
    let mut out = String::new();
    for a in &r.agents {
        out.push_str(&format!(
            "{}: {} records (seq {}..={}), {} checkpoints: {}\n",
            a.agent_id,
            a.records,
            a.first_seq,
            a.last_seq,
            a.checkpoints,
            if a.findings.is_empty() {
                "ok"
            } else {
                "FAILED"
            }
        ));
        for f in &a.findings {
            out.push_str(&format!("  - {} [{}]\n", f.detail, f.kind));
        }
        for f in &a.flagged {
            out.push_str(&format!(
                "  * flagged, counted in no figure: {}\n",
                f.detail
            ));
        }
    }
    for h in &r.head_findings {
        out.push_str(&format!(
            "head {}: {} [{}{}]\n",
            h.head_id,
            h.detail,
            h.kind,
            if h.agent_id.is_empty() {
                String::new()
            } else {
                format!(", agent {} seq {}", h.agent_id, h.seq)
            }
        ));
    }
    out.push_str(&format!(
        "{} agents, {} records: {}\n",
        r.agents.len(),
        r.records,
        if r.ok {
            "every chain and signature verifies"
        } else {
            "VERIFICATION FAILED"
        }
    ));
    out
}

fn verify_json(r: &v1::VerifyReply) -> String {
    let agents: Vec<serde_json::Value> = r
        .agents
        .iter()
        .map(|a| {
            serde_json::json!({
                "agent_id": a.agent_id,
                "records": a.records,
                "first_seq": a.first_seq,
                "last_seq": a.last_seq,
                "checkpoints": a.checkpoints,
                "findings": a.findings.iter().map(|f| serde_json::json!({
                    "kind": f.kind, "seq": f.seq, "from_seq": f.from_seq, "to_seq": f.to_seq, "detail": f.detail,
                })).collect::<Vec<_>>(),
                "flagged": a.flagged.iter().map(|f| serde_json::json!({
                    "kind": f.kind, "seq": f.seq, "detail": f.detail,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let heads: Vec<serde_json::Value> = r
        .head_findings
        .iter()
        .map(|h| serde_json::json!({"head_id": h.head_id, "agent_id": h.agent_id, "seq": h.seq, "kind": h.kind, "detail": h.detail}))
        .collect();
    serde_json::to_string_pretty(
        &serde_json::json!({"ok": r.ok, "records": r.records, "agents": agents, "heads": heads}),
    )
    .unwrap_or_default()
}

#[derive(Subcommand)]
enum InvoicesCommand {
    /// Import invoices from CSV: csp,grant_id,period,billed_gpu_hours (period YYYY-MM). All or
    /// nothing; a re-sent invoice for the same CSP, grant and month supersedes the earlier.
    Import {
        file: PathBuf,
        #[arg(long)]
        server: String,
        #[arg(long)]
        dry_run: bool,
        /// Who is importing [default: $USER, or admin].
        #[arg(long)]
        actor: Option<String>,
    },
}

/// `report`'s flags.
struct ReportArgs {
    period: String,
    trend: Option<String>,
    as_of: Option<String>,
    wide: bool,
    program: Option<String>,
    grant: Option<String>,
    format: Format,
    lang: ReportLang,
    view: View,
    idle_threshold: f64,
    idle_days: u32,
    out: Option<PathBuf>,
    sign: bool,
    server: String,
}

/// The provenance name of a report format (what `provenance::render` renders again).
fn format_name(f: Format, width: gpumeter_collector::report::Width) -> &'static str {
    match f {
        Format::Table if width == gpumeter_collector::report::Width::Wide => "table-wide",
        Format::Table => "table",
        Format::Csv => "csv",
        Format::Json => "json",
        Format::Focus => "focus",
        Format::Html | Format::Pdf => "html",
    }
}

/// The `ReconcileRequest` a report's provenance names.
fn query_of(p: &gpumeter_collector::provenance::Provenance) -> v1::ReconcileRequest {
    v1::ReconcileRequest {
        period: p.period.clone(),
        program: p.program.clone(),
        grant_id: p.grant_id.clone(),
        idle_threshold_pct: Some(p.idle_threshold_pct),
        idle_days: Some(p.idle_days),
        as_of_head: p.head_id,
        as_of_unix_ms: p.as_of_ms,
        without_days: p.format != "html",
    }
}

async fn verify_report(
    file: &std::path::Path,
    server: Option<String>,
    db: Option<String>,
    heads: Option<PathBuf>,
) -> Result<(), Failure> {
    use gpumeter_collector::provenance::{content_hash, extract, render};
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let (content, p) = extract(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let hash = content_hash(&content);
    if hash != p.content_sha256 {
        return Err(anyhow::anyhow!(
            "{}: REFUSED: its content hashes to {hash}, not the {} it carries (edited after it was made)",
            file.display(),
            p.content_sha256
        )
        .into());
    }
    let signed = p
        .verify_signature()
        .map_err(|e| anyhow::anyhow!("{}: REFUSED: {e}", file.display()))?;
    let korean = p.lang == "ko";
    let (matches, head) = match (server, db) {
        (Some(server), _) => {
            let mut c = query_client(&server).await?;
            let r = c
                .check_report(v1::CheckReportRequest {
                    query: Some(query_of(&p)),
                    format: p.format.clone(),
                    lang: p.lang.clone(),
                    content_sha256: hex::decode(&hash).unwrap_or_default(),
                    sign: false,
                })
                .await
                .map_err(|s| refused("verify-report", s))?
                .into_inner();
            let head = r
                .head
                .map(gpumeter_collector::convert::head_from_wire)
                .ok_or_else(|| anyhow::anyhow!("the collector sent no head with its answer"))?;
            (r.matches, head)
        }
        (None, Some(db)) if gpumeter_collector::store::postgres::is_postgres_url(&db) => {
            // The report names its head; recomputing as of it only reads the database.
            let store = gpumeter_collector::store::open_store(&db, None).with_context(|| {
                format!(
                    "opening {}",
                    gpumeter_collector::store::open::display_db(&db)
                )
            })?;
            let (rec, days, head) =
                gpumeter_collector::query::compute_report(store.as_ref(), &query_of(&p))
                    .map_err(|s| anyhow::anyhow!("recomputing: {}", s.message()))?;
            let again = render(&rec, &days, &p.format, korean).map_err(|e| anyhow::anyhow!(e))?;
            (content_hash(&again) == hash, head)
        }
        (None, Some(db)) => {
            let db = PathBuf::from(db);
            let scratch = tempfile::tempdir().context("a scratch directory")?;
            let copy = scratch.path().join("ledger.db");
            let src = rusqlite::Connection::open_with_flags(
                &db,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .with_context(|| format!("opening {}", db.display()))?;
            src.execute("VACUUM INTO ?1", [copy.to_string_lossy()])
                .with_context(|| format!("copying {}", db.display()))?;
            let store = SqliteStore::open(&copy)?;
            let (rec, days, head) =
                gpumeter_collector::query::compute_report(&store, &query_of(&p))
                    .map_err(|s| anyhow::anyhow!("recomputing: {}", s.message()))?;
            let again = render(&rec, &days, &p.format, korean).map_err(|e| anyhow::anyhow!(e))?;
            (content_hash(&again) == hash, head)
        }
        (None, None) => return Err(usage(anyhow::anyhow!("give --server URL or --db PATH"))),
    };
    // The report's own signature only shows it was not edited since signing; the head the
    // ledger (and, given --heads, the auditor's own file) holds shows who signed it.
    gpumeter_collector::provenance::check_against_head(&p, &head)
        .map_err(|e| anyhow::anyhow!("{}: REFUSED: {e}", file.display()))?;
    if let Some(path) = &heads {
        let kept = gpumeter_collector::heads::read_heads_file(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let witnessed = kept.iter().find(|h| h.id == p.head_id).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: REFUSED: head {} is not in the heads file {}",
                file.display(),
                p.head_id,
                path.display()
            )
        })?;
        if witnessed != &head {
            return Err(anyhow::anyhow!(
                "{}: REFUSED: head {} in the heads file {} differs from the ledger's (root {} there, {} here)",
                file.display(),
                p.head_id,
                path.display(),
                hex::encode(&witnessed.root),
                hex::encode(&head.root)
            )
            .into());
        }
    }
    if !matches {
        return Err(anyhow::anyhow!(
            "{}: does NOT match the ledger as of head {}: recomputed, the report differs",
            file.display(),
            p.head_id
        )
        .into());
    }
    println!(
        "{}: matches the ledger as of head {} (root {}){}",
        file.display(),
        p.head_id,
        p.head_root,
        if signed {
            format!(", signed by collector key {}", p.collector_key)
        } else {
            ", unsigned".into()
        }
    );
    Ok(())
}

/// A Query client with the command line's CA and token.
async fn query_client(
    server: &str,
) -> Result<v1::query_client::QueryClient<gpumeter_collector::client::AuthChannel>, Failure> {
    let auth = client_auth()?;
    warn_clear_text(server, &auth);
    gpumeter_collector::client::query(server, &auth)
        .await
        .map_err(client_failure)
}

/// `--as-of`: an RFC 3339 instant, or a KST date (its midnight).
fn parse_as_of(s: &str) -> Result<i64, Failure> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.timestamp_millis());
    }
    parse_period(s.trim()).map(|(from, _)| from).map_err(|_| {
        usage(anyhow::anyhow!(
            "bad --as-of {s:?}: expected an RFC 3339 time or a YYYY-MM-DD date (KST)"
        ))
    })
}

/// `report --trend`: one reconciliation per month, as of one instant, rolled up.
async fn trend_report(a: &ReportArgs, spec: &str) -> Result<(), Failure> {
    use gpumeter_collector::render::{self, Lang};
    let months = gpumeter_collector::trend::months(spec).map_err(|e| usage(e.into()))?;
    if a.view != View::Reconcile || matches!(a.format, Format::Focus | Format::Pdf) {
        return Err(usage(anyhow::anyhow!(
            "--trend comes as table, csv, json or html, of the reconciliation view"
        )));
    }
    let as_of = match a.as_of.as_deref() {
        Some(s) => parse_as_of(s)?,
        None => chrono::Utc::now().timestamp_millis(),
    };
    let mut c = query_client(&a.server).await?;
    let mut reports = Vec::with_capacity(months.len());
    for m in &months {
        let r = gpumeter_collector::parts::reconcile(
            &mut c,
            v1::ReconcileRequest {
                period: m.clone(),
                program: a.program.clone().unwrap_or_default(),
                grant_id: a.grant.clone().unwrap_or_default(),
                idle_threshold_pct: Some(a.idle_threshold),
                idle_days: Some(a.idle_days),
                as_of_head: 0,
                as_of_unix_ms: Some(as_of),
                // Trends sum months; no page draws their days.
                without_days: true,
            },
        )
        .await
        .map_err(|s| refused("report", s))?;
        reports.push(gpumeter_collector::query::reconciliation_from_wire(&r));
    }
    let t = gpumeter_collector::trend::build(&reports, as_of);
    let lang = if a.lang == ReportLang::Ko {
        Lang::Ko
    } else {
        Lang::En
    };
    let width = if a.wide {
        gpumeter_collector::report::Width::Wide
    } else {
        gpumeter_collector::report::Width::Narrow
    };
    let text = match a.format {
        Format::Json => gpumeter_collector::trend::json(&t)?,
        Format::Csv => render::trend_csv(&t, lang),
        Format::Html => render::trend_html(&t, lang),
        _ => gpumeter_collector::report::trend_table(&t, lang == Lang::Ko, width),
    };
    write_out(&text, a.out.as_ref())
}

async fn report(a: ReportArgs) -> Result<(), Failure> {
    if let Some(spec) = a.trend.clone() {
        return trend_report(&a, &spec).await;
    }
    let (from, until) = parse_period(&a.period).map_err(|e| usage(e.into()))?;
    let as_of = a.as_of.as_deref().map(parse_as_of).transpose()?;
    let width = if a.wide {
        gpumeter_collector::report::Width::Wide
    } else {
        gpumeter_collector::report::Width::Narrow
    };
    if a.view == View::Jobs {
        if matches!(a.format, Format::Focus | Format::Pdf) {
            return Err(usage(anyhow::anyhow!(
                "--view jobs comes as table, csv, json or html"
            )));
        }
        let mut c = query_client(&a.server).await?;
        let mut stream = c
            .stream_jobs(v1::JobsRequest {
                period: a.period.clone(),
                grant_id: a.grant.clone().unwrap_or_default(),
            })
            .await
            .map_err(|s| refused("jobs", s))?
            .into_inner();
        let mut jobs = Vec::new();
        while let Some(j) = stream.message().await.map_err(|s| refused("jobs", s))? {
            jobs.push(gpumeter_collector::jobs::from_wire(j));
        }
        let lang = if a.lang == ReportLang::Ko {
            gpumeter_collector::render::Lang::Ko
        } else {
            gpumeter_collector::render::Lang::En
        };
        use gpumeter_collector::render::jobs_page;
        let text = match a.format {
            Format::Json => serde_json::to_string_pretty(&jobs)? + "\n",
            Format::Csv => jobs_page::csv(&jobs, lang),
            Format::Html => jobs_page::html(&jobs, &a.period, lang),
            _ => jobs_page::table(&jobs, &a.period, lang),
        };
        return write_out(&text, a.out.as_ref());
    }
    if a.view == View::Usage {
        if !matches!(a.format, Format::Table | Format::Json) {
            return Err(usage(anyhow::anyhow!(
                "--view usage comes as table or json only"
            )));
        }
        let mut c = query_client(&a.server).await?;
        let r = gpumeter_collector::parts::usage(
            &mut c,
            v1::UsageRequest {
                from_unix_ms: from,
                until_unix_ms: until,
                ..Default::default()
            },
        )
        .await
        .map_err(|s| refused("usage", s))?;
        let json = UsageJson::from(&r);
        let text = match a.format {
            Format::Json => serde_json::to_string_pretty(&json)? + "\n",
            _ => gpumeter_collector::report::usage_table_width(&json, width),
        };
        return write_out(&text, a.out.as_ref());
    }
    let mut c = query_client(&a.server).await?;
    // A PDF is the HTML page printed: the page (with its provenance) is what is rendered.
    let format = format_name(a.format, width);
    let mut q = v1::ReconcileRequest {
        period: a.period.clone(),
        program: a.program.clone().unwrap_or_default(),
        grant_id: a.grant.clone().unwrap_or_default(),
        idle_threshold_pct: Some(a.idle_threshold),
        idle_days: Some(a.idle_days),
        as_of_head: 0,
        as_of_unix_ms: as_of,
        // Only the HTML page draws per-day heatmaps: any other report is held as cards, not
        // cards × days.
        without_days: format != "html",
    };
    let r = gpumeter_collector::parts::reconcile(&mut c, q.clone())
        .await
        .map_err(|s| refused("report", s))?;
    let rec = gpumeter_collector::query::reconciliation_from_wire(&r);
    let korean = a.lang == ReportLang::Ko;
    let days = gpumeter_collector::query::card_days_from_wire(&r);
    let text = gpumeter_collector::provenance::render(&rec, &days, format, korean)
        .map_err(|e| anyhow::anyhow!(e))?;
    // Every report names the head it was computed from and carries its content hash.
    let head = r
        .head
        .ok_or_else(|| anyhow::anyhow!("the collector named no head for the report"))?;
    q.as_of_head = head.id;
    let lang = if korean { "ko" } else { "en" };
    let mut p = gpumeter_collector::provenance::Provenance {
        head_id: head.id,
        head_at_ms: head.at_unix_ms,
        head_root: hex::encode(&head.root),
        period: q.period.trim().to_owned(),
        program: q.program.trim().to_owned(),
        grant_id: q.grant_id.trim().to_owned(),
        idle_threshold_pct: a.idle_threshold,
        idle_days: a.idle_days,
        format: format.into(),
        lang: lang.into(),
        content_sha256: gpumeter_collector::provenance::content_hash(&text),
        as_of_ms: as_of,
        signature: String::new(),
        collector_key: String::new(),
    };
    if a.sign {
        let s = c
            .check_report(v1::CheckReportRequest {
                query: Some(q),
                format: format.into(),
                lang: lang.into(),
                content_sha256: hex::decode(&p.content_sha256).unwrap_or_default(),
                sign: true,
            })
            .await
            .map_err(|s| refused("report --sign", s))?
            .into_inner();
        if !s.matches {
            return Err(anyhow::anyhow!(
                "the collector recomputed the report as of head {} and got another one; not signed",
                head.id
            )
            .into());
        }
        p.signature = hex::encode(&s.signature);
        p.collector_key = hex::encode(&s.public_key);
    }
    let embedded = gpumeter_collector::provenance::embed(&text, &p);
    if a.format == Format::Pdf {
        let pdf = gpumeter_collector::pdf::print_html(&embedded)
            .map_err(|e| anyhow::Error::new(e).context("printing the report to PDF"))?;
        return write_bytes(&pdf, a.out.as_ref());
    }
    write_out(&embedded, a.out.as_ref())
}

/// A file's length, 0 when it cannot be read.
fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}
