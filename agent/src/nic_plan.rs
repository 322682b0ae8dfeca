//! `plan_nics`: each `<interface>` of a VM becomes a host device to create
//! and a QEMU backend, decided on this host from this host's networks.
//!
//! This follows libvirt's qemu driver (`qemuInterfaceBridgeConnect` and
//! `qemuInterfaceDirectConnect`): a network in bridge mode with a bridge, or a
//! routed/NAT/open/isolated network, gets a tap on that bridge; a network in
//! bridge, private, vepa or passthrough mode with a forward device gets a
//! macvtap on that device. `type='bridge'` and `type='direct'` name the bridge
//! or device themselves. Pure: the networks and the interface table are
//! inputs, and the live definition records what was decided (`<target dev>`,
//! and `<source bridge|dev>` for network interfaces), as libvirt's live XML
//! does. [`crate::nic_plumbing`] carries the plan out.

use std::collections::BTreeSet;

use flotilla_shared::xml::domain::{format_mac, Interface};
use flotilla_shared::xml::network::{ForwardMode, Network};
use flotilla_shared::xml::tree::Node;
use flotilla_shared::xml::{Device, Domain};
use serde::{Deserialize, Serialize};

use crate::interfaces::InterfaceTable;

/// The first file descriptor number QEMU receives NIC fds on; NIC `n` uses
/// `NIC_FD_BASE + 2n` for its tap and the next number for vhost-net.
pub const NIC_FD_BASE: i32 = 10;

/// Prefix of the alias every macvtap Flotilla creates carries, followed by
/// the VM's name: how a restarted agent finds devices whose VM is gone.
pub const ALIAS_PREFIX: &str = "flotilla:";

/// The macvtap modes libvirt offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MacvtapMode {
    /// Guests on the same uplink talk to each other inside the host.
    Bridge,
    /// Guests never talk to each other.
    Private,
    /// Everything goes out to the switch (802.1Qbg).
    Vepa,
    /// The guest owns the uplink.
    Passthrough,
}

impl MacvtapMode {
    /// The XML word.
    pub fn as_str(self) -> &'static str {
        match self {
            MacvtapMode::Bridge => "bridge",
            MacvtapMode::Private => "private",
            MacvtapMode::Vepa => "vepa",
            MacvtapMode::Passthrough => "passthrough",
        }
    }

    fn parse(word: &str) -> Option<MacvtapMode> {
        [
            MacvtapMode::Bridge,
            MacvtapMode::Private,
            MacvtapMode::Vepa,
            MacvtapMode::Passthrough,
        ]
        .into_iter()
        .find(|m| m.as_str() == word)
    }
}

/// How a NIC reaches the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NicBackend {
    /// QEMU's user-mode network (SLIRP): no host device.
    User,
    /// A tap device on a host bridge.
    Tap {
        /// The bridge it joins.
        bridge: String,
        /// `<mtu size>`; `None` takes the bridge's.
        mtu: Option<u32>,
    },
    /// A macvtap device on a host uplink.
    Macvtap {
        /// The lower device.
        uplink: String,
        /// Its mode.
        mode: MacvtapMode,
    },
}

/// One NIC, fully decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicPlan {
    /// Position among the VM's NICs (`net0`, `hostnet0`).
    pub index: usize,
    /// The guest's MAC.
    pub mac: [u8; 6],
    /// QEMU's device (`virtio-net-pci`, `e1000`, …).
    pub driver: String,
    /// The host side.
    pub backend: NicBackend,
    /// The host device's name (`vnet0`, `macvtap0`); `None` for user networking.
    pub dev: Option<String>,
    /// The network the interface named, for messages.
    pub network: Option<String>,
    /// Whether the tap is opened with a virtio-net header (`IFF_VNET_HDR`),
    /// where the kernel supports one.
    pub vnet_hdr: bool,
    /// Whether to hand QEMU a `/dev/vhost-net` fd as well.
    pub vhost: bool,
}

impl NicPlan {
    /// The fd number QEMU finds the tap on.
    pub fn fd(&self) -> i32 {
        NIC_FD_BASE + 2 * self.index as i32
    }

