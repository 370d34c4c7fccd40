//! Who is calling: the identity an agent's client certificate proves, and (for people) the
//! bearer token's name and role. Depends only on the proto crate and the store; the gRPC
//! services read identities from here, never from what a caller says about itself.
//!
//! Rules:
//! - An agent's certificate names it with two URI subject alternative names,
//!   `urn:gpumeter:agent:<agent id>` and `urn:gpumeter:host:<host id>`, exactly one of each
//!   (see [`identity_from_der`]). The built-in CA ([`ca`]) issues such certificates.
//! - The TLS layer ([`tls`]) verifies the chain to the collector's CA and checks the serial
//!   against the revocation list at every handshake; the identity it proves travels with the
//!   connection ([`ConnInfo`]) and every request on it ([`peer_identity`]).
//! - A `Hello` is admitted ([`check_hello`]) only when its agent id and host id are the
//!   certificate's; without TLS (`serve --insecure`) there is no certificate, so only agents
//!   an admin registered are admitted. A first `Hello` alone never creates an agent.
//! - People call Query and Admin with a bearer token ([`tokens`]): `auditor` may call Query,
//!   `admin` Query and Admin. What an admin changes is recorded under the token's name.

pub mod ca;
pub mod tls;
pub mod tokens;

use std::net::SocketAddr;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// URI prefix naming the agent in a certificate.
pub const AGENT_URI: &str = "urn:gpumeter:agent:";
/// URI prefix naming the host in a certificate.
pub const HOST_URI: &str = "urn:gpumeter:host:";

/// What an agent's client certificate proves: the agent id and host id it was issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub agent_id: String,
    pub host_id: String,
    /// Serial number of the certificate, hex.
    pub serial: String,
}

/// What the transport knows about a connection; tonic puts it into every request's
/// extensions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnInfo {
    pub remote_addr: Option<SocketAddr>,
    /// Whether the connection is TLS (false: `serve --insecure`).
    pub tls: bool,
    /// The agent identity its client certificate proves, when it presented one that names
    /// an agent.
    pub identity: Option<PeerIdentity>,
}

/// The certified identity of the peer of `request`, when its connection presented a client
/// certificate the collector's CA issued. The transport layer puts it into the request's
/// extensions; nothing a client sends in a message can set it.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<PeerIdentity> {
    request
        .extensions()
        .get::<PeerIdentity>()
        .cloned()
        .or_else(|| connection(request).and_then(|c| c.identity))
}

/// Copies the identity of a request's connection into its extensions as a [`PeerIdentity`]
/// (the interceptor on every service), so handlers can read either.
pub fn carry_identity(
    mut request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    if let Some(id) = connection(&request).and_then(|c| c.identity) {
        request.extensions_mut().insert(id);
    }
    Ok(request)
}

/// What the transport knows about the connection `request` came on; `None` when the server
/// was not started through [`crate::server::run`].
pub fn connection<T>(request: &tonic::Request<T>) -> Option<ConnInfo> {
    request.extensions().get::<ConnInfo>().cloned()
}

/// Why a caller is refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: pass --token-file FILE or set GPUMETER_TOKEN")]
    NoToken,
    #[error("the bearer token is not one this collector issued")]
    UnknownToken,
    #[error("token {name:?} was revoked")]
    RevokedToken { name: String },
    #[error("token {name:?} has role {role}, which may not call {service}")]
    Forbidden {
        name: String,
        role: &'static str,
        service: &'static str,
    },
    #[error(
        "no client certificate naming an agent: agents authenticate with a certificate from the collector's CA"
    )]
    NoCertificate,
    #[error(
        "the certificate (serial {serial}) is for {field} {certified:?}, but the Hello says {claimed:?}"
    )]
    IdentityMismatch {
        field: &'static str,
        certified: String,
        claimed: String,
        serial: String,
    },
    #[error(
        "agent {agent_id} is unknown: without TLS an admin must register it first (`agents register`)"
    )]
    UnregisteredAgent { agent_id: String },
    #[error("certificate: {0}")]
    BadCertificate(String),
    #[error("no randomness: {0}")]
    Random(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Reads the agent identity from a DER certificate: `Ok(None)` when it names no agent (a
/// person's or a server's certificate), an error when it names one ambiguously.
pub fn identity_from_der(der: &[u8]) -> Result<Option<PeerIdentity>, AuthError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| AuthError::BadCertificate(format!("cannot parse: {e}")))?;
    let serial = serial_hex(cert.tbs_certificate.raw_serial());
    let mut agents = Vec::new();
    let mut hosts = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Some(a) = uri.strip_prefix(AGENT_URI) {
                    agents.push(a.to_string());
                } else if let Some(h) = uri.strip_prefix(HOST_URI) {
                    hosts.push(h.to_string());
                }
            }
        }
    }
    match (agents.as_slice(), hosts.as_slice()) {
        ([], []) => Ok(None),
        ([a], [h]) if !a.is_empty() && !h.is_empty() => Ok(Some(PeerIdentity {
            agent_id: a.clone(),
            host_id: h.clone(),
            serial,
        })),
        _ => Err(AuthError::BadCertificate(format!(
            "serial {serial} must name exactly one agent ({AGENT_URI}ID) and one host ({HOST_URI}H)"
        ))),
    }
}

