//! Grants and the validation of a grants CSV import (pure: no I/O, no clock).
//!
//! File format: UTF-8 CSV (RFC 4180), one row per card, with this exact header line:
//!
//! ```text
//! grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until
//! ```
//!
//! - A UTF-8 byte order mark at the start is skipped (spreadsheet exports write one); LF and
//!   CRLF line ends are both accepted; blank lines are ignored. Fields may be quoted, with `""`
//!   for a quote and commas and line breaks allowed inside quotes. Spaces around a value are
//!   dropped, because they are invisible in a spreadsheet and never meant.
//! - Every field is required. `program` is `hpc`, `research` or `advanced`. `principal` uses the
//!   grammar of [`gpumeter_proto::principal`]. `gpu_uuid` is NVIDIA's form, `GPU-` or `MIG-`
//!   followed by 8-4-4-4-12 hex digits; it is stored with lowercase hex as NVML reports it.
//! - `valid_from` / `valid_until` are Korean calendar days `YYYY-MM-DD` (Asia/Seoul, UTC+9,
//!   which has no daylight saving time): a grant runs from 00:00 KST of `valid_from` through the
//!   whole of `valid_until`, so its exclusive end is 00:00 KST of the day after. RFC 3339
//!   timestamps are accepted too, and a timestamp in `valid_until` is the exclusive end itself.
//!
//! Rules: rows of one `grant_id` agree on everything but `host_id` and `gpu_uuid`; a card is in
//! a grant once; an `hpc` grant spans at most 2 hosts; an `advanced` grant lasts at most 4
//! calendar months (counted in KST); no card is in two grants whose validity overlaps, within
//! the file or against the grants already held (a revoked grant holds its cards only until its
//! revocation); a grant already held cannot be imported again (amendments are separate
//! commands, so that history is kept). An import is all or nothing, and every problem names
//! its 1-based line in the file and the field. A card no agent has reported is only a warning,
//! because grants are often imported before the CSP installs the agents.
//!
//! An optional tenth column `gpu_model` names the model each card must be (e.g. `H100 80GB`);
//! [`split_gpu_models`] takes it out before validation, and the collector raises an alarm when
//! a card's reported model does not contain it (case-insensitive).
//!
//! Amendments ([`amend`]) revoke a grant at an instant, extend its end, or move one of its
//! cards to another card at an instant. They keep the past: a moved card stays in the grant
//! with its own end ([`GrantCard::until_ms`]) and its replacement carries its own start, so
//! [`Grant::card_interval`] tells which card belonged to the grant when. The rules above hold
//! after an amendment as after an import, and a refusal names the request field at fault.

use crate::csv::split_csv;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, FixedOffset, Months, NaiveDate, NaiveTime};
use gpumeter_proto::principal::PrincipalSpec;

/// The header line of a grants file, column by column.
pub const COLUMNS: [&str; 9] = [
    "grant_id",
    "program",
    "grantee",
    "principal",
    "csp",
    "host_id",
    "gpu_uuid",
    "valid_from",
    "valid_until",
];

const KST_OFFSET_SECS: i32 = 9 * 3600;
const KST_OFFSET_MS: i64 = KST_OFFSET_SECS as i64 * 1000;
const DAY_MS: i64 = 86_400_000;

/// Korea Standard Time, UTC+9 (no daylight saving time since 1988).
pub const KST: FixedOffset = match FixedOffset::east_opt(KST_OFFSET_SECS) {
    Some(offset) => offset,
    None => panic!("UTC+9 is a valid offset"),
};

/// The longest an `advanced` grant may run.
const ADVANCED_MAX_MONTHS: u32 = 4;
/// The most hosts one `hpc` grant may span.
const HPC_MAX_HOSTS: usize = 2;

/// Why one grant field is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("unknown program {value:?} (expected hpc, research or advanced)")]
    UnknownProgram { value: String },
    #[error("bad GPU UUID {value:?}: expected GPU- or MIG- followed by 8-4-4-4-12 hex digits")]
    BadGpuUuid { value: String },
    #[error(
        "bad date {value:?}: expected YYYY-MM-DD (a Korean calendar day) or an RFC 3339 timestamp"
    )]
    BadDate { value: String },
}

/// The ministry's GPU support programs (DESIGN.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Program {
    Hpc,
    Research,
    Advanced,
}

impl Program {
    /// The program id as written in files, reports and the wire protocol.
    pub fn as_str(self) -> &'static str {
        match self {
            Program::Hpc => "hpc",
            Program::Research => "research",
            Program::Advanced => "advanced",
        }
    }
}

impl FromStr for Program {
    type Err = GrantError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hpc" => Ok(Program::Hpc),
            "research" => Ok(Program::Research),
            "advanced" => Ok(Program::Advanced),
            _ => Err(GrantError::UnknownProgram {
                value: s.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One card of a grant. A card moved into or out of a grant after it started carries its own
/// bounds, so that what the grant held at any instant can still be told afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantCard {
    pub host_id: String,
    pub gpu_uuid: String,
    /// When the card joined the grant (Unix ms, inclusive); `None`: from the grant's start.
    pub from_ms: Option<i64>,
    /// When the card left the grant (Unix ms, exclusive); `None`: until the grant's end.
    pub until_ms: Option<i64>,
}

impl GrantCard {
    /// A card held for the whole of its grant, as an import creates it.
    pub fn new(host_id: impl Into<String>, gpu_uuid: impl Into<String>) -> Self {
        Self {
            host_id: host_id.into(),
            gpu_uuid: gpu_uuid.into(),
            from_ms: None,
            until_ms: None,
        }
    }
}

/// A grant: who may use which cards, for which program, when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub grant_id: String,
    pub program: Program,
    pub grantee: String,
    pub principal: PrincipalSpec,
    pub csp: String,
    /// Start, Unix milliseconds (inclusive).
    pub valid_from_ms: i64,
    /// End, Unix milliseconds (exclusive).
    pub valid_until_ms: i64,
    pub cards: Vec<GrantCard>,
    pub revoked_at_ms: Option<i64>,
}

impl Grant {
    /// Effective end of a grant (revocation cuts it short). Never before `valid_from_ms`, so a
    /// grant revoked before it started covers the empty interval.
    pub fn effective_until_ms(&self) -> i64 {
        let end = match self.revoked_at_ms {
            Some(revoked) => self.valid_until_ms.min(revoked),
            None => self.valid_until_ms,
        };
        end.max(self.valid_from_ms)
    }

    /// When `card` belonged to this grant, `[from, until)` in Unix ms: the grant's validity cut
    /// by revocation and by the card's own bounds. An empty interval comes out as `(x, x)`.
    pub fn card_interval(&self, card: &GrantCard) -> (i64, i64) {
        let from = card
            .from_ms
            .map_or(self.valid_from_ms, |f| f.max(self.valid_from_ms));
        let end = self.effective_until_ms();
        let until = card.until_ms.map_or(end, |u| u.min(end));
        (from, until.max(from))
    }
}

/// A problem with an import, located in the file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, thiserror::Error)]
#[error("line {line}, field {field}: {message}")]
pub struct ImportProblem {
    /// 1-based line of the file; for a row whose quoted field spans lines, its first line.
    pub line: u32,
    /// A column name, `header` for the header line, or `row` for the row as a whole.
    pub field: String,
    pub message: String,
}

/// A validated import, ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantImport {
    /// In order of first appearance in the file; cards in row order.
    pub grants: Vec<Grant>,
    pub warnings: Vec<ImportProblem>,
}

/// Checks and canonicalizes a GPU or MIG UUID: the `GPU-`/`MIG-` prefix as NVIDIA writes it,
/// hex digits lowercased as NVML reports them, so that cards compare equal to what agents send.
pub fn parse_gpu_uuid(s: &str) -> Result<String, GrantError> {
    let bad = || GrantError::BadGpuUuid {
        value: s.to_owned(),
    };
    let rest = s
        .strip_prefix("GPU-")
        .or_else(|| s.strip_prefix("MIG-"))
        .ok_or_else(bad)?;
    let groups: Vec<&str> = rest.split('-').collect();
    let lengths = [8usize, 4, 4, 4, 12];
    let well_formed = groups.len() == lengths.len()
        && groups
            .iter()
            .zip(lengths)
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed {
        return Err(bad());
    }
    Ok(format!("{}{}", &s[..4], rest.to_ascii_lowercase()))
}

/// A date field: a whole Korean calendar day, or an instant.
enum When {
    Day(NaiveDate),
    Instant(i64),
}

fn parse_when(s: &str) -> Result<When, GrantError> {
    let bad = || GrantError::BadDate {
        value: s.to_owned(),
    };
    let b = s.as_bytes();
    let looks_like_day = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if looks_like_day {
        // Plain digits were checked above, so these parses only fail on overflow, never here.
        let year = s[0..4].parse().map_err(|_| bad())?;
        let month = s[5..7].parse().map_err(|_| bad())?;
        let day = s[8..10].parse().map_err(|_| bad())?;
        return NaiveDate::from_ymd_opt(year, month, day)
            .map(When::Day)
            .ok_or_else(bad);
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| When::Instant(t.timestamp_millis()))
        .map_err(|_| bad())
}

fn kst_midnight_ms(day: NaiveDate) -> i64 {
    day.and_time(NaiveTime::MIN).and_utc().timestamp_millis() - KST_OFFSET_MS
}

/// Start instant of a `valid_from` field: 00:00 KST of a day, or the timestamp itself.
pub fn parse_valid_from(s: &str) -> Result<i64, GrantError> {
    Ok(match parse_when(s)? {
        When::Day(day) => kst_midnight_ms(day),
        When::Instant(ms) => ms,
    })
}

