//! Bearer tokens for people, and the interceptor that checks every Query and Admin call.
//!
//! Rules:
//! - A token is `gpm_` followed by 64 hex digits (32 random bytes). It is printed once, when
//!   made; the store keeps only its SHA-256 (hex) with its name, role, creation and
//!   revocation times. The secret is random, so a plain hash is enough (no password
//!   stretching needed); a database copy does not reveal a usable token.
//! - Names are unique for ever, revoked ones included, because the name is what histories
//!   record as the actor.
//! - Roles: `auditor` may call Query; `admin` may call Query and Admin.
//! - Every call presents `authorization: Bearer <token>`. No token, an unknown token, or a
//!   revoked one: `unauthenticated`. A role that may not call the service:
//!   `permission_denied`. The check reads the store at every call, so a revocation holds
//!   from the next call on, also when made with `tokens revoke --db` beside a running
//!   collector.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use super::AuthError;
use crate::store::{Store, TokenRow};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Auditor,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "auditor" => Some(Role::Auditor),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Who is calling, as their token proves; the interceptor puts it into the request's
/// extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// The caller of `request`, as the interceptor found it.
pub fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::from(AuthError::NoToken))
}

/// The stored form of a token: SHA-256, hex.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// A new random token.
pub fn new_token() -> Result<String, AuthError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(format!("gpm_{}", hex::encode(b)))
}

/// Names a token may have.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
}

/// Makes a token named `name` with `role`, stores its hash, and returns the secret (the only
/// time it exists outside the caller's hands).
pub fn create(store: &dyn Store, name: &str, role: Role, at_ms: i64) -> Result<String, AuthError> {
    let token = new_token()?;
    store.create_token(&TokenRow {
        name: name.to_string(),
        role: role.as_str().to_string(),
        hash: token_hash(&token),
        created_ms: at_ms,
        revoked_ms: None,
    })?;
    Ok(token)
}

/// Checks a request's bearer token against the store for a service that needs `need`.
#[derive(Clone)]
pub struct TokenCheck {
    pub store: Arc<dyn Store>,
    pub need: Role,
    /// The service's name, for refusals.
    pub service: &'static str,
}

impl TokenCheck {
    /// The caller a request's metadata proves, or why not. Pure but for the store lookup.
    pub fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Caller, AuthError> {
        let value = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or(AuthError::NoToken)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::NoToken)?;
        let row = self
            .store
            .token_by_hash(&token_hash(token))?
            .ok_or(AuthError::UnknownToken)?;
        if row.revoked_ms.is_some() {
            return Err(AuthError::RevokedToken { name: row.name });
        }
        let role = Role::parse(&row.role).ok_or(AuthError::UnknownToken)?;
        if role < self.need {
            return Err(AuthError::Forbidden {
                name: row.name,
                role: role.as_str(),
                service: self.service,
            });
        }
        Ok(Caller {
            name: row.name,
            role,
        })
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.check(request.metadata()).map_err(|e| {
            tracing::info!(service = self.service, error = %e, "call refused");
            Status::from(e)
        })?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    fn md(token: Option<&str>) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        if let Some(t) = token {
            m.insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        m
    }

    #[test]
    fn roles_and_revocation() {
        let t = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&t.path().join("db")).unwrap());
        let admin = create(store.as_ref(), "alice", Role::Admin, 1).unwrap();
        let auditor = create(store.as_ref(), "bob", Role::Auditor, 1).unwrap();
        assert!(create(store.as_ref(), "alice", Role::Auditor, 2).is_err());
        let q = TokenCheck {
            store: store.clone(),
            need: Role::Auditor,
            service: "Query",
        };
        let a = TokenCheck {
            need: Role::Admin,
            service: "Admin",
            ..q.clone()
        };
        assert_eq!(q.check(&md(Some(&auditor))).unwrap().name, "bob");
        assert_eq!(a.check(&md(Some(&admin))).unwrap().name, "alice");
        assert!(matches!(
            a.check(&md(Some(&auditor))),
            Err(AuthError::Forbidden { .. })
        ));
        assert!(matches!(a.check(&md(None)), Err(AuthError::NoToken)));
        assert!(matches!(
            a.check(&md(Some("gpm_00"))),
            Err(AuthError::UnknownToken)
        ));
        assert!(store.revoke_token("alice", 5).unwrap());
        assert!(matches!(
            a.check(&md(Some(&admin))),
            Err(AuthError::RevokedToken { .. })
        ));
        let rows = store.tokens().unwrap();
        assert_eq!(rows.len(), 2);
        assert!(
            rows.iter()
                .all(|r| r.hash.len() == 64 && !r.hash.contains("gpm_"))
        );
    }
}
