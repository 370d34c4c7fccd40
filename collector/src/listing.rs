//! The operator and auditor listings of the CLI — `hosts`, `alarms`, `events`, `timeline`,
//! `violations` — rendered from the Query service's replies (pure: the caller fetches, and
//! passes the clock where a figure needs one).
//!
//! Rules every listing keeps:
//! - A table is [`crate::report::grid`]: a header row, a rule, one row per item, columns
//!   aligned. Times are Korean (KST, UTC+9, no daylight saving) to the second, and the header
//!   names the zone (`TIME_KST`); absent values are `-`.
//! - `--json` is one array of objects, one per row. Every instant comes twice: exact, in ms
//!   since the Unix epoch (`at_unix_ms`), and as RFC 3339 in KST with milliseconds (`at`).
//!   Absent values are `null`; durations and energy stay in the wire's integer units (ms,
//!   mJ, bytes), so nothing is rounded.

use chrono::{DateTime, SecondsFormat};
use gpumeter_proto::v1;
use serde::Serialize;

use crate::episodes::{Episode, episodes};
use crate::report::{grid, kst};

/// An instant as a table shows it: `2026-04-10 10:00:00` (KST; the header names the zone).
pub fn kst_cell(ms: i64) -> String {
    match DateTime::from_timestamp_millis(ms) {
        Some(t) => t
            .with_timezone(&kst())
            .format("%Y-%m-%d %H:%M:%S")
            .to_string(),
        None => format!("{ms} ms"),
    }
}

/// An instant as JSON carries it beside its ms: RFC 3339 in KST, to the millisecond.
pub fn rfc3339(ms: i64) -> String {
    match DateTime::from_timestamp_millis(ms) {
        Some(t) => t
            .with_timezone(&kst())
            .to_rfc3339_opts(SecondsFormat::Millis, false),
        None => String::new(),
    }
}

/// The default period of `events`, `timeline` and `violations`: the last `days` Korean
/// calendar days, today included, as `FROM..UNTIL` dates (the end date is inclusive).
pub fn last_days(now_ms: i64, days: u32) -> String {
    let today = DateTime::from_timestamp_millis(now_ms)
        .unwrap_or_default()
        .with_timezone(&kst())
        .date_naive();
    let from = today - chrono::Days::new(u64::from(days.max(1) - 1));
    format!("{from}..{today}")
}

/// A span of time for a table: `45s`, `12m 5s`, `3h 2m`, `4d 1h`.
pub fn age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Card time for a table, in seconds: `60s`, `12.5s`.
fn secs(ms: u64) -> String {
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn json<T: Serialize>(rows: &[T]) -> Result<String, serde_json::Error> {
    Ok(serde_json::to_string_pretty(rows)? + "\n")
}

// ---------------------------------------------------------------------------------------------
// hosts

/// One agent as `hosts --json` lists it.
#[derive(Debug, Serialize)]
pub struct HostJson<'a> {
    pub agent_id: &'a str,
    pub host_id: &'a str,
    pub csp: &'a str,
    pub hostname: &'a str,
    pub agent_version: &'a str,
    pub cards: Vec<&'a str>,
    pub durable_seq: u64,
    /// The agent's head as its last Hello to this collector said (null: not known here).
    pub agent_head_seq: Option<u64>,
    /// `agent_head_seq − durable_seq`, at least 0: records the agent held then that the
    /// collector does not hold yet.
    pub seq_lag: Option<u64>,
    pub last_hello_unix_ms: i64,
    pub last_hello: String,
    pub last_record_unix_ms: Option<i64>,
    pub last_record: Option<String>,
    /// The later of the last Hello and the receipt of the latest durable record.
    pub last_seen_unix_ms: i64,
    pub last_seen: String,
    /// `now − last_seen`.
    pub lag_ms: i64,
}

fn host_json(h: &v1::HostInfo, now_ms: i64) -> HostJson<'_> {
    let last_seen = h
        .last_record_unix_ms
        .map_or(h.last_seen_unix_ms, |r| r.max(h.last_seen_unix_ms));
    HostJson {
        agent_id: &h.agent_id,
        host_id: &h.host_id,
        csp: &h.csp,
        hostname: &h.hostname,
        agent_version: &h.agent_version,
        cards: h.gpus.iter().map(|g| g.uuid.as_str()).collect(),
        durable_seq: h.durable_seq,
        agent_head_seq: h.agent_head_seq,
        seq_lag: h
            .agent_head_seq
            .map(|head| head.saturating_sub(h.durable_seq)),
        last_hello_unix_ms: h.last_seen_unix_ms,
        last_hello: rfc3339(h.last_seen_unix_ms),
        last_record_unix_ms: h.last_record_unix_ms,
        last_record: h.last_record_unix_ms.map(rfc3339),
        last_seen_unix_ms: last_seen,
        last_seen: rfc3339(last_seen),
        lag_ms: (now_ms - last_seen).max(0),
    }
}

