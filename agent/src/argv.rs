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

use flotilla_shared::hardware::{
    self, CharBackend, Chipset, CpuPlan, DiskBus, DiskHw, DiskKind, DiskSource, Firmware, Hw,
    PciAddr, Refused, RngBackend,
};
use flotilla_shared::xml::domain::{format_mac, BootDevice};
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
    /// The host's UEFI firmware, when installed.
    pub ovmf: Option<Ovmf>,
    /// A hugetlbfs mount, when there is one.
    pub hugepages: Option<PathBuf>,
    /// The user QEMU runs as (`None`: root, unconfined).
    pub user: Option<crate::dac::QemuUser>,
    /// Where VM cgroups go (cgroup v2 under the agent's own), if anywhere,
    /// and this host's name, which names them.
    pub cgroups: Option<(PathBuf, String)>,
    /// SPICE's TLS certificates (`ca-cert.pem`, `server-cert.pem`,
    /// `server-key.pem`), libvirt's `spice_tls_x509_cert_dir`.
    pub spice_tls: Option<PathBuf>,
}

/// The host's OVMF images (Debian's `ovmf`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ovmf {
    /// The code, mapped read-only.
    pub code: PathBuf,
    /// The variable store template each VM's NVRAM is copied from.
    pub vars: PathBuf,
}

impl Ovmf {
    /// Debian's 4 MiB OVMF build, when present under `root`.
    pub fn find(root: &Path) -> Option<Ovmf> {
        let dir = root.join("usr/share/OVMF");
        let code = dir.join("OVMF_CODE_4M.fd");
        let vars = dir.join("OVMF_VARS_4M.fd");
        (code.exists() && vars.exists()).then_some(Ovmf { code, vars })
    }
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

    /// What QEMU itself creates (its monitor and other sockets, its
    /// pidfile): the only directory QEMU's user may write. The VM's own
    /// directory, with the records the agent trusts, stays root's.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// The QMP monitor socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir().join("qmp.sock")
    }

    /// QEMU's pidfile.
    pub fn pidfile(&self) -> PathBuf {
        self.run_dir().join("qemu.pid")
    }

    /// QEMU's stderr log.
    pub fn log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }

    /// The live XML of the running VM.
    pub fn live_xml(&self) -> PathBuf {
        self.dir.join("live.xml")
    }

    /// The VM's UEFI variable store, when its definition names none.
    pub fn nvram(&self) -> PathBuf {
        self.dir.join("nvram.fd")
    }
}

/// A complete QEMU invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuArgv {
    /// The binary.
    pub program: PathBuf,
    /// Arguments, without the program.
    pub args: Vec<String>,
    /// A UEFI variable store to copy from its template before QEMU opens
    /// it, when it does not exist yet: (template, store).
    pub nvram_from: Option<(PathBuf, PathBuf)>,
    /// Host CPUs every QEMU thread is pinned to (`<vcpu cpuset>`).
    pub affinity: Option<Vec<u32>>,
    /// The unprivileged user QEMU runs as, when confined.
    pub run_as: Option<crate::dac::QemuUser>,
    /// Files QEMU opens itself and that must exist (disks, the UEFI
    /// variable store): given to `run_as` before it starts.
    pub dac: Vec<PathBuf>,
    /// Files QEMU writes (character device files, logs): created empty
    /// when missing, then given to `run_as`.
    pub dac_logs: Vec<PathBuf>,
    /// Directories made for QEMU (its huge-page files), given to `run_as`
    /// and removed when it stops.
    pub dac_dirs: Vec<PathBuf>,
    /// The VM's own cgroup, QEMU moved there before the guest runs.
    pub cgroup: Option<PathBuf>,
}

