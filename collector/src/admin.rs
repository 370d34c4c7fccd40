//! The `Admin` service: the operating agency's changes (grants: import, list, show, and the
//! amendments revoke, extend and move-card, each stored with its history and pushed to agents;
//! the providers and hosts registry, changed only here and kept with its history).

use std::sync::Arc;

use gpumeter_proto::v1::{self, admin_server::Admin};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::grants::{Amendment, ImportProblem, parse_grants_csv, parse_valid_until};
use crate::ingest::now_ms;
use crate::store::{GrantChangeRow, Store};

#[derive(Clone)]
pub struct AdminService {
    pub store: Arc<dyn Store>,
    /// Bumped after every grant change so sessions push new assignments.
    pub grants_version: Arc<watch::Sender<u64>>,
    /// Held across every grant change, from reading the grants held to storing the result:
    /// an import checks overlaps against what is held, so two changes must not interleave.
    pub grants_lock: Arc<tokio::sync::Mutex<()>>,
}

/// Largest grants file accepted in one import.
const MAX_CSV_BYTES: usize = 32 << 20;

fn wire_problem(p: ImportProblem) -> v1::ImportProblem {
    v1::ImportProblem {
        line: p.line,
        field: p.field,
        message: p.message,
    }
}

fn change_to_wire(c: GrantChangeRow) -> v1::GrantChange {
    v1::GrantChange {
        at_unix_ms: c.at_ms,
        actor: c.actor,
        action: c.action,
        detail: c.detail,
    }
}

/// Who makes a change: the name of the caller's token, never what the request says (its
/// `actor` field is ignored).
fn actor<T>(request: &Request<T>) -> Result<String, Status> {
    Ok(crate::auth::tokens::caller(request)?.name)
}

fn required_grant_id(grant_id: &str) -> Result<String, Status> {
    let id = grant_id.trim();
    if id.is_empty() {
        return Err(Status::invalid_argument(
            "field grant_id: required field is empty",
        ));
    }
    Ok(id.to_string())
}

/// An instant from a request; absent means now, by the collector's clock.
fn at_or_now(at_unix_ms: Option<i64>) -> i64 {
    at_unix_ms.unwrap_or_else(now_ms)
}

/// Largest providers or hosts file accepted in one import.
const MAX_REGISTRY_CSV_BYTES: usize = 4 << 20;

fn provider_to_wire(p: crate::registry::Provider) -> v1::Provider {
    v1::Provider {
        csp: p.csp,
        name_ko: p.name_ko,
        name_en: p.name_en,
        committed_hpc: p.committed_hpc,
        committed_research: p.committed_research,
        committed_advanced: p.committed_advanced,
        updated_unix_ms: p.updated_ms,
        updated_by: p.updated_by,
    }
}

/// Which registry file an import is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RegistryFile {
    Providers,
    Hosts,
}

impl RegistryFile {
    fn name(self) -> &'static str {
        match self {
            RegistryFile::Providers => "providers",
            RegistryFile::Hosts => "hosts",
        }
    }
}

