//! `NetworkResolver`: a network name becomes an address on this host.
//!
//! This follows libvirt's qemu driver (`qemuProcessGetNetworkAddress`): the
//! network's forward mode decides whether the address comes from the
//! definition's `<ip>`, from the bridge device, or from the first forward
//! device. Error texts are libvirt's where libvirt has one, so operators can
//! search for them. Pure: the interface table is an input.
//!
//! One deliberate difference: libvirt takes whichever address getifaddrs lists
//! first for a device. We take the device's first IPv4 address, and only when
//! it has none, its first global IPv6 address (never link-local), because a
//! console must be reachable from outside and a link-local address is not.

use std::net::IpAddr;

use flotilla_shared::xml::network::{ForwardMode, Network};

use crate::interfaces::InterfaceTable;

/// Where a network's address was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressSource {
    /// The first `<ip address>` of the network definition.
    DefinitionIp,
    /// The address of a host device (the bridge or the forward device).
    Device(String),
}

/// A resolved network: the address and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedNetwork {
    /// The address consoles listen on.
    pub address: IpAddr,
    /// Where it came from, for `net-list` and logs.
    pub source: AddressSource,
}

/// Why a network name has no address on this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The host has no network of that name.
    #[error("no network with matching name '{network}' on host {host}")]
    NoSuchNetwork {
        /// The name asked for.
        network: String,
        /// This host.
        host: String,
    },
    /// A routed, NAT, open or isolated network without an `<ip address>`.
    #[error("network '{0}' doesn't have an IP address")]
    NoIpAddress(String),
    /// A bridge-mode network that names neither a bridge nor a device.
    #[error("network '{0}' has no associated interface or bridge")]
    NoInterfaceOrBridge(String),
    /// The device exists but has no usable address.
    #[error("no IP address found for interface '{0}'")]
    NoDeviceAddress(String),
    /// The device named by the network does not exist on this host.
    #[error("network '{network}' uses interface '{device}', which does not exist on host {host}")]
    NoSuchDevice {
        /// The network.
        network: String,
        /// The missing device.
        device: String,
        /// This host.
        host: String,
    },
    /// `hostdev` networks hand whole PCI devices to guests; there is no host address.
    #[error(
        "network '{0}' has forward mode='hostdev', which passes PCI devices to guests and \
         has no host address to listen on; use a bridge, macvtap or routed network"
    )]
    Hostdev(String),
}

/// Resolves network names against one host's definitions and interfaces.
#[derive(Debug, Clone, Copy)]
pub struct NetworkResolver<'a> {
    host: &'a str,
    interfaces: &'a InterfaceTable,
}

impl<'a> NetworkResolver<'a> {
    /// A resolver for host `host` with its current interface table.
    pub fn new(host: &'a str, interfaces: &'a InterfaceTable) -> Self {
        NetworkResolver { host, interfaces }
    }

    /// Resolves `name` among `networks` (this host's definitions).
    pub fn resolve_name<'n>(
        &self,
        name: &str,
        networks: impl IntoIterator<Item = &'n Network>,
    ) -> Result<ResolvedNetwork, ResolveError> {
        let net = networks
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| ResolveError::NoSuchNetwork {
                network: name.to_string(),
                host: self.host.to_string(),
            })?;
        self.resolve(net)
    }

    /// Resolves one network definition to an address on this host.
    pub fn resolve(&self, net: &Network) -> Result<ResolvedNetwork, ResolveError> {
        match net.forward_mode() {
            None | Some(ForwardMode::Nat | ForwardMode::Route | ForwardMode::Open) => {
                // libvirt asks for the first <ip> of any family.
                let ip = net.ips.iter().find_map(|ip| ip.address);
                ip.map(|address| ResolvedNetwork {
                    address,
                    source: AddressSource::DefinitionIp,
                })
                .ok_or_else(|| ResolveError::NoIpAddress(net.name.clone()))
            }
            Some(ForwardMode::Bridge) if net.bridge_name.is_some() => {
                let bridge = net.bridge_name.as_deref().unwrap_or_default();
                self.device_address(net, bridge)
            }
            Some(
                ForwardMode::Bridge
                | ForwardMode::Private
                | ForwardMode::Vepa
                | ForwardMode::Passthrough,
            ) => match net.first_forward_dev() {
                Some(dev) => self.device_address(net, dev),
                None => Err(ResolveError::NoInterfaceOrBridge(net.name.clone())),
            },
            Some(ForwardMode::Hostdev) => Err(ResolveError::Hostdev(net.name.clone())),
        }
    }

    fn device_address(&self, net: &Network, dev: &str) -> Result<ResolvedNetwork, ResolveError> {
        let addrs = self
            .interfaces
            .addresses(dev)
            .ok_or_else(|| ResolveError::NoSuchDevice {
                network: net.name.clone(),
                device: dev.to_string(),
                host: self.host.to_string(),
            })?;
        pick_address(addrs)
            .map(|address| ResolvedNetwork {
                address,
                source: AddressSource::Device(dev.to_string()),
            })
            .ok_or_else(|| ResolveError::NoDeviceAddress(dev.to_string()))
    }
}

