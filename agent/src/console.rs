//! Console planning: where a VM's VNC/SPICE servers will listen on this host.
//!
//! Given a host-independent definition, this fills in what libvirt's
//! `qemuProcessGraphicsSetupListen` and port allocation fill in: each
//! `type='network'` listen gets the network's address on this host, a listen
//! without an address gets the host's configured default (marked
//! `fromConfig`), auto sockets get a path in the VM's state directory, and
//! automatic ports are allocated. The result is the VM's live XML plus the
//! console endpoints to confirm. Pure: the port probe is injected.

use std::net::IpAddr;
use std::path::Path;

use flotilla_shared::xml::network::Network;
use flotilla_shared::xml::{Domain, GraphicsProtocol, ListenKind};

use crate::interfaces::InterfaceTable;
use crate::ports::{PortAllocator, DISPLAY_PORTS, WEBSOCKET_PORTS};
use crate::resolver::{NetworkResolver, ResolveError};

/// What the host does about consoles open to the network without a password.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConsoleAuth {
    /// Start the VM, log a warning and mark the console unauthenticated.
    #[default]
    Warn,
    /// Refuse to start the VM.
    Require,
}

/// Host facts console planning needs.
#[derive(Debug, Clone)]
pub struct ConsoleSettings {
    /// This host's name, for messages.
    pub host: String,
    /// Default VNC listen address (libvirt's `vnc_listen`).
    pub vnc_listen: String,
    /// Default SPICE listen address (libvirt's `spice_listen`).
    pub spice_listen: String,
    /// Policy for unauthenticated consoles on non-loopback addresses.
    pub console_auth: ConsoleAuth,
    /// SPICE TLS certificates are installed (libvirt's `spice_tls`): an
    /// autoport SPICE display gets a TLS port too.
    pub spice_tls: bool,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        ConsoleSettings {
            host: "localhost".into(),
            vnc_listen: "127.0.0.1".into(),
            spice_listen: "127.0.0.1".into(),
            console_auth: ConsoleAuth::Warn,
            spice_tls: false,
        }
    }
}

/// Where one console can be reached once the VM runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleEndpoint {
    /// `vnc` or `spice`.
    pub protocol: String,
    /// How to reach it.
    pub target: ConsoleTarget,
    /// The network the address was resolved from, if any.
    pub network: Option<String>,
    /// Whether a password protects it.
    pub authenticated: bool,
}

/// The transport of a console endpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConsoleTarget {
    /// A TCP address and port.
    Tcp {
        /// Listen address.
        address: IpAddr,
        /// Port.
        port: u16,
    },
    /// A unix socket.
    Unix {
        /// Socket path.
        path: String,
    },
    /// No listener (`type='none'`).
    None,
}

impl ConsoleEndpoint {
    /// The URI `flotilla domdisplay` prints, e.g. `vnc://198.18.0.1:5900`
    /// (the port, where `virsh domdisplay` prints a VNC display number).
    pub fn uri(&self) -> String {
        match &self.target {
            ConsoleTarget::Tcp {
                address: IpAddr::V6(a),
                port,
            } => format!("{}://[{a}]:{port}", self.protocol),
            ConsoleTarget::Tcp { address, port } => format!("{}://{address}:{port}", self.protocol),
            ConsoleTarget::Unix { path } => format!("{}+unix://{path}", self.protocol),
            ConsoleTarget::None => format!("{}: no listener", self.protocol),
        }
    }

    /// True when anyone who can reach the address gets the console with no password.
    pub fn is_exposed_unauthenticated(&self) -> bool {
        match &self.target {
            ConsoleTarget::Tcp { address, .. } => !address.is_loopback() && !self.authenticated,
            _ => false,
        }
    }
}