pub fn hosts_json(hosts: &[v1::HostInfo], now_ms: i64) -> Result<String, serde_json::Error> {
    json(
        &hosts
            .iter()
            .map(|h| host_json(h, now_ms))
            .collect::<Vec<_>>(),
    )
}

pub fn hosts_table(hosts: &[v1::HostInfo], now_ms: i64) -> String {
    let header = [
        "AGENT",
        "HOST",
        "CSP",
        "HOSTNAME",
        "VERSION",
        "CARDS",
        "DURABLE_SEQ",
        "AGENT_HEAD",
        "SEQ_LAG",
        "LAST_SEEN_KST",
        "AGE",
    ];
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            let j = host_json(h, now_ms);
            vec![
                h.agent_id.clone(),
                h.host_id.clone(),
                dash(&h.csp),
                dash(&h.hostname),
                dash(&h.agent_version),
                h.gpus.len().to_string(),
                h.durable_seq.to_string(),
                opt(j.agent_head_seq),
                opt(j.seq_lag),
                kst_cell(j.last_seen_unix_ms),
                age(j.lag_ms),
            ]
        })
        .collect();
    let right: Vec<bool> = (0..header.len())
        .map(|i| (5..=8).contains(&i) || i == 10)
        .collect();
    grid(&header, &rows, &right)
}

// ---------------------------------------------------------------------------------------------
// alarms

#[derive(Debug, Serialize)]
pub struct AlarmJson<'a> {
    pub at_unix_ms: i64,
    pub at: String,
    pub agent_id: &'a str,
    pub kind: &'a str,
    pub seq: Option<u64>,
    pub detail: &'a str,
}

pub fn alarms_json(alarms: &[v1::Alarm]) -> Result<String, serde_json::Error> {
    json(
        &alarms
            .iter()
            .map(|a| AlarmJson {
                at_unix_ms: a.at_unix_ms,
                at: rfc3339(a.at_unix_ms),
                agent_id: &a.agent_id,
                kind: &a.kind,
                seq: a.seq,
                detail: &a.detail,
            })
            .collect::<Vec<_>>(),
    )
}

pub fn alarms_table(alarms: &[v1::Alarm]) -> String {
    let rows: Vec<Vec<String>> = alarms
        .iter()
        .map(|a| {
            vec![
                kst_cell(a.at_unix_ms),
                dash(&a.agent_id),
                a.kind.clone(),
                opt(a.seq),
                a.detail.clone(),
            ]
        })
        .collect();
    grid(
        &["TIME_KST", "AGENT", "KIND", "SEQ", "DETAIL"],
        &rows,
        &[false, false, false, true, false],
    )
}

// ---------------------------------------------------------------------------------------------
// events

#[derive(Debug, Serialize)]
pub struct EventJson<'a> {
    pub at_unix_ms: i64,
    pub at: String,
    pub agent_id: &'a str,
    pub host_id: &'a str,
    pub csp: &'a str,
    pub seq: u64,
    pub gpu_uuid: &'a str,
    pub kind: &'a str,
    pub code: i64,
    pub detail: &'a str,
    pub pid: Option<u32>,
    pub principal: &'a str,
    pub grant_id: &'a str,
    pub mode: &'a str,
    pub action: &'a str,
    pub result: &'a str,
}

fn event_json(e: &v1::EventInfo) -> EventJson<'_> {
    EventJson {
        at_unix_ms: e.at_unix_ms,
        at: rfc3339(e.at_unix_ms),
        agent_id: &e.agent_id,
        host_id: &e.host_id,
        csp: &e.csp,
        seq: e.seq,
        gpu_uuid: &e.gpu_uuid,
        kind: &e.kind,
        code: e.code,
        detail: &e.detail,
        pid: e.pid,
        principal: &e.principal,
        grant_id: &e.grant_id,
        mode: &e.mode,
        action: &e.action,
        result: &e.result,
    }
}

pub fn events_json(events: &[v1::EventInfo]) -> Result<String, serde_json::Error> {
    json(&events.iter().map(event_json).collect::<Vec<_>>())
}

