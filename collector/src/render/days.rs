//! Per-day, per-card figures of a reconciliation, for the HTML page's heatmaps.
//!
//! [`Reconciliation`] sums each card over the whole period; a heatmap needs each card's day.
//! [`card_days`] splits every card's allocation intervals (as the engine cut them to the
//! period) at Korean midnights and counts the same metered windows the engine counted, by the
//! engine's rules (see [`crate::reconcile`]): a window contributes pro rata to the part of it
//! inside a day, delivered time is good samples × sample interval, active time is the grant's
//! principals' `active_ms` in windows the agent metered under that very grant. Days start at
//! 00:00 KST (UTC+9, no daylight saving), so a day's figures are the ones a Korean reader
//! means by "that day".

use std::collections::HashMap;

use serde::Serialize;

use crate::reconcile::{Interval, Reconciliation, share};
use crate::rollup::Counted;
use crate::store::{MeteredWindow, WindowRow};

const DAY_MS: i64 = 86_400_000;
const KST_OFFSET_MS: i64 = 9 * 3_600_000;

/// One card of one grant on one Korean calendar day.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CardDay {
    pub grant_id: String,
    pub host_id: String,
    pub gpu_uuid: String,
    /// `YYYY-MM-DD`, Korean calendar (Asia/Seoul).
    pub day: String,
    /// Time of the day in which the card belonged to the grant (within the period).
    pub allocated_ms: u64,
    /// Metered good time within `allocated_ms`.
    pub delivered_ms: u64,
    /// The grantee's utilization-weighted time within `allocated_ms`.
    pub active_ms: u64,
    /// `active / allocated × 100`; `None` when nothing of the day was metered (no window, or
    /// no good sample), which is "unknown", not "0 %".
    pub utilization_pct: Option<f64>,
}

/// A Korean calendar day inside a period: its label and its span, cut to the period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodDay {
    /// `YYYY-MM-DD`.
    pub day: String,
    pub span: Interval,
}

/// Start (Unix ms) of the Korean calendar day holding `ms`.
fn kst_day_start(ms: i64) -> i64 {
    (ms + KST_OFFSET_MS).div_euclid(DAY_MS) * DAY_MS - KST_OFFSET_MS
}

/// The Korean calendar days that `[from, until)` touches, in order, each cut to the period.
pub fn period_days(from_ms: i64, until_ms: i64) -> Vec<PeriodDay> {
    let mut out = Vec::new();
    let mut start = kst_day_start(from_ms);
    while start < until_ms {
        let day = chrono::DateTime::from_timestamp_millis(start + KST_OFFSET_MS)
            .unwrap_or_default()
            .format("%Y-%m-%d")
            .to_string();
        out.push(PeriodDay {
            day,
            span: Interval {
                from_ms: start.max(from_ms),
                until_ms: (start + DAY_MS).min(until_ms),
            },
        });
        start += DAY_MS;
    }
    out
}

/// Running sums of one card-day.
#[derive(Default, Clone, Copy)]
struct Sums {
    allocated: u64,
    delivered: u64,
    active: u64,
}

/// One grant card's allocation cut at midnights, and its running sums per day.
struct CardSegments {
    grant_id: String,
    host_id: String,
    gpu_uuid: String,
    /// (day index, the part of the day the card belonged to the grant): sorted and disjoint,
    /// since the engine's intervals are and days are.
    segments: Vec<(usize, Interval)>,
    sums: Vec<Sums>,
}

/// The per-day figures of a report's grant cards, summed window by window as the windows are
/// read, so that nothing needs to hold every window of the period at once (see
/// [`crate::query::compute_report_with`]). Windows may come in any order; each counts pro rata
/// to the part of it inside each day of its card's allocation.
pub struct DayFigures {
    days: Vec<PeriodDay>,
    cards: Vec<CardSegments>,
    by_uuid: HashMap<String, Vec<usize>>,
}

