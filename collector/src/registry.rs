//! The providers and hosts registry (pure): which CSPs the programs lease from, what each
//! committed, and which CSP each host belongs to.
//!
//! Rules:
//! - A CSP id is normalised before anything compares it: trimmed and lowercased, so `KT`,
//!   ` kt` and `kt` are one provider. An id is 1-64 of `a-z 0-9 - _ .` after that.
//! - The providers file is `csp,name_ko,name_en,committed_hpc,committed_research,
//!   committed_advanced`, one row per CSP; a committed count is a whole number of cards (empty:
//!   0). Importing a CSP already held replaces its names and commitments.
//! - The hosts file is `host_id,csp`; `hosts register` is the same for one host. A host's CSP
//!   must be a registered provider; registering a host again under another CSP moves it.
//! - Both imports are all or nothing and every problem names its line and field; a CSP or host
//!   named twice in one file is a problem (two spellings of one CSP included).
//! - Grant imports are checked against the registry once it holds any provider: a row naming
//!   an unknown CSP is refused (field `csp`), and so is one naming a host registered to another
//!   CSP (field `host_id`). With an empty registry grants are taken as before, so ledgers made
//!   before the registry keep working. A host the registry does not hold is not refused (the
//!   hosts part of the registry is optional).
//!
//! Every change is kept with who (the token's name) and when, as grant changes are
//! (`Store::registry_history`).

use std::collections::HashMap;

use crate::csv::split_csv;
use crate::grants::{ImportProblem, Program};

/// The providers file's columns.
pub const PROVIDER_COLUMNS: [&str; 6] = [
    "csp",
    "name_ko",
    "name_en",
    "committed_hpc",
    "committed_research",
    "committed_advanced",
];

/// The hosts file's columns.
pub const HOST_COLUMNS: [&str; 2] = ["host_id", "csp"];

/// Longest display name accepted.
const MAX_NAME_CHARS: usize = 200;

/// A CSP as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Provider {
    /// Normalised ([`normalize_csp`]).
    pub csp: String,
    pub name_ko: String,
    pub name_en: String,
    /// Cards committed to `hpc`, `research` and `advanced`.
    pub committed_hpc: u32,
    pub committed_research: u32,
    pub committed_advanced: u32,
    /// When it was last imported, and by whom (the token's name); 0 and empty before storing.
    pub updated_ms: i64,
    pub updated_by: String,
}

impl Provider {
    /// The cards committed to `program`.
    pub fn committed(&self, program: &str) -> u32 {
        match program {
            "hpc" => self.committed_hpc,
            "research" => self.committed_research,
            "advanced" => self.committed_advanced,
            _ => 0,
        }
    }

    /// What the history keeps of it.
    pub fn describe(&self) -> String {
        format!(
            "name_ko={} name_en={} committed hpc={} research={} advanced={}",
            self.name_ko,
            self.name_en,
            self.committed_hpc,
            self.committed_research,
            self.committed_advanced
        )
    }
}

/// A host as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct RegisteredHost {
    pub host_id: String,
    /// Normalised.
    pub csp: String,
    pub updated_ms: i64,
    pub updated_by: String,
}

/// One change to the registry: who, when, what.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RegistryChange {
    pub at_ms: i64,
    pub actor: String,
    /// `provider` or `host`.
    pub kind: String,
    /// The CSP id or host id.
    pub subject: String,
    /// `add` or `change`.
    pub action: String,
    pub detail: String,
}

/// The registry's form of a CSP id: trimmed and lowercased.
pub fn normalize_csp(csp: &str) -> String {
    csp.trim().to_lowercase()
}