/// Exclusive end instant of a `valid_until` field: 00:00 KST of the day after a day (the day is
/// inclusive), or the timestamp itself.
pub fn parse_valid_until(s: &str) -> Result<i64, GrantError> {
    Ok(match parse_when(s)? {
        // KST has no DST, so every day is exactly 24 hours.
        When::Day(day) => kst_midnight_ms(day) + DAY_MS,
        When::Instant(ms) => ms,
    })
}

/// Formats an instant for messages, in KST since that is how grants are written.
pub fn fmt_kst(ms: i64) -> String {
    match DateTime::from_timestamp_millis(ms) {
        Some(t) => t.with_timezone(&KST).to_rfc3339(),
        None => format!("{ms} ms"),
    }
}

/// The latest exclusive end an `advanced` grant starting at `from_ms` may have, or `None` past
/// the end of the calendar.
fn advanced_limit_ms(from_ms: i64) -> Option<i64> {
    DateTime::from_timestamp_millis(from_ms)?
        .with_timezone(&KST)
        .checked_add_months(Months::new(ADVANCED_MAX_MONTHS))
        .map(|t| t.timestamp_millis())
}

// ---------------------------------------------------------------------------------------------
// Validation

fn problem(line: u32, field: &str, message: impl Into<String>) -> ImportProblem {
    ImportProblem {
        line,
        field: field.to_owned(),
        message: message.into(),
    }
}

/// A value every row of a grant must repeat, with the line that first gave it.
struct Agreed<T> {
    value: Option<(T, u32)>,
}

impl<T: PartialEq> Agreed<T> {
    fn new() -> Self {
        Agreed { value: None }
    }

    /// Takes the value a row on `line` gives for `field` (`None` when it did not parse), or
    /// describes how it disagrees with the grant's earlier rows.
    fn agree(
        &mut self,
        value: Option<T>,
        line: u32,
        grant_id: &str,
        field: &str,
        show: impl Fn(&T) -> String,
    ) -> Option<ImportProblem> {
        let value = value?;
        let Some((held, first)) = &self.value else {
            self.value = Some((value, line));
            return None;
        };
        (*held != value).then(|| {
            problem(
                line,
                field,
                format!(
                    "grant {grant_id} has {field} {} on line {first} but {} here; rows of one grant must agree",
                    show(held),
                    show(&value)
                ),
            )
        })
    }

    fn get(&self) -> Option<&T> {
        self.value.as_ref().map(|(v, _)| v)
    }

    fn line(&self) -> Option<u32> {
        self.value.as_ref().map(|(_, l)| *l)
    }
}

/// A grant being assembled from its rows.
struct Draft {
    grant_id: String,
    first_line: u32,
    program: Agreed<Program>,
    grantee: Agreed<String>,
    principal: Agreed<PrincipalSpec>,
    csp: Agreed<String>,
    from: Agreed<i64>,
    until: Agreed<i64>,
    /// Cards with the line of their row.
    cards: Vec<(GrantCard, u32)>,
    hosts: Vec<String>,
    /// Canonical UUID → line it first appeared on in this grant.
    uuids: HashMap<String, u32>,
}

impl Draft {
    fn new(grant_id: &str, line: u32) -> Self {
        Draft {
            grant_id: grant_id.to_owned(),
            first_line: line,
            program: Agreed::new(),
            grantee: Agreed::new(),
            principal: Agreed::new(),
            csp: Agreed::new(),
            from: Agreed::new(),
            until: Agreed::new(),
            cards: Vec::new(),
            hosts: Vec::new(),
            uuids: HashMap::new(),
        }
    }

    /// The validity interval, when both ends parsed and it is not empty.
    fn interval(&self) -> Option<Interval> {
        match (self.from.get(), self.until.get()) {
            (Some(&from), Some(&until)) if until > from => Some((from, until)),
            _ => None,
        }
    }
}

/// The value of a parsed field, or `None` after recording why it did not parse.
fn checked<T, E: fmt::Display>(
    result: Result<T, E>,
    line: u32,
    column: usize,
    problems: &mut Vec<ImportProblem>,
) -> Option<T> {
    result
        .map_err(|e| problems.push(problem(line, COLUMNS[column], e.to_string())))
        .ok()
}

/// A validity interval, `[from, until)` in Unix milliseconds.
type Interval = (i64, i64);

fn overlaps(a: Interval, b: Interval) -> bool {
    a.0.max(b.0) < a.1.min(b.1)
}

/// Validates a whole file against the grants already held. All or nothing: Err carries every
/// problem found (not just the first), each naming its line (1-based file line) and field.
pub fn parse_grants_csv(
    text: &str,
    held: &[Grant],
    known_cards: &dyn Fn(&str, &str) -> bool,
) -> Result<GrantImport, Vec<ImportProblem>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let records = split_csv(text);
    let mut rows = records.iter().filter(|r| !r.is_blank());

    let expected_header = COLUMNS.join(",");
    let header = match rows.next() {
        None => {
            return Err(vec![problem(
                1,
                "header",
                format!("file is empty; the first line must be the header {expected_header}"),
            )]);
        }
        Some(rec) => rec,
    };
    match &header.body {
        Err(fault) => {
            return Err(vec![problem(header.line, "header", fault.message)]);
        }
        Ok(fields) => {
            if !fields.iter().map(|f| f.trim()).eq(COLUMNS) {
                let found: Vec<&str> = fields.iter().map(|f| f.trim()).collect();
                return Err(vec![problem(
                    header.line,
                    "header",
                    format!(
                        "expected the header {expected_header}, found {}",
                        found.join(",")
                    ),
                )]);
            }
        }
    }

    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut drafts: Vec<Draft> = Vec::new();
    let mut draft_index: HashMap<String, usize> = HashMap::new();

    for rec in rows {
        let line = rec.line;
        let fields = match &rec.body {
            Err(fault) => {
                let field = COLUMNS.get(fault.column).copied().unwrap_or("row");
                problems.push(problem(line, field, fault.message));
                continue;
            }
            Ok(fields) => fields,
        };
        if fields.len() != COLUMNS.len() {
            problems.push(problem(
                line,
                "row",
                format!("expected {} columns, found {}", COLUMNS.len(), fields.len()),
            ));
            continue;
        }
        let value = |i: usize| fields[i].trim();
        let mut present = [true; 9];
        for (i, name) in COLUMNS.iter().enumerate() {
            if value(i).is_empty() {
                present[i] = false;
                problems.push(problem(line, name, "required field is empty"));
            }
        }
        // Every field is checked even without a grant id, so that all of a row's problems
        // are reported at once.
        let program = present[1]
            .then(|| value(1).parse::<Program>())
            .and_then(|r| checked(r, line, 1, &mut problems));
        let principal = present[3]
            .then(|| value(3).parse::<PrincipalSpec>())
            .and_then(|r| checked(r, line, 3, &mut problems));
        let gpu_uuid = present[6]
            .then(|| parse_gpu_uuid(value(6)))
            .and_then(|r| checked(r, line, 6, &mut problems));
        let from = present[7]
            .then(|| parse_valid_from(value(7)))
            .and_then(|r| checked(r, line, 7, &mut problems));
        let until = present[8]
            .then(|| parse_valid_until(value(8)))
            .and_then(|r| checked(r, line, 8, &mut problems));
        let grantee = present[2].then(|| value(2).to_owned());
        let csp = present[4].then(|| value(4).to_owned());
        let host_id = present[5].then(|| value(5).to_owned());

        if !present[0] {
            continue;
        }
        let grant_id = value(0);
        let idx = *draft_index.entry(grant_id.to_owned()).or_insert_with(|| {
            drafts.push(Draft::new(grant_id, line));
            drafts.len() - 1
        });
        let draft = &mut drafts[idx];
        let gid = draft.grant_id.clone();
        let quoted = |s: &String| format!("{s:?}");
        let shown_kst = |ms: &i64| fmt_kst(*ms);
        let shown_end = |ms: &i64| format!("(exclusive end) {}", fmt_kst(*ms));
        problems.extend(
            [
                draft
                    .program
                    .agree(program, line, &gid, "program", Program::to_string),
                draft.grantee.agree(grantee, line, &gid, "grantee", quoted),
                draft
                    .principal
                    .agree(principal, line, &gid, "principal", PrincipalSpec::to_string),
                draft.csp.agree(csp, line, &gid, "csp", quoted),
                draft.from.agree(from, line, &gid, "valid_from", shown_kst),
                draft
                    .until
                    .agree(until, line, &gid, "valid_until", shown_end),
            ]
            .into_iter()
            .flatten(),
        );

        if let Some(host) = host_id.as_ref().filter(|h| !draft.hosts.contains(h)) {
            draft.hosts.push(host.clone());
            if draft.program.get() == Some(&Program::Hpc) && draft.hosts.len() > HPC_MAX_HOSTS {
                problems.push(problem(
                    line,
                    "host_id",
                    format!(
                        "hpc grant {gid} would span {} hosts ({}); at most {HPC_MAX_HOSTS} are allowed",
                        draft.hosts.len(),
                        draft.hosts.join(", ")
                    ),
                ));
            }
        }
        if let (Some(host), Some(uuid)) = (host_id, gpu_uuid) {
            if !known_cards(&host, &uuid) {
                warnings.push(problem(
                    line,
                    "gpu_uuid",
                    format!("card {uuid} on host {host} has not been reported by any agent yet"),
                ));
            }
            match draft.uuids.get(&uuid) {
                Some(first) => problems.push(problem(
                    line,
                    "gpu_uuid",
                    format!("card {uuid} is already in grant {gid} on line {first}"),
                )),
                None => {
                    draft.uuids.insert(uuid.clone(), line);
                    draft.cards.push((GrantCard::new(host, uuid), line));
                }
            }
        }
    }

    // Whole-grant rules.
    let held_ids: HashSet<&str> = held.iter().map(|g| g.grant_id.as_str()).collect();
    for draft in &drafts {
        if held_ids.contains(draft.grant_id.as_str()) {
            problems.push(problem(
                draft.first_line,
                "grant_id",
                format!(
                    "grant {} already exists; change it with the amend or revoke commands instead of importing it again",
                    draft.grant_id
                ),
            ));
        }
        let (Some(&from), Some(&until)) = (draft.from.get(), draft.until.get()) else {
            continue;
        };
        let until_line = draft.until.line().unwrap_or(draft.first_line);
        if until <= from {
            problems.push(problem(
                until_line,
                "valid_until",
                format!(
                    "grant {} ends (exclusive) at {}, not after it starts at {}",
                    draft.grant_id,
                    fmt_kst(until),
                    fmt_kst(from)
                ),
            ));
            continue;
        }
        if draft.program.get() == Some(&Program::Advanced) {
            let limit = advanced_limit_ms(from);
            if limit.is_none_or(|limit| until > limit) {
                problems.push(problem(
                    until_line,
                    "valid_until",
                    format!(
                        "advanced grant {} runs until {} (exclusive), more than {ADVANCED_MAX_MONTHS} calendar months after {}",
                        draft.grant_id,
                        fmt_kst(until),
                        fmt_kst(from)
                    ),
                ));
            }
        }
    }

    // No card in two grants at once. Cards are keyed case-insensitively so that a held grant
    // stored before canonicalization still collides.
    let mut held_by_card: HashMap<String, Vec<(&Grant, Interval)>> = HashMap::new();
    for g in held {
        for card in &g.cards {
            held_by_card
                .entry(card.gpu_uuid.to_ascii_lowercase())
                .or_default()
                .push((g, g.card_interval(card)));
        }
    }
    // Card → (draft index, interval) of the grants earlier in this file.
    let mut file_by_card: HashMap<String, Vec<(usize, Interval)>> = HashMap::new();
    for (idx, draft) in drafts.iter().enumerate() {
        let Some(interval) = draft.interval() else {
            continue;
        };
        for (card, line) in &draft.cards {
            let key = card.gpu_uuid.to_ascii_lowercase();
            for &(other, theirs) in held_by_card.get(&key).into_iter().flatten() {
                // Re-importing a held grant is reported on its grant_id already.
                if other.grant_id == draft.grant_id {
                    continue;
                }
                if overlaps(interval, theirs) {
                    problems.push(problem(
                        *line,
                        "gpu_uuid",
                        format!(
                            "card {} is already in grant {} from {} until {} (exclusive), which overlaps grant {}",
                            card.gpu_uuid,
                            other.grant_id,
                            fmt_kst(theirs.0),
                            fmt_kst(theirs.1),
                            draft.grant_id
                        ),
                    ));
                }
            }
            let earlier = file_by_card.entry(key).or_default();
            for (other_idx, theirs) in earlier.iter() {
                if overlaps(interval, *theirs) {
                    let other = &drafts[*other_idx];
                    let other_line = other
                        .cards
                        .iter()
                        .find(|(c, _)| c.gpu_uuid.eq_ignore_ascii_case(&card.gpu_uuid))
                        .map_or(other.first_line, |(_, l)| *l);
                    problems.push(problem(
                        *line,
                        "gpu_uuid",
                        format!(
                            "card {} is also in grant {} (line {other_line}) for an overlapping period",
                            card.gpu_uuid, other.grant_id
                        ),
                    ));
                }
            }
            earlier.push((idx, interval));
        }
    }

    if !problems.is_empty() {
        problems.sort_by_key(|p| p.line);
        return Err(problems);
    }

    let mut grants = Vec::with_capacity(drafts.len());
    for draft in drafts {
        let line = draft.first_line;
        let (Some(program), Some(grantee), Some(principal), Some(csp), Some(from), Some(until)) = (
            draft.program.value,
            draft.grantee.value,
            draft.principal.value,
            draft.csp.value,
            draft.from.value,
            draft.until.value,
        ) else {
            // Every missing value was reported as a problem above, so this is not reached; it
            // still must not drop a grant silently.
            return Err(vec![problem(line, "row", "grant is incomplete")]);
        };
        grants.push(Grant {
            grant_id: draft.grant_id,
            program: program.0,
            grantee: grantee.0,
            principal: principal.0,
            csp: csp.0,
            valid_from_ms: from.0,
            valid_until_ms: until.0,
            cards: draft.cards.into_iter().map(|(c, _)| c).collect(),
            revoked_at_ms: None,
        });
    }
    warnings.sort_by_key(|p| p.line);
    Ok(GrantImport { grants, warnings })
}

