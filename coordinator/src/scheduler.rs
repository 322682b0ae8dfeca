//! The scheduler: where a VM should run, and why not elsewhere.
//!
//! A pure, deterministic function of (VM needs, host snapshots, policy): no
//! I/O and no clock, so it is tested with tables and benchmarked without
//! sockets. A host's check stops at its first failing filter and allocates
//! nothing; only when nothing fits is every host checked against every
//! filter, so the answer names each host with each reason ("host-b: network
//! 'public' has no address: no IP address found for interface 'br0'"), never
//! a bare "no valid host". Feasible hosts are scored (spread or binpack) and
//! ties break by name, so the same inputs always give the same answer.

use std::collections::BTreeMap;

use flotilla_shared::proto::{CpuNeed, MachineTypes};
use std::fmt;
use std::sync::Arc;

/// What a VM needs from a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNeeds {
    /// The VM's name, for messages.
    pub name: String,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Networks its consoles listen on: each must resolve to an address.
    pub networks: Vec<String>,
    /// Networks its NICs attach to: each must be defined and attachable.
    pub nic_networks: Vec<String>,
    /// Its stored machine type: the host's QEMU must run it.
    pub machine: Option<String>,
    /// The guest CPU it asks for: the host must give it in full.
    pub cpu: CpuNeed,
}

/// A host's state as the coordinator last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSnapshot {
    /// Host name.
    pub name: String,
    /// Its agent is connected and heartbeating.
    pub connected: bool,
    /// An operator is moving VMs off it.
    pub draining: bool,
    /// CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Memory committed to VMs placed here.
    pub used_memory_mib: u64,
    /// vCPUs committed to VMs placed here.
    pub used_vcpus: u32,
    /// Each network defined on the host: its address now, or why it has none.
    /// Shared, because it changes only when the host reports a change and a
    /// start reads it for every host.
    pub networks: Arc<NetworkAddresses>,
    /// Networks defined here that guest NICs cannot attach to, with the reason.
    pub nic_blocked: Arc<BTreeMap<String, String>>,
    /// The machine types its QEMU runs (empty: unknown, so not a filter).
    pub machine_types: Arc<MachineTypes>,
}

/// A host's networks by name: the address each resolves to now, or why none.
pub type NetworkAddresses = BTreeMap<String, Result<String, String>>;

/// How feasible hosts are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Prefer the emptiest host, so load spreads and failures hit fewer VMs.
    #[default]
    Spread,
    /// Prefer the fullest host that fits, so whole hosts stay free.
    Binpack,
}

/// Scheduling policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Ranking strategy.
    pub strategy: Strategy,
    /// A host may commit up to `cpus × cpu_ratio` vCPUs.
    pub cpu_ratio: f64,
    /// A host may commit up to `memory_mib × memory_ratio` MiB.
    pub memory_ratio: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            strategy: Strategy::Spread,
            cpu_ratio: 4.0,
            memory_ratio: 1.0,
        }
    }
}

/// Why one host cannot take the VM.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    /// No host of that name is known.
    Unknown,
    /// Its agent is not connected.
    Unreachable,
    /// It is being drained.
    Draining,
    /// The migration source (or otherwise excluded by the caller).
    Excluded,
    /// A network the VM needs is not defined on it.
    MissingNetwork(String),
    /// A network is defined but has no address now.
    UnresolvedNetwork {
        /// The network.
        network: String,
        /// The resolver's words.
        reason: String,
    },
    /// A network is defined but guest NICs cannot attach to it here.
    NicsBlocked {
        /// The network.
        network: String,
        /// The agent's words.
        reason: String,
    },
    /// Its QEMU does not run the VM's machine type.
    MissingMachine(String),
    /// It cannot give the VM's CPU (the reason names the mode or model).
    Cpu(String),
    /// Not enough memory left.
    Memory {
        /// What the VM needs.
        need_mib: u64,
        /// What is free (after overcommit).
        free_mib: u64,
    },
    /// Not enough vCPUs left.
    Vcpus {
        /// What the VM needs.
        need: u32,
        /// What is free (after overcommit).
        free: u32,
        /// The overcommit ratio applied.
        ratio: f64,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Unknown => write!(f, "host is not known"),
            Rejection::Unreachable => write!(f, "not connected"),
            Rejection::Draining => write!(f, "draining"),
            Rejection::Excluded => write!(f, "is the migration source"),
            Rejection::MissingNetwork(n) => write!(f, "network '{n}' is not defined"),
            Rejection::UnresolvedNetwork { network, reason } => {
                write!(f, "network '{network}' has no address: {reason}")
            }
            Rejection::MissingMachine(m) => write!(f, "its QEMU has no machine type '{m}'"),
            Rejection::Cpu(why) => f.write_str(why),
            Rejection::NicsBlocked { network, reason } => {
                write!(f, "network '{network}' cannot take NICs: {reason}")
            }
            Rejection::Memory { need_mib, free_mib } => {
                write!(f, "needs {need_mib} MiB memory, {free_mib} MiB free")
            }
            Rejection::Vcpus { need, free, ratio } => write!(
                f,
                "needs {need} vCPUs, {free} free (with overcommit {ratio:.1})"
            ),
        }
    }
}