    /// The fd number QEMU finds vhost-net on.
    pub fn vhost_fd(&self) -> i32 {
        self.fd() + 1
    }

    /// The host device's MAC: the guest's with the first byte `fe`, as
    /// libvirt does, so the bridge never takes the guest's address as its own
    /// (a bridge uses the lowest MAC of its ports).
    pub fn host_mac(&self) -> [u8; 6] {
        let mut m = self.mac;
        m[0] = 0xfe;
        m
    }

    /// Whether the device is a macvtap.
    pub fn is_macvtap(&self) -> bool {
        matches!(self.backend, NicBackend::Macvtap { .. })
    }
}

/// Host facts NIC planning depends on.
#[derive(Debug, Clone, Copy)]
pub struct NicHost<'a> {
    /// This host's name, for messages.
    pub host: &'a str,
    /// This host's network definitions.
    pub networks: &'a [Network],
    /// This host's devices.
    pub table: &'a InterfaceTable,
    /// `/dev/vhost-net` exists and QEMU runs under KVM.
    pub vhost_net: bool,
    /// Device names other VMs on this host hold.
    pub taken: &'a BTreeSet<String>,
}

/// Why a NIC cannot be planned on this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NicError {
    /// The network is not defined on this host.
    #[error(
        "VM '{vm}': interface {index}: no network with matching name '{network}' on host {host}"
    )]
    NoSuchNetwork {
        /// The VM.
        vm: String,
        /// NIC position.
        index: usize,
        /// The name.
        network: String,
        /// This host.
        host: String,
    },
    /// The bridge a network or interface names does not exist here.
    #[error(
        "VM '{vm}': {what} uses bridge '{bridge}', which does not exist on host {host} \
         (Flotilla attaches guests to existing bridges; create it, see deploy/README.md)"
    )]
    MissingBridge {
        /// The VM.
        vm: String,
        /// "network 'public'" or "interface 0".
        what: String,
        /// The missing bridge.
        bridge: String,
        /// This host.
        host: String,
    },
    /// The macvtap uplink does not exist here.
    #[error("VM '{vm}': {what} uses device '{dev}', which does not exist on host {host}")]
    MissingDevice {
        /// The VM.
        vm: String,
        /// "network 'public'" or "interface 0".
        what: String,
        /// The missing device.
        dev: String,
        /// This host.
        host: String,
    },
    /// A network with neither a bridge nor a forward device.
    #[error("VM '{vm}': network '{network}' has no associated interface or bridge on host {host}")]
    NoInterfaceOrBridge {
        /// The VM.
        vm: String,
        /// The network.
        network: String,
        /// This host.
        host: String,
    },
    /// `forward mode='hostdev'` hands out PCI devices, which Flotilla does not do.
    #[error(
        "VM '{vm}': network '{network}' has forward mode='hostdev' (PCI passthrough), \
         which Flotilla does not support; use a bridge or macvtap network"
    )]
    Hostdev {
        /// The VM.
        vm: String,
        /// The network.
        network: String,
    },
    /// A guest MAC in the range libvirt reserves for host devices.
    #[error(
        "VM '{vm}': interface {index}: unable to use MAC address starting with reserved \
         value 0xFE - '{mac}'"
    )]
    ReservedMac {
        /// The VM.
        vm: String,
        /// NIC position.
        index: usize,
        /// The MAC.
        mac: String,
    },
    /// An interface type, model or mode Flotilla does not drive.
    #[error("VM '{vm}': interface {index}: {what} is not supported by Flotilla")]
    Unsupported {
        /// The VM.
        vm: String,
        /// NIC position.
        index: usize,
        /// What.
        what: String,
    },
}

/// Plans every NIC of `live` on this host and records the decisions in
/// `live` (`<mac>` when missing, `<target dev>`, network `<source>`).
pub fn plan_nics(live: &mut Domain, host: &NicHost<'_>) -> Result<Vec<NicPlan>, NicError> {
    live.assign_missing_macs();
    let vm = live.name.clone();
    let mut plans = Vec::new();
    let mut claimed: BTreeSet<String> = host.taken.clone();
    let mut index = 0;
    for dev in &mut live.devices {
        let Device::Interface(i) = dev else { continue };
        let plan = plan_one(&vm, index, i, host, &mut claimed)?;
        plans.push(plan);
        index += 1;
    }
    Ok(plans)
}

