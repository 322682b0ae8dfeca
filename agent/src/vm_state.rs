//! `VmState`: the agent's view of one VM's lifecycle, and the moves it allows.
//!
//! [`crate::host_core::HostCore`] moves a VM only through
//! [`VmState::transition`]; a refused move is an [`InvalidTransition`].
//! QEMU's own run states (`query-status`) map onto it with
//! [`VmState::from_qemu_status`], and listings report [`VmState::qemu_status`].

/// The agent's view of one VM's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum VmState {
    /// QEMU is being spawned, given its secrets and resumed.
    Starting,
    /// Started with `-incoming defer`, waiting for (or receiving) a migration stream.
    Incoming,
    /// The guest runs.
    Running,
    /// The guest is paused (the stream landed, or `stop`).
    Paused,
    /// The guest runs and is being migrated away.
    Outgoing,
    /// The outgoing migration completed; this copy is paused for good unless resumed.
    PostMigrate,
    /// A shutdown or destroy is under way.
    Stopping,
}

/// A lifecycle move the agent refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a VM cannot go from {from:?} to {to:?}")]
pub struct InvalidTransition {
    /// Where the VM is.
    pub from: VmState,
    /// Where it was asked to go.
    pub to: VmState,
}

impl VmState {
    /// The state after moving to `to`, or why that move is refused.
    pub fn transition(&self, to: VmState) -> Result<VmState, InvalidTransition> {
        use VmState::*;
        let allowed = matches!(
            (*self, to),
            (Starting, Running)
                | (Starting, Incoming)
                | (Incoming, Paused)
                | (Incoming, Running)
                | (Incoming, Stopping)
                | (Running, Paused)
                | (Running, Outgoing)
                | (Running, Stopping)
                | (Paused, Running)
                | (Paused, Outgoing)
                | (Paused, Stopping)
                | (Outgoing, Running)
                | (Outgoing, PostMigrate)
                | (Outgoing, Stopping)
                | (PostMigrate, Running)
                | (PostMigrate, Stopping)
                | (Stopping, Stopping)
        );
        if allowed {
            Ok(to)
        } else {
            Err(InvalidTransition { from: *self, to })
        }
    }

    /// QEMU's run state for this lifecycle state, as listings report it.
    pub fn qemu_status(&self) -> &'static str {
        match self {
            VmState::Starting => "prelaunch",
            VmState::Incoming => "inmigrate",
            VmState::Running | VmState::Outgoing | VmState::Stopping => "running",
            VmState::Paused => "paused",
            VmState::PostMigrate => "postmigrate",
        }
    }

    /// The lifecycle state a QEMU run state (`query-status`) stands for.
    pub fn from_qemu_status(status: &str) -> Option<VmState> {
        match status {
            "running" => Some(VmState::Running),
            "paused" => Some(VmState::Paused),
            "inmigrate" => Some(VmState::Incoming),
            "postmigrate" => Some(VmState::PostMigrate),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_allowed_transition_and_some_refused_ones() {
        use VmState::*;
        let allowed = [
            (Starting, Running),
            (Starting, Incoming),
            (Incoming, Paused),
            (Incoming, Running),
            (Incoming, Stopping),
            (Running, Paused),
            (Running, Outgoing),
            (Running, Stopping),
            (Paused, Running),
            (Paused, Outgoing),
            (Paused, Stopping),
            (Outgoing, Running),
            (Outgoing, PostMigrate),
            (Outgoing, Stopping),
            (PostMigrate, Running),
            (PostMigrate, Stopping),
            (Stopping, Stopping),
        ];
        let all = [
            Starting,
            Incoming,
            Running,
            Paused,
            Outgoing,
            PostMigrate,
            Stopping,
        ];
        for from in all {
            for to in all {
                let expected = if allowed.contains(&(from, to)) {
                    Ok(to)
                } else {
                    Err(InvalidTransition { from, to })
                };
                assert_eq!(from.transition(to), expected, "{from:?} → {to:?}");
            }
        }
        let refused = [
            (Running, Incoming),
            (Running, Starting),
            (Stopping, Running),
            (PostMigrate, Outgoing),
            (Incoming, Outgoing),
            (Starting, Stopping),
        ];
        for (from, to) in refused {
            let e = from.transition(to).expect_err("refused");
            assert_eq!(e, InvalidTransition { from, to });
            assert_eq!(
                e.to_string(),
                format!("a VM cannot go from {from:?} to {to:?}")
            );
        }
    }
}
