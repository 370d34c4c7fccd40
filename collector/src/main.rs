//! `gpumeter-collector`: parses the command line, loads config, starts logging, calls the
//! library. Exit codes: 0 ok, 1 failure, 2 usage error, 64 bad config.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use gpumeter_collector::config::CollectorConfig;
use gpumeter_collector::demo::{DemoOptions, run_demo};
use gpumeter_collector::report::{UsageJson, parse_period, usage_table};
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

#[derive(Clone, Copy, ValueEnum)]
enum Format {
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
    /// Grants: import and list.
    Grants {
        #[command(subcommand)]
        command: GrantsCommand,
    },
    /// Usage report for a period (Korean calendar).
    Report {
        /// YYYY-MM, YYYY-MM-DD, or FROM..UNTIL.
        #[arg(long)]
        period: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        #[arg(long)]
        out: Option<PathBuf>,
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
enum GrantsCommand {
    /// Import grants from CSV (all or nothing).
    Import {
        file: PathBuf,
        #[arg(long)]
        server: String,
        #[arg(long)]
        dry_run: bool,
        #[arg(long, default_value = "admin")]
        actor: String,
    },
    /// List grants.
    List {
        #[arg(long)]
        server: String,
        #[arg(long, default_value = "")]
        program: String,
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
        Command::Grants { command } => match command {
            GrantsCommand::Import {
                file,
                server,
                dry_run,
                actor,
            } => {
                let csv = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let mut c = v1::admin_client::AdminClient::connect(server.clone())
                    .await
                    .with_context(|| format!("connecting to {server}"))?;
                let r = c
                    .import_grants(v1::ImportGrantsRequest {
                        csv,
                        actor,
                        dry_run,
                    })
                    .await?
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
                    return Err(
                        anyhow::anyhow!("{} errors; nothing imported", r.errors.len()).into(),
                    );
                }
                println!(
                    "{} {} grants ({} cards)",
                    if r.applied { "imported" } else { "validated" },
                    r.grants,
                    r.cards
                );
                Ok(())
            }
            GrantsCommand::List { server, program } => {
                let mut c = v1::admin_client::AdminClient::connect(server.clone())
                    .await
                    .with_context(|| format!("connecting to {server}"))?;
                let r = c
                    .list_grants(v1::ListGrantsRequest { program })
                    .await?
                    .into_inner();
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
        },
        Command::Report {
            period,
            format,
            out,
            server,
        } => {
            let (from, until) = parse_period(&period).map_err(|e| Failure {
                code: 2,
                error: e.into(),
            })?;
            let mut c = v1::query_client::QueryClient::connect(server.clone())
                .await
                .with_context(|| format!("connecting to {server}"))?;
            let r = c
                .usage(v1::UsageRequest {
                    from_unix_ms: from,
                    until_unix_ms: until,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let json = UsageJson::from(&r);
            let text = match format {
                Format::Table => usage_table(&json),
                Format::Json => serde_json::to_string_pretty(&json)? + "\n",
            };
            write_out(&text, out.as_ref())
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