/// First IPv4, else first global IPv6 (never link-local, never loopback).
fn pick_address(addrs: &[IpAddr]) -> Option<IpAddr> {
    addrs.iter().copied().find(IpAddr::is_ipv4).or_else(|| {
        addrs.iter().copied().find(|a| match a {
            IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
            IpAddr::V4(_) => false,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(xml: &str) -> Network {
        Network::parse("n.xml", xml).expect("valid network").model
    }

    fn table() -> InterfaceTable {
        InterfaceTable::new()
            .with("br0", &["fe80::1", "198.18.1.1", "198.18.1.2"])
            .with("uplink0", &["198.18.2.1"])
            .with("v6only", &["fe80::2", "2001:db8::7"])
            .with("linklocal", &["fe80::3"])
            .with("bare", &[])
    }

    fn resolve(xml: &str) -> Result<ResolvedNetwork, ResolveError> {
        let t = table();
        NetworkResolver::new("host-a", &t).resolve(&net(xml))
    }

    fn addr(r: Result<ResolvedNetwork, ResolveError>) -> String {
        r.expect("resolves").address.to_string()
    }

    #[test]
    fn forward_modes_resolve_like_libvirt() {
        let cases: &[(&str, &str)] = &[
            // No forward, nat, route, open: the definition's first <ip>.
            ("<network><name>n</name><ip address='198.18.9.1' prefix='24'/></network>", "198.18.9.1"),
            ("<network><name>n</name><forward mode='nat'/><ip address='198.18.9.2' prefix='24'/><ip address='198.18.9.3'/></network>", "198.18.9.2"),
            ("<network><name>n</name><forward/><ip address='198.18.9.4' netmask='255.255.255.0'/></network>", "198.18.9.4"),
            ("<network><name>n</name><forward mode='route' dev='uplink0'/><ip address='198.18.9.5'/></network>", "198.18.9.5"),
            ("<network><name>n</name><forward mode='open'/><ip family='ipv6' address='2001:db8::1' prefix='64'/></network>", "2001:db8::1"),
            // Host bridge: the bridge device's first IPv4, not its link-local.
            ("<network><name>n</name><forward mode='bridge'/><bridge name='br0'/></network>", "198.18.1.1"),
            // Macvtap family: the first forward device only.
            ("<network><name>n</name><forward mode='bridge' dev='uplink0'/></network>", "198.18.2.1"),
            ("<network><name>n</name><forward mode='vepa'><interface dev='uplink0'/><interface dev='br0'/></forward></network>", "198.18.2.1"),
            ("<network><name>n</name><forward mode='private' dev='uplink0'><interface dev='uplink0'/></forward></network>", "198.18.2.1"),
            ("<network><name>n</name><forward mode='passthrough'><interface dev='v6only'/></forward></network>", "2001:db8::7"),
        ];
        for (xml, want) in cases {
            assert_eq!(addr(resolve(xml)), *want, "{xml}");
        }
    }

    #[test]
    fn errors_use_libvirts_words() {
        let t = table();
        let r = NetworkResolver::new("host-a", &t);
        assert_eq!(
            r.resolve_name("public", &[]).expect_err("none").to_string(),
            "no network with matching name 'public' on host host-a"
        );
        let cases: &[(&str, &str)] = &[
            (
                "<network><name>n</name><forward mode='nat'/></network>",
                "network 'n' doesn't have an IP address",
            ),
            (
                "<network><name>n</name></network>",
                "network 'n' doesn't have an IP address",
            ),
            (
                "<network><name>n</name><forward mode='bridge'/></network>",
                "network 'n' has no associated interface or bridge",
            ),
            (
                "<network><name>n</name><forward mode='bridge'/><bridge name='bare'/></network>",
                "no IP address found for interface 'bare'",
            ),
            (
                "<network><name>n</name><forward mode='bridge' dev='linklocal'/></network>",
                "no IP address found for interface 'linklocal'",
            ),
            (
                "<network><name>n</name><forward mode='bridge'/><bridge name='br9'/></network>",
                "network 'n' uses interface 'br9', which does not exist on host host-a",
            ),
        ];
        for (xml, want) in cases {
            assert_eq!(resolve(xml).expect_err(xml).to_string(), *want, "{xml}");
        }
        let e = resolve("<network><name>sriov</name><forward mode='hostdev'><address type='pci' domain='0' bus='1' slot='0' function='1'/></forward></network>")
            .expect_err("hostdev");
        assert!(
            e.to_string()
                .starts_with("network 'sriov' has forward mode='hostdev'"),
            "{e}"
        );
    }

    #[test]
    fn resolution_reads_the_table_it_is_given() {
        let xml =
            "<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>";
        let before = InterfaceTable::new().with("br0", &["198.18.1.1"]);
        let after = InterfaceTable::new().with("br0", &["198.18.7.7"]);
        let n = net(xml);
        assert_eq!(
            NetworkResolver::new("h", &before)
                .resolve(&n)
                .map(|r| r.address.to_string()),
            Ok("198.18.1.1".into())
        );
        assert_eq!(
            NetworkResolver::new("h", &after)
                .resolve(&n)
                .map(|r| r.address.to_string()),
            Ok("198.18.7.7".into())
        );
    }
}