/// Runs a registry import: parse (hosts against the providers held), count what changes, and
/// store unless it is a dry run. All or nothing.
async fn registry_import(
    store: Arc<dyn Store>,
    csv: String,
    dry_run: bool,
    actor: String,
    file: RegistryFile,
) -> Result<v1::ImportRegistryReply, Status> {
    let what = file.name();
    if csv.len() > MAX_REGISTRY_CSV_BYTES {
        return Err(Status::invalid_argument(format!(
            "{what} file is {} bytes, more than the limit {MAX_REGISTRY_CSV_BYTES}",
            csv.len()
        )));
    }
    tokio::task::spawn_blocking(move || -> Result<v1::ImportRegistryReply, Status> {
        let providers = store.providers()?;
        let (rows, changed) = if file == RegistryFile::Providers {
            match crate::registry::parse_providers_csv(&csv) {
                Err(p) => return Ok(problems_reply(p)),
                Ok(new) => {
                    let changed = crate::registry::provider_changes(&providers, &new).len();
                    if !dry_run {
                        store.import_providers(&new, &actor, now_ms())?;
                    }
                    (new.len(), changed)
                }
            }
        } else {
            match crate::registry::parse_hosts_csv(&csv, &providers) {
                Err(p) => return Ok(problems_reply(p)),
                Ok(new) => {
                    let changed =
                        crate::registry::host_changes(&store.registered_hosts()?, &new).len();
                    if !dry_run {
                        store.register_hosts(&new, &actor, now_ms())?;
                    }
                    (new.len(), changed)
                }
            }
        };
        if !dry_run {
            info!(rows, changed, actor = %actor, "{what} registered");
        }
        Ok(v1::ImportRegistryReply {
            rows: rows as u32,
            changed: changed as u32,
            errors: vec![],
            applied: !dry_run,
        })
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
}

fn problems_reply(problems: Vec<ImportProblem>) -> v1::ImportRegistryReply {
    v1::ImportRegistryReply {
        errors: problems.into_iter().map(wire_problem).collect(),
        ..Default::default()
    }
}

impl AdminService {
    /// The grants `ListGrants` and `StreamGrants` answer with.
    async fn grant_list(&self, q: v1::ListGrantsRequest) -> Result<Vec<v1::Grant>, Status> {
        let program = q.program;
        let store = self.store.clone();
        let grants = tokio::task::spawn_blocking(move || store.grants())
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(grants
            .into_iter()
            .filter(|g| program.is_empty() || g.program.as_str() == program)
            .map(v1::Grant::from)
            .collect())
    }

    /// Applies one amendment, then wakes every live session to push its host's new set.
    async fn amend(
        &self,
        grant_id: String,
        amendment: Amendment,
        actor: String,
    ) -> Result<Response<v1::AmendGrantReply>, Status> {
        let _changing = self.grants_lock.lock().await;
        let store = self.store.clone();
        let id = grant_id.clone();
        let a = amendment.clone();
        let record =
            tokio::task::spawn_blocking(move || store.amend_grant(&id, &a, &actor, now_ms()))
                .await
                .map_err(|e| Status::internal(e.to_string()))??;
        self.grants_version.send_modify(|v| *v += 1);
        let change = record.history.last().cloned().map(change_to_wire);
        info!(
            grant = %grant_id,
            action = amendment.action(),
            detail = change.as_ref().map_or("", |c| c.detail.as_str()),
            "grant amended"
        );
        Ok(Response::new(v1::AmendGrantReply {
            grant: Some(v1::Grant::from(record.grant)),
            change,
        }))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn import_grants(
        &self,
        request: Request<v1::ImportGrantsRequest>,
    ) -> Result<Response<v1::ImportGrantsReply>, Status> {
        let actor = actor(&request)?;
        let req = request.into_inner();
        if req.csv.len() > MAX_CSV_BYTES {
            return Err(Status::invalid_argument(format!(
                "grants file is {} bytes, more than the limit {MAX_CSV_BYTES}",
                req.csv.len()
            )));
        }
        let _changing = self.grants_lock.lock().await;
        let store = self.store.clone();
        let reply =
            tokio::task::spawn_blocking(move || -> Result<v1::ImportGrantsReply, Status> {
                let held = store.grants()?;
                let known = |host: &str, gpu: &str| store.known_card(host, gpu).unwrap_or(false);
                let (csv, models) = crate::grants::split_gpu_models(&req.csv);
                // The registry's refusals (unknown CSPs, hosts of another CSP) are reported
                // beside the grants parser's, by line, so one import shows every problem.
                let registry = crate::registry::check_grants_csv(
                    &csv,
                    &store.providers()?,
                    &store.registered_hosts()?,
                );
                let parsed = match parse_grants_csv(&csv, &held, &known) {
                    Ok(_) if !registry.is_empty() => Err(registry),
                    Err(mut problems) => {
                        problems.extend(registry);
                        problems.sort_by_key(|p| p.line);
                        Err(problems)
                    }
                    ok => ok,
                };
                match parsed {
                    Err(problems) => Ok(v1::ImportGrantsReply {
                        errors: problems.into_iter().map(wire_problem).collect(),
                        ..Default::default()
                    }),
                    Ok(mut import) => {
                        // One provider whatever the file's case: `KT` and `kt` are one CSP.
                        for g in &mut import.grants {
                            g.csp = crate::registry::normalize_csp(&g.csp);
                        }
                        let cards =
                            import.grants.iter().map(|g| g.cards.len()).sum::<usize>() as u32;
                        if !req.dry_run {
                            store.insert_grants(&import.grants, &actor, now_ms())?;
                            store.set_card_models(&models, now_ms())?;
                        }
                        Ok(v1::ImportGrantsReply {
                            grants: import.grants.len() as u32,
                            cards,
                            warnings: import.warnings.into_iter().map(wire_problem).collect(),
                            errors: vec![],
                            applied: !req.dry_run,
                        })
                    }
                }
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        if reply.applied {
            info!(
                grants = reply.grants,
                cards = reply.cards,
                "grants imported"
            );
            self.grants_version.send_modify(|v| *v += 1);
        }
        Ok(Response::new(reply))
    }

    async fn register_agent(
        &self,
        request: Request<v1::RegisterAgentRequest>,
    ) -> Result<Response<v1::RegisterAgentReply>, Status> {
        let actor = actor(&request)?;
        let req = request.into_inner();
        let id_ok = !req.agent_id.is_empty()
            && req.agent_id.len() <= 128
            && req
                .agent_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !id_ok {
            return Err(Status::invalid_argument(
                "agent_id: must be 1-128 letters, digits, '-', '_', '.', ':'",
            ));
        }
        let key: [u8; 32] = req.public_key.as_slice().try_into().map_err(|_| {
            Status::invalid_argument(format!(
                "public_key: {} bytes, expected 32",
                req.public_key.len()
            ))
        })?;
        gpumeter_proto::chain::verifying_key(&key)
            .map_err(|_| Status::invalid_argument("public_key: not a valid ed25519 key"))?;
        let store = self.store.clone();
        let (created, replaced) = tokio::task::spawn_blocking(move || {
            store.register_agent(&req.agent_id, &key, &actor, &req.reason, now_ms())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(v1::RegisterAgentReply { created, replaced }))
    }

    async fn list_grants(
        &self,
        request: Request<v1::ListGrantsRequest>,
    ) -> Result<Response<v1::ListGrantsReply>, Status> {
        let grants = self.grant_list(request.into_inner()).await?;
        crate::query::bounded(v1::ListGrantsReply { grants }, "Admin.StreamGrants")
    }

    type StreamGrantsStream = crate::query::ItemStream<v1::Grant>;

    async fn stream_grants(
        &self,
        request: Request<v1::ListGrantsRequest>,
    ) -> Result<Response<Self::StreamGrantsStream>, Status> {
        Ok(Response::new(crate::query::stream_of(
            self.grant_list(request.into_inner()).await?,
        )))
    }

    async fn move_host_card(
        &self,
        request: Request<v1::MoveHostCardRequest>,
    ) -> Result<Response<v1::MoveHostCardReply>, Status> {
        let actor = actor(&request)?;
        let req = request.into_inner();
        // Taken as the agents spell it (GPU or MIG UUID, of any driver's format); the store
        // answers NOT_FOUND for a card no host reported.
        let gpu = req.gpu_uuid.trim().to_string();
        if gpu.is_empty() || gpu.len() > 256 {
            return Err(Status::invalid_argument(
                "field gpu_uuid: must be 1-256 characters",
            ));
        }
        let to = req.to_host_id.trim().to_string();
        let to_ok = !to.is_empty()
            && to.len() <= 128
            && to
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !to_ok {
            return Err(Status::invalid_argument(
                "field to_host_id: must be 1-128 letters, digits, '-', '_', '.', ':'",
            ));
        }
        let store = self.store.clone();
        let row = tokio::task::spawn_blocking(move || {
            store.move_host_card(&gpu, &to, &actor, &req.reason, now_ms())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        info!(gpu = %row.gpu_uuid, from = %row.from_host_id, to = %row.to_host_id, actor = %row.actor, "card moved to another host");
        Ok(Response::new(v1::MoveHostCardReply {
            gpu_uuid: row.gpu_uuid,
            from_host_id: row.from_host_id,
            to_host_id: row.to_host_id,
            at_unix_ms: row.at_ms,
            actor: row.actor,
        }))
    }

    async fn get_grant(
        &self,
        request: Request<v1::GetGrantRequest>,
    ) -> Result<Response<v1::GetGrantReply>, Status> {
        let id = required_grant_id(&request.into_inner().grant_id)?;
        let store = self.store.clone();
        let lookup = id.clone();
        let record = tokio::task::spawn_blocking(move || store.grant(&lookup))
            .await
            .map_err(|e| Status::internal(e.to_string()))??
            .ok_or_else(|| Status::not_found(format!("grant {id} not found")))?;
        Ok(Response::new(v1::GetGrantReply {
            grant: Some(v1::Grant::from(record.grant)),
            history: record.history.into_iter().map(change_to_wire).collect(),
        }))
    }

    async fn revoke_grant(
        &self,
        request: Request<v1::RevokeGrantRequest>,
    ) -> Result<Response<v1::AmendGrantReply>, Status> {
        let actor = actor(&request)?;
        let req = request.into_inner();
        let id = required_grant_id(&req.grant_id)?;
        let amendment = Amendment::Revoke {
            at_ms: at_or_now(req.at_unix_ms),
            reason: req.reason,
        };
        self.amend(id, amendment, actor).await
    }

    async fn extend_grant(
        &self,
        request: Request<v1::ExtendGrantRequest>,
    ) -> Result<Response<v1::AmendGrantReply>, Status> {
        let actor = actor(&request)?;
        let req = request.into_inner();
        let id = required_grant_id(&req.grant_id)?;
        let valid_until_ms = parse_valid_until(req.valid_until.trim())
            .map_err(|e| Status::invalid_argument(format!("field valid_until: {e}")))?;
        self.amend(id, Amendment::Extend { valid_until_ms }, actor)
            .await
    }

    async fn move_card(
        &self,
        request: Request<v1::MoveCardRequest>,
    ) -> Result<Response<v1::AmendGrantReply>, Status> {
        let actor = actor(&request)?;
        let req = request.into_inner();
        let id = required_grant_id(&req.grant_id)?;
        let amendment = Amendment::MoveCard {
            from_gpu_uuid: req.from_gpu_uuid,
            to_host_id: req.to_host_id,
            to_gpu_uuid: req.to_gpu_uuid,
            at_ms: at_or_now(req.at_unix_ms),
        };
        self.amend(id, amendment, actor).await
    }

    async fn import_providers(
        &self,
        request: Request<v1::ImportRegistryRequest>,
    ) -> Result<Response<v1::ImportRegistryReply>, Status> {
        let actor = actor(&request)?;
        let req = request.into_inner();
        // Grant imports read the registry; a change must not land in the middle of one.
        let _changing = self.grants_lock.lock().await;
        let reply = registry_import(
            self.store.clone(),
            req.csv,
            req.dry_run,
            actor,
            RegistryFile::Providers,
        )
        .await?;
        Ok(Response::new(reply))
    }

    async fn register_hosts(
        &self,
        request: Request<v1::ImportRegistryRequest>,
    ) -> Result<Response<v1::ImportRegistryReply>, Status> {
        let actor = actor(&request)?;
        let req = request.into_inner();
        let _changing = self.grants_lock.lock().await;
        let reply = registry_import(
            self.store.clone(),
            req.csv,
            req.dry_run,
            actor,
            RegistryFile::Hosts,
        )
        .await?;
        Ok(Response::new(reply))
    }

    async fn get_registry(
        &self,
        _request: Request<v1::GetRegistryRequest>,
    ) -> Result<Response<v1::GetRegistryReply>, Status> {
        let store = self.store.clone();
        let (providers, hosts, history) = tokio::task::spawn_blocking(move || {
            Ok::<_, crate::store::StoreError>((
                store.providers()?,
                store.registered_hosts()?,
                store.registry_history()?,
            ))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(v1::GetRegistryReply {
            providers: providers.into_iter().map(provider_to_wire).collect(),
            hosts: hosts
                .into_iter()
                .map(|h| v1::RegisteredHost {
                    host_id: h.host_id,
                    csp: h.csp,
                    updated_unix_ms: h.updated_ms,
                    updated_by: h.updated_by,
                })
                .collect(),
            history: history
                .into_iter()
                .map(|c| v1::RegistryChange {
                    at_unix_ms: c.at_ms,
                    actor: c.actor,
                    kind: c.kind,
                    subject: c.subject,
                    action: c.action,
                    detail: c.detail,
                })
                .collect(),
        }))
    }

    async fn import_invoices(
        &self,
        request: Request<v1::ImportInvoicesRequest>,
    ) -> Result<Response<v1::ImportInvoicesReply>, Status> {
        let actor = actor(&request)?;
        let req = request.into_inner();
        if req.csv.len() > MAX_CSV_BYTES {
            return Err(Status::invalid_argument(format!(
                "invoice file is {} bytes, more than the limit {MAX_CSV_BYTES}",
                req.csv.len()
            )));
        }
        let store = self.store.clone();
        let reply =
            tokio::task::spawn_blocking(move || -> Result<v1::ImportInvoicesReply, Status> {
                let held = store.grants()?;
                match crate::invoices::parse_invoices_csv(&req.csv, &held) {
                    Err(problems) => Ok(v1::ImportInvoicesReply {
                        errors: problems.into_iter().map(wire_problem).collect(),
                        ..Default::default()
                    }),
                    Ok(invoices) => {
                        if !req.dry_run {
                            store.insert_invoices(&invoices, &actor, now_ms())?;
                        }
                        Ok(v1::ImportInvoicesReply {
                            invoices: invoices.len() as u32,
                            errors: vec![],
                            applied: !req.dry_run,
                        })
                    }
                }
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        if reply.applied {
            info!(invoices = reply.invoices, "invoices imported");
        }
        Ok(Response::new(reply))
    }
}
