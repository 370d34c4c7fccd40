//! The rollups' SQL, once for both backends (see [`crate::rollup`]): the tables' columns, the
//! derivation of every row from the windows (migration 9's backfill and `verify`), and the
//! comparison of stored rows with derived ones. Each backend's module runs it in its own
//! dialect and connection.

use crate::rollup::Level;

pub fn table(level: Level) -> &'static str {
    match level {
        Level::Hour => "card_hours",
        Level::Day => "card_days",
    }
}

pub const COLUMNS: &str = "start_ms, gpu_uuid, agent_id, assignment_status, grant_id, windows, raw, good_ms, unavailable_ms, unattributed_ms, energy_mj, occupied_ms, grantee_occupied_ms, active_ms, foreign_ms, max_seq";

/// The most one window contributes to a rollup sum as `verify` derives it (1e12).
///
/// Each value is clamped to [0, VALUE_CAP]: a window that counts holds far less (sanity
/// bounds every time by a day and energy by 2,000 W over it), so the clamp changes nothing
/// the commit path sums, and a tampered ledger (an impossible window's flag deleted) cannot
/// overflow a sum: its row comes out different and is reported.
const VALUE_CAP: i64 = 1_000_000_000_000;

/// Where the SQL differs between the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    fn least(self, a: &str, b: &str) -> String {
        match self {
            Dialect::Sqlite => format!("MIN({a}, {b})"),
            Dialect::Postgres => format!("LEAST({a}, {b})"),
        }
    }

    fn greatest(self, a: &str, b: &str) -> String {
        match self {
            Dialect::Sqlite => format!("MAX({a}, {b})"),
            Dialect::Postgres => format!("GREATEST({a}, {b})"),
        }
    }

    fn cap(self, x: &str) -> String {
        self.least(&self.greatest(x, "0"), &VALUE_CAP.to_string())
    }

    fn boolean(self, b: bool) -> &'static str {
        match (self, b) {
            (Dialect::Sqlite, false) => "0",
            (Dialect::Sqlite, true) => "1",
            (Dialect::Postgres, false) => "false",
            (Dialect::Postgres, true) => "true",
        }
    }

    /// `x` as a 64-bit integer (PostgreSQL's SUM of BIGINT is NUMERIC).
    fn bigint(self, x: &str) -> String {
        match self {
            Dialect::Sqlite => x.to_string(),
            Dialect::Postgres => format!("({x})::BIGINT"),
        }
    }
}

/// SQL for the start of the bucket holding `x` (see [`Level::bucket`]).
fn bucket_sql(level: Level, x: &str) -> String {
    match level {
        Level::Hour => format!("(({x}) - ((({x}) % 3600000) + 3600000) % 3600000)"),
        Level::Day => {
            format!("(({x}) - (((({x}) + 32400000) % 86400000) + 86400000) % 86400000)")
        }
    }
}

/// Every window that counts, as the rollups read it: its summed values (clamped), whether it
/// is disputed, and its first and last hour and day.
pub fn source_select(d: Dialect) -> String {
    let by_seq = "p.agent_id = w.agent_id AND p.seq = w.seq";
    let last = d.greatest("w.end_ms", "w.start_ms + 1");
    format!(
        "SELECT w.agent_id, w.seq, w.gpu_uuid, w.assignment_status, w.grant_id,
                {good} AS good_ms, {unavailable} AS unavailable_ms,
                {unattributed} AS unattributed_ms, {energy} AS energy_mj,
                {occupied} AS occupied_ms, {foreign} AS foreign_ms,
                {grantee} AS grantee_ms, {active} AS active_ms,
                EXISTS (SELECT 1 FROM disputed_windows d WHERE d.agent_id = w.agent_id AND d.seq = w.seq) AS disputed,
                {h0} AS first_hour, {h1} AS last_hour, {d0} AS first_day, {d1} AS last_day
         FROM windows w
         WHERE NOT EXISTS (SELECT 1 FROM window_flags f WHERE f.agent_id = w.agent_id AND f.seq = w.seq)",
        good = d.cap("w.good_samples * w.interval_ms"),
        unavailable = d.cap("w.unavailable_ms"),
        unattributed = d.cap("COALESCE(w.unattributed_ms, 0)"),
        energy = d.cap("COALESCE(w.energy_mj, 0)"),
        occupied = d.cap("w.occupied_ms"),
        foreign = d.cap("w.foreign_ms"),
        grantee = d.cap(&format!(
            "COALESCE(w.grantee_occupied_ms,
               CASE WHEN EXISTS (SELECT 1 FROM window_principals p WHERE {by_seq})
                     AND NOT EXISTS (SELECT 1 FROM window_principals p WHERE {by_seq} AND NOT p.matches_grant)
                    THEN w.occupied_ms
                    ELSE COALESCE((SELECT MAX(p.occupied_ms) FROM window_principals p WHERE {by_seq} AND p.matches_grant), 0)
               END)"
        )),
        active = d.cap(&format!(
            "COALESCE((SELECT SUM({}) FROM window_principals p WHERE {by_seq} AND p.matches_grant), 0)",
            d.cap("p.active_ms")
        )),
        h0 = bucket_sql(Level::Hour, "w.start_ms"),
        h1 = bucket_sql(Level::Hour, &format!("{last} - 1")),
        d0 = bucket_sql(Level::Day, "w.start_ms"),
        d1 = bucket_sql(Level::Day, &format!("{last} - 1")),
    )
}

