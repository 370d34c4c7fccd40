//! `gpumeter-agent`: parses the command line, loads config, starts logging, calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use gpumeter_agent::config::{AgentConfig, ConfigError};
use gpumeter_agent::run::{Agent, RunOptions, open_parts};
use gpumeter_telemetry::docs::Shell;
use gpumeter_telemetry::logging::LogFormat;

/// Standard output, quietly: when the reader has gone (`… | head -1`) the command ends with
/// code 0 instead of panicking. `print!` and `println!` below go through here.
fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("gpumeter-agent: writing standard output: {e}");
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
    name = "gpumeter-agent",
    version,
    about = "Meters the GPUs of this server for gpumeter"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// How log lines are written to stderr (colour only on a terminal; level from
        /// RUST_LOG, default info).
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Same as `--log-format json`.
        #[arg(long, hide = true)]
        log_json: bool,
    },
    /// Print this agent's public key (hex), creating the key if it does not exist yet, for
    /// `gpumeter-collector agents register`.
    Key {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print what NVML sees (cards and the fields each supports) and exit.
    Probe {
        /// Path of libnvidia-ml.so (default: the system's).
        #[arg(long)]
        nvml_lib: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Also ask the kubelet's pod-resources API on this socket (e.g.
        /// /var/lib/kubelet/pod-resources/kubelet.sock) which pod holds each card.
        #[arg(long)]
        kubelet_socket: Option<PathBuf>,
    },
    /// Write the man pages (gpumeter-agent.1 and one per subcommand) into a directory.
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
}

/// Writes the man pages of this binary into `dir`.
fn write_man_pages(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, roff) in gpumeter_telemetry::docs::man_pages(Cli::command())? {
        std::fs::write(dir.join(name), roff)?;
    }
    Ok(())
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
    match cli.command {
        Command::Man { out } => match write_man_pages(&out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gpumeter-agent man: writing {}: {e}", out.display());
                ExitCode::from(1)
            }
        },
        Command::ConfigReference => {
            print!("{}", gpumeter_agent::config::reference());
            ExitCode::SUCCESS
        }
        Command::Completions { shell } => {
            match gpumeter_telemetry::docs::completions(
                shell,
                Cli::command(),
                &mut std::io::stdout(),
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("gpumeter-agent completions: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Probe {
            nvml_lib,
            json,
            kubelet_socket,
        } => {
            match gpumeter_agent::probe::probe_with(
                nvml_lib.as_deref(),
                json,
                kubelet_socket.as_deref(),
            ) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("gpumeter-agent probe: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Key { config } => {
            let cfg = match AgentConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("gpumeter-agent: {e}");
                    return ExitCode::from(64);
                }
            };
            match gpumeter_agent::keys::load_or_create(&cfg.state_dir.join("agent.key")) {
                Ok(k) => {
                    println!("{}", hex::encode(k.verifying_key().to_bytes()));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("gpumeter-agent: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Run {
            config,
            log_format,
            log_json,
        } => {
            let cfg = match AgentConfig::load(&config) {
                Ok(c) => c,
                Err(
                    e @ (ConfigError::Read { .. }
                    | ConfigError::Parse { .. }
                    | ConfigError::Invalid { .. }),
                ) => {
                    eprintln!("gpumeter-agent: {e}");
                    return ExitCode::from(64);
                }
            };
            gpumeter_telemetry::logging::init(if log_json {
                LogFormat::Json
            } else {
                log_format
            });
            // One thread runs the agent's tasks: they wait on the network, the clock and the
            // blocking pool (NVML reads, spool appends), never on the CPU for long. A worker
            // per core (tokio's default) would be 100+ threads on a large GPU host, each with
            // its stack and malloc arena, for nothing (DESIGN.md §8: under 10 MiB).
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("gpumeter-agent: cannot start runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("gpumeter-agent: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let parts = open_parts(&cfg)?;
    let agent = Agent::build(cfg, parts)?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    agent.run(RunOptions::default(), rx).await
}