// ---------------------------------------------------------------------------------------------
// Amendments

/// A change to a grant already held. The store applies one inside a transaction, with
/// [`amend`] deciding against every other grant held, and records it in the grant's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Amendment {
    /// Ends the grant at `at_ms`, which may be in the past or the future but not before the
    /// grant starts.
    Revoke { at_ms: i64, reason: String },
    /// Moves the grant's exclusive end later.
    Extend { valid_until_ms: i64 },
    /// From `at_ms` on, card `from_gpu_uuid` is replaced by `to_gpu_uuid` on `to_host_id`;
    /// the old card stays in the grant with `until_ms = at_ms`, so its past is kept.
    MoveCard {
        from_gpu_uuid: String,
        to_host_id: String,
        to_gpu_uuid: String,
        at_ms: i64,
    },
}

impl Amendment {
    /// The action name recorded in the grant history.
    pub fn action(&self) -> &'static str {
        match self {
            Amendment::Revoke { .. } => "revoke",
            Amendment::Extend { .. } => "extend",
            Amendment::MoveCard { .. } => "move_card",
        }
    }
}

/// Why an amendment is refused. `field` is the request field at fault, as the Admin RPC
/// names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmendError {
    /// The request is wrong on its own terms: a malformed value or a broken program rule.
    #[error("field {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The request clashes with what is held: another grant's card, an earlier revocation.
    #[error("field {field}: {message}")]
    Conflict {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: String) -> AmendError {
    AmendError::Invalid { field, message }
}

fn conflict(field: &'static str, message: String) -> AmendError {
    AmendError::Conflict { field, message }
}

/// The first card of `others` held for an interval overlapping `interval`, with that grant
/// and its card's interval.
fn overlapping_holder<'a>(
    others: &'a [Grant],
    grant_id: &str,
    gpu_uuid: &str,
    interval: Interval,
) -> Option<(&'a Grant, Interval)> {
    others
        .iter()
        .filter(|o| o.grant_id != grant_id)
        .flat_map(|o| o.cards.iter().map(move |c| (o, c)))
        .filter(|(_, c)| c.gpu_uuid.eq_ignore_ascii_case(gpu_uuid))
        .map(|(o, c)| (o, o.card_interval(c)))
        .find(|(_, theirs)| overlaps(interval, *theirs))
}