/// Why a VM's consoles cannot be set up on this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsoleError {
    /// A listen network does not resolve here.
    #[error("graphics listen network of VM '{vm}': {source}")]
    Resolve {
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: ResolveError,
    },
    /// An explicit VNC port outside libvirt's range.
    #[error("vnc port must be in range [5900,65535]")]
    VncPortRange,
    /// An explicit port is already taken on this host.
    #[error("{protocol} port {port} of VM '{vm}' is already in use on host {host}")]
    PortInUse {
        /// The VM.
        vm: String,
        /// vnc, spice or websocket.
        protocol: &'static str,
        /// The port.
        port: u16,
        /// This host.
        host: String,
    },
    /// The whole range is taken.
    #[error("no free {what} port on host {host}")]
    NoFreePort {
        /// What kind of port.
        what: &'static str,
        /// This host.
        host: String,
    },
    /// Two devices of one protocol; QEMU has one server per protocol.
    #[error("VM '{vm}' has more than one {protocol} graphics device; QEMU runs one per protocol")]
    Duplicate {
        /// The VM.
        vm: String,
        /// The protocol.
        protocol: &'static str,
    },
    /// A listen address that is not an IP address.
    #[error("graphics listen address '{0}' is not an IP address")]
    BadAddress(String),
    /// SPICE TLS asked of a host without its certificates.
    #[error(
        "VM '{0}': SPICE tlsPort needs TLS certificates on this host \
         (flotilla-agent --spice-tls-dir with ca-cert.pem, server-cert.pem, server-key.pem)"
    )]
    SpiceTls(String),
    /// `console_auth = "require"` refused an open console.
    #[error(
        "VM '{vm}': {protocol} console would listen on {address}{via} with no password or TLS; \
         this host's console_auth = \"require\" refuses that (set a passwd on <graphics>)"
    )]
    AuthRequired {
        /// The VM.
        vm: String,
        /// vnc or spice.
        protocol: &'static str,
        /// The address.
        address: IpAddr,
        /// " (network 'X')" or "".
        via: String,
    },
}

/// The outcome of planning: the live definition, its consoles, its ports.
#[derive(Debug, Clone)]
pub struct ConsolePlan {
    /// The definition with this host's addresses, ports and sockets filled in.
    pub live: Domain,
    /// One endpoint per graphics device, in device order.
    pub endpoints: Vec<ConsoleEndpoint>,
    /// Ports reserved for this VM; release them when it stops.
    pub ports: Vec<u16>,
    /// Warnings for the log (unauthenticated consoles under `warn`).
    pub warnings: Vec<String>,
}

/// Plans the consoles of `definition` on this host.
///
/// On error, every port this call reserved is released again.
pub fn plan_consoles(
    definition: &Domain,
    networks: &[Network],
    interfaces: &InterfaceTable,
    settings: &ConsoleSettings,
    vm_dir: &Path,
    ports: &mut PortAllocator,
    probe: &mut dyn FnMut(u16) -> bool,
) -> Result<ConsolePlan, ConsoleError> {
    let mut taken = Vec::new();
    let result = plan_inner(
        definition, networks, interfaces, settings, vm_dir, ports, probe, &mut taken,
    );
    if result.is_err() {
        for p in &taken {
            ports.release(*p);
        }
    }
    result.map(|(live, endpoints, warnings)| ConsolePlan {
        live,
        endpoints,
        ports: taken,
        warnings,
    })
}

