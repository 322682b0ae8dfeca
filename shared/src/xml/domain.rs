//! libvirt domain XML: the VM definition operators write and `virsh dumpxml` prints.
//!
//! The model types what Flotilla acts on (identity, sizing, boot, lifecycle and
//! the devices it turns into QEMU arguments) and keeps everything else verbatim
//! in [`Extra`], so a definition survives a round trip through Flotilla intact.

use uuid::Uuid;

use super::cursor::{Cursor, Extra, ReadContext};
use super::error::{InvalidValue, ParseError, Reason};
use super::graphics::{Graphics, GraphicsProtocol, ListenKind};
use super::tree::{parse_document, Element};
use super::units::parse_kib;
use super::{ParsedDocument, XmlFlavor};

/// A VM definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// Hypervisor type (`kvm`, `qemu`).
    pub domain_type: String,
    /// Unique name.
    pub name: String,
    /// Unique id; generated when the XML has none.
    pub uuid: Uuid,
    /// Short title.
    pub title: Option<String>,
    /// Free-form description.
    pub description: Option<String>,
    /// Maximum memory.
    pub memory: Memory,
    /// Memory at boot, if less than `memory`.
    pub current_memory: Option<Memory>,
    /// Virtual CPUs; libvirt's default is one.
    pub vcpu: Option<Vcpu>,
    /// Guest OS and boot configuration.
    pub os: Os,
    /// `<features>` children (acpi, apic, hyperv, …), kept as written.
    pub features: Option<Vec<Element>>,
    /// CPU model configuration.
    pub cpu: Option<Cpu>,
    /// Guest clock.
    pub clock: Option<Clock>,
    /// What to do when the guest powers off.
    pub on_poweroff: Option<String>,
    /// What to do when the guest reboots.
    pub on_reboot: Option<String>,
    /// What to do when the guest crashes.
    pub on_crash: Option<String>,
    /// Devices, in document order.
    pub devices: Vec<Device>,
    /// Attributes and children not interpreted.
    pub extra: Extra,
}

/// A memory size, stored in KiB as libvirt stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Memory {
    /// Size in KiB.
    pub kib: u64,
    /// Attributes other than `unit` (e.g. `dumpCore`).
    pub extra: Extra,
}

impl Memory {
    /// A size of `kib` KiB.
    pub fn kib(kib: u64) -> Self {
        Memory {
            kib,
            extra: Extra::default(),
        }
    }

    /// Size in MiB, rounded up, as QEMU's `-m` takes it.
    pub fn mib(&self) -> u64 {
        self.kib.div_ceil(1024)
    }
}

/// `<vcpu>`: count and placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vcpu {
    /// Maximum vCPUs.
    pub count: u32,
    /// vCPUs online at boot, if fewer.
    pub current: Option<u32>,
    /// Attributes other than `current` (placement, cpuset).
    pub extra: Extra,
}

/// `<os>`: guest type, architecture, machine and boot order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Os {
    /// `hvm` for full virtualisation.
    pub os_type: String,
    /// Guest architecture (`x86_64`).
    pub arch: Option<String>,
    /// Machine type (`pc`, `q35`, `pc-i440fx-…`).
    pub machine: Option<String>,
    /// Legacy boot order: `<boot dev=…>` in order.
    pub boot: Vec<BootDevice>,
    /// Children not interpreted (loader, nvram, bootmenu, …).
    pub extra: Extra,
}

/// A `<boot dev=…>` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootDevice {
    /// `hd`.
    Hd,
    /// `cdrom`.
    Cdrom,
    /// `network`.
    Network,
    /// `fd`.
    Fd,
}

impl BootDevice {
    const ALL: [(BootDevice, &'static str); 4] = [
        (BootDevice::Hd, "hd"),
        (BootDevice::Cdrom, "cdrom"),
        (BootDevice::Network, "network"),
        (BootDevice::Fd, "fd"),
    ];

    /// The XML name.
    pub fn as_str(self) -> &'static str {
        match self {
            BootDevice::Hd => "hd",
            BootDevice::Cdrom => "cdrom",
            BootDevice::Network => "network",
            BootDevice::Fd => "fd",
        }
    }
}

/// `<cpu>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpu {
    /// `custom`, `host-model`, `host-passthrough` or `maximum`.
    pub mode: Option<String>,
    /// Attributes and children not interpreted (model, topology, features).
    pub extra: Extra,
}

/// `<clock>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clock {
    /// `utc`, `localtime`, `timezone`, `variable` or `absolute`.
    pub offset: Option<String>,
    /// Attributes and children not interpreted (timers, …).
    pub extra: Extra,
}

