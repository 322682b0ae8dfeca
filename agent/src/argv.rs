//! `QemuArgv`: the QEMU command line for a VM, built from its live definition.
//!
//! Pure. The input is the live domain (console addresses and ports already
//! planned by [`crate::console`]) plus host facts; the output is an argv in
//! libvirt's shapes (`-vnc ADDR:DISPLAY,…`, `-spice port=P,addr=A,…`). QEMU
//! starts paused (`-S`) with a QMP socket in the VM's state directory, so the
//! agent can set console passwords over QMP before the guest runs: secrets
//! never appear in argv, which any local user can read in /proc.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use flotilla_shared::xml::domain::{format_mac, BootDevice, CharDevice, Disk};
use flotilla_shared::xml::{Device, Domain, Graphics, GraphicsProtocol, ListenKind};

use crate::nic_plan::{NicBackend, NicPlan};

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// The `-accel` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Host facts the command line depends on.
#[derive(Debug, Clone)]
pub struct QemuHost {
    /// The QEMU binary. A host fact, so it wins over the definition's `<emulator>`.
    pub emulator: PathBuf,
    /// KVM when /dev/kvm works, else TCG.
    pub accel: Accel,
}

/// Files a VM's QEMU uses, all inside its state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    /// The VM's state directory.
    pub dir: PathBuf,
}

impl VmPaths {
    /// Paths for a VM whose state lives in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        VmPaths { dir: dir.into() }
    }

    /// The QMP monitor socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// QEMU's pidfile.
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }

    /// QEMU's stderr log.
    pub fn log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }

    /// The live XML of the running VM.
    pub fn live_xml(&self) -> PathBuf {
        self.dir.join("live.xml")
    }
}

/// A complete QEMU invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuArgv {
    /// The binary.
    pub program: PathBuf,
    /// Arguments, without the program.
    pub args: Vec<String>,
}

/// Why a definition cannot become a QEMU command line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgvError {
    /// A device or setting Flotilla does not drive yet.
    #[error("VM '{vm}': {what} is not supported by Flotilla yet")]
    Unsupported {
        /// The VM.
        vm: String,
        /// What, e.g. "disk bus 'sata'".
        what: String,
    },
    /// An interface was not planned by [`crate::nic_plan::plan_nics`] first.
    #[error("VM '{vm}': interface {index} has no plan")]
    UnplannedNic {
        /// The VM.
        vm: String,
        /// NIC position.
        index: usize,
    },
    /// A console was not planned before building argv.
    #[error("VM '{vm}': {protocol} console has no planned address or port")]
    Unplanned {
        /// The VM.
        vm: String,
        /// vnc or spice.
        protocol: &'static str,
    },
}

/// The node a disk's device, NBD export and mirror name: the format node,
/// or the storage node itself for raw images (as libvirt skips a raw
/// format layer that does nothing).
pub fn disk_top_node(n: usize, format: &str) -> String {
    match format {
        "raw" => format!("flotilla-disk{n}-storage"),
        _ => format!("flotilla-disk{n}-format"),
    }
}

/// Each disk with a source, by target (`vda`), with its top node: the same
/// numbering [`QemuArgv::build`] gives the `-blockdev`s.
pub fn disk_top_nodes(domain: &Domain) -> Vec<(String, String)> {
    domain
        .devices
        .iter()
        .filter_map(|d| match d {
            Device::Disk(d) => Some(d),
            _ => None,
        })
        .enumerate()
        .filter(|(_, d)| d.source_path().is_some())
        .map(|(n, d)| {
            let format = d.driver_type.as_deref().unwrap_or("raw");
            (
                d.target_dev.clone().unwrap_or_default(),
                disk_top_node(n, format),
            )
        })
        .collect()
}

