//! The `Admin` service: the operating agency's changes (grants).

use std::sync::Arc;

use gpumeter_proto::v1::{self, admin_server::Admin};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::grants::{ImportProblem, parse_grants_csv};
use crate::ingest::now_ms;
use crate::store::Store;

#[derive(Clone)]
pub struct AdminService {
    pub store: Arc<dyn Store>,
    /// Bumped after every grant change so sessions push new assignments.
    pub grants_version: Arc<watch::Sender<u64>>,
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

#[tonic::async_trait]
impl Admin for AdminService {
    async fn import_grants(
        &self,
        request: Request<v1::ImportGrantsRequest>,
    ) -> Result<Response<v1::ImportGrantsReply>, Status> {
        let req = request.into_inner();
        if req.csv.len() > MAX_CSV_BYTES {
            return Err(Status::invalid_argument(format!(
                "grants file is {} bytes, more than the limit {MAX_CSV_BYTES}",
                req.csv.len()
            )));
        }
        let store = self.store.clone();
        let actor = if req.actor.is_empty() {
            "admin".to_string()
        } else {
            req.actor.clone()
        };
        let reply =
            tokio::task::spawn_blocking(move || -> Result<v1::ImportGrantsReply, Status> {
                let held = store.grants()?;
                let known = |host: &str, gpu: &str| store.known_card(host, gpu).unwrap_or(false);
                match parse_grants_csv(&req.csv, &held, &known) {
                    Err(problems) => Ok(v1::ImportGrantsReply {
                        errors: problems.into_iter().map(wire_problem).collect(),
                        ..Default::default()
                    }),
                    Ok(import) => {
                        let cards =
                            import.grants.iter().map(|g| g.cards.len()).sum::<usize>() as u32;
                        if !req.dry_run {
                            store.insert_grants(&import.grants, &actor, now_ms())?;
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

    async fn list_grants(
        &self,
        request: Request<v1::ListGrantsRequest>,
    ) -> Result<Response<v1::ListGrantsReply>, Status> {
        let program = request.into_inner().program;
        let store = self.store.clone();
        let grants = tokio::task::spawn_blocking(move || store.grants())
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(v1::ListGrantsReply {
            grants: grants
                .into_iter()
                .filter(|g| program.is_empty() || g.program.as_str() == program)
                .map(|g| v1::Grant {
                    grant_id: g.grant_id,
                    program: g.program.as_str().into(),
                    grantee: g.grantee,
                    principal: g.principal.to_string(),
                    csp: g.csp,
                    valid_from_unix_ms: g.valid_from_ms,
                    valid_until_unix_ms: g.valid_until_ms,
                    cards: g
                        .cards
                        .into_iter()
                        .map(|c| v1::GrantCard {
                            host_id: c.host_id,
                            gpu_uuid: c.gpu_uuid,
                        })
                        .collect(),
                    revoked: g.revoked_at_ms.is_some(),
                    revoked_at_unix_ms: g.revoked_at_ms.unwrap_or(0),
                })
                .collect(),
        }))
    }
}
