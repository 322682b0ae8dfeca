//! Reconciliation: what the coordinator records versus what a host reports.
//!
//! Pure. When an agent (re)registers or heartbeats, it lists the VMs it runs.
//! The coordinator converges its records to that truth without ever starting
//! anything: a VM the host runs is placed there; a VM recorded on the host but
//! no longer running there is marked stopped; a VM that another host is
//! recorded to run is a conflict to report, never to "fix" by starting or
//! killing a copy. The one exception is a copy that cannot be running: the
//! paused half of an interrupted migration (a source in `postmigrate`, a
//! destination in `inmigrate`) while the records place the VM on another host
//! that does run it. That copy is stale and is removed.

use std::collections::BTreeMap;

use flotilla_shared::proto::VmRunState;

use crate::store::VmRow;

/// One change to converge the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fix {
    /// Record that the VM runs on the reporting host.
    Place {
        /// The VM.
        name: String,
    },
    /// The VM is recorded on the reporting host but does not run there: mark it stopped.
    Stopped {
        /// The VM.
        name: String,
    },
    /// The host runs a VM the records place elsewhere.
    Conflict {
        /// The VM.
        name: String,
        /// Where the records say it runs.
        recorded: String,
    },
    /// The host runs a VM that has no definition.
    Unmanaged {
        /// The VM.
        name: String,
    },
    /// The host holds a paused half of a migration; the VM runs elsewhere.
    DestroyStale {
        /// The VM.
        name: String,
        /// QEMU's state of the stale copy.
        state: VmRunState,
    },
}

/// The fixes that make the records agree with `host` reporting `reported`
/// (VM name → QEMU run state). A paused half of a migration (see
/// [`VmRunState::is_migration_half`]) and a QEMU in an unknown state are
/// never placed.
///
/// `other_host_runs(host, vm)` tells whether another host is known to be
/// running a VM right now (so a stale record on an unreachable host is not a
/// conflict).
pub fn reconcile(
    host: &str,
    reported: &BTreeMap<String, VmRunState>,
    rows: &[VmRow],
    other_host_runs: &dyn Fn(&str, &str) -> bool,
) -> Vec<Fix> {
    let mut fixes = Vec::new();
    for (name, state) in reported {
        match rows.iter().find(|r| &r.name == name) {
            None => fixes.push(Fix::Unmanaged { name: name.clone() }),
            Some(r) => match r.placement.as_deref() {
                Some(h) if h == host => {}
                Some(other) if other_host_runs(other, name) => {
                    if state.is_migration_half() {
                        fixes.push(Fix::DestroyStale {
                            name: name.clone(),
                            state: *state,
                        });
                    } else {
                        fixes.push(Fix::Conflict {
                            name: name.clone(),
                            recorded: other.to_string(),
                        });
                    }
                }
                // A paused half cannot run the guest, and a QEMU whose state
                // the agent could not read (dying, or never fully started)
                // may not: neither is evidence that the VM runs here.
                _ if state.is_migration_half() || *state == VmRunState::Unknown => {}
                _ => fixes.push(Fix::Place { name: name.clone() }),
            },
        }
    }
    for r in rows {
        if r.placement.as_deref() == Some(host) && !reported.contains_key(&r.name) {
            fixes.push(Fix::Stopped {
                name: r.name.clone(),
            });
        }
    }
    fixes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, placement: Option<&str>) -> VmRow {
        VmRow {
            name: name.into(),
            uuid: format!("uuid-{name}"),
            xml: String::new(),
            generation: 1,
            want_running: placement.is_some(),
            placement: placement.map(str::to_string),
            migrating_to: None,
            incarnation: 0,
            ha_running: false,
        }
    }

    fn set(names: &[&str]) -> BTreeMap<String, VmRunState> {
        names
            .iter()
            .map(|s| (s.to_string(), VmRunState::Running))
            .collect()
    }

    #[test]
    fn converges_without_starting_anything() {
        let rows = vec![
            row("a", Some("h1")), // still runs on h1: nothing to do
            row("b", None),       // runs on h1 but was not recorded: place it
            row("c", Some("h1")), // recorded on h1, gone: stopped
            row("d", Some("h2")), // runs on h1 but h2 is recorded and still runs it: conflict
            row("e", Some("h3")), // runs on h1, recorded on unreachable h3: place on h1
        ];
        let fixes = reconcile("h1", &set(&["a", "b", "d", "e", "x"]), &rows, &|host, _| {
            host == "h2"
        });
        assert_eq!(
            fixes,
            vec![
                Fix::Place { name: "b".into() },
                Fix::Conflict {
                    name: "d".into(),
                    recorded: "h2".into()
                },
                Fix::Place { name: "e".into() },
                Fix::Unmanaged { name: "x".into() },
                Fix::Stopped { name: "c".into() },
            ]
        );
    }

    #[test]
    fn paused_halves_of_a_migration_are_stale_only_when_the_vm_runs_elsewhere() {
        let rows = vec![
            row("m", Some("h2")),
            row("n", Some("h3")),
            row("o", None),
            row("q", None),
            row("p", Some("h2")),
        ];
        let mut reported = BTreeMap::new();
        reported.insert("m".to_string(), VmRunState::PostMigrate);
        reported.insert("n".to_string(), VmRunState::InMigrate);
        reported.insert("o".to_string(), VmRunState::InMigrate);
        reported.insert("p".to_string(), VmRunState::Paused);
        reported.insert("q".to_string(), VmRunState::Unknown);
        let fixes = reconcile("h1", &reported, &rows, &|host, _| host == "h2");
        assert_eq!(
            fixes,
            vec![
                Fix::DestroyStale {
                    name: "m".into(),
                    state: VmRunState::PostMigrate
                },
                Fix::DestroyStale {
                    name: "p".into(),
                    state: VmRunState::Paused
                }
            ],
            "n: its recorded host is unreachable, keep it; o: a paused copy is never placed; \
             q: nor is one whose state is unknown"
        );
    }

    #[test]
    fn agreement_needs_no_fix() {
        let rows = vec![row("a", Some("h1")), row("b", None)];
        assert!(reconcile("h1", &set(&["a"]), &rows, &|_, _| false).is_empty());
    }
}
