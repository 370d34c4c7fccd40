//! The built-in certificate authority, for deployments that have none of their own
//! (`gpumeter-collector ca …`), built on rcgen.
//!
//! Layout of a CA directory (`--ca-dir`):
//! - `ca.pem`, `ca.key` — the CA certificate and its private key (0600). The key signs every
//!   agent and server certificate; it may be moved offline between issues, `serve` never
//!   reads it.
//! - `server.pem`, `server.key` — the collector's own certificate (`ca issue-server`), what
//!   `serve --ca-dir` presents.
//! - `agents/<agent id>.pem`, `agents/<agent id>.key` — agent certificates (`ca
//!   issue-agent`), to copy to the agent's host with `ca.pem`.
//! - `issued.tsv` — one line per certificate issued: serial, kind, names, not-after
//!   (RFC 3339), issued-at; so an operator can find the serial to revoke.
//! - `revoked.txt` — one serial (lowercase hex) per line, `#` comments allowed. `ca revoke`
//!   appends to it (written to a temporary file and renamed, so a reader never sees half a
//!   line); the running collector reads it at every TLS handshake.
//!
//! Keys are ECDSA P-256, written 0600. Serials are 16 random bytes (top bit clear).
//! An agent certificate names the agent and host in URI SANs (see [`super::AGENT_URI`]) and is
//! for client authentication only; a server certificate names DNS names and IP addresses and
//! is for server authentication only.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::{AGENT_URI, HOST_URI, normalize_serial, serial_hex};

/// Why a CA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{path} already exists; a CA is initialised once (move it away to start over)")]
    Exists { path: String },
    #[error("{path} is missing: run `gpumeter-collector ca init --ca-dir DIR` first")]
    NoCa { path: String },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("certificate generation: {0}")]
    Generate(String),
}

fn io(path: &Path, e: impl std::fmt::Display) -> CaError {
    CaError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn gen_err(e: rcgen::Error) -> CaError {
    CaError::Generate(e.to_string())
}

/// The files of a CA directory.
#[derive(Debug, Clone)]
pub struct CaDir {
    pub dir: PathBuf,
}

impl CaDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn revoked(&self) -> PathBuf {
        self.dir.join("revoked.txt")
    }
    pub fn issued(&self) -> PathBuf {
        self.dir.join("issued.tsv")
    }
    pub fn agents(&self) -> PathBuf {
        self.dir.join("agents")
    }
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clocks differ) for `days` days.
    pub fn days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(i64::from(days)),
        }
    }
}

/// A certificate with its key, as PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// Serial, as [`serial_hex`] writes it.
    pub serial: String,
    pub not_after: OffsetDateTime,
}

/// A CA that can issue: its certificate and signing key.
pub struct Ca {
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// Ids a certificate may name: what agent and host ids may be.
fn check_id(field: &'static str, s: &str) -> Result<(), CaError> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CaError::Invalid {
            field,
            reason: format!(
                "{s:?} must be 1-128 characters of letters, digits, '-', '_', '.', ':'"
            ),
        })
    }
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| CaError::Generate(format!("no randomness: {e}")))?;
    // Positive and exactly 16 bytes in DER, so the serial prints the same everywhere.
    b[0] = (b[0] & 0x7f) | 0x10;
    Ok(SerialNumber::from_slice(&b))
}

fn ia5(field: &'static str, s: String) -> Result<rcgen::string::Ia5String, CaError> {
    s.clone().try_into().map_err(|_| CaError::Invalid {
        field,
        reason: format!("{s:?} is not ASCII"),
    })
}

