//! Reading a completed definition into a [`Hardware`] plan, element by element.

use super::address::PciAddr;
use super::reader::R;
use super::{
    CharBackend, Chipset, CpuPlan, DiskBus, DiskHw, DiskKind, DiskSource, Firmware, Hardware, Hw,
    RngBackend, Slot, Smp,
};
use crate::xml::Domain;

#[cfg(test)]
mod tests {
    use super::parse_cpuset;

    #[test]
    fn cpusets_read_as_libvirt_writes_them() {
        assert_eq!(
            parse_cpuset("1-4,8-10,525"),
            Some(vec![1, 2, 3, 4, 8, 9, 10, 525])
        );
        assert_eq!(parse_cpuset("0-3,^2"), Some(vec![0, 1, 3]));
        assert_eq!(parse_cpuset("7"), Some(vec![7]));
        for bad in ["", "a", "4-1", "1-", "^1", "0-99999"] {
            assert_eq!(parse_cpuset(bad), None, "{bad}");
        }
    }
}

/// Reads `/domain`; `None` when something was refused (recorded in `r`).
pub(super) fn read_domain(r: &R<'_>, domain: &Domain) -> Option<Hardware> {
    r.data_attrs(&["type", "id"]);
    r.data_children(&[
        "name",
        "uuid",
        "title",
        "description",
        "metadata",
        "seclabel",
        "resource",
    ]);
    for m in r
        .children("memory")
        .into_iter()
        .chain(r.children("currentMemory"))
    {
        m.data_attrs(&["unit", "dumpCore"]);
        let _ = m.text();
        m.done();
    }
    let mut cpuset = None;
    if let Some(v) = r.child("vcpu") {
        v.data_attrs(&["current"]);
        let _ = v.one_of("placement", &["static"]);
        if let Some(set) = v.attr("cpuset") {
            match parse_cpuset(set) {
                Some(cpus) => cpuset = Some(cpus),
                None => v.refuse(format!("cpuset '{set}' (not a CPU list)")),
            }
        }
        let _ = v.text();
        v.done();
    }
    let chipset = Chipset::of(domain.os.machine.as_deref())?;
    let mut hw = Hardware {
        chipset,
        machine_opts: Vec::new(),
        cpu: CpuPlan::Default { hv: Vec::new() },
        smp: Smp {
            current: domain
                .vcpu
                .as_ref()
                .and_then(|v| v.current)
                .unwrap_or(domain.vcpus()),
            max: domain.vcpus(),
            sockets: 1,
            dies: 1,
            cores: domain.vcpus(),
            threads: 1,
        },
        firmware: Firmware::Bios,
        hugepages: false,
        cpuset,
        rtc: "base=utc".into(),
        globals: Vec::new(),
        no_reboot: false,
        boot_menu: None,
        devices: Vec::new(),
        audio: Vec::new(),
        dbus_display: false,
        spice_opts: Vec::new(),
    };
    if let Some(os) = r.child("os") {
        read_os(&os, &mut hw);
        os.done();
    }
    let mut hv_flags = Vec::new();
    match r.child("features") {
        Some(f) => {
            read_features(&f, &mut hw, &mut hv_flags);
            f.done();
        }
        // libvirt turns ACPI off when the definition does not ask for it.
        None => hw.machine_opts.push("acpi=off".into()),
    }
    let cpu = r.child("cpu");
    hw.cpu = read_cpu(cpu.as_ref(), &mut hw.smp, hv_flags);
    if let Some(c) = cpu {
        c.done();
    }
    if let Some(c) = r.child("clock") {
        read_clock(&c, &mut hw);
        c.done();
    }
    for (name, allowed) in [
        ("on_poweroff", &["destroy"][..]),
        ("on_reboot", &["restart", "destroy"][..]),
        // Without a panic device QEMU never reports a crash, as in libvirt.
        (
            "on_crash",
            &[
                "destroy",
                "restart",
                "preserve",
                "rename-restart",
                "coredump-destroy",
                "coredump-restart",
            ][..],
        ),
    ] {
        if let Some(e) = r.child(name) {
            let v = e.text();
            if !allowed.contains(&v.as_str()) {
                e.refuse(format!("{name} action '{v}'"));
            }
            if name == "on_reboot" && v == "destroy" {
                hw.no_reboot = true;
            }
            e.done();
        }
    }
    if let Some(pm) = r.child("pm") {
        for (child, global) in [
            ("suspend-to-mem", "disable_s3"),
            ("suspend-to-disk", "disable_s4"),
        ] {
            if let Some(s) = pm.child(child) {
                if let Some(on) = s.flag("enabled") {
                    hw.globals.push(format!(
                        "{}.{global}={}",
                        chipset.pm_device(),
                        if on { 0 } else { 1 }
                    ));
                }
                s.done();
            }
        }
        pm.done();
    }
    if let Some(mb) = r.child("memoryBacking") {
        if let Some(h) = mb.child("hugepages") {
            hw.hugepages = true;
            h.done();
        }
        mb.done();
    }
    if let Some(d) = r.child("devices") {
        read_devices(&d, &mut hw);
        d.done();
    }
    if hw.audio.is_empty() {
        hw.audio.push((1, "none".into()));
    }
    Some(hw)
}