/// A serial number as the revocation list and the CLI write it: lowercase hex, no
/// separators, no leading zero bytes.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let s = hex::encode(&raw[start..]);
    if s.is_empty() { "00".into() } else { s }
}

/// Normalizes a serial an operator typed (`0A:1B…`, `0x0a1b…`, upper case) to [`serial_hex`].
pub fn normalize_serial(s: &str) -> Option<String> {
    let s = s.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    let digits: String = s.chars().filter(|c| *c != ':').collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    hex::decode(padded.to_ascii_lowercase())
        .ok()
        .map(|b| serial_hex(&b))
}

/// What admitting a `Hello` still needs from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The certificate proves the agent and host ids.
    Certified,
    /// No TLS: the agent must already be registered by an admin.
    MustBeRegistered,
}

/// Decides whether a `Hello` for (`agent_id`, `host_id`) may go on, from what the connection
/// proves. Pure.
pub fn check_hello(
    conn: Option<&ConnInfo>,
    agent_id: &str,
    host_id: &str,
) -> Result<Admission, AuthError> {
    let tls = conn.is_some_and(|c| c.tls);
    match conn.and_then(|c| c.identity.as_ref()) {
        Some(id) => {
            if id.agent_id != agent_id {
                return Err(AuthError::IdentityMismatch {
                    field: "agent_id",
                    certified: id.agent_id.clone(),
                    claimed: agent_id.to_string(),
                    serial: id.serial.clone(),
                });
            }
            if id.host_id != host_id {
                return Err(AuthError::IdentityMismatch {
                    field: "host_id",
                    certified: id.host_id.clone(),
                    claimed: host_id.to_string(),
                    serial: id.serial.clone(),
                });
            }
            Ok(Admission::Certified)
        }
        None if tls => Err(AuthError::NoCertificate),
        None => Ok(Admission::MustBeRegistered),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(tls: bool, id: Option<(&str, &str)>) -> ConnInfo {
        ConnInfo {
            remote_addr: None,
            tls,
            identity: id.map(|(a, h)| PeerIdentity {
                agent_id: a.into(),
                host_id: h.into(),
                serial: "01".into(),
            }),
        }
    }

    #[test]
    fn hello_must_match_the_certificate() {
        let c = conn(true, Some(("a", "h")));
        assert_eq!(
            check_hello(Some(&c), "a", "h").unwrap(),
            Admission::Certified
        );
        assert!(matches!(
            check_hello(Some(&c), "b", "h"),
            Err(AuthError::IdentityMismatch {
                field: "agent_id",
                ..
            })
        ));
        assert!(matches!(
            check_hello(Some(&c), "a", "k"),
            Err(AuthError::IdentityMismatch {
                field: "host_id",
                ..
            })
        ));
        assert!(matches!(
            check_hello(Some(&conn(true, None)), "a", "h"),
            Err(AuthError::NoCertificate)
        ));
        assert_eq!(
            check_hello(Some(&conn(false, None)), "a", "h").unwrap(),
            Admission::MustBeRegistered
        );
        assert_eq!(
            check_hello(None, "a", "h").unwrap(),
            Admission::MustBeRegistered
        );
    }

    #[test]
    fn the_connection_identity_reaches_the_request() {
        let mut r = tonic::Request::new(());
        assert_eq!(peer_identity(&r), None);
        r.extensions_mut().insert(conn(true, Some(("a", "h"))));
        let r = carry_identity(r).unwrap();
        let direct = r.extensions().get::<PeerIdentity>().cloned().unwrap();
        assert_eq!(
            (direct.agent_id.as_str(), direct.host_id.as_str()),
            ("a", "h")
        );
        assert_eq!(peer_identity(&r), Some(direct));
    }

    #[test]
    fn serials_normalize() {
        assert_eq!(serial_hex(&[0, 0, 0x0a, 0xff]), "0aff");
        assert_eq!(normalize_serial("0A:FF").as_deref(), Some("0aff"));
        assert_eq!(normalize_serial("0x00aff").as_deref(), Some("0aff"));
        assert_eq!(normalize_serial("zz"), None);
        assert_eq!(normalize_serial(""), None);
    }
}
