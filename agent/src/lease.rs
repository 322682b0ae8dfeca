//! The host's lease from its coordinator: the agent's half of fencing.
//!
//! Pure. Each heartbeat the coordinator acknowledges renews the lease to
//! "when that heartbeat was *sent*, plus L", on the agent's monotonic clock,
//! so the agent's deadline is never later than the coordinator's view of it
//! (which counts from when the heartbeat *arrived*). Two seconds before
//! expiry the host stops starting VMs; at expiry it kills every HA guest,
//! because from then on the coordinator may restart them elsewhere.
//!
//! ```text
//!   None ──renew──▶ Valid ──(until − 2 s)──▶ Closing ──until──▶ Lapsed
//!                     ▲                          │                 │
//!                     └───────── renew ──────────┴─────────────────┘
//! ```
//!
//! A host that never registered has no lease (`None`): its guests are
//! nobody else's to restart, so nothing is refused or killed.

use std::time::{Duration, Instant};

/// How long before expiry the host refuses to start VMs.
pub const STOP_STARTS_BEFORE: Duration = Duration::from_secs(2);

/// Where the lease stands at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Never granted: the host is not (yet) part of a fleet.
    None,
    /// Starts are allowed.
    Valid,
    /// Expiring within [`STOP_STARTS_BEFORE`]: no new starts.
    Closing,
    /// Expired: HA guests must be dead.
    Lapsed,
}

/// The lease as the agent holds it.
#[derive(Debug, Clone, Default)]
pub struct Lease {
    until: Option<Instant>,
    /// The HA guests were killed for the current expiry.
    enforced: bool,
}

impl Lease {
    /// Extends the lease to `until`; an older renewal never shortens it.
    pub fn renew(&mut self, until: Instant) {
        if self.until.is_none_or(|u| until > u) {
            self.until = Some(until);
            self.enforced = false;
        }
    }

    /// When it expires, if granted.
    pub fn until(&self) -> Option<Instant> {
        self.until
    }

    /// Where it stands at `now`.
    pub fn state(&self, now: Instant) -> LeaseState {
        match self.until {
            None => LeaseState::None,
            Some(u) if now >= u => LeaseState::Lapsed,
            Some(u) if now + STOP_STARTS_BEFORE >= u => LeaseState::Closing,
            Some(_) => LeaseState::Valid,
        }
    }

    /// Why a start must be refused at `now`, if it must.
    pub fn refuses_start(&self, now: Instant, host: &str) -> Option<String> {
        match self.state(now) {
            LeaseState::None | LeaseState::Valid => None,
            LeaseState::Closing | LeaseState::Lapsed => Some(format!(
                "host {host} is not starting VMs: its lease from the coordinator {} \
                 (no acknowledged heartbeat); it may be cut off from the coordinator",
                match self.until {
                    Some(u) if now < u => format!(
                        "expires in {:.1}s",
                        u.saturating_duration_since(now).as_secs_f64()
                    ),
                    _ => "has expired".to_string(),
                }
            )),
        }
    }

    /// True once per expiry, at or after it: the moment to kill HA guests.
    pub fn take_expiry(&mut self, now: Instant) -> bool {
        if self.state(now) == LeaseState::Lapsed && !self.enforced {
            self.enforced = true;
            return true;
        }
        false
    }

    /// The instants at which the state changes next (for wake-ups).
    pub fn wakes(&self) -> Vec<Instant> {
        match self.until {
            None => Vec::new(),
            Some(u) => vec![u.checked_sub(STOP_STARTS_BEFORE).unwrap_or(u), u],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_closes_then_lapses_and_is_enforced_once() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut l = Lease::default();
        assert_eq!(l.state(t0), LeaseState::None);
        assert_eq!(l.refuses_start(t0, "a"), None);
        assert!(!l.take_expiry(t0 + s(100)));

        l.renew(t0 + s(8));
        let table = [
            (s(0), LeaseState::Valid),
            (s(5), LeaseState::Valid),
            (s(6), LeaseState::Closing),
            (Duration::from_millis(7999), LeaseState::Closing),
            (s(8), LeaseState::Lapsed),
            (s(60), LeaseState::Lapsed),
        ];
        for (at, want) in table {
            assert_eq!(l.state(t0 + at), want, "at {at:?}");
        }
        let why = l.refuses_start(t0 + s(7), "host-a").expect("refused");
        assert!(why.contains("host host-a is not starting VMs"), "{why}");
        assert!(why.contains("expires in 1.0s"), "{why}");
        assert!(l
            .refuses_start(t0 + s(9), "host-a")
            .is_some_and(|w| w.contains("has expired")));
        assert!(!l.take_expiry(t0 + s(7)));
        assert!(l.take_expiry(t0 + s(8)));
        assert!(!l.take_expiry(t0 + s(9)), "enforced once per expiry");

        // A late renewal re-arms; an older one changes nothing.
        l.renew(t0 + s(20));
        assert_eq!(l.state(t0 + s(9)), LeaseState::Valid);
        l.renew(t0 + s(10));
        assert_eq!(l.until(), Some(t0 + s(20)));
        assert!(l.take_expiry(t0 + s(20)));
        assert_eq!(l.wakes(), vec![t0 + s(18), t0 + s(20)]);
    }
}