/// Where [`derive`] reads the windows from.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// A table already holding [`source_select`] (SQLite: a temporary table, so that both
    /// levels read it once).
    Table(&'static str),
    /// [`source_select`] itself, as a common table expression (PostgreSQL: verify's snapshot
    /// is read-only, and temporary tables are writes).
    Inline,
}

/// The rows of `level` derived from the windows, in [`COLUMNS`] order.
pub fn derive(d: Dialect, level: Level, source: Source) -> String {
    let (first, last) = match level {
        Level::Hour => ("first_hour", "last_hour"),
        Level::Day => ("first_day", "last_day"),
    };
    let len = level.len_ms();
    let (with, src) = match source {
        Source::Table(t) => (String::new(), t),
        Source::Inline => (format!("src AS ({}),", source_select(d)), "src"),
    };
    let b = |x: &str| d.bigint(x);
    format!(
        "WITH RECURSIVE {with}
         n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 24)
         SELECT {start}, gpu_uuid, agent_id, assignment_status, grant_id, {count}, {no},
                {good}, {unavailable}, {unattributed}, {energy}, {occupied}, {grantee},
                {active}, {foreign}, {seq}
         FROM {src} WHERE {first} = {last} AND NOT disputed
         GROUP BY {first}, gpu_uuid, agent_id, assignment_status, grant_id
         UNION ALL
         SELECT {mark}, gpu_uuid, agent_id, '', '', {count}, {yes},
                0, 0, 0, 0, 0, 0, 0, 0, {seq}
         FROM {src} JOIN n ON {first} + n.i * {len} <= {last}
         WHERE {first} <> {last} OR disputed
         GROUP BY {first} + n.i * {len}, gpu_uuid, agent_id",
        start = b(first),
        count = b("COUNT(*)"),
        no = d.boolean(false),
        yes = d.boolean(true),
        good = b("SUM(good_ms)"),
        unavailable = b("SUM(unavailable_ms)"),
        unattributed = b("SUM(unattributed_ms)"),
        energy = b("SUM(energy_mj)"),
        occupied = b("SUM(occupied_ms)"),
        grantee = b("SUM(grantee_ms)"),
        active = b("SUM(active_ms)"),
        foreign = b("SUM(foreign_ms)"),
        seq = b("MAX(seq)"),
        mark = b(&format!("{first} + n.i * {len}")),
    )
}

/// The keys of `level` whose stored row differs from the derived one, as (start_ms,
/// gpu_uuid, agent_id, problem): "differs", "missing" (derived, not stored) or "not derived"
/// (stored, not derived). With `retained` (the ledger has `retention_cuts`), an agent's rows
/// before its retention horizon are left out on both sides: their windows may be gone, and
/// `verify` re-derives those rows from the bodies (`crate::retention`).
pub fn mismatch_sql(d: Dialect, level: Level, source: Source, retained: bool) -> String {
    let t = table(level);
    let kept = |x: &str| {
        if retained {
            format!(
                " WHERE NOT EXISTS (SELECT 1 FROM retention_cuts r WHERE r.agent_id = {x}.agent_id AND {x}.start_ms < r.horizon_ms)"
            )
        } else {
            String::new()
        }
    };
    let same = "l.start_ms = e.start_ms AND l.gpu_uuid = e.gpu_uuid AND l.agent_id = e.agent_id
                AND l.assignment_status = e.assignment_status AND l.grant_id = e.grant_id";
    format!(
        "WITH derived ({COLUMNS}) AS ({derive}),
         extra AS (SELECT {COLUMNS} FROM {t} s{kept_s} EXCEPT SELECT {COLUMNS} FROM derived),
         lacking AS (SELECT {COLUMNS} FROM derived x{kept_x} EXCEPT SELECT {COLUMNS} FROM {t})
         SELECT e.start_ms, e.gpu_uuid, e.agent_id,
                CASE WHEN EXISTS (SELECT 1 FROM lacking l WHERE {same})
                     THEN 'differs' ELSE 'not derived' END
         FROM extra e
         UNION ALL
         SELECT l.start_ms, l.gpu_uuid, l.agent_id, 'missing' FROM lacking l
         WHERE NOT EXISTS (SELECT 1 FROM extra e WHERE {same})
         ORDER BY 1, 2, 3",
        derive = derive(d, level, source),
        kept_s = kept("s"),
        kept_x = kept("x"),
    )
}

/// The problem word [`mismatch_sql`] gives, as a static string.
pub fn problem(word: &str) -> &'static str {
    match word {
        "differs" => "differs",
        "missing" => "missing",
        _ => "not derived",
    }
}