/// What an event says, in one cell: its detail, and for enforcement who and what was done.
fn event_detail(e: &v1::EventInfo) -> String {
    if e.kind != "enforcement" {
        return dash(&e.detail);
    }
    let mut parts = Vec::new();
    if let Some(pid) = e.pid.filter(|p| *p != 0) {
        parts.push(format!("pid {pid}"));
    }
    if !e.principal.is_empty() {
        parts.push(e.principal.clone());
    }
    parts.push(format!(
        "grant {}",
        if e.grant_id.is_empty() {
            "none"
        } else {
            &e.grant_id
        }
    ));
    parts.push(format!(
        "{}: {} {}",
        dash(&e.mode),
        dash(&e.action),
        dash(&e.result)
    ));
    format!("{} [{}]", e.detail, parts.join(", "))
}

pub fn events_table(events: &[v1::EventInfo]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                kst_cell(e.at_unix_ms),
                e.host_id.clone(),
                e.agent_id.clone(),
                e.seq.to_string(),
                dash(&e.gpu_uuid),
                e.kind.clone(),
                e.code.to_string(),
                event_detail(e),
            ]
        })
        .collect();
    grid(
        &[
            "TIME_KST", "HOST", "AGENT", "SEQ", "GPU", "KIND", "CODE", "DETAIL",
        ],
        &rows,
        &[false, false, false, true, false, false, true, false],
    )
}

// ---------------------------------------------------------------------------------------------
// timeline

/// What stands out in a window, beside its health and assignment status: `partial` (fewer
/// good samples than expected), `unavailable` (the card was lost or failed for part of it),
/// `foreign` (processes not of the grantee), `unattributed` (use with no process visible),
/// `energy_estimated` (no energy counter: power × time), `energy_frozen` (the counter froze;
/// energy is an estimate kept apart).
pub fn window_flags(w: &v1::TimelineWindow) -> Vec<&'static str> {
    let mut f = Vec::new();
    if w.good_samples < w.expected_samples {
        f.push("partial");
    }
    if w.unavailable_ms > 0 {
        f.push("unavailable");
    }
    if w.foreign_ms > 0 {
        f.push("foreign");
    }
    if w.unattributed_ms.unwrap_or(0) > 0 {
        f.push("unattributed");
    }
    if w.energy_estimated {
        f.push("energy_estimated");
    }
    if w.energy_estimated_mj.is_some() {
        f.push("energy_frozen");
    }
    f
}

#[derive(Debug, Serialize)]
pub struct PrincipalJson<'a> {
    pub principal: &'a str,
    pub occupied_ms: u64,
    pub active_ms: u64,
    pub memory_max_bytes: u64,
    pub matches_grant: bool,
}

#[derive(Debug, Serialize)]
pub struct WindowJson<'a> {
    pub gpu_uuid: &'a str,
    pub agent_id: &'a str,
    pub host_id: &'a str,
    pub seq: u64,
    pub start_unix_ms: i64,
    pub start: String,
    pub end_unix_ms: i64,
    pub end: String,
    pub sample_interval_ms: u64,
    pub expected_samples: u32,
    pub good_samples: u32,
    pub health: &'a str,
    pub assignment_status: &'a str,
    /// The grant the agent applied (empty: none).
    pub grant_id: &'a str,
    pub util_avg_pct: Option<f64>,
    pub occupied_ms: u64,
    pub grantee_occupied_ms: Option<u64>,
    pub active_ms: u64,
    pub foreign_ms: u64,
    pub unavailable_ms: u64,
    pub unattributed_ms: Option<u64>,
    pub memory_used_max_bytes: Option<u64>,
    pub energy_mj: Option<u64>,
    pub energy_estimated: bool,
    pub energy_estimated_mj: Option<u64>,
    pub flags: Vec<&'static str>,
    pub principals: Vec<PrincipalJson<'a>>,
}