/// Checks `amendment` against the program rules (DESIGN.md §5) and against `others`, every
/// other grant held, and returns the amended grant with a one-line description for the
/// history. Pure: `grant` and `others` are what the store holds inside its transaction.
pub fn amend(
    grant: &Grant,
    others: &[Grant],
    amendment: &Amendment,
) -> Result<(Grant, String), AmendError> {
    let id = &grant.grant_id;
    let mut out = grant.clone();
    match amendment {
        Amendment::Revoke { at_ms, reason } => {
            let at = *at_ms;
            if let Some(revoked) = grant.revoked_at_ms {
                return Err(conflict(
                    "grant_id",
                    format!(
                        "grant {id} is already revoked (from {}); a revocation cannot be changed",
                        fmt_kst(revoked)
                    ),
                ));
            }
            if at < grant.valid_from_ms {
                return Err(invalid(
                    "at_unix_ms",
                    format!(
                        "revocation at {} is before grant {id} starts at {}",
                        fmt_kst(at),
                        fmt_kst(grant.valid_from_ms)
                    ),
                ));
            }
            if at >= grant.valid_until_ms {
                return Err(invalid(
                    "at_unix_ms",
                    format!(
                        "revocation at {} is not before grant {id} ends at {} (exclusive), so it would change nothing",
                        fmt_kst(at),
                        fmt_kst(grant.valid_until_ms)
                    ),
                ));
            }
            out.revoked_at_ms = Some(at);
            let mut detail = format!("revoked from {}", fmt_kst(at));
            if !reason.trim().is_empty() {
                detail.push_str(&format!("; reason: {}", reason.trim()));
            }
            Ok((out, detail))
        }
        Amendment::Extend { valid_until_ms } => {
            let until = *valid_until_ms;
            if let Some(revoked) = grant.revoked_at_ms {
                return Err(conflict(
                    "grant_id",
                    format!(
                        "grant {id} is revoked (from {}); a revoked grant cannot be extended",
                        fmt_kst(revoked)
                    ),
                ));
            }
            if until <= grant.valid_until_ms {
                return Err(invalid(
                    "valid_until",
                    format!(
                        "new end {} (exclusive) is not after the current end {}; to end a grant early, revoke it",
                        fmt_kst(until),
                        fmt_kst(grant.valid_until_ms)
                    ),
                ));
            }
            if grant.program == Program::Advanced {
                let limit = advanced_limit_ms(grant.valid_from_ms);
                if limit.is_none_or(|limit| until > limit) {
                    return Err(invalid(
                        "valid_until",
                        format!(
                            "advanced grant {id} would run until {} (exclusive), more than {ADVANCED_MAX_MONTHS} calendar months after {}",
                            fmt_kst(until),
                            fmt_kst(grant.valid_from_ms)
                        ),
                    ));
                }
            }
            out.valid_until_ms = until;
            for card in &out.cards {
                let interval = out.card_interval(card);
                if let Some((other, theirs)) =
                    overlapping_holder(others, id, &card.gpu_uuid, interval)
                {
                    return Err(conflict(
                        "valid_until",
                        format!(
                            "extending grant {id} to {} would put card {} in it while grant {} holds the card from {} until {} (exclusive)",
                            fmt_kst(until),
                            card.gpu_uuid,
                            other.grant_id,
                            fmt_kst(theirs.0),
                            fmt_kst(theirs.1)
                        ),
                    ));
                }
            }
            Ok((
                out,
                format!(
                    "valid_until {} -> {} (exclusive)",
                    fmt_kst(grant.valid_until_ms),
                    fmt_kst(until)
                ),
            ))
        }
        Amendment::MoveCard {
            from_gpu_uuid,
            to_host_id,
            to_gpu_uuid,
            at_ms,
        } => {
            let at = *at_ms;
            let from_uuid = parse_gpu_uuid(from_gpu_uuid.trim())
                .map_err(|e| invalid("from_gpu_uuid", e.to_string()))?;
            let to_uuid = parse_gpu_uuid(to_gpu_uuid.trim())
                .map_err(|e| invalid("to_gpu_uuid", e.to_string()))?;
            let to_host = to_host_id.trim();
            if to_host.is_empty() {
                return Err(invalid("to_host_id", "required field is empty".into()));
            }
            if at < grant.valid_from_ms {
                return Err(invalid(
                    "at_unix_ms",
                    format!(
                        "move at {} is before grant {id} starts at {}; to change a card before the start, move it at the start",
                        fmt_kst(at),
                        fmt_kst(grant.valid_from_ms)
                    ),
                ));
            }
            let end = grant.effective_until_ms();
            if at >= end {
                return Err(conflict(
                    "at_unix_ms",
                    format!(
                        "move at {} is not before grant {id} ends at {} (exclusive)",
                        fmt_kst(at),
                        fmt_kst(end)
                    ),
                ));
            }
            let held_at = |c: &GrantCard| {
                let (from, until) = grant.card_interval(c);
                c.gpu_uuid.eq_ignore_ascii_case(&from_uuid) && from <= at && at < until
            };
            let Some(index) = grant.cards.iter().position(held_at) else {
                let spans: Vec<String> = grant
                    .cards
                    .iter()
                    .filter(|c| c.gpu_uuid.eq_ignore_ascii_case(&from_uuid))
                    .map(|c| {
                        let (from, until) = grant.card_interval(c);
                        format!("{} until {}", fmt_kst(from), fmt_kst(until))
                    })
                    .collect();
                return Err(if spans.is_empty() {
                    invalid(
                        "from_gpu_uuid",
                        format!("card {from_uuid} is not a card of grant {id}"),
                    )
                } else {
                    conflict(
                        "from_gpu_uuid",
                        format!(
                            "card {from_uuid} is not in grant {id} at {}; it is held from {}",
                            fmt_kst(at),
                            spans.join(", from ")
                        ),
                    )
                });
            };
            let old = grant.cards[index].clone();
            if old.host_id == to_host && old.gpu_uuid.eq_ignore_ascii_case(&to_uuid) {
                return Err(invalid(
                    "to_gpu_uuid",
                    format!("card {to_uuid} on host {to_host} is the card being moved"),
                ));
            }
            out.cards[index].until_ms = Some(at);
            let moved = GrantCard {
                host_id: to_host.to_owned(),
                gpu_uuid: to_uuid.clone(),
                from_ms: Some(at),
                until_ms: old.until_ms,
            };
            let interval = out.card_interval(&moved);
            // The new card must not already be in this grant at the same time.
            if let Some(clash) = out.cards.iter().find(|c| {
                c.gpu_uuid.eq_ignore_ascii_case(&to_uuid)
                    && overlaps(interval, out.card_interval(c))
            }) {
                let (from, until) = out.card_interval(clash);
                return Err(conflict(
                    "to_gpu_uuid",
                    format!(
                        "card {to_uuid} is already in grant {id} from {} until {} (exclusive)",
                        fmt_kst(from),
                        fmt_kst(until)
                    ),
                ));
            }
            if let Some((other, theirs)) = overlapping_holder(others, id, &to_uuid, interval) {
                return Err(conflict(
                    "to_gpu_uuid",
                    format!(
                        "card {to_uuid} is in grant {} from {} until {} (exclusive), which overlaps its move into grant {id} at {}",
                        other.grant_id,
                        fmt_kst(theirs.0),
                        fmt_kst(theirs.1),
                        fmt_kst(at)
                    ),
                ));
            }
            out.cards.push(moved);
            if grant.program == Program::Hpc {
                // The host limit holds at every instant from the move on.
                let mut hosts: Vec<&str> = Vec::new();
                for c in &out.cards {
                    let (from, until) = out.card_interval(c);
                    if until > at.max(from) && !hosts.contains(&c.host_id.as_str()) {
                        hosts.push(&c.host_id);
                    }
                }
                if hosts.len() > HPC_MAX_HOSTS {
                    return Err(invalid(
                        "to_host_id",
                        format!(
                            "hpc grant {id} would span {} hosts ({}); at most {HPC_MAX_HOSTS} are allowed",
                            hosts.len(),
                            hosts.join(", ")
                        ),
                    ));
                }
            }
            Ok((
                out,
                format!(
                    "card {} on host {} -> card {to_uuid} on host {to_host} from {}",
                    old.gpu_uuid,
                    old.host_id,
                    fmt_kst(at)
                ),
            ))
        }
    }
}

/// The expected model of one granted card (the grants CSV's optional `gpu_model` column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardModel {
    pub grant_id: String,
    pub gpu_uuid: String,
    pub gpu_model: String,
}

fn csv_field(f: &str) -> String {
    if f.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", f.replace('"', "\"\""))
    } else {
        f.to_string()
    }
}