/// How many of the best hosts a decision names to explain itself.
pub const RANKING_SHOWN: usize = 5;

/// The scheduler's choice.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The chosen host.
    pub host: String,
    /// The best feasible hosts with their scores, best first (at most
    /// [`RANKING_SHOWN`]), to explain the choice.
    pub ranking: Vec<(String, f64)>,
    /// How many hosts could have taken the VM.
    pub feasible: usize,
}

/// No host fits: every host and every reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("no host can run VM '{vm}': {}", describe(.rejections))]
pub struct NoPlacement {
    /// The VM.
    pub vm: String,
    /// Each host, by name, with all its reasons.
    pub rejections: Vec<(String, Vec<Rejection>)>,
}

fn describe(rejections: &[(String, Vec<Rejection>)]) -> String {
    if rejections.is_empty() {
        return "the fleet has no hosts".to_string();
    }
    rejections
        .iter()
        .map(|(h, rs)| {
            let why: Vec<String> = rs.iter().map(ToString::to_string).collect();
            format!("{h}: {}", why.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

pub(crate) fn free_memory(h: &HostSnapshot, p: &Policy) -> u64 {
    let cap = (h.memory_mib as f64 * p.memory_ratio).floor() as u64;
    cap.saturating_sub(h.used_memory_mib)
}

pub(crate) fn free_vcpus(h: &HostSnapshot, p: &Policy) -> u32 {
    let cap = (f64::from(h.cpus) * p.cpu_ratio).floor() as u32;
    cap.saturating_sub(h.used_vcpus)
}

fn runs_machine(vm: &VmNeeds, h: &HostSnapshot) -> bool {
    vm.machine
        .as_deref()
        .is_none_or(|m| h.machine_types.is_empty() || h.machine_types.has(m))
}

/// Whether `h` can take `vm`: [`rejections`] is empty, decided without
/// allocating, because it runs once per host per decision.
fn fits(vm: &VmNeeds, h: &HostSnapshot, p: &Policy) -> bool {
    h.connected
        && !h.draining
        && vm
            .networks
            .iter()
            .all(|n| matches!(h.networks.get(n), Some(Ok(_))))
        && vm
            .nic_networks
            .iter()
            .all(|n| h.networks.contains_key(n) && !h.nic_blocked.contains_key(n))
        && runs_machine(vm, h)
        && h.machine_types.cpu_refusal(&vm.cpu).is_none()
        && free_memory(h, p) >= vm.memory_mib
        && free_vcpus(h, p) >= vm.vcpus
}

/// Every reason `h` cannot take `vm`; empty when it can.
fn rejections(vm: &VmNeeds, h: &HostSnapshot, p: &Policy) -> Vec<Rejection> {
    let mut out = Vec::new();
    if !h.connected {
        out.push(Rejection::Unreachable);
    }
    if h.draining {
        out.push(Rejection::Draining);
    }
    for n in &vm.networks {
        match h.networks.get(n) {
            None => out.push(Rejection::MissingNetwork(n.clone())),
            Some(Err(reason)) => out.push(Rejection::UnresolvedNetwork {
                network: n.clone(),
                reason: reason.clone(),
            }),
            Some(Ok(_)) => {}
        }
    }
    for n in &vm.nic_networks {
        if !h.networks.contains_key(n) {
            if !vm.networks.contains(n) {
                out.push(Rejection::MissingNetwork(n.clone()));
            }
        } else if let Some(reason) = h.nic_blocked.get(n) {
            out.push(Rejection::NicsBlocked {
                network: n.clone(),
                reason: reason.clone(),
            });
        }
    }
    if !runs_machine(vm, h) {
        out.push(Rejection::MissingMachine(
            vm.machine.clone().unwrap_or_default(),
        ));
    }
    if let Some(why) = h.machine_types.cpu_refusal(&vm.cpu) {
        out.push(Rejection::Cpu(why));
    }
    let mem = free_memory(h, p);
    if mem < vm.memory_mib {
        out.push(Rejection::Memory {
            need_mib: vm.memory_mib,
            free_mib: mem,
        });
    }
    let cpu = free_vcpus(h, p);
    if cpu < vm.vcpus {
        out.push(Rejection::Vcpus {
            need: vm.vcpus,
            free: cpu,
            ratio: p.cpu_ratio,
        });
    }
    out
}

/// Higher is better. Fractions of what is left after placing the VM.
pub(crate) fn score(vm: &VmNeeds, h: &HostSnapshot, p: &Policy) -> f64 {
    let mem_cap = (h.memory_mib as f64 * p.memory_ratio).max(1.0);
    let cpu_cap = (f64::from(h.cpus) * p.cpu_ratio).max(1.0);
    let mem_left = (free_memory(h, p).saturating_sub(vm.memory_mib)) as f64 / mem_cap;
    let cpu_left = f64::from(free_vcpus(h, p).saturating_sub(vm.vcpus)) / cpu_cap;
    // Memory dominates; vCPU headroom breaks near-ties.
    let spread = mem_left + cpu_left / 1000.0;
    match p.strategy {
        Strategy::Spread => spread,
        Strategy::Binpack => 1.0 - spread,
    }
}

fn choose<'a>(
    vm: &VmNeeds,
    hosts: impl Iterator<Item = &'a HostSnapshot> + Clone,
    excluded: &dyn Fn(&str) -> bool,
    p: &Policy,
) -> Result<Decision, NoPlacement> {
    let mut feasible: Vec<(&HostSnapshot, f64)> = hosts
        .clone()
        .filter(|h| !excluded(&h.name) && fits(vm, h, p))
        .map(|h| (h, score(vm, h, p)))
        .collect();
    if feasible.is_empty() {
        // The slow path, taken only when nothing fits: every host, every reason.
        let mut rejected: Vec<(String, Vec<Rejection>)> = hosts
            .map(|h| {
                let mut why = rejections(vm, h, p);
                if excluded(&h.name) {
                    why.insert(0, Rejection::Excluded);
                }
                (h.name.clone(), why)
            })
            .collect();
        rejected.sort_by(|a, b| a.0.cmp(&b.0));
        return Err(NoPlacement {
            vm: vm.name.clone(),
            rejections: rejected,
        });
    }
    let count = feasible.len();
    let better = |a: &(&HostSnapshot, f64), b: &(&HostSnapshot, f64)| {
        b.1.total_cmp(&a.1).then_with(|| a.0.name.cmp(&b.0.name))
    };
    // Only the few shown are ordered: O(hosts), not O(hosts log hosts).
    if feasible.len() > RANKING_SHOWN {
        feasible.select_nth_unstable_by(RANKING_SHOWN - 1, better);
        feasible.truncate(RANKING_SHOWN);
    }
    feasible.sort_by(better);
    let ranking: Vec<(String, f64)> = feasible
        .iter()
        .map(|(h, score)| (h.name.clone(), *score))
        .collect();
    Ok(Decision {
        host: ranking[0].0.clone(),
        ranking,
        feasible: count,
    })
}

/// Chooses a host for `vm`. Deterministic: ties break by host name.
pub fn place(
    vm: &VmNeeds,
    hosts: &[HostSnapshot],
    policy: &Policy,
) -> Result<Decision, NoPlacement> {
    choose(vm, hosts.iter(), &|_| false, policy)
}

/// Checks `vm` against the one host an operator asked for (`start --host H`).
pub fn place_on(
    vm: &VmNeeds,
    host: &str,
    hosts: &[HostSnapshot],
    policy: &Policy,
) -> Result<Decision, NoPlacement> {
    if !hosts.iter().any(|h| h.name == host) {
        return Err(NoPlacement {
            vm: vm.name.clone(),
            rejections: vec![(host.to_string(), vec![Rejection::Unknown])],
        });
    }
    choose(
        vm,
        hosts.iter().filter(|h| h.name == host),
        &|_| false,
        policy,
    )
}

/// Like [`place`], never choosing a host in `exclude` (a migration's source).
pub fn place_excluding(
    vm: &VmNeeds,
    hosts: &[HostSnapshot],
    exclude: &[&str],
    policy: &Policy,
) -> Result<Decision, NoPlacement> {
    choose(vm, hosts.iter(), &|h| exclude.contains(&h), policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(
        name: &str,
        mem: u64,
        used_mem: u64,
        nets: &[(&str, Result<&str, &str>)],
    ) -> HostSnapshot {
        HostSnapshot {
            name: name.into(),
            connected: true,
            draining: false,
            cpus: 4,
            memory_mib: mem,
            used_memory_mib: used_mem,
            used_vcpus: 0,
            networks: Arc::new(
                nets.iter()
                    .map(|(n, r)| (n.to_string(), r.map(str::to_string).map_err(str::to_string)))
                    .collect(),
            ),
            nic_blocked: Arc::default(),
            machine_types: Arc::default(),
        }
    }

    fn vm(mem: u64, vcpus: u32) -> VmNeeds {
        VmNeeds {
            name: "web01".into(),
            memory_mib: mem,
            vcpus,
            networks: vec!["public".into()],
            nic_networks: Vec::new(),
            cpu: CpuNeed::default(),
            machine: None,
        }
    }

    #[test]
    fn a_host_whose_qemu_lacks_the_machine_type_is_rejected_by_name() {
        let mut old = host("host-a", 4096, 0, &[PUBLIC]);
        old.machine_types = Arc::new(MachineTypes {
            names: vec!["pc-i440fx-7.2".into()],
            aliases: vec![("pc".into(), "pc-i440fx-7.2".into())],
            ..Default::default()
        });
        let mut new = host("host-b", 4096, 1024, &[PUBLIC]);
        new.machine_types = Arc::new(MachineTypes {
            names: vec!["pc-i440fx-10.0".into(), "pc-i440fx-7.2".into()],
            aliases: vec![("pc".into(), "pc-i440fx-10.0".into())],
            ..Default::default()
        });
        // A host that could not ask its QEMU is not filtered.
        let unknown = host("host-c", 4096, 2048, &[PUBLIC]);
        let mut needs = vm(512, 1);
        needs.machine = Some("pc-i440fx-10.0".into());
        let hosts = vec![old, new, unknown];
        let d = place(&needs, &hosts, &Policy::default()).expect("fits");
        assert_eq!(d.feasible, 2);
        let e = place_on(&needs, "host-a", &hosts, &Policy::default()).expect_err("too old");
        assert_eq!(
            e.to_string(),
            "no host can run VM 'web01': host-a: its QEMU has no machine type 'pc-i440fx-10.0'"
        );
    }

    #[test]
    fn a_host_that_cannot_give_the_guest_cpu_is_rejected_saying_why() {
        let mut tcg = host("host-a", 4096, 0, &[PUBLIC]);
        tcg.machine_types = Arc::new(MachineTypes {
            cpu_models: vec!["qemu64".into()],
            ..Default::default()
        });
        let mut kvm = host("host-b", 4096, 0, &[PUBLIC]);
        kvm.machine_types = Arc::new(MachineTypes {
            kvm: true,
            cpu_models: vec!["EPYC".into(), "qemu64".into()],
            ..Default::default()
        });
        let hosts = vec![tcg, kvm];
        let mut needs = vm(512, 1);
        needs.cpu = CpuNeed {
            kvm: true,
            mode: "host-passthrough".into(),
            model: None,
        };
        let d = place(&needs, &hosts, &Policy::default()).expect("b has KVM");
        assert_eq!(d.host, "host-b");
        let e = place_on(&needs, "host-a", &hosts, &Policy::default()).expect_err("no KVM");
        assert_eq!(
            e.to_string(),
            "no host can run VM 'web01': host-a: it cannot give a host-passthrough CPU without KVM"
        );
        needs.cpu = CpuNeed {
            kvm: false,
            mode: "custom".into(),
            model: Some("EPYC".into()),
        };
        let e = place_on(&needs, "host-a", &hosts, &Policy::default()).expect_err("no EPYC");
        assert_eq!(
            e.to_string(),
            "no host can run VM 'web01': host-a: it cannot give CPU model 'EPYC' in full \
             (its QEMU or host CPU lacks it)"
        );
        assert_eq!(
            place(&needs, &hosts, &Policy::default()).expect("b").host,
            "host-b"
        );
    }

    #[test]
    fn a_nic_network_needs_an_attachable_device_not_an_address() {
        // `lan` is a bridge the host has no address on: fine for NICs.
        let lan_no_address = ("lan", Err("no IP address found for interface 'br1'"));
        let mut blocked = host("host-b", 4096, 0, &[PUBLIC, lan_no_address]);
        blocked.nic_blocked = Arc::new(BTreeMap::from([(
            "lan".to_string(),
            "bridge 'br1' does not exist".to_string(),
        )]));
        let hosts = vec![
            host("host-a", 4096, 0, &[PUBLIC, lan_no_address]),
            blocked,
            host("host-c", 4096, 0, &[PUBLIC]),
        ];
        let mut needs = vm(512, 1);
        needs.nic_networks = vec!["lan".into(), "public".into()];
        let placed = place(&needs, &hosts, &Policy::default()).expect("host-a fits");
        assert_eq!(placed.host, "host-a");
        let only_bad = &hosts[1..];
        let e = place(&needs, only_bad, &Policy::default()).expect_err("none fits");
        assert_eq!(
            e.to_string(),
            "no host can run VM 'web01': host-b: network 'lan' cannot take NICs: bridge 'br1' \
             does not exist; host-c: network 'lan' is not defined"
        );
    }

    const PUBLIC: (&str, Result<&str, &str>) = ("public", Ok("198.18.0.1"));

    #[test]
    fn spread_and_binpack_choose_differently() {
        let hosts = vec![
            host("host-a", 4096, 3072, &[PUBLIC]),
            host("host-b", 4096, 0, &[PUBLIC]),
        ];
        let spread = place(&vm(512, 1), &hosts, &Policy::default()).expect("fits");
        assert_eq!(spread.host, "host-b");
        assert_eq!(spread.ranking.len(), 2);
        let binpack = Policy {
            strategy: Strategy::Binpack,
            ..Policy::default()
        };
        assert_eq!(
            place(&vm(512, 1), &hosts, &binpack).expect("fits").host,
            "host-a"
        );
    }

    #[test]
    fn every_host_is_named_with_every_reason() {
        let mut down = host("host-d", 8192, 0, &[PUBLIC]);
        down.connected = false;
        let mut drain = host("host-e", 8192, 0, &[PUBLIC]);
        drain.draining = true;
        let hosts = vec![
            host("host-c", 256, 0, &[]),
            host(
                "host-b",
                8192,
                0,
                &[("public", Err("no IP address found for interface 'br0'"))],
            ),
            down,
            drain,
        ];
        let e = place(&vm(512, 1), &hosts, &Policy::default()).expect_err("nothing fits");
        assert_eq!(
            e.to_string(),
            "no host can run VM 'web01': \
             host-b: network 'public' has no address: no IP address found for interface 'br0'; \
             host-c: network 'public' is not defined, needs 512 MiB memory, 256 MiB free; \
             host-d: not connected; host-e: draining"
        );
    }

    #[test]
    fn a_host_lacking_the_network_is_never_chosen() {
        let hosts = vec![
            host("host-a", 1024, 900, &[PUBLIC]),
            host("host-c", 65536, 0, &[]),
        ];
        assert_eq!(
            place(&vm(64, 1), &hosts, &Policy::default())
                .expect("a")
                .host,
            "host-a"
        );
    }

    #[test]
    fn overcommit_boundaries() {
        let mut h = host("host-a", 1024, 512, &[PUBLIC]);
        h.used_vcpus = 15;
        let p = Policy::default(); // 4 cpus × 4.0 = 16 vCPUs
        assert!(
            place(&vm(512, 1), std::slice::from_ref(&h), &p).is_ok(),
            "exactly fits"
        );
        let e = place(&vm(513, 2), std::slice::from_ref(&h), &p).expect_err("over");
        assert_eq!(
            e.rejections[0].1,
            vec![
                Rejection::Memory {
                    need_mib: 513,
                    free_mib: 512
                },
                Rejection::Vcpus {
                    need: 2,
                    free: 1,
                    ratio: 4.0
                }
            ]
        );
        assert!(
            e.to_string()
                .contains("needs 2 vCPUs, 1 free (with overcommit 4.0)"),
            "{e}"
        );
        let generous = Policy {
            memory_ratio: 1.5,
            ..Policy::default()
        };
        assert!(
            place(&vm(1024, 1), &[h], &generous).is_ok(),
            "1536 - 512 = 1024 free"
        );
    }

    #[test]
    fn place_on_explains_or_names_unknown_hosts() {
        let hosts = vec![
            host("host-a", 4096, 0, &[PUBLIC]),
            host("host-c", 4096, 0, &[]),
        ];
        assert_eq!(
            place_on(&vm(64, 1), "host-a", &hosts, &Policy::default())
                .expect("ok")
                .host,
            "host-a"
        );
        assert_eq!(
            place_on(&vm(64, 1), "host-c", &hosts, &Policy::default())
                .expect_err("no")
                .to_string(),
            "no host can run VM 'web01': host-c: network 'public' is not defined"
        );
        assert_eq!(
            place_on(&vm(64, 1), "host-z", &hosts, &Policy::default())
                .expect_err("no")
                .to_string(),
            "no host can run VM 'web01': host-z: host is not known"
        );
    }

    #[test]
    fn exclusion_is_respected_and_explained() {
        let hosts = vec![
            host("host-a", 65536, 0, &[PUBLIC]),
            host("host-b", 1024, 0, &[PUBLIC]),
        ];
        let d = place_excluding(&vm(64, 1), &hosts, &["host-a"], &Policy::default()).expect("b");
        assert_eq!(d.host, "host-b");
        let e = place_excluding(&vm(64, 1), &hosts[..1], &["host-a"], &Policy::default())
            .expect_err("only the source");
        assert_eq!(
            e.to_string(),
            "no host can run VM 'web01': host-a: is the migration source"
        );
    }

    #[test]
    fn input_order_does_not_matter() {
        let mut hosts: Vec<HostSnapshot> = (0..20)
            .map(|i| host(&format!("h{i:02}"), 4096, (i % 3) * 100, &[PUBLIC]))
            .collect();
        let first = place(&vm(64, 1), &hosts, &Policy::default()).expect("fits");
        hosts.reverse();
        assert_eq!(
            place(&vm(64, 1), &hosts, &Policy::default()).expect("fits"),
            first
        );
        hosts.rotate_left(7);
        assert_eq!(
            place(&vm(64, 1), &hosts, &Policy::default()).expect("fits"),
            first
        );
        assert_eq!(first.host, "h00", "equal scores break by name");
    }

    #[test]
    fn a_thousand_hosts_place() {
        let hosts: Vec<HostSnapshot> = (0..1000)
            .map(|i| host(&format!("h{i:04}"), 65536, (i * 37) % 65536, &[PUBLIC]))
            .collect();
        let d = place(&vm(1024, 2), &hosts, &Policy::default()).expect("fits");
        assert_eq!(
            d.feasible,
            1000 - hosts
                .iter()
                .filter(|h| h.memory_mib - h.used_memory_mib < 1024)
                .count()
        );
        assert_eq!(d.ranking.len(), RANKING_SHOWN);
        // The shown few are the best of all, in order.
        let mut all: Vec<(String, f64)> = hosts
            .iter()
            .filter(|h| fits(&vm(1024, 2), h, &Policy::default()))
            .map(|h| (h.name.clone(), score(&vm(1024, 2), h, &Policy::default())))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(RANKING_SHOWN);
        assert_eq!(d.ranking, all);
        assert_eq!(d.host, all[0].0);
    }

    #[test]
    fn fits_agrees_with_rejections() {
        let p = Policy::default();
        let nets: &[&[(&str, Result<&str, &str>)]] = &[
            &[PUBLIC],
            &[("public", Err("no address"))],
            &[],
            &[PUBLIC, ("storage", Ok("198.18.9.1"))],
        ];
        for (i, n) in nets.iter().enumerate() {
            for used in [0, 3072, 4096] {
                for (connected, draining) in [(true, false), (false, false), (true, true)] {
                    let mut h = host(&format!("h{i}"), 4096, used, n);
                    h.connected = connected;
                    h.draining = draining;
                    for v in [vm(512, 1), vm(1024, 64), vm(2048, 1)] {
                        assert_eq!(
                            fits(&v, &h, &p),
                            rejections(&v, &h, &p).is_empty(),
                            "{h:?} {v:?}"
                        );
                    }
                }
            }
        }
    }
}