pub fn timeline_json(t: &v1::CardTimelineReply) -> Result<String, serde_json::Error> {
    json(
        &t.windows
            .iter()
            .map(|w| WindowJson {
                gpu_uuid: &t.gpu_uuid,
                agent_id: &w.agent_id,
                host_id: &w.host_id,
                seq: w.seq,
                start_unix_ms: w.start_unix_ms,
                start: rfc3339(w.start_unix_ms),
                end_unix_ms: w.end_unix_ms,
                end: rfc3339(w.end_unix_ms),
                sample_interval_ms: w.sample_interval_ms,
                expected_samples: w.expected_samples,
                good_samples: w.good_samples,
                health: &w.health,
                assignment_status: &w.assignment_status,
                grant_id: &w.applied_grant_id,
                util_avg_pct: w.util_avg_pct,
                occupied_ms: w.occupied_ms,
                grantee_occupied_ms: w.grantee_occupied_ms,
                active_ms: w.active_ms,
                foreign_ms: w.foreign_ms,
                unavailable_ms: w.unavailable_ms,
                unattributed_ms: w.unattributed_ms,
                memory_used_max_bytes: w.memory_used_max_bytes,
                energy_mj: w.energy_mj,
                energy_estimated: w.energy_estimated,
                energy_estimated_mj: w.energy_estimated_mj,
                flags: window_flags(w),
                principals: w
                    .principals
                    .iter()
                    .map(|p| PrincipalJson {
                        principal: &p.principal,
                        occupied_ms: p.occupied_ms,
                        active_ms: p.active_ms,
                        memory_max_bytes: p.memory_max_bytes,
                        matches_grant: p.matches_grant,
                    })
                    .collect(),
            })
            .collect::<Vec<_>>(),
    )
}

/// Bytes for a table, in GiB.
fn gib(b: Option<u64>) -> String {
    b.map_or_else(
        || "-".into(),
        |b| format!("{:.1}", b as f64 / f64::from(1u32 << 30)),
    )
}

/// Millijoules for a table, in watt-hours.
fn wh(mj: Option<u64>) -> String {
    mj.map_or_else(|| "-".into(), |mj| format!("{:.2}", mj as f64 / 3.6e6))
}

/// A line naming the card, the period and the grants holding it, then the windows' table.
pub fn timeline_table(t: &v1::CardTimelineReply) -> String {
    let mut out = format!(
        "card {}: {} windows, {} .. {} KST\n",
        t.gpu_uuid,
        t.windows.len(),
        kst_cell(t.from_unix_ms),
        kst_cell(t.until_unix_ms)
    );
    for h in &t.holdings {
        if let Some(s) = &h.span {
            out.push_str(&format!(
                "held by grant {} {} .. {} KST\n",
                h.grant_id,
                kst_cell(s.from_unix_ms),
                kst_cell(s.until_unix_ms)
            ));
        }
    }
    if t.holdings.is_empty() {
        out.push_str("held by no grant in the period\n");
    }
    let rows: Vec<Vec<String>> = t
        .windows
        .iter()
        .map(|w| {
            let flags = window_flags(w);
            vec![
                kst_cell(w.start_unix_ms),
                kst_cell(w.end_unix_ms),
                w.agent_id.clone(),
                w.seq.to_string(),
                w.health.clone(),
                w.assignment_status.clone(),
                dash(&w.applied_grant_id),
                opt(w.util_avg_pct.map(|u| format!("{u:.1}"))),
                secs(w.occupied_ms),
                gib(w.memory_used_max_bytes),
                wh(w.energy_mj.or(w.energy_estimated_mj)),
                if flags.is_empty() {
                    "-".into()
                } else {
                    flags.join(",")
                },
            ]
        })
        .collect();
    let header = [
        "START_KST",
        "END_KST",
        "AGENT",
        "SEQ",
        "HEALTH",
        "STATUS",
        "GRANT",
        "UTIL_%",
        "OCCUPIED",
        "MEM_GIB",
        "ENERGY_WH",
        "FLAGS",
    ];
    let right: Vec<bool> = (0..header.len())
        .map(|i| i == 3 || (7..=10).contains(&i))
        .collect();
    out.push_str(&grid(&header, &rows, &right));
    out
}

// ---------------------------------------------------------------------------------------------
// violations

#[derive(Debug, Serialize)]
pub struct StepJson<'a> {
    pub seq: u64,
    pub at_unix_ms: i64,
    pub at: String,
    pub action: &'a str,
    pub result: &'a str,
}

#[derive(Debug, Serialize)]
pub struct ViolationJson<'a> {
    pub at_unix_ms: i64,
    pub at: String,
    pub agent_id: &'a str,
    pub host_id: &'a str,
    pub csp: &'a str,
    pub seq: u64,
    pub gpu_uuid: &'a str,
    /// The grant the agent applied to the card then (null: none valid).
    pub grant_id: Option<&'a str>,
    /// As recorded: `user:NAME`, `uid:N` when the name was not resolved, or `unknown`.
    pub principal: &'a str,
    pub pid: Option<u32>,
    pub mode: &'a str,
    pub detail: &'a str,
    /// The action taken (the last follow-up's; `none`: recorded only) and its outcome.
    pub action: &'a str,
    pub result: &'a str,
    pub follow_ups: Vec<StepJson<'a>>,
}