/// `-blockdev` JSON in libvirt's shape: a protocol node for the file or
/// device, and a format node above it unless the image is raw.
fn blockdevs(
    n: usize,
    disk_type: Option<&str>,
    path: &str,
    format: &str,
    readonly: bool,
) -> Vec<String> {
    let driver = match disk_type {
        Some("block") => "host_device",
        _ => "file",
    };
    let filename = serde_json::Value::from(path).to_string();
    let storage = format!("flotilla-disk{n}-storage");
    if format == "raw" {
        return vec![format!(
            "{{\"driver\":\"{driver}\",\"filename\":{filename},\"node-name\":\"{storage}\",\"read-only\":{readonly}}}"
        )];
    }
    let format_json = serde_json::Value::from(format).to_string();
    vec![
        format!(
            "{{\"driver\":\"{driver}\",\"filename\":{filename},\"node-name\":\"{storage}\",\"auto-read-only\":true,\"discard\":\"unmap\"}}"
        ),
        format!(
            "{{\"node-name\":\"{}\",\"read-only\":{readonly},\"driver\":{format_json},\"file\":\"{storage}\"}}",
            disk_top_node(n, format)
        ),
    ]
}

/// Escapes a value for a QEMU `key=value,…` option: commas are doubled.
pub fn escape_opt(value: &str) -> String {
    value.replace(',', ",,")
}

impl fmt::Display for QemuArgv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.program.display())?;
        for a in &self.args {
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_=.,:/@[]+".contains(c))
            {
                write!(f, " {a}")?;
            } else {
                write!(f, " '{}'", a.replace('\'', "'\\''"))?;
            }
        }
        Ok(())
    }
}

impl QemuArgv {
    /// Makes this a migration destination: QEMU waits for `migrate-incoming`.
    pub fn with_incoming_defer(mut self) -> Self {
        self.args.push("-incoming".into());
        self.args.push("defer".into());
        self
    }

