//! The one CSV writer behind every CSV gpumeter writes (the spreadsheet report, FOCUS,
//! trends): RFC 4180 quoting, CRLF line ends, and the spreadsheet-formula guard.
//!
//! Rules, for every cell of every file:
//! - a cell holding a comma, a quote, a CR or an LF is quoted, and a quote inside is doubled;
//! - a cell a spreadsheet would run as a formula — one starting with `=`, `+`, `-`, `@`, a tab
//!   or a carriage return (OWASP's list for CSV injection) — gets a leading `'`, unless it is a
//!   plain number (`-0.5`, `+3`), which a spreadsheet reads as the number it is. Grantee
//!   names, CSP and host ids are user input, so the guard applies to every cell rather than to
//!   the cells someone remembered to mark as text;
//! - every record ends with CRLF, the last one too.

/// Text that a spreadsheet would run as a formula, guarded with a leading `'`; plain numbers
/// and other text are unchanged.
pub fn guard(s: &str) -> std::borrow::Cow<'_, str> {
    let risky = s.starts_with(['=', '+', '-', '@', '\t', '\r']);
    if risky && !is_number(s) {
        std::borrow::Cow::Owned(format!("'{s}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// A plain decimal number, optionally signed (`-1`, `+0.25`, `-3.5e2`); not `inf` or `nan`.
fn is_number(s: &str) -> bool {
    s.parse::<f64>().is_ok_and(f64::is_finite) && s.bytes().any(|b| b.is_ascii_digit())
}

/// `field` as an RFC 4180 field: quoted when it holds a comma, quote or line break.
pub fn quote(field: &str) -> String {
    if field.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

/// A CSV document being written.
#[derive(Debug, Default)]
pub struct CsvWriter {
    out: String,
}

impl CsvWriter {
    /// An empty document; `bom` starts it with a UTF-8 byte order mark (for Excel).
    pub fn new(bom: bool) -> Self {
        Self {
            out: if bom {
                "\u{feff}".to_owned()
            } else {
                String::new()
            },
        }
    }

    /// Appends one record: every field guarded, then quoted.
    pub fn record<S: AsRef<str>>(&mut self, fields: &[S]) {
        for (i, f) in fields.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str(&quote(&guard(f.as_ref())));
        }
        self.out.push_str("\r\n");
    }

    /// The document.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_follows_rfc_4180() {
        assert_eq!(quote("plain"), "plain");
        assert_eq!(quote("a,b"), "\"a,b\"");
        assert_eq!(quote("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(quote("two\nlines"), "\"two\nlines\"");
        assert_eq!(quote("한국어"), "한국어");
        let mut w = CsvWriter::new(false);
        w.record(&["x", "y,z", ""]);
        assert_eq!(w.finish(), "x,\"y,z\",\r\n");
        let mut w = CsvWriter::new(true);
        w.record(&["a"]);
        assert_eq!(w.finish(), "\u{feff}a\r\n");
    }

    #[test]
    fn formulas_are_guarded_and_numbers_and_other_text_are_not() {
        assert_eq!(guard("=HYPERLINK(\"x\")"), "'=HYPERLINK(\"x\")");
        assert_eq!(guard("=cmd|'/c calc'!A1"), "'=cmd|'/c calc'!A1");
        assert_eq!(guard("+1+cmd"), "'+1+cmd");
        assert_eq!(guard("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(guard("-2+3"), "'-2+3");
        assert_eq!(guard("\tx"), "'\tx");
        assert_eq!(guard("-"), "'-");
        assert_eq!(guard("-inf"), "'-inf");
        assert_eq!(guard("-0.500"), "-0.500");
        assert_eq!(guard("+3"), "+3");
        assert_eq!(guard("한국대학교, 연구소"), "한국대학교, 연구소");
        assert_eq!(guard("a-b"), "a-b");
        let mut w = CsvWriter::new(false);
        w.record(&["=1+1", "-1.5"]);
        assert_eq!(w.finish(), "'=1+1,-1.5\r\n");
    }
}
