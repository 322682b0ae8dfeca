//! libvirt network XML: each host's definition of a network name.
//!
//! The same name (`public`) means a different thing on every host: a bridge, a
//! macvtap uplink or a routed network with its own `<ip>`. This model holds
//! what the agent needs to resolve the name to an address, and keeps the rest
//! (DHCP, DNS, portgroups, …) verbatim.

use std::net::{IpAddr, Ipv4Addr};

use uuid::Uuid;

use super::cursor::{Cursor, Extra, ReadContext};
use super::domain::parse_uuid;
use super::error::{ParseError, Reason};
use super::tree::{parse_document, Element};
use super::ParsedDocument;

/// A host network definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// The name domains refer to.
    pub name: String,
    /// The UUID, when the file has one.
    pub uuid: Option<Uuid>,
    /// How traffic leaves the network; `None` is an isolated network.
    pub forward: Option<Forward>,
    /// `<bridge name>`.
    pub bridge_name: Option<String>,
    /// Other `<bridge>` attributes (stp, delay, macTableManager, …), if `<bridge>` is present.
    pub bridge_extra: Option<Extra>,
    /// `<ip>` elements in document order.
    pub ips: Vec<IpDef>,
    /// Attributes and children not interpreted.
    pub extra: Extra,
}

/// `<forward>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The forward mode; `<forward/>` without one means NAT.
    pub mode: ForwardMode,
    /// The `dev` attribute.
    pub dev: Option<String>,
    /// `<interface dev>` children, in order.
    pub interfaces: Vec<ForwardInterface>,
    /// Attributes and children not interpreted (nat, pf, address, driver, …).
    pub extra: Extra,
}

/// A `<forward><interface dev=…/>` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardInterface {
    /// The host device.
    pub dev: String,
    /// Other attributes.
    pub extra: Extra,
}

/// libvirt's forward modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForwardMode {
    /// `nat`.
    Nat,
    /// `route`.
    Route,
    /// `open`.
    Open,
    /// `bridge`: a host bridge, or macvtap on a device when no bridge is named.
    Bridge,
    /// `private` (macvtap).
    Private,
    /// `vepa` (macvtap).
    Vepa,
    /// `passthrough` (macvtap).
    Passthrough,
    /// `hostdev` (SR-IOV PCI passthrough).
    Hostdev,
}

impl ForwardMode {
    /// Every mode with its XML name.
    pub const ALL: [(ForwardMode, &'static str); 8] = [
        (ForwardMode::Nat, "nat"),
        (ForwardMode::Route, "route"),
        (ForwardMode::Open, "open"),
        (ForwardMode::Bridge, "bridge"),
        (ForwardMode::Private, "private"),
        (ForwardMode::Vepa, "vepa"),
        (ForwardMode::Passthrough, "passthrough"),
        (ForwardMode::Hostdev, "hostdev"),
    ];

    /// The XML name.
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(m, _)| *m == self)
            .map_or("nat", |(_, s)| s)
    }

    /// Modes whose guests attach to a host device directly, so the network has no `<ip>`.
    pub fn is_device_attached(self) -> bool {
        matches!(
            self,
            ForwardMode::Bridge
                | ForwardMode::Private
                | ForwardMode::Vepa
                | ForwardMode::Passthrough
                | ForwardMode::Hostdev
        )
    }
}

/// An `<ip>` element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpDef {
    /// The host's address on this network.
    pub address: Option<IpAddr>,
    /// `prefix`.
    pub prefix: Option<u8>,
    /// `netmask`.
    pub netmask: Option<Ipv4Addr>,
    /// `family` (`ipv4` or `ipv6`).
    pub family: Option<String>,
    /// Attributes and children not interpreted (dhcp ranges, tftp, …).
    pub extra: Extra,
}

impl Network {
    /// Parses network XML from `text`; `source` names the file in errors.
    pub fn parse(source: &str, text: &str) -> Result<ParsedDocument<Network>, ParseError> {
        let root = parse_document(source, text)?;
        Self::from_element(source, &root)
    }

