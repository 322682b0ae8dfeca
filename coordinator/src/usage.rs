//! What the records say each host's placed VMs use: the scheduler's "used"
//! column, kept up to date as placements change.
//!
//! Pure. The store is the truth; this is an index over its placements so that
//! a start costs O(hosts) instead of re-reading and re-parsing every stored
//! definition (O(VMs) per start, O(VMs²) for a fleet-wide start). Every
//! placement the coordinator records is mirrored here in the same actor turn,
//! except a migration's, which the driver records and the fleet mirrors when
//! the migration returns.

use std::collections::{BTreeSet, HashMap, HashSet};

/// Resources a placed VM holds on its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprint {
    /// Memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
}

/// One host's placed VMs and their sum.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostUse {
    /// Sum of the placed VMs' footprints.
    pub used: Footprint,
    /// The VMs placed there.
    pub vms: BTreeSet<String>,
}

/// Placements by VM and by host.
#[derive(Debug, Default)]
pub struct Usage {
    by_vm: HashMap<String, (String, Footprint)>,
    by_host: HashMap<String, HostUse>,
    /// Hosts whose sums changed since [`Usage::take_changed`] last ran.
    changed: HashSet<String>,
}

impl Usage {
    /// Records that `vm` is placed on `host` holding `footprint`, or nowhere.
    pub fn set(&mut self, vm: &str, placement: Option<(&str, Footprint)>) {
        if let Some((host, fp)) = self.by_vm.remove(vm) {
            self.changed.insert(host.clone());
            if let Some(h) = self.by_host.get_mut(&host) {
                h.used.memory_mib = h.used.memory_mib.saturating_sub(fp.memory_mib);
                h.used.vcpus = h.used.vcpus.saturating_sub(fp.vcpus);
                h.vms.remove(vm);
                if h.vms.is_empty() {
                    self.by_host.remove(&host);
                }
            }
        }
        if let Some((host, fp)) = placement {
            self.changed.insert(host.to_string());
            let h = self.by_host.entry(host.to_string()).or_default();
            h.used.memory_mib += fp.memory_mib;
            h.used.vcpus += fp.vcpus;
            h.vms.insert(vm.to_string());
            self.by_vm.insert(vm.to_string(), (host.to_string(), fp));
        }
    }

    /// Moves a placed VM to `host` with the footprint it already holds; a
    /// VM not placed is left alone (its footprint is unknown here).
    pub fn relocate(&mut self, vm: &str, host: &str) {
        if let Some(&(_, fp)) = self.by_vm.get(vm) {
            self.set(vm, Some((host, fp)));
        }
    }

    /// The hosts whose sums changed since the last call: the scheduler's
    /// index refreshes only those.
    pub fn take_changed(&mut self) -> HashSet<String> {
        std::mem::take(&mut self.changed)
    }

    /// What `host`'s placed VMs hold.
    pub fn used(&self, host: &str) -> Footprint {
        self.by_host
            .get(host)
            .map_or_else(Footprint::default, |h| h.used)
    }

    /// The VMs placed on `host`.
    pub fn vms_on(&self, host: &str) -> impl Iterator<Item = &str> {
        self.by_host
            .get(host)
            .into_iter()
            .flat_map(|h| h.vms.iter().map(String::as_str))
    }

    /// Where `vm` is placed.
    pub fn host_of(&self, vm: &str) -> Option<&str> {
        self.by_vm.get(vm).map(|(h, _)| h.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(memory_mib: u64, vcpus: u32) -> Footprint {
        Footprint { memory_mib, vcpus }
    }

    #[test]
    fn placing_moving_and_stopping_keep_the_sums_right() {
        let mut u = Usage::default();
        u.set("a", Some(("h1", fp(1024, 2))));
        u.set("b", Some(("h1", fp(512, 1))));
        u.set("c", Some(("h2", fp(64, 1))));
        assert_eq!(u.used("h1"), fp(1536, 3));
        assert_eq!(u.vms_on("h1").collect::<Vec<_>>(), ["a", "b"]);

        u.relocate("a", "h2");
        assert_eq!(u.used("h1"), fp(512, 1));
        assert_eq!(u.used("h2"), fp(1088, 3));
        assert_eq!(u.host_of("a"), Some("h2"));

        // Placing again where it already is does not count it twice.
        u.set("b", Some(("h1", fp(512, 1))));
        assert_eq!(u.used("h1"), fp(512, 1));

        u.set("b", None);
        assert_eq!(u.used("h1"), Footprint::default());
        assert_eq!(u.vms_on("h1").count(), 0);
        assert_eq!(u.host_of("b"), None);

        u.relocate("nowhere", "h1");
        assert_eq!(
            u.used("h1"),
            Footprint::default(),
            "unknown VM not invented"
        );
        u.set("never-placed", None);
        assert_eq!(u.used("h2"), fp(1088, 3));
    }
}