impl DayFigures {
    /// For the days of `[from_ms, until_ms)` and the grant cards `cards` — (grant, host, card,
    /// the card's intervals in the grant as the engine cut them), in the report's order.
    pub fn new<'a>(
        from_ms: i64,
        until_ms: i64,
        cards: impl IntoIterator<Item = (&'a str, &'a str, &'a str, &'a [Interval])>,
    ) -> Self {
        let days = period_days(from_ms, until_ms);
        let mut out = Self {
            cards: Vec::new(),
            by_uuid: HashMap::new(),
            days,
        };
        for (grant_id, host_id, gpu_uuid, intervals) in cards {
            let mut segments: Vec<(usize, Interval)> = Vec::new();
            for iv in intervals {
                for (i, d) in out.days.iter().enumerate() {
                    let seg = Interval {
                        from_ms: iv.from_ms.max(d.span.from_ms),
                        until_ms: iv.until_ms.min(d.span.until_ms),
                    };
                    if seg.until_ms > seg.from_ms {
                        segments.push((i, seg));
                    }
                }
            }
            let mut sums = vec![Sums::default(); out.days.len()];
            for (i, seg) in &segments {
                sums[*i].allocated += seg.len_ms();
            }
            out.by_uuid
                .entry(gpu_uuid.to_owned())
                .or_default()
                .push(out.cards.len());
            out.cards.push(CardSegments {
                grant_id: grant_id.to_owned(),
                host_id: host_id.to_owned(),
                gpu_uuid: gpu_uuid.to_owned(),
                segments,
                sums,
            });
        }
        out
    }

    /// The days and grant cards of a reconciliation.
    pub fn of_report(r: &Reconciliation) -> Self {
        Self::new(
            r.from_ms,
            r.until_ms,
            r.grants.iter().flat_map(|g| {
                g.cards.iter().map(|c| {
                    (
                        g.grant_id.as_str(),
                        c.host_id.as_str(),
                        c.gpu_uuid.as_str(),
                        c.intervals.as_slice(),
                    )
                })
            }),
        )
    }

    /// Counts one metered window.
    pub fn add(&mut self, w: &WindowRow) {
        self.add_counted(Counted::of(w));
    }

    /// Counts one window, hour or day as the report's planner read it.
    pub fn add_counted(&mut self, w: Counted<'_>) {
        let len = (w.end_ms - w.start_ms).max(0) as u64;
        if len == 0 {
            return;
        }
        let Some(cards) = self.by_uuid.get(w.gpu_uuid) else {
            return;
        };
        for &k in cards {
            let c = &mut self.cards[k];
            let first = c
                .segments
                .partition_point(|(_, s)| s.until_ms <= w.start_ms);
            let active = if w.assigned_to == Some(c.grant_id.as_str()) {
                w.grantee_active_ms
            } else {
                0
            };
            for (i, seg) in c.segments[first..]
                .iter()
                .take_while(|(_, s)| s.from_ms < w.end_ms)
            {
                let ov = seg.overlap_ms(w.start_ms, w.end_ms);
                c.sums[*i].delivered += share(w.delivered_ms, ov, len);
                c.sums[*i].active += share(active, ov, len);
            }
        }
    }

    /// Every grant card's days in which it belonged to the grant, in order (grant, card, day).
    pub fn finish(self) -> Vec<CardDay> {
        let mut out = Vec::new();
        for c in self.cards {
            for (d, s) in self.days.iter().zip(&c.sums) {
                if s.allocated == 0 {
                    continue;
                }
                // The engine's caps, per day: overlapping windows cannot push a day past
                // its allocation.
                let delivered = s.delivered.min(s.allocated);
                let active = s.active.min(delivered);
                out.push(CardDay {
                    grant_id: c.grant_id.clone(),
                    host_id: c.host_id.clone(),
                    gpu_uuid: c.gpu_uuid.clone(),
                    day: d.day.clone(),
                    allocated_ms: s.allocated,
                    delivered_ms: delivered,
                    active_ms: active,
                    utilization_pct: (delivered > 0)
                        .then(|| active as f64 * 100.0 / s.allocated as f64),
                });
            }
        }
        out
    }
}

