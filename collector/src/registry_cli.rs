//! `providers import|list` and `hosts register|import|registered`: the providers and hosts
//! registry (`gpumeter_collector::registry`) from the command line, over the Admin service.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use gpumeter_collector::report::grid;
use gpumeter_proto::v1;

use gpumeter_collector::listing::{kst_cell, rfc3339};

use super::{Failure, admin_client, refused, write_out};

#[derive(Subcommand)]
pub enum ProvidersCommand {
    /// Register or update CSPs from CSV:
    /// csp,name_ko,name_en,committed_hpc,committed_research,committed_advanced
    /// (ids ignore case; a CSP held before is replaced; all or nothing).
    Import {
        file: PathBuf,
        #[arg(long)]
        server: String,
        /// Check the file only; store nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The registered CSPs and what each committed per program.
    List {
        #[arg(long)]
        server: String,
        /// Print JSON: {providers, hosts, history}, every instant in ms and RFC 3339 (KST).
        #[arg(long)]
        json: bool,
        /// Also print every change to the registry (who, when, what).
        #[arg(long)]
        history: bool,
    },
}

/// What `hosts` does with the registry (beside `hosts` itself and `move-card`).
pub enum HostsRegistry {
    Register {
        host_id: String,
        csp: String,
        server: String,
    },
    Import {
        file: PathBuf,
        server: String,
        dry_run: bool,
    },
    List {
        server: String,
        json: bool,
    },
}

/// Prints an import's problems (`FILE:LINE: FIELD: message`) and fails, or says what it did.
fn import_outcome(r: v1::ImportRegistryReply, file: &str, what: &str) -> Result<(), Failure> {
    if !r.errors.is_empty() {
        for e in &r.errors {
            eprintln!("{file}:{}: {}: {}", e.line, e.field, e.message);
        }
        return Err(anyhow::anyhow!(
            "{} problems in {file}; nothing was imported",
            r.errors.len()
        )
        .into());
    }
    println!(
        "{} {what} {} ({} added or changed)",
        r.rows,
        if r.applied {
            "registered"
        } else {
            "valid (dry run, nothing stored)"
        },
        r.changed
    );
    Ok(())
}

async fn registry(server: &str) -> Result<v1::GetRegistryReply, Failure> {
    let mut c = admin_client(server).await?;
    Ok(c.get_registry(v1::GetRegistryRequest {})
        .await
        .map_err(|s| refused("registry", s))?
        .into_inner())
}

pub async fn providers(command: ProvidersCommand) -> Result<(), Failure> {
    match command {
        ProvidersCommand::Import {
            file,
            server,
            dry_run,
        } => {
            let csv = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut c = admin_client(&server).await?;
            let r = c
                .import_providers(v1::ImportRegistryRequest { csv, dry_run })
                .await
                .map_err(|s| refused("providers import", s))?
                .into_inner();
            import_outcome(r, &file.display().to_string(), "providers")
        }
        ProvidersCommand::List {
            server,
            json,
            history,
        } => {
            let r = registry(&server).await?;
            if json {
                return write_out(&registry_json(&r)?, None);
            }
            let rows: Vec<Vec<String>> = r
                .providers
                .iter()
                .map(|p| {
                    vec![
                        p.csp.clone(),
                        p.name_ko.clone(),
                        p.name_en.clone(),
                        p.committed_hpc.to_string(),
                        p.committed_research.to_string(),
                        p.committed_advanced.to_string(),
                        r.hosts
                            .iter()
                            .filter(|h| h.csp == p.csp)
                            .count()
                            .to_string(),
                        kst_cell(p.updated_unix_ms),
                        p.updated_by.clone(),
                    ]
                })
                .collect();
            let mut text = grid(
                &[
                    "CSP",
                    "NAME_KO",
                    "NAME_EN",
                    "HPC",
                    "RESEARCH",
                    "ADVANCED",
                    "HOSTS",
                    "UPDATED_KST",
                    "BY",
                ],
                &rows,
                &[false, false, false, true, true, true, true, false, false],
            );
            if history {
                text.push('\n');
                text.push_str(&history_table(&r));
            }
            write_out(&text, None)
        }
    }
}

fn history_table(r: &v1::GetRegistryReply) -> String {
    let rows: Vec<Vec<String>> = r
        .history
        .iter()
        .map(|c| {
            vec![
                kst_cell(c.at_unix_ms),
                c.actor.clone(),
                c.kind.clone(),
                c.subject.clone(),
                c.action.clone(),
                c.detail.clone(),
            ]
        })
        .collect();
    grid(
        &["TIME_KST", "BY", "KIND", "SUBJECT", "ACTION", "DETAIL"],
        &rows,
        &[false; 6],
    )
}

fn registry_json(r: &v1::GetRegistryReply) -> Result<String, Failure> {
    let providers: Vec<serde_json::Value> = r
        .providers
        .iter()
        .map(|p| {
            serde_json::json!({
                "csp": p.csp,
                "name_ko": p.name_ko,
                "name_en": p.name_en,
                "committed": {
                    "hpc": p.committed_hpc,
                    "research": p.committed_research,
                    "advanced": p.committed_advanced,
                },
                "updated_at_unix_ms": p.updated_unix_ms,
                "updated_at": rfc3339(p.updated_unix_ms),
                "updated_by": p.updated_by,
            })
        })
        .collect();
    let hosts: Vec<serde_json::Value> = r
        .hosts
        .iter()
        .map(|h| {
            serde_json::json!({
                "host_id": h.host_id,
                "csp": h.csp,
                "updated_at_unix_ms": h.updated_unix_ms,
                "updated_at": rfc3339(h.updated_unix_ms),
                "updated_by": h.updated_by,
            })
        })
        .collect();
    let history: Vec<serde_json::Value> = r
        .history
        .iter()
        .map(|c| {
            serde_json::json!({
                "at_unix_ms": c.at_unix_ms,
                "at": rfc3339(c.at_unix_ms),
                "actor": c.actor,
                "kind": c.kind,
                "subject": c.subject,
                "action": c.action,
                "detail": c.detail,
            })
        })
        .collect();
    let mut s = serde_json::to_string_pretty(&serde_json::json!({
        "providers": providers,
        "hosts": hosts,
        "history": history,
    }))?;
    s.push('\n');
    Ok(s)
}

pub async fn hosts(command: HostsRegistry) -> Result<(), Failure> {
    match command {
        HostsRegistry::Register {
            host_id,
            csp,
            server,
        } => {
            let csv = format!(
                "host_id,csp\n{},{}\n",
                gpumeter_collector::render::csv_writer::quote(&host_id),
                gpumeter_collector::render::csv_writer::quote(&csp)
            );
            let mut c = admin_client(&server).await?;
            let r = c
                .register_hosts(v1::ImportRegistryRequest {
                    csv,
                    dry_run: false,
                })
                .await
                .map_err(|s| refused("hosts register", s))?
                .into_inner();
            if let Some(e) = r.errors.first() {
                return Err(
                    anyhow::anyhow!("hosts register refused: {}: {}", e.field, e.message).into(),
                );
            }
            println!(
                "host {host_id} registered to CSP {}{}",
                gpumeter_collector::registry::normalize_csp(&csp),
                if r.changed == 0 { " (already so)" } else { "" }
            );
            Ok(())
        }
        HostsRegistry::Import {
            file,
            server,
            dry_run,
        } => {
            let csv = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut c = admin_client(&server).await?;
            let r = c
                .register_hosts(v1::ImportRegistryRequest { csv, dry_run })
                .await
                .map_err(|s| refused("hosts import", s))?
                .into_inner();
            import_outcome(r, &file.display().to_string(), "hosts")
        }
        HostsRegistry::List { server, json } => {
            let r = registry(&server).await?;
            if json {
                return write_out(&registry_json(&r)?, None);
            }
            let rows: Vec<Vec<String>> = r
                .hosts
                .iter()
                .map(|h| {
                    vec![
                        h.host_id.clone(),
                        h.csp.clone(),
                        kst_cell(h.updated_unix_ms),
                        h.updated_by.clone(),
                    ]
                })
                .collect();
            write_out(
                &grid(&["HOST", "CSP", "UPDATED_KST", "BY"], &rows, &[false; 4]),
                None,
            )
        }
    }
}