fn read_os(os: &R<'_>, hw: &mut Hardware) {
    if let Some(t) = os.child("type") {
        let _ = t.one_of("arch", &["x86_64", "i686"]);
        t.data_attrs(&["machine"]);
        if t.text() != "hvm" {
            t.refuse(format!("os type '{}'", t.text()));
        }
        t.done();
    }
    for b in os.children("boot") {
        b.data_attrs(&["dev"]);
        b.done();
    }
    if let Some(m) = os.child("bootmenu") {
        let enable = m.flag("enable").unwrap_or(false);
        hw.boot_menu = Some((enable, m.num("timeout")));
        m.done();
    }
    let efi_attr = os.one_of("firmware", &["efi", "bios"]) == Some("efi");
    let loader = os.child("loader").map(|l| {
        let _ = l.one_of("readonly", &["yes"]);
        let _ = l.one_of("type", &["pflash"]);
        let _ = l.one_of("secure", &["no"]);
        let path = l.text();
        l.done();
        path
    });
    let nvram = os.child("nvram").map(|n| {
        let template = n.attr("template").map(str::to_string);
        let path = Some(n.text()).filter(|p| !p.is_empty());
        n.done();
        (path, template)
    });
    if let Some(f) = os.child("firmware") {
        for feat in f.children("feature") {
            let name = feat.one_of("name", &["secure-boot", "enrolled-keys"]);
            if feat.flag("enabled") == Some(true) && name.is_some() {
                feat.refuse(format!("firmware feature '{}'", name.unwrap_or_default()));
            }
            feat.done();
        }
        f.done();
    }
    if efi_attr || loader.is_some() {
        let (nvram, template) = nvram.unwrap_or((None, None));
        hw.firmware = Firmware::Efi {
            loader: loader.filter(|l| !l.is_empty()),
            nvram,
            template,
        };
    }
}

fn read_features(f: &R<'_>, hw: &mut Hardware, hv_flags: &mut Vec<String>) {
    match f.child("acpi") {
        Some(a) => {
            hw.machine_opts.push("acpi=on".into());
            a.done();
        }
        None => hw.machine_opts.push("acpi=off".into()),
    }
    for simple in ["apic", "pae"] {
        if let Some(a) = f.child(simple) {
            a.data_attrs(&["eoi"]);
            a.done();
        }
    }
    for (name, opt) in [("vmport", "vmport"), ("smm", "smm")] {
        if let Some(v) = f.child(name) {
            let on = v.flag("state").unwrap_or(true);
            hw.machine_opts
                .push(format!("{opt}={}", if on { "on" } else { "off" }));
            v.done();
        }
    }
    if let Some(h) = f.child("hyperv") {
        let _ = h.one_of("mode", &["custom"]);
        for name in [
            "relaxed",
            "vapic",
            "spinlocks",
            "vpindex",
            "runtime",
            "synic",
            "stimer",
            "reset",
            "frequencies",
            "reenlightenment",
            "tlbflush",
            "ipi",
            "evmcs",
            "avic",
            "emsr_bitmap",
            "xmm_input",
            "vendor_id",
        ] {
            if let Some(e) = h.child(name) {
                let on = e.flag("state").unwrap_or(false);
                let qemu = name.replace('_', "-");
                if on {
                    match name {
                        "spinlocks" => {
                            let retries = e.num("retries").unwrap_or(4095);
                            hv_flags.push(format!("hv-spinlocks={retries:#x}"));
                        }
                        "vendor_id" => {
                            let v = e.attr("value").unwrap_or_default();
                            hv_flags.push(format!("hv-vendor-id={v}"));
                        }
                        _ => hv_flags.push(format!("hv-{qemu}=on")),
                    }
                } else {
                    e.data_attrs(&["retries", "value"]);
                }
                e.done();
            }
        }
        h.done();
    }
}

fn read_cpu(cpu: Option<&R<'_>>, smp: &mut Smp, mut flags: Vec<String>) -> CpuPlan {
    let Some(c) = cpu else {
        return CpuPlan::Default { hv: flags };
    };
    let mode = c
        .one_of(
            "mode",
            &["custom", "host-model", "host-passthrough", "maximum"],
        )
        .unwrap_or("custom");
    let _ = c.one_of("match", &["exact", "minimum", "strict"]);
    let _ = c.one_of("check", &["none", "partial", "full"]);
    let _ = c.flag("migratable");
    let model = c.child("model").map(|m| {
        let _ = m.one_of("fallback", &["allow", "forbid"]);
        let name = m.text();
        m.done();
        name
    });
    if let Some(t) = c.child("topology") {
        let n = |k: &str| t.num(k).and_then(|v| u32::try_from(v).ok());
        let sockets = n("sockets").unwrap_or(1);
        let dies = n("dies").unwrap_or(1);
        let cores = n("cores").unwrap_or(1);
        let threads = n("threads").unwrap_or(1);
        let _ = t.one_of("clusters", &["1"]);
        let total = [sockets, dies, cores, threads]
            .into_iter()
            .try_fold(1u32, u32::checked_mul);
        if total != Some(smp.max) {
            t.refuse(format!(
                "a topology of {} vCPUs for {} vCPUs",
                total.map_or_else(|| "too many".to_string(), |t| t.to_string()),
                smp.max
            ));
        }
        *smp = Smp {
            sockets,
            dies,
            cores,
            threads,
            ..*smp
        };
        t.done();
    }
    for f in c.children("feature") {
        let name = f.attr("name").unwrap_or_default().to_string();
        match f.one_of(
            "policy",
            &["require", "force", "optional", "disable", "forbid"],
        ) {
            Some("require" | "force" | "optional") | None => flags.push(format!("+{name}")),
            Some(_) => flags.push(format!("-{name}")),
        }
        f.done();
    }
    match (mode, model) {
        ("host-passthrough", _) => CpuPlan::HostPassthrough { flags },
        ("host-model", _) => CpuPlan::HostModel { flags },
        ("maximum", _) => CpuPlan::Maximum { flags },
        (_, Some(model)) if !model.is_empty() => CpuPlan::Named { model, flags },
        _ => CpuPlan::Default { hv: flags },
    }
}

