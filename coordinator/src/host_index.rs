//! The scheduler's index: [`scheduler::place`]'s answers without scanning
//! every host.
//!
//! Hosts that no VM could tell apart except by their free capacity share a
//! class: the same eligibility (connected, not draining), the same networks
//! resolved, defined and blocked for NICs, the same machine types and the
//! same size. Network names are interned, so checking a class against a
//! VM's networks compares integers, and a class is checked once per
//! decision instead of once per host. Inside a class, hosts are kept in
//! ordered sets by score key, by free memory and by free vCPUs, updated as
//! placements change. A decision walks each matching class from its best
//! end and stops once it holds the best [`RANKING_SHOWN`] that fit, then
//! counts the class's hosts that cannot take the VM from the other two
//! sets. It costs O(classes + log hosts + K), K being the hosts passed over
//! because they are short of memory or vCPUs or excluded: few, until the
//! fleet is nearly full.
//!
//! The scan in [`scheduler`] stays the reference, and the explanation: when
//! nothing fits, every host is named with every reason by that scan.
//! `the_index_answers_as_the_scan_does` (a property test in this module)
//! checks that both give equal decisions, scores included, over random
//! fleets and random sequences of placements, releases and host changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use flotilla_shared::proto::{CpuNeed, MachineTypes};

use crate::scheduler::{
    self, free_memory, free_vcpus, score, Decision, HostSnapshot, NoPlacement, Policy, Strategy,
    VmNeeds, RANKING_SHOWN,
};

/// A score key with a total order.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Key(f64);

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// How far apart two keys must be before the walk may stop: far above the
/// few ulps by which a key and the score computed from it can disagree, so
/// every host that could rank among the best is rescored exactly.
const MARGIN: f64 = 1e-9;

/// Position in [`HostIndex::hosts`].
type HostId = usize;
/// An interned network name.
type NetId = u32;

/// What makes two hosts interchangeable but for free capacity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClassKey {
    eligible: bool,
    resolved: Vec<NetId>,
    defined: Vec<NetId>,
    blocked: Vec<NetId>,
    machine_names: Vec<String>,
    machine_aliases: Vec<(String, String)>,
    kvm: bool,
    cpu_models: Vec<String>,
    memory_mib: u64,
    cpus: u32,
}

/// Hosts with the same score key, free memory and free vCPUs: any VM
/// scores them exactly alike, so they rank by name alone.
type Group = (Key, u64, u32);
/// A group's hosts, by name.
type Members = BTreeSet<(String, HostId)>;

#[derive(Debug)]
struct Class {
    key: ClassKey,
    machines: Arc<MachineTypes>,
    /// Ordered by score key; inside a group, by name.
    by_key: BTreeMap<Group, Members>,
    by_memory: BTreeSet<(u64, HostId)>,
    by_vcpus: BTreeSet<(u32, HostId)>,
}

impl Class {
    fn insert(&mut self, id: HostId, name: &str, m: &Meta) {
        self.by_key
            .entry((m.key, m.free_memory, m.free_vcpus))
            .or_default()
            .insert((name.to_string(), id));
        self.by_memory.insert((m.free_memory, id));
        self.by_vcpus.insert((m.free_vcpus, id));
    }

    fn remove(&mut self, id: HostId, name: &str, m: &Meta) {
        let group = (m.key, m.free_memory, m.free_vcpus);
        if let Some(hosts) = self.by_key.get_mut(&group) {
            hosts.remove(&(name.to_string(), id));
            if hosts.is_empty() {
                self.by_key.remove(&group);
            }
        }
        self.by_memory.remove(&(m.free_memory, id));
        self.by_vcpus.remove(&(m.free_vcpus, id));
    }

    fn len(&self) -> usize {
        self.by_memory.len()
    }

    /// Whether this class's hosts pass every filter but capacity.
    fn admits(&self, needs: &Needs, machine: Option<&str>, cpu: &CpuNeed) -> bool {
        self.key.eligible
            && needs
                .resolved
                .iter()
                .all(|n| self.key.resolved.binary_search(n).is_ok())
            && needs.attachable.iter().all(|n| {
                self.key.defined.binary_search(n).is_ok()
                    && self.key.blocked.binary_search(n).is_err()
            })
            && machine.is_none_or(|m| self.machines.is_empty() || self.machines.has(m))
            && self.machines.cpu_refusal(cpu).is_none()
    }
}