/// One child of `<devices>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// `<emulator>`: path of the QEMU binary.
    Emulator(String),
    /// `<disk>`.
    Disk(Disk),
    /// `<interface>`.
    Interface(Interface),
    /// `<graphics type='vnc'|'spice'>`.
    Graphics(Graphics),
    /// `<video>`.
    Video(Video),
    /// `<serial>`.
    Serial(CharDevice),
    /// `<console>`.
    Console(CharDevice),
    /// Anything else (controllers, inputs, other graphics types, …), kept verbatim.
    Other(Element),
}

/// `<disk>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// `file`, `block`, `network`, `volume`, `dir`, …
    pub disk_type: Option<String>,
    /// `disk`, `cdrom`, `floppy` or `lun`.
    pub device: Option<String>,
    /// `<driver name type>`.
    pub driver_name: Option<String>,
    /// Image format (`raw`, `qcow2`).
    pub driver_type: Option<String>,
    /// Other `<driver>` attributes (cache, io, …).
    pub driver_extra: Extra,
    /// `<source file>` for file disks.
    pub source_file: Option<String>,
    /// `<source dev>` for block disks.
    pub source_dev: Option<String>,
    /// Other `<source>` attributes and children (network disks, …).
    pub source_extra: Option<Extra>,
    /// `<target dev>` (`vda`, `hda`, …).
    pub target_dev: Option<String>,
    /// `<target bus>` (`virtio`, `ide`, `sata`, `scsi`, …).
    pub target_bus: Option<String>,
    /// Other `<target>` attributes.
    pub target_extra: Extra,
    /// `<readonly/>` present.
    pub readonly: bool,
    /// `<shareable/>` present: several guests may write it at once, so it
    /// lives on storage they share (libvirt treats it as migration-safe).
    pub shareable: bool,
    /// Attributes and children not interpreted.
    pub extra: Extra,
}

impl Disk {
    /// The host path backing this disk, for file and block disks.
    pub fn source_path(&self) -> Option<&str> {
        self.source_file.as_deref().or(self.source_dev.as_deref())
    }
}

/// `<interface>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// `network`, `bridge`, `direct`, `user`, …
    pub if_type: String,
    /// `<mac address>`.
    pub mac: Option<String>,
    /// Other `<mac>` attributes.
    pub mac_extra: Extra,
    /// `<source network>` for `type='network'`.
    pub source_network: Option<String>,
    /// `<source bridge>` for `type='bridge'`.
    pub source_bridge: Option<String>,
    /// `<source dev>` for `type='direct'`.
    pub source_dev: Option<String>,
    /// `<source mode>` for `type='direct'` (`bridge`, `vepa`, …).
    pub source_mode: Option<String>,
    /// Other `<source>` attributes and children (portgroup, …).
    pub source_extra: Extra,
    /// `<model type>` (`virtio`, `e1000`, …).
    pub model: Option<String>,
    /// Other `<model>` attributes.
    pub model_extra: Extra,
    /// `<target dev>`: the host device (`vnet0`, `macvtap0`) of a running VM.
    pub target_dev: Option<String>,
    /// Attributes and children not interpreted.
    pub extra: Extra,
}

/// Host device names libvirt generates, dropped from inactive XML as libvirt
/// does (a name the operator chose is kept).
const GENERATED_NIC_PREFIXES: [&str; 3] = ["vnet", "macvtap", "macvlan"];

impl Interface {
    /// The guest MAC as bytes, when `<mac>` is set.
    pub fn mac_bytes(&self) -> Option<[u8; 6]> {
        self.mac.as_deref().and_then(parse_mac)
    }

    /// Forgets what a host decided for this interface: its device name and,
    /// for `type='network'`, the bridge or device the network resolved to.
    fn clear_runtime_state(&mut self) {
        if self
            .target_dev
            .as_deref()
            .is_some_and(|d| GENERATED_NIC_PREFIXES.iter().any(|p| d.starts_with(p)))
        {
            self.target_dev = None;
        }
        if self.if_type == "network" {
            self.source_bridge = None;
            self.source_dev = None;
            self.source_mode = None;
        }
    }
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    if !is_mac(s) {
        return None;
    }
    let mut out = [0u8; 6];
    for (o, part) in out.iter_mut().zip(s.split(':')) {
        *o = u8::from_str_radix(part, 16).ok()?;
    }
    Some(out)
}

/// Formats a MAC as libvirt does: lower-case, colon-separated.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `<video>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Video {
    /// `<model type>` (`vga`, `cirrus`, `qxl`, `virtio`, `none`, …).
    pub model: Option<String>,
    /// Other `<model>` attributes (vram, heads, primary, …).
    pub model_extra: Extra,
    /// Attributes and children not interpreted.
    pub extra: Extra,
}