/// Whether `id` (already normalised) is a CSP id.
pub fn valid_csp(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// Whether `id` is a host id (as agent and host ids are everywhere: 1-128 of letters, digits,
/// `-_.:`).
pub fn valid_host(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

fn problem(line: u32, field: &str, message: impl Into<String>) -> ImportProblem {
    ImportProblem {
        line,
        field: field.to_owned(),
        message: message.into(),
    }
}

/// The rows of a file with `columns`, each with its line, after its header; problems of the
/// header and of rows' shapes are pushed to `problems`.
fn rows_of(
    text: &str,
    columns: &[&str],
    what: &str,
    problems: &mut Vec<ImportProblem>,
) -> Vec<(u32, Vec<String>)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let records = split_csv(text);
    let mut records = records.into_iter().filter(|r| !r.is_blank());
    let expected = columns.join(",");
    let Some(header) = records.next() else {
        problems.push(problem(
            1,
            "header",
            format!("{what} file is empty; the first line must be the header {expected}"),
        ));
        return vec![];
    };
    match &header.body {
        Err(fault) => {
            problems.push(problem(header.line, "header", fault.message));
            return vec![];
        }
        Ok(fields) if !fields.iter().map(|f| f.trim()).eq(columns.iter().copied()) => {
            let found: Vec<&str> = fields.iter().map(|f| f.trim()).collect();
            problems.push(problem(
                header.line,
                "header",
                format!("expected the header {expected}, found {}", found.join(",")),
            ));
            return vec![];
        }
        Ok(_) => {}
    }
    let mut rows = Vec::new();
    for rec in records {
        match rec.body {
            Err(fault) => {
                let field = columns.get(fault.column).copied().unwrap_or("row");
                problems.push(problem(rec.line, field, fault.message));
            }
            Ok(fields) if fields.len() != columns.len() => problems.push(problem(
                rec.line,
                "row",
                format!("expected {} columns, found {}", columns.len(), fields.len()),
            )),
            Ok(fields) => rows.push((
                rec.line,
                fields.into_iter().map(|f| f.trim().to_owned()).collect(),
            )),
        }
    }
    if rows.is_empty() && problems.is_empty() {
        problems.push(problem(
            header.line,
            "row",
            format!("{what} file has no rows"),
        ));
    }
    rows
}

/// A CSP id cell, normalised; a problem for a bad one.
fn csp_cell(line: u32, field: &str, raw: &str, problems: &mut Vec<ImportProblem>) -> String {
    let id = normalize_csp(raw);
    if id.is_empty() {
        problems.push(problem(line, field, "required field is empty"));
    } else if !valid_csp(&id) {
        problems.push(problem(
            line,
            field,
            format!("{raw:?} is not a CSP id: 1-64 of a-z, 0-9, '-', '_', '.' (case is ignored)"),
        ));
    }
    id
}

/// Parses and validates a providers file. All or nothing.
pub fn parse_providers_csv(text: &str) -> Result<Vec<Provider>, Vec<ImportProblem>> {
    let mut problems = Vec::new();
    let rows = rows_of(text, &PROVIDER_COLUMNS, "providers", &mut problems);
    let mut seen: HashMap<String, (u32, String)> = HashMap::new();
    let mut providers = Vec::new();
    for (line, f) in rows {
        let csp = csp_cell(line, "csp", &f[0], &mut problems);
        if let Some((first, spelled)) = seen.get(&csp) {
            problems.push(problem(
                line,
                "csp",
                format!(
                    "{:?} is the CSP {csp} of line {first} ({spelled:?}); CSP ids ignore case, name each once",
                    f[0]
                ),
            ));
        } else if !csp.is_empty() {
            seen.insert(csp.clone(), (line, f[0].clone()));
        }
        for (i, field) in [(1, "name_ko"), (2, "name_en")] {
            if f[i].is_empty() {
                problems.push(problem(line, field, "required field is empty"));
            } else if f[i].chars().count() > MAX_NAME_CHARS {
                problems.push(problem(
                    line,
                    field,
                    format!("longer than {MAX_NAME_CHARS} characters"),
                ));
            }
        }
        let mut committed = [0u32; 3];
        for (k, slot) in committed.iter_mut().enumerate() {
            let (raw, field) = (&f[3 + k], PROVIDER_COLUMNS[3 + k]);
            if raw.is_empty() {
                continue;
            }
            match raw.replace([',', '_'], "").parse::<u32>() {
                Ok(n) => *slot = n,
                Err(_) => problems.push(problem(
                    line,
                    field,
                    format!("{raw:?} is not a whole number of cards"),
                )),
            }
        }
        providers.push(Provider {
            csp,
            name_ko: f[1].clone(),
            name_en: f[2].clone(),
            committed_hpc: committed[0],
            committed_research: committed[1],
            committed_advanced: committed[2],
            updated_ms: 0,
            updated_by: String::new(),
        });
    }
    if problems.is_empty() {
        Ok(providers)
    } else {
        problems.sort_by_key(|p| p.line);
        Err(problems)
    }
}

/// Parses and validates a hosts file against the providers held. All or nothing.
pub fn parse_hosts_csv(
    text: &str,
    providers: &[Provider],
) -> Result<Vec<RegisteredHost>, Vec<ImportProblem>> {
    let mut problems = Vec::new();
    let rows = rows_of(text, &HOST_COLUMNS, "hosts", &mut problems);
    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut hosts = Vec::new();
    for (line, f) in rows {
        let host = f[0].clone();
        match host_problem(&host) {
            Some(m) => problems.push(problem(line, "host_id", m)),
            None => {
                if let Some(first) = seen.insert(host.clone(), line) {
                    problems.push(problem(
                        line,
                        "host_id",
                        format!("host {host} is also on line {first}; name each host once"),
                    ));
                }
            }
        }
        let csp = csp_cell(line, "csp", &f[1], &mut problems);
        if valid_csp(&csp) {
            if let Some(m) = unknown_provider(&csp, providers) {
                problems.push(problem(line, "csp", m));
            }
        }
        hosts.push(RegisteredHost {
            host_id: host,
            csp,
            updated_ms: 0,
            updated_by: String::new(),
        });
    }
    if problems.is_empty() {
        Ok(hosts)
    } else {
        problems.sort_by_key(|p| p.line);
        Err(problems)
    }
}

/// Why `host` is not a host id, if it is not.
pub fn host_problem(host: &str) -> Option<String> {
    if host.is_empty() {
        Some("required field is empty".into())
    } else if !valid_host(host) {
        Some(format!(
            "{host:?} is not a host id: 1-128 letters, digits, '-', '_', '.', ':'"
        ))
    } else {
        None
    }
}

/// Why `csp` (normalised) is refused as a provider, if it is.
pub fn unknown_provider(csp: &str, providers: &[Provider]) -> Option<String> {
    if providers.iter().any(|p| p.csp == csp) {
        return None;
    }
    let known: Vec<&str> = providers.iter().map(|p| p.csp.as_str()).collect();
    Some(format!(
        "CSP {csp} is not a registered provider (registered: {}); `providers import` adds it",
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    ))
}

/// The registry's problems with a grants file (already split of its `gpu_model` column):
/// unknown CSPs and hosts registered to another CSP, by line and field. None while the
/// registry holds no provider.
pub fn check_grants_csv(
    text: &str,
    providers: &[Provider],
    hosts: &[RegisteredHost],
) -> Vec<ImportProblem> {
    if providers.is_empty() {
        return vec![];
    }
    let host_csp: HashMap<&str, &str> = hosts
        .iter()
        .map(|h| (h.host_id.as_str(), h.csp.as_str()))
        .collect();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut problems = Vec::new();
    // The grants parser reports the header and the rows' shapes; only well-formed rows are
    // looked at here.
    for rec in split_csv(text).iter().filter(|r| !r.is_blank()).skip(1) {
        let Ok(f) = &rec.body else { continue };
        if f.len() != crate::grants::COLUMNS.len() {
            continue;
        }
        let (raw_csp, host) = (f[4].trim(), f[5].trim());
        let csp = normalize_csp(raw_csp);
        if csp.is_empty() {
            continue;
        }
        if let Some(m) = unknown_provider(&csp, providers) {
            problems.push(problem(rec.line, "csp", m));
            continue;
        }
        if let Some(other) = host_csp.get(host).filter(|&&c| c != csp) {
            problems.push(problem(
                rec.line,
                "host_id",
                format!("host {host} is registered to CSP {other}, not {csp}"),
            ));
        }
    }
    problems
}

/// The programs, in report order.
pub fn programs() -> [&'static str; 3] {
    [
        Program::Hpc.as_str(),
        Program::Research.as_str(),
        Program::Advanced.as_str(),
    ]
}

/// The history rows an import of `new` makes against the providers `held`: `add` for a CSP
/// not held, `change` for one whose names or commitments differ; nothing for one unchanged.
pub fn provider_changes(
    held: &[Provider],
    new: &[Provider],
) -> Vec<(String, &'static str, String)> {
    new.iter()
        .filter_map(|p| match held.iter().find(|h| h.csp == p.csp) {
            None => Some((p.csp.clone(), "add", p.describe())),
            Some(h) if h.describe() != p.describe() => Some((
                p.csp.clone(),
                "change",
                format!("{} (was {})", p.describe(), h.describe()),
            )),
            Some(_) => None,
        })
        .collect()
}

/// The history rows a registration of `new` makes against the hosts `held`.
pub fn host_changes(
    held: &[RegisteredHost],
    new: &[RegisteredHost],
) -> Vec<(String, &'static str, String)> {
    new.iter()
        .filter_map(|n| match held.iter().find(|h| h.host_id == n.host_id) {
            None => Some((n.host_id.clone(), "add", format!("csp={}", n.csp))),
            Some(h) if h.csp != n.csp => Some((
                n.host_id.clone(),
                "change",
                format!("csp={} (was {})", n.csp, h.csp),
            )),
            Some(_) => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The fleet figures of a report

/// One CSP and program of a report's fleet table.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct FleetRow {
    pub csp: String,
    /// Empty for a CSP the registry does not hold.
    pub name_ko: String,
    pub name_en: String,
    /// `hpc`, `research`, `advanced`; empty: the CSP's cards no grant held in the period.
    pub program: String,
    /// What the CSP committed to the program (the registry).
    pub committed_cards: u32,
    /// Hosts of the registered cards (for the empty program: also registered hosts that
    /// reported no card).
    pub registered_hosts: u32,
    /// Cards the CSP's hosts reported in a Hello, held by a grant of the program in the
    /// elapsed period (for the empty program: held by none).
    pub registered_cards: u32,
    /// Registered cards whose latest window (see [`CardState`]) was healthy.
    pub healthy_cards: u32,
    /// Cards of the program's grants of this CSP in the elapsed period, reported or not.
    pub granted_cards: u32,
    /// Granted cards with delivered time in the period.
    pub delivered_cards: u32,
}

/// What a fleet column means, in English or Korean (the CSV's definition row, the notes
/// under the table, the page).
pub fn fleet_definition(column: &str, ko: bool) -> &'static str {
    match (column, ko) {
        ("committed_cards", false) => {
            "Cards the CSP committed to the program (the providers registry)"
        }
        ("committed_cards", true) => "사업자가 해당 사업에 약정한 GPU 수(사업자 등록부)",
        ("registered_hosts", false) => {
            "Hosts of the registered cards; on the row without a program also registered hosts that reported no card"
        }
        ("registered_hosts", true) => {
            "등록 GPU가 있는 서버 수. 사업 없는 행은 GPU를 보고하지 않은 등록 서버 포함"
        }
        ("registered_cards", false) => {
            "Cards the CSP's hosts reported, held by a grant of the program in the period (no program: by none)"
        }
        ("registered_cards", true) => {
            "사업자 서버가 보고한 GPU 중 기간 중 해당 사업 과제에 배정된 수(사업 없음: 미배정)"
        }
        ("healthy_cards", false) => {
            "Registered cards whose latest window in the last 15 minutes of the period was healthy"
        }
        ("healthy_cards", true) => "기간 마지막 15분 안의 최근 기록이 정상인 등록 GPU 수",
        ("granted_cards", false) => {
            "Cards of the program's grants of this CSP in the period, reported or not"
        }
        ("granted_cards", true) => "기간 중 해당 사업자·사업 과제에 배정된 GPU 수(보고 여부 무관)",
        ("delivered_cards", false) => "Granted cards with delivered time in the period",
        ("delivered_cards", true) => "기간 중 제공 시간이 있는 배정 GPU 수",
        _ => "",
    }
}

/// The fleet table's columns (as in the CSV).
pub const FLEET_COLUMNS: [&str; 6] = [
    "committed_cards",
    "registered_hosts",
    "registered_cards",
    "healthy_cards",
    "granted_cards",
    "delivered_cards",
];

/// A card as the Hellos know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownCard {
    pub host_id: String,
    /// The host's CSP as its agent says it (the registry's wins when it holds the host).
    pub csp: String,
    pub gpu_uuid: String,
}

/// A card's latest window up to the end of the report's elapsed period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CardState {
    /// `ok`, with no unavailable time.
    pub healthy: bool,
}

