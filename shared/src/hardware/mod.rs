//! The virtual hardware a definition asks for, decided once and checked at
//! define.
//!
//! [`plan`] reads a completed definition (see [`complete`]) strictly: every
//! element and attribute is either built into the [`Hardware`] plan, kept as
//! data Flotilla need not act on (metadata, descriptions, `<seclabel>`), or
//! refused with its path. The coordinator runs it at define, so a definition
//! Flotilla cannot run as written is refused there, not at start; the agent
//! renders the same plan into QEMU's argv (`agent/src/argv.rs`), so what
//! define accepted is what QEMU gets. Pure: no host facts; a host that cannot
//! provide what the plan needs (KVM for a host CPU, a firmware file) is the
//! scheduler's and the agent's concern.
//!
//! [`complete`] is what libvirt does at define: it adds the controllers the
//! devices imply and gives every device an address, so PCI slots, and with
//! them guest NIC names, stay the same across starts and migrations.

mod address;
mod devices;
pub mod reader;

pub use address::{complete, PciAddr};
pub use reader::Unsupported;

use crate::xml::tree::Element;
use crate::xml::{Domain, XmlFlavor};
use reader::{Refusals, R};

/// The machine family: where PCI slots and built-in controllers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chipset {
    /// `pc`, `pc-i440fx-*`: PCI root bus `pci.0`, PIIX3 in slot 1.
    I440fx,
    /// `q35`, `pc-q35-*`: PCIe root `pcie.0`, ICH9 in slot 0x1f.
    Q35,
}

impl Chipset {
    /// The family of machine type `machine` (`pc` when absent), if known.
    pub fn of(machine: Option<&str>) -> Option<Chipset> {
        let m = machine.unwrap_or("pc");
        if m == "pc" || m.starts_with("pc-i440fx-") || m == "pc-i440fx" {
            Some(Chipset::I440fx)
        } else if m == "q35" || m.starts_with("pc-q35-") {
            Some(Chipset::Q35)
        } else {
            None
        }
    }

    /// QEMU's id of the root bus.
    pub fn root_bus(self) -> &'static str {
        match self {
            Chipset::I440fx => "pci.0",
            Chipset::Q35 => "pcie.0",
        }
    }

    /// The power-management device `-global` settings address.
    pub fn pm_device(self) -> &'static str {
        match self {
            Chipset::I440fx => "PIIX4_PM",
            Chipset::Q35 => "ICH9-LPC",
        }
    }
}

/// Everything QEMU is asked to build for a VM, in argv order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardware {
    /// Machine family.
    pub chipset: Chipset,
    /// `-machine` options after the type (`acpi=on`, `hpet=off`, …).
    pub machine_opts: Vec<String>,
    /// The guest CPU.
    pub cpu: CpuPlan,
    /// `-smp` topology.
    pub smp: Smp,
    /// BIOS or UEFI.
    pub firmware: Firmware,
    /// Back guest RAM with huge pages.
    pub hugepages: bool,
    /// `<vcpu cpuset>`: host CPUs QEMU's threads are pinned to.
    pub cpuset: Option<Vec<u32>>,
    /// `-rtc` value.
    pub rtc: String,
    /// `-global` settings (timers, power management).
    pub globals: Vec<String>,
    /// `on_reboot` is destroy: QEMU exits instead of resetting.
    pub no_reboot: bool,
    /// `<bootmenu enable timeout>`.
    pub boot_menu: Option<(bool, Option<u64>)>,
    /// Devices and their backends, in argv order.
    pub devices: Vec<Hw>,
    /// `-audiodev` backends by id (`none`, `dbus`).
    pub audio: Vec<(u32, String)>,
    /// A D-Bus display (`<graphics type='dbus'>`).
    pub dbus_display: bool,
    /// Extra `-spice` options per SPICE graphics device, in document order.
    pub spice_opts: Vec<Vec<String>>,
}

/// `-smp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Smp {
    /// vCPUs online at boot.
    pub current: u32,
    /// Maximum vCPUs.
    pub max: u32,
    /// Sockets.
    pub sockets: u32,
    /// Dies per socket.
    pub dies: u32,
    /// Cores per die.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
}