/// `<serial>` or `<console>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharDevice {
    /// Backend type (`pty`, `file`, `tcp`, `unix`, …).
    pub char_type: String,
    /// `<target type>` (`isa-serial`, `serial`, `virtio`).
    pub target_type: Option<String>,
    /// `<target port>`.
    pub target_port: Option<u32>,
    /// Other `<target>` attributes and children.
    pub target_extra: Extra,
    /// Attributes and children not interpreted (source, protocol, log, …).
    pub extra: Extra,
}

const LIFECYCLE_ACTIONS: &[&str] = &[
    "destroy",
    "restart",
    "preserve",
    "rename-restart",
    "coredump-destroy",
    "coredump-restart",
];
const CPU_MODES: &[&str] = &["custom", "host-model", "host-passthrough", "maximum"];
const CLOCK_OFFSETS: &[&str] = &["utc", "localtime", "timezone", "variable", "absolute"];

/// Parses a libvirt-style UUID: 32 hex digits, dashes anywhere, as `virUUIDParse`.
pub fn parse_uuid(text: &str) -> Option<Uuid> {
    let mut hex = String::with_capacity(32);
    for ch in text.trim().chars() {
        match ch {
            '-' => {}
            c if c.is_ascii_hexdigit() => hex.push(c),
            _ => return None,
        }
    }
    if hex.len() != 32 {
        return None;
    }
    Uuid::parse_str(&hex).ok()
}

impl Domain {
    /// Parses domain XML from `text`; `source` names the file in errors.
    pub fn parse(source: &str, text: &str) -> Result<ParsedDocument<Domain>, ParseError> {
        let root = parse_document(source, text)?;
        Self::from_element(source, &root)
    }

    /// Reads a domain from an already parsed `<domain>` element.
    pub fn from_element(
        source: &str,
        root: &Element,
    ) -> Result<ParsedDocument<Domain>, ParseError> {
        let ctx = ReadContext::new(source);
        let domain = read_domain(Cursor::root(root, &ctx))?;
        Ok(ParsedDocument {
            model: domain,
            uninterpreted: ctx.into_uninterpreted(),
        })
    }

    /// Its definition asks for high availability
    /// (`<metadata><flotilla:ha restart='on'/>`, see [`super::metadata`]);
    /// parsing refused any other value than on or off.
    pub fn ha(&self) -> bool {
        super::metadata::ha(&self.extra).unwrap_or(false)
    }

    /// Turns high availability on or off in the definition's metadata.
    pub fn set_ha(&mut self, on: bool) {
        super::metadata::set_ha(&mut self.extra, on);
    }

    /// The coordinator starts it when the fleet comes up.
    pub fn autostart(&self) -> bool {
        super::metadata::autostart(&self.extra)
    }

    /// Turns autostart on or off in the definition's metadata.
    pub fn set_autostart(&mut self, on: bool) {
        super::metadata::set_autostart(&mut self.extra, on);
    }

    /// The VNC and SPICE graphics devices.
    pub fn graphics(&self) -> impl Iterator<Item = &Graphics> {
        self.devices.iter().filter_map(|d| match d {
            Device::Graphics(g) => Some(g),
            _ => None,
        })
    }

    /// Mutable VNC and SPICE graphics devices.
    pub fn graphics_mut(&mut self) -> impl Iterator<Item = &mut Graphics> {
        self.devices.iter_mut().filter_map(|d| match d {
            Device::Graphics(g) => Some(g),
            _ => None,
        })
    }

    /// The disks.
    pub fn disks(&self) -> impl Iterator<Item = &Disk> {
        self.devices.iter().filter_map(|d| match d {
            Device::Disk(x) => Some(x),
            _ => None,
        })
    }

    /// The network interfaces.
    pub fn interfaces(&self) -> impl Iterator<Item = &Interface> {
        self.devices.iter().filter_map(|d| match d {
            Device::Interface(x) => Some(x),
            _ => None,
        })
    }

    /// The emulator binary named in the definition.
    pub fn emulator(&self) -> Option<&str> {
        self.devices.iter().find_map(|d| match d {
            Device::Emulator(e) => Some(e.as_str()),
            _ => None,
        })
    }

    /// Every host network the VM needs: graphics listen networks, then interface networks.
    pub fn referenced_networks(&self) -> Vec<String> {
        let mut out = self.listen_networks();
        for n in self.interface_networks() {
            if !out.contains(&n) {
                out.push(n);
            }
        }
        out
    }

    /// Networks a console listens on: each host must resolve them to an address.
    pub fn listen_networks(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for g in self.graphics() {
            for l in &g.listens {
                if let ListenKind::Network { network, .. } = &l.kind {
                    if !out.contains(network) {
                        out.push(network.clone());
                    }
                }
            }
        }
        out
    }