/// Every grant card's figures per Korean calendar day of the report's period, in the report's
/// order (grant, card, day). Only days in which the card belonged to the grant are listed.
/// `windows` are the metered windows the reconciliation was made from (more do no harm).
pub fn card_days(r: &Reconciliation, windows: &[MeteredWindow]) -> Vec<CardDay> {
    let mut d = DayFigures::of_report(r);
    for w in windows {
        d.add(&w.window);
    }
    d.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grants::{Grant, GrantCard, Program};
    use crate::reconcile::{IdleSettings, Inputs, reconcile};
    use crate::store::PrincipalRow;

    /// 2026-04-01 00:00 KST.
    const APR1: i64 = 1_774_969_200_000;
    const HOUR: i64 = 3_600_000;
    const UUID: &str = "GPU-00000000-0000-0000-0000-000000000001";

    fn window(start: i64, len: i64, grant: &str, util: f64, good: u32) -> MeteredWindow {
        // Every good sample had a process of the grantee on the card.
        let occupied = u64::from(good) * 1000;
        let active = (occupied as f64 * util) as u64;
        MeteredWindow {
            agent_id: "a1".into(),
            host_id: "h1".into(),
            csp: "csp1".into(),
            seq: 1,
            window: WindowRow {
                gpu_uuid: UUID.into(),
                start_ms: start,
                end_ms: start + len,
                interval_ms: 1000,
                expected_samples: (len / 1000) as u32,
                good_samples: good,
                util_avg_pct: Some(util * 100.0),
                util_max_pct: Some(util * 100.0),
                mem_util_avg_pct: None,
                memory_used_max_bytes: None,
                energy_mj: None,
                energy_estimated: false,
                power_avg_w: None,
                temperature_max_c: None,
                throttle_reasons: None,
                health: "ok",
                unavailable_ms: 0,
                assignment_status: if grant.is_empty() {
                    "unassigned"
                } else {
                    "assigned"
                },
                grant_id: grant.into(),
                principal: "uid:1001".into(),
                active_ms: active,
                occupied_ms: occupied,
                foreign_ms: 0,
                grantee_occupied_ms: Some(occupied),
                unattributed_ms: None,
                energy_estimated_mj: None,
                principals: vec![PrincipalRow {
                    principal: "uid:1001".into(),
                    uid: Some(1001),
                    occupied_ms: occupied,
                    active_ms: active,
                    memory_max_bytes: 0,
                    process_count: 1,
                    matches_grant: true,
                }],
            },
        }
    }

    fn grant(from: i64, until: i64) -> Grant {
        Grant {
            grant_id: "G-1".into(),
            program: Program::Hpc,
            grantee: "한국대학교".into(),
            principal: "uid:1001".parse().unwrap(),
            csp: "csp1".into(),
            valid_from_ms: from,
            valid_until_ms: until,
            cards: vec![GrantCard::new("h1", UUID)],
            revoked_at_ms: None,
        }
    }

    fn reconciled(grants: &[Grant], windows: &[MeteredWindow], days: i64) -> Reconciliation {
        reconcile(&Inputs {
            period: "2026-04",
            from_ms: APR1,
            until_ms: APR1 + days * DAY_MS,
            program: None,
            grant_id: None,
            grants,
            windows,
            events: &[],
            invoices: &[],
            idle: IdleSettings {
                threshold_pct: 10.0,
                days: 1,
                as_of_ms: APR1 + days * DAY_MS,
            },
        })
    }

    #[test]
    fn period_days_follow_korean_midnights() {
        let days = period_days(APR1, APR1 + 2 * DAY_MS);
        assert_eq!(days.len(), 2);
        assert_eq!(days[0].day, "2026-04-01");
        assert_eq!(days[1].day, "2026-04-02");
        assert_eq!(days[1].span.from_ms, APR1 + DAY_MS);
        // A period starting at 12:00 KST touches the rest of that day, cut to the period.
        let days = period_days(APR1 + 12 * HOUR, APR1 + 36 * HOUR);
        assert_eq!(days.len(), 2);
        assert_eq!(days[0].day, "2026-04-01");
        assert_eq!(days[0].span.len_ms(), 12 * HOUR as u64);
        assert_eq!(days[1].span.len_ms(), 12 * HOUR as u64);
        // 15:00 UTC on March 31st is already April 1st in Korea.
        assert_eq!(period_days(APR1, APR1 + 1)[0].day, "2026-04-01");
        assert_eq!(period_days(APR1 - 1, APR1)[0].day, "2026-03-31");
        assert!(period_days(APR1, APR1).is_empty());
    }

    #[test]
    fn days_sum_to_the_engines_card_figures() {
        // Grant from 2026-04-01 12:00 KST for the 3-day period; windows of one hour: half
        // utilization on day 1, full on day 2, none metered on day 3; one window straddling
        // midnight between day 1 and 2 is cut pro rata.
        let g = grant(APR1 + 12 * HOUR, APR1 + 10 * DAY_MS);
        let mut ws = Vec::new();
        for h in 12..23 {
            ws.push(window(APR1 + h * HOUR, HOUR, "G-1", 0.5, 3600));
        }
        ws.push(window(APR1 + 23 * HOUR + HOUR / 2, HOUR, "G-1", 1.0, 3600));
        for h in 25..48 {
            ws.push(window(APR1 + h * HOUR, HOUR, "G-1", 1.0, 3600));
        }
        let r = reconciled(&[g], &ws, 3);
        let days = card_days(&r, &ws);
        assert_eq!(days.len(), 3, "{days:?}");
        assert_eq!(
            days.iter().map(|d| d.day.as_str()).collect::<Vec<_>>(),
            ["2026-04-01", "2026-04-02", "2026-04-03"]
        );
        let h = HOUR as u64;
        assert_eq!(days[0].allocated_ms, 12 * h);
        assert_eq!(days[0].delivered_ms, 11 * h + h / 2);
        assert_eq!(days[0].active_ms, 11 * h / 2 + h / 2);
        assert_eq!(days[1].allocated_ms, 24 * h);
        assert_eq!(days[1].delivered_ms, 23 * h + h / 2);
        assert_eq!(days[1].active_ms, 23 * h + h / 2);
        assert_eq!(days[2].delivered_ms, 0);
        assert_eq!(days[2].utilization_pct, None);
        let u = days[1].utilization_pct.unwrap();
        assert!((u - 23.5 / 24.0 * 100.0).abs() < 1e-9, "{u}");
        let card = &r.grants[0].cards[0].figures;
        assert_eq!(
            days.iter().map(|d| d.allocated_ms).sum::<u64>(),
            card.allocated_ms
        );
        assert_eq!(
            days.iter().map(|d| d.delivered_ms).sum::<u64>(),
            card.delivered_ms
        );
        assert_eq!(
            days.iter().map(|d| d.active_ms).sum::<u64>(),
            card.active_ms
        );
    }

    #[test]
    fn windows_of_another_grant_deliver_but_are_not_active() {
        let g = grant(APR1, APR1 + DAY_MS);
        let ws = vec![
            window(APR1, HOUR, "G-OTHER", 1.0, 3600),
            window(APR1 + HOUR, HOUR, "", 1.0, 3600),
            window(APR1 + 2 * HOUR, HOUR, "G-1", 0.25, 3600),
        ];
        let r = reconciled(&[g], &ws, 1);
        let days = card_days(&r, &ws);
        assert_eq!(days.len(), 1);
        assert_eq!(days[0].delivered_ms, 3 * HOUR as u64);
        assert_eq!(days[0].active_ms, HOUR as u64 / 4);
        assert_eq!(days[0].active_ms, r.grants[0].cards[0].figures.active_ms);
    }

    #[test]
    fn no_grants_no_days() {
        let r = reconciled(&[], &[window(APR1, HOUR, "", 1.0, 3600)], 1);
        assert!(card_days(&r, &[]).is_empty());
    }
}
