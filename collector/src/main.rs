//! `gpumeter-collector`: parses the command line, loads config, starts logging, calls the
//! library. Exit codes: 0 ok, 1 failure, 2 usage error, 64 bad config.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use gpumeter_collector::config::CollectorConfig;
use gpumeter_collector::demo::{DemoOptions, run_demo};
use gpumeter_collector::grants::{fmt_kst, parse_gpu_uuid, parse_valid_from, parse_valid_until};
use gpumeter_collector::report::{UsageJson, idle_table, parse_period, reconciliation_json};
use gpumeter_collector::store::sqlite::SqliteStore;
use gpumeter_proto::v1;

#[derive(Parser)]
#[command(
    name = "gpumeter-collector",
    version,
    about = "gpumeter collector: the GPU usage ledger, grants and reports"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    /// Serve Ingest, Query and Admin.
    Serve {
        #[arg(long)]
        listen: Option<String>,
        /// SQLite file path.
        #[arg(long)]
        db: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        log_json: bool,
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
        /// The collector, e.g. http://127.0.0.1:7400.
        #[arg(long)]
        server: String,
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
        /// A copy of the ledger database, opened read-only.
        #[arg(long)]
        db: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// What the collector flagged for operators and auditors: equivocations, sequence gaps,
    /// rejected batches, clock skew, agents' gap and epoch records, key registrations.
    Alarms {
        /// Only this agent's.
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        server: String,
    },
    /// Agents and cards the collector has seen.
    Hosts {
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
        #[arg(long, default_value = "admin")]
        actor: String,
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

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
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
            config,
            log_json,
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
            if db.starts_with("postgres://") || db.starts_with("postgresql://") {
                return Err(Failure {
                    code: 64,
                    error: anyhow::anyhow!(
                        "config field db: the PostgreSQL store is not built into this collector yet; use a SQLite file path"
                    ),
                });
            }
            init_tracing(log_json);
            let store = Arc::new(
                SqliteStore::open(std::path::Path::new(&db))
                    .with_context(|| format!("opening {db}"))?,
            );
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            gpumeter_collector::server::run(listener, store, cfg.server_options(), async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
            Ok(())
        }
        Command::Grants { command } => grants(command).await,
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
                server,
            };
            report(args).await
        }
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
            let public_key = hex::decode(key.trim()).map_err(|e| Failure {
                code: 2,
                error: anyhow::anyhow!("--key: not hex: {e}"),
            })?;
            let mut c = v1::admin_client::AdminClient::connect(server.clone())
                .await
                .with_context(|| format!("connecting to {server}"))?;
            let r = c
                .register_agent(v1::RegisterAgentRequest {
                    agent_id: agent_id.clone(),
                    public_key,
                    actor,
                    reason,
                })
                .await
                .map_err(|s| anyhow::anyhow!("register refused: {}", s.message()))?
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
        Command::Verify { server, db, json } => {
            let reply = match (server, db) {
                (Some(server), _) => {
                    let mut c = v1::query_client::QueryClient::connect(server.clone())
                        .await
                        .with_context(|| format!("connecting to {server}"))?;
                    c.verify(v1::VerifyRequest::default()).await?.into_inner()
                }
                (None, Some(db)) => {
                    let ledger =
                        gpumeter_collector::store::sqlite_ledger::SqliteLedger::open_read_only(
                            &db,
                        )?;
                    let started = std::time::Instant::now();
                    let report = gpumeter_collector::verify::verify(&ledger)?;
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
            if json {
                println!("{}", verify_json(&reply));
            } else {
                print!("{}", render_verify(&reply));
            }
            if reply.ok {
                Ok(())
            } else {
                Err(anyhow::anyhow!("the ledger does not verify").into())
            }
        }
        Command::Alarms { agent, server } => {
            let mut c = v1::query_client::QueryClient::connect(server.clone())
                .await
                .with_context(|| format!("connecting to {server}"))?;
            let r = c
                .alarms(v1::AlarmsRequest {
                    agent_id: agent.unwrap_or_default(),
                })
                .await?
                .into_inner();
            for a in &r.alarms {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    kst(a.at_unix_ms),
                    a.agent_id,
                    a.kind,
                    a.seq.map_or("-".to_string(), |s| s.to_string()),
                    a.detail
                );
            }
            if r.alarms.is_empty() {
                println!("no alarms");
            }
            Ok(())
        }
        Command::Hosts { server } => {
            let mut c = v1::query_client::QueryClient::connect(server.clone())
                .await
                .with_context(|| format!("connecting to {server}"))?;
            let r = c.hosts(v1::HostsRequest {}).await?.into_inner();
            for h in r.hosts {
                println!(
                    "{}\t{}\t{}\t{} cards\tseq {}",
                    h.agent_id,
                    h.host_id,
                    h.csp,
                    h.gpus.len(),
                    h.durable_seq
                );
            }
            Ok(())
        }
        Command::Demo { minutes, speed, db } => {
            if minutes == 0 || minutes > 24 * 60 || !(speed > 0.0 && speed <= 10_000.0) {
                return Err(Failure {
                    code: 2,
                    error: anyhow::anyhow!("--minutes must be 1..=1440 and --speed in (0, 10000]"),
                });
            }
            let text = run_demo(DemoOptions { minutes, speed, db }).await?;
            print!("{text}");
            Ok(())
        }
    }
}