    /// Reads a network from an already parsed `<network>` element.
    pub fn from_element(
        source: &str,
        root: &Element,
    ) -> Result<ParsedDocument<Network>, ParseError> {
        let ctx = ReadContext::new(source);
        let model = read_network(Cursor::root(root, &ctx))?;
        Ok(ParsedDocument {
            model,
            uninterpreted: ctx.into_uninterpreted(),
        })
    }

    /// The forward mode, `None` for an isolated network.
    pub fn forward_mode(&self) -> Option<ForwardMode> {
        self.forward.as_ref().map(|f| f.mode)
    }

    /// The first forward device: the `dev` attribute, else the first `<interface dev>`.
    pub fn first_forward_dev(&self) -> Option<&str> {
        let f = self.forward.as_ref()?;
        f.dev
            .as_deref()
            .or_else(|| f.interfaces.first().map(|i| i.dev.as_str()))
    }

    /// Builds the `<network>` element.
    pub fn to_element(&self) -> Element {
        let mut el = Element::new("network").child(Element::new("name").text(self.name.as_str()));
        if let Some(u) = self.uuid {
            el = el.child(Element::new("uuid").text(u.hyphenated().to_string()));
        }
        if let Some(f) = &self.forward {
            let mut fe = Element::new("forward")
                .attr("mode", f.mode.as_str())
                .opt_attr("dev", f.dev.as_deref());
            for i in &f.interfaces {
                fe = fe.child(
                    i.extra
                        .apply(Element::new("interface").attr("dev", i.dev.as_str())),
                );
            }
            el = el.child(f.extra.apply(fe));
        }
        if let Some(extra) = &self.bridge_extra {
            el = el.child(
                extra.apply(Element::new("bridge").opt_attr("name", self.bridge_name.as_deref())),
            );
        }
        for ip in &self.ips {
            let e = Element::new("ip")
                .opt_attr("family", ip.family.as_deref())
                .opt_attr("address", ip.address.map(|a| a.to_string()))
                .opt_attr("prefix", ip.prefix.map(|p| p.to_string()))
                .opt_attr("netmask", ip.netmask.map(|m| m.to_string()));
            el = el.child(ip.extra.apply(e));
        }
        self.extra.apply(el)
    }

    /// Serialises as XML.
    pub fn to_xml(&self) -> String {
        self.to_element().to_xml_string()
    }
}

fn read_network(mut c: Cursor<'_>) -> Result<Network, ParseError> {
    if c.name() != "network" {
        return Err(c.error(Reason::WrongRoot {
            expected: "network",
            found: c.name().to_string(),
        }));
    }
    let name = match c.child("name") {
        Some(mut n) => {
            let v = n.text();
            if v.is_empty() {
                return Err(n.invalid("<name>", "", "a non-empty network name"));
            }
            let _ = n.finish();
            v
        }
        None => return Err(c.error(Reason::MissingElement("name"))),
    };
    let uuid = match c.child("uuid") {
        Some(mut u) => {
            let v = u.text();
            let parsed = parse_uuid(&v).ok_or_else(|| {
                u.error(Reason::Rule(format!(
                    "malformed uuid element '{v}': expected 32 hex digits, \
                     optionally grouped by dashes"
                )))
            })?;
            let _ = u.finish();
            Some(parsed)
        }
        None => None,
    };
    let forward = c
        .child("forward")
        .map(|f| read_forward(f, &name))
        .transpose()?;
    let (bridge_name, bridge_extra) = match c.child("bridge") {
        Some(mut b) => (b.attr_string("name"), Some(b.finish())),
        None => (None, None),
    };
    let mut ips = Vec::new();
    for ipc in c.children("ip") {
        ips.push(read_ip(ipc, &name)?);
    }
    let mut net = Network {
        name,
        uuid,
        forward,
        bridge_name,
        bridge_extra,
        ips,
        extra: Extra::default(),
    };
    if let Err(reason) = validate(&net) {
        let mut e = c.error(reason);
        if let Some(fw) = c.element().elements().find(|e| e.name == "forward") {
            e.pos = fw.pos;
            e.path = "/network/forward".into();
        }
        return Err(e);
    }
    net.extra = c.finish();
    Ok(net)
}