    /// Networks `<interface type='network'>` names: each host must be able to
    /// attach a NIC there (a bridge or uplink), with or without an address.
    pub fn interface_networks(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for i in self.interfaces() {
            if let (true, Some(n)) = (i.if_type == "network", &i.source_network) {
                if !out.contains(n) {
                    out.push(n.clone());
                }
            }
        }
        out
    }

    /// Number of vCPUs QEMU starts with.
    pub fn vcpus(&self) -> u32 {
        self.vcpu.as_ref().map_or(1, |v| v.count)
    }

    /// A copy with every host-specific runtime value removed: what is stored
    /// as the definition and what a migration destination receives.
    pub fn without_runtime_state(&self) -> Domain {
        let mut d = self.clone();
        for g in d.graphics_mut() {
            if g.autoport {
                g.port = None;
                g.tls_port = None;
            }
            for l in &mut g.listens {
                match &mut l.kind {
                    ListenKind::Network { address, .. } => *address = None,
                    ListenKind::Address { address } if l.from_config => *address = None,
                    ListenKind::Socket { socket } if l.auto_generated => *socket = None,
                    _ => {}
                }
                l.from_config = false;
                l.auto_generated = false;
            }
        }
        for dev in &mut d.devices {
            if let Device::Interface(i) = dev {
                i.clear_runtime_state();
            }
        }
        d
    }

    /// Drops console passwords, as `virsh dumpxml` does without
    /// `--security-info`.
    pub fn hide_secrets(&mut self) {
        for g in self.graphics_mut() {
            g.passwd = None;
        }
    }

    /// Gives every interface without `<mac>` one, as libvirt does at define
    /// time, so the guest keeps its MAC across starts and migrations. The
    /// address is `52:54:00` plus bytes of the UUID, so the same definition
    /// always gets the same MACs; `taken` are MACs already in use elsewhere.
    pub fn assign_missing_macs(&mut self) {
        let b = *self.uuid.as_bytes();
        let mut used: Vec<[u8; 6]> = self.interfaces().filter_map(Interface::mac_bytes).collect();
        let mut n: u8 = 0;
        for dev in &mut self.devices {
            let Device::Interface(i) = dev else { continue };
            if i.mac.is_some() {
                continue;
            }
            let mac = loop {
                let candidate = [0x52, 0x54, 0x00, b[13], b[14], b[15].wrapping_add(n)];
                n = n.wrapping_add(1);
                if !used.contains(&candidate) {
                    break candidate;
                }
            };
            used.push(mac);
            i.mac = Some(format_mac(&mac));
        }
    }

    /// Builds the `<domain>` element for the given flavor.
    pub fn to_element(&self, flavor: XmlFlavor) -> Element {
        let mut el = Element::new("domain").attr("type", self.domain_type.as_str());
        el = el.child(Element::new("name").text(self.name.as_str()));
        el = el.child(Element::new("uuid").text(self.uuid.hyphenated().to_string()));
        if let Some(t) = &self.title {
            el = el.child(Element::new("title").text(t.as_str()));
        }
        if let Some(d) = &self.description {
            el = el.child(Element::new("description").text(d.as_str()));
        }
        el = el.child(memory_element("memory", &self.memory));
        if let Some(m) = &self.current_memory {
            el = el.child(memory_element("currentMemory", m));
        }
        if let Some(v) = &self.vcpu {
            let e = Element::new("vcpu").opt_attr("current", v.current.map(|c| c.to_string()));
            el = el.child(v.extra.apply(e).text(v.count.to_string()));
        }
        el = el.child(os_element(&self.os));
        if let Some(f) = &self.features {
            let mut fe = Element::new("features");
            for c in f {
                fe = fe.child(c.clone());
            }
            el = el.child(fe);
        }
        if let Some(c) = &self.cpu {
            el = el.child(
                c.extra
                    .apply(Element::new("cpu").opt_attr("mode", c.mode.as_deref())),
            );
        }
        if let Some(c) = &self.clock {
            el = el.child(
                c.extra
                    .apply(Element::new("clock").opt_attr("offset", c.offset.as_deref())),
            );
        }
        for (name, value) in [
            ("on_poweroff", &self.on_poweroff),
            ("on_reboot", &self.on_reboot),
            ("on_crash", &self.on_crash),
        ] {
            if let Some(v) = value {
                el = el.child(Element::new(name).text(v.as_str()));
            }
        }
        let mut devices = Element::new("devices");
        for d in &self.devices {
            devices = devices.child(device_element(d, flavor));
        }
        el = el.child(devices);
        self.extra.apply(el)
    }

    /// Serialises as the given flavor of XML.
    pub fn to_xml(&self, flavor: XmlFlavor) -> String {
        self.to_element(flavor).to_xml_string()
    }
}

fn memory_element(name: &str, m: &Memory) -> Element {
    m.extra
        .apply(Element::new(name).attr("unit", "KiB"))
        .text(m.kib.to_string())
}

