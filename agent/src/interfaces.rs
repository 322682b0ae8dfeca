//! The host's network devices and their addresses, as getifaddrs lists them.
//!
//! [`InterfaceTable`] is plain data so the resolver can be tested with any
//! table; [`InterfaceTable::read_host`] is the only function here that asks
//! the kernel.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// Every device on the host, with its addresses in the kernel's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceTable {
    devices: BTreeMap<String, Vec<IpAddr>>,
}

/// Reading the table from the kernel failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot list the host's interfaces (getifaddrs)")]
pub struct ReadInterfacesError(#[source] pub nix::Error);

impl InterfaceTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builder: a device with these addresses (tests and simulations).
    pub fn with(mut self, device: &str, addrs: &[&str]) -> Self {
        let entry = self.devices.entry(device.to_string()).or_default();
        entry.extend(addrs.iter().filter_map(|a| a.parse::<IpAddr>().ok()));
        self
    }

    /// Records that `device` exists, with `addr` if it has one.
    pub fn add(&mut self, device: &str, addr: Option<IpAddr>) {
        let entry = self.devices.entry(device.to_string()).or_default();
        if let Some(a) = addr {
            if !entry.contains(&a) {
                entry.push(a);
            }
        }
    }

    /// Whether the device exists.
    pub fn has_device(&self, device: &str) -> bool {
        self.devices.contains_key(device)
    }

    /// The device's addresses in kernel order; `None` if there is no such device.
    pub fn addresses(&self, device: &str) -> Option<&[IpAddr]> {
        self.devices.get(device).map(Vec::as_slice)
    }

    /// Reads the table for the network namespace this process runs in.
    pub fn read_host() -> Result<Self, ReadInterfacesError> {
        let mut table = InterfaceTable::new();
        for ifa in nix::ifaddrs::getifaddrs().map_err(ReadInterfacesError)? {
            let addr = ifa.address.as_ref().and_then(|a| {
                if let Some(v4) = a.as_sockaddr_in() {
                    Some(IpAddr::V4(v4.ip()))
                } else {
                    a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                }
            });
            table.add(&ifa.interface_name, addr);
        }
        Ok(table)
    }
}