fn read_clock(c: &R<'_>, hw: &mut Hardware) {
    let offset = c.one_of("offset", &["utc", "localtime"]).unwrap_or("utc");
    hw.rtc = format!("base={offset}");
    for t in c.children("timer") {
        let name = t.one_of("name", &["rtc", "pit", "hpet", "kvmclock"]);
        let present = t.flag("present");
        let policy = t.attr("tickpolicy");
        match (name, policy) {
            (Some("rtc"), Some("catchup")) => hw.rtc.push_str(",driftfix=slew"),
            (Some("rtc"), Some("delay")) | (Some("rtc"), None) => {}
            (Some("pit"), Some(p @ ("delay" | "discard"))) => {
                hw.globals.push(format!("kvm-pit.lost_tick_policy={p}"));
            }
            (Some("pit"), None) => {}
            (Some(n), Some(p)) => t.refuse(format!("timer {n} tickpolicy '{p}'")),
            _ => {}
        }
        match (name, present) {
            (Some("hpet"), Some(on)) => hw
                .machine_opts
                .push(format!("hpet={}", if on { "on" } else { "off" })),
            (Some("kvmclock"), Some(false)) => t.refuse("kvmclock present='no'"),
            (Some(n @ ("rtc" | "pit")), Some(false)) => {
                t.refuse(format!("timer {n} present='no'"));
            }
            _ => {}
        }
        t.done();
    }
}

/// The device's PCI address; another kind of address is refused.
/// libvirt's CPU list syntax: `1-4,8-20,^3,525`; `None` when malformed.
pub(super) fn parse_cpuset(text: &str) -> Option<Vec<u32>> {
    let mut on = std::collections::BTreeSet::new();
    let mut off = std::collections::BTreeSet::new();
    for part in text.split(',').map(str::trim) {
        let (set, range) = match part.strip_prefix('^') {
            Some(r) => (&mut off, r),
            None => (&mut on, part),
        };
        match range.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b || b - a > 4096 {
                    return None;
                }
                set.extend(a..=b);
            }
            None => {
                set.insert(range.parse().ok()?);
            }
        }
    }
    let cpus: Vec<u32> = on.difference(&off).copied().collect();
    (!cpus.is_empty()).then_some(cpus)
}

fn pci(r: &R<'_>) -> Slot {
    let a = r.child("address")?;
    if a.attr("type") != Some("pci") {
        a.refuse(format!("a non-PCI address on a {} device", r.name()));
        a.take_all();
        return None;
    }
    a.data_attrs(&["domain", "bus", "slot", "function", "multifunction"]);
    let addr = match PciAddr::of(r.element()) {
        Ok(addr) => addr,
        Err(what) => {
            a.refuse(what);
            None
        }
    };
    a.done();
    addr
}

/// Takes `<alias>`, `<address>` of the given type, and returns nothing else.
fn take_address(r: &R<'_>, kind: &str) -> Option<Vec<(String, u64)>> {
    let a = r.child("address")?;
    if a.attr("type") != Some(kind) {
        a.refuse(format!("address type for a {} device", r.name()));
        return None;
    }
    let mut out = Vec::new();
    for k in [
        "controller",
        "bus",
        "target",
        "unit",
        "port",
        "domain",
        "slot",
        "function",
    ] {
        if let Some(v) = a.num(k) {
            out.push((k.to_string(), v));
        }
    }
    a.done();
    Some(out)
}

fn get(addr: &Option<Vec<(String, u64)>>, key: &str) -> u64 {
    addr.as_ref()
        .and_then(|v| v.iter().find(|(k, _)| k == key).map(|(_, v)| *v))
        .unwrap_or(0)
}

#[derive(Default)]
struct Counters {
    disk: usize,
    nic: usize,
    serial: usize,
    console: usize,
    channel: usize,
    input: usize,
    video: usize,
    rng: usize,
    sound: usize,
    scsi_virtio: Vec<u64>,
}

