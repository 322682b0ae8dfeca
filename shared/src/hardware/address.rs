//! What libvirt adds at define: implied controllers and device addresses.
//!
//! Works on the definition's element tree so every device kind, typed or not,
//! is handled alike, and is idempotent: a completed definition completes to
//! itself. Addresses the operator wrote are kept; two devices at one address
//! are refused.

use std::collections::BTreeSet;

use super::reader::Unsupported;
use super::{Chipset, Refused};
use crate::xml::tree::{Element, Node};
use crate::xml::{Domain, XmlFlavor};

/// A PCI address on one of the VM's PCI buses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PciAddr {
    /// Bus number (the index of the controller that provides it).
    pub bus: u64,
    /// Slot, 0–31.
    pub slot: u64,
    /// Function, 0–7.
    pub function: u64,
    /// `multifunction='on'`.
    pub multifunction: bool,
}

impl PciAddr {
    /// Reads `<address type='pci'>` of `el`; `Err` names a bad one.
    pub fn of(el: &Element) -> Result<Option<PciAddr>, String> {
        let Some(a) = el.elements().find(|e| e.name == "address") else {
            return Ok(None);
        };
        if a.get_attr("type") != Some("pci") {
            return Ok(None);
        }
        let num = |k: &str, max: u64| -> Result<u64, String> {
            let v = a.get_attr(k).unwrap_or("0");
            let n = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => v.parse().ok(),
            };
            n.filter(|n| *n <= max)
                .ok_or_else(|| format!("address {k} '{v}'"))
        };
        if num("domain", 0).is_err() {
            return Err("a PCI domain other than 0".into());
        }
        Ok(Some(PciAddr {
            bus: num("bus", 255)?,
            slot: num("slot", 31)?,
            function: num("function", 7)?,
            multifunction: a.get_attr("multifunction") == Some("on"),
        }))
    }

    fn element(self) -> Element {
        let mut e = Element::new("address")
            .attr("type", "pci")
            .attr("domain", "0x0000")
            .attr("bus", format!("0x{:02x}", self.bus))
            .attr("slot", format!("0x{:02x}", self.slot))
            .attr("function", format!("0x{:x}", self.function));
        if self.multifunction {
            e = e.attr("multifunction", "on");
        }
        e
    }

    /// QEMU's `addr` value: `0x3` or `0x2.0x1`.
    pub fn qemu_addr(self) -> String {
        if self.function == 0 {
            format!("{:#x}", self.slot)
        } else {
            format!("{:#x}.{:#x}", self.slot, self.function)
        }
    }
}

/// Whether a device sits on PCI, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PciNeed {
    /// A PCI Express endpoint: on q35 it gets a root port of its own.
    Express,
    /// A conventional PCI device: on q35 it sits on the root complex.
    Conventional,
    /// The primary display: slot 2 (i440fx) or 1 (q35) on the root bus.
    PrimaryVideo,
}

/// Adds the controllers the devices imply and an address to every device
/// without one, as libvirt does at define; refuses a machine type of
/// another family and addresses that collide.
pub fn complete(domain: &Domain) -> Result<Domain, Refused> {
    let Some(chipset) = Chipset::of(domain.os.machine.as_deref()) else {
        return Err(refused(
            "/domain/os/type",
            format!(
                "machine type '{}' (Flotilla builds pc and q35 machines)",
                domain.os.machine.as_deref().unwrap_or_default()
            ),
        ));
    };
    let mut root = domain.to_element(XmlFlavor::Inactive);
    let Some(devices) = root.children.iter_mut().find_map(|n| match n {
        Node::Element(e) if e.name == "devices" => Some(e),
        _ => None,
    }) else {
        return Ok(domain.clone());
    };
    add_implied_controllers(devices, chipset);
    assign_drive_addresses(devices);
    assign_port_addresses(devices);
    assign_pci_addresses(devices, chipset)?;
    // Only the devices change: they are read back, the rest stays as it was
    // (a model built in code may hold a name no document could).
    let devices = Element::new("domain")
        .attr("type", domain.domain_type.as_str())
        .child(Element::new("name").text("d"))
        .child(Element::new("memory").text("1"))
        .child(Element::new("os").child(Element::new("type").text("hvm")))
        .child(devices.clone());
    let read = Domain::from_element("(completed definition)", &devices)
        .map_err(|e| refused(&e.path, e.reason.to_string()))?;
    let mut out = domain.clone();
    out.devices = read.model.devices;
    Ok(out)
}