/// A granted card of the report: its grant's CSP and program, and whether it delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantedCard {
    pub csp: String,
    pub program: String,
    pub host_id: String,
    pub gpu_uuid: String,
    pub delivered: bool,
}

/// The fleet table: one row per CSP and program that has a commitment or a granted card, and
/// one row (program empty) per CSP for its reported cards no grant held, when there are any
/// (and for a registered provider that would otherwise have no row).
/// Empty while the registry holds no provider (ledgers from before the registry report as
/// they did). `program` keeps only that program's rows.
pub fn fleet(
    providers: &[Provider],
    registered: &[RegisteredHost],
    known: &[KnownCard],
    health: &HashMap<String, CardState>,
    granted: &[GrantedCard],
    program: Option<&str>,
) -> Vec<FleetRow> {
    use std::collections::{BTreeMap, BTreeSet};
    if providers.is_empty() {
        return vec![];
    }
    let reg_csp: HashMap<&str, &str> = registered
        .iter()
        .map(|h| (h.host_id.as_str(), h.csp.as_str()))
        .collect();
    let host_csp = |host: &str, said: &str| {
        reg_csp
            .get(host)
            .map_or_else(|| normalize_csp(said), |c| c.to_string())
    };
    // Which programs held each card in the period (a card moved between grants can be in
    // two).
    let mut card_programs: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    for g in granted {
        card_programs
            .entry(g.gpu_uuid.as_str())
            .or_default()
            .insert(g.program.as_str());
    }
    #[derive(Default)]
    struct Acc<'a> {
        hosts: BTreeSet<&'a str>,
        cards: BTreeSet<&'a str>,
        healthy: BTreeSet<&'a str>,
        granted: BTreeSet<&'a str>,
        delivered: BTreeSet<&'a str>,
    }
    let mut rows: BTreeMap<(String, String), Acc<'_>> = BTreeMap::new();
    for p in providers {
        for prog in programs() {
            if p.committed(prog) > 0 {
                rows.entry((p.csp.clone(), prog.to_string())).or_default();
            }
        }
    }
    for k in known {
        let csp = host_csp(&k.host_id, &k.csp);
        let progs: Vec<&str> = card_programs
            .get(k.gpu_uuid.as_str())
            .map_or_else(|| vec![""], |s| s.iter().copied().collect());
        for prog in progs {
            let acc = rows.entry((csp.clone(), prog.to_string())).or_default();
            acc.hosts.insert(&k.host_id);
            acc.cards.insert(&k.gpu_uuid);
            if health.get(&k.gpu_uuid).is_some_and(|s| s.healthy) {
                acc.healthy.insert(&k.gpu_uuid);
            }
        }
    }
    // Every registered provider is listed, with nothing committed, granted or reported too.
    for p in providers {
        if !rows.keys().any(|(csp, _)| *csp == p.csp) {
            rows.entry((p.csp.clone(), String::new())).or_default();
        }
    }
    // Registered hosts that reported no card still count as hosts of their CSP.
    let reporting: BTreeSet<&str> = known.iter().map(|k| k.host_id.as_str()).collect();
    for h in registered
        .iter()
        .filter(|h| !reporting.contains(h.host_id.as_str()))
    {
        rows.entry((h.csp.clone(), String::new()))
            .or_default()
            .hosts
            .insert(&h.host_id);
    }
    for g in granted {
        let acc = rows
            .entry((normalize_csp(&g.csp), g.program.clone()))
            .or_default();
        acc.granted.insert(&g.gpu_uuid);
        if g.delivered {
            acc.delivered.insert(&g.gpu_uuid);
        }
    }
    let order = |prog: &str| programs().iter().position(|p| *p == prog).unwrap_or(3);
    let mut out: Vec<FleetRow> = rows
        .into_iter()
        .filter(|((_, prog), _)| program.is_none_or(|want| want == prog))
        .map(|((csp, prog), a)| {
            let reg = providers.iter().find(|p| p.csp == csp);
            FleetRow {
                name_ko: reg.map(|p| p.name_ko.clone()).unwrap_or_default(),
                name_en: reg.map(|p| p.name_en.clone()).unwrap_or_default(),
                committed_cards: reg.map_or(0, |p| p.committed(&prog)),
                registered_hosts: a.hosts.len() as u32,
                registered_cards: a.cards.len() as u32,
                healthy_cards: a.healthy.len() as u32,
                granted_cards: a.granted.len() as u32,
                delivered_cards: a.delivered.len() as u32,
                csp,
                program: prog,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (a.csp.as_str(), order(&a.program)).cmp(&(b.csp.as_str(), order(&b.program)))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "csp,name_ko,name_en,committed_hpc,committed_research,committed_advanced\n";

    fn providers(text: &str) -> Vec<Provider> {
        parse_providers_csv(&format!("{HEAD}{text}")).unwrap()
    }

    #[test]
    fn csp_ids_ignore_case_and_space() {
        let p = providers("KT,케이티,KT Cloud,\"1,060\",960,\n Naver ,네이버,Naver Cloud,0,0,16\n");
        assert_eq!(p[0].csp, "kt");
        assert_eq!(p[0].committed_hpc, 1060);
        assert_eq!(p[0].committed_research, 960);
        assert_eq!(p[0].committed_advanced, 0);
        assert_eq!(p[1].csp, "naver");
        assert_eq!(p[1].committed("advanced"), 16);
    }

    #[test]
    fn two_spellings_of_one_csp_are_refused_with_line_and_field() {
        let e = parse_providers_csv(&format!("{HEAD}KT,케이티,KT,1,0,0\nkt,케이티,KT,1,0,0\n"))
            .unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].line, e[0].field.as_str()), (3, "csp"));
        assert!(e[0].message.contains("line 2"), "{}", e[0].message);
    }

    #[test]
    fn every_bad_field_is_named() {
        let e = parse_providers_csv(&format!("{HEAD}k t,,KT,x,-1,\n")).unwrap_err();
        let got: Vec<(u32, &str)> = e.iter().map(|p| (p.line, p.field.as_str())).collect();
        assert_eq!(
            got,
            [
                (2, "csp"),
                (2, "name_ko"),
                (2, "committed_hpc"),
                (2, "committed_research")
            ]
        );
        let e = parse_providers_csv("csp,name\nkt,x\n").unwrap_err();
        assert_eq!((e[0].line, e[0].field.as_str()), (1, "header"));
    }

    #[test]
    fn hosts_need_a_registered_provider() {
        let p = providers("kt,케이티,KT,1,0,0\n");
        let h = parse_hosts_csv("host_id,csp\nh1,KT\nh2,nhn\nh1,kt\n", &p).unwrap_err();
        let got: Vec<(u32, &str)> = h.iter().map(|p| (p.line, p.field.as_str())).collect();
        assert_eq!(got, [(3, "csp"), (4, "host_id")]);
        let ok = parse_hosts_csv("host_id,csp\nh1,KT\n", &p).unwrap();
        assert_eq!(ok[0].csp, "kt");
    }

    #[test]
    fn grants_are_checked_only_once_a_provider_is_registered() {
        let grants = "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n\
                      G1,hpc,A,uid:1,KT,h1,GPU-1,2026-04-01,2026-04-30\n\
                      G2,hpc,A,uid:1,nhn,h2,GPU-2,2026-04-01,2026-04-30\n\
                      G3,hpc,A,uid:1,kt,h3,GPU-3,2026-04-01,2026-04-30\n";
        assert!(check_grants_csv(grants, &[], &[]).is_empty());
        let p = providers("kt,케이티,KT,1,0,0\nother,기타,Other,0,0,0\n");
        let hosts = [RegisteredHost {
            host_id: "h3".into(),
            csp: "other".into(),
            ..Default::default()
        }];
        let e = check_grants_csv(grants, &p, &hosts);
        let got: Vec<(u32, &str)> = e.iter().map(|p| (p.line, p.field.as_str())).collect();
        assert_eq!(got, [(3, "csp"), (4, "host_id")]);
    }

    #[test]
    fn changes_name_what_moved() {
        let held = providers("kt,케이티,KT,1,0,0\n");
        let new = providers("KT,케이티,KT,2,0,0\nnhn,엔에이치엔,NHN,0,1,0\n");
        let c = provider_changes(&held, &new);
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].0.as_str(), c[0].1), ("kt", "change"));
        assert!(c[0].2.contains("hpc=2") && c[0].2.contains("was"));
        assert_eq!((c[1].0.as_str(), c[1].1), ("nhn", "add"));
        assert!(provider_changes(&new, &new).is_empty());
    }

    #[test]
    fn the_fleet_counts_each_card_where_it_belongs() {
        let p = providers("kt,케이티,KT Cloud,4,2,0\n");
        let registered = [
            RegisteredHost {
                host_id: "h1".into(),
                csp: "kt".into(),
                ..Default::default()
            },
            RegisteredHost {
                host_id: "h9".into(),
                csp: "kt".into(),
                ..Default::default()
            },
        ];
        let card = |host: &str, csp: &str, gpu: &str| KnownCard {
            host_id: host.into(),
            csp: csp.into(),
            gpu_uuid: gpu.into(),
        };
        // h1's agent says "KT": the registry's "kt" is what counts.
        let known = [
            card("h1", "KT", "A"),
            card("h1", "KT", "B"),
            card("h1", "KT", "C"),
        ];
        let health = HashMap::from([
            ("A".to_string(), CardState { healthy: true }),
            ("B".to_string(), CardState { healthy: false }),
            ("C".to_string(), CardState { healthy: true }),
        ]);
        let g = |prog: &str, gpu: &str, delivered| GrantedCard {
            csp: "KT".into(),
            program: prog.into(),
            host_id: "h1".into(),
            gpu_uuid: gpu.into(),
            delivered,
        };
        let granted = [
            g("hpc", "A", true),
            g("hpc", "B", false),
            g("hpc", "Z", false),
        ];
        let rows = fleet(&p, &registered, &known, &health, &granted, None);
        let got: Vec<(&str, &str, [u32; 6])> = rows
            .iter()
            .map(|r| {
                (
                    r.csp.as_str(),
                    r.program.as_str(),
                    [
                        r.committed_cards,
                        r.registered_hosts,
                        r.registered_cards,
                        r.healthy_cards,
                        r.granted_cards,
                        r.delivered_cards,
                    ],
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("kt", "hpc", [4, 1, 2, 1, 3, 1]),
                ("kt", "research", [2, 0, 0, 0, 0, 0]),
                ("kt", "", [0, 2, 1, 1, 0, 0]),
            ]
        );
        assert!(fleet(&[], &registered, &known, &health, &granted, None).is_empty());
        let quiet = providers("kt,케이티,KT Cloud,4,2,0\nidle,아이들,Idle,0,0,0\n");
        let rows = fleet(&quiet, &registered, &known, &health, &granted, None);
        assert_eq!(
            rows.iter().find(|r| r.csp == "idle").map(|r| (
                r.csp.as_str(),
                r.program.as_str(),
                r.registered_cards
            )),
            Some(("idle", "", 0)),
            "a registered provider with nothing is still listed"
        );
        let hpc = fleet(&p, &registered, &known, &health, &granted, Some("hpc"));
        assert_eq!(hpc.len(), 1);
    }
}