fn read_devices(d: &R<'_>, hw: &mut Hardware) {
    let mut n = Counters::default();
    // Which SCSI controllers are virtio (LUN addressing differs).
    for c in d.element().elements().filter(|e| e.name == "controller") {
        if c.get_attr("type") == Some("scsi") && c.get_attr("model") == Some("virtio-scsi") {
            n.scsi_virtio.push(
                c.get_attr("index")
                    .and_then(|i| i.parse().ok())
                    .unwrap_or(0),
            );
        }
    }
    let mut controllers = Vec::new();
    let mut others = Vec::new();
    let mut has_serial = false;
    for name in [
        "emulator",
        "controller",
        "disk",
        "interface",
        "serial",
        "console",
        "channel",
        "input",
        "graphics",
        "video",
        "audio",
        "sound",
        "watchdog",
        "memballoon",
        "rng",
    ] {
        for e in d.children(name) {
            match name {
                "emulator" => {
                    let _ = e.text();
                }
                "controller" => {
                    if let Some(c) = read_controller(&e, hw.chipset) {
                        controllers.push(c);
                    }
                }
                "disk" => {
                    if let Some(x) = read_disk(&e, n.disk, &n.scsi_virtio) {
                        others.push((0, Hw::Disk(Box::new(x))));
                    }
                    n.disk += 1;
                }
                "interface" => {
                    others.push((1, read_interface(&e, n.nic)));
                    n.nic += 1;
                }
                "serial" => {
                    if let Some(x) = read_serial(&e, n.serial) {
                        others.push((2, x));
                        has_serial = true;
                    }
                    n.serial += 1;
                }
                "console" => {
                    let target = e.child("target");
                    let ty = target
                        .as_ref()
                        .and_then(|t| t.one_of("type", &["serial", "virtio"]))
                        .unwrap_or("serial");
                    if let Some(t) = target {
                        t.data_attrs(&["port"]);
                        t.done();
                    }
                    if ty == "virtio" {
                        let at = take_address(&e, "virtio-serial");
                        if let Some(chardev) = read_chardev(&e) {
                            others.push((
                                3,
                                Hw::VirtioConsole {
                                    n: n.console,
                                    chardev,
                                    at: (get(&at, "controller"), get(&at, "port")),
                                },
                            ));
                        }
                    } else if has_serial || n.serial > 0 {
                        // libvirt's console on a serial target is serial0 again.
                        e.take_all();
                        continue;
                    } else if let Some(chardev) = read_chardev(&e) {
                        others.push((
                            2,
                            Hw::Serial {
                                n: n.serial,
                                chardev,
                                driver: "isa-serial",
                                port: 0,
                                log: None,
                            },
                        ));
                        n.serial += 1;
                        has_serial = true;
                    }
                    n.console += 1;
                }
                "channel" => {
                    if let Some(x) = read_channel(&e, n.channel) {
                        others.push((3, x));
                    }
                    n.channel += 1;
                }
                "input" => {
                    if let Some(x) = read_input(&e, n.input) {
                        others.push((4, x));
                    }
                    n.input += 1;
                }
                "graphics" => read_graphics(&e, hw),
                "video" => {
                    if let Some(x) = read_video(&e, n.video) {
                        others.push((6, x));
                    }
                    n.video += 1;
                }
                "audio" => {
                    let id = e.num("id").unwrap_or(1) as u32;
                    let ty = e.one_of("type", &["none", "dbus"]).unwrap_or("none");
                    for dir in ["input", "output"] {
                        if let Some(x) = e.child(dir) {
                            let _ = x.flag("mixingEngine");
                            x.done();
                        }
                    }
                    hw.audio.push((id, ty.to_string()));
                }
                "sound" => {
                    if let Some(x) = read_sound(&e, n.sound) {
                        others.push((7, x));
                    }
                    n.sound += 1;
                }
                "watchdog" => {
                    let model = e.one_of("model", &["i6300esb", "ib700", "itco"]);
                    let action = match e.attr("action").unwrap_or("reset") {
                        "reset" => "reset",
                        "shutdown" => "shutdown",
                        "poweroff" => "poweroff",
                        "pause" => "pause",
                        "none" => "none",
                        "inject-nmi" => "inject-nmi",
                        other => {
                            e.refuse(format!("watchdog action '{other}'"));
                            "reset"
                        }
                    };
                    let addr = pci(&e);
                    let driver = match model {
                        Some("i6300esb") => Some("i6300esb"),
                        Some("ib700") => Some("ib700"),
                        // ICH9's own TCO watchdog: q35 only.
                        Some("itco") if hw.chipset == Chipset::I440fx => {
                            e.refuse("watchdog model 'itco' on an i440fx machine");
                            None
                        }
                        _ => None,
                    };
                    if model.is_some() {
                        others.push((
                            8,
                            Hw::Watchdog {
                                driver,
                                action,
                                addr,
                            },
                        ));
                    }
                }
                "memballoon" => {
                    let model = e.one_of("model", &["virtio", "none"]);
                    if e.flag("autodeflate") == Some(true) {
                        e.refuse("balloon autodeflate");
                    }
                    let period = e.child("stats").and_then(|s| {
                        let p = s.num("period");
                        s.done();
                        p
                    });
                    let addr = pci(&e);
                    if model == Some("virtio") {
                        match addr {
                            Some(addr) => others.push((9, Hw::Balloon { addr, period })),
                            None => e.refuse("a balloon without a PCI address"),
                        }
                    }
                }
                "rng" => {
                    if let Some(x) = read_rng(&e, n.rng) {
                        others.push((10, x));
                    }
                    n.rng += 1;
                }
                _ => {}
            }
            e.data_children(&["alias"]);
            e.done();
        }
    }
    // Buses before the devices on them: controllers by index, root ports first.
    controllers.sort_by_key(|c| match c {
        Hw::RootPort { index, .. } | Hw::PciBridge { index, .. } => (0, *index),
        _ => (1, 0),
    });
    others.sort_by_key(|(k, _)| *k);
    hw.devices = controllers;
    hw.devices.extend(others.into_iter().map(|(_, h)| h));
}

