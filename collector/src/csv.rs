//! The CSV reader shared by the grants and invoice imports: RFC 4180 fields, LF or CRLF, each
//! record with the line it starts on, a malformed record reported (not fatal) so one bad quote
//! does not hide problems on later rows.

/// One record of the file as split by [`split_csv`].
pub(crate) struct RawRecord {
    /// 1-based line the record starts on.
    pub(crate) line: u32,
    pub(crate) body: Result<Vec<String>, CsvFault>,
}

pub(crate) struct CsvFault {
    /// 0-based column the fault is in.
    pub(crate) column: usize,
    pub(crate) message: &'static str,
}

impl RawRecord {
    pub(crate) fn is_blank(&self) -> bool {
        matches!(&self.body, Ok(fields) if fields.len() == 1 && fields[0].trim().is_empty())
    }
}

/// Splits CSV text into records (RFC 4180, LF or CRLF). A malformed record is reported and
/// skipped to the end of its line, so one bad quote does not hide problems on later rows.
pub(crate) fn split_csv(text: &str) -> Vec<RawRecord> {
    let mut records = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line: u32 = 1;
    while chars.peek().is_some() {
        let start = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut fault = None;
        // One iteration per field; `break` ends the record.
        loop {
            let column = fields.len();
            if chars.peek() == Some(&'"') {
                chars.next();
                let mut closed = false;
                while let Some(c) = chars.next() {
                    match c {
                        '"' if chars.peek() == Some(&'"') => {
                            chars.next();
                            field.push('"');
                        }
                        '"' => {
                            closed = true;
                            break;
                        }
                        '\n' => {
                            line = line.saturating_add(1);
                            field.push(c);
                        }
                        _ => field.push(c),
                    }
                }
                if !closed {
                    fault = Some(CsvFault {
                        column,
                        message: "quoted field is never closed",
                    });
                    break;
                }
                if chars.peek() == Some(&'\r') {
                    chars.next();
                    if chars.peek() != Some(&'\n') {
                        fault = Some(CsvFault {
                            column,
                            message: "text after the closing quote of a field",
                        });
                        break;
                    }
                }
                match chars.next() {
                    None => {
                        fields.push(std::mem::take(&mut field));
                        break;
                    }
                    Some(',') => fields.push(std::mem::take(&mut field)),
                    Some('\n') => {
                        line = line.saturating_add(1);
                        fields.push(std::mem::take(&mut field));
                        break;
                    }
                    Some(_) => {
                        fault = Some(CsvFault {
                            column,
                            message: "text after the closing quote of a field",
                        });
                        break;
                    }
                }
            } else {
                let mut end_of_record = false;
                loop {
                    match chars.next() {
                        None => {
                            end_of_record = true;
                            break;
                        }
                        Some(',') => break,
                        Some('\n') => {
                            line = line.saturating_add(1);
                            end_of_record = true;
                            break;
                        }
                        Some('"') => {
                            fault = Some(CsvFault {
                                column,
                                message: "quote inside an unquoted field (quote the whole field and double the quote)",
                            });
                            break;
                        }
                        // A CR before LF is trimmed with the rest of the surrounding space.
                        Some(c) => field.push(c),
                    }
                }
                if fault.is_some() {
                    break;
                }
                fields.push(std::mem::take(&mut field));
                if end_of_record {
                    break;
                }
            }
        }
        match fault {
            Some(fault) => {
                // Resynchronize at the next line; `line` already counts any consumed newlines.
                for c in chars.by_ref() {
                    if c == '\n' {
                        line = line.saturating_add(1);
                        break;
                    }
                }
                records.push(RawRecord {
                    line: start,
                    body: Err(fault),
                });
            }
            None => records.push(RawRecord {
                line: start,
                body: Ok(fields),
            }),
        }
    }
    records
}
