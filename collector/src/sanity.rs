//! Sanity of signed values: what one card window can hold. Pure; called by the store when a
//! window commits and by `verify` when it re-derives the flags.
//!
//! A window is *impossible* when any of these fails (`len` = end − start):
//! - `0 < len ≤ 1 day` and the window lies inside one day (UTC); its start and end are
//!   multiples of the sample interval (the agent samples at wall-clock multiples of it, and a
//!   window spans the intervals it sampled: its whole aligned period, or the part of it the
//!   agent was running for);
//! - `0 < sample interval ≤ len`; `expected_samples ≤ len / interval`;
//!   `good_samples ≤ expected_samples`; `good_samples × interval + unavailable ≤ len`;
//! - utilization, its maximum and memory utilization are finite and within 0–100 %;
//! - every time (unavailable, active, occupied, foreign, the grantee's occupied time, each
//!   principal's occupied and active time, and the principals' active time summed) is at most
//!   `len`, and each principal's active time at most its occupied time (a share ≤ 100 %);
//! - memory used ≤ the card's total memory as first reported (when known);
//! - energy ≤ [`POWER_CEILING_W`] × `len`, and average power within 0..=[`POWER_CEILING_W`].
//!
//! An impossible window is signed evidence and is kept, but it is flagged (`window_flags`),
//! counted in no figure, raised as an alarm and listed by `verify`. Arithmetic here is checked:
//! an overflow is itself a reason.

use crate::store::WindowRow;

/// Physical ceiling on one card's power draw, in watts. No GPU board sold draws more (H200:
/// 700 W, B200: 1,000 W, GB200 per GPU: 1,200 W); the record carries no power limit, so this
/// stated ceiling bounds a window's energy: `energy_mj ≤ POWER_CEILING_W × len_ms`.
pub const POWER_CEILING_W: u64 = 2_000;

/// One day in ms: the longest window, and what every window length divides.
pub const DAY_MS: i64 = 86_400_000;

/// Flag of a window whose values no window can hold.
pub const FLAG_IMPOSSIBLE: &str = "impossible";
/// Flag of a window covering card time another counted window already covers.
pub const FLAG_OVERLAP: &str = "overlap";

fn pct_ok(v: Option<f64>) -> bool {
    v.is_none_or(|p| p.is_finite() && (0.0..=100.0).contains(&p))
}

/// Every reason `w` is impossible; empty when it is a window a card could have produced.
/// `card_memory_total` is the card's total memory as first reported, when known.
pub fn window_problems(w: &WindowRow, card_memory_total: Option<u64>) -> Vec<String> {
    let mut why = Vec::new();
    let len = w.end_ms.checked_sub(w.start_ms).unwrap_or(-1);
    if len <= 0 || len > DAY_MS {
        why.push(format!("window length {len} ms is not within 1 ms..1 day"));
        return why;
    }
    if w.start_ms.div_euclid(DAY_MS) != (w.end_ms - 1).div_euclid(DAY_MS) {
        why.push(format!(
            "{}..{} crosses a day boundary",
            w.start_ms, w.end_ms
        ));
    }
    if let Ok(iv) = i64::try_from(w.interval_ms)
        && iv > 0
        && (w.start_ms.rem_euclid(iv) != 0 || w.end_ms.rem_euclid(iv) != 0)
    {
        why.push(format!(
            "{}..{} is not on {iv} ms sample boundaries",
            w.start_ms, w.end_ms
        ));
    }
    let len = len as u64;
    if w.interval_ms == 0 || w.interval_ms > len {
        why.push(format!("sample interval {} ms", w.interval_ms));
    } else {
        let most = len / w.interval_ms;
        if u64::from(w.expected_samples) > most {
            why.push(format!(
                "{} expected samples, at most {most} fit",
                w.expected_samples
            ));
        }
        if w.good_samples > w.expected_samples {
            why.push(format!(
                "{} good samples of {} expected",
                w.good_samples, w.expected_samples
            ));
        }
        let metered = u64::from(w.good_samples)
            .checked_mul(w.interval_ms)
            .and_then(|m| m.checked_add(w.unavailable_ms));
        if metered.is_none_or(|m| m > len) {
            why.push("good and unavailable time exceed the window".into());
        }
    }
    for (name, v) in [
        ("util_avg_pct", w.util_avg_pct),
        ("util_max_pct", w.util_max_pct),
        ("mem_util_avg_pct", w.mem_util_avg_pct),
    ] {
        if !pct_ok(v) {
            why.push(format!(
                "{name} {:?} outside 0-100 %",
                v.unwrap_or(f64::NAN)
            ));
        }
    }
    for (name, v) in [
        ("unavailable_ms", Some(w.unavailable_ms)),
        ("active_ms", Some(w.active_ms)),
        ("occupied_ms", Some(w.occupied_ms)),
        ("foreign_ms", Some(w.foreign_ms)),
        ("grantee_occupied_ms", w.grantee_occupied_ms),
        ("unattributed_ms", w.unattributed_ms),
    ] {
        if v.is_some_and(|v| v > len) {
            why.push(format!("{name} {} exceeds the window", v.unwrap_or(0)));
        }
    }
    let mut active_sum = Some(0u64);
    for p in &w.principals {
        if p.occupied_ms > len || p.active_ms > p.occupied_ms {
            why.push(format!(
                "principal {}: occupied {} / active {} ms",
                p.principal, p.occupied_ms, p.active_ms
            ));
        }
        active_sum = active_sum.and_then(|s| s.checked_add(p.active_ms));
    }
    if active_sum.is_none_or(|s| s > len) {
        why.push("principals' active time exceeds the window".into());
    }
    if let (Some(used), Some(total)) = (w.memory_used_max_bytes, card_memory_total) {
        if used > total {
            why.push(format!("memory used {used} B exceeds the card's {total} B"));
        }
    }
    if let Some(e) = w.energy_mj {
        if POWER_CEILING_W.checked_mul(len).is_none_or(|c| e > c) {
            why.push(format!(
                "energy {e} mJ exceeds {POWER_CEILING_W} W over the window"
            ));
        }
    }
    if let Some(p) = w.power_avg_w {
        if !(p.is_finite() && (0.0..=POWER_CEILING_W as f64).contains(&p)) {
            why.push(format!("average power {p} W"));
        }
    }
    why
}