impl Ca {
    /// A new CA in memory, self-signed.
    pub fn generate(common_name: &str, validity: Validity) -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "gpumeter");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = validity.not_before;
        p.not_after = validity.not_after;
        p.serial_number = Some(random_serial()?);
        let cert = p.self_signed(&key).map_err(gen_err)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// The CA of a directory made by [`init`].
    pub fn load(dir: &CaDir) -> Result<Self, CaError> {
        let (cp, kp) = (dir.ca_cert(), dir.ca_key());
        if !cp.exists() {
            return Err(CaError::NoCa {
                path: cp.display().to_string(),
            });
        }
        let cert_pem = std::fs::read_to_string(&cp).map_err(|e| io(&cp, e))?;
        let key_pem = std::fs::read_to_string(&kp).map_err(|e| io(&kp, e))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| io(&kp, e))?;
        Ok(Self { cert_pem, key })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    fn sign(&self, params: CertificateParams) -> Result<Issued, CaError> {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(gen_err)?;
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| serial_hex(&s.to_bytes()))
            .unwrap_or_default();
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial,
            not_after: params.not_after,
        })
    }

    /// A client certificate for an agent on a host.
    pub fn issue_agent(
        &self,
        agent_id: &str,
        host_id: &str,
        validity: Validity,
    ) -> Result<Issued, CaError> {
        check_id("agent_id", agent_id)?;
        check_id("host_id", host_id)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, agent_id);
        dn.push(DnType::OrganizationName, "gpumeter agent");
        p.distinguished_name = dn;
        p.subject_alt_names = vec![
            SanType::URI(ia5("agent_id", format!("{AGENT_URI}{agent_id}"))?),
            SanType::URI(ia5("host_id", format!("{HOST_URI}{host_id}"))?),
        ];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        p.not_before = validity.not_before;
        p.not_after = validity.not_after;
        p.serial_number = Some(random_serial()?);
        self.sign(p)
    }

    /// The collector's server certificate for these DNS names and addresses.
    pub fn issue_server(
        &self,
        dns: &[String],
        ips: &[IpAddr],
        validity: Validity,
    ) -> Result<Issued, CaError> {
        if dns.is_empty() && ips.is_empty() {
            return Err(CaError::Invalid {
                field: "--dns/--ip",
                reason: "name at least one DNS name or IP address agents will connect to".into(),
            });
        }
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            dns.first()
                .cloned()
                .or_else(|| ips.first().map(|i| i.to_string()))
                .unwrap_or_default(),
        );
        dn.push(DnType::OrganizationName, "gpumeter collector");
        p.distinguished_name = dn;
        for d in dns {
            p.subject_alt_names
                .push(SanType::DnsName(ia5("--dns", d.clone())?));
        }
        for ip in ips {
            p.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        p.not_before = validity.not_before;
        p.not_after = validity.not_after;
        p.serial_number = Some(random_serial()?);
        self.sign(p)
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, with
/// `mode` (0600 for keys).
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("gpumeter")
    ));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    Ok(())
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn log_issued(dir: &CaDir, kind: &str, names: &str, issued: &Issued) -> Result<(), CaError> {
    let p = dir.issued();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .map_err(|e| io(&p, e))?;
    writeln!(
        f,
        "{}\t{kind}\t{names}\t{}\t{}",
        issued.serial,
        rfc3339(issued.not_after),
        rfc3339(OffsetDateTime::now_utc())
    )
    .map_err(|e| io(&p, e))
}

/// `ca init`: a new CA in `dir` (refused if one is there).
pub fn init(dir: &CaDir, days: u32) -> Result<Ca, CaError> {
    if dir.ca_key().exists() || dir.ca_cert().exists() {
        return Err(CaError::Exists {
            path: dir.ca_cert().display().to_string(),
        });
    }
    let ca = Ca::generate("gpumeter collector CA", Validity::days(days))?;
    write_file(&dir.ca_key(), ca.key_pem().as_bytes(), 0o600)?;
    write_file(&dir.ca_cert(), ca.cert_pem().as_bytes(), 0o644)?;
    if !dir.revoked().exists() {
        write_file(
            &dir.revoked(),
            b"# revoked certificate serials, one per line (gpumeter-collector ca revoke)\n",
            0o644,
        )?;
    }
    Ok(ca)
}

/// `ca issue-agent`: writes `<out>/<agent id>.pem` and `.key` (0600); returns their paths and
/// what was issued.
pub fn issue_agent(
    dir: &CaDir,
    agent_id: &str,
    host_id: &str,
    days: u32,
    out: Option<&Path>,
) -> Result<(PathBuf, PathBuf, Issued), CaError> {
    let ca = Ca::load(dir)?;
    let issued = ca.issue_agent(agent_id, host_id, Validity::days(days))?;
    let out = out.map(Path::to_path_buf).unwrap_or_else(|| dir.agents());
    let cert = out.join(format!("{agent_id}.pem"));
    let key = out.join(format!("{agent_id}.key"));
    write_file(&key, issued.key_pem.as_bytes(), 0o600)?;
    write_file(&cert, issued.cert_pem.as_bytes(), 0o644)?;
    log_issued(
        dir,
        "agent",
        &format!("{AGENT_URI}{agent_id} {HOST_URI}{host_id}"),
        &issued,
    )?;
    Ok((cert, key, issued))
}