/// Takes the optional last column `gpu_model` out of a grants file: returns the file without
/// it (every record on the line it started on, so problems keep their line numbers) and each
/// card's model where one is given. A file without the column comes back as it is.
pub fn split_gpu_models(text: &str) -> (String, Vec<CardModel>) {
    let body = text.strip_prefix('\u{feff}').unwrap_or(text);
    let records = split_csv(body);
    let has_column = records
        .iter()
        .find(|r| !r.is_blank())
        .and_then(|r| r.body.as_ref().ok())
        .is_some_and(|f| {
            f.len() == COLUMNS.len() + 1 && f.last().map(|s| s.trim()) == Some("gpu_model")
        });
    if !has_column {
        return (text.to_string(), Vec::new());
    }
    let mut out = String::new();
    let mut line = 1u32;
    let mut models = Vec::new();
    let mut header = true;
    for r in &records {
        while line < r.line {
            out.push('\n');
            line += 1;
        }
        let Ok(fields) = &r.body else {
            // A malformed record cannot be rewritten faithfully: the grants parser reports the
            // file as it is.
            return (text.to_string(), Vec::new());
        };
        let mut fields = fields.clone();
        if fields.len() == COLUMNS.len() + 1 {
            let model = fields.pop().unwrap_or_default();
            let model = model.trim();
            if !header && !model.is_empty() {
                if let Some(Ok(uuid)) = fields.get(6).map(|u| parse_gpu_uuid(u.trim())) {
                    models.push(CardModel {
                        grant_id: fields[0].trim().to_string(),
                        gpu_uuid: uuid,
                        gpu_model: model.to_string(),
                    });
                }
            }
        }
        if !r.is_blank() {
            header = false;
        }
        let joined: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        let joined = joined.join(",");
        line += joined.matches('\n').count() as u32;
        out.push_str(&joined);
    }
    out.push('\n');
    (out, models)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_gpu_model_column_is_split_off_keeping_line_numbers() {
        let text = "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until,gpu_model\n\
                    G1,hpc,\"Acme, Inc.\",uid:1,kt,h1,GPU-0000000A-0000-4000-8000-000000000000,2026-04-01,2026-04-30,H100 80GB\n\
                    \n\
                    G1,hpc,\"Acme, Inc.\",uid:1,kt,h1,GPU-0000000b-0000-4000-8000-000000000000,2026-04-01,2026-04-30,\n";
        let (csv, models) = split_gpu_models(text);
        assert_eq!(
            models,
            vec![CardModel {
                grant_id: "G1".into(),
                gpu_uuid: "GPU-0000000a-0000-4000-8000-000000000000".into(),
                gpu_model: "H100 80GB".into(),
            }]
        );
        assert_eq!(csv.lines().count(), 4);
        assert!(
            csv.starts_with(&format!("{}\n", COLUMNS.join(","))),
            "{csv}"
        );
        assert!(
            csv.lines()
                .nth(1)
                .is_some_and(|l| l.contains("\"Acme, Inc.\"")),
            "{csv}"
        );
        let import = parse_grants_csv(&csv, &[], &|_, _| true).unwrap();
        assert_eq!(import.grants[0].cards.len(), 2);
        // Without the column the file is left as it is.
        let plain = "grant_id,program\n";
        assert_eq!(split_gpu_models(plain), (plain.to_string(), vec![]));
    }
    use gpumeter_proto::principal::PrincipalTerm;
    use proptest::prelude::*;

    const HEADER: &str =
        "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n";

    fn uuid(n: u32) -> String {
        format!("GPU-{n:08x}-1111-2222-3333-444455556666")
    }

    /// One row with the defaults most tests do not care about.
    fn row(id: &str, program: &str, host: &str, card: u32, from: &str, until: &str) -> String {
        format!(
            "{id},{program},Acme AI,uid:1001,csp-a,{host},{},{from},{until}\n",
            uuid(card)
        )
    }

    fn all_known(_: &str, _: &str) -> bool {
        true
    }

    fn parse(text: &str) -> Result<GrantImport, Vec<ImportProblem>> {
        parse_grants_csv(text, &[], &all_known)
    }

    fn ms(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    /// The single problem of a file that must fail with exactly one.
    fn only_problem(text: &str, held: &[Grant]) -> ImportProblem {
        let problems = parse_grants_csv(text, held, &all_known).unwrap_err();
        assert_eq!(problems.len(), 1, "expected one problem, got {problems:#?}");
        problems.into_iter().next().unwrap()
    }

    fn assert_at(p: &ImportProblem, line: u32, field: &str) {
        assert_eq!((p.line, p.field.as_str()), (line, field), "{p}");
    }

    fn held_grant(id: &str, card: u32, from: &str, until: &str, revoked: Option<&str>) -> Grant {
        Grant {
            grant_id: id.into(),
            program: Program::Research,
            grantee: "Old Lab".into(),
            principal: "group:oldlab".parse().unwrap(),
            csp: "csp-a".into(),
            valid_from_ms: ms(from),
            valid_until_ms: ms(until),
            cards: vec![GrantCard::new("h1", uuid(card))],
            revoked_at_ms: revoked.map(ms),
        }
    }

    #[test]
    fn grants_valid_file_parses_to_exact_instants() {
        let text = format!(
            "{HEADER}\
             G1,hpc,Acme AI,uid:1001;group:acme,csp-a,h1,{},2026-04-01,2026-06-30\n\
             G1,hpc,Acme AI,uid:1001;group:acme,csp-a,h2,{},2026-04-01,2026-06-30\n\
             \n\
             G2,research,KAIST,cgroup:/slurm/*,csp-b,h9,MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee,2026-05-01T09:30:00+09:00,2026-05-02T00:00:00Z\n",
            uuid(1),
            uuid(2)
        );
        let import = parse(&text).unwrap();
        assert!(import.warnings.is_empty());
        assert_eq!(
            import.grants,
            vec![
                Grant {
                    grant_id: "G1".into(),
                    program: Program::Hpc,
                    grantee: "Acme AI".into(),
                    principal: PrincipalSpec {
                        terms: vec![
                            PrincipalTerm::Uid(1001),
                            PrincipalTerm::Group("acme".into())
                        ]
                    },
                    csp: "csp-a".into(),
                    valid_from_ms: ms("2026-03-31T15:00:00Z"),
                    valid_until_ms: ms("2026-06-30T15:00:00Z"),
                    cards: vec![GrantCard::new("h1", uuid(1)), GrantCard::new("h2", uuid(2))],
                    revoked_at_ms: None,
                },
                Grant {
                    grant_id: "G2".into(),
                    program: Program::Research,
                    grantee: "KAIST".into(),
                    principal: PrincipalSpec {
                        terms: vec![PrincipalTerm::Cgroup("/slurm/*".into())]
                    },
                    csp: "csp-b".into(),
                    valid_from_ms: ms("2026-05-01T00:30:00Z"),
                    // A timestamp in valid_until is the exclusive end itself.
                    valid_until_ms: ms("2026-05-02T00:00:00Z"),
                    cards: vec![GrantCard::new(
                        "h9",
                        "MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
                    )],
                    revoked_at_ms: None,
                },
            ]
        );
        assert_eq!(import.grants[0].valid_from_ms, 1_774_969_200_000);
    }

    #[test]
    fn grants_day_bounds_are_korean_midnights() {
        assert_eq!(
            parse_valid_from("2026-01-01").unwrap(),
            ms("2025-12-31T15:00:00Z")
        );
        assert_eq!(
            parse_valid_until("2026-12-31").unwrap(),
            ms("2026-12-31T15:00:00Z")
        );
        // Leap day exists in 2028 and not in 2026.
        assert_eq!(
            parse_valid_until("2028-02-29").unwrap(),
            ms("2028-03-01T00:00:00+09:00")
        );
        assert!(parse_valid_from("2026-02-29").is_err());
        assert_eq!(
            parse_valid_from("2026-04-01T00:00:00+09:00").unwrap(),
            ms("2026-03-31T15:00:00Z")
        );
    }

    #[test]
    fn grants_bom_crlf_and_quoted_fields() {
        let text = format!(
            "\u{feff}grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\r\n\
             \"G1\",hpc,\"Kim, \"\"Lee\"\" & Park Co.\",\"user:alice;uid:7\",csp-a,h1,{},2026-04-01,\"2026-04-30\"\r\n\
             \r\n\
             G1,hpc,\"Kim, \"\"Lee\"\" & Park Co.\",user:alice;uid:7,csp-a,h1,{},2026-04-01,2026-04-30\r\n",
            uuid(1),
            uuid(2)
        );
        let import = parse(&text).unwrap();
        assert_eq!(import.grants.len(), 1);
        let g = &import.grants[0];
        assert_eq!(g.grant_id, "G1");
        assert_eq!(g.grantee, "Kim, \"Lee\" & Park Co.");
        assert_eq!(g.principal.to_string(), "user:alice;uid:7");
        assert_eq!(g.cards.len(), 2);
        assert_eq!(g.cards[1].gpu_uuid, uuid(2));
        assert_eq!(g.valid_until_ms, ms("2026-04-30T15:00:00Z"));
    }

    #[test]
    fn grants_line_numbers_count_newlines_inside_quotes() {
        // The grantee spans lines 2-3, so the next row starts on line 4.
        let text = format!(
            "{HEADER}\
             G1,research,\"Two\nLines\",uid:1,csp-a,h1,{},2026-04-01,2026-04-30\n\
             G1,research,\"Two\nLines\",uid:1,csp-a,h1,GPU-bad,2026-04-01,2026-04-30\n",
            uuid(1)
        );
        let p = only_problem(&text, &[]);
        assert_at(&p, 4, "gpu_uuid");
    }

    #[test]
    fn grants_header_missing_is_line_1() {
        let text = row("G1", "hpc", "h1", 1, "2026-04-01", "2026-04-30");
        let p = only_problem(&text, &[]);
        assert_at(&p, 1, "header");
        assert!(p.message.contains("expected the header"), "{p}");
    }

    #[test]
    fn grants_header_wrong_is_line_1() {
        let text = "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from\n";
        assert_at(&only_problem(text, &[]), 1, "header");
        let reordered =
            "program,grant_id,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n";
        assert_at(&only_problem(reordered, &[]), 1, "header");
        assert_at(&only_problem("", &[]), 1, "header");
        assert_at(&only_problem("\u{feff}", &[]), 1, "header");
    }

    #[test]
    fn grants_header_only_file_imports_nothing() {
        let import = parse(HEADER).unwrap();
        assert!(import.grants.is_empty());
    }

    #[test]
    fn grants_wrong_column_count() {
        let text = format!(
            "{HEADER}{}G1,hpc,Acme,uid:1,csp-a,h1,{},2026-04-01\n",
            row("G1", "hpc", "h1", 1, "2026-04-01", "2026-04-30"),
            uuid(2)
        );
        let p = only_problem(&text, &[]);
        assert_at(&p, 3, "row");
        assert!(p.message.contains("expected 9 columns, found 8"), "{p}");
    }

    #[test]
    fn grants_empty_required_field() {
        let text = format!(
            "{HEADER}G1,hpc,  ,uid:1,csp-a,h1,{},2026-04-01,2026-04-30\n",
            uuid(1)
        );
        let p = only_problem(&text, &[]);
        assert_at(&p, 2, "grantee");
        assert_eq!(p.message, "required field is empty");
    }

    #[test]
    fn grants_empty_grant_id_still_checks_the_row() {
        let text = format!("{HEADER},hpc,Acme,uid:1,csp-a,h1,GPU-x,2026-04-01,2026-04-30\n");
        let problems = parse(&text).unwrap_err();
        let at: Vec<_> = problems
            .iter()
            .map(|p| (p.line, p.field.as_str()))
            .collect();
        assert_eq!(at, vec![(2, "grant_id"), (2, "gpu_uuid")]);
    }

    #[test]
    fn grants_unknown_program() {
        let text = format!(
            "{HEADER}{}",
            row("G1", "HPC", "h1", 1, "2026-04-01", "2026-04-30")
        );
        let p = only_problem(&text, &[]);
        assert_at(&p, 2, "program");
        assert!(p.message.contains("\"HPC\""), "{p}");
    }

    #[test]
    fn grants_malformed_principal() {
        let text = format!(
            "{HEADER}G1,hpc,Acme,foo:bar,csp-a,h1,{},2026-04-01,2026-04-30\n",
            uuid(1)
        );
        let p = only_problem(&text, &[]);
        assert_at(&p, 2, "principal");
        assert_eq!(
            p.message,
            "foo:bar".parse::<PrincipalSpec>().unwrap_err().to_string()
        );
    }

    #[test]
    fn grants_malformed_gpu_uuid() {
        for bad in [
            "GPU-1234",
            "gpu-00000001-1111-2222-3333-444455556666",
            "GPU-0000000g-1111-2222-3333-444455556666",
            "GPU-00000001-1111-2222-3333-4444555566667",
            "GPU-00000001-1111-2222-3333-444455556666-",
            "0",
        ] {
            let text = format!("{HEADER}G1,hpc,Acme,uid:1,csp-a,h1,{bad},2026-04-01,2026-04-30\n");
            let p = only_problem(&text, &[]);
            assert_at(&p, 2, "gpu_uuid");
            assert!(p.message.contains(bad), "{p}");
        }
    }

    #[test]
    fn grants_gpu_uuid_is_canonicalized() {
        assert_eq!(
            parse_gpu_uuid("GPU-ABCDEF01-1111-2222-3333-444455556666").unwrap(),
            "GPU-abcdef01-1111-2222-3333-444455556666"
        );
        assert_eq!(
            parse_gpu_uuid("MIG-ABCDEF01-1111-2222-3333-444455556666").unwrap(),
            "MIG-abcdef01-1111-2222-3333-444455556666"
        );
    }

    #[test]
    fn grants_malformed_valid_from() {
        let text = format!(
            "{HEADER}{}",
            row("G1", "hpc", "h1", 1, "2026-4-1", "2026-04-30")
        );
        let p = only_problem(&text, &[]);
        assert_at(&p, 2, "valid_from");
        assert!(p.message.contains("\"2026-4-1\""), "{p}");
    }

    #[test]
    fn grants_malformed_valid_until() {
        let text = format!(
            "{HEADER}{}",
            row("G1", "hpc", "h1", 1, "2026-04-01", "2026-02-30")
        );
        assert_at(&only_problem(&text, &[]), 2, "valid_until");
        let text = format!(
            "{HEADER}{}",
            row("G1", "hpc", "h1", 1, "2026-04-01", "2026-04-30T25:00:00Z")
        );
        assert_at(&only_problem(&text, &[]), 2, "valid_until");
    }

    #[test]
    fn grants_valid_until_before_valid_from() {
        let text = format!(
            "{HEADER}{}",
            row("G1", "hpc", "h1", 1, "2026-04-01", "2026-03-31")
        );
        let p = only_problem(&text, &[]);
        assert_at(&p, 2, "valid_until");
        // A one-day grant is fine.
        let text = format!(
            "{HEADER}{}",
            row("G1", "hpc", "h1", 1, "2026-04-01", "2026-04-01")
        );
        let g = &parse(&text).unwrap().grants[0];
        assert_eq!(g.valid_until_ms - g.valid_from_ms, DAY_MS);
    }

    #[test]
    fn grants_rows_of_one_grant_must_agree() {
        let base = row("G1", "research", "h1", 1, "2026-04-01", "2026-04-30");
        let cases = [
            (
                "program",
                "G1,hpc,Acme AI,uid:1001,csp-a,h1,CARD,2026-04-01,2026-04-30\n",
            ),
            (
                "grantee",
                "G1,research,Acme,uid:1001,csp-a,h1,CARD,2026-04-01,2026-04-30\n",
            ),
            (
                "principal",
                "G1,research,Acme AI,uid:1002,csp-a,h1,CARD,2026-04-01,2026-04-30\n",
            ),
            (
                "csp",
                "G1,research,Acme AI,uid:1001,csp-b,h1,CARD,2026-04-01,2026-04-30\n",
            ),
            (
                "valid_from",
                "G1,research,Acme AI,uid:1001,csp-a,h1,CARD,2026-04-02,2026-04-30\n",
            ),
            (
                "valid_until",
                "G1,research,Acme AI,uid:1001,csp-a,h1,CARD,2026-04-01,2026-05-30\n",
            ),
        ];
        for (field, disagreeing) in cases {
            let text = format!(
                "{HEADER}{base}{}{}",
                row("G1", "research", "h1", 2, "2026-04-01", "2026-04-30"),
                disagreeing.replace("CARD", &uuid(3))
            );
            let p = only_problem(&text, &[]);
            assert_at(&p, 4, field);
            assert!(p.message.contains("line 2"), "{p}");
        }
    }

    #[test]
    fn grants_rows_agree_on_instants_not_spelling() {
        let text = format!(
            "{HEADER}{}{}",
            row("G1", "research", "h1", 1, "2026-04-01", "2026-04-30"),
            row(
                "G1",
                "research",
                "h1",
                2,
                "2026-03-31T15:00:00Z",
                "2026-05-01T00:00:00+09:00"
            )
        );
        assert_eq!(parse(&text).unwrap().grants[0].cards.len(), 2);
    }

    #[test]
    fn grants_same_card_twice_in_one_grant() {
        let text = format!(
            "{HEADER}{}{}{}",
            row("G1", "research", "h1", 1, "2026-04-01", "2026-04-30"),
            row("G1", "research", "h1", 2, "2026-04-01", "2026-04-30"),
            row("G1", "research", "h2", 1, "2026-04-01", "2026-04-30"),
        );
        let p = only_problem(&text, &[]);
        assert_at(&p, 4, "gpu_uuid");
        assert!(p.message.contains("line 2"), "{p}");
        // Case differences do not make it another card.
        let text = format!(
            "{HEADER}{}{}",
            row("G1", "research", "h1", 10, "2026-04-01", "2026-04-30"),
            row("G1", "research", "h1", 10, "2026-04-01", "2026-04-30")
                .replace("GPU-0000000a", "GPU-0000000A"),
        );
        assert_at(&only_problem(&text, &[]), 3, "gpu_uuid");
    }

    #[test]
    fn grants_hpc_spans_at_most_two_hosts() {
        let text = format!(
            "{HEADER}{}{}{}{}",
            row("G1", "hpc", "h1", 1, "2026-04-01", "2026-04-30"),
            row("G1", "hpc", "h2", 2, "2026-04-01", "2026-04-30"),
            row("G1", "hpc", "h1", 3, "2026-04-01", "2026-04-30"),
            row("G1", "hpc", "h3", 4, "2026-04-01", "2026-04-30"),
        );
        let p = only_problem(&text, &[]);
        assert_at(&p, 5, "host_id");
        assert!(p.message.contains("h1, h2, h3"), "{p}");
        // Research grants have no host limit.
        let research = text.replace(",hpc,", ",research,");
        assert_eq!(parse(&research).unwrap().grants[0].cards.len(), 4);
    }

    #[test]
    fn grants_advanced_lasts_at_most_four_calendar_months() {
        let ok = format!(
            "{HEADER}{}",
            row("A1", "advanced", "h1", 1, "2026-03-01", "2026-06-30")
        );
        assert!(parse(&ok).is_ok());
        let too_long = format!(
            "{HEADER}{}",
            row("A1", "advanced", "h1", 1, "2026-03-01", "2026-07-01")
        );
        let p = only_problem(&too_long, &[]);
        assert_at(&p, 2, "valid_until");
        // Months are calendar months in KST: 4 months after 31 Oct is the end of February.
        let ok = format!(
            "{HEADER}{}",
            row("A1", "advanced", "h1", 1, "2026-10-31", "2027-02-27")
        );
        assert!(parse(&ok).is_ok());
        let too_long = format!(
            "{HEADER}{}",
            row("A1", "advanced", "h1", 1, "2026-10-31", "2027-02-28")
        );
        assert_at(&only_problem(&too_long, &[]), 2, "valid_until");
        // Timestamps count by the instant: one millisecond over is over.
        let edge = format!(
            "{HEADER}{}",
            row(
                "A1",
                "advanced",
                "h1",
                1,
                "2026-03-01",
                "2026-07-01T00:00:00+09:00"
            )
        );
        assert!(parse(&edge).is_ok());
        let over = edge.replace("2026-07-01T00:00:00+09:00", "2026-07-01T00:00:00.001+09:00");
        assert_at(&only_problem(&over, &[]), 2, "valid_until");
        // Other programs have no such limit.
        let research = too_long.replace(",advanced,", ",research,");
        assert!(parse(&research).is_ok());
    }

    #[test]
    fn grants_card_overlap_within_the_file() {
        let text = format!(
            "{HEADER}{}{}{}",
            row("G1", "research", "h1", 1, "2026-04-01", "2026-04-30"),
            row("G2", "research", "h1", 2, "2026-04-01", "2026-04-30"),
            row("G2", "research", "h1", 1, "2026-04-01", "2026-04-30"),
        );
        let p = only_problem(&text, &[]);
        assert_at(&p, 4, "gpu_uuid");
        assert!(p.message.contains("grant G1 (line 2)"), "{p}");
    }

    #[test]
    fn grants_card_may_move_between_grants_back_to_back() {
        let text = format!(
            "{HEADER}{}{}",
            row("G1", "research", "h1", 1, "2026-04-01", "2026-04-30"),
            row("G2", "research", "h1", 1, "2026-05-01", "2026-05-31"),
        );
        assert_eq!(parse(&text).unwrap().grants.len(), 2);
    }

    #[test]
    fn grants_card_overlap_with_held_grant() {
        let held = [held_grant(
            "OLD",
            1,
            "2026-01-01T00:00:00+09:00",
            "2026-04-15T00:00:00+09:00",
            None,
        )];
        let text = format!(
            "{HEADER}{}",
            row("G1", "research", "h1", 1, "2026-04-01", "2026-04-30")
        );
        let p = only_problem(&text, &held);
        assert_at(&p, 2, "gpu_uuid");
        assert!(p.message.contains("grant OLD"), "{p}");
    }

    #[test]
    fn grants_revoked_held_grant_frees_its_card_at_revocation() {
        let revoked = [held_grant(
            "OLD",
            1,
            "2026-01-01T00:00:00+09:00",
            "2026-12-31T00:00:00+09:00",
            Some("2026-04-01T00:00:00+09:00"),
        )];
        let text = format!(
            "{HEADER}{}",
            row("G1", "research", "h1", 1, "2026-04-01", "2026-04-30")
        );
        assert!(parse_grants_csv(&text, &revoked, &all_known).is_ok());
        let early = format!(
            "{HEADER}{}",
            row("G1", "research", "h1", 1, "2026-03-31", "2026-04-30")
        );
        assert_at(&only_problem(&early, &revoked), 2, "gpu_uuid");
    }

    #[test]
    fn grants_existing_grant_id_is_an_error() {
        let held = [held_grant(
            "G1",
            1,
            "2026-04-01T00:00:00+09:00",
            "2026-05-01T00:00:00+09:00",
            None,
        )];
        let text = format!(
            "{HEADER}\n{}{}",
            row("G1", "research", "h1", 1, "2026-04-01", "2026-04-30"),
            row("G1", "research", "h1", 2, "2026-04-01", "2026-04-30"),
        );
        let p = only_problem(&text, &held);
        assert_at(&p, 3, "grant_id");
    }

    #[test]
    fn grants_unknown_card_is_a_warning() {
        let text = format!(
            "{HEADER}{}{}",
            row("G1", "research", "h1", 1, "2026-04-01", "2026-04-30"),
            row("G1", "research", "h7", 2, "2026-04-01", "2026-04-30"),
        );
        let known_uuid = uuid(1);
        let known = move |host: &str, card: &str| host == "h1" && card == known_uuid;
        let import = parse_grants_csv(&text, &[], &known).unwrap();
        assert_eq!(import.grants[0].cards.len(), 2);
        assert_eq!(import.warnings.len(), 1);
        assert_at(&import.warnings[0], 3, "gpu_uuid");
    }

    #[test]
    fn grants_every_problem_is_reported_in_line_order() {
        let text = format!(
            "{HEADER}{}{}{}{}",
            row("G1", "nope", "h1", 1, "2026-04-01", "2026-04-30"),
            row("G2", "hpc", "h1", 2, "2026-04-01", "yesterday"),
            "G3,hpc,\"unterminated,uid:1\n",
            row("G4", "hpc", "h1", 4, "2026-04-01", "2026-04-30"),
        );
        let problems = parse(&text).unwrap_err();
        let at: Vec<_> = problems
            .iter()
            .map(|p| (p.line, p.field.as_str()))
            .collect();
        // The unterminated quote swallows the rest of the file: that is what the file says.
        assert_eq!(at, vec![(2, "program"), (3, "valid_until"), (4, "grantee")]);
    }

    #[test]
    fn grants_csv_quote_faults_name_the_column() {
        let text = format!(
            "{HEADER}G1,hpc,Ac\"me,uid:1,csp-a,h1,{},2026-04-01,2026-04-30\n{}",
            uuid(1),
            row("G2", "hpc", "h1", 2, "2026-04-01", "2026-04-30")
        );
        assert_at(&only_problem(&text, &[]), 2, "grantee");
        let text = format!(
            "{HEADER}G1,hpc,\"Acme\"x,uid:1,csp-a,h1,{},2026-04-01,2026-04-30\n",
            uuid(1)
        );
        assert_at(&only_problem(&text, &[]), 2, "grantee");
    }

    #[test]
    fn grants_effective_until_is_cut_by_revocation() {
        let mut g = held_grant(
            "G",
            1,
            "2026-04-01T00:00:00+09:00",
            "2026-05-01T00:00:00+09:00",
            None,
        );
        assert_eq!(g.effective_until_ms(), g.valid_until_ms);
        g.revoked_at_ms = Some(ms("2026-04-10T00:00:00+09:00"));
        assert_eq!(g.effective_until_ms(), ms("2026-04-10T00:00:00+09:00"));
        g.revoked_at_ms = Some(ms("2026-06-01T00:00:00+09:00"));
        assert_eq!(g.effective_until_ms(), g.valid_until_ms);
        g.revoked_at_ms = Some(ms("2026-01-01T00:00:00+09:00"));
        assert_eq!(g.effective_until_ms(), g.valid_from_ms);
    }

    #[test]
    fn grants_program_ids_round_trip() {
        for p in [Program::Hpc, Program::Research, Program::Advanced] {
            assert_eq!(p.as_str().parse::<Program>().unwrap(), p);
        }
        assert!("Research".parse::<Program>().is_err());
    }

    fn field_of(e: &AmendError) -> &'static str {
        match e {
            AmendError::Invalid { field, .. } | AmendError::Conflict { field, .. } => field,
        }
    }

    fn kst(day: &str) -> i64 {
        ms(&format!("{day}T00:00:00+09:00"))
    }

    fn moving(from: u32, host: &str, to: u32, at: &str) -> Amendment {
        Amendment::MoveCard {
            from_gpu_uuid: uuid(from),
            to_host_id: host.into(),
            to_gpu_uuid: uuid(to),
            at_ms: kst(at),
        }
    }

    #[test]
    fn grants_revoke_from_an_instant_once() {
        let g = held_grant(
            "G",
            1,
            "2026-04-01T00:00:00+09:00",
            "2026-05-01T00:00:00+09:00",
            None,
        );
        let (r, detail) = amend(
            &g,
            &[],
            &Amendment::Revoke {
                at_ms: kst("2026-04-10"),
                reason: " idle ".into(),
            },
        )
        .unwrap();
        assert_eq!(r.revoked_at_ms, Some(kst("2026-04-10")));
        assert_eq!(r.effective_until_ms(), kst("2026-04-10"));
        assert!(
            detail.contains("2026-04-10T00:00:00+09:00") && detail.ends_with("reason: idle"),
            "{detail}"
        );
        // At the start is allowed (the grant never ran); before it is not.
        assert!(
            amend(
                &g,
                &[],
                &Amendment::Revoke {
                    at_ms: g.valid_from_ms,
                    reason: String::new()
                }
            )
            .is_ok()
        );
        let early = amend(
            &g,
            &[],
            &Amendment::Revoke {
                at_ms: g.valid_from_ms - 1,
                reason: String::new(),
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                early,
                AmendError::Invalid {
                    field: "at_unix_ms",
                    ..
                }
            ),
            "{early}"
        );
        let late = amend(
            &g,
            &[],
            &Amendment::Revoke {
                at_ms: g.valid_until_ms,
                reason: String::new(),
            },
        )
        .unwrap_err();
        assert_eq!(field_of(&late), "at_unix_ms");
        let twice = amend(
            &r,
            &[],
            &Amendment::Revoke {
                at_ms: kst("2026-04-05"),
                reason: String::new(),
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                twice,
                AmendError::Conflict {
                    field: "grant_id",
                    ..
                }
            ),
            "{twice}"
        );
    }

    #[test]
    fn grants_extend_rechecks_advanced_months_and_overlaps() {
        let mut adv = held_grant(
            "A",
            1,
            "2026-03-01T00:00:00+09:00",
            "2026-05-01T00:00:00+09:00",
            None,
        );
        adv.program = Program::Advanced;
        // To the last day four calendar months on: allowed.
        let (ok, detail) = amend(
            &adv,
            &[],
            &Amendment::Extend {
                valid_until_ms: kst("2026-07-01"),
            },
        )
        .unwrap();
        assert_eq!(ok.valid_until_ms, kst("2026-07-01"));
        assert!(detail.contains("2026-07-01T00:00:00+09:00"), "{detail}");
        let over = amend(
            &adv,
            &[],
            &Amendment::Extend {
                valid_until_ms: kst("2026-07-01") + 1,
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                over,
                AmendError::Invalid {
                    field: "valid_until",
                    ..
                }
            ),
            "{over}"
        );
        assert!(over.to_string().contains("4 calendar months"), "{over}");
        // Not later than now: that is what revoke is for.
        let shorter = amend(
            &adv,
            &[],
            &Amendment::Extend {
                valid_until_ms: kst("2026-04-01"),
            },
        )
        .unwrap_err();
        assert_eq!(field_of(&shorter), "valid_until");

        // Card 1 is taken by grant NEXT from 2026-06-01.
        let g = held_grant(
            "G",
            1,
            "2026-04-01T00:00:00+09:00",
            "2026-05-01T00:00:00+09:00",
            None,
        );
        let next = held_grant(
            "NEXT",
            1,
            "2026-06-01T00:00:00+09:00",
            "2026-07-01T00:00:00+09:00",
            None,
        );
        let others = [next];
        assert!(
            amend(
                &g,
                &others,
                &Amendment::Extend {
                    valid_until_ms: kst("2026-06-01")
                }
            )
            .is_ok()
        );
        let clash = amend(
            &g,
            &others,
            &Amendment::Extend {
                valid_until_ms: kst("2026-06-02"),
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                clash,
                AmendError::Conflict {
                    field: "valid_until",
                    ..
                }
            ),
            "{clash}"
        );
        assert!(clash.to_string().contains("grant NEXT"), "{clash}");
        // Once card 1 has moved out of G, extending G no longer touches it.
        let (moved, _) = amend(&g, &others, &moving(1, "h1", 2, "2026-04-15")).unwrap();
        let (extended, _) = amend(
            &moved,
            &others,
            &Amendment::Extend {
                valid_until_ms: kst("2026-06-30"),
            },
        )
        .unwrap();
        assert_eq!(
            extended.card_interval(&extended.cards[0]),
            (kst("2026-04-01"), kst("2026-04-15"))
        );
        assert_eq!(
            extended.card_interval(&extended.cards[1]),
            (kst("2026-04-15"), kst("2026-06-30"))
        );
        // A revoked grant stays ended.
        let revoked = Grant {
            revoked_at_ms: Some(kst("2026-04-10")),
            ..g.clone()
        };
        let e = amend(
            &revoked,
            &[],
            &Amendment::Extend {
                valid_until_ms: kst("2026-05-10"),
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                AmendError::Conflict {
                    field: "grant_id",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn grants_move_card_keeps_the_old_cards_time() {
        let g = held_grant(
            "G",
            1,
            "2026-04-01T00:00:00+09:00",
            "2026-05-01T00:00:00+09:00",
            None,
        );
        let (m, detail) = amend(&g, &[], &moving(1, "h2", 2, "2026-04-10")).unwrap();
        assert_eq!(m.cards.len(), 2);
        assert_eq!(m.cards[0].until_ms, Some(kst("2026-04-10")));
        assert_eq!(
            m.card_interval(&m.cards[0]),
            (kst("2026-04-01"), kst("2026-04-10"))
        );
        assert_eq!(
            (m.cards[1].host_id.as_str(), m.cards[1].gpu_uuid.as_str()),
            ("h2", uuid(2).as_str())
        );
        assert_eq!(
            m.card_interval(&m.cards[1]),
            (kst("2026-04-10"), kst("2026-05-01"))
        );
        assert!(
            detail.contains(&uuid(1)) && detail.contains(&uuid(2)),
            "{detail}"
        );
        // The old card is no longer there to move at a later time, but can come back.
        let gone = amend(&m, &[], &moving(1, "h1", 3, "2026-04-20")).unwrap_err();
        assert!(
            matches!(
                gone,
                AmendError::Conflict {
                    field: "from_gpu_uuid",
                    ..
                }
            ),
            "{gone}"
        );
        let (back, _) = amend(&m, &[], &moving(2, "h1", 1, "2026-04-20")).unwrap();
        assert_eq!(back.cards.len(), 3);
        assert_eq!(
            back.card_interval(&back.cards[2]),
            (kst("2026-04-20"), kst("2026-05-01"))
        );
        // A revocation cuts the moved-in card too.
        let revoked = Grant {
            revoked_at_ms: Some(kst("2026-04-25")),
            ..back.clone()
        };
        assert_eq!(
            revoked.card_interval(&revoked.cards[2]).1,
            kst("2026-04-25")
        );

        let not_ours = amend(&g, &[], &moving(9, "h1", 2, "2026-04-10")).unwrap_err();
        assert!(
            matches!(
                not_ours,
                AmendError::Invalid {
                    field: "from_gpu_uuid",
                    ..
                }
            ),
            "{not_ours}"
        );
        let bad = amend(
            &g,
            &[],
            &Amendment::MoveCard {
                from_gpu_uuid: uuid(1),
                to_host_id: "h1".into(),
                to_gpu_uuid: "GPU-nope".into(),
                at_ms: kst("2026-04-10"),
            },
        )
        .unwrap_err();
        assert_eq!(field_of(&bad), "to_gpu_uuid");
        let no_host = amend(&g, &[], &moving(1, " ", 2, "2026-04-10")).unwrap_err();
        assert_eq!(field_of(&no_host), "to_host_id");
        let itself = amend(&g, &[], &moving(1, "h1", 1, "2026-04-10")).unwrap_err();
        assert_eq!(field_of(&itself), "to_gpu_uuid");
        let before = amend(&g, &[], &moving(1, "h1", 2, "2026-03-31")).unwrap_err();
        assert_eq!(field_of(&before), "at_unix_ms");
        let after = amend(&g, &[], &moving(1, "h1", 2, "2026-05-01")).unwrap_err();
        assert_eq!(field_of(&after), "at_unix_ms");
        // The same card on another host (a host id corrected) is a move too.
        assert!(amend(&g, &[], &moving(1, "h7", 1, "2026-04-10")).is_ok());
    }

    #[test]
    fn grants_move_card_checks_other_grants_and_hosts() {
        let g = held_grant(
            "G",
            1,
            "2026-04-01T00:00:00+09:00",
            "2026-05-01T00:00:00+09:00",
            None,
        );
        // Card 2 is in grant OTHER until 2026-04-15.
        let other = held_grant(
            "OTHER",
            2,
            "2026-03-01T00:00:00+09:00",
            "2026-04-15T00:00:00+09:00",
            None,
        );
        let others = [other];
        let clash = amend(&g, &others, &moving(1, "h1", 2, "2026-04-10")).unwrap_err();
        assert!(
            matches!(
                clash,
                AmendError::Conflict {
                    field: "to_gpu_uuid",
                    ..
                }
            ),
            "{clash}"
        );
        assert!(clash.to_string().contains("grant OTHER"), "{clash}");
        assert!(amend(&g, &others, &moving(1, "h1", 2, "2026-04-15")).is_ok());

        // hpc: cards on h1 and h2; moving the h2 card to h3 keeps two hosts, moving the h1
        // card (while another stays on h1) to h3 would make three.
        let mut hpc = g.clone();
        hpc.program = Program::Hpc;
        hpc.cards = vec![
            GrantCard::new("h1", uuid(1)),
            GrantCard::new("h1", uuid(2)),
            GrantCard::new("h2", uuid(3)),
        ];
        assert!(amend(&hpc, &[], &moving(3, "h3", 4, "2026-04-10")).is_ok());
        let three = amend(&hpc, &[], &moving(1, "h3", 4, "2026-04-10")).unwrap_err();
        assert!(
            matches!(
                three,
                AmendError::Invalid {
                    field: "to_host_id",
                    ..
                }
            ),
            "{three}"
        );
    }

    #[test]
    fn grants_import_sees_a_moved_out_card_as_free() {
        let g = held_grant(
            "OLD",
            1,
            "2026-04-01T00:00:00+09:00",
            "2026-05-01T00:00:00+09:00",
            None,
        );
        let (moved, _) = amend(&g, &[], &moving(1, "h1", 2, "2026-04-10")).unwrap();
        let held = [moved];
        let free = format!(
            "{HEADER}{}",
            row("NEW", "research", "h1", 1, "2026-04-10", "2026-04-30")
        );
        assert!(parse_grants_csv(&free, &held, &all_known).is_ok());
        let early = format!(
            "{HEADER}{}",
            row("NEW", "research", "h1", 1, "2026-04-09", "2026-04-30")
        );
        assert_at(&only_problem(&early, &held), 2, "gpu_uuid");
        // The card that moved in is taken from the move on.
        let taken = format!(
            "{HEADER}{}",
            row("NEW", "research", "h1", 2, "2026-04-20", "2026-04-30")
        );
        assert_at(&only_problem(&taken, &held), 2, "gpu_uuid");
    }

    #[test]
    fn grants_problem_display_names_line_and_field() {
        let p = problem(7, "valid_until", "bad date");
        assert_eq!(p.to_string(), "line 7, field valid_until: bad date");
    }

    /// A CSV field, quoted when it must be or when the generator says so.
    fn field(value: &str, quote: bool) -> String {
        if quote || value.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", value.replace('"', "\"\""))
        } else {
            value.to_owned()
        }
    }

    #[derive(Debug, Clone)]
    struct GenGrant {
        program: Program,
        grantee: String,
        start_day: u32,
        days: u32,
        hosts: Vec<u8>,
        timestamps: bool,
    }

    fn gen_grant() -> impl Strategy<Value = GenGrant> {
        (
            prop_oneof![
                Just(Program::Hpc),
                Just(Program::Research),
                Just(Program::Advanced)
            ],
            "[A-Za-z][A-Za-z ,\"&.-]{0,12}[A-Za-z.]",
            0u32..700,
            // 120 days fit in 4 calendar months wherever they start.
            1u32..=120,
            proptest::collection::vec(0u8..4, 1..6),
            any::<bool>(),
        )
            .prop_map(
                |(program, grantee, start_day, days, mut hosts, timestamps)| {
                    if program == Program::Hpc {
                        for h in &mut hosts {
                            *h %= 2;
                        }
                    }
                    GenGrant {
                        program,
                        grantee,
                        start_day,
                        days,
                        hosts,
                        timestamps,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn grants_generated_valid_files_parse(
            grants in proptest::collection::vec(gen_grant(), 1..6),
            quote_mask in any::<u64>(),
            crlf in any::<bool>(),
            bom in any::<bool>(),
        ) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut text = String::new();
            if bom {
                text.push('\u{feff}');
            }
            text.push_str(&COLUMNS.join(","));
            text.push_str(eol);
            let epoch = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
            let mut rows = 0usize;
            let mut n = 0u64;
            for (gi, g) in grants.iter().enumerate() {
                let first = epoch + chrono::Days::new(u64::from(g.start_day));
                let last = first + chrono::Days::new(u64::from(g.days - 1));
                let (from, until) = if g.timestamps {
                    (
                        format!("{first}T00:00:00+09:00"),
                        format!("{}T15:00:00Z", last),
                    )
                } else {
                    (first.to_string(), last.to_string())
                };
                for (ci, host) in g.hosts.iter().enumerate() {
                    let uuid = format!("GPU-{gi:08x}-0000-0000-0000-{ci:012x}");
                    let values = [
                        format!("G-{gi}"),
                        g.program.as_str().to_owned(),
                        g.grantee.clone(),
                        "uid:1001;group:lab".to_owned(),
                        "csp-a".to_owned(),
                        format!("host-{host}"),
                        uuid,
                        from.clone(),
                        until.clone(),
                    ];
                    let line: Vec<String> = values
                        .iter()
                        .map(|v| {
                            n += 1;
                            field(v, (quote_mask >> (n % 64)) & 1 == 1)
                        })
                        .collect();
                    text.push_str(&line.join(","));
                    text.push_str(eol);
                    rows += 1;
                }
            }
            let import = parse(&text).map_err(|p| TestCaseError::fail(format!("{p:#?}\n{text}")))?;
            prop_assert_eq!(import.grants.len(), grants.len());
            let cards: usize = import.grants.iter().map(|g| g.cards.len()).sum();
            prop_assert_eq!(cards, rows);
            for (parsed, generated) in import.grants.iter().zip(&grants) {
                prop_assert_eq!(&parsed.grantee, generated.grantee.trim());
                prop_assert_eq!(
                    parsed.valid_until_ms - parsed.valid_from_ms,
                    i64::from(generated.days) * DAY_MS
                );
            }
        }
    }
}
