//! Paced load: closed-loop clients that together send about a fixed number of
//! Checks a second. A claim such as "no valid Check fails while X happens" needs
//! real concurrent load (hundreds of Checks a second, several in flight), not the
//! most a debug build can take: on the 2 shared cores of CI, clients spinning as
//! fast as they can mostly burn CPU that the other tests need. Floods whose
//! assertion is about exceeding a limit keep the rate that limit needs.

use std::time::Duration;

use tokio::time::{Interval, MissedTickBehavior};

/// The aggregate rate of the steady load that runs under a fault, a reload or a
/// revocation: still several Checks in flight at once (each client's ticks fall
/// together), and far more Checks than any of those tests counts.
pub const STEADY: u32 = 200;

/// One client's share of an aggregate rate.
pub struct Pace(Interval);

impl Pace {
    /// For one of `clients` clients that together send `per_second` Checks.
    /// A client that falls behind (a slow Check) goes on at once, without a burst
    /// to catch up.
    pub fn share(per_second: u32, clients: u32) -> Pace {
        let period = Duration::from_secs_f64(f64::from(clients) / f64::from(per_second));
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Pace(interval)
    }

    /// Waits for this client's next turn (the first is at once).
    pub async fn tick(&mut self) {
        self.0.tick().await;
    }
}