/// Whether two windows `[start, end)` share an instant.
pub fn overlaps(a: (i64, i64), b: (i64, i64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PrincipalRow;

    fn window() -> WindowRow {
        WindowRow {
            gpu_uuid: "GPU-1".into(),
            start_ms: 60_000 * 1_000,
            end_ms: 60_000 * 1_001,
            interval_ms: 1_000,
            expected_samples: 60,
            good_samples: 60,
            util_avg_pct: Some(50.0),
            util_max_pct: Some(100.0),
            mem_util_avg_pct: None,
            memory_used_max_bytes: Some(10),
            energy_mj: Some(700 * 60_000),
            energy_estimated: false,
            power_avg_w: Some(700.0),
            temperature_max_c: None,
            throttle_reasons: None,
            health: "ok",
            unavailable_ms: 0,
            assignment_status: "assigned",
            grant_id: "G".into(),
            principal: "user:a".into(),
            active_ms: 30_000,
            occupied_ms: 60_000,
            foreign_ms: 0,
            grantee_occupied_ms: Some(60_000),
            unattributed_ms: None,
            energy_estimated_mj: None,
            principals: vec![PrincipalRow {
                principal: "user:a".into(),
                uid: None,
                occupied_ms: 60_000,
                active_ms: 30_000,
                memory_max_bytes: 10,
                process_count: 1,
                matches_grant: true,
            }],
        }
    }

    #[test]
    fn a_real_window_passes_and_each_bound_is_enforced() {
        assert_eq!(window_problems(&window(), Some(10)), Vec::<String>::new());
        type Edit = Box<dyn Fn(&mut WindowRow)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("samples", Box::new(|w| w.good_samples = u32::MAX)),
            ("expected", Box::new(|w| w.expected_samples = 61)),
            ("util", Box::new(|w| w.util_avg_pct = Some(100.5))),
            ("nan", Box::new(|w| w.util_max_pct = Some(f64::NAN))),
            ("occupied", Box::new(|w| w.occupied_ms = 60_001)),
            ("share", Box::new(|w| w.principals[0].active_ms = 60_001)),
            ("energy", Box::new(|w| w.energy_mj = Some(u64::MAX))),
            ("aligned", Box::new(|w| w.start_ms += 1)),
            ("end on a sample", Box::new(|w| w.end_ms += 500)),
            ("length", Box::new(|w| w.end_ms = w.start_ms + 7_000)),
            (
                "one day",
                Box::new(|w| {
                    w.start_ms = DAY_MS - 30_000;
                    w.end_ms = DAY_MS + 30_000;
                }),
            ),
            ("unavailable", Box::new(|w| w.unavailable_ms = 1_000)),
            (
                "unattributed",
                Box::new(|w| w.unattributed_ms = Some(60_001)),
            ),
        ];
        for (name, edit) in cases {
            let mut w = window();
            edit(&mut w);
            assert!(!window_problems(&w, None).is_empty(), "{name}");
        }
        // A window the agent started or stopped inside its aligned period spans what it
        // sampled.
        let mut w = window();
        (w.start_ms, w.end_ms) = (w.start_ms + 6_000, w.start_ms + 8_000);
        (w.expected_samples, w.good_samples) = (2, 2);
        (w.occupied_ms, w.active_ms, w.foreign_ms) = (0, 0, 0);
        w.grantee_occupied_ms = Some(0);
        w.principals.clear();
        w.energy_mj = Some(1_000);
        assert_eq!(window_problems(&w, None), Vec::<String>::new());
        let mut w = window();
        w.memory_used_max_bytes = Some(11);
        assert!(window_problems(&w, None).is_empty());
        assert_eq!(window_problems(&w, Some(10)).len(), 1);
    }

    #[test]
    fn overlap_is_any_shared_instant() {
        assert!(overlaps((0, 60), (59, 120)));
        assert!(!overlaps((0, 60), (60, 120)));
        assert!(overlaps((0, 120), (30, 60)));
    }
}
