//! Heartbeats as deltas: each side of an agent's connection keeps the last
//! report the coordinator acknowledged, the agent sends only what changed
//! since it, and the coordinator rebuilds the whole facts before its core
//! sees them. The core never learns whether a report came whole.
//!
//! A delta names its base (the acknowledged report's sequence number); a
//! coordinator holding another base refuses it, and the agent registers
//! again, which sends everything. Every [`FULL_REPORT_EVERY`]th beat is
//! whole anyway, so a divergence that both sides missed lasts at most that
//! long. VMs are compared by name and kept sorted by name on both sides, so
//! rebuilding gives exactly what the agent gathered (property test
//! `applying_the_delta_gives_the_new_facts`).
//!
//! Pure.

use crate::proto::{FactsDelta, HostFacts, Report, VmSummary};

/// One beat in this many carries the whole facts.
pub const FULL_REPORT_EVERY: u32 = 10;

/// A delta did not fit the receiver's acknowledged report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The delta's base is not the report acknowledged last.
    #[error("delta against report {base}, but the last acknowledged is {acked:?}")]
    UnknownBase {
        /// The base the delta names.
        base: u64,
        /// The receiver's acknowledged report, if any.
        acked: Option<u64>,
    },
}

fn sort_vms(facts: &mut HostFacts) {
    facts.vms.sort_by(|a, b| a.name.cmp(&b.name));
}

/// What changed from `old` to `new` (both with VMs sorted by name).
pub fn between(base: u64, old: &HostFacts, new: &HostFacts) -> FactsDelta {
    let vms_changed: Vec<VmSummary> = new
        .vms
        .iter()
        .filter(|v| !old.vms.contains(v))
        .cloned()
        .collect();
    let vms_gone = old
        .vms
        .iter()
        .filter(|o| !new.vms.iter().any(|v| v.name == o.name))
        .map(|o| o.name.clone())
        .collect();
    FactsDelta {
        host: new.host.clone(),
        base,
        cpus: (old.cpus != new.cpus).then_some(new.cpus),
        memory_mib: (old.memory_mib != new.memory_mib).then_some(new.memory_mib),
        networks: (old.networks != new.networks).then(|| new.networks.clone()),
        machine_types: (old.machine_types != new.machine_types).then(|| new.machine_types.clone()),
        fence: (old.fence != new.fence).then(|| new.fence.clone()),
        vms_changed,
        vms_gone,
    }
}

/// `old` with `delta` applied; VMs come out sorted by name.
pub fn apply(old: &HostFacts, delta: &FactsDelta) -> HostFacts {
    let mut vms: Vec<VmSummary> = old
        .vms
        .iter()
        .filter(|v| {
            !delta.vms_gone.contains(&v.name) && !delta.vms_changed.iter().any(|c| c.name == v.name)
        })
        .cloned()
        .collect();
    vms.extend(delta.vms_changed.iter().cloned());
    let mut facts = HostFacts {
        host: delta.host.clone(),
        cpus: delta.cpus.unwrap_or(old.cpus),
        memory_mib: delta.memory_mib.unwrap_or(old.memory_mib),
        networks: delta
            .networks
            .clone()
            .unwrap_or_else(|| old.networks.clone()),
        vms,
        machine_types: delta
            .machine_types
            .clone()
            .unwrap_or_else(|| old.machine_types.clone()),
        fence: delta.fence.clone().unwrap_or_else(|| old.fence.clone()),
    };
    sort_vms(&mut facts);
    facts
}

/// The agent's side: what its next heartbeat carries.
#[derive(Debug, Default)]
pub struct ReportSender {
    acked: Option<(u64, HostFacts)>,
    sent: Option<(u64, HostFacts)>,
    since_full: u32,
}

impl ReportSender {
    /// The registration's facts were accepted: they are report 0.
    pub fn registered(facts: &HostFacts) -> Self {
        let mut facts = facts.clone();
        sort_vms(&mut facts);
        ReportSender {
            acked: Some((0, facts)),
            sent: None,
            since_full: 0,
        }
    }

    /// The report numbered `seq` for `facts`.
    pub fn report(&mut self, seq: u64, mut facts: HostFacts) -> Report {
        sort_vms(&mut facts);
        self.since_full += 1;
        let report = match &self.acked {
            Some((base, old)) if self.since_full < FULL_REPORT_EVERY => {
                Report::Delta(between(*base, old, &facts))
            }
            _ => {
                self.since_full = 0;
                Report::Full(facts.clone())
            }
        };
        self.sent = Some((seq, facts));
        report
    }

    /// The report last made was acknowledged.
    pub fn acked(&mut self) {
        if let Some(sent) = self.sent.take() {
            self.acked = Some(sent);
        }
    }
}

/// The coordinator's side: rebuilds whole facts from each report.
#[derive(Debug, Default)]
pub struct ReportReceiver {
    acked: Option<(u64, HostFacts)>,
}

impl ReportReceiver {
    /// Registered with `facts`: they are report 0.
    pub fn registered(&mut self, facts: &HostFacts) {
        let mut facts = facts.clone();
        sort_vms(&mut facts);
        self.acked = Some((0, facts));
    }