/// The guest CPU model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuPlan {
    /// QEMU's default model.
    Default {
        /// Hyper-V enlightenments (`hv-relaxed=on`, …).
        hv: Vec<String>,
    },
    /// `host-passthrough`: the host's CPU as it is; needs KVM.
    HostPassthrough {
        /// Hyper-V enlightenments and `<feature>`s.
        flags: Vec<String>,
    },
    /// `host-model`: the host's CPU, limited to what migrates; needs KVM.
    HostModel {
        /// Hyper-V enlightenments and `<feature>`s.
        flags: Vec<String>,
    },
    /// `maximum`: everything the accelerator can offer.
    Maximum {
        /// Hyper-V enlightenments and `<feature>`s.
        flags: Vec<String>,
    },
    /// `custom` with a named model.
    Named {
        /// QEMU's model name (`Skylake-Client`, `qemu64`).
        model: String,
        /// `+feature`/`-feature` and Hyper-V flags.
        flags: Vec<String>,
    },
}

impl CpuPlan {
    /// The mode a host must be able to provide, for refusals.
    pub fn needs_kvm(&self) -> bool {
        matches!(
            self,
            CpuPlan::HostPassthrough { .. } | CpuPlan::HostModel { .. }
        )
    }

    /// The named model a host's QEMU must know.
    pub fn model(&self) -> Option<&str> {
        match self {
            CpuPlan::Named { model, .. } => Some(model),
            _ => None,
        }
    }
}

/// Firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS (QEMU's default).
    Bios,
    /// UEFI from pflash: the code read-only, the variables a per-VM copy.
    Efi {
        /// `<loader>`: the code image; the host's OVMF when absent.
        loader: Option<String>,
        /// `<nvram>`: the VM's variable store; in its state directory when absent.
        nvram: Option<String>,
        /// `<nvram template>`: what a new variable store is copied from.
        template: Option<String>,
    },
}

/// A PCI placement, as QEMU takes it.
pub type Slot = Option<PciAddr>;