fn read_controller(e: &R<'_>, chipset: Chipset) -> Option<Hw> {
    let kind = e.attr("type").unwrap_or_default();
    let index = e.num("index").unwrap_or(0) as u32;
    let model = e.attr("model");
    let addr = pci(e);
    if let Some(m) = e.child("model") {
        m.data_attrs(&["name"]);
        m.done();
    }
    let need = |addr: Slot| {
        if addr.is_none() {
            e.refuse("a controller without a PCI address");
        }
        addr
    };
    match (kind, model) {
        ("pci", Some("pci-root")) if chipset == Chipset::I440fx && index == 0 => None,
        ("pci", Some("pcie-root")) if chipset == Chipset::Q35 && index == 0 => None,
        ("pci", Some("pcie-root-port")) => {
            let t = e.child("target");
            let chassis = t
                .as_ref()
                .and_then(|t| t.num("chassis"))
                .unwrap_or(index.into()) as u32;
            let port = t.as_ref().and_then(|t| t.num("port")).unwrap_or(0) as u32;
            if let Some(t) = t {
                t.data_attrs(&["busNr"]);
                t.done();
            }
            Some(Hw::RootPort {
                index,
                chassis,
                port,
                addr: need(addr)?,
            })
        }
        ("pci", Some("pci-bridge")) => {
            let t = e.child("target");
            let chassis = t
                .as_ref()
                .and_then(|t| t.num("chassisNr"))
                .unwrap_or(index.into()) as u32;
            if let Some(t) = t {
                t.done();
            }
            Some(Hw::PciBridge {
                index,
                chassis,
                addr: need(addr)?,
            })
        }
        ("usb", Some("none")) => None,
        ("usb", m) => {
            let ports = e.num("ports");
            let builtin = chipset == Chipset::I440fx && index == 0;
            let driver = match (m, chipset) {
                (Some("qemu-xhci"), _) => "qemu-xhci",
                (Some("nec-xhci"), _) => "nec-usb-xhci",
                (Some("piix3-uhci") | None, Chipset::I440fx) => "piix3-usb-uhci",
                (Some("piix3-uhci"), Chipset::Q35) => "piix3-usb-uhci",
                (None, Chipset::Q35) => "qemu-xhci",
                (Some(other), _) => {
                    e.refuse(format!("USB controller model '{other}'"));
                    return None;
                }
            };
            let addr = match (driver, addr) {
                ("piix3-usb-uhci", None) if builtin => PciAddr {
                    bus: 0,
                    slot: 1,
                    function: 2,
                    multifunction: false,
                },
                (_, a) => need(a)?,
            };
            Some(Hw::Usb {
                driver,
                index,
                ports,
                addr,
            })
        }
        ("virtio-serial", None) => {
            let ports = e.num("ports");
            if let Some(v) = e.attr("vectors") {
                e.refuse(format!("virtio-serial vectors='{v}'"));
            }
            Some(Hw::VirtioSerial {
                index,
                ports,
                addr: need(addr)?,
            })
        }
        ("scsi", m) => {
            let driver = match m {
                Some("virtio-scsi") => "virtio-scsi-pci",
                Some("lsilogic") | None => "lsi",
                Some(other) => {
                    e.refuse(format!("SCSI controller model '{other}'"));
                    return None;
                }
            };
            Some(Hw::Scsi {
                driver,
                index,
                addr: need(addr)?,
            })
        }
        ("sata", None) if index == 0 && chipset == Chipset::Q35 => None,
        ("sata", None) => Some(Hw::Ahci {
            index,
            addr: need(addr)?,
        }),
        ("ide", None) if index == 0 && chipset == Chipset::I440fx => None,
        ("fdc", None) if index == 0 && chipset == Chipset::I440fx => None,
        (k, m) => {
            e.refuse(format!(
                "controller type '{k}'{} index {index} on this machine type",
                m.map(|m| format!(" model '{m}'")).unwrap_or_default()
            ));
            None
        }
    }
}

