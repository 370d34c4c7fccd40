//! Report provenance: every report names the signed head it was computed from and carries the
//! SHA-256 of its content, optionally signed by the collector, so `verify-report` can tell an
//! edited file from one the ledger still gives.
//!
//! Format. The *content* is the report exactly as rendered ([`render`]); the file is the
//! content with one provenance line added, as JSON ([`Provenance`]):
//! - `json`: as the second line, `  "provenance": {…},` (the file stays one JSON object);
//! - `html`: a last line `<!-- gpumeter-provenance: {…} -->`;
//! - `table`, `csv`, `focus`: a last line `# gpumeter-provenance: {…}`.
//!
//! Removing that line gives the content back byte for byte. The signature (when present)
//! covers `"gpumeter.v1.report" 0x00 || the provenance JSON with signature and collector_key
//! empty`, and the collector signs only after recomputing the report itself and finding the
//! same hash. Reports are computed from records a head covers (see `query::compute_report`), so
//! recomputing as of the same head gives the same content while the ledger still extends it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::reconcile::Reconciliation;
use crate::render::CardDay;

const REPORT_DOMAIN: &[u8] = b"gpumeter.v1.report\0";
const LINE_MARK: &str = "# gpumeter-provenance: ";
const HTML_MARK: &str = "<!-- gpumeter-provenance: ";
const JSON_MARK: &str = "  \"provenance\": ";

/// What a report was computed from, and its content hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub head_id: u64,
    pub head_at_ms: i64,
    /// Hex.
    pub head_root: String,
    pub period: String,
    pub program: String,
    pub grant_id: String,
    pub idle_threshold_pct: f64,
    pub idle_days: u32,
    pub format: String,
    pub lang: String,
    /// SHA-256 of the content, hex.
    pub content_sha256: String,
    /// The instant the report was reconciled to when the reader chose one (`--as-of`); absent:
    /// the head's time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_of_ms: Option<i64>,
    /// The collector's ed25519 signature (hex), empty when unsigned.
    #[serde(default)]
    pub signature: String,
    /// The collector's public key (hex), empty when unsigned.
    #[serde(default)]
    pub collector_key: String,
}

/// Why a report file cannot be checked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProvenanceError {
    #[error("the file carries no gpumeter provenance")]
    Missing,
    #[error("the provenance line does not parse: {0}")]
    Malformed(String),
    #[error("format {0} is not one gpumeter renders")]
    Format(String),
}

/// SHA-256 of a report's content, hex.
pub fn content_hash(content: &str) -> String {
    hex::encode(Sha256::digest(content.as_bytes()))
}

/// Renders a reconciliation in a format ("table", "json", "csv", "focus", "html").
pub fn render(
    rec: &Reconciliation,
    days: &[CardDay],
    format: &str,
    korean: bool,
) -> Result<String, ProvenanceError> {
    use crate::render::Lang;
    let lang = if korean { Lang::Ko } else { Lang::En };
    Ok(match format {
        "table" => crate::report::reconciliation_table(rec, korean),
        "table-wide" => {
            crate::report::reconciliation_table_width(rec, korean, crate::report::Width::Wide)
        }
        "json" => crate::report::reconciliation_json(rec)
            .map_err(|e| ProvenanceError::Malformed(e.to_string()))?,
        "csv" => crate::render::csv(rec, lang),
        "focus" => crate::render::focus(rec),
        "html" => crate::render::html(rec, days, lang),
        other => return Err(ProvenanceError::Format(other.into())),
    })
}

impl Provenance {
    /// The bytes a signature covers.
    pub fn signed_message(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.signature.clear();
        unsigned.collector_key.clear();
        let mut m = REPORT_DOMAIN.to_vec();
        m.extend_from_slice(&serde_json::to_vec(&unsigned).unwrap_or_default());
        m
    }

    /// Checks the signature, when there is one. `Ok(false)`: unsigned.
    pub fn verify_signature(&self) -> Result<bool, String> {
        if self.signature.is_empty() {
            return Ok(false);
        }
        let key = hex::decode(&self.collector_key).map_err(|e| format!("collector_key: {e}"))?;
        let vk = gpumeter_proto::chain::verifying_key(&key).map_err(|e| e.to_string())?;
        let sig = hex::decode(&self.signature).map_err(|e| format!("signature: {e}"))?;
        let sig: [u8; 64] = sig
            .as_slice()
            .try_into()
            .map_err(|_| "signature: not 64 bytes".to_string())?;
        use ed25519_dalek::Verifier;
        vk.verify(
            &self.signed_message(),
            &ed25519_dalek::Signature::from_bytes(&sig),
        )
        .map(|()| true)
        .map_err(|_| "the collector's signature does not verify".to_string())
    }
}