fn plan_one(
    vm: &str,
    index: usize,
    i: &mut Interface,
    host: &NicHost<'_>,
    claimed: &mut BTreeSet<String>,
) -> Result<NicPlan, NicError> {
    let unsupported = |what: String| NicError::Unsupported {
        vm: vm.to_string(),
        index,
        what,
    };
    let mac = i
        .mac_bytes()
        .ok_or_else(|| unsupported("an interface without a MAC".into()))?;
    if mac[0] == 0xfe {
        return Err(NicError::ReservedMac {
            vm: vm.to_string(),
            index,
            mac: format_mac(&mac),
        });
    }
    let model = i.model.clone().unwrap_or_else(|| "virtio".into());
    let driver = match model.as_str() {
        "virtio" => "virtio-net-pci",
        "e1000" => "e1000",
        "e1000e" => "e1000e",
        "rtl8139" => "rtl8139",
        other => return Err(unsupported(format!("interface model '{other}'"))),
    };
    let virtio = model == "virtio";
    let mtu = mtu_of(i);
    let here = |what: &str| what.to_string();
    let (backend, network) = match i.if_type.as_str() {
        "user" => (NicBackend::User, None),
        "bridge" => {
            let bridge = i
                .source_bridge
                .clone()
                .ok_or_else(|| unsupported("type 'bridge' without <source bridge>".into()))?;
            (
                tap_on(vm, host, &format!("interface {index}"), bridge, mtu)?,
                None,
            )
        }
        "direct" => {
            let uplink = i
                .source_dev
                .clone()
                .ok_or_else(|| unsupported("type 'direct' without <source dev>".into()))?;
            // libvirt's default mode for a direct interface.
            let word = i.source_mode.clone().unwrap_or_else(|| "vepa".into());
            let mode = MacvtapMode::parse(&word)
                .ok_or_else(|| unsupported(format!("direct mode '{word}'")))?;
            let what = format!("interface {index}");
            (macvtap_on(vm, host, &what, uplink, mode)?, None)
        }
        "network" => {
            let name = i.source_network.clone().unwrap_or_default();
            let net = host
                .networks
                .iter()
                .find(|n| n.name == name)
                .ok_or_else(|| NicError::NoSuchNetwork {
                    vm: vm.to_string(),
                    index,
                    network: name.clone(),
                    host: host.host.to_string(),
                })?;
            let what = here(&format!("network '{name}'"));
            let backend = network_backend(vm, host, net, &what, mtu)?;
            match &backend {
                NicBackend::Tap { bridge, .. } => {
                    i.source_bridge = Some(bridge.clone());
                }
                NicBackend::Macvtap { uplink, mode } => {
                    i.source_dev = Some(uplink.clone());
                    i.source_mode = Some(mode.as_str().to_string());
                }
                NicBackend::User => {}
            }
            (backend, Some(name))
        }
        other => return Err(unsupported(format!("interface type '{other}'"))),
    };
    let dev = match &backend {
        NicBackend::User => None,
        NicBackend::Tap { .. } => Some(free_name("vnet", host.table, claimed)),
        NicBackend::Macvtap { .. } => Some(free_name("macvtap", host.table, claimed)),
    };
    i.target_dev = dev.clone();
    let tapped = dev.is_some();
    Ok(NicPlan {
        index,
        mac,
        driver: driver.to_string(),
        backend,
        dev,
        network,
        vnet_hdr: tapped && virtio,
        vhost: tapped && virtio && host.vhost_net,
    })
}