fn read_disk(e: &R<'_>, n: usize, scsi_virtio: &[u64]) -> Option<DiskHw> {
    let ty = e
        .one_of("type", &["file", "block", "network"])
        .unwrap_or("file");
    let kind = match e
        .one_of("device", &["disk", "cdrom", "floppy"])
        .unwrap_or("disk")
    {
        "cdrom" => DiskKind::Cdrom,
        "floppy" => DiskKind::Floppy,
        _ => DiskKind::Disk,
    };
    let mut format = "raw".to_string();
    let (mut cache, mut io, mut discard, mut detect_zeroes) = (None, None, None, None);
    if let Some(dr) = e.child("driver") {
        let _ = dr.one_of("name", &["qemu"]);
        format = dr
            .one_of("type", &["raw", "qcow2"])
            .unwrap_or("raw")
            .to_string();
        cache = dr
            .one_of(
                "cache",
                &[
                    "default",
                    "none",
                    "writethrough",
                    "writeback",
                    "directsync",
                    "unsafe",
                ],
            )
            .filter(|c| *c != "default")
            .map(str::to_string);
        io = dr
            .one_of("io", &["native", "threads", "io_uring"])
            .map(str::to_string);
        discard = dr
            .one_of("discard", &["unmap", "ignore"])
            .map(str::to_string);
        detect_zeroes = dr
            .one_of("detect_zeroes", &["on", "off", "unmap"])
            .map(str::to_string);
        let _ = dr.flag("event_idx");
        dr.done();
    }
    let source = match (ty, e.child("source")) {
        (_, None) => DiskSource::Empty,
        ("file", Some(s)) => {
            let f = s.attr("file").map(str::to_string);
            s.done();
            f.map_or(DiskSource::Empty, DiskSource::File)
        }
        ("block", Some(s)) => {
            let f = s.attr("dev").map(str::to_string);
            s.done();
            f.map_or(DiskSource::Empty, DiskSource::Block)
        }
        (_, Some(s)) => {
            let protocol = s.one_of("protocol", &["nbd"]);
            let export = s.attr("name").map(str::to_string);
            let host = s.children("host");
            let src = match (protocol, host.first()) {
                (Some("nbd"), Some(h)) if host.len() == 1 => {
                    let _ = h.one_of("transport", &["tcp"]);
                    DiskSource::Nbd {
                        host: h.attr("name").unwrap_or("localhost").to_string(),
                        port: h.attr("port").unwrap_or("10809").to_string(),
                        export,
                    }
                }
                _ => {
                    s.refuse("a network disk other than NBD over TCP with one host");
                    DiskSource::Empty
                }
            };
            for h in host {
                h.done();
            }
            s.done();
            src
        }
    };
    let target = e.child("target");
    let dev = target
        .as_ref()
        .and_then(|t| t.attr("dev"))
        .unwrap_or_default()
        .to_string();
    let bus_name = target
        .as_ref()
        .and_then(|t| t.one_of("bus", &["virtio", "sata", "scsi", "ide", "fdc", "usb"]))
        .unwrap_or(match kind {
            DiskKind::Floppy => "fdc",
            _ => "virtio",
        });
    if let Some(t) = target {
        if t.one_of("tray", &["closed", "open"]) == Some("open") {
            t.refuse("an open tray");
        }
        let _ = t.one_of("removable", &["off"]);
        t.done();
    }
    let readonly = e.child("readonly").map(|x| x.done()).is_some();
    let shareable = e.child("shareable").map(|x| x.done()).is_some();
    let serial = e.child("serial").map(|x| {
        let s = x.text();
        x.done();
        s
    });
    let wwn = e.child("wwn").map(|x| {
        let s = x.text();
        if !matches!(bus_name, "scsi" | "ide" | "sata") {
            x.refuse(format!("a WWN on bus '{bus_name}'"));
        }
        x.done();
        s
    });
    let boot = e.child("boot").and_then(|b| {
        let o = b.num("order");
        b.done();
        o
    });
    let bus = match bus_name {
        "virtio" => DiskBus::Virtio(pci(e)),
        "usb" => {
            let a = take_address(e, "usb");
            DiskBus::Usb {
                port: a.map(|a| get(&Some(a), "port").to_string()),
            }
        }
        other => {
            let a = take_address(e, "drive");
            let (controller, bus, target, unit) = (
                get(&a, "controller"),
                get(&a, "bus"),
                get(&a, "target"),
                get(&a, "unit"),
            );
            match other {
                "sata" => DiskBus::Sata { controller, unit },
                "scsi" => DiskBus::Scsi {
                    controller,
                    bus,
                    target,
                    unit,
                    virtio: scsi_virtio.contains(&controller),
                },
                "ide" => DiskBus::Ide { bus, unit },
                _ => DiskBus::Fdc { unit },
            }
        }
    };
    match (&bus, kind) {
        (DiskBus::Virtio(_), DiskKind::Cdrom | DiskKind::Floppy)
        | (DiskBus::Fdc { .. }, DiskKind::Disk | DiskKind::Cdrom) => {
            e.refuse(format!("a {kind:?} on bus '{bus_name}'").to_lowercase());
            return None;
        }
        _ => {}
    }
    if matches!(source, DiskSource::Empty) && kind == DiskKind::Disk {
        e.refuse("a disk without a source");
        return None;
    }
    Some(DiskHw {
        n,
        target: dev,
        kind,
        source,
        format,
        cache,
        io,
        discard,
        detect_zeroes,
        readonly: readonly || kind == DiskKind::Cdrom,
        shareable,
        serial,
        boot,
        wwn,
        bus,
    })
}

fn read_interface(e: &R<'_>, n: usize) -> Hw {
    match e.attr("type").unwrap_or_default() {
        "network" | "bridge" | "direct" | "user" => {}
        other => e.refuse(format!("interface type '{other}'")),
    }
    if let Some(m) = e.child("mac") {
        m.data_attrs(&["address"]);
        m.done();
    }
    if let Some(s) = e.child("source") {
        s.data_attrs(&["network", "bridge", "dev", "mode", "portid"]);
        s.done();
    }
    if let Some(m) = e.child("model") {
        let _ = m.one_of("type", &["virtio", "e1000", "e1000e", "rtl8139"]);
        m.done();
    }
    if let Some(t) = e.child("target") {
        t.data_attrs(&["dev"]);
        let _ = t.one_of("managed", &["yes", "no"]);
        t.done();
    }
    if let Some(l) = e.child("link") {
        let _ = l.one_of("state", &["up"]);
        l.done();
    }
    let mtu = e.child("mtu").and_then(|m| {
        let s = m.num("size");
        m.done();
        s
    });
    let boot = e.child("boot").and_then(|b| {
        let o = b.num("order");
        b.done();
        o
    });
    let sndbuf = e.child("tune").and_then(|t| {
        let b = t.child("sndbuf").and_then(|b| {
            let v = b.text().parse().ok();
            if v.is_none() {
                b.refuse(format!("sndbuf '{}' (not a size in bytes)", b.text()));
            }
            b.done();
            v
        });
        t.done();
        b
    });
    Hw::Nic {
        n,
        addr: pci(e),
        boot,
        mtu,
        sndbuf,
    }
}