fn refused(path: &str, what: String) -> Refused {
    Refused(vec![Unsupported {
        path: path.to_string(),
        what,
    }])
}

fn elements_mut(devices: &mut Element) -> impl Iterator<Item = &mut Element> {
    devices.children.iter_mut().filter_map(|n| match n {
        Node::Element(e) => Some(e),
        Node::Text(_) => None,
    })
}

fn controllers(devices: &Element, kind: &str) -> Vec<(u64, Option<String>)> {
    devices
        .elements()
        .filter(|e| e.name == "controller" && e.get_attr("type") == Some(kind))
        .map(|e| {
            (
                e.get_attr("index")
                    .and_then(|i| i.parse().ok())
                    .unwrap_or(0),
                e.get_attr("model").map(str::to_string),
            )
        })
        .collect()
}

fn has_controller(devices: &Element, kind: &str, index: u64) -> bool {
    controllers(devices, kind).iter().any(|(i, _)| *i == index)
}

fn add_controller(devices: &mut Element, kind: &str, index: u64, model: Option<&str>) {
    let el = Element::new("controller")
        .attr("type", kind)
        .attr("index", index.to_string())
        .opt_attr("model", model);
    devices.children.push(Node::Element(el));
}

fn child<'a>(el: &'a Element, name: &str) -> Option<&'a Element> {
    el.elements().find(|e| e.name == name)
}

fn target_bus(el: &Element) -> Option<&str> {
    child(el, "target").and_then(|t| t.get_attr("bus"))
}

/// A disk's index from its target name: `vda`/`sda`/`hda` 0, `sdb` 1, `sdaa` 26.
fn disk_index(dev: &str) -> Option<u64> {
    let letters = dev.trim_start_matches(|c: char| c.is_ascii_lowercase() && c != 'd');
    let letters = letters.strip_prefix('d').unwrap_or(letters);
    if letters.is_empty() || !letters.chars().all(|c| c.is_ascii_lowercase()) {
        return None;
    }
    let mut n: u64 = 0;
    for c in letters.chars() {
        n = n
            .checked_mul(26)?
            .checked_add(u64::from(c as u8 - b'a') + 1)?;
    }
    Some(n - 1)
}

fn drive_address(el: &Element) -> Option<(u64, u64, u64, u64)> {
    let a = child(el, "address").filter(|a| a.get_attr("type") == Some("drive"))?;
    let n = |k| a.get_attr(k).and_then(|v| v.parse().ok()).unwrap_or(0);
    Some((n("controller"), n("bus"), n("target"), n("unit")))
}

fn add_implied_controllers(devices: &mut Element, chipset: Chipset) {
    let root_model = match chipset {
        Chipset::I440fx => "pci-root",
        Chipset::Q35 => "pcie-root",
    };
    if !has_controller(devices, "pci", 0) {
        add_controller(devices, "pci", 0, Some(root_model));
    }
    if !devices
        .elements()
        .any(|e| e.name == "controller" && e.get_attr("type") == Some("usb"))
    {
        let model = match chipset {
            Chipset::I440fx => "piix3-uhci",
            Chipset::Q35 => "qemu-xhci",
        };
        add_controller(devices, "usb", 0, Some(model));
    }
    match chipset {
        Chipset::I440fx if !has_controller(devices, "ide", 0) => {
            add_controller(devices, "ide", 0, None)
        }
        Chipset::Q35 if !has_controller(devices, "sata", 0) => {
            add_controller(devices, "sata", 0, None)
        }
        _ => {}
    }
    // Controllers a disk, channel or console names by index.
    let mut wanted: Vec<(&'static str, u64)> = Vec::new();
    for e in devices.elements() {
        match e.name.as_str() {
            "disk" => {
                let kind = match target_bus(e) {
                    Some("scsi") => "scsi",
                    Some("sata") => "sata",
                    Some("fdc") => "fdc",
                    Some("ide") => "ide",
                    _ => continue,
                };
                let controller = match (drive_address(e), kind) {
                    (Some((c, ..)), _) => c,
                    (None, "sata") => disk_target_index(e) / 6,
                    (None, "scsi") => disk_target_index(e) / 7,
                    (None, "ide") => disk_target_index(e) / 4,
                    _ => 0,
                };
                wanted.push((kind, controller));
            }
            "channel" | "console" => {
                let virtio = child(e, "target").and_then(|t| t.get_attr("type")) == Some("virtio");
                if virtio {
                    let controller = child(e, "address")
                        .filter(|a| a.get_attr("type") == Some("virtio-serial"))
                        .and_then(|a| a.get_attr("controller"))
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0);
                    wanted.push(("virtio-serial", controller));
                }
            }
            _ => {}
        }
    }
    for (kind, index) in wanted {
        if !has_controller(devices, kind, index) {
            // libvirt's default SCSI controller on x86 is the LSI one.
            let model = (kind == "scsi").then_some("lsilogic");
            add_controller(devices, kind, index, model);
        }
    }
}

