//! The time source, at the bottom of the layers: every other module asks a
//! [`Clock`] for the time rather than the system, so a test can move time
//! instead of sleeping.
//!
//! A `Clock` is a small value carried per instance (in `State`, and handed to
//! the stores and tasks that need it), never a global:
//!
//! - [`Clock::system`] — the wall clock for `unix()`, `tokio::time::Instant` for
//!   `instant()`. What `valet serve` and the CLI use.
//! - [`Clock::tokio`] — follows tokio's clock: `unix()` is the wall time when the
//!   clock was made plus the tokio time elapsed since. Under
//!   `tokio::time::pause()` / `advance()` (tokio's `test-util`) an in-process
//!   test moves Valet's unix "now" (token `exp`/`nbf`, cache lifetimes, key
//!   ages) and its timers together. Made in a paused runtime, it starts at the
//!   wall time of that moment.
//! - [`Clock::fixed_at`] — `tokio`, starting at a given unix second (tests that
//!   mint tokens for a known instant).
//! - [`Clock::advance_unix`] — moves `unix()` alone by a manual offset, shared
//!   by every clone (for tests without tokio's paused time).
//!
//! `unix()` is whole seconds since the epoch (what JWT times are); `instant()`
//! is monotonic, for deadlines and rate limits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

#[derive(Clone, Debug, Default)]
pub struct Clock {
    source: Source,
    /// Seconds added to `unix()` by `advance_unix`, shared by every clone.
    offset: Arc<AtomicU64>,
}

#[derive(Clone, Copy, Debug, Default)]
enum Source {
    #[default]
    System,
    /// unix = `at_unix` + (tokio now - `at`).
    Tokio { at: Instant, at_unix: Duration },
}

impl Clock {
    /// The wall clock: what the service runs on.
    pub fn system() -> Self {
        Clock::default()
    }

    /// A clock that follows tokio's (pausable) clock, starting at the wall time.
    pub fn tokio() -> Self {
        Self::starting(wall())
    }

    /// A clock that follows tokio's clock, starting at `unix` seconds.
    pub fn fixed_at(unix: u64) -> Self {
        Self::starting(Duration::from_secs(unix))
    }

    fn starting(at_unix: Duration) -> Self {
        Clock {
            source: Source::Tokio {
                at: Instant::now(),
                at_unix,
            },
            offset: Arc::default(),
        }
    }

    /// Unix seconds now.
    pub fn unix(&self) -> u64 {
        let base = match self.source {
            Source::System => wall(),
            Source::Tokio { at, at_unix } => at_unix + at.elapsed(),
        };
        base.as_secs()
            .saturating_add(self.offset.load(Ordering::Relaxed))
    }

    /// A monotonic instant (tokio's, so paused time moves it too).
    pub fn instant(&self) -> Instant {
        Instant::now()
    }

    /// Moves `unix()` forward by `secs` for this clock and every clone of it.
    pub fn advance_unix(&self, secs: u64) {
        self.offset.fetch_add(secs, Ordering::Relaxed);
    }
}

fn wall() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Wall-clock unix seconds for stamps that decide nothing (log rate limits, a
/// metric's timestamp) where no instance's clock is at hand.
pub fn system_unix() -> u64 {
    wall().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_is_the_wall_clock() {
        let c = Clock::system();
        assert!(c.unix().abs_diff(system_unix()) <= 1);
    }

    #[test]
    fn manual_offset_is_shared_by_clones() {
        let c = Clock::fixed_at(1_000);
        let d = c.clone();
        c.advance_unix(60);
        assert!((1_060..1_062).contains(&d.unix()));
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let c = Clock::fixed_at(1_000);
        assert_eq!(c.unix(), 1_000);
        let before = c.instant();
        tokio::time::advance(Duration::from_secs(3_600)).await;
        assert_eq!(c.unix(), 4_600);
        assert_eq!(c.instant() - before, Duration::from_secs(3_600));
    }
}