fn os_element(os: &Os) -> Element {
    let ty = Element::new("type")
        .opt_attr("arch", os.arch.as_deref())
        .opt_attr("machine", os.machine.as_deref())
        .text(os.os_type.as_str());
    let mut el = Element::new("os").child(ty);
    for b in &os.boot {
        el = el.child(Element::new("boot").attr("dev", b.as_str()));
    }
    os.extra.apply(el)
}

fn device_element(d: &Device, flavor: XmlFlavor) -> Element {
    match d {
        Device::Emulator(path) => Element::new("emulator").text(path.as_str()),
        Device::Disk(disk) => {
            let mut el = Element::new("disk")
                .opt_attr("type", disk.disk_type.as_deref())
                .opt_attr("device", disk.device.as_deref());
            if disk.driver_name.is_some()
                || disk.driver_type.is_some()
                || !disk.driver_extra.is_empty()
            {
                el = el.child(
                    disk.driver_extra.apply(
                        Element::new("driver")
                            .opt_attr("name", disk.driver_name.as_deref())
                            .opt_attr("type", disk.driver_type.as_deref()),
                    ),
                );
            }
            if let Some(extra) = &disk.source_extra {
                el = el.child(
                    extra.apply(
                        Element::new("source")
                            .opt_attr("file", disk.source_file.as_deref())
                            .opt_attr("dev", disk.source_dev.as_deref()),
                    ),
                );
            }
            if disk.target_dev.is_some() || disk.target_bus.is_some() {
                el = el.child(
                    disk.target_extra.apply(
                        Element::new("target")
                            .opt_attr("dev", disk.target_dev.as_deref())
                            .opt_attr("bus", disk.target_bus.as_deref()),
                    ),
                );
            }
            if disk.readonly {
                el = el.child(Element::new("readonly"));
            }
            if disk.shareable {
                el = el.child(Element::new("shareable"));
            }
            disk.extra.apply(el)
        }
        Device::Interface(i) => {
            let mut inactive;
            let i = if flavor == XmlFlavor::Live {
                i
            } else {
                inactive = i.clone();
                inactive.clear_runtime_state();
                &inactive
            };
            let mut el = Element::new("interface").attr("type", i.if_type.as_str());
            if let Some(mac) = &i.mac {
                el = el.child(
                    i.mac_extra
                        .apply(Element::new("mac").attr("address", mac.as_str())),
                );
            }
            let has_source = i.source_network.is_some()
                || i.source_bridge.is_some()
                || i.source_dev.is_some()
                || i.source_mode.is_some()
                || !i.source_extra.is_empty();
            if has_source {
                el = el.child(
                    i.source_extra.apply(
                        Element::new("source")
                            .opt_attr("network", i.source_network.as_deref())
                            .opt_attr("bridge", i.source_bridge.as_deref())
                            .opt_attr("dev", i.source_dev.as_deref())
                            .opt_attr("mode", i.source_mode.as_deref()),
                    ),
                );
            }
            if let Some(dev) = &i.target_dev {
                el = el.child(Element::new("target").attr("dev", dev.as_str()));
            }
            if i.model.is_some() || !i.model_extra.is_empty() {
                el = el.child(
                    i.model_extra
                        .apply(Element::new("model").opt_attr("type", i.model.as_deref())),
                );
            }
            i.extra.apply(el)
        }
        Device::Graphics(g) => g.to_element(flavor),
        Device::Video(v) => {
            let mut el = Element::new("video");
            if v.model.is_some() || !v.model_extra.is_empty() {
                el = el.child(
                    v.model_extra
                        .apply(Element::new("model").opt_attr("type", v.model.as_deref())),
                );
            }
            v.extra.apply(el)
        }
        Device::Serial(c) => char_element("serial", c),
        Device::Console(c) => char_element("console", c),
        Device::Other(e) => e.clone(),
    }
}

fn char_element(name: &str, c: &CharDevice) -> Element {
    let mut el = Element::new(name).attr("type", c.char_type.as_str());
    if c.target_type.is_some() || c.target_port.is_some() || !c.target_extra.is_empty() {
        el = el.child(
            c.target_extra.apply(
                Element::new("target")
                    .opt_attr("type", c.target_type.as_deref())
                    .opt_attr("port", c.target_port.map(|p| p.to_string())),
            ),
        );
    }
    c.extra.apply(el)
}