#[allow(clippy::too_many_arguments)]
fn plan_inner(
    definition: &Domain,
    networks: &[Network],
    interfaces: &InterfaceTable,
    settings: &ConsoleSettings,
    vm_dir: &Path,
    ports: &mut PortAllocator,
    probe: &mut dyn FnMut(u16) -> bool,
    taken: &mut Vec<u16>,
) -> Result<(Domain, Vec<ConsoleEndpoint>, Vec<String>), ConsoleError> {
    let vm = definition.name.clone();
    let mut live = definition.without_runtime_state();
    let resolver = NetworkResolver::new(&settings.host, interfaces);
    let mut endpoints = Vec::new();
    let mut warnings = Vec::new();
    let mut seen = Vec::new();
    for g in live.graphics_mut() {
        let protocol = g.protocol.as_str();
        if seen.contains(&g.protocol) {
            return Err(ConsoleError::Duplicate {
                vm: vm.clone(),
                protocol,
            });
        }
        seen.push(g.protocol);
        if g.protocol == GraphicsProtocol::Spice && g.tls_port.is_some() && !settings.spice_tls {
            return Err(ConsoleError::SpiceTls(vm.clone()));
        }
        let default_listen = match g.protocol {
            GraphicsProtocol::Vnc => &settings.vnc_listen,
            GraphicsProtocol::Spice => &settings.spice_listen,
        };
        // libvirt: a display with no <listen> listens on the configured default.
        if g.listens.is_empty() {
            g.listens
                .push(flotilla_shared::xml::Listen::new(ListenKind::Address {
                    address: None,
                }));
        }
        let authenticated = g.passwd.is_some();
        let mut network_name = None;
        let first = &mut g.listens[0];
        let target = match &mut first.kind {
            ListenKind::Address { address } => {
                if address.is_none() {
                    *address = Some(default_listen.clone());
                    first.from_config = true;
                }
                let text = address.clone().unwrap_or_default();
                let ip: IpAddr = text.parse().map_err(|_| ConsoleError::BadAddress(text))?;
                Some(ip)
            }
            ListenKind::Network { network, address } => {
                let resolved = resolver.resolve_name(network, networks).map_err(|source| {
                    ConsoleError::Resolve {
                        vm: vm.clone(),
                        source,
                    }
                })?;
                *address = Some(resolved.address.to_string());
                network_name = Some(network.clone());
                Some(resolved.address)
            }
            ListenKind::Socket { socket } => {
                if socket.is_none() {
                    *socket = Some(
                        vm_dir
                            .join(format!("{protocol}.sock"))
                            .display()
                            .to_string(),
                    );
                    first.auto_generated = true;
                }
                None
            }
            ListenKind::None => None,
        };
        let endpoint_target = match (&first.kind, target) {
            (ListenKind::Socket { socket }, _) => ConsoleTarget::Unix {
                path: socket.clone().unwrap_or_default(),
            },
            (ListenKind::None, _) => ConsoleTarget::None,
            (_, Some(address)) => {
                let port = match g.port.filter(|_| !g.autoport) {
                    Some(p) => {
                        let p = u16::try_from(p).ok().filter(|p| {
                            g.protocol == GraphicsProtocol::Spice || DISPLAY_PORTS.contains(p)
                        });
                        let Some(p) = p else {
                            return Err(ConsoleError::VncPortRange);
                        };
                        if !ports.reserve(p) {
                            return Err(ConsoleError::PortInUse {
                                vm: vm.clone(),
                                protocol,
                                port: p,
                                host: settings.host.clone(),
                            });
                        }
                        p
                    }
                    None => ports.allocate(DISPLAY_PORTS, probe).ok_or_else(|| {
                        ConsoleError::NoFreePort {
                            what: "display",
                            host: settings.host.clone(),
                        }
                    })?,
                };
                taken.push(port);
                g.port = Some(i32::from(port));
                ConsoleTarget::Tcp { address, port }
            }
            (_, None) => ConsoleTarget::None,
        };
        // SPICE's TLS port: the one asked for, or (autoport on a host with
        // SPICE TLS) the next free display port, as libvirt allocates it.
        if g.protocol == GraphicsProtocol::Spice
            && matches!(endpoint_target, ConsoleTarget::Tcp { .. })
        {
            let fixed = g.tls_port.filter(|p| *p > 0 && !g.autoport);
            let tls = match fixed {
                Some(p) => {
                    let p = u16::try_from(p).map_err(|_| ConsoleError::VncPortRange)?;
                    if !ports.reserve(p) {
                        return Err(ConsoleError::PortInUse {
                            vm: vm.clone(),
                            protocol,
                            port: p,
                            host: settings.host.clone(),
                        });
                    }
                    Some(p)
                }
                None if settings.spice_tls => {
                    Some(ports.allocate(DISPLAY_PORTS, probe).ok_or_else(|| {
                        ConsoleError::NoFreePort {
                            what: "display",
                            host: settings.host.clone(),
                        }
                    })?)
                }
                None => None,
            };
            if let Some(p) = tls {
                taken.push(p);
                g.tls_port = Some(i32::from(p));
            }
        }
        if g.websocket == Some(-1) {
            let ws =
                ports
                    .allocate(WEBSOCKET_PORTS, probe)
                    .ok_or_else(|| ConsoleError::NoFreePort {
                        what: "websocket",
                        host: settings.host.clone(),
                    })?;
            taken.push(ws);
            g.websocket = Some(i32::from(ws));
        }
        let endpoint = ConsoleEndpoint {
            protocol: protocol.to_string(),
            target: endpoint_target,
            network: network_name.clone(),
            authenticated,
        };
        if endpoint.is_exposed_unauthenticated() {
            if let ConsoleTarget::Tcp { address, .. } = endpoint.target {
                let via = network_name
                    .as_deref()
                    .map(|n| format!(" (network '{n}')"))
                    .unwrap_or_default();
                match settings.console_auth {
                    ConsoleAuth::Require => {
                        return Err(ConsoleError::AuthRequired {
                            vm: vm.clone(),
                            protocol,
                            address,
                            via,
                        })
                    }
                    ConsoleAuth::Warn => warnings.push(format!(
                        "VM '{vm}': {protocol} console listens on {address}{via} with no \
                         password or TLS; anyone who can reach that address gets the console"
                    )),
                }
            }
        }
        endpoints.push(endpoint);
    }
    Ok((live, endpoints, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::xml::XmlFlavor;

    fn domain(graphics: &str) -> Domain {
        let xml = format!(
            "<domain type='kvm'><name>web01</name><memory unit='MiB'>64</memory>\
             <os><type>hvm</type></os><devices>{graphics}</devices></domain>"
        );
        Domain::parse("web01.xml", &xml).expect("valid").model
    }

    fn public_bridge() -> Vec<Network> {
        let xml =
            "<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>";
        vec![Network::parse("public.xml", xml).expect("valid").model]
    }

    fn plan(
        d: &Domain,
        settings: &ConsoleSettings,
        ports: &mut PortAllocator,
    ) -> Result<ConsolePlan, ConsoleError> {
        let table = InterfaceTable::new().with("br0", &["198.18.4.1"]);
        plan_consoles(
            d,
            &public_bridge(),
            &table,
            settings,
            Path::new("/run/flotilla/vms/web01"),
            ports,
            &mut |_| true,
        )
    }

    #[test]
    fn spice_tls_ports_are_reserved_or_allocated_only_where_certificates_are() {
        let tls = ConsoleSettings {
            spice_tls: true,
            ..ConsoleSettings::default()
        };
        let fixed = domain(
            "<graphics type='spice' port='5903' tlsPort='5904' autoport='no'>\
             <listen type='network' network='public'/></graphics>",
        );
        let e = plan(
            &fixed,
            &ConsoleSettings::default(),
            &mut PortAllocator::new(),
        )
        .expect_err("no certificates");
        assert_eq!(e, ConsoleError::SpiceTls("web01".into()));
        let mut ports = PortAllocator::new();
        let p = plan(&fixed, &tls, &mut ports).expect("plan");
        let g = p.live.graphics().next().expect("spice");
        assert_eq!((g.port, g.tls_port), (Some(5903), Some(5904)));
        assert!(!ports.reserve(5904), "the TLS port is taken");
        // Autoport on a host with certificates: both ports allocated.
        let auto = domain(
            "<graphics type='spice' autoport='yes'><listen type='network' network='public'/></graphics>",
        );
        let p = plan(&auto, &tls, &mut PortAllocator::new()).expect("plan");
        let g = p.live.graphics().next().expect("spice");
        assert_eq!((g.port, g.tls_port), (Some(5900), Some(5901)));
        let p = plan(
            &auto,
            &ConsoleSettings::default(),
            &mut PortAllocator::new(),
        )
        .expect("plan");
        assert_eq!(p.live.graphics().next().expect("spice").tls_port, None);
    }

    #[test]
    fn network_listen_resolves_and_gets_a_port() {
        let d = domain("<graphics type='vnc'><listen type='network' network='public'/></graphics>");
        let p = plan(&d, &ConsoleSettings::default(), &mut PortAllocator::new()).expect("plan");
        assert_eq!(p.endpoints[0].uri(), "vnc://198.18.4.1:5900");
        assert_eq!(p.endpoints[0].network.as_deref(), Some("public"));
        let live = p.live.to_xml(XmlFlavor::Live);
        assert!(live.contains("listen=\"198.18.4.1\""), "{live}");
        assert!(
            live.contains("<listen type=\"network\" address=\"198.18.4.1\" network=\"public\"/>"),
            "{live}"
        );
        assert_eq!(
            p.live.without_runtime_state(),
            d,
            "definition must be recoverable"
        );
        assert_eq!(
            p.warnings.len(),
            1,
            "open console on a public address is warned"
        );
    }

    #[test]
    fn two_vms_get_two_ports_and_failures_release_theirs() {
        let d = domain("<graphics type='vnc'><listen type='network' network='public'/></graphics>");
        let mut ports = PortAllocator::new();
        let s = ConsoleSettings::default();
        assert_eq!(plan(&d, &s, &mut ports).expect("a").ports, vec![5900]);
        assert_eq!(plan(&d, &s, &mut ports).expect("b").ports, vec![5901]);
        let bad = domain(
            "<graphics type='vnc' websocket='-1'><listen type='network' network='public'/></graphics>\
             <graphics type='spice'><listen type='network' network='nowhere'/></graphics>",
        );
        let e = plan(&bad, &s, &mut ports).expect_err("nowhere");
        assert_eq!(
            e.to_string(),
            "graphics listen network of VM 'web01': no network with matching name 'nowhere' on host localhost"
        );
        assert!(
            !ports.is_reserved(5902),
            "failed plan released its display port"
        );
        assert!(
            !ports.is_reserved(5700),
            "failed plan released its websocket port"
        );
    }

    #[test]
    fn no_listen_uses_config_default_marked_from_config() {
        let d = domain("<graphics type='vnc'/>");
        let p = plan(&d, &ConsoleSettings::default(), &mut PortAllocator::new()).expect("plan");
        assert_eq!(p.endpoints[0].uri(), "vnc://127.0.0.1:5900");
        let live = p.live.to_xml(XmlFlavor::Live);
        assert!(live.contains("fromConfig=\"1\""), "{live}");
        assert!(p.warnings.is_empty(), "loopback is not exposed");
        assert!(!p.live.to_xml(XmlFlavor::Migratable).contains("127.0.0.1"));
    }

    #[test]
    fn explicit_ports_are_checked() {
        let s = ConsoleSettings::default();
        let low = domain("<graphics type='vnc' port='5800' autoport='no' listen='127.0.0.1'/>");
        assert_eq!(
            plan(&low, &s, &mut PortAllocator::new())
                .expect_err("range")
                .to_string(),
            "vnc port must be in range [5900,65535]"
        );
        let fixed = domain("<graphics type='vnc' port='5905' autoport='no' listen='127.0.0.1'/>");
        let mut ports = PortAllocator::new();
        assert_eq!(
            plan(&fixed, &s, &mut ports).expect("first").ports,
            vec![5905]
        );
        let e = plan(&fixed, &s, &mut ports).expect_err("clash");
        assert!(
            matches!(e, ConsoleError::PortInUse { port: 5905, .. }),
            "{e}"
        );
    }

    #[test]
    fn require_policy_refuses_open_consoles_but_not_passworded_ones() {
        let s = ConsoleSettings {
            console_auth: ConsoleAuth::Require,
            ..ConsoleSettings::default()
        };
        let open =
            domain("<graphics type='vnc'><listen type='network' network='public'/></graphics>");
        let e = plan(&open, &s, &mut PortAllocator::new()).expect_err("refused");
        assert_eq!(
            e.to_string(),
            "VM 'web01': vnc console would listen on 198.18.4.1 (network 'public') with no \
             password or TLS; this host's console_auth = \"require\" refuses that (set a passwd on <graphics>)"
        );
        let locked = domain("<graphics type='vnc' passwd='s3cret'><listen type='network' network='public'/></graphics>");
        let p = plan(&locked, &s, &mut PortAllocator::new()).expect("allowed");
        assert!(p.endpoints[0].authenticated);
    }

    #[test]
    fn sockets_are_generated_in_the_vm_directory() {
        let d = domain("<graphics type='spice'><listen type='socket'/></graphics>");
        let p = plan(&d, &ConsoleSettings::default(), &mut PortAllocator::new()).expect("plan");
        assert_eq!(
            p.endpoints[0].uri(),
            "spice+unix:///run/flotilla/vms/web01/spice.sock"
        );
        assert!(p.ports.is_empty());
        assert!(!p.live.to_xml(XmlFlavor::Inactive).contains("spice.sock"));
    }
}