fn read_chardev(e: &R<'_>) -> Option<CharBackend> {
    let ty = e.attr("type").unwrap_or("pty");
    let sources = e.children("source");
    let src = sources.first();
    let take = |k: &str| src.and_then(|s| s.attr(k)).map(str::to_string);
    let backend = match ty {
        "pty" => {
            let _ = take("path");
            Some(CharBackend::Pty)
        }
        "null" => Some(CharBackend::Null),
        "file" => match take("path") {
            Some(path) => Some(CharBackend::File {
                path,
                append: src.and_then(|s| s.flag("append")),
            }),
            None => {
                e.refuse("a file character device without a path");
                None
            }
        },
        "unix" => {
            let mode = src.and_then(|s| s.one_of("mode", &["bind", "connect"]));
            let path = take("path").unwrap_or_default();
            Some(CharBackend::Unix {
                path,
                server: mode != Some("connect"),
            })
        }
        "tcp" => {
            let mode = src.and_then(|s| s.one_of("mode", &["bind", "connect"]));
            let telnet = e
                .child("protocol")
                .map(|p| {
                    let t = p.one_of("type", &["raw", "telnet"]) == Some("telnet");
                    p.done();
                    t
                })
                .unwrap_or(false);
            Some(CharBackend::Tcp {
                host: take("host").unwrap_or_else(|| "127.0.0.1".into()),
                port: take("service").unwrap_or_default(),
                server: mode == Some("bind"),
                telnet,
            })
        }
        "spicevmc" => Some(CharBackend::SpiceVmc),
        other => {
            e.refuse(format!("character device type '{other}'"));
            None
        }
    };
    for s in sources {
        s.done();
    }
    backend
}

fn read_serial(e: &R<'_>, n: usize) -> Option<Hw> {
    let target = e.child("target");
    let ty = target
        .as_ref()
        .and_then(|t| t.one_of("type", &["isa-serial", "usb-serial", "pci-serial"]))
        .unwrap_or("isa-serial");
    let port = target
        .as_ref()
        .and_then(|t| t.num("port"))
        .unwrap_or(n as u64);
    if let Some(t) = target {
        if let Some(m) = t.child("model") {
            let _ = m.one_of("name", &["isa-serial", "usb-serial", "pci-serial"]);
            m.done();
        }
        t.done();
    }
    let driver = match ty {
        "usb-serial" => "usb-serial",
        "pci-serial" => "pci-serial",
        _ => "isa-serial",
    };
    if driver != "isa-serial" {
        e.refuse(format!("serial target type '{ty}'"));
        return None;
    }
    if let Some(a) = e.child("address") {
        a.refuse("an address on an ISA serial port");
        a.take_all();
    }
    let log = e.child("log").and_then(|l| {
        let file = l.attr("file").map(|f| (f.to_string(), l.flag("append")));
        l.done();
        file
    });
    let chardev = read_chardev(e)?;
    Some(Hw::Serial {
        n,
        chardev,
        driver,
        port,
        log,
    })
}

fn read_channel(e: &R<'_>, n: usize) -> Option<Hw> {
    let target = e.child("target");
    let name = target.as_ref().and_then(|t| {
        let _ = t.one_of("type", &["virtio"]);
        t.data_attrs(&["state"]);
        t.attr("name").map(str::to_string)
    });
    if let Some(t) = target {
        t.done();
    }
    let at = take_address(e, "virtio-serial");
    let chardev = read_chardev(e)?;
    let name = name
        .or_else(|| (chardev == CharBackend::SpiceVmc).then(|| "com.redhat.spice.0".to_string()));
    Some(Hw::Channel {
        n,
        chardev: match chardev {
            CharBackend::Unix { path, server } if path.is_empty() => CharBackend::Unix {
                path: name.clone().unwrap_or_else(|| format!("channel{n}")),
                server,
            },
            other => other,
        },
        name,
        at: (get(&at, "controller"), get(&at, "port")),
    })
}

fn read_input(e: &R<'_>, n: usize) -> Option<Hw> {
    let ty = e.one_of("type", &["tablet", "mouse", "keyboard"])?;
    let bus = e.one_of("bus", &["ps2", "usb", "virtio"]).unwrap_or("ps2");
    match (ty, bus) {
        // The i8042 is built in: nothing to add.
        ("mouse" | "keyboard", "ps2") => {
            if let Some(a) = e.child("address") {
                a.take_all();
            }
            None
        }
        ("tablet", "ps2") => {
            e.refuse("a ps2 tablet");
            None
        }
        (_, "usb") => {
            let a = take_address(e, "usb");
            Some(Hw::Input {
                n,
                driver: match ty {
                    "tablet" => "usb-tablet",
                    "mouse" => "usb-mouse",
                    _ => "usb-kbd",
                },
                usb_port: a.map(|a| get(&Some(a), "port").to_string()),
                addr: None,
            })
        }
        _ => Some(Hw::Input {
            n,
            driver: match ty {
                "tablet" => "virtio-tablet-pci",
                "mouse" => "virtio-mouse-pci",
                _ => "virtio-keyboard-pci",
            },
            usb_port: None,
            addr: pci(e),
        }),
    }
}