fn read_domain(mut c: Cursor<'_>) -> Result<Domain, ParseError> {
    if c.name() != "domain" {
        return Err(c.error(Reason::WrongRoot {
            expected: "domain",
            found: c.name().to_string(),
        }));
    }
    let domain_type = c.required_attr("type")?.to_string();
    let name = match c.child("name") {
        Some(mut n) => {
            let v = n.text();
            if v.is_empty() {
                return Err(n.invalid("<name>", "", "a non-empty domain name"));
            }
            if v.contains('/') {
                return Err(n.invalid("<name>", &v, "a name without '/'"));
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
            parsed
        }
        None => Uuid::new_v4(),
    };
    let title = c.child_text("title");
    let description = c.child_text("description");
    let memory = match c.child("memory") {
        Some(m) => read_memory(m)?,
        None => return Err(c.error(Reason::MissingElement("memory"))),
    };
    let current_memory = c.child("currentMemory").map(read_memory).transpose()?;
    let vcpu = match c.child("vcpu") {
        Some(mut v) => {
            let current = v.parsed_attr::<u32>("current", "a vCPU count")?;
            let t = v.text();
            let count: u32 = t
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| v.invalid("<vcpu>", &t, "a positive vCPU count"))?;
            if current.is_some_and(|cur| cur > count) {
                return Err(v.error(Reason::Rule(format!(
                    "requested vcpu current of {} is greater than the maximum of {count}",
                    current.unwrap_or_default()
                ))));
            }
            Some(Vcpu {
                count,
                current,
                extra: v.finish(),
            })
        }
        None => None,
    };
    let os = match c.child("os") {
        Some(o) => read_os(o)?,
        None => return Err(c.error(Reason::MissingElement("os"))),
    };
    let features = c.child("features").map(|mut f| {
        let items = f
            .all_children()
            .iter()
            .map(|k| k.element().clone())
            .collect();
        let _ = f.finish();
        items
    });
    let cpu = match c.child("cpu") {
        Some(mut x) => Some(Cpu {
            mode: x.enum_attr("mode", CPU_MODES)?.map(str::to_string),
            extra: x.finish(),
        }),
        None => None,
    };
    let clock = match c.child("clock") {
        Some(mut x) => Some(Clock {
            offset: x.enum_attr("offset", CLOCK_OFFSETS)?.map(str::to_string),
            extra: x.finish(),
        }),
        None => None,
    };
    let mut lifecycle = |name: &str| -> Result<Option<String>, ParseError> {
        match c.child(name) {
            None => Ok(None),
            Some(mut x) => {
                let v = x.text();
                if !LIFECYCLE_ACTIONS.contains(&v.as_str()) {
                    return Err(x.invalid(
                        &format!("<{name}>"),
                        &v,
                        &format!("one of {}", LIFECYCLE_ACTIONS.join(", ")),
                    ));
                }
                let _ = x.finish();
                Ok(Some(v))
            }
        }
    };
    let on_poweroff = lifecycle("on_poweroff")?;
    let on_reboot = lifecycle("on_reboot")?;
    let on_crash = lifecycle("on_crash")?;
    let devices = match c.child("devices") {
        Some(mut d) => {
            let mut out = Vec::new();
            for dc in d.all_children() {
                out.push(read_device(dc)?);
            }
            let _ = d.finish();
            out
        }
        None => Vec::new(),
    };
    if let Some(m) = c.element().elements().find(|e| e.name == "metadata") {
        let extra = Extra {
            attrs: Vec::new(),
            children: vec![super::tree::Node::Element(m.clone())],
        };
        if let Err(bad) = super::metadata::ha(&extra) {
            return Err(c.invalid("<flotilla:ha restart>", &bad.value, "on or off"));
        }
    }
    Ok(Domain {
        domain_type,
        name,
        uuid,
        title,
        description,
        memory,
        current_memory,
        vcpu,
        os,
        features,
        cpu,
        clock,
        on_poweroff,
        on_reboot,
        on_crash,
        devices,
        extra: c.finish(),
    })
}

fn read_memory(mut m: Cursor<'_>) -> Result<Memory, ParseError> {
    let unit = m.attr("unit");
    let value = m.text();
    let kib = parse_kib(&value, unit).map_err(|e| {
        m.error(Reason::InvalidValue(Box::new(InvalidValue {
            what: format!("<{}>", m.name()),
            value: match unit {
                Some(u) => format!("{value} {u}"),
                None => value.clone(),
            },
            expected: format!(
                "a size with a libvirt unit (b, KB, KiB, MB, MiB, GB, GiB, TB, TiB, …): {e}"
            ),
        })))
    })?;
    Ok(Memory {
        kib,
        extra: m.finish(),
    })
}

fn read_os(mut o: Cursor<'_>) -> Result<Os, ParseError> {
    let Some(mut ty) = o.child("type") else {
        return Err(o.error(Reason::MissingElement("type")));
    };
    let arch = ty.attr_string("arch");
    let machine = ty.attr_string("machine");
    let os_type = ty.text();
    let _ = ty.finish();
    let mut boot = Vec::new();
    for mut b in o.children("boot") {
        let dev = b.required_attr("dev")?;
        let parsed = BootDevice::ALL
            .iter()
            .find(|(_, s)| *s == dev)
            .map(|(d, _)| *d)
            .ok_or_else(|| b.invalid("attribute 'dev'", dev, "one of hd, cdrom, network, fd"))?;
        boot.push(parsed);
        let _ = b.finish();
    }
    Ok(Os {
        os_type,
        arch,
        machine,
        boot,
        extra: o.finish(),
    })
}

