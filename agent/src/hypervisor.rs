//! The hypervisor boundary: every operation [`crate::host_core::HostCore`]
//! asks of the host ([`HvCall`]), its result ([`HvResult`]), and the
//! [`Hypervisor`] trait that carries them out.
//!
//! Two implementations: [`crate::qemu_hypervisor::QemuHypervisor`] (real
//! processes, QMP sockets, files) and [`crate::fake_qemu::FakeQemu`] (in
//! memory, for simulations). `HvCall` is closed: the core can do nothing to
//! the host that is not listed here.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use serde_json::Value;

use crate::argv::{QemuArgv, VmPaths};
use crate::console::ConsoleEndpoint;
use crate::host_networks::HostNetworks;
use crate::interfaces::InterfaceTable;
use crate::nic_plan::NicPlan;
use crate::qemu_process::{ConsoleSecret, LaunchMode, StartTimeouts};
use crate::qmp::QmpCommand;
use crate::storage_copy::NewImage;
use crate::vm_record::VmRecord;

/// A signal for a VM's QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmSignal {
    /// SIGTERM: QEMU exits cleanly.
    Term,
    /// SIGKILL.
    Kill,
}

/// A QEMU start, fully decided by the core.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchPlan {
    /// The VM.
    pub name: String,
    /// Its UUID (on the command line, how a restarted agent recognises it).
    pub uuid: String,
    /// The command line; it holds no secret.
    pub argv: QemuArgv,
    /// Its state files.
    pub paths: VmPaths,
    /// Console passwords, applied over QMP while QEMU is paused.
    pub secrets: Vec<ConsoleSecret>,
    /// Consoles to confirm once the guest runs (`LaunchMode::Run`).
    pub endpoints: Vec<ConsoleEndpoint>,
    /// Run, or wait for an incoming migration.
    pub mode: LaunchMode,
    /// Host devices to create and hand to QEMU as open fds. Macvtaps of an
    /// incoming migration stay down until [`HvCall::SetLinks`].
    pub nics: Vec<NicPlan>,
    /// Step timeouts.
    pub timeouts: StartTimeouts,
    /// Images to create (`qemu-img create`) before QEMU opens them.
    pub images: Vec<NewImage>,
}

/// An operation for the [`Hypervisor`]: the core's only way to touch the host.
#[derive(Debug, Clone, PartialEq)]
pub enum HvCall {
    /// Find every VM record under `state_dir` and whether its QEMU still runs
    /// ([`HvResult::Records`]).
    ScanRecords {
        /// The agent's state directory.
        state_dir: PathBuf,
    },
    /// Find QEMUs running from this state directory that no live record
    /// names (`known`): spawned just before the agent died, before their
    /// record was written ([`HvResult::Strays`]).
    FindStrays {
        /// The agent's state directory.
        state_dir: PathBuf,
        /// VMs with a record whose QEMU runs.
        known: Vec<String>,
    },
    /// Take over a running QEMU found at boot: connect its monitor, watch it.
    Attach {
        /// The VM.
        name: String,
        /// Its UUID.
        uuid: String,
        /// Its pid.
        pid: i32,
        /// Its state files.
        paths: VmPaths,
    },
    /// Read the interface table, report which of `paths` do not exist and
    /// what each of `markers` holds ([`HvResult::Host`]).
    ReadHost {
        /// Files that must exist (disk sources of an incoming migration).
        paths: Vec<String>,
        /// Storage markers to read (see [`crate::storage_proof`]).
        markers: Vec<PathBuf>,
    },
    /// Write each storage marker with its token, durably.
    WriteMarkers {
        /// (marker file, token).
        markers: Vec<(PathBuf, String)>,
    },
    /// Remove storage markers; one already gone is not an error.
    RemoveMarkers {
        /// The marker files.
        paths: Vec<PathBuf>,
    },
    /// Load the network definitions ([`HvResult::Networks`]).
    LoadNetworks {
        /// The networks directory.
        dir: PathBuf,
    },
    /// Spawn QEMU paused, apply secrets, then resume and confirm consoles or
    /// listen for a migration ([`HvResult::Launched`]); watch it afterwards.
    Launch(Box<LaunchPlan>),
    /// One QMP command to a VM ([`HvResult::Qmp`] with its `return`).
    Qmp {
        /// The VM.
        vm: String,
        /// The command.
        cmd: QmpCommand,
        /// How long to wait for the answer.
        timeout: Duration,
    },
    /// One command to the VM's guest agent over its channel's socket
    /// ([`HvResult::Qmp`] with its `return`); fails when no agent answers.
    GuestAgent {
        /// The VM.
        vm: String,
        /// The channel's unix socket on this host.
        socket: PathBuf,
        /// The command (`guest-network-get-interfaces`).
        command: &'static str,
        /// How long to wait for the guest.
        timeout: Duration,
    },
    /// Confirm each console accepts connections (VNC: read the RFB banner).
    ConfirmConsoles {
        /// The VM.
        vm: String,
        /// Its consoles.
        endpoints: Vec<ConsoleEndpoint>,
        /// Per console.
        timeout: Duration,
    },
    /// Signal a VM's QEMU.
    Signal {
        /// The VM.
        vm: String,
        /// Its pid.
        pid: i32,
        /// Which signal.
        signal: VmSignal,
    },
    /// Write the VM's record (and its live definition) atomically.
    WriteRecord {
        /// Where.
        paths: VmPaths,
        /// The record.
        record: VmRecord,
        /// The live XML, when it changed.
        live_xml: Option<String>,
    },
    /// Remove a stopped VM's record, live XML, socket and pidfile (not its
    /// log), and its macvtaps (a tap goes with QEMU's last fd; a macvtap
    /// outlives it).
    RemoveRecord {
        /// The VM.
        name: String,
        /// Where.
        paths: VmPaths,
        /// Its macvtap devices.
        macvtaps: Vec<String>,
        /// Images created for a storage copy the guest never ran on.
        images: Vec<PathBuf>,
        /// Give QEMU's files back to their owners ([`crate::dac`]); not
        /// for a VM that migrated away, whose guest runs on them elsewhere.
        restore_owners: bool,
    },
    /// Delete images created for a storage copy that did not happen.
    RemoveImages {
        /// The images.
        paths: Vec<PathBuf>,
    },
    /// Bring these macvtaps up (the guest's CPUs are about to start here)
    /// or down (they stopped for good: the guest now runs elsewhere).
    SetLinks {
        /// The devices.
        devs: Vec<String>,
        /// Up or down.
        up: bool,
    },
    /// Delete every macvtap Flotilla created (by its alias) whose VM is not in
    /// `keep`: devices of VMs that died with an agent.
    RemoveStrayNics {
        /// VMs whose QEMU runs.
        keep: Vec<String>,
    },
}