fn disk_target_index(e: &Element) -> u64 {
    child(e, "target")
        .and_then(|t| t.get_attr("dev"))
        .and_then(disk_index)
        .unwrap_or(0)
}

fn set_address(el: &mut Element, address: Element) {
    el.children
        .retain(|n| !matches!(n, Node::Element(e) if e.name == "address"));
    el.children.push(Node::Element(address));
}

fn assign_drive_addresses(devices: &mut Element) {
    for e in elements_mut(devices) {
        if e.name != "disk" || child(e, "address").is_some() {
            continue;
        }
        let idx = disk_target_index(e);
        let (controller, bus, unit) = match target_bus(e) {
            Some("ide") => (idx / 4, (idx % 4) / 2, idx % 2),
            Some("sata") => (idx / 6, 0, idx % 6),
            Some("scsi") => (idx / 7, 0, idx % 7),
            Some("fdc") => (0, 0, idx),
            _ => continue,
        };
        let a = Element::new("address")
            .attr("type", "drive")
            .attr("controller", controller.to_string())
            .attr("bus", bus.to_string())
            .attr("target", "0")
            .attr("unit", unit.to_string());
        set_address(e, a);
    }
}

/// virtio-serial ports for channels and consoles, USB ports for USB devices.
fn assign_port_addresses(devices: &mut Element) {
    let mut serial_taken: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut usb_taken: BTreeSet<u64> = BTreeSet::new();
    for e in devices.elements() {
        if let Some(a) = child(e, "address") {
            let n = |k| {
                a.get_attr(k)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            match a.get_attr("type") {
                Some("virtio-serial") => {
                    serial_taken.insert((n("controller"), n("port")));
                }
                Some("usb") => {
                    usb_taken.insert(n("port"));
                }
                _ => {}
            }
        }
    }
    for e in elements_mut(devices) {
        if child(e, "address").is_some() {
            continue;
        }
        let target_type = child(e, "target").and_then(|t| t.get_attr("type"));
        let virtio_port = match (e.name.as_str(), target_type) {
            // Port 0 is the console's, as in libvirt.
            ("console", Some("virtio")) => Some(0),
            ("channel", Some("virtio")) => Some(1),
            _ => None,
        };
        if let Some(first) = virtio_port {
            let port = (first..)
                .find(|p| !serial_taken.contains(&(0, *p)))
                .unwrap_or(first);
            serial_taken.insert((0, port));
            set_address(
                e,
                Element::new("address")
                    .attr("type", "virtio-serial")
                    .attr("controller", "0")
                    .attr("bus", "0")
                    .attr("port", port.to_string()),
            );
            continue;
        }
        let usb = match e.name.as_str() {
            "input" => e.get_attr("bus") == Some("usb"),
            "disk" => target_bus(e) == Some("usb"),
            _ => false,
        };
        if usb {
            let port = (1..).find(|p| !usb_taken.contains(p)).unwrap_or(1);
            usb_taken.insert(port);
            set_address(
                e,
                Element::new("address")
                    .attr("type", "usb")
                    .attr("bus", "0")
                    .attr("port", port.to_string()),
            );
        }
    }
}

/// How a device sits on PCI, if it does.
fn pci_need(e: &Element, chipset: Chipset, first_video: bool) -> Option<PciNeed> {
    let model = || child(e, "model").and_then(|m| m.get_attr("type"));
    match e.name.as_str() {
        "interface" => match model().unwrap_or("virtio") {
            "virtio" | "e1000e" => Some(PciNeed::Express),
            _ => Some(PciNeed::Conventional),
        },
        "disk" => (target_bus(e).unwrap_or("virtio") == "virtio").then_some(PciNeed::Express),
        "controller" => match (e.get_attr("type"), e.get_attr("model")) {
            (Some("usb"), Some("none")) => None,
            // PIIX3's own UHCI, at 01.2 (only the first controller).
            (Some("usb"), Some("piix3-uhci") | None)
                if chipset == Chipset::I440fx && e.get_attr("index").unwrap_or("0") == "0" =>
            {
                None
            }
            (Some("usb"), Some("piix3-uhci")) => Some(PciNeed::Conventional),
            (Some("usb"), _) => Some(PciNeed::Express),
            (Some("virtio-serial"), _) => Some(PciNeed::Express),
            (Some("scsi"), Some("virtio-scsi")) => Some(PciNeed::Express),
            (Some("scsi"), _) => Some(PciNeed::Conventional),
            (Some("sata"), _)
                if chipset == Chipset::I440fx || e.get_attr("index").unwrap_or("0") != "0" =>
            {
                Some(PciNeed::Express)
            }
            (Some("pci"), Some("pci-bridge")) => Some(PciNeed::Conventional),
            (Some("pci"), Some("pcie-root-port")) => Some(PciNeed::Conventional),
            _ => None,
        },
        "video" => match model().unwrap_or("vga") {
            "none" | "ramfb" => None,
            _ if first_video => Some(PciNeed::PrimaryVideo),
            "virtio" => Some(PciNeed::Express),
            _ => Some(PciNeed::Conventional),
        },
        "memballoon" => (e.get_attr("model") == Some("virtio")).then_some(PciNeed::Express),
        "rng" => Some(PciNeed::Express),
        "watchdog" => (e.get_attr("model") == Some("i6300esb")).then_some(PciNeed::Conventional),
        "sound" => match e.get_attr("model") {
            Some("ich6" | "ich9" | "ac97" | "es1370") => Some(PciNeed::Conventional),
            _ => None,
        },
        "input" => (e.get_attr("bus") == Some("virtio")).then_some(PciNeed::Express),
        _ => None,
    }
}

/// libvirt's order of assignment, so the slots come out as libvirt's do.
fn order(e: &Element) -> u8 {
    match e.name.as_str() {
        "interface" => 0,
        "sound" => 1,
        "controller" => 2,
        "disk" => 3,
        "memballoon" => 4,
        "rng" => 5,
        "watchdog" => 6,
        "video" => 7,
        "input" => 8,
        _ => 9,
    }
}

fn assign_pci_addresses(devices: &mut Element, chipset: Chipset) -> Result<(), Refused> {
    // Slots already in use, by bus.
    let mut taken: BTreeSet<(u64, u64, u64)> = BTreeSet::new();
    match chipset {
        // PIIX3: ISA bridge, IDE, USB, power management.
        Chipset::I440fx => {
            for f in 0..8 {
                taken.insert((0, 1, f));
            }
        }
        // ICH9: LPC, SATA, SMBus.
        Chipset::Q35 => {
            for f in 0..8 {
                taken.insert((0, 0x1f, f));
            }
        }
    }
    taken.insert((0, 0, 0));
    let primary_slot = match chipset {
        Chipset::I440fx => 2,
        Chipset::Q35 => 1,
    };
    // libvirt marks the primary display on its `<model primary='yes'>`.
    let first_video = devices
        .elements()
        .position(|e| {
            e.name == "video"
                && child(e, "model").and_then(|m| m.get_attr("primary")) == Some("yes")
        })
        .or_else(|| devices.elements().position(|e| e.name == "video"));
    // Slots that hold root ports, which may take more of them.
    let mut port_slots: BTreeSet<u64> = BTreeSet::new();
    let mut explicit = BTreeSet::new();
    for e in devices.elements() {
        let path = format!("/domain/devices/{}", e.name);
        match PciAddr::of(e) {
            Err(what) => return Err(refused(&path, what)),
            Ok(Some(a)) => {
                if !explicit.insert((a.bus, a.slot, a.function)) {
                    return Err(refused(
                        &path,
                        format!(
                            "PCI address {:02x}:{:02x}.{} used by two devices",
                            a.bus, a.slot, a.function
                        ),
                    ));
                }
                taken.insert((a.bus, a.slot, a.function));
                // A slot takes more root ports only when it is multifunction.
                if e.get_attr("model") == Some("pcie-root-port")
                    && (a.function > 0 || a.multifunction)
                {
                    port_slots.insert(a.slot);
                }
            }
            Ok(None) => {}
        }
    }
    let mut next_index = controllers(devices, "pci")
        .iter()
        .map(|(i, _)| *i)
        .max()
        .unwrap_or(0)
        + 1;
    let mut pending: Vec<(usize, PciNeed)> = devices
        .elements()
        .enumerate()
        .filter(|(_, e)| child(e, "address").is_none())
        .filter_map(|(i, e)| pci_need(e, chipset, Some(i) == first_video).map(|n| (i, n)))
        .collect();
    pending.sort_by_key(|(i, _)| {
        let e = devices.elements().nth(*i);
        (e.map(order).unwrap_or(9), *i)
    });
    let primary_reserved = pending.iter().any(|(_, n)| *n == PciNeed::PrimaryVideo)
        && (0..8).all(|f| !taken.contains(&(0, primary_slot, f)));
    if primary_reserved {
        taken.insert((0, primary_slot, 0));
    }
    let free_slot = |taken: &BTreeSet<(u64, u64, u64)>, from: u64| {
        (from..32).find(|s| (0..8).all(|f| !taken.contains(&(0, *s, f))))
    };
    let mut assigned: Vec<(usize, PciAddr)> = Vec::new();
    let mut root_ports: Vec<(u64, PciAddr)> = Vec::new();
    for (i, need) in &pending {
        let addr = match (need, chipset) {
            (PciNeed::PrimaryVideo, _) if primary_reserved => PciAddr {
                bus: 0,
                slot: primary_slot,
                function: 0,
                multifunction: false,
            },
            (PciNeed::Express, Chipset::Q35) => {
                let port = next_root_port(&taken, &mut port_slots).ok_or_else(|| {
                    refused("/domain/devices", "more than 232 PCIe devices".into())
                })?;
                taken.insert((0, port.slot, port.function));
                let index = next_index;
                next_index += 1;
                root_ports.push((index, port));
                PciAddr {
                    bus: index,
                    slot: 0,
                    function: 0,
                    multifunction: false,
                }
            }
            _ => {
                let slot = free_slot(&taken, 2).ok_or_else(|| {
                    refused("/domain/devices", "more PCI devices than slots".into())
                })?;
                PciAddr {
                    bus: 0,
                    slot,
                    function: 0,
                    multifunction: false,
                }
            }
        };
        taken.insert((addr.bus, addr.slot, addr.function));
        assigned.push((*i, addr));
    }
    // One spare root port for hot-plug whenever ports were added, as libvirt does.
    if !root_ports.is_empty() {
        if let Some(port) = next_root_port(&taken, &mut port_slots) {
            taken.insert((0, port.slot, port.function));
            root_ports.push((next_index, port));
        }
    }
    for (idx, e) in elements_mut(devices).enumerate() {
        if let Some((_, a)) = assigned.iter().find(|(i, _)| *i == idx) {
            set_address(e, a.element());
        }
    }
    for (index, mut addr) in root_ports.clone() {
        addr.multifunction = addr.function == 0
            && root_ports
                .iter()
                .any(|(_, p)| p.slot == addr.slot && p.function > 0);
        let port = (addr.slot << 3) | addr.function;
        let el = Element::new("controller")
            .attr("type", "pci")
            .attr("index", index.to_string())
            .attr("model", "pcie-root-port")
            .child(
                Element::new("target")
                    .attr("chassis", index.to_string())
                    .attr("port", format!("{port:#x}")),
            )
            .child(addr.element());
        devices.children.push(Node::Element(el));
    }
    Ok(())
}

/// The next free root-port place: slot 2 functions 0–7, then slot 3, …; a
/// slot holding anything but root ports is not shared with them.
fn next_root_port(
    taken: &BTreeSet<(u64, u64, u64)>,
    port_slots: &mut BTreeSet<u64>,
) -> Option<PciAddr> {
    for slot in 2..0x1f {
        let used: Vec<u64> = (0..8).filter(|f| taken.contains(&(0, slot, *f))).collect();
        if !used.is_empty() && !port_slots.contains(&slot) {
            continue;
        }
        if let Some(function) = (0..8).find(|f| !used.contains(f)) {
            port_slots.insert(slot);
            return Some(PciAddr {
                bus: 0,
                slot,
                function,
                multifunction: false,
            });
        }
    }
    None
}
