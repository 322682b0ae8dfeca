//! The coordinator's lifecycles: where a VM stands, and what a host is.
//!
//! Pure. A VM's lifecycle is one enum, changed only through
//! [`VmLifecycle::transition`], which refuses a move the fleet's rules do not
//! allow with a typed error. The transitional states (`Starting`, `Stopping`,
//! `Migrating`) are owned by the action that entered them: while a VM is in
//! one, other operator verbs are refused and reconciliation leaves it alone.
//!
//! ```text
//!            start                 started
//! ShutOff ─────────▶ Starting ───────────────▶ Running ◀──┐ migration ends
//!    ▲  ▲  ◀── failed ──┘                      │  │  │     │ (on source or destination)
//!    │  │                    shutdown/destroy  │  │  └──▶ Migrating
//!    │  └──────────── done ── Stopping ◀───────┘  │
//!    └──────────────── exited / reported gone ────┘
//! ```
//!
//! A migration always ends `Running` on one of its two hosts; if the guest
//! was in fact lost there, that host's next report says so.

use std::fmt;

/// Where one VM stands, as far as the coordinator knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmLifecycle {
    /// Not placed anywhere.
    ShutOff,
    /// Its placement is recorded and a start was sent to `host`.
    Starting {
        /// The chosen host.
        host: String,
    },
    /// Recorded as running on `host`.
    Running {
        /// Where.
        host: String,
    },
    /// A shutdown or destroy was sent to `host`.
    Stopping {
        /// Where it runs.
        host: String,
    },
    /// A live migration owns it.
    Migrating {
        /// The host it runs on until the switchover.
        source: String,
        /// The host it moves to.
        dest: String,
    },
}

/// A lifecycle move the fleet's rules do not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid VM transition from {from} to {to}")]
pub struct InvalidTransition {
    /// The state it was in.
    pub from: VmLifecycle,
    /// The state asked for.
    pub to: VmLifecycle,
}

impl fmt::Display for VmLifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmLifecycle::ShutOff => write!(f, "shut off"),
            VmLifecycle::Starting { host } => write!(f, "starting on {host}"),
            VmLifecycle::Running { host } => write!(f, "running on {host}"),
            VmLifecycle::Stopping { host } => write!(f, "stopping on {host}"),
            VmLifecycle::Migrating { source, dest } => {
                write!(f, "migrating from {source} to {dest}")
            }
        }
    }
}

impl VmLifecycle {
    /// The host the records place it on, if any.
    pub fn host(&self) -> Option<&str> {
        match self {
            VmLifecycle::ShutOff => None,
            VmLifecycle::Starting { host }
            | VmLifecycle::Running { host }
            | VmLifecycle::Stopping { host } => Some(host),
            VmLifecycle::Migrating { source, .. } => Some(source),
        }
    }

    /// An action owns it: other verbs and reconciliation leave it alone.
    pub fn is_transitional(&self) -> bool {
        matches!(
            self,
            VmLifecycle::Starting { .. }
                | VmLifecycle::Stopping { .. }
                | VmLifecycle::Migrating { .. }
        )
    }

    /// Moves to `to` if the rules allow it.
    ///
    /// Allowed: a start from shut off; its outcome; a stop from running and
    /// its outcome (or its failure, back to running); a migration from
    /// running (on its source, or on its destination when taking over an
    /// interrupted switchover) and its end on either host; a running VM
    /// recorded on another host, or as gone, when its host
    /// reports so; a shut-off VM recorded where a host reports it running.
    pub fn transition(&self, to: VmLifecycle) -> Result<VmLifecycle, InvalidTransition> {
        use VmLifecycle::*;
        let ok = match (self, &to) {
            (ShutOff, Starting { .. }) => true,
            (ShutOff, Running { .. }) => true,
            (Starting { host: a }, Running { host: b }) => a == b,
            (Starting { .. }, ShutOff) => true,
            (Running { .. }, Stopping { host: b }) => self.host() == Some(b),
            // From the destination too: taking over a switchover that a
            // crashed coordinator had already recorded there.
            (Running { host: a }, Migrating { source, dest }) => {
                (a == source || a == dest) && source != dest
            }
            (Running { .. }, ShutOff) => true,
            (Running { host: a }, Running { host: b }) => a != b,
            (Stopping { .. }, ShutOff) => true,
            (Stopping { host: a }, Running { host: b }) => a == b,
            (Migrating { source, dest }, Running { host }) => host == source || host == dest,
            _ => false,
        };
        if ok {
            Ok(to)
        } else {
            Err(InvalidTransition {
                from: self.clone(),
                to,
            })
        }
    }
}