/// Why a definition cannot become a QEMU command line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgvError {
    /// Something in the definition Flotilla does not build yet (define
    /// refuses these too; a definition stored before that rule meets it here).
    #[error("VM '{vm}': {refused}")]
    Refused {
        /// The VM.
        vm: String,
        /// What, by element path.
        refused: Refused,
    },
    /// This host cannot provide what the definition needs.
    #[error("VM '{vm}' cannot run on this host: it needs {what}")]
    HostLacks {
        /// The VM.
        vm: String,
        /// What, e.g. "KVM, which a host CPU model needs".
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

/// `-blockdev` JSON in libvirt's shape: a protocol node for the file, device
/// or NBD export, and a format node above it unless the image is raw.
fn blockdevs(d: &DiskHw) -> Vec<String> {
    use serde_json::{json, Map, Value};
    let n = d.n;
    let storage = format!("flotilla-disk{n}-storage");
    let mut proto = Map::new();
    match &d.source {
        DiskSource::File(path) => {
            proto.insert("driver".into(), json!("file"));
            proto.insert("filename".into(), json!(path));
        }
        DiskSource::Block(path) => {
            proto.insert("driver".into(), json!("host_device"));
            proto.insert("filename".into(), json!(path));
        }
        DiskSource::Nbd { host, port, export } => {
            proto.insert("driver".into(), json!("nbd"));
            proto.insert(
                "server".into(),
                json!({"type": "inet", "host": host, "port": port}),
            );
            if let Some(e) = export {
                proto.insert("export".into(), json!(e));
            }
        }
        DiskSource::Empty => return Vec::new(),
    }
    proto.insert("node-name".into(), json!(storage));
    // libvirt's cache modes as QEMU's two knobs.
    let cache = d.cache.as_deref().map(|c| {
        let (direct, no_flush) = match c {
            "none" => (true, false),
            "directsync" => (true, false),
            "unsafe" => (false, true),
            _ => (false, false),
        };
        json!({"direct": direct, "no-flush": no_flush})
    });
    if let Some(c) = &cache {
        proto.insert("cache".into(), c.clone());
    }
    if let (Some(io), true) = (
        &d.io,
        matches!(d.source, DiskSource::File(_) | DiskSource::Block(_)),
    ) {
        proto.insert("aio".into(), json!(io));
    }
    let raw = d.format == "raw";
    if raw {
        proto.insert("read-only".into(), json!(d.readonly));
        if let Some(dz) = &d.detect_zeroes {
            proto.insert("detect-zeroes".into(), json!(dz));
        }
        if let Some(disc) = &d.discard {
            proto.insert("discard".into(), json!(disc));
        }
        return vec![Value::Object(proto).to_string()];
    }
    proto.insert("auto-read-only".into(), json!(true));
    proto.insert("discard".into(), json!("unmap"));
    let mut fmt = Map::new();
    fmt.insert("node-name".into(), json!(disk_top_node(n, &d.format)));
    fmt.insert("read-only".into(), json!(d.readonly));
    if let Some(c) = cache {
        fmt.insert("cache".into(), c);
    }
    if let Some(disc) = &d.discard {
        fmt.insert("discard".into(), json!(disc));
    }
    if let Some(dz) = &d.detect_zeroes {
        fmt.insert("detect-zeroes".into(), json!(dz));
    }
    fmt.insert("driver".into(), json!(d.format));
    fmt.insert("file".into(), json!(storage));
    vec![
        Value::Object(proto).to_string(),
        Value::Object(fmt).to_string(),
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
    /// and `nics` planned by [`crate::nic_plan::plan_nics`]. The devices are
    /// the definition's [`hardware::plan`], the one define accepted.
    pub fn build(
        live: &Domain,
        host: &QemuHost,
        paths: &VmPaths,
        nics: &[NicPlan],
    ) -> Result<QemuArgv, ArgvError> {
        let hw = hardware::plan(live).map_err(|refused| ArgvError::Refused {
            vm: live.name.clone(),
            refused,
        })?;
        let mut b = Builder {
            vm: live.name.clone(),
            args: Vec::new(),
            chipset: hw.chipset,
            dir: paths.run_dir(),
        };
        b.push([
            "-name",
            &format!("guest={},debug-threads=on", escape_opt(&live.name)),
        ]);
        b.push(["-S"]);
        let machine = live.os.machine.as_deref().unwrap_or("pc");
        let mut machine_opts = format!("{},usb=off,dump-guest-core=off", escape_opt(machine));
        for o in &hw.machine_opts {
            machine_opts.push(',');
            machine_opts.push_str(o);
        }
        let mut nvram_from = None;
        if let Firmware::Efi {
            loader,
            nvram,
            template,
        } = &hw.firmware
        {
            let code = match (loader, &host.ovmf) {
                (Some(l), _) => l.clone(),
                (None, Some(o)) => o.code.display().to_string(),
                (None, None) => return Err(b.host_lacks("UEFI firmware (install ovmf)")),
            };
            let vars = nvram
                .clone()
                .unwrap_or_else(|| paths.nvram().display().to_string());
            let from = match (template, &host.ovmf) {
                (Some(t), _) => Some(PathBuf::from(t)),
                (None, Some(o)) => Some(o.vars.clone()),
                (None, None) => None,
            };
            nvram_from = from.map(|f| (f, PathBuf::from(&vars)));
            let file = |path: &str, node: &str, ro: bool| {
                format!(
                    "{{\"driver\":\"file\",\"filename\":{},\"node-name\":\"{node}\",\"read-only\":{ro}}}",
                    serde_json::Value::from(path)
                )
            };
            b.push(["-blockdev", &file(&code, "flotilla-pflash0", true)]);
            b.push(["-blockdev", &file(&vars, "flotilla-pflash1", false)]);
            machine_opts.push_str(",pflash0=flotilla-pflash0,pflash1=flotilla-pflash1");
        }
        if hw.hugepages {
            machine_opts.push_str(",memory-backend=pc.ram");
        }
        b.push(["-machine", &machine_opts]);
        b.push(["-accel", host.accel.as_str()]);
        if let Some(cpu) = b.cpu(&hw.cpu, host.accel)? {
            b.push(["-cpu", &cpu]);
        }
        b.push(["-m", &format!("size={}k", live.memory.kib)]);
        let mut dac_dirs = Vec::new();
        if hw.hugepages {
            let Some(mount) = &host.hugepages else {
                return Err(b.host_lacks("huge pages (no hugetlbfs is mounted)"));
            };
            // A directory of its own, as libvirt's per-domain one.
            let dir = mount.join(format!("flotilla-{}", live.uuid.hyphenated()));
            dac_dirs.push(dir.clone());
            let dir = &dir;
            b.push([
                "-object",
                &format!(
                    "memory-backend-file,id=pc.ram,mem-path={},prealloc=on,size={}",
                    escape_path(dir),
                    live.memory.kib * 1024
                ),
            ]);
        }
        let smp = hw.smp;
        let dies = if smp.dies > 1 {
            format!(",dies={}", smp.dies)
        } else {
            String::new()
        };
        b.push([
            "-smp",
            &format!(
                "{},maxcpus={},sockets={}{dies},cores={},threads={}",
                smp.current, smp.max, smp.sockets, smp.cores, smp.threads
            ),
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
        if hw.dbus_display {
            b.push(["-display", "dbus,p2p=on"]);
        } else {
            b.push(["-display", "none"]);
        }
        b.push(["-rtc", &hw.rtc]);
        for g in &hw.globals {
            b.push(["-global", g]);
        }
        if hw.no_reboot {
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
        let mut boot = String::new();
        if !order.is_empty() {
            boot.push_str(&format!("order={order},"));
        }
        if let Some((enable, timeout)) = hw.boot_menu {
            boot.push_str(if enable { "menu=on," } else { "menu=off," });
            if let Some(t) = timeout {
                boot.push_str(&format!("splash-time={t},"));
            }
        }
        boot.push_str("strict=on");
        b.push(["-boot", &boot]);
        for (id, driver) in &hw.audio {
            b.push(["-audiodev", &format!("{driver},id=audio{id}")]);
        }
        let audio = hw.audio.first().map_or(1, |(id, _)| *id);
        for dev in &hw.devices {
            b.device(dev, nics)?;
        }
        // `<video><model type='none'/>` is a video element too: no default VGA.
        let has_video = live.devices.iter().any(|d| matches!(d, Device::Video(_)));
        let mut spice_n = 0;
        for g in live.graphics() {
            let extra = if g.protocol == GraphicsProtocol::Spice {
                spice_n += 1;
                hw.spice_opts.get(spice_n - 1).cloned().unwrap_or_default()
            } else {
                Vec::new()
            };
            b.graphics(g, audio, &extra, host.spice_tls.as_deref())?;
        }
        if live.graphics().next().is_some() && !has_video {
            // libvirt adds a default video device when there is a display.
            b.push(["-device", "VGA,id=video0"]);
        }
        // libvirt's seccomp confinement: no obsolete system calls, no
        // setuid, no fork or exec, no scheduler or affinity changes. Every fd
        // QEMU needs (NICs, its log) is handed to it open.
        b.push([
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        let (mut dac, mut dac_logs): (Vec<PathBuf>, Vec<PathBuf>) = (Vec::new(), Vec::new());
        for dev in &hw.devices {
            match dev {
                Hw::Disk(d) => match &d.source {
                    DiskSource::File(p) | DiskSource::Block(p) => dac.push(p.into()),
                    _ => {}
                },
                Hw::Serial { chardev, log, .. } => {
                    if let CharBackend::File { path, .. } = chardev {
                        dac_logs.push(path.into());
                    }
                    if let Some((file, _)) = log {
                        dac_logs.push(file.into());
                    }
                }
                Hw::Channel { chardev, .. } | Hw::VirtioConsole { chardev, .. } => {
                    if let CharBackend::File { path, .. } = chardev {
                        dac_logs.push(path.into());
                    }
                }
                _ => {}
            }
        }
        if let Some((_, store)) = &nvram_from {
            dac.push(store.clone());
        }
        dac.dedup();
        dac_logs.dedup();
        Ok(QemuArgv {
            program: host.emulator.clone(),
            args: b.args,
            nvram_from,
            affinity: hw.cpuset.clone(),
            run_as: host.user.clone(),
            dac,
            dac_logs,
            dac_dirs,
            cgroup: host.cgroups.as_ref().map(|(parent, name)| {
                crate::cgroup::of_vm(parent, name, &live.uuid.hyphenated().to_string())
            }),
        })
    }
}

fn escape_path(p: &Path) -> String {
    escape_opt(&p.display().to_string())
}

struct Builder {
    vm: String,
    args: Vec<String>,
    chipset: Chipset,
    dir: PathBuf,
}

impl Builder {
    fn push<const N: usize>(&mut self, items: [&str; N]) {
        self.args.extend(items.iter().map(|s| s.to_string()));
    }

    fn host_lacks(&self, what: &str) -> ArgvError {
        ArgvError::HostLacks {
            vm: self.vm.clone(),
            what: what.to_string(),
        }
    }

    /// `bus=…,addr=…` for a PCI placement.
    fn at(&self, addr: Option<PciAddr>) -> String {
        match addr {
            None => String::new(),
            Some(a) => {
                let bus = if a.bus == 0 {
                    self.chipset.root_bus().to_string()
                } else {
                    format!("pci.{}", a.bus)
                };
                let mf = if a.multifunction {
                    ",multifunction=on"
                } else {
                    ""
                };
                format!(",bus={bus},addr={}{mf}", a.qemu_addr())
            }
        }
    }

    fn cpu(&self, cpu: &CpuPlan, accel: Accel) -> Result<Option<String>, ArgvError> {
        let with = |base: &str, flags: &[String]| {
            let mut s = base.to_string();
            for f in flags {
                s.push(',');
                s.push_str(&escape_opt(f));
            }
            s
        };
        Ok(match (cpu, accel) {
            (CpuPlan::Default { hv }, _) if hv.is_empty() => None,
            (CpuPlan::Default { hv }, _) => Some(with("qemu64", hv)),
            (CpuPlan::HostPassthrough { flags }, Accel::Kvm) => Some(with("host", flags)),
            (CpuPlan::HostModel { flags }, Accel::Kvm) => Some(with("host,migratable=on", flags)),
            (CpuPlan::HostPassthrough { .. } | CpuPlan::HostModel { .. }, Accel::Tcg) => {
                return Err(self.host_lacks("KVM, which a host CPU model needs"));
            }
            (CpuPlan::Maximum { flags }, _) => Some(with("max", flags)),
            (CpuPlan::Named { model, flags }, _) => Some(with(&escape_opt(model), flags)),
        })
    }

    fn chardev(&mut self, c: &CharBackend, id: &str, log: Option<&(String, Option<bool>)>) {
        let mut s = match c {
            CharBackend::Pty => format!("pty,id={id}"),
            CharBackend::Null => format!("null,id={id}"),
            CharBackend::File { path, append } => {
                let mut s = format!("file,id={id},path={}", escape_opt(path));
                if let Some(a) = append {
                    s.push_str(if *a { ",append=on" } else { ",append=off" });
                }
                s
            }
            CharBackend::Unix { path, server } => {
                let path = if path.starts_with('/') {
                    PathBuf::from(path)
                } else {
                    self.dir.join(path)
                };
                let mut s = format!("socket,id={id},path={}", escape_path(&path));
                if *server {
                    s.push_str(",server=on,wait=off");
                }
                s
            }
            CharBackend::Tcp {
                host,
                port,
                server,
                telnet,
            } => {
                let mut s = format!(
                    "socket,id={id},host={},port={}",
                    escape_opt(host),
                    escape_opt(port)
                );
                if *telnet {
                    s.push_str(",telnet=on");
                }
                if *server {
                    s.push_str(",server=on,wait=off");
                }
                s
            }
            CharBackend::SpiceVmc => format!("spicevmc,id={id},name=vdagent"),
        };
        if let Some((file, append)) = log {
            s.push_str(&format!(",logfile={}", escape_opt(file)));
            if let Some(a) = append {
                s.push_str(if *a {
                    ",logappend=on"
                } else {
                    ",logappend=off"
                });
            }
        }
        self.push(["-chardev", &s]);
    }

    fn device(&mut self, dev: &Hw, nics: &[NicPlan]) -> Result<(), ArgvError> {
        let d = match dev {
            Hw::RootPort {
                index,
                chassis,
                port,
                addr,
            } => format!(
                "pcie-root-port,port={port},chassis={chassis},id=pci.{index}{}",
                self.at(Some(*addr))
            ),
            Hw::PciBridge {
                index,
                chassis,
                addr,
            } => format!(
                "pci-bridge,chassis_nr={chassis},id=pci.{index}{}",
                self.at(Some(*addr))
            ),
            Hw::Usb {
                driver,
                index,
                ports,
                addr,
            } => {
                let id = usb_id(*index);
                let ports = match (ports, *driver) {
                    (Some(p), "qemu-xhci" | "nec-usb-xhci") => format!(",p2={p},p3={p}"),
                    _ => String::new(),
                };
                format!("{driver}{ports},id={id}{}", self.at(Some(*addr)))
            }
            Hw::VirtioSerial { index, ports, addr } => {
                let max = ports.map(|p| format!(",max_ports={p}")).unwrap_or_default();
                format!(
                    "virtio-serial-pci,id=virtio-serial{index}{max}{}",
                    self.at(Some(*addr))
                )
            }
            Hw::Scsi {
                driver,
                index,
                addr,
            } => format!("{driver},id=scsi{index}{}", self.at(Some(*addr))),
            Hw::Ahci { index, addr } => format!("ich9-ahci,id=sata{index}{}", self.at(Some(*addr))),
            Hw::Disk(disk) => return self.disk(disk),
            Hw::Nic {
                n,
                addr,
                boot,
                mtu,
                sndbuf,
            } => {
                let plan = nics.get(*n).ok_or_else(|| ArgvError::UnplannedNic {
                    vm: self.vm.clone(),
                    index: *n,
                })?;
                let mut extra = self.at(*addr);
                if let Some(o) = boot {
                    extra.push_str(&format!(",bootindex={o}"));
                }
                if let Some(m) = mtu {
                    extra.push_str(&format!(",host_mtu={m}"));
                }
                self.nic(plan, &extra, *sndbuf)?;
                return Ok(());
            }
            Hw::Serial {
                n,
                chardev,
                driver,
                port,
                log,
            } => {
                self.chardev(chardev, &format!("charserial{n}"), log.as_ref());
                format!("{driver},chardev=charserial{n},id=serial{n},index={port}")
            }
            Hw::VirtioConsole { n, chardev, at } => {
                self.chardev(chardev, &format!("charconsole{n}"), None);
                format!(
                    "virtconsole,bus=virtio-serial{}.0,nr={},chardev=charconsole{n},id=console{n}",
                    at.0, at.1
                )
            }
            Hw::Channel {
                n,
                chardev,
                name,
                at,
            } => {
                self.chardev(chardev, &format!("charchannel{n}"), None);
                let name = name
                    .as_deref()
                    .map(|x| format!(",name={}", escape_opt(x)))
                    .unwrap_or_default();
                format!(
                    "virtserialport,bus=virtio-serial{}.0,nr={},chardev=charchannel{n},id=channel{n}{name}",
                    at.0, at.1
                )
            }
            Hw::Input {
                n,
                driver,
                usb_port,
                addr,
            } => match usb_port {
                Some(p) => format!("{driver},id=input{n},bus=usb.0,port={p}"),
                None => format!("{driver},id=input{n}{}", self.at(*addr)),
            },
            Hw::Video {
                n,
                driver,
                heads,
                ram,
                vram,
                vgamem,
                addr,
            } => {
                let mut s = format!("{driver},id=video{n}");
                match *driver {
                    "qxl-vga" | "qxl" => {
                        s.push_str(&format!(",max_outputs={}", heads.unwrap_or(1)));
                        if let Some(r) = ram {
                            s.push_str(&format!(",ram_size={}", r.saturating_mul(1024)));
                        }
                        if let Some(v) = vram {
                            s.push_str(&format!(",vram_size={}", v.saturating_mul(1024)));
                        }
                        if let Some(v) = vgamem {
                            s.push_str(&format!(",vgamem_mb={}", v / 1024));
                        }
                    }
                    "virtio-vga" | "virtio-gpu-pci" => {
                        if let Some(h) = heads {
                            s.push_str(&format!(",max_outputs={h}"));
                        }
                    }
                    "VGA" => {
                        if let Some(v) = vram {
                            s.push_str(&format!(",vgamem_mb={}", v / 1024));
                        }
                    }
                    "bochs-display" => {
                        if let Some(v) = vram {
                            s.push_str(&format!(",vgamem={}", v.saturating_mul(1024)));
                        }
                    }
                    _ => {}
                }
                s.push_str(&self.at(*addr));
                s
            }
            Hw::Balloon { addr, period } => {
                let p = period
                    .map(|p| format!(",guest-stats-polling-interval={p}"))
                    .unwrap_or_default();
                format!("virtio-balloon-pci,id=balloon0{p}{}", self.at(Some(*addr)))
            }
            Hw::Rng {
                n,
                backend,
                rate,
                addr,
            } => {
                let obj = match backend {
                    RngBackend::Random(f) => {
                        format!("rng-random,id=objrng{n},filename={}", escape_opt(f))
                    }
                    RngBackend::Builtin => format!("rng-builtin,id=objrng{n}"),
                    RngBackend::Egd(c) => {
                        self.chardev(c, &format!("charrng{n}"), None);
                        format!("rng-egd,id=objrng{n},chardev=charrng{n}")
                    }
                };
                self.push(["-object", &obj]);
                let rate = rate
                    .map(|(bytes, period)| format!(",max-bytes={bytes},period={period}"))
                    .unwrap_or_default();
                format!(
                    "virtio-rng-pci,rng=objrng{n},id=rng{n}{rate}{}",
                    self.at(Some(*addr))
                )
            }
            Hw::Watchdog {
                driver,
                action,
                addr,
            } => {
                self.push(["-watchdog-action", action]);
                match driver {
                    Some(d) => format!("{d},id=watchdog0{}", self.at(*addr)),
                    None => return Ok(()),
                }
            }
            Hw::Sound {
                n,
                driver,
                hda,
                addr,
                audio,
            } => {
                if *hda {
                    let d = format!("{driver},id=sound{n}{}", self.at(*addr));
                    self.push(["-device", &d]);
                    format!(
                        "hda-duplex,id=sound{n}-codec0,bus=sound{n}.0,cad=0,audiodev=audio{audio}"
                    )
                } else {
                    format!(
                        "{driver},id=sound{n},audiodev=audio{audio}{}",
                        self.at(*addr)
                    )
                }
            }
        };
        self.push(["-device", &d]);
        Ok(())
    }

    fn disk(&mut self, d: &DiskHw) -> Result<(), ArgvError> {
        let n = d.n;
        let node = disk_top_node(n, &d.format);
        let has_medium = d.source != DiskSource::Empty;
        if has_medium {
            for blockdev in blockdevs(d) {
                self.push(["-blockdev", &blockdev]);
            }
        }
        let id = d.device_id();
        let drive = if has_medium {
            format!(",drive={node}")
        } else {
            String::new()
        };
        let cd = d.kind == DiskKind::Cdrom;
        let mut dev = match &d.bus {
            DiskBus::Virtio(addr) => format!("virtio-blk-pci{}{drive},id={id}", self.at(*addr)),
            DiskBus::Sata { controller, unit } => {
                let bus = if *controller == 0 && self.chipset == Chipset::Q35 {
                    format!("ide.{unit}")
                } else {
                    format!("sata{controller}.{unit}")
                };
                let driver = if cd { "ide-cd" } else { "ide-hd" };
                format!("{driver},bus={bus}{drive},id={id}")
            }
            DiskBus::Ide { bus, unit } => {
                let driver = if cd { "ide-cd" } else { "ide-hd" };
                format!("{driver},bus=ide.{bus},unit={unit}{drive},id={id}")
            }
            DiskBus::Scsi {
                controller,
                bus,
                target,
                unit,
                virtio,
            } => {
                let driver = if cd { "scsi-cd" } else { "scsi-hd" };
                if *virtio {
                    format!(
                        "{driver},bus=scsi{controller}.0,channel={bus},scsi-id={target},lun={unit}{drive},id={id}"
                    )
                } else {
                    format!("{driver},bus=scsi{controller}.0,scsi-id={unit}{drive},id={id}")
                }
            }
            DiskBus::Fdc { unit } => format!("floppy,unit={unit}{drive},id={id}"),
            DiskBus::Usb { port } => {
                let port = port
                    .as_deref()
                    .map(|p| format!(",port={p}"))
                    .unwrap_or_default();
                format!("usb-storage,bus=usb.0{port}{drive},id={id}")
            }
        };
        match (d.boot, &d.bus) {
            // A floppy drive's boot index is its controller's, per drive.
            (Some(o), DiskBus::Fdc { unit }) => {
                let drive = if *unit == 0 { 'A' } else { 'B' };
                self.push(["-global", &format!("isa-fdc.bootindex{drive}={o}")]);
            }
            (Some(o), _) => dev.push_str(&format!(",bootindex={o}")),
            (None, _) => {}
        }
        if let Some(s) = &d.serial {
            dev.push_str(&format!(",serial={}", escape_opt(s)));
        }
        if let Some(w) = &d.wwn {
            dev.push_str(&format!(
                ",wwn=0x{}",
                escape_opt(w.trim_start_matches("0x"))
            ));
        }
        if let (Some(c), false) = (&d.cache, d.kind == DiskKind::Floppy) {
            let wc = matches!(c.as_str(), "none" | "writeback" | "unsafe");
            dev.push_str(if wc {
                ",write-cache=on"
            } else {
                ",write-cache=off"
            });
        }
        if d.shareable && matches!(d.bus, DiskBus::Scsi { .. } | DiskBus::Virtio(_)) {
            dev.push_str(",share-rw=on");
        }
        self.push(["-device", &dev]);
        Ok(())
    }

    /// The tap or macvtap fd is already open in QEMU (see `nic_plumbing`):
    /// no script, nothing QEMU must be privileged for.
    fn nic(&mut self, p: &NicPlan, extra: &str, sndbuf: Option<u64>) -> Result<(), ArgvError> {
        let n = p.index;
        let netdev = match &p.backend {
            NicBackend::User if sndbuf.is_some() => {
                return Err(
                    self.host_lacks("a tap device for <tune><sndbuf> (the NIC is type 'user')")
                );
            }
            NicBackend::User => format!("user,id=hostnet{n}"),
            NicBackend::Tap { .. } | NicBackend::Macvtap { .. } => {
                let mut s = format!("tap,fd={},id=hostnet{n}", p.fd());
                if p.vhost {
                    s.push_str(&format!(",vhost=on,vhostfd={}", p.vhost_fd()));
                }
                if let Some(b) = sndbuf {
                    s.push_str(&format!(",sndbuf={b}"));
                }
                s
            }
        };
        self.push(["-netdev", &netdev]);
        self.push([
            "-device",
            &format!(
                "{},netdev=hostnet{n},id=net{n},mac={}{extra}",
                p.driver,
                format_mac(&p.mac)
            ),
        ]);
        Ok(())
    }

    fn graphics(
        &mut self,
        g: &Graphics,
        audio: u32,
        spice_extra: &[String],
        spice_tls: Option<&Path>,
    ) -> Result<(), ArgvError> {
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
                opt.push_str(&format!(",audiodev=audio{audio}"));
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
                if let Some(tls) = g.tls_port {
                    let Some(dir) = spice_tls else {
                        return Err(self.host_lacks("SPICE TLS certificates (--spice-tls-dir)"));
                    };
                    opt.push_str(&format!(",tls-port={tls},x509-dir={}", escape_path(dir)));
                }
                if g.passwd.is_none() {
                    opt.push_str(",disable-ticketing=on");
                }
                for o in spice_extra {
                    opt.push(',');
                    opt.push_str(&escape_opt(o));
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

/// QEMU's id of USB controller `index`; libvirt calls the first `usb`.
fn usb_id(index: u32) -> String {
    if index == 0 {
        "usb".into()
    } else {
        format!("usb{index}")
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
            ovmf: None,
            hugepages: None,
            user: None,
            cgroups: None,
            spice_tls: None,
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
        let devices: Vec<&str> = option_after(&argv, "-device")
            .into_iter()
            .filter(|d| !d.starts_with("piix3-usb-uhci"))
            .collect();
        assert_eq!(
            devices[0],
            "virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:aa:bb:01,bus=pci.0,addr=0x2"
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
            &option_after(&argv, "-device")[1..3],
            [
                "virtio-blk-pci,bus=pci.0,addr=0x2,drive=flotilla-disk0-format,id=virtio-disk0",
                "virtio-blk-pci,bus=pci.0,addr=0x3,drive=flotilla-disk1-storage,id=virtio-disk1"
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
            "socket,id=charmonitor,path=/run/flt/vms/d/run/qmp.sock,server=on,wait=off"
        );
        assert_eq!(
            option_after(&argv, "-device"),
            [
                // libvirt's implied USB controller, in PIIX3's slot.
                "piix3-usb-uhci,id=usb,bus=pci.0,addr=0x1.0x2",
                "isa-serial,chardev=charserial0,id=serial0,index=0",
                "VGA,id=video0"
            ]
        );
        assert!(
            !argv.to_string().contains("hunter2"),
            "password leaked into argv: {argv}"
        );
    }

    #[test]
    fn unsupported_devices_are_named() {
        let xml = "<domain type='kvm'><name>x</name><memory>1024</memory><os><type>hvm</type></os>\
                   <devices><graphics type='egl-headless'/></devices></domain>";
        let d = Domain::parse("x.xml", xml).expect("ok").model;
        let e = QemuArgv::build(&d, &host(), &VmPaths::new("/tmp/x"), &[]).expect_err("egl");
        assert_eq!(
            e.to_string(),
            "VM 'x': /domain/devices/graphics: graphics type 'egl-headless' is not supported by Flotilla yet"
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
            prop_assert_eq!(&chardev[2], &format!("path=/run/{name}/run/qmp.sock"));
        }
    }
}