/// One device (with its backend) QEMU builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hw {
    /// `pcie-root-port`.
    RootPort {
        /// Controller index (its bus number).
        index: u32,
        /// Chassis number.
        chassis: u32,
        /// Port number.
        port: u32,
        /// Where it sits.
        addr: PciAddr,
    },
    /// `pci-bridge`.
    PciBridge {
        /// Controller index.
        index: u32,
        /// Chassis number.
        chassis: u32,
        /// Where it sits.
        addr: PciAddr,
    },
    /// A USB controller (`qemu-xhci`, `piix3-usb-uhci`, …).
    Usb {
        /// QEMU driver.
        driver: &'static str,
        /// Controller index (0 is `usb`).
        index: u32,
        /// Ports, for xHCI.
        ports: Option<u64>,
        /// Where it sits.
        addr: PciAddr,
    },
    /// `virtio-serial-pci`.
    VirtioSerial {
        /// Controller index.
        index: u32,
        /// Maximum ports.
        ports: Option<u64>,
        /// Where it sits.
        addr: PciAddr,
    },
    /// A SCSI controller.
    Scsi {
        /// QEMU driver (`virtio-scsi-pci`, `lsi`).
        driver: &'static str,
        /// Controller index.
        index: u32,
        /// Where it sits.
        addr: PciAddr,
    },
    /// An extra AHCI controller (index 0 on q35 is built in).
    Ahci {
        /// Controller index.
        index: u32,
        /// Where it sits.
        addr: PciAddr,
    },
    /// A disk, CD-ROM or floppy.
    Disk(Box<DiskHw>),
    /// The `n`th `<interface>`: its backend comes from the NIC plan.
    Nic {
        /// Position among the interfaces.
        n: usize,
        /// Where it sits.
        addr: Slot,
        /// `bootindex`.
        boot: Option<u64>,
        /// `<mtu size>` the guest is told (`host_mtu`).
        mtu: Option<u64>,
        /// `<tune><sndbuf>`: the tap's send buffer, in bytes.
        sndbuf: Option<u64>,
    },
    /// A `<serial>` (or a `<console>` that stands for one).
    Serial {
        /// `serialN`.
        n: usize,
        /// Its backend.
        chardev: CharBackend,
        /// `isa-serial`, `usb-serial` or `pci-serial`.
        driver: &'static str,
        /// ISA port index.
        port: u64,
        /// `<log file append>`: everything the guest writes, also to a file.
        log: Option<(String, Option<bool>)>,
    },
    /// A `<console target type='virtio'>`: `virtconsole` on a virtio-serial bus.
    VirtioConsole {
        /// `consoleN`.
        n: usize,
        /// Its backend.
        chardev: CharBackend,
        /// Controller index and port.
        at: (u64, u64),
    },
    /// A `<channel>`: a `virtserialport` (guest agent, spice agent, …).
    Channel {
        /// `channelN`.
        n: usize,
        /// Its backend.
        chardev: CharBackend,
        /// The port's name in the guest.
        name: Option<String>,
        /// Controller index and port.
        at: (u64, u64),
    },
    /// An input device.
    Input {
        /// `inputN`.
        n: usize,
        /// QEMU driver (`usb-tablet`, `virtio-keyboard-pci`, …).
        driver: &'static str,
        /// USB port, for USB devices.
        usb_port: Option<String>,
        /// Where it sits, for virtio devices.
        addr: Slot,
    },
    /// A display adapter.
    Video {
        /// `videoN`.
        n: usize,
        /// QEMU driver.
        driver: &'static str,
        /// `max_outputs`.
        heads: Option<u64>,
        /// QXL `ram` (KiB).
        ram: Option<u64>,
        /// `vram` (KiB).
        vram: Option<u64>,
        /// QXL `vgamem` (KiB).
        vgamem: Option<u64>,
        /// Where it sits (none for `ramfb`).
        addr: Slot,
    },
    /// `virtio-balloon-pci`.
    Balloon {
        /// Where it sits.
        addr: PciAddr,
        /// Statistics period in seconds.
        period: Option<u64>,
    },
    /// `virtio-rng-pci`.
    Rng {
        /// `rngN`.
        n: usize,
        /// Entropy source.
        backend: RngBackend,
        /// `<rate bytes period>`.
        rate: Option<(u64, u64)>,
        /// Where it sits.
        addr: PciAddr,
    },
    /// A watchdog.
    Watchdog {
        /// QEMU driver (`i6300esb`, `ib700`), none for `itco` (built into ICH9).
        driver: Option<&'static str>,
        /// `-watchdog-action`.
        action: &'static str,
        /// Where it sits, for PCI models.
        addr: Slot,
    },
    /// A sound card and its codec.
    Sound {
        /// `soundN`.
        n: usize,
        /// QEMU driver.
        driver: &'static str,
        /// Whether it takes an `hda-duplex` codec.
        hda: bool,
        /// Where it sits.
        addr: Slot,
        /// The `-audiodev` id.
        audio: u32,
    },
}

/// A character device's backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CharBackend {
    /// A pseudo-terminal (what `flotilla console` attaches to).
    Pty,
    /// Discards output.
    Null,
    /// Appends to or truncates a file.
    File {
        /// The file.
        path: String,
        /// Append instead of truncating.
        append: Option<bool>,
    },
    /// A unix socket.
    Unix {
        /// The socket; a file of this name in the VM's state directory when
        /// it starts with no `/`.
        path: String,
        /// QEMU listens (libvirt's `mode='bind'`).
        server: bool,
    },
    /// A TCP socket.
    Tcp {
        /// Host.
        host: String,
        /// Port.
        port: String,
        /// QEMU listens.
        server: bool,
        /// Telnet protocol.
        telnet: bool,
    },
    /// SPICE's agent channel (`spicevmc`).
    SpiceVmc,
}

/// Entropy source for a virtio RNG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RngBackend {
    /// A host file (`/dev/urandom`).
    Random(String),
    /// An EGD daemon over a character device.
    Egd(CharBackend),
    /// QEMU's built-in generator.
    Builtin,
}