fn network_backend(
    vm: &str,
    host: &NicHost<'_>,
    net: &Network,
    what: &str,
    mtu: Option<u32>,
) -> Result<NicBackend, NicError> {
    let mode = net.forward_mode();
    if mode == Some(ForwardMode::Hostdev) {
        return Err(NicError::Hostdev {
            vm: vm.to_string(),
            network: net.name.clone(),
        });
    }
    let no_bridge = || NicError::NoInterfaceOrBridge {
        vm: vm.to_string(),
        network: net.name.clone(),
        host: host.host.to_string(),
    };
    match mode {
        // A routed, NAT, open or isolated network: its bridge. libvirt would
        // create it (and run dnsmasq); Flotilla only attaches to it.
        None | Some(ForwardMode::Nat | ForwardMode::Route | ForwardMode::Open) => {
            let bridge = net.bridge_name.clone().ok_or_else(no_bridge)?;
            tap_on(vm, host, what, bridge, mtu)
        }
        Some(ForwardMode::Bridge) if net.bridge_name.is_some() => {
            let bridge = net.bridge_name.clone().unwrap_or_default();
            tap_on(vm, host, what, bridge, mtu)
        }
        Some(m) => {
            let uplink = net
                .first_forward_dev()
                .map(str::to_string)
                .ok_or_else(no_bridge)?;
            let mode = match m {
                ForwardMode::Private => MacvtapMode::Private,
                ForwardMode::Vepa => MacvtapMode::Vepa,
                ForwardMode::Passthrough => MacvtapMode::Passthrough,
                _ => MacvtapMode::Bridge,
            };
            macvtap_on(vm, host, what, uplink, mode)
        }
    }
}

/// Why guest NICs cannot attach to `net` on this host; `None` when they
/// can. What `plan_nics` would refuse, without a VM: for the host's report,
/// so the scheduler never sends a VM with a NIC there.
pub fn attach_problem(net: &Network, table: &InterfaceTable) -> Option<String> {
    let taken = BTreeSet::new();
    let host = NicHost {
        host: "",
        networks: std::slice::from_ref(net),
        table,
        vhost_net: false,
        taken: &taken,
    };
    match network_backend("", &host, net, "", None) {
        Ok(_) => None,
        Err(NicError::MissingBridge { bridge, .. }) => {
            Some(format!("bridge '{bridge}' does not exist"))
        }
        Err(NicError::MissingDevice { dev, .. }) => Some(format!("device '{dev}' does not exist")),
        Err(NicError::Hostdev { .. }) => {
            Some("forward mode='hostdev' (PCI passthrough) is not supported".into())
        }
        Err(NicError::NoInterfaceOrBridge { .. }) => {
            Some("it has no associated interface or bridge".into())
        }
        Err(e) => Some(e.to_string()),
    }
}

fn tap_on(
    vm: &str,
    host: &NicHost<'_>,
    what: &str,
    bridge: String,
    mtu: Option<u32>,
) -> Result<NicBackend, NicError> {
    if !host.table.has_device(&bridge) {
        return Err(NicError::MissingBridge {
            vm: vm.to_string(),
            what: what.to_string(),
            bridge,
            host: host.host.to_string(),
        });
    }
    Ok(NicBackend::Tap { bridge, mtu })
}

fn macvtap_on(
    vm: &str,
    host: &NicHost<'_>,
    what: &str,
    uplink: String,
    mode: MacvtapMode,
) -> Result<NicBackend, NicError> {
    if !host.table.has_device(&uplink) {
        return Err(NicError::MissingDevice {
            vm: vm.to_string(),
            what: what.to_string(),
            dev: uplink,
            host: host.host.to_string(),
        });
    }
    Ok(NicBackend::Macvtap { uplink, mode })
}

/// `<mtu size='N'/>`, which the domain model keeps uninterpreted.
fn mtu_of(i: &Interface) -> Option<u32> {
    i.extra.children.iter().find_map(|n| match n {
        Node::Element(e) if e.name == "mtu" => e.get_attr("size").and_then(|s| s.parse().ok()),
        _ => None,
    })
}

