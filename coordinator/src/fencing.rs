//! When the coordinator may treat a silent host as fenced: the coordinator's
//! half of the lease rule (the agent's half is `flotilla_agent::lease`).
//!
//! Pure. A host's lease runs L from when it *sent* its last acknowledged
//! heartbeat, on its own clock; the coordinator knows only when that
//! heartbeat *arrived*, which is later. So on the coordinator's clock the
//! host's guests are dead by
//!
//! ```text
//! deadline = last heartbeat received + L × (1 + ρ) + W + margin
//! ```
//!
//! where ρ bounds how much faster the coordinator's clock may run than the
//! host's, W is the kernel watchdog's timeout when the host pets one (the
//! machine resets at most W after the agent stops petting it), and the
//! margin covers the fence keeper's poll and the kill itself. Before the
//! deadline nothing of the host's HA guests is restarted elsewhere; after
//! it, one copy cannot still run there.
//!
//! A coordinator that starts afresh has heard nothing yet: it counts every
//! host's lease from its own start ([`FencePolicy::deadline`] with
//! `last_heard` = that start), as Nomad re-arms its heartbeat timers.

use std::time::{Duration, Instant};

/// The rule's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FencePolicy {
    /// L: how long an acknowledged heartbeat renews a lease.
    pub lease: Duration,
    /// ρ: the bound on the clocks' rate difference.
    pub clock_rate_bound: f64,
    /// Slack for the keeper's poll and the kill.
    pub margin: Duration,
}

impl Default for FencePolicy {
    fn default() -> Self {
        FencePolicy {
            lease: Duration::from_secs(8),
            clock_rate_bound: 1e-3,
            margin: Duration::from_secs(2),
        }
    }
}

impl FencePolicy {
    /// How long after `last_heard` the host's HA guests are certainly dead.
    pub fn delay(&self, watchdog: Option<Duration>) -> Duration {
        self.lease.mul_f64(1.0 + self.clock_rate_bound.max(0.0))
            + watchdog.unwrap_or_default()
            + self.margin
    }

    /// The instant the host counts as fenced.
    pub fn deadline(&self, last_heard: Instant, watchdog: Option<Duration>) -> Instant {
        last_heard + self.delay(watchdog)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_adds_drift_watchdog_and_margin() {
        let t0 = Instant::now();
        let p = FencePolicy::default();
        let ms = Duration::from_millis;
        let table = [
            // (lease, ρ, margin, watchdog, delay)
            (ms(8000), 1e-3, ms(2000), None, ms(10_008)),
            (ms(8000), 1e-3, ms(2000), Some(ms(10_000)), ms(20_008)),
            (ms(3000), 0.0, ms(500), None, ms(3500)),
            // A negative bound is no bound at all, never a shorter wait.
            (ms(3000), -0.5, ms(0), None, ms(3000)),
        ];
        for (lease, rho, margin, watchdog, want) in table {
            let p = FencePolicy {
                lease,
                clock_rate_bound: rho,
                margin,
            };
            assert_eq!(p.delay(watchdog), want, "{p:?} {watchdog:?}");
            assert_eq!(p.deadline(t0, watchdog), t0 + want);
        }
        assert_eq!(p.delay(None), ms(10_008));
    }
}