/// What a host is, as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HostState {
    /// Registered and heard from within the heartbeat timeout.
    Connected,
    /// Connected, but the scheduler must not place new VMs there.
    Draining,
    /// No live connection, or silent past the heartbeat timeout.
    Unreachable,
}

impl HostState {
    /// The word `flotilla hosts`, events and metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Connected => "connected",
            HostState::Draining => "draining",
            HostState::Unreachable => "unreachable",
        }
    }

    /// Every state, for gauges that report zeros too.
    pub const ALL: [HostState; 3] = [
        HostState::Connected,
        HostState::Unreachable,
        HostState::Draining,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmLifecycle::*;

    fn h(s: &str) -> String {
        s.to_string()
    }

    #[test]
    fn every_allowed_move() {
        let allowed = [
            (ShutOff, Starting { host: h("a") }),
            (ShutOff, Running { host: h("a") }),
            (Starting { host: h("a") }, Running { host: h("a") }),
            (Starting { host: h("a") }, ShutOff),
            (Running { host: h("a") }, Stopping { host: h("a") }),
            (
                Running { host: h("a") },
                Migrating {
                    source: h("a"),
                    dest: h("b"),
                },
            ),
            (
                Running { host: h("a") },
                Migrating {
                    source: h("b"),
                    dest: h("a"),
                },
            ),
            (Running { host: h("a") }, ShutOff),
            (Running { host: h("a") }, Running { host: h("b") }),
            (Stopping { host: h("a") }, ShutOff),
            (Stopping { host: h("a") }, Running { host: h("a") }),
            (
                Migrating {
                    source: h("a"),
                    dest: h("b"),
                },
                Running { host: h("a") },
            ),
            (
                Migrating {
                    source: h("a"),
                    dest: h("b"),
                },
                Running { host: h("b") },
            ),
        ];
        for (from, to) in allowed {
            assert_eq!(
                from.transition(to.clone()),
                Ok(to.clone()),
                "{from} -> {to}"
            );
        }
    }

    #[test]
    fn refused_moves_name_both_ends() {
        let refused = [
            (ShutOff, Stopping { host: h("a") }),
            (
                ShutOff,
                Migrating {
                    source: h("a"),
                    dest: h("b"),
                },
            ),
            (Starting { host: h("a") }, Running { host: h("b") }),
            (Starting { host: h("a") }, Stopping { host: h("a") }),
            (
                Starting { host: h("a") },
                Migrating {
                    source: h("a"),
                    dest: h("b"),
                },
            ),
            (Running { host: h("a") }, Stopping { host: h("b") }),
            (
                Running { host: h("a") },
                Migrating {
                    source: h("b"),
                    dest: h("c"),
                },
            ),
            (
                Running { host: h("a") },
                Migrating {
                    source: h("a"),
                    dest: h("a"),
                },
            ),
            (Running { host: h("a") }, Running { host: h("a") }),
            (Running { host: h("a") }, Starting { host: h("a") }),
            (Stopping { host: h("a") }, Running { host: h("b") }),
            (
                Migrating {
                    source: h("a"),
                    dest: h("b"),
                },
                Running { host: h("c") },
            ),
            (
                Migrating {
                    source: h("a"),
                    dest: h("b"),
                },
                Stopping { host: h("a") },
            ),
            (ShutOff, ShutOff),
            (
                Migrating {
                    source: h("a"),
                    dest: h("b"),
                },
                ShutOff,
            ),
        ];
        for (from, to) in refused {
            assert_eq!(
                from.transition(to.clone()),
                Err(InvalidTransition {
                    from: from.clone(),
                    to: to.clone()
                }),
                "{from} -> {to} must be refused"
            );
        }
        let e = Running { host: h("a") }
            .transition(Starting { host: h("a") })
            .expect_err("refused");
        assert_eq!(
            e.to_string(),
            "invalid VM transition from running on a to starting on a"
        );
    }

    #[test]
    fn transitional_states_are_owned() {
        assert!(!ShutOff.is_transitional());
        assert!(!Running { host: h("a") }.is_transitional());
        assert!(Starting { host: h("a") }.is_transitional());
        assert!(Stopping { host: h("a") }.is_transitional());
        assert!(Migrating {
            source: h("a"),
            dest: h("b")
        }
        .is_transitional());
        assert_eq!(
            Migrating {
                source: h("a"),
                dest: h("b")
            }
            .host(),
            Some("a")
        );
    }
}