/// A disk as QEMU builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskHw {
    /// Position among the disks (names its block nodes).
    pub n: usize,
    /// `<target dev>`.
    pub target: String,
    /// disk, cdrom, floppy.
    pub kind: DiskKind,
    /// Where the data is.
    pub source: DiskSource,
    /// `raw` or `qcow2`.
    pub format: String,
    /// `cache` mode.
    pub cache: Option<String>,
    /// `io` mode (`native`, `threads`, `io_uring`).
    pub io: Option<String>,
    /// `discard` (`unmap`, `ignore`).
    pub discard: Option<String>,
    /// `detect_zeroes` (`on`, `off`, `unmap`).
    pub detect_zeroes: Option<String>,
    /// Read-only.
    pub readonly: bool,
    /// `<shareable/>`.
    pub shareable: bool,
    /// `<serial>`.
    pub serial: Option<String>,
    /// `<boot order>`.
    pub boot: Option<u64>,
    /// `<wwn>`.
    pub wwn: Option<String>,
    /// The bus and the place on it.
    pub bus: DiskBus,
}

/// What kind of drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// A hard disk.
    Disk,
    /// A CD-ROM drive.
    Cdrom,
    /// A floppy drive.
    Floppy,
}

/// Where a disk's data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// An empty drive (a CD-ROM with no medium).
    Empty,
    /// A file.
    File(String),
    /// A host block device.
    Block(String),
    /// An NBD export over TCP.
    Nbd {
        /// Server.
        host: String,
        /// Port.
        port: String,
        /// Export name.
        export: Option<String>,
    },
}

/// A disk's bus and place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskBus {
    /// `virtio-blk-pci`.
    Virtio(Slot),
    /// On an AHCI controller's port.
    Sata {
        /// Controller index.
        controller: u64,
        /// Port.
        unit: u64,
    },
    /// On a SCSI controller.
    Scsi {
        /// Controller index.
        controller: u64,
        /// Bus on it.
        bus: u64,
        /// SCSI target.
        target: u64,
        /// LUN.
        unit: u64,
        /// Driver of that controller (LUN addressing differs).
        virtio: bool,
    },
    /// On the built-in IDE controller.
    Ide {
        /// Bus (0 or 1).
        bus: u64,
        /// Unit on it (0 or 1).
        unit: u64,
    },
    /// On the floppy controller.
    Fdc {
        /// Unit (0 or 1).
        unit: u64,
    },
    /// `usb-storage`.
    Usb {
        /// USB port, when given.
        port: Option<String>,
    },
}

impl DiskHw {
    /// QEMU's device id, as libvirt names it.
    pub fn device_id(&self) -> String {
        match &self.bus {
            DiskBus::Virtio(_) => format!("virtio-disk{}", self.n),
            DiskBus::Sata { controller, unit } => format!("sata{controller}-0-{unit}"),
            DiskBus::Scsi {
                controller,
                bus,
                target,
                unit,
                ..
            } => format!("scsi{controller}-{bus}-{target}-{unit}"),
            DiskBus::Ide { bus, unit } => format!("ide0-{bus}-{unit}"),
            DiskBus::Fdc { unit } => format!("fdc0-0-{unit}"),
            DiskBus::Usb { .. } => format!("usb-disk{}", self.n),
        }
    }
}

/// Why a definition cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{}", list(.0))]
pub struct Refused(pub Vec<Unsupported>);

fn list(v: &[Unsupported]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Reads the hardware of a definition that [`complete`] has seen: every
/// element is built, kept as data, or refused by path.
pub fn plan(domain: &Domain) -> Result<Hardware, Refused> {
    let completed = complete(domain)?;
    let root = completed.to_element(XmlFlavor::Inactive);
    plan_element(&root, &completed)
}

fn plan_element(root: &Element, domain: &Domain) -> Result<Hardware, Refused> {
    let out = Refusals::default();
    let r = R::new(root, "/domain".into(), &out);
    let hw = devices::read_domain(&r, domain);
    r.done();
    match (out.is_empty(), hw) {
        (true, Some(hw)) => Ok(hw),
        _ => {
            let mut v = out.into_vec();
            if v.is_empty() {
                v.push(Unsupported {
                    path: "/domain/os/type".into(),
                    what: "this machine type".into(),
                });
            }
            Err(Refused(v))
        }
    }
}