/// Who makes a change when `--actor` is not given: the login name, else "admin".
fn actor_or_default(actor: Option<String>) -> String {
    actor
        .or_else(|| std::env::var("USER").ok())
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "admin".to_string())
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

fn parse_card(flag: &str, uuid: &str) -> Result<String, Failure> {
    parse_gpu_uuid(uuid.trim()).map_err(|e| usage(anyhow::anyhow!("{flag}: {e}")))
}

/// A refusal or failure from the collector, as the operator should read it.
fn refused(what: &str, s: tonic::Status) -> Failure {
    let error = match s.code() {
        tonic::Code::InvalidArgument
        | tonic::Code::FailedPrecondition
        | tonic::Code::NotFound
        | tonic::Code::PermissionDenied => anyhow::anyhow!("{what} refused: {}", s.message()),
        _ => anyhow::anyhow!("{what} failed: {} ({:?})", s.message(), s.code()),
    };
    Failure { code: 1, error }
}

async fn admin_client(
    server: &str,
) -> Result<v1::admin_client::AdminClient<tonic::transport::Channel>, Failure> {
    Ok(v1::admin_client::AdminClient::connect(server.to_string())
        .await
        .with_context(|| format!("connecting to {server}"))?)
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
            let r = c
                .list_grants(v1::ListGrantsRequest { program })
                .await
                .map_err(|s| refused("list", s))?
                .into_inner();
            if json {
                let all: Vec<GrantJson> = r.grants.iter().map(GrantJson::from).collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(());
            }
            for g in r.grants {
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
            out.push_str(&format!("  - {}\n", f.detail));
        }
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
            })
        })
        .collect();
    serde_json::to_string_pretty(
        &serde_json::json!({"ok": r.ok, "records": r.records, "agents": agents}),
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
    server: String,
}

async fn query_client(
    server: &str,
) -> Result<v1::query_client::QueryClient<tonic::transport::Channel>, Failure> {
    Ok(v1::query_client::QueryClient::connect(server.to_string())
        .await
        .with_context(|| format!("connecting to {server}"))?)
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
        let r = c
            .reconcile(v1::ReconcileRequest {
                period: m.clone(),
                program: a.program.clone().unwrap_or_default(),
                grant_id: a.grant.clone().unwrap_or_default(),
                idle_threshold_pct: Some(a.idle_threshold),
                idle_days: Some(a.idle_days),
                as_of_unix_ms: Some(as_of),
            })
            .await
            .map_err(|s| refused("report", s))?
            .into_inner();
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
    if a.view == View::Usage {
        if !matches!(a.format, Format::Table | Format::Json) {
            return Err(usage(anyhow::anyhow!(
                "--view usage comes as table or json only"
            )));
        }
        let mut c = query_client(&a.server).await?;
        let r = c
            .usage(v1::UsageRequest {
                from_unix_ms: from,
                until_unix_ms: until,
                ..Default::default()
            })
            .await
            .map_err(|s| refused("usage", s))?
            .into_inner();
        let json = UsageJson::from(&r);
        let text = match a.format {
            Format::Json => serde_json::to_string_pretty(&json)? + "\n",
            _ => gpumeter_collector::report::usage_table_width(&json, width),
        };
        return write_out(&text, a.out.as_ref());
    }
    let mut c = query_client(&a.server).await?;
    let r = c
        .reconcile(v1::ReconcileRequest {
            period: a.period.clone(),
            program: a.program.clone().unwrap_or_default(),
            grant_id: a.grant.clone().unwrap_or_default(),
            idle_threshold_pct: Some(a.idle_threshold),
            idle_days: Some(a.idle_days),
            as_of_unix_ms: as_of,
        })
        .await
        .map_err(|s| refused("report", s))?
        .into_inner();
    let rec = gpumeter_collector::query::reconciliation_from_wire(&r);
    let korean = a.lang == ReportLang::Ko;
    let text = match a.format {
        Format::Table => {
            gpumeter_collector::report::reconciliation_table_width(&rec, korean, width)
        }
        Format::Pdf => {
            let days = gpumeter_collector::query::card_days_from_wire(&r);
            let page = render_other("html", &rec, &days, korean)?;
            let pdf = gpumeter_collector::pdf::print_html(&page)
                .map_err(|e| anyhow::Error::new(e).context("printing the report to PDF"))?;
            return write_bytes(&pdf, a.out.as_ref());
        }
        Format::Json => reconciliation_json(&rec)?,
        Format::Csv => render_other("csv", &rec, &[], korean)?,
        Format::Focus => render_other("focus", &rec, &[], korean)?,
        Format::Html => {
            let days = gpumeter_collector::query::card_days_from_wire(&r);
            render_other("html", &rec, &days, korean)?
        }
    };
    write_out(&text, a.out.as_ref())
}

/// The formats `render` draws; `days` feeds the page's per-day heatmaps.
fn render_other(
    format: &str,
    r: &gpumeter_collector::reconcile::Reconciliation,
    days: &[gpumeter_collector::render::CardDay],
    korean: bool,
) -> Result<String, Failure> {
    use gpumeter_collector::render::{self, Lang};
    let lang = if korean { Lang::Ko } else { Lang::En };
    Ok(match format {
        "csv" => render::csv(r, lang),
        "focus" => render::focus(r),
        "html" => render::html(r, days, lang),
        _ => return Err(anyhow::anyhow!("format {format} is not built yet").into()),
    })
}
