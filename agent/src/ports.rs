//! Per-host console port bookkeeping, in libvirt's ranges.
//!
//! Pure: whether a port is free on the host is asked through a probe function
//! the caller supplies (a real bind in the agent, a set in tests). A port handed
//! out stays reserved until released, so no two VMs ever get the same port,
//! even if QEMU has not bound it yet.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;

/// VNC and SPICE display ports (libvirt's `remote_display_port_min/max`).
pub const DISPLAY_PORTS: RangeInclusive<u16> = 5900..=65535;
/// VNC websocket ports (libvirt's `remote_websocket_port_min/max`).
pub const WEBSOCKET_PORTS: RangeInclusive<u16> = 5700..=65535;

/// Incoming migration streams (libvirt's `migration_port_min/max`).
pub const MIGRATION_PORTS: RangeInclusive<u16> = 49152..=49215;

/// Ports this host has handed out.
#[derive(Debug, Clone, Default)]
pub struct PortAllocator {
    reserved: BTreeSet<u16>,
    /// When each port was last released, in release order.
    released: BTreeMap<u16, u64>,
    releases: u64,
}

impl PortAllocator {
    /// An allocator with nothing reserved.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks `port` as taken (by a re-attached VM or an explicit definition).
    /// Returns false if it was already taken.
    pub fn reserve(&mut self, port: u16) -> bool {
        self.reserved.insert(port)
    }

    /// Returns `port` to the pool.
    pub fn release(&mut self, port: u16) {
        if self.reserved.remove(&port) {
            self.releases += 1;
            self.released.insert(port, self.releases);
        }
    }

    /// Whether `port` is handed out.
    pub fn is_reserved(&self, port: u16) -> bool {
        self.reserved.contains(&port)
    }

    /// The lowest port in `range` that is neither reserved nor refused by `probe`.
    pub fn allocate(
        &mut self,
        range: RangeInclusive<u16>,
        probe: &mut dyn FnMut(u16) -> bool,
    ) -> Option<u16> {
        let port = range
            .into_iter()
            .find(|p| !self.reserved.contains(p) && probe(*p))?;
        self.reserved.insert(port);
        Some(port)
    }

    /// The free port in `range` released longest ago (never-used ports
    /// first, lowest first), as an ephemeral-port allocator does.
    ///
    /// For incoming migrations: an answer naming a port can reach the
    /// coordinator seconds late over a live connection, and a stream sent to
    /// a port handed to another VM meanwhile would land in the wrong guest.
    pub fn allocate_least_recent(
        &mut self,
        range: RangeInclusive<u16>,
        probe: &mut dyn FnMut(u16) -> bool,
    ) -> Option<u16> {
        let mut free: Vec<(u64, u16)> = range
            .filter(|p| !self.reserved.contains(p))
            .map(|p| (self.released.get(&p).copied().unwrap_or(0), p))
            .collect();
        free.sort_unstable();
        let (_, port) = free.into_iter().find(|(_, p)| probe(*p))?;
        self.reserved.insert(port);
        Some(port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_each_port_once() {
        let mut a = PortAllocator::new();
        let mut free = |_| true;
        assert_eq!(a.allocate(DISPLAY_PORTS, &mut free), Some(5900));
        assert_eq!(a.allocate(DISPLAY_PORTS, &mut free), Some(5901));
        a.release(5900);
        assert_eq!(a.allocate(DISPLAY_PORTS, &mut free), Some(5900));
    }

    #[test]
    fn skips_ports_the_host_refuses_and_reserved_ones() {
        let mut a = PortAllocator::new();
        assert!(a.reserve(5901));
        assert!(!a.reserve(5901));
        let mut busy = |p: u16| p != 5900;
        assert_eq!(a.allocate(DISPLAY_PORTS, &mut busy), Some(5902));
        assert_eq!(a.allocate(5900..=5902, &mut |_| false), None);
    }

    #[test]
    fn migration_ports_go_round_before_one_is_reused() {
        let mut a = PortAllocator::new();
        let mut free = |_| true;
        assert_eq!(
            a.allocate_least_recent(49152..=49154, &mut free),
            Some(49152)
        );
        a.release(49152);
        // 49152 was just released: the never-used ports come first.
        assert_eq!(
            a.allocate_least_recent(49152..=49154, &mut free),
            Some(49153)
        );
        assert_eq!(
            a.allocate_least_recent(49152..=49154, &mut free),
            Some(49154)
        );
        a.release(49154);
        a.release(49153);
        // Released longest ago first: 49152, then 49154, then 49153.
        assert_eq!(
            a.allocate_least_recent(49152..=49154, &mut free),
            Some(49152)
        );
        assert_eq!(
            a.allocate_least_recent(49152..=49154, &mut free),
            Some(49154)
        );
        assert_eq!(
            a.allocate_least_recent(49152..=49154, &mut |p| p != 49153),
            None
        );
    }
}
