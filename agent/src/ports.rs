//! Per-host console port bookkeeping, in libvirt's ranges.
//!
//! Pure: whether a port is free on the host is asked through a probe function
//! the caller supplies (a real bind in the agent, a set in tests). A port handed
//! out stays reserved until released, so no two VMs ever get the same port,
//! even if QEMU has not bound it yet.

use std::collections::BTreeSet;
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
        self.reserved.remove(&port);
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
}