fn read_graphics(e: &R<'_>, hw: &mut Hardware) {
    match e.attr("type") {
        // The typed graphics model reads these strictly already.
        Some("vnc") => e.take_all(),
        Some("spice") => {
            let mut opts = Vec::new();
            e.data_attrs(&[
                "port",
                "tlsPort",
                "autoport",
                "listen",
                "passwd",
                "keymap",
                "passwdValidTo",
                "connected",
            ]);
            // The certificates are the host's (`--spice-tls-dir`).
            match e.one_of("defaultMode", &["any", "secure", "insecure"]) {
                Some("secure") => opts.push("tls-channel=default".into()),
                Some("insecure") => opts.push("plaintext-channel=default".into()),
                _ => {}
            }
            e.data_children(&["listen"]);
            for (child, attr, opt) in [
                ("image", "compression", "image-compression"),
                ("jpeg", "compression", "jpeg-wan-compression"),
                ("zlib", "compression", "zlib-glz-wan-compression"),
                ("playback", "compression", "playback-compression"),
                ("streaming", "mode", "streaming-video"),
            ] {
                if let Some(c) = e.child(child) {
                    if let Some(v) = c.attr(attr) {
                        opts.push(format!("{opt}={v}"));
                    }
                    c.done();
                }
            }
            if let Some(c) = e.child("clipboard") {
                if c.flag("copypaste") == Some(false) {
                    opts.push("disable-copy-paste=on".into());
                }
                c.done();
            }
            if let Some(c) = e.child("filetransfer") {
                if c.flag("enable") == Some(false) {
                    opts.push("disable-agent-file-xfer=on".into());
                }
                c.done();
            }
            if let Some(c) = e.child("mouse") {
                match c.one_of("mode", &["client", "server"]) {
                    Some("client") => opts.push("agent-mouse=on".into()),
                    Some(_) => opts.push("agent-mouse=off".into()),
                    None => {}
                }
                c.done();
            }
            for c in e.children("channel") {
                let name = c.attr("name").unwrap_or_default().to_string();
                match c.one_of("mode", &["secure", "insecure", "any"]) {
                    Some("secure") => opts.push(format!("tls-channel={name}")),
                    Some("insecure") => opts.push(format!("plaintext-channel={name}")),
                    _ => {}
                }
                c.done();
            }
            hw.spice_opts.push(opts);
        }
        Some("dbus") => {
            let _ = e.one_of("p2p", &["yes"]);
            if let Some(a) = e.child("audio") {
                let _ = a.num("id");
                a.done();
            }
            hw.dbus_display = true;
        }
        Some(other) => e.refuse(format!("graphics type '{other}'")),
        None => {}
    }
}

fn read_video(e: &R<'_>, n: usize) -> Option<Hw> {
    let m = e.child("model");
    let model = m.as_ref().and_then(|m| m.attr("type")).unwrap_or("vga");
    let num = |k: &str| m.as_ref().and_then(|m| m.num(k));
    let (heads, ram, vram, vgamem) = (num("heads"), num("ram"), num("vram"), num("vgamem"));
    let _ = m.as_ref().map(|m| {
        let _ = m.flag("primary");
        m.data_attrs(&["vram64"]);
    });
    if let Some(m) = m {
        if let Some(a) = m.child("acceleration") {
            a.refuse("video acceleration");
            a.take_all();
        }
        m.done();
    }
    let driver = match (model, n) {
        ("vga", _) => "VGA",
        ("cirrus", _) => "cirrus-vga",
        ("qxl", 0) => "qxl-vga",
        ("qxl", _) => "qxl",
        ("virtio", 0) => "virtio-vga",
        ("virtio", _) => "virtio-gpu-pci",
        ("bochs", _) => "bochs-display",
        ("ramfb", _) => "ramfb",
        ("none", _) => return None,
        (other, _) => {
            e.refuse(format!("video model '{other}'"));
            return None;
        }
    };
    let addr = pci(e);
    if driver != "ramfb" && addr.is_none() {
        e.refuse("a video device without a PCI address");
    }
    Some(Hw::Video {
        n,
        driver,
        heads: heads.filter(|_| matches!(model, "qxl" | "virtio")),
        ram: ram.filter(|_| model == "qxl"),
        vram: vram.filter(|_| matches!(model, "qxl" | "vga" | "cirrus" | "bochs")),
        vgamem: vgamem.filter(|_| model == "qxl"),
        addr,
    })
}

fn read_sound(e: &R<'_>, n: usize) -> Option<Hw> {
    let (driver, hda) = match e.one_of("model", &["ich6", "ich9", "ac97", "es1370"])? {
        "ich6" => ("intel-hda", true),
        "ich9" => ("ich9-intel-hda", true),
        "ac97" => ("AC97", false),
        _ => ("ES1370", false),
    };
    let audio = e
        .child("audio")
        .and_then(|a| {
            let id = a.num("id");
            a.done();
            id
        })
        .unwrap_or(1) as u32;
    for c in e.children("codec") {
        let _ = c.one_of("type", &["duplex"]);
        c.done();
    }
    Some(Hw::Sound {
        n,
        driver,
        hda,
        addr: pci(e),
        audio,
    })
}

fn read_rng(e: &R<'_>, n: usize) -> Option<Hw> {
    let _ = e.one_of("model", &["virtio"]);
    let rate = e.child("rate").map(|r| {
        let v = (r.num("bytes").unwrap_or(0), r.num("period").unwrap_or(1000));
        r.done();
        v
    });
    let b = e.child("backend")?;
    let backend = match b.one_of("model", &["random", "egd", "builtin"]) {
        Some("random") => {
            let path = b.text();
            RngBackend::Random(if path.is_empty() {
                "/dev/urandom".into()
            } else {
                path
            })
        }
        Some("egd") => RngBackend::Egd(read_chardev(&b)?),
        _ => RngBackend::Builtin,
    };
    b.data_children(&["protocol"]);
    b.done();
    let addr = pci(e);
    let Some(addr) = addr else {
        e.refuse("an RNG without a PCI address");
        return None;
    };
    Some(Hw::Rng {
        n,
        backend,
        rate,
        addr,
    })
}
