//! Wall-clock time for the agent, injected so that tests and the demo can run faster than real
//! time (or under `tokio::time::pause`).

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (UTC).
pub type UnixMs = i64;

/// A source of wall-clock time that can also wait for a wall-clock instant.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> UnixMs;
    /// Completes at (or soon after) wall-clock time `at`.
    fn sleep_until(&self, at: UnixMs) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The system clock. Sleeping re-reads the clock so a stepped clock (NTP) is followed.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> UnixMs {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }

    fn sleep_until(&self, at: UnixMs) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let wait = (at - self.now_ms()).max(0) as u64;
        Box::pin(tokio::time::sleep(Duration::from_millis(wait)))
    }
}

/// Simulated wall time running `speed` times faster than tokio's monotonic clock from `start`.
/// Used by the demo and by tests; under `tokio::time::pause` it advances only with tokio time.
#[derive(Debug, Clone)]
pub struct ScaledClock {
    start_wall: UnixMs,
    start: tokio::time::Instant,
    speed: f64,
}

impl ScaledClock {
    /// `speed` must be positive; values below 1e-3 are raised to it.
    pub fn new(start_wall: UnixMs, speed: f64) -> Self {
        Self {
            start_wall,
            start: tokio::time::Instant::now(),
            speed: speed.max(1e-3),
        }
    }
}

impl Clock for ScaledClock {
    fn now_ms(&self) -> UnixMs {
        let real = self.start.elapsed().as_secs_f64() * 1000.0;
        self.start_wall + (real * self.speed) as i64
    }

    fn sleep_until(&self, at: UnixMs) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let sim_ms = (at - self.start_wall).max(0) as f64;
        let real = Duration::from_secs_f64(sim_ms / self.speed / 1000.0);
        Box::pin(tokio::time::sleep_until(self.start + real))
    }
}

/// Start of the aligned period of length `period` containing `t`.
pub fn align_down(t: UnixMs, period: u64) -> UnixMs {
    let p = period.max(1) as i64;
    t.div_euclid(p) * p
}

/// First aligned instant at or after `t`.
pub fn align_up(t: UnixMs, period: u64) -> UnixMs {
    let down = align_down(t, period);
    if down == t {
        t
    } else {
        down + period.max(1) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment() {
        assert_eq!(align_down(61_500, 60_000), 60_000);
        assert_eq!(align_up(61_500, 60_000), 120_000);
        assert_eq!(align_up(120_000, 60_000), 120_000);
        assert_eq!(align_down(-1, 1000), -1000);
    }

    #[tokio::test(start_paused = true)]
    async fn scaled_clock_runs_fast() {
        let c = ScaledClock::new(1_000_000, 60.0);
        c.sleep_until(1_060_000).await;
        let now = c.now_ms();
        assert!((1_060_000..1_060_100).contains(&now), "now {now}");
    }
}