fn read_device(mut c: Cursor<'_>) -> Result<Device, ParseError> {
    match c.name() {
        "emulator" => {
            let path = c.text();
            let _ = c.finish();
            Ok(Device::Emulator(path))
        }
        "disk" => read_disk(c).map(Device::Disk),
        "interface" => read_interface(c).map(Device::Interface),
        "graphics" => {
            // Only VNC and SPICE are typed; other displays pass through untouched.
            let el = c.element();
            match el.get_attr("type") {
                Some("vnc") => {
                    let _ = c.attr("type");
                    Graphics::read(c, GraphicsProtocol::Vnc).map(Device::Graphics)
                }
                Some("spice") => {
                    let _ = c.attr("type");
                    Graphics::read(c, GraphicsProtocol::Spice).map(Device::Graphics)
                }
                Some(_) => Ok(Device::Other(c.keep_verbatim())),
                None => Err(c.error(Reason::MissingAttribute("type"))),
            }
        }
        "video" => {
            let (model, model_extra) = match c.child("model") {
                Some(mut m) => (m.attr_string("type"), m.finish()),
                None => (None, Extra::default()),
            };
            Ok(Device::Video(Video {
                model,
                model_extra,
                extra: c.finish(),
            }))
        }
        "serial" => read_char(c).map(Device::Serial),
        "console" => read_char(c).map(Device::Console),
        _ => Ok(Device::Other(c.keep_verbatim())),
    }
}

fn read_disk(mut c: Cursor<'_>) -> Result<Disk, ParseError> {
    let disk_type = c.attr_string("type");
    let device = c.attr_string("device");
    let (driver_name, driver_type, driver_extra) = match c.child("driver") {
        Some(mut d) => (d.attr_string("name"), d.attr_string("type"), d.finish()),
        None => (None, None, Extra::default()),
    };
    let (source_file, source_dev, source_extra) = match c.child("source") {
        Some(mut s) => (
            s.attr_string("file"),
            s.attr_string("dev"),
            Some(s.finish()),
        ),
        None => (None, None, None),
    };
    let (target_dev, target_bus, target_extra) = match c.child("target") {
        Some(mut t) => (t.attr_string("dev"), t.attr_string("bus"), t.finish()),
        None => (None, None, Extra::default()),
    };
    let readonly = c.child("readonly").map(Cursor::finish).is_some();
    let shareable = c.child("shareable").map(Cursor::finish).is_some();
    Ok(Disk {
        disk_type,
        device,
        driver_name,
        driver_type,
        driver_extra,
        source_file,
        source_dev,
        source_extra,
        target_dev,
        target_bus,
        target_extra,
        readonly,
        shareable,
        extra: c.finish(),
    })
}