    /// Builds the command line for `live` on `host`, with state in `paths`
    /// and `nics` planned by [`crate::nic_plan::plan_nics`].
    pub fn build(
        live: &Domain,
        host: &QemuHost,
        paths: &VmPaths,
        nics: &[NicPlan],
    ) -> Result<QemuArgv, ArgvError> {
        let mut b = Builder {
            vm: live.name.clone(),
            args: Vec::new(),
        };
        b.push([
            "-name",
            &format!("guest={},debug-threads=on", escape_opt(&live.name)),
        ]);
        b.push(["-S"]);
        let machine = live.os.machine.as_deref().unwrap_or("pc");
        b.push([
            "-machine",
            &format!("{},usb=off,dump-guest-core=off", escape_opt(machine)),
        ]);
        b.push(["-accel", host.accel.as_str()]);
        if host.accel == Accel::Kvm
            && live.cpu.as_ref().and_then(|c| c.mode.as_deref()) == Some("host-passthrough")
        {
            b.push(["-cpu", "host"]);
        }
        b.push(["-m", &format!("size={}k", live.memory.kib)]);
        let max = live.vcpus();
        let current = live.vcpu.as_ref().and_then(|v| v.current).unwrap_or(max);
        b.push([
            "-smp",
            &format!("{current},maxcpus={max},sockets=1,cores={max},threads=1"),
        ]);
        b.push(["-uuid", &live.uuid.hyphenated().to_string()]);
        b.push(["-no-user-config", "-nodefaults"]);
        b.push([
            "-chardev",
            &format!(
                "socket,id=charmonitor,path={},server=on,wait=off",
                escape_path(&paths.qmp_socket())
            ),
        ]);
        b.push(["-mon", "chardev=charmonitor,id=monitor,mode=control"]);
        b.push(["-pidfile", &paths.pidfile().display().to_string()]);
        b.push(["-display", "none"]);
        let offset = live.clock.as_ref().and_then(|c| c.offset.as_deref());
        b.push([
            "-rtc",
            if offset == Some("localtime") {
                "base=localtime"
            } else {
                "base=utc"
            },
        ]);
        if live.on_reboot.as_deref() == Some("destroy") {
            b.push(["-no-reboot"]);
        }
        let order: String = live
            .os
            .boot
            .iter()
            .map(|d| match d {
                BootDevice::Hd => 'c',
                BootDevice::Cdrom => 'd',
                BootDevice::Network => 'n',
                BootDevice::Fd => 'a',
            })
            .collect();
        if order.is_empty() {
            b.push(["-boot", "strict=on"]);
        } else {
            b.push(["-boot", &format!("order={order},strict=on")]);
        }

        let (mut disk_n, mut nic_n, mut serial_n, mut video_n) = (0, 0, 0, 0);
        let mut has_graphics = false;
        let mut has_video = false;
        let mut has_serial = false;
        for dev in &live.devices {
            match dev {
                Device::Emulator(_) | Device::Other(_) => {}
                Device::Disk(d) => {
                    b.disk(d, disk_n)?;
                    disk_n += 1;
                }
                Device::Interface(_) => {
                    let plan = nics.get(nic_n).ok_or_else(|| ArgvError::UnplannedNic {
                        vm: live.name.clone(),
                        index: nic_n,
                    })?;
                    b.nic(plan);
                    nic_n += 1;
                }
                Device::Graphics(_) => has_graphics = true,
                Device::Video(v) => {
                    has_video = true;
                    let driver = match v.model.as_deref().unwrap_or("vga") {
                        "vga" => "VGA",
                        "cirrus" => "cirrus-vga",
                        "qxl" if video_n == 0 => "qxl-vga",
                        "qxl" => "qxl",
                        "virtio" if video_n == 0 => "virtio-vga",
                        "virtio" => "virtio-gpu-pci",
                        "bochs" => "bochs-display",
                        "none" => continue,
                        other => {
                            return Err(b.unsupported(format!("video model '{other}'")));
                        }
                    };
                    b.push(["-device", &format!("{driver},id=video{video_n}")]);
                    video_n += 1;
                }
                Device::Serial(c) => {
                    b.serial(c, serial_n)?;
                    serial_n += 1;
                    has_serial = true;
                }
                Device::Console(c) => {
                    // libvirt's console on a serial target mirrors serial0.
                    let mirrors = matches!(c.target_type.as_deref(), None | Some("serial"));
                    if !(mirrors && has_serial) {
                        if mirrors {
                            b.serial(c, serial_n)?;
                            serial_n += 1;
                            has_serial = true;
                        } else {
                            return Err(b.unsupported(format!(
                                "console target type '{}'",
                                c.target_type.as_deref().unwrap_or_default()
                            )));
                        }
                    }
                }
            }
        }
        if has_graphics && !has_video {
            // libvirt adds a default video device when there is a display.
            b.push(["-device", "VGA,id=video0"]);
        }
        for g in live.graphics() {
            b.graphics(g)?;
        }
        // libvirt's seccomp confinement: no obsolete system calls, no
        // setuid, no fork or exec, no scheduler or affinity changes. Every fd
        // QEMU needs (NICs, its log) is handed to it open.
        b.push([
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        Ok(QemuArgv {
            program: host.emulator.clone(),
            args: b.args,
        })
    }
}

fn escape_path(p: &Path) -> String {
    escape_opt(&p.display().to_string())
}

struct Builder {
    vm: String,
    args: Vec<String>,
}

impl Builder {
    fn push<const N: usize>(&mut self, items: [&str; N]) {
        self.args.extend(items.iter().map(|s| s.to_string()));
    }

    fn unsupported(&self, what: String) -> ArgvError {
        ArgvError::Unsupported {
            vm: self.vm.clone(),
            what,
        }
    }

    fn disk(&mut self, d: &Disk, n: usize) -> Result<(), ArgvError> {
        let Some(path) = d.source_path() else {
            if d.device.as_deref() == Some("cdrom") {
                // An empty CD-ROM drive.
                self.push(["-device", &format!("ide-cd,id=disk{n}")]);
                return Ok(());
            }
            return Err(self.unsupported(format!(
                "disk {} without a file or block source",
                d.target_dev.as_deref().unwrap_or("?")
            )));
        };
        let format = d.driver_type.as_deref().unwrap_or("raw");
        let readonly = d.readonly || d.device.as_deref() == Some("cdrom");
        for blockdev in blockdevs(n, d.disk_type.as_deref(), path, format, readonly) {
            self.push(["-blockdev", &blockdev]);
        }
        let node = disk_top_node(n, format);
        let cdrom = d.device.as_deref() == Some("cdrom");
        let device = match (d.target_bus.as_deref().unwrap_or("virtio"), cdrom) {
            ("virtio", false) => format!("virtio-blk-pci,drive={node},id=disk{n}"),
            ("ide", false) => format!("ide-hd,drive={node},id=disk{n}"),
            ("ide", true) => format!("ide-cd,drive={node},id=disk{n}"),
            (bus, _) => return Err(self.unsupported(format!("disk bus '{bus}'"))),
        };
        self.push(["-device", &device]);
        Ok(())
    }

    /// The tap or macvtap fd is already open in QEMU (see `nic_plumbing`):
    /// no script, nothing QEMU must be privileged for.
    fn nic(&mut self, p: &NicPlan) {
        let n = p.index;
        let netdev = match &p.backend {
            NicBackend::User => format!("user,id=hostnet{n}"),
            NicBackend::Tap { .. } | NicBackend::Macvtap { .. } => {
                let mut s = format!("tap,fd={},id=hostnet{n}", p.fd());
                if p.vhost {
                    s.push_str(&format!(",vhost=on,vhostfd={}", p.vhost_fd()));
                }
                s
            }
        };
        self.push(["-netdev", &netdev]);
        self.push([
            "-device",
            &format!(
                "{},netdev=hostnet{n},id=net{n},mac={}",
                p.driver,
                format_mac(&p.mac)
            ),
        ]);
    }

    fn serial(&mut self, c: &CharDevice, n: usize) -> Result<(), ArgvError> {
        let chardev = match c.char_type.as_str() {
            "pty" => format!("pty,id=charserial{n}"),
            "null" => format!("null,id=charserial{n}"),
            "file" => {
                let path = c
                    .extra
                    .children
                    .iter()
                    .find_map(|node| match node {
                        flotilla_shared::xml::tree::Node::Element(e) if e.name == "source" => {
                            e.get_attr("path").map(str::to_string)
                        }
                        _ => None,
                    })
                    .ok_or_else(|| {
                        self.unsupported("serial type 'file' without a source path".into())
                    })?;
                format!("file,id=charserial{n},path={}", escape_opt(&path))
            }
            other => return Err(self.unsupported(format!("serial type '{other}'"))),
        };
        self.push(["-chardev", &chardev]);
        self.push([
            "-device",
            &format!("isa-serial,chardev=charserial{n},id=serial{n}"),
        ]);
        Ok(())
    }

    fn graphics(&mut self, g: &Graphics) -> Result<(), ArgvError> {
        let protocol = g.protocol.as_str();
        let unplanned = || ArgvError::Unplanned {
            vm: self.vm.clone(),
            protocol,
        };
        let listen = g.first_listen().ok_or_else(unplanned)?;
        match g.protocol {
            GraphicsProtocol::Vnc => {
                let mut opt = match &listen.kind {
                    ListenKind::Socket { socket } => {
                        format!(
                            "vnc=unix:{}",
                            escape_opt(socket.as_deref().ok_or_else(unplanned)?)
                        )
                    }
                    ListenKind::None => "none".to_string(),
                    ListenKind::Address { .. } | ListenKind::Network { .. } => {
                        let addr = listen.address().ok_or_else(unplanned)?;
                        let port = g.port.ok_or_else(unplanned)?;
                        let mut s = format!("{}:{}", bracket(addr), port - 5900);
                        if let Some(ws) = g.websocket {
                            s.push_str(&format!(",websocket={ws}"));
                        }
                        s
                    }
                };
                if let Some(p) = g.share_policy {
                    opt.push_str(&format!(",share={}", p.as_str()));
                }
                if g.passwd.is_some() {
                    opt.push_str(",password=on");
                }
                opt.push_str(",audiodev=audio1");
                self.push(["-audiodev", "none,id=audio1"]);
                self.push(["-vnc", &opt]);
            }
            GraphicsProtocol::Spice => {
                let mut opt = match &listen.kind {
                    ListenKind::Socket { socket } => format!(
                        "unix=on,addr={}",
                        escape_opt(socket.as_deref().ok_or_else(unplanned)?)
                    ),
                    ListenKind::None => "port=0".to_string(),
                    ListenKind::Address { .. } | ListenKind::Network { .. } => {
                        let addr = listen.address().ok_or_else(unplanned)?;
                        let port = g.port.ok_or_else(unplanned)?;
                        format!("port={port},addr={addr}")
                    }
                };
                if g.passwd.is_none() {
                    opt.push_str(",disable-ticketing=on");
                }
                opt.push_str(",seamless-migration=on");
                self.push(["-spice", &opt]);
            }
        }
        if let Some(k) = &g.keymap {
            self.push(["-k", k]);
        }
        Ok(())
    }
}

/// IPv6 addresses are bracketed in `-vnc`, as libvirt does.
fn bracket(addr: &str) -> String {
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("[{addr}]"),
        _ => addr.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::{plan_consoles, ConsoleSettings};
    use crate::interfaces::InterfaceTable;
    use crate::nic_plan::{plan_nics, NicHost};
    use crate::ports::PortAllocator;
    use flotilla_shared::xml::Network;
    use proptest::prelude::*;

    fn host() -> QemuHost {
        QemuHost {
            emulator: "/usr/bin/qemu-system-x86_64".into(),
            accel: Accel::Tcg,
        }
    }

    /// Plans consoles like the agent does and builds argv.
    fn argv_for(domain_xml: &str, networks: &[Network], table: &InterfaceTable) -> QemuArgv {
        let d = Domain::parse("d.xml", domain_xml).expect("domain").model;
        let plan = plan_consoles(
            &d,
            networks,
            table,
            &ConsoleSettings::default(),
            Path::new("/run/flt/vms/d"),
            &mut PortAllocator::new(),
            &mut |_| true,
        )
        .expect("plan");
        let mut live = plan.live;
        let nics = plan_nics(
            &mut live,
            &NicHost {
                host: "a",
                networks,
                table,
                vhost_net: false,
                taken: &Default::default(),
            },
        )
        .expect("nics");
        QemuArgv::build(&live, &host(), &VmPaths::new("/run/flt/vms/d"), &nics).expect("argv")
    }

    #[test]
    fn nics_get_their_open_fds_and_the_guest_mac() {
        let xml = "<domain type='kvm'><name>n</name><uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>                   <memory>1024</memory><os><type>hvm</type></os><devices>                   <interface type='network'><mac address='52:54:00:aa:bb:01'/><source network='public'/></interface>                   <interface type='user'><model type='rtl8139'/></interface>                   <interface type='bridge'><source bridge='br0'/><model type='e1000e'/></interface>                   </devices></domain>";
        let public = Network::parse(
            "public.xml",
            "<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>",
        )
        .expect("net")
        .model;
        let table = InterfaceTable::new().with("br0", &[]);
        let argv = argv_for(xml, &[public], &table);
        assert_eq!(
            option_after(&argv, "-netdev"),
            [
                "tap,fd=10,id=hostnet0",
                "user,id=hostnet1",
                "tap,fd=14,id=hostnet2"
            ]
        );
        let devices = option_after(&argv, "-device");
        assert_eq!(
            devices[0],
            "virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:aa:bb:01"
        );
        assert!(devices[1].starts_with("rtl8139,netdev=hostnet1,id=net1,mac=52:54:00:"));
        assert!(devices[2].starts_with("e1000e,netdev=hostnet2,id=net2,mac=52:54:00:"));
    }

    fn option_after<'a>(argv: &'a QemuArgv, flag: &str) -> Vec<&'a str> {
        argv.args
            .windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    /// Splits a QEMU option string at single commas, undoubling escaped ones.
    fn split_opts(s: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' && chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else if c == ',' {
                out.push(std::mem::take(&mut cur));
            } else {
                cur.push(c);
            }
        }
        out.push(cur);
        out
    }

    fn corpus() -> Option<std::path::PathBuf> {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/conformance/libvirt");
        dir.exists().then_some(dir)
    }

    #[test]
    fn disks_are_blockdevs_in_libvirts_shape_and_name_their_top_node() {
        let xml = "<domain type='kvm'><name>d</name><memory unit='MiB'>64</memory>\
                   <os><type>hvm</type></os><devices>\
                   <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                   <source file='/srv/d.qcow2'/><target dev='vda' bus='virtio'/></disk>\
                   <disk type='block' device='disk'><source dev='/dev/sdb'/>\
                   <target dev='vdb' bus='virtio'/><readonly/></disk></devices></domain>";
        let d = Domain::parse("d.xml", xml).expect("ok").model;
        let argv = QemuArgv::build(&d, &host(), &VmPaths::new("/run/d"), &[]).expect("argv");
        assert_eq!(
            option_after(&argv, "-blockdev"),
            [
                r#"{"driver":"file","filename":"/srv/d.qcow2","node-name":"flotilla-disk0-storage","auto-read-only":true,"discard":"unmap"}"#,
                r#"{"node-name":"flotilla-disk0-format","read-only":false,"driver":"qcow2","file":"flotilla-disk0-storage"}"#,
                r#"{"driver":"host_device","filename":"/dev/sdb","node-name":"flotilla-disk1-storage","read-only":true}"#,
            ]
        );
        assert_eq!(
            &option_after(&argv, "-device")[..2],
            [
                "virtio-blk-pci,drive=flotilla-disk0-format,id=disk0",
                "virtio-blk-pci,drive=flotilla-disk1-storage,id=disk1"
            ]
        );
        assert_eq!(
            disk_top_nodes(&d),
            [
                ("vda".to_string(), "flotilla-disk0-format".to_string()),
                ("vdb".to_string(), "flotilla-disk1-storage".to_string())
            ]
        );
    }

    #[test]
    fn display_args_match_libvirts_expected_argv() {
        let Some(dir) = corpus() else {
            assert!(std::env::var_os("CI").is_none(), "corpus missing in CI");
            return;
        };
        let nat = Network::parse(
            "nat-network.xml",
            &std::fs::read_to_string(dir.join("network/nat-network.xml")).expect("read"),
        )
        .expect("nat-network")
        .model;
        // libvirt's test driver names networks "FILE;PORT"; ours are plain names.
        let mut nat_named = nat.clone();
        nat_named.name = "nat-network;".into();
        let table = InterfaceTable::new();
        let cases = [
            ("graphics-vnc", "-vnc"),
            ("graphics-vnc-websocket", "-vnc"),
            ("graphics-vnc-policy", "-vnc"),
            ("graphics-vnc-socket", "-vnc"),
            ("graphics-vnc-none", "-vnc"),
            ("graphics-listen-network", "-vnc"),
            ("graphics-spice-egl-headless", "-spice"),
            ("graphics-spice-socket", "-spice"),
        ];
        for (name, flag) in cases {
            let xml = std::fs::read_to_string(dir.join(format!("domain/{name}.xml"))).expect("xml");
            let args =
                std::fs::read_to_string(dir.join(format!("domain/{name}.x86_64-latest.args")))
                    .expect("args");
            let want = args
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{flag} ")))
                .expect("flag in args")
                .trim_end_matches(" \\")
                .trim_matches('\'')
                .to_string();
            let got = argv_for(&xml, std::slice::from_ref(&nat_named), &table);
            let got = option_after(&got, flag).join(" ");
            // We pass disable-ticketing=on for password-less SPICE; libvirt's
            // test configuration sets a SPICE password globally instead.
            let got = got.replace(",disable-ticketing=on", "");
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn a_diskless_guest_is_paused_with_qmp_and_no_secrets() {
        let xml = "<domain type='kvm'><name>web01</name><memory unit='MiB'>64</memory>\
                   <os><type>hvm</type></os><devices>\
                   <graphics type='vnc' passwd='hunter2' keymap='de'><listen type='network' network='public'/></graphics>\
                   <serial type='pty'/><console type='pty'/></devices></domain>";
        let public = Network::parse(
            "p.xml",
            "<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>",
        )
        .expect("net")
        .model;
        let table = InterfaceTable::new().with("br0", &["198.18.3.1"]);
        let argv = argv_for(xml, &[public], &table);
        assert_eq!(
            option_after(&argv, "-vnc"),
            ["198.18.3.1:0,password=on,audiodev=audio1"]
        );
        assert_eq!(option_after(&argv, "-k"), ["de"]);
        assert_eq!(option_after(&argv, "-m"), ["size=65536k"]);
        assert_eq!(option_after(&argv, "-accel"), ["tcg"]);
        assert_eq!(
            option_after(&argv, "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        );
        assert!(argv.args.contains(&"-S".to_string()));
        assert_eq!(
            option_after(&argv, "-chardev")[0],
            "socket,id=charmonitor,path=/run/flt/vms/d/qmp.sock,server=on,wait=off"
        );
        assert_eq!(
            option_after(&argv, "-device"),
            ["isa-serial,chardev=charserial0,id=serial0", "VGA,id=video0"]
        );
        assert!(
            !argv.to_string().contains("hunter2"),
            "password leaked into argv: {argv}"
        );
    }

    #[test]
    fn unsupported_devices_are_named() {
        let xml = "<domain type='kvm'><name>x</name><memory>1024</memory><os><type>hvm</type></os>\
                   <devices><disk type='file'><source file='/a.img'/><target dev='sda' bus='sata'/></disk></devices></domain>";
        let d = Domain::parse("x.xml", xml).expect("ok").model;
        let e = QemuArgv::build(&d, &host(), &VmPaths::new("/tmp/x"), &[]).expect_err("sata");
        assert_eq!(
            e.to_string(),
            "VM 'x': disk bus 'sata' is not supported by Flotilla yet"
        );
    }

    proptest! {
        #[test]
        fn no_name_or_path_can_inject_an_option(name in "[ -.0-~]{1,40}", path in "/[ -~]{1,40}") {
            let xml = "<domain type='kvm'><name>n</name><memory>1024</memory><os><type>hvm</type></os>\
                       <devices><disk type='file' device='disk'><source file='/x'/><target dev='vda' bus='virtio'/></disk></devices></domain>";
            let mut d = Domain::parse("p.xml", xml).expect("ok").model;
            d.name = name.clone();
            if let Some(Device::Disk(disk)) = d.devices.first_mut() {
                disk.source_file = Some(path.clone());
            }
            let argv = QemuArgv::build(&d, &host(), &VmPaths::new(format!("/run/{name}")), &[]).expect("argv");
            let name_opts = split_opts(option_after(&argv, "-name")[0]);
            prop_assert_eq!(&name_opts, &vec![format!("guest={name}"), "debug-threads=on".to_string()]);
            // The path travels as a JSON string: commas and quotes stay inside it.
            let blockdev: serde_json::Value =
                serde_json::from_str(option_after(&argv, "-blockdev")[0]).expect("JSON");
            prop_assert_eq!(blockdev["filename"].as_str(), Some(path.as_str()));
            prop_assert_eq!(blockdev["node-name"].as_str(), Some("flotilla-disk0-storage"));
            let chardev = split_opts(option_after(&argv, "-chardev")[0]);
            prop_assert_eq!(chardev.len(), 5);
            prop_assert_eq!(&chardev[2], &format!("path=/run/{name}/qmp.sock"));
        }
    }
}