/// Ties a report's provenance to the head it names, as the ledger (or a witness's heads file)
/// holds it: the head's own signature and root must hold, its id, time and root must be the
/// ones the report names, and a signed report must be signed by the key that signed the head.
/// So a report signed by a key of its own, or naming a head the ledger never signed, is
/// refused even when its signature over itself verifies.
pub fn check_against_head(p: &Provenance, head: &crate::heads::SignedHead) -> Result<(), String> {
    crate::heads::check_head(head)
        .map_err(|kind| format!("head {} does not verify ({kind})", head.id))?;
    if head.id != p.head_id || head.at_ms != p.head_at_ms || hex::encode(&head.root) != p.head_root
    {
        return Err(format!(
            "the report names head {} at {} with root {}, but head {} is at {} with root {}",
            p.head_id,
            p.head_at_ms,
            p.head_root,
            head.id,
            head.at_ms,
            hex::encode(&head.root)
        ));
    }
    if !p.signature.is_empty() && p.collector_key != hex::encode(&head.public_key) {
        return Err(format!(
            "the report is signed by key {}, but head {} was signed by the collector's key {}",
            p.collector_key,
            head.id,
            hex::encode(&head.public_key)
        ));
    }
    Ok(())
}

/// The file for `content` with its provenance line.
pub fn embed(content: &str, p: &Provenance) -> String {
    let line = serde_json::to_string(p).unwrap_or_default();
    match p.format.as_str() {
        "json" => match content.split_once('\n') {
            Some((first, rest)) => format!("{first}\n{JSON_MARK}{line},\n{rest}"),
            None => content.to_string(),
        },
        "html" => format!("{content}{HTML_MARK}{line} -->\n"),
        _ => format!("{content}{LINE_MARK}{line}\n"),
    }
}

/// Splits a report file into its content and provenance.
pub fn extract(file: &str) -> Result<(String, Provenance), ProvenanceError> {
    let parse = |json: &str| {
        serde_json::from_str::<Provenance>(json)
            .map_err(|e| ProvenanceError::Malformed(e.to_string()))
    };
    let body = file.strip_suffix('\n').unwrap_or(file);
    let (head, last) = match body.rfind('\n') {
        Some(i) => (&file[..i + 1], &body[i + 1..]),
        None => ("", body),
    };
    if let Some(json) = last.strip_prefix(LINE_MARK) {
        return Ok((head.to_string(), parse(json)?));
    }
    if let Some(json) = last
        .strip_prefix(HTML_MARK)
        .and_then(|l| l.strip_suffix(" -->"))
    {
        return Ok((head.to_string(), parse(json)?));
    }
    if let Some((first, rest)) = file.split_once('\n') {
        if let Some((line, after)) = rest.split_once('\n') {
            if let Some(json) = line
                .strip_prefix(JSON_MARK)
                .and_then(|l| l.strip_suffix(','))
            {
                return Ok((format!("{first}\n{after}"), parse(json)?));
            }
        }
    }
    Err(ProvenanceError::Missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prov(format: &str, content: &str) -> Provenance {
        Provenance {
            head_id: 3,
            head_at_ms: 9,
            head_root: "ab".into(),
            period: "2026-04".into(),
            program: String::new(),
            grant_id: String::new(),
            idle_threshold_pct: 10.0,
            idle_days: 14,
            format: format.into(),
            lang: "en".into(),
            content_sha256: content_hash(content),
            as_of_ms: None,
            signature: String::new(),
            collector_key: String::new(),
        }
    }

    #[test]
    fn every_format_gives_its_content_back() {
        for (format, content) in [
            ("json", "{\n  \"a\": 1\n}\n"),
            ("html", "<html></html>\n"),
            ("table", "grant  1.0\n"),
            ("csv", "\u{feff}a,b\n1,2\n"),
            ("focus", "a,b\r\n1,2\r\n"),
        ] {
            let p = prov(format, content);
            let file = embed(content, &p);
            assert_ne!(file, content);
            assert_eq!(
                extract(&file).unwrap(),
                (content.to_string(), p),
                "{format}"
            );
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&embed(
            "{\n  \"a\": 1\n}\n",
            &prov("json", ""),
        )) {
            assert_eq!(v["provenance"]["head_id"], 3);
        } else {
            panic!("json stays json");
        }
        assert_eq!(extract("plain\n"), Err(ProvenanceError::Missing));
    }

    #[test]
    fn a_signature_covers_every_field() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
        use ed25519_dalek::Signer;
        let mut p = prov("table", "x");
        p.signature = hex::encode(key.sign(&p.signed_message()).to_bytes());
        p.collector_key = hex::encode(key.verifying_key().to_bytes());
        assert_eq!(p.verify_signature(), Ok(true));
        p.content_sha256 = content_hash("y");
        assert!(p.verify_signature().is_err());
    }
}