fn read_interface(mut c: Cursor<'_>) -> Result<Interface, ParseError> {
    let if_type = c.required_attr("type")?.to_string();
    let (mac, mac_extra) = match c.child("mac") {
        Some(mut m) => {
            let a = m.required_attr("address")?.to_string();
            if !is_mac(&a) {
                return Err(m.invalid(
                    "attribute 'address'",
                    &a,
                    "a MAC address like 52:54:00:12:34:56",
                ));
            }
            (Some(a), m.finish())
        }
        None => (None, Extra::default()),
    };
    let (source_network, source_bridge, source_dev, source_mode, source_extra) =
        match c.child("source") {
            Some(mut s) => (
                s.attr_string("network"),
                s.attr_string("bridge"),
                s.attr_string("dev"),
                s.attr_string("mode"),
                s.finish(),
            ),
            None => (None, None, None, None, Extra::default()),
        };
    if if_type == "network" && source_network.is_none() {
        return Err(c.error(Reason::Rule(
            "No <source> 'network' attribute specified with <interface type='network'/>".into(),
        )));
    }
    let (model, model_extra) = match c.child("model") {
        Some(mut m) => (m.attr_string("type"), m.finish()),
        None => (None, Extra::default()),
    };
    let target_dev = match c.child("target") {
        Some(mut t) => {
            let dev = t.attr_string("dev");
            t.finish();
            dev
        }
        None => None,
    };
    Ok(Interface {
        if_type,
        mac,
        mac_extra,
        source_network,
        source_bridge,
        source_dev,
        source_mode,
        source_extra,
        model,
        model_extra,
        target_dev,
        extra: c.finish(),
    })
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn read_char(mut c: Cursor<'_>) -> Result<CharDevice, ParseError> {
    let char_type = c.attr_string("type").unwrap_or_else(|| "pty".to_string());
    let (target_type, target_port, target_extra) = match c.child("target") {
        Some(mut t) => (
            t.attr_string("type"),
            t.parsed_attr::<u32>("port", "a port index")?,
            t.finish(),
        ),
        None => (None, None, Extra::default()),
    };
    Ok(CharDevice {
        char_type,
        target_type,
        target_port,
        target_extra,
        extra: c.finish(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "<domain type='kvm'>\n  <name>web01</name>\n  \
        <uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>\n  \
        <memory unit='MiB'>64</memory>\n  <vcpu current='1'>2</vcpu>\n  \
        <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>\n  \
        <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n    \
        <interface type='network'><source network='public'/><model type='virtio'/></interface>\n    \
        <graphics type='vnc'><listen type='network' network='public'/></graphics>\n    \
        <graphics type='spice'><listen type='network' network='mgmt'/></graphics>\n    \
        <controller type='usb'/>\n  </devices>\n</domain>\n";

    fn parse(text: &str) -> Result<ParsedDocument<Domain>, ParseError> {
        Domain::parse("web01.xml", text)
    }

    #[test]
    fn reads_identity_sizing_and_networks() {
        let doc = parse(MINIMAL).expect("valid");
        let d = &doc.model;
        assert_eq!(d.name, "web01");
        assert_eq!(d.memory.kib, 64 * 1024);
        assert_eq!(d.memory.mib(), 64);
        assert_eq!(d.vcpus(), 2);
        assert_eq!(d.os.boot, vec![BootDevice::Hd]);
        assert_eq!(d.referenced_networks(), vec!["public", "mgmt"]);
        assert_eq!(doc.uninterpreted, vec!["/domain/devices/controller"]);
    }

    #[test]
    fn missing_uuid_is_generated_and_kept() {
        let text = MINIMAL.replace("<uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>", "");
        let d = parse(&text).expect("valid").model;
        assert!(!d.uuid.is_nil());
        let again = parse(&d.to_xml(XmlFlavor::Inactive))
            .expect("reparse")
            .model;
        assert_eq!(again.uuid, d.uuid);
    }

    #[test]
    fn uuid_of_wrong_length_names_line_and_element() {
        let text = MINIMAL.replace("c7a5fdbd-edaf-9455-926a-d65c16db1809", "c7a5fdbd-edaf-9455");
        let e = parse(&text).expect_err("short uuid");
        assert_eq!((e.pos.line, e.pos.col), (3, 3));
        assert_eq!(e.path, "/domain/uuid");
        assert!(e.to_string().contains("malformed uuid element"), "{e}");
    }

    #[test]
    fn bad_memory_unit_names_line_and_unit() {
        let text = MINIMAL.replace("unit='MiB'", "unit='MiBs'");
        let e = parse(&text).expect_err("bad unit");
        assert_eq!(e.pos.line, 4);
        assert_eq!(e.path, "/domain/memory");
        assert!(e.to_string().contains("unknown suffix 'MiBs'"), "{e}");
    }

    #[test]
    fn lifecycle_and_required_elements() {
        let e = parse("<domain type='kvm'><name>x</name><os><type>hvm</type></os></domain>")
            .expect_err("no memory");
        assert_eq!(e.reason, Reason::MissingElement("memory"));
        let text = MINIMAL.replace("</os>", "</os><on_crash>explode</on_crash>");
        let e = parse(&text).expect_err("bad action");
        assert!(
            e.to_string().contains("invalid <on_crash> 'explode'"),
            "{e}"
        );
    }

    #[test]
    fn stripping_runtime_state_keeps_the_definition() {
        let mut d = parse(MINIMAL).expect("valid").model;
        let pristine = d.clone();
        for g in d.graphics_mut() {
            g.port = Some(5901);
            if let ListenKind::Network { address, .. } = &mut g.listens[0].kind {
                *address = Some("198.18.0.9".into());
            }
        }
        assert_ne!(d, pristine);
        assert_eq!(d.without_runtime_state(), pristine);
    }

    #[test]
    fn untyped_elements_survive_round_trip_in_place() {
        let text = MINIMAL.replace(
            "<controller type='usb'/>",
            "<controller type='usb' model='qemu-xhci'><address type='pci' slot='0x05'/></controller>\
             <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>",
        );
        let d = parse(&text).expect("valid").model;
        let xml = d.to_xml(XmlFlavor::Inactive);
        assert!(
            xml.contains("<backend model=\"random\">/dev/urandom</backend>"),
            "{xml}"
        );
        assert!(xml.contains("slot=\"0x05\""), "{xml}");
        assert_eq!(parse(&xml).expect("reparse").model, d);
    }
}