    /// The whole facts `report` stands for.
    pub fn expand(&self, report: Report) -> Result<HostFacts, DeltaError> {
        match report {
            Report::Full(mut facts) => {
                sort_vms(&mut facts);
                Ok(facts)
            }
            Report::Delta(delta) => match &self.acked {
                Some((base, old)) if *base == delta.base => Ok(apply(old, &delta)),
                other => Err(DeltaError::UnknownBase {
                    base: delta.base,
                    acked: other.as_ref().map(|(b, _)| *b),
                }),
            },
        }
    }

    /// The report numbered `seq`, expanded to `facts`, was acknowledged.
    pub fn acked(&mut self, seq: u64, facts: HostFacts) {
        self.acked = Some((seq, facts));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{FenceReport, NetStatus, VmRunState};
    use proptest::prelude::*;

    fn vm(name: &str, state: VmRunState, incarnation: u64) -> VmSummary {
        VmSummary {
            suspended: false,
            name: name.into(),
            uuid: format!("uuid-{name}"),
            pid: 100,
            state,
            consoles: Vec::new(),
            incarnation,
            ha: false,
        }
    }

    fn facts(vms: Vec<VmSummary>, address: &str) -> HostFacts {
        HostFacts {
            host: "host-a".into(),
            cpus: 4,
            memory_mib: 4096,
            networks: vec![NetStatus {
                name: "public".into(),
                mode: "bridge".into(),
                device: Some("br0".into()),
                address: Some(address.into()),
                error: None,
                attach_error: None,
            }],
            vms,
            machine_types: Default::default(),
            fence: FenceReport::default(),
        }
    }

    fn arb_facts() -> impl Strategy<Value = HostFacts> {
        let vms = prop::collection::vec(
            (0u8..6, prop::bool::ANY, 0u64..3).prop_map(|(n, running, inc)| {
                vm(
                    &format!("vm{n}"),
                    if running {
                        VmRunState::Running
                    } else {
                        VmRunState::Paused
                    },
                    inc,
                )
            }),
            0..6,
        )
        .prop_map(|mut v| {
            // One summary per VM, as a host reports them.
            v.sort_by(|a, b| a.name.cmp(&b.name));
            v.dedup_by(|a, b| a.name == b.name);
            v.reverse();
            v
        });
        (vms, 1u32..4, prop::bool::ANY, prop::bool::ANY).prop_map(|(vms, cpus, addr, keeper)| {
            let mut f = facts(vms, if addr { "198.18.0.1" } else { "198.18.0.2" });
            f.cpus = cpus;
            f.fence.keeper = keeper;
            f
        })
    }

    proptest! {
        #[test]
        fn applying_the_delta_gives_the_new_facts(old in arb_facts(), new in arb_facts()) {
            let mut sorted_old = old.clone();
            sort_vms(&mut sorted_old);
            let mut sorted_new = new.clone();
            sort_vms(&mut sorted_new);
            let delta = between(7, &sorted_old, &sorted_new);
            prop_assert_eq!(apply(&sorted_old, &delta), sorted_new);
        }

        #[test]
        fn sender_and_receiver_agree_over_any_sequence(
            reports in prop::collection::vec((arb_facts(), prop::bool::weighted(0.9)), 1..30),
        ) {
            let first = facts(Vec::new(), "198.18.0.1");
            let mut tx = ReportSender::registered(&first);
            let mut rx = ReportReceiver::default();
            rx.registered(&first);
            for (seq, (facts, acked)) in reports.into_iter().enumerate() {
                let seq = seq as u64 + 1;
                let got = rx.expand(tx.report(seq, facts.clone()));
                let mut want = facts;
                sort_vms(&mut want);
                // An unacknowledged beat ends the connection in real life;
                // here the agent just does not advance its base.
                prop_assert_eq!(got.as_ref(), Ok(&want));
                if acked {
                    tx.acked();
                    rx.acked(seq, want);
                }
                // The receiver only advances with the sender: a base it
                // does not hold is refused, never misapplied.
            }
        }
    }

    #[test]
    fn an_unchanged_host_sends_an_empty_delta_and_every_tenth_beat_whole() {
        let f = facts(vec![vm("web01", VmRunState::Running, 1)], "198.18.0.1");
        let mut tx = ReportSender::registered(&f);
        let mut kinds = Vec::new();
        for seq in 1..=20 {
            let r = tx.report(seq, f.clone());
            if let Report::Delta(d) = &r {
                assert_eq!(
                    d,
                    &FactsDelta {
                        host: "host-a".into(),
                        base: seq - 1,
                        ..FactsDelta::default()
                    }
                );
            }
            kinds.push(matches!(r, Report::Full(_)));
            tx.acked();
        }
        let full: Vec<u64> = (1..=20).filter(|s| kinds[*s as usize - 1]).collect();
        assert_eq!(full, [10, 20]);
    }

    #[test]
    fn a_delta_against_another_base_is_refused() {
        let f = facts(Vec::new(), "198.18.0.1");
        let mut rx = ReportReceiver::default();
        let delta = Report::Delta(FactsDelta {
            host: "host-a".into(),
            base: 3,
            ..FactsDelta::default()
        });
        assert_eq!(
            rx.expand(delta.clone()),
            Err(DeltaError::UnknownBase {
                base: 3,
                acked: None
            })
        );
        rx.registered(&f);
        assert_eq!(
            rx.expand(delta),
            Err(DeltaError::UnknownBase {
                base: 3,
                acked: Some(0)
            })
        );
    }
}