/// A VM's networks as interned ids.
struct Needs {
    resolved: Vec<NetId>,
    attachable: Vec<NetId>,
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    class: usize,
    free_memory: u64,
    free_vcpus: u32,
    key: Key,
}

/// The hosts the scheduler chooses among, indexed for fast decisions.
#[derive(Debug)]
pub struct HostIndex {
    policy: Policy,
    /// Contiguous, so the reference scan can take them as a slice.
    hosts: Vec<HostSnapshot>,
    meta: Vec<Meta>,
    ids: HashMap<String, HostId>,
    networks: HashMap<String, NetId>,
    /// Never shrinks: an emptied class waits for its key to come back
    /// (there are as many as distinct kinds of host, not hosts).
    classes: Vec<Class>,
    class_ids: HashMap<ClassKey, usize>,
}

impl HostIndex {
    /// An empty index deciding by `policy`.
    pub fn new(policy: Policy) -> Self {
        HostIndex {
            policy,
            hosts: Vec::new(),
            meta: Vec::new(),
            ids: HashMap::new(),
            networks: HashMap::new(),
            classes: Vec::new(),
            class_ids: HashMap::new(),
        }
    }

    /// The policy decisions follow.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Every host, in no particular order.
    pub fn hosts(&self) -> &[HostSnapshot] {
        &self.hosts
    }

    /// How many hosts are indexed.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether no host is indexed.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Adds `host` or replaces what the index knows of it.
    pub fn upsert(&mut self, host: HostSnapshot) {
        let Some(&id) = self.ids.get(&host.name) else {
            let id = self.hosts.len();
            let meta = self.meta_of(&host);
            self.ids.insert(host.name.clone(), id);
            self.hosts.push(host);
            self.meta.push(meta);
            self.classes[meta.class].insert(id, &self.hosts[id].name, &meta);
            return;
        };
        let old = &self.hosts[id];
        if *old == host {
            return;
        }
        let same_class = old.connected == host.connected
            && old.draining == host.draining
            && old.cpus == host.cpus
            && old.memory_mib == host.memory_mib
            && Arc::ptr_eq(&old.networks, &host.networks)
            && Arc::ptr_eq(&old.nic_blocked, &host.nic_blocked)
            && Arc::ptr_eq(&old.machine_types, &host.machine_types);
        let before = self.meta[id];
        self.classes[before.class].remove(id, &host.name, &before);
        let after = if same_class {
            Meta {
                class: before.class,
                ..self.capacity_of(&host)
            }
        } else {
            self.meta_of(&host)
        };
        self.classes[after.class].insert(id, &host.name, &after);
        self.meta[id] = after;
        self.hosts[id] = host;
    }

    /// Forgets `name`.
    pub fn remove(&mut self, name: &str) {
        let Some(id) = self.ids.remove(name) else {
            return;
        };
        let meta = self.meta[id];
        self.classes[meta.class].remove(id, name, &meta);
        let last = self.hosts.len() - 1;
        if id != last {
            // The last host takes the freed position.
            let moved = self.meta[last];
            let moved_name = &self.hosts[last].name;
            let class = &mut self.classes[moved.class];
            class.remove(last, moved_name, &moved);
            class.insert(id, moved_name, &moved);
            self.ids.insert(self.hosts[last].name.clone(), id);
        }
        self.hosts.swap_remove(id);
        self.meta.swap_remove(id);
    }

    /// The snapshot of `name`, if indexed.
    pub fn get(&self, name: &str) -> Option<&HostSnapshot> {
        self.ids.get(name).map(|&id| &self.hosts[id])
    }