/// `ca issue-server`: writes `server.pem` and `server.key` (0600) into the CA directory.
pub fn issue_server(
    dir: &CaDir,
    dns: &[String],
    ips: &[IpAddr],
    days: u32,
) -> Result<Issued, CaError> {
    let ca = Ca::load(dir)?;
    let issued = ca.issue_server(dns, ips, Validity::days(days))?;
    write_file(&dir.server_key(), issued.key_pem.as_bytes(), 0o600)?;
    write_file(&dir.server_cert(), issued.cert_pem.as_bytes(), 0o644)?;
    let names: Vec<String> = dns
        .iter()
        .cloned()
        .chain(ips.iter().map(|i| i.to_string()))
        .collect();
    log_issued(dir, "server", &names.join(" "), &issued)?;
    Ok(issued)
}

/// The serials a revocation list holds. A missing file is an empty list.
pub fn read_revoked(path: &Path) -> Result<std::collections::HashSet<String>, CaError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(io(path, e)),
    };
    Ok(text
        .lines()
        .filter_map(|l| l.split('#').next())
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(normalize_serial)
        .collect())
}

/// `ca revoke`: adds `serial` to the revocation list at `path`; `Ok(false)` when it was
/// already there. The running collector refuses the certificate from its next handshake.
pub fn revoke(path: &Path, serial: &str, reason: &str) -> Result<bool, CaError> {
    let s = normalize_serial(serial).ok_or_else(|| CaError::Invalid {
        field: "SERIAL",
        reason: format!("{serial:?} is not a hex serial number"),
    })?;
    if read_revoked(path)?.contains(&s) {
        return Ok(false);
    }
    let mut text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(path, e)),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let reason = reason.replace(['\n', '\r'], " ");
    text.push_str(&format!(
        "{s}\t# {} {reason}\n",
        rfc3339(OffsetDateTime::now_utc())
    ));
    write_file(path, text.as_bytes(), 0o644)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity_from_der;

    fn der(pem: &str) -> Vec<u8> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn agent_certificates_name_agent_and_host() {
        let ca = Ca::generate("t", Validity::days(1)).unwrap();
        let a = ca
            .issue_agent("agent-1", "host-1", Validity::days(1))
            .unwrap();
        let id = identity_from_der(&der(&a.cert_pem)).unwrap().unwrap();
        assert_eq!(id.agent_id, "agent-1");
        assert_eq!(id.host_id, "host-1");
        assert_eq!(id.serial, a.serial);
        assert_eq!(a.serial.len(), 32);
        let s = ca
            .issue_server(&["localhost".into()], &[], Validity::days(1))
            .unwrap();
        assert_eq!(identity_from_der(&der(&s.cert_pem)).unwrap(), None);
        assert!(ca.issue_agent("bad id", "h", Validity::days(1)).is_err());
    }

    #[test]
    fn directory_init_issue_revoke() {
        let t = tempfile::tempdir().unwrap();
        let dir = CaDir::new(t.path().join("ca"));
        init(&dir, 10).unwrap();
        assert!(matches!(init(&dir, 10), Err(CaError::Exists { .. })));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.ca_key())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (cert, key, issued) = issue_agent(&dir, "a", "h", 1, None).unwrap();
        assert!(cert.exists());
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(revoke(&dir.revoked(), &issued.serial.to_uppercase(), "lost").unwrap());
        assert!(!revoke(&dir.revoked(), &issued.serial, "again").unwrap());
        assert!(
            read_revoked(&dir.revoked())
                .unwrap()
                .contains(&issued.serial)
        );
        let log = std::fs::read_to_string(dir.issued()).unwrap();
        assert!(log.contains(&issued.serial), "{log}");
    }
}