/// A QEMU found at boot that no record names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stray {
    /// The VM, from its state directory's name.
    pub name: String,
    /// Its pid.
    pub pid: i32,
}

/// A VM record found at boot.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundRecord {
    /// The record.
    pub record: VmRecord,
    /// Whether its QEMU (pid and `-uuid`) still runs.
    pub alive: bool,
    /// Its live XML (empty when unreadable).
    pub live_xml: String,
}

/// What [`HvCall::ReadHost`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRead {
    /// The interface table, or why it could not be read.
    pub interfaces: Result<InterfaceTable, String>,
    /// The asked-for paths that do not exist.
    pub missing: Vec<String>,
    /// `/dev/vhost-net` exists.
    pub vhost_net: bool,
    /// Each asked-for marker and what it holds (`None`: unreadable or absent).
    pub markers: Vec<(PathBuf, Option<String>)>,
}

/// The result of an [`HvCall`].
#[derive(Debug, Clone)]
pub enum HvResult {
    /// Done, nothing to report.
    Done,
    /// Failed; the text is the cause.
    Failed(String),
    /// [`HvCall::Attach`]: the recorded QEMU is no longer running.
    Exited,
    /// [`HvCall::ScanRecords`].
    Records(Vec<FoundRecord>),
    /// [`HvCall::FindStrays`].
    Strays(Vec<Stray>),
    /// [`HvCall::ReadHost`].
    Host(HostRead),
    /// [`HvCall::LoadNetworks`].
    Networks(HostNetworks),
    /// [`HvCall::Launch`]: QEMU runs (or listens) as `pid`.
    Launched {
        /// QEMU's pid.
        pid: i32,
    },
    /// [`HvCall::Qmp`]: the command's `return` value.
    Qmp(Value),
}

/// A future carrying out one [`HvCall`].
pub type HvFuture = Pin<Box<dyn Future<Output = HvResult> + Send + 'static>>;

/// Carries out [`HvCall`]s: real QEMU ([`crate::qemu_hypervisor`]) or the
/// in-memory [`crate::fake_qemu::FakeQemu`].
pub trait Hypervisor {
    /// Starts `call`; the future yields its result.
    fn call(&self, call: HvCall) -> HvFuture;
}