    /// As [`scheduler::place_excluding`] over every indexed host.
    pub fn place(&self, vm: &VmNeeds, exclude: &[&str]) -> Result<Decision, NoPlacement> {
        let fallback = || scheduler::place_excluding(vm, &self.hosts, exclude, &self.policy);
        let Some(needs) = self.intern_needs(vm) else {
            // A network no host defines: nothing fits; the scan says why.
            return fallback();
        };
        let excluded: Vec<HostId> = exclude
            .iter()
            .filter_map(|h| self.ids.get(*h).copied())
            .collect();
        let mut candidates: Vec<HostId> = Vec::new();
        let mut feasible = 0;
        for (class_id, class) in self.classes.iter().enumerate() {
            if !class.admits(&needs, vm.machine.as_deref(), &vm.cpu) {
                continue;
            }
            let before = candidates.len();
            let mut best: Vec<Key> = Vec::with_capacity(RANKING_SHOWN);
            let groups: Box<dyn Iterator<Item = (&Group, &Members)>> = match self.policy.strategy {
                Strategy::Spread => Box::new(class.by_key.iter().rev()),
                Strategy::Binpack => {
                    // A host with the memory has at least this key.
                    let floor = Key(vm.memory_mib as f64 / self.memory_cap(class) - MARGIN);
                    Box::new(class.by_key.range((floor, 0, 0)..))
                }
            };
            for (&(key, free_memory, free_vcpus), hosts) in groups {
                if best.len() == RANKING_SHOWN && (key.0 - best[RANKING_SHOWN - 1].0).abs() > MARGIN
                {
                    break;
                }
                if free_memory < vm.memory_mib || free_vcpus < vm.vcpus {
                    continue;
                }
                // Alike but for the name: only the first few can be shown.
                for &(_, id) in hosts
                    .iter()
                    .filter(|(_, id)| !excluded.contains(id))
                    .take(RANKING_SHOWN)
                {
                    if best.len() < RANKING_SHOWN {
                        best.push(key);
                    }
                    candidates.push(id);
                }
            }
            if candidates.len() == before {
                continue;
            }
            // Those that cannot take it: short of memory, or of vCPUs with
            // the memory, or excluded although they would fit.
            let short_memory = class.by_memory.range(..(vm.memory_mib, 0)).count();
            let short_vcpus = class
                .by_vcpus
                .range(..(vm.vcpus, 0))
                .filter(|(_, id)| self.meta[*id].free_memory >= vm.memory_mib)
                .count();
            let left_out = excluded
                .iter()
                .filter(|&&id| {
                    self.meta[id].class == class_id
                        && self.meta[id].free_memory >= vm.memory_mib
                        && self.meta[id].free_vcpus >= vm.vcpus
                })
                .count();
            feasible += class.len() - short_memory - short_vcpus - left_out;
        }
        if candidates.is_empty() {
            return fallback();
        }
        let mut ranked: Vec<(&HostSnapshot, f64)> = candidates
            .into_iter()
            .map(|id| {
                let h = &self.hosts[id];
                (h, score(vm, h, &self.policy))
            })
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.name.cmp(&b.0.name)));
        ranked.truncate(RANKING_SHOWN);
        let ranking: Vec<(String, f64)> = ranked
            .into_iter()
            .map(|(h, s)| (h.name.clone(), s))
            .collect();
        Ok(Decision {
            host: ranking[0].0.clone(),
            ranking,
            feasible,
        })
    }

    /// As [`scheduler::place_on`]: only `host` is looked at.
    pub fn place_on(&self, vm: &VmNeeds, host: &str) -> Result<Decision, NoPlacement> {
        let one = self
            .ids
            .get(host)
            .map_or(&[][..], |&id| std::slice::from_ref(&self.hosts[id]));
        scheduler::place_on(vm, host, one, &self.policy)
    }

    fn intern_needs(&self, vm: &VmNeeds) -> Option<Needs> {
        let ids = |names: &[String]| -> Option<Vec<NetId>> {
            names
                .iter()
                .map(|n| self.networks.get(n).copied())
                .collect()
        };
        Some(Needs {
            resolved: ids(&vm.networks)?,
            attachable: ids(&vm.nic_networks)?,
        })
    }

    fn intern(&mut self, name: &str) -> NetId {
        if let Some(&id) = self.networks.get(name) {
            return id;
        }
        let id = self.networks.len() as NetId;
        self.networks.insert(name.to_string(), id);
        id
    }

    fn memory_cap(&self, class: &Class) -> f64 {
        (class.key.memory_mib as f64 * self.policy.memory_ratio).max(1.0)
    }

    /// Free capacity and score key; the class is filled in by the caller.
    fn capacity_of(&self, h: &HostSnapshot) -> Meta {
        let p = &self.policy;
        let free_memory = free_memory(h, p);
        let free_vcpus = free_vcpus(h, p);
        let mem_cap = (h.memory_mib as f64 * p.memory_ratio).max(1.0);
        let cpu_cap = (f64::from(h.cpus) * p.cpu_ratio).max(1.0);
        // The spread score of a VM needing nothing; for a given VM, every
        // host of a class scores this minus the same amount.
        let key = Key(free_memory as f64 / mem_cap + f64::from(free_vcpus) / cpu_cap / 1000.0);
        Meta {
            class: usize::MAX,
            free_memory,
            free_vcpus,
            key,
        }
    }

    fn meta_of(&mut self, h: &HostSnapshot) -> Meta {
        let mut resolved = Vec::new();
        let mut defined = Vec::new();
        for (name, address) in h.networks.iter() {
            let id = self.intern(name);
            defined.push(id);
            if address.is_ok() {
                resolved.push(id);
            }
        }
        let mut blocked: Vec<NetId> = h.nic_blocked.keys().map(|n| self.intern(n)).collect();
        resolved.sort_unstable();
        defined.sort_unstable();
        blocked.sort_unstable();
        let key = ClassKey {
            eligible: h.connected && !h.draining,
            resolved,
            defined,
            blocked,
            machine_names: h.machine_types.names.clone(),
            machine_aliases: h.machine_types.aliases.clone(),
            kvm: h.machine_types.kvm,
            cpu_models: h.machine_types.cpu_models.clone(),
            memory_mib: h.memory_mib,
            cpus: h.cpus,
        };
        let class = match self.class_ids.get(&key) {
            Some(&id) => id,
            None => {
                let class = Class {
                    key: key.clone(),
                    machines: h.machine_types.clone(),
                    by_key: BTreeMap::new(),
                    by_memory: BTreeSet::new(),
                    by_vcpus: BTreeSet::new(),
                };
                self.classes.push(class);
                let id = self.classes.len() - 1;
                self.class_ids.insert(key, id);
                id
            }
        };
        Meta {
            class,
            ..self.capacity_of(h)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{
        any, prop, prop_assert_eq, prop_oneof, proptest, ProptestConfig, Strategy as Gen,
        TestCaseError,
    };
    use std::collections::BTreeMap;

    const NETS: [&str; 4] = ["public", "lan", "storage", "tenant"];

    fn host(i: usize, g: &HostGen) -> HostSnapshot {
        let networks = NETS
            .iter()
            .enumerate()
            .filter(|(n, _)| g.defined & (1 << n) != 0)
            .map(|(n, name)| {
                let v = if g.resolved & (1 << n) != 0 {
                    Ok(format!("198.18.{n}.{i}"))
                } else {
                    Err(format!("no address on br{n}"))
                };
                (name.to_string(), v)
            })
            .collect::<BTreeMap<_, _>>();
        let nic_blocked = NETS
            .iter()
            .enumerate()
            .filter(|(n, _)| g.blocked & (1 << n) != 0)
            .map(|(_, name)| (name.to_string(), "bridge missing".to_string()))
            .collect();
        let machine_types = match g.machines {
            0 => MachineTypes::default(),
            // An old QEMU under TCG that gives only qemu64.
            1 => MachineTypes {
                names: vec!["pc-i440fx-7.2".into()],
                aliases: vec![("pc".into(), "pc-i440fx-7.2".into())],
                kvm: false,
                cpu_models: vec!["qemu64".into()],
            },
            _ => MachineTypes {
                names: vec!["pc-i440fx-10.0".into(), "pc-i440fx-7.2".into()],
                aliases: vec![("pc".into(), "pc-i440fx-10.0".into())],
                kvm: true,
                cpu_models: vec!["EPYC".into(), "qemu64".into()],
            },
        };
        HostSnapshot {
            name: format!("h{i:03}"),
            connected: g.connected,
            draining: g.draining,
            cpus: g.cpus,
            memory_mib: g.memory_mib,
            used_memory_mib: 0,
            used_vcpus: 0,
            networks: Arc::new(networks),
            nic_blocked: Arc::new(nic_blocked),
            machine_types: Arc::new(machine_types),
        }
    }

    #[derive(Debug, Clone)]
    struct HostGen {
        connected: bool,
        draining: bool,
        cpus: u32,
        memory_mib: u64,
        defined: u8,
        resolved: u8,
        blocked: u8,
        machines: u8,
    }

    fn host_gen() -> impl Gen<Value = HostGen> {
        (
            prop::bool::weighted(0.9),
            prop::bool::weighted(0.1),
            prop::sample::select(vec![2u32, 4, 16]),
            prop::sample::select(vec![2048u64, 4096, 65536]),
            0u8..16,
            prop::bool::weighted(0.8).prop_map(|all| if all { 15 } else { 7 }),
            prop::bool::weighted(0.1).prop_map(|b| if b { 2 } else { 0 }),
            0u8..3,
        )
            .prop_map(
                |(connected, draining, cpus, memory_mib, defined, resolved, blocked, machines)| {
                    HostGen {
                        connected,
                        draining,
                        cpus,
                        memory_mib,
                        // Most hosts define `public`.
                        defined: defined | 1,
                        resolved,
                        blocked,
                        machines,
                    }
                },
            )
    }

    #[derive(Debug, Clone)]
    enum Step {
        Place {
            memory_mib: u64,
            vcpus: u32,
            networks: u8,
            nics: u8,
            machine: u8,
            exclude: Option<usize>,
        },
        Release(usize),
        Change(usize, HostGen),
        Remove(usize),
        PlaceOn(usize, u64),
    }

    fn step() -> impl Gen<Value = Step> {
        prop_oneof![
            6 => (
                prop::sample::select(vec![64u64, 512, 1024, 2048, 4096]),
                1u32..8,
                1u8..4,
                0u8..4,
                0u8..4,
                prop::option::weighted(0.2, 0usize..64),
            )
                .prop_map(|(memory_mib, vcpus, networks, nics, machine, exclude)| {
                    Step::Place {
                        memory_mib,
                        vcpus,
                        networks,
                        nics,
                        machine,
                        exclude,
                    }
                }),
            3 => (0usize..1000).prop_map(Step::Release),
            1 => (0usize..64, host_gen()).prop_map(|(i, g)| Step::Change(i, g)),
            1 => (0usize..64).prop_map(Step::Remove),
            1 => (0usize..64, prop::sample::select(vec![64u64, 8192])).prop_map(|(i, m)| Step::PlaceOn(i, m)),
        ]
    }

    fn needs(memory_mib: u64, vcpus: u32, networks: u8, nics: u8, machine: u8) -> VmNeeds {
        let pick = |mask: u8| {
            NETS.iter()
                .enumerate()
                .filter(|(n, _)| mask & (1 << n) != 0)
                .map(|(_, s)| s.to_string())
                .collect::<Vec<_>>()
        };
        VmNeeds {
            name: "vm".into(),
            memory_mib,
            vcpus,
            networks: pick(networks),
            nic_networks: pick(nics),
            machine: match machine {
                0 | 1 => None,
                2 => Some("pc-i440fx-7.2".into()),
                _ => Some("pc-i440fx-10.0".into()),
            },
            cpu: match machine {
                1 => CpuNeed {
                    kvm: true,
                    mode: "host-passthrough".into(),
                    model: None,
                },
                2 => CpuNeed {
                    model: Some("EPYC".into()),
                    ..CpuNeed::default()
                },
                _ => CpuNeed::default(),
            },
        }
    }

    /// The scan over the index's own snapshots, sorted by name so the
    /// reference sees a different order than the index's.
    fn reference(index: &HostIndex) -> Vec<HostSnapshot> {
        let mut all = index.hosts().to_vec();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    fn run(hosts: Vec<HostGen>, steps: Vec<Step>, policy: Policy) -> Result<(), TestCaseError> {
        let mut index = HostIndex::new(policy.clone());
        for (i, g) in hosts.iter().enumerate() {
            index.upsert(host(i, g));
        }
        let mut placed: Vec<(String, u64, u32)> = Vec::new();
        for step in steps {
            match step {
                Step::Place {
                    memory_mib,
                    vcpus,
                    networks,
                    nics,
                    machine,
                    exclude,
                } => {
                    let vm = needs(memory_mib, vcpus, networks, nics, machine);
                    let excluded: Vec<String> =
                        exclude.iter().map(|i| format!("h{i:03}")).collect();
                    let excluded: Vec<&str> = excluded.iter().map(String::as_str).collect();
                    let want =
                        scheduler::place_excluding(&vm, &reference(&index), &excluded, &policy);
                    let got = index.place(&vm, &excluded);
                    prop_assert_eq!(&got, &want);
                    if let Ok(d) = got {
                        let mut h = index.get(&d.host).expect("chosen host is indexed").clone();
                        h.used_memory_mib += memory_mib;
                        h.used_vcpus += vcpus;
                        index.upsert(h);
                        placed.push((d.host, memory_mib, vcpus));
                    }
                }
                Step::Release(i) if !placed.is_empty() => {
                    let (name, memory_mib, vcpus) = placed.swap_remove(i % placed.len());
                    if let Some(h) = index.get(&name) {
                        let mut h = h.clone();
                        h.used_memory_mib -= memory_mib;
                        h.used_vcpus -= vcpus;
                        index.upsert(h);
                    }
                }
                Step::Release(_) => {}
                Step::Change(i, g) => {
                    let mut fresh = host(i, &g);
                    if let Some(old) = index.get(&fresh.name) {
                        fresh.used_memory_mib = old.used_memory_mib;
                        fresh.used_vcpus = old.used_vcpus;
                    }
                    index.upsert(fresh);
                }
                Step::Remove(i) => {
                    let name = format!("h{i:03}");
                    index.remove(&name);
                    placed.retain(|p| p.0 != name);
                }
                Step::PlaceOn(i, memory_mib) => {
                    let vm = needs(memory_mib, 1, 1, 0, 0);
                    let name = format!("h{i:03}");
                    prop_assert_eq!(
                        index.place_on(&vm, &name),
                        scheduler::place_on(&vm, &name, &reference(&index), &policy)
                    );
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn the_index_answers_as_the_scan_does(
            hosts in prop::collection::vec(host_gen(), 0..64),
            steps in prop::collection::vec(step(), 1..200),
            binpack in any::<bool>(),
            generous in any::<bool>(),
        ) {
            let policy = Policy {
                strategy: if binpack { Strategy::Binpack } else { Strategy::Spread },
                cpu_ratio: if generous { 4.0 } else { 1.0 },
                memory_ratio: if generous { 1.5 } else { 1.0 },
            };
            run(hosts, steps, policy)?;
        }
    }

    #[test]
    fn equal_hosts_rank_by_name_and_every_feasible_host_is_counted() {
        let g = HostGen {
            connected: true,
            draining: false,
            cpus: 4,
            memory_mib: 4096,
            defined: 1,
            resolved: 15,
            blocked: 0,
            machines: 0,
        };
        let mut index = HostIndex::new(Policy::default());
        for i in (0..20).rev() {
            index.upsert(host(i, &g));
        }
        let vm = needs(512, 1, 1, 0, 0);
        let d = index.place(&vm, &["h000"]).expect("fits");
        assert_eq!(d.host, "h001");
        assert_eq!(d.feasible, 19);
        assert_eq!(
            d.ranking.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
            ["h001", "h002", "h003", "h004", "h005"]
        );
        index.remove("h001");
        assert_eq!(index.place(&vm, &[]).expect("fits").host, "h000");
        assert_eq!(index.len(), 19);
    }
}