/// The lowest `PREFIXn` that no device and no other VM holds.
fn free_name(prefix: &str, table: &InterfaceTable, claimed: &mut BTreeSet<String>) -> String {
    let mut n = 0u32;
    loop {
        let name = format!("{prefix}{n}");
        if !table.has_device(&name) && !claimed.contains(&name) {
            claimed.insert(name.clone());
            return name;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(xml: &str) -> Network {
        Network::parse("net.xml", xml).expect("network").model
    }

    fn domain(interfaces: &str) -> Domain {
        let xml = format!(
            "<domain type='kvm'><name>web</name><uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>\
             <memory unit='MiB'>64</memory><os><type>hvm</type></os><devices>{interfaces}</devices></domain>"
        );
        Domain::parse("web.xml", &xml).expect("domain").model
    }

    fn networks() -> Vec<Network> {
        vec![
            net("<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>"),
            net("<network><name>uplink</name><forward mode='private' dev='eth1'/></network>"),
            net("<network><name>list</name><forward mode='vepa'><interface dev='eth2'/></forward></network>"),
            net("<network><name>nat</name><forward mode='nat'/><bridge name='virbr0'/><ip address='198.18.9.1' prefix='24'/></network>"),
            net("<network><name>gone</name><forward mode='route'/><bridge name='virbr9'/></network>"),
            net("<network><name>pci</name><forward mode='hostdev' managed='yes'><pf dev='eth3'/></forward></network>"),
            net("<network><name>nothing</name><forward mode='bridge'/></network>"),
        ]
    }

    fn table() -> InterfaceTable {
        InterfaceTable::new()
            .with("br0", &[])
            .with("eth1", &[])
            .with("eth2", &[])
            .with("virbr0", &[])
            .with("vnet0", &[])
    }

    fn plan(interfaces: &str) -> (Result<Vec<NicPlan>, NicError>, Domain) {
        let nets = networks();
        let t = table();
        let taken = BTreeSet::from(["vnet1".to_string()]);
        let host = NicHost {
            host: "a",
            networks: &nets,
            table: &t,
            vhost_net: false,
            taken: &taken,
        };
        let mut d = domain(interfaces);
        (plan_nics(&mut d, &host), d)
    }

    #[test]
    fn each_network_shape_becomes_its_device() {
        let table: &[(&str, NicBackend, &str)] = &[
            (
                "<interface type='network'><source network='public'/></interface>",
                NicBackend::Tap {
                    bridge: "br0".into(),
                    mtu: None,
                },
                "vnet2",
            ),
            (
                "<interface type='network'><source network='nat'/><mtu size='9000'/></interface>",
                NicBackend::Tap {
                    bridge: "virbr0".into(),
                    mtu: Some(9000),
                },
                "vnet2",
            ),
            (
                "<interface type='network'><source network='uplink'/></interface>",
                NicBackend::Macvtap {
                    uplink: "eth1".into(),
                    mode: MacvtapMode::Private,
                },
                "macvtap0",
            ),
            (
                "<interface type='network'><source network='list'/></interface>",
                NicBackend::Macvtap {
                    uplink: "eth2".into(),
                    mode: MacvtapMode::Vepa,
                },
                "macvtap0",
            ),
            (
                "<interface type='bridge'><source bridge='br0'/></interface>",
                NicBackend::Tap {
                    bridge: "br0".into(),
                    mtu: None,
                },
                "vnet2",
            ),
            (
                "<interface type='direct'><source dev='eth1' mode='passthrough'/></interface>",
                NicBackend::Macvtap {
                    uplink: "eth1".into(),
                    mode: MacvtapMode::Passthrough,
                },
                "macvtap0",
            ),
            (
                "<interface type='direct'><source dev='eth1'/></interface>",
                NicBackend::Macvtap {
                    uplink: "eth1".into(),
                    mode: MacvtapMode::Vepa,
                },
                "macvtap0",
            ),
        ];
        for (xml, backend, dev) in table {
            let (plans, _) = plan(xml);
            let plans = plans.expect(xml);
            assert_eq!(&plans[0].backend, backend, "{xml}");
            assert_eq!(plans[0].dev.as_deref(), Some(*dev), "{xml}");
            assert_eq!(plans[0].driver, "virtio-net-pci");
            assert!(plans[0].vnet_hdr && !plans[0].vhost, "{xml}");
        }
    }

    #[test]
    fn refusals_name_the_network_and_device() {
        let table: &[(&str, &str)] = &[
            (
                "<interface type='network'><source network='gone'/></interface>",
                "VM 'web': network 'gone' uses bridge 'virbr9', which does not exist on host a \
                 (Flotilla attaches guests to existing bridges; create it, see deploy/README.md)",
            ),
            (
                "<interface type='network'><source network='pci'/></interface>",
                "VM 'web': network 'pci' has forward mode='hostdev' (PCI passthrough), which \
                 Flotilla does not support; use a bridge or macvtap network",
            ),
            (
                "<interface type='network'><source network='nothing'/></interface>",
                "VM 'web': network 'nothing' has no associated interface or bridge on host a",
            ),
            (
                "<interface type='network'><source network='lan'/></interface>",
                "VM 'web': interface 0: no network with matching name 'lan' on host a",
            ),
            (
                "<interface type='network'><mac address='fe:54:00:01:02:03'/><source network='public'/></interface>",
                "VM 'web': interface 0: unable to use MAC address starting with reserved value \
                 0xFE - 'fe:54:00:01:02:03'",
            ),
            (
                "<interface type='direct'><source dev='eth7'/></interface>",
                "VM 'web': interface 0 uses device 'eth7', which does not exist on host a",
            ),
            (
                "<interface type='network'><source network='public'/><model type='ne2k_pci'/></interface>",
                "VM 'web': interface 0: interface model 'ne2k_pci' is not supported by Flotilla",
            ),
            (
                "<interface type='ethernet'/>",
                "VM 'web': interface 0: interface type 'ethernet' is not supported by Flotilla",
            ),
        ];
        for (xml, message) in table {
            let (plans, _) = plan(xml);
            assert_eq!(plans.expect_err(xml).to_string(), *message, "{xml}");
        }
        let (plans, _) = plan("<interface type='network'><source network='pci'/></interface>");
        assert!(matches!(plans, Err(NicError::Hostdev { .. })));
    }

    #[test]
    fn a_hosts_report_says_which_networks_take_nics() {
        let t = table();
        let problems: Vec<(String, Option<String>)> = networks()
            .iter()
            .map(|n| (n.name.clone(), attach_problem(n, &t)))
            .collect();
        let none = |n: &str| (n.to_string(), None);
        assert_eq!(
            problems,
            [
                none("public"),
                none("uplink"),
                none("list"),
                none("nat"),
                ("gone".into(), Some("bridge 'virbr9' does not exist".into())),
                (
                    "pci".into(),
                    Some("forward mode='hostdev' (PCI passthrough) is not supported".into())
                ),
                (
                    "nothing".into(),
                    Some("it has no associated interface or bridge".into())
                ),
            ]
        );
    }

    #[test]
    fn the_live_definition_records_the_devices_and_inactive_drops_them() {
        let (plans, live) = plan(
            "<interface type='network'><source network='public'/><model type='e1000'/></interface>\
             <interface type='network'><source network='uplink'/></interface>\
             <interface type='user'/>",
        );
        let plans = plans.expect("plans");
        let names: Vec<_> = plans.iter().map(|p| p.dev.clone()).collect();
        assert_eq!(names, [Some("vnet2".into()), Some("macvtap0".into()), None]);
        assert!(!plans[0].vnet_hdr, "e1000 has no virtio header");
        assert_eq!((plans[1].fd(), plans[1].vhost_fd()), (12, 13));
        let xml = live.to_xml(flotilla_shared::xml::XmlFlavor::Live);
        assert!(
            xml.contains("<source network=\"public\" bridge=\"br0\"/>")
                || xml.contains("<source network='public' bridge='br0'/>"),
            "{xml}"
        );
        assert!(xml.contains("vnet2") && xml.contains("macvtap0"), "{xml}");
        let inactive = live.to_xml(flotilla_shared::xml::XmlFlavor::Inactive);
        assert!(
            !inactive.contains("vnet2") && !inactive.contains("br0") && !inactive.contains("eth1"),
            "{inactive}"
        );
        // MACs were assigned once and are kept by the inactive definition.
        let again = Domain::parse("web.xml", &inactive).expect("reparse").model;
        let macs: Vec<_> = again.interfaces().map(|i| i.mac.clone()).collect();
        assert!(
            macs.iter()
                .all(|m| m.as_deref().is_some_and(|m| m.starts_with("52:54:00:"))),
            "{macs:?}"
        );
        assert_eq!(
            plans[0].mac,
            again
                .interfaces()
                .next()
                .and_then(Interface::mac_bytes)
                .expect("mac")
        );
        assert_eq!(plans[0].host_mac()[0], 0xfe);
    }
}
