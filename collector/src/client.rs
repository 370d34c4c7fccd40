//! The client side of Query and Admin, for the CLI, the demo and tests: a channel to the
//! collector (TLS for `https://` URLs, trusting the CA given) whose calls carry the bearer
//! token.
//!
//! Where the CLI finds them: the CA to trust from `--ca-cert FILE` or `GPUMETER_CA_CERT`; the
//! token from `--token-file FILE` or `GPUMETER_TOKEN` (the token itself). An `https://` URL
//! without a CA is refused rather than trusted blindly; an `http://` URL (a collector run with
//! `--insecure`) sends the token in clear text, and the CLI says so.

use std::path::Path;
use std::time::Duration;

use gpumeter_proto::v1::{admin_client::AdminClient, query_client::QueryClient};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Why a client cannot connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{what} {path}: {reason}")]
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error(
        "{url} is https: give the CA to trust with --ca-cert FILE or GPUMETER_CA_CERT (the collector's ca.pem)"
    )]
    NoCa { url: String },
    #[error("the token is not a valid header value (one line of printable ASCII)")]
    BadToken,
    #[error("{url}: {reason}")]
    Connect { url: String, reason: String },
}

/// What a client presents: the CA it trusts (PEM) and its bearer token.
#[derive(Debug, Clone, Default)]
pub struct ClientAuth {
    pub ca_pem: Option<Vec<u8>>,
    pub token: Option<String>,
}

impl ClientAuth {
    /// From the CLI's sources: `--ca-cert`, then `--token-file`, else the token in
    /// `token_env` (`GPUMETER_TOKEN`).
    pub fn load(
        ca_cert: Option<&Path>,
        token_file: Option<&Path>,
        token_env: Option<String>,
    ) -> Result<Self, ClientError> {
        let read = |what: &'static str, p: &Path| {
            std::fs::read(p).map_err(|e| ClientError::File {
                what,
                path: p.display().to_string(),
                reason: e.to_string(),
            })
        };
        let ca_pem = ca_cert.map(|p| read("--ca-cert", p)).transpose()?;
        let token = match token_file {
            Some(p) => Some(
                String::from_utf8(read("--token-file", p)?)
                    .map_err(|_| ClientError::BadToken)?
                    .trim()
                    .to_string(),
            ),
            None => token_env.map(|t| t.trim().to_string()),
        }
        .filter(|t| !t.is_empty());
        Ok(Self { ca_pem, token })
    }
}

/// Adds `authorization: Bearer …` to every call.
#[derive(Debug, Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Self, ClientError> {
        token
            .map(|t| {
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| ClientError::BadToken)
            })
            .transpose()
            .map(Bearer)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry a bearer token.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// An endpoint for `url`: TLS trusting `ca_pem` when it is `https://`.
pub fn endpoint(url: &str, ca_pem: Option<&[u8]>) -> Result<Endpoint, ClientError> {
    let connect_err = |e: &dyn std::fmt::Display| ClientError::Connect {
        url: url.to_string(),
        reason: e.to_string(),
    };
    let mut ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| connect_err(&e))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    if url.starts_with("https://") {
        let ca = ca_pem.ok_or_else(|| ClientError::NoCa {
            url: url.to_string(),
        })?;
        ep = ep
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
            .map_err(|e| connect_err(&e))?;
    }
    Ok(ep)
}

/// Connects to `url`.
pub async fn channel(url: &str, auth: &ClientAuth) -> Result<AuthChannel, ClientError> {
    let ch = endpoint(url, auth.ca_pem.as_deref())?
        .connect()
        .await
        .map_err(|e| ClientError::Connect {
            url: url.to_string(),
            reason: error_chain(&e),
        })?;
    Ok(InterceptedService::new(
        ch,
        Bearer::new(auth.token.as_deref())?,
    ))
}

/// An error with its causes, which is where TLS failures say what went wrong.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub async fn query(url: &str, auth: &ClientAuth) -> Result<QueryClient<AuthChannel>, ClientError> {
    Ok(QueryClient::new(channel(url, auth).await?))
}

pub async fn admin(url: &str, auth: &ClientAuth) -> Result<AdminClient<AuthChannel>, ClientError> {
    Ok(AdminClient::new(channel(url, auth).await?))
}