fn violation_json<'a>(e: &Episode<'a, v1::EventInfo>) -> ViolationJson<'a> {
    let v = e.violation;
    ViolationJson {
        at_unix_ms: v.at_unix_ms,
        at: rfc3339(v.at_unix_ms),
        agent_id: &v.agent_id,
        host_id: &v.host_id,
        csp: &v.csp,
        seq: v.seq,
        gpu_uuid: &v.gpu_uuid,
        grant_id: (!v.grant_id.is_empty()).then_some(v.grant_id.as_str()),
        principal: &v.principal,
        pid: v.pid,
        mode: &v.mode,
        detail: &v.detail,
        action: e.action(),
        result: e.result(),
        follow_ups: e
            .follow_ups
            .iter()
            .map(|f| StepJson {
                seq: f.seq,
                at_unix_ms: f.at_unix_ms,
                at: rfc3339(f.at_unix_ms),
                action: &f.action,
                result: &f.result,
            })
            .collect(),
    }
}

/// The episodes among the enforcement events, one object each.
pub fn violations_json(events: &[v1::EventInfo]) -> Result<String, serde_json::Error> {
    json(
        &episodes(events)
            .iter()
            .map(violation_json)
            .collect::<Vec<_>>(),
    )
}

pub fn violations_table(events: &[v1::EventInfo]) -> String {
    let rows: Vec<Vec<String>> = episodes(events)
        .iter()
        .map(|e| {
            let v = e.violation;
            vec![
                kst_cell(v.at_unix_ms),
                v.host_id.clone(),
                v.gpu_uuid.clone(),
                if v.grant_id.is_empty() {
                    "none".into()
                } else {
                    v.grant_id.clone()
                },
                dash(&v.principal),
                opt(v.pid),
                dash(&v.mode),
                e.action().to_owned(),
                dash(e.result()),
            ]
        })
        .collect();
    grid(
        &[
            "TIME_KST",
            "HOST",
            "GPU",
            "GRANT",
            "PRINCIPAL",
            "PID",
            "MODE",
            "ACTION",
            "RESULT",
        ],
        &rows,
        &[false, false, false, false, false, true, false, false, false],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-04-10 10:00:00.250 KST
    const T: i64 = 1_775_782_800_250;

    #[test]
    fn instants_are_kst_to_the_second_in_tables_and_exact_in_json() {
        assert_eq!(kst_cell(T), "2026-04-10 10:00:00");
        assert_eq!(rfc3339(T), "2026-04-10T10:00:00.250+09:00");
        assert_eq!(
            chrono::DateTime::parse_from_rfc3339(&rfc3339(T))
                .unwrap()
                .timestamp_millis(),
            T
        );
        assert_eq!(last_days(T, 30), "2026-03-12..2026-04-10");
        assert_eq!(last_days(T, 1), "2026-04-10..2026-04-10");
        assert_eq!(
            [age(999), age(61_000), age(3_720_000), age(90_000_000)],
            ["0s", "1m 1s", "1h 2m", "1d 1h"]
        );
    }

    #[test]
    fn hosts_show_last_seen_age_and_the_seq_lag_when_the_head_is_known() {
        let h = |id: &str, head: Option<u64>| v1::HostInfo {
            agent_id: id.into(),
            host_id: format!("host-{id}"),
            csp: "kt".into(),
            durable_seq: 40,
            last_seen_unix_ms: T - 600_000,
            last_record_unix_ms: Some(T - 5_000),
            agent_head_seq: head,
            ..Default::default()
        };
        let hosts = [h("a", Some(52)), h("b", None)];
        let table = hosts_table(&hosts, T);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("AGENT") && lines[0].contains("LAST_SEEN_KST"));
        assert!(lines[1].starts_with("-----"));
        let cells: Vec<&str> = lines[2].split_whitespace().collect();
        // agent host csp hostname version cards durable head lag date time age…
        assert_eq!(
            &cells[..9],
            ["a", "host-a", "kt", "-", "-", "0", "40", "52", "12"]
        );
        assert!(lines[2].ends_with("5s"), "{table}");
        let cells: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(&cells[6..9], ["40", "-", "-"]);
        let v: serde_json::Value = serde_json::from_str(&hosts_json(&hosts, T).unwrap()).unwrap();
        assert_eq!(v[0]["seq_lag"], 12);
        assert_eq!(v[0]["lag_ms"], 5_000);
        assert_eq!(v[0]["last_seen_unix_ms"], T - 5_000);
        assert_eq!(v[1]["seq_lag"], serde_json::Value::Null);
    }
}