/// libvirt's cross-element rules for networks.
fn validate(net: &Network) -> Result<(), Reason> {
    let Some(f) = &net.forward else {
        return Ok(());
    };
    let mode = f.mode.as_str();
    if f.mode.is_device_attached() && !net.ips.is_empty() {
        return Err(Reason::Rule(format!(
            "Unsupported <ip> element in network {} with forward mode='{mode}'",
            net.name
        )));
    }
    if f.mode == ForwardMode::Bridge
        && net.bridge_name.is_some()
        && net.first_forward_dev().is_some()
    {
        return Err(Reason::Rule(format!(
            "A network with forward mode='bridge' can specify a bridge name or a forward dev, \
             but not both (network '{}')",
            net.name
        )));
    }
    Ok(())
}

fn read_forward(mut f: Cursor<'_>, net_name: &str) -> Result<Forward, ParseError> {
    let mode = match f.attr("mode") {
        None => ForwardMode::Nat,
        Some(m) => ForwardMode::ALL
            .iter()
            .find(|(_, s)| *s == m)
            .map(|(fm, _)| *fm)
            .ok_or_else(|| {
                f.invalid(
                    "attribute 'mode'",
                    m,
                    "one of nat, route, open, bridge, private, vepa, passthrough, hostdev",
                )
            })?,
    };
    let dev = f.attr_string("dev");
    if mode == ForwardMode::Open && dev.is_some() {
        return Err(f.error(Reason::Rule(format!(
            "forward dev not allowed for network '{net_name}' with forward mode='open'"
        ))));
    }
    let mut interfaces = Vec::new();
    for mut i in f.children("interface") {
        let d = i.required_attr("dev")?.to_string();
        interfaces.push(ForwardInterface {
            dev: d,
            extra: i.finish(),
        });
    }
    if let (Some(d), Some(first)) = (&dev, interfaces.first()) {
        if *d != first.dev {
            return Err(f.error(Reason::Rule(format!(
                "forward dev '{d}' must match first interface element dev '{}' in network '{net_name}'",
                first.dev
            ))));
        }
    }
    if mode != ForwardMode::Hostdev && f.element().elements().any(|e| e.name == "address") {
        return Err(f.error(Reason::Rule(format!(
            "network '{net_name}' with forward mode='{}' lists a PCI <address>; \
             only forward mode='hostdev' takes PCI addresses",
            mode.as_str()
        ))));
    }
    Ok(Forward {
        mode,
        dev,
        interfaces,
        extra: f.finish(),
    })
}

fn read_ip(mut c: Cursor<'_>, net_name: &str) -> Result<IpDef, ParseError> {
    let family = c
        .enum_attr("family", &["ipv4", "ipv6"])?
        .map(str::to_string);
    let address = c.parsed_attr::<IpAddr>("address", "an IPv4 or IPv6 address")?;
    let prefix = c.parsed_attr::<u8>("prefix", "a prefix length")?;
    let netmask = c.parsed_attr::<Ipv4Addr>("netmask", "an IPv4 netmask")?;
    if prefix.is_some() && netmask.is_some() {
        return Err(c.error(Reason::Rule(format!(
            "Network '{net_name}' IP address cannot have both a prefix and a netmask"
        ))));
    }
    if let (Some(addr), Some(fam)) = (address, family.as_deref()) {
        let ok = matches!(
            (addr, fam),
            (IpAddr::V4(_), "ipv4") | (IpAddr::V6(_), "ipv6")
        );
        if !ok {
            return Err(c.error(Reason::Rule(format!(
                "family '{fam}' specified for address {addr} of the other family \
                 in network '{net_name}'"
            ))));
        }
    }
    let max = match address {
        Some(IpAddr::V6(_)) => 128,
        _ => 32,
    };
    if let Some(p) = prefix.filter(|p| *p > max) {
        return Err(c.invalid("attribute 'prefix'", &p.to_string(), &format!("0 to {max}")));
    }
    Ok(IpDef {
        address,
        prefix,
        netmask,
        family,
        extra: c.finish(),
    })
}
