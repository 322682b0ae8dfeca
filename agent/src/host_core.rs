//! `HostCore`: every decision the host agent makes, as a synchronous state
//! machine with no I/O, in the shape of quinn-proto's `Connection`.
//!
//! The core owns this host's network definitions, its console and migration
//! port reservations and its VMs' lifecycles ([`VmState`]). It is driven by
//! [`HostCore::handle`]`(now, input)`, which returns [`HostEffect`]s:
//!
//! ```text
//!   shell ── HostInput::Boot ───────────────▶ core ── Hv(ScanRecords) ──▶ hypervisor
//!   shell ── HostInput::Request{id, req} ──▶ core ── Hv{op, call} ─────▶ hypervisor
//!                                             ▲                              │
//!   shell ── HostInput::HvDone{op, result} ───┘◀─────────── result ──────────┘
//!   shell ── HostInput::VmExited{..} ────────▶ core ── Event(VmStopped), Hv(RemoveRecord)
//!   shell ── HostInput::Tick (at WakeAt) ────▶ core ── escalations, polls
//!                                             core ── Reply{id, response} ──▶ caller
//! ```
//!
//! Everything the core must learn from the outside world is an [`HvCall`]
//! carried out by a [`Hypervisor`]: reading the interface table and checking
//! disk paths ([`HvCall::ReadHost`]), loading the networks directory, finding
//! recorded VMs at boot, spawning QEMU with the argv the core built, each QMP
//! command (a closed [`QmpCommand`]), signals, and writing or removing VM
//! records. The one synchronous query is the port bind probe given to
//! [`HostCore::new`] (a real bind in the agent, `|_| true` in a simulation).
//! The only clock is the `now` passed in: deadlines (shutdown escalation, the
//! 60 s wait for an incoming stream) become [`HostEffect::WakeAt`], and the
//! shell answers with [`HostInput::Tick`] at or after that instant.
//!
//! Until the boot scan and every re-attach have finished, requests are queued
//! and served in order afterwards: a restarted agent re-attaches before it
//! serves anything.
//!
//! # Driving it from a simulation
//!
//! [`crate::fake_qemu::FakeQemu`] is an in-memory [`Hypervisor`] whose calls
//! complete at once. A deterministic simulation owns one `FakeQemu` and one
//! `HostCore` per host and runs each step to quiescence with
//! [`crate::fake_qemu::drive`]:
//!
//! ```
//! use std::time::Instant;
//! use flotilla_agent::fake_qemu::{drive, sim_settings, FakeQemu};
//! use flotilla_agent::host_core::{HostCore, HostEffect, HostInput};
//! use flotilla_agent::interfaces::InterfaceTable;
//! use flotilla_shared::proto::{AgentRequest, AgentResponse};
//!
//! let now = Instant::now();
//! let mut fake = FakeQemu::new(InterfaceTable::new().with("br0", &["198.18.4.1"]));
//! let mut core = HostCore::new(sim_settings("h1"), fake.networks(), true, Box::new(|_| true));
//! drive(&mut core, &mut fake, now, HostInput::Boot);
//! let xml = "<domain type='kvm'><name>vm1</name><memory unit='MiB'>64</memory>\
//!            <os><type>hvm</type></os></domain>";
//! let request = AgentRequest::Start { xml: xml.into(), source: "vm1.xml".into(), incarnation: 0 };
//! let out = drive(&mut core, &mut fake, now, HostInput::Request { id: 1, request });
//! assert!(matches!(&out[..], [HostEffect::Reply { id: 1, response: AgentResponse::Started { .. } }]));
//! fake.crash("vm1");
//! for exit in fake.take_exits() {
//!     let out = drive(&mut core, &mut fake, now, exit); // → HostEffect::Event(VmStopped)
//!     assert!(matches!(&out[..], [HostEffect::Event(_)]));
//! }
//! ```
//!
//! An agent restart is `HostCore::new` again over the same `FakeQemu` (its
//! records and processes survive), followed by `HostInput::Boot`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use flotilla_shared::proto::{
    AgentEvent, DiskImage, HostFacts, MigrationProgress, NbdServer, StorageCopy,
};
use flotilla_shared::xml::{Domain, XmlFlavor};
use serde_json::Value;

use crate::argv::{disk_top_nodes, Accel, QemuArgv, QemuHost, VmPaths};
use crate::console::{plan_consoles, ConsoleEndpoint, ConsoleSettings};
use crate::control::{ConsoleInfo, NetStatus, Request, Response, VmSummary};
use crate::host_networks::HostNetworks;
use crate::interfaces::InterfaceTable;
use crate::lease::Lease;
use crate::nic_plan::{attach_problem, plan_nics, NicHost, NicPlan};
use crate::ports::{PortAllocator, MIGRATION_PORTS};
use crate::qemu_process::{ConsoleSecret, LaunchMode, NbdExports, StartTimeouts};
use crate::qmp::{MigrationCapability, QmpCommand};
use crate::resolver::{AddressSource, NetworkResolver};
use crate::storage_copy::{self, NewImage};
use crate::storage_proof;
use crate::vm_record::{vm_dir, VmRecord};
use flotilla_shared::proto::VmRunState;

pub use crate::hypervisor::{
    FoundRecord, HostRead, HvCall, HvFuture, HvResult, Hypervisor, LaunchPlan, VmSignal,
};
pub use crate::vm_state::{InvalidTransition, VmState};

/// Everything the agent is configured with.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Directory of libvirt network XML files.
    pub networks_dir: PathBuf,
    /// Directory for VM state (records, sockets, logs) and the control socket.
    pub state_dir: PathBuf,
    /// Console defaults and policy; `console.host` is this host's name.
    pub console: ConsoleSettings,
    /// QEMU binary and accelerator.
    pub qemu: QemuHost,
    /// Start step timeouts.
    pub timeouts: StartTimeouts,
    /// The network whose address receives incoming migrations; default: the
    /// first network (by name) that resolves.
    pub migration_network: Option<String>,
}

/// The longest ACPI shutdown a request may ask for; longer asks are capped,
/// as a deadline past it would overflow the clock and no guest needs a day.
const MAX_SHUTDOWN_SECS: u64 = 86_400;
/// Timeout of each QMP command the core sends, unless stated otherwise.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// `query-status` for a listing: a busy QEMU must not delay heartbeats.
const LIST_STATUS_TIMEOUT: Duration = Duration::from_millis(500);
/// `system_powerdown` and `quit` during a shutdown, and each wait after `quit`/SIGKILL.
const STOP_STEP: Duration = Duration::from_secs(5);
/// How long a destroy waits after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// How long `MigrateFinish` waits for the incoming stream to complete.
const FINISH_DEADLINE: Duration = Duration::from_secs(60);
/// Interval between `query-status` polls while the stream lands.
const FINISH_POLL: Duration = Duration::from_millis(5);
/// `query-status` timeout while the stream lands.
const FINISH_STATUS_TIMEOUT: Duration = Duration::from_secs(5);

// ------------------------------------------------------------ inputs, effects

/// Everything that happens to the core.
#[derive(Debug, Clone)]
pub enum HostInput {
    /// The agent starts: find recorded VMs and re-attach to the live ones.
    Boot,
    /// A request from the control socket or the coordinator.
    Request {
        /// Chosen by the shell; the reply carries it back.
        id: u64,
        /// The request.
        request: Request,
    },
    /// An earlier [`HostEffect::Hv`] finished.
    HvDone {
        /// The operation's id.
        op: u64,
        /// Its result.
        result: HvResult,
    },
    /// A VM's QEMU is gone.
    VmExited {
        /// The VM.
        name: String,
        /// The pid that exited (an older QEMU of the same name is ignored).
        pid: i32,
        /// Why, as far as the hypervisor knows.
        reason: String,
        /// QEMU's last output lines.
        log_tail: String,
    },
    /// The local address this host's link to the coordinator uses. Without
    /// `--migration-network`, incoming migrations listen there, as libvirt
    /// migrates to the destination's host name: the management network,
    /// which hosts share, rather than a console network that may not route
    /// between them.
    CoordinatorRoute {
        /// The address.
        local: IpAddr,
    },
    /// The coordinator acknowledged a heartbeat (or the registration): the
    /// lease now runs until `until` ([`crate::lease`]).
    LeaseRenewed {
        /// When the acknowledged message was sent, plus the lease length.
        until: Instant,
    },
    /// Time passed: deadlines at or before `now` fire.
    Tick,
}

/// An HA guest as the fence keeper must find it: by pid, confirmed by the
/// UUID on its command line (a pid may be reused).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HaGuest {
    /// The VM.
    pub name: String,
    /// Its UUID.
    pub uuid: String,
    /// QEMU's pid.
    pub pid: i32,
}

/// Everything the core asks its shell to do.
#[derive(Debug, Clone, PartialEq)]
pub enum HostEffect {
    /// Answer request `id`.
    Reply {
        /// The request's id.
        id: u64,
        /// The answer.
        response: Response,
    },
    /// Carry out `call` and feed its result back as [`HostInput::HvDone`] with `op`.
    Hv {
        /// The operation's id.
        op: u64,
        /// What to do.
        call: HvCall,
    },
    /// Tell whoever watches this host (e.g. `VmStopped`).
    Event(AgentEvent),
    /// Feed [`HostInput::Tick`] at or after this instant.
    WakeAt(Instant),
    /// Tell the fence keeper the lease and the HA guests it must kill once
    /// the lease lapses, should the agent not be there to do it.
    LeaseFile {
        /// The lease's expiry.
        until: Instant,
        /// Every HA guest running here.
        guests: Vec<HaGuest>,
    },
}

/// The port bind probe: whether a port is free on this host.
pub type PortProbe = Box<dyn FnMut(u16) -> bool + Send>;

// ---------------------------------------------------------------- the core

struct Vm {
    state: VmState,
    /// QEMU's last known run state, as listings report it.
    status: String,
    record: VmRecord,
    live_xml: String,
    /// The port an incoming migration listens on, released when it finishes.
    migration_port: Option<u16>,
    /// The NBD server receiving copied disks (a destination), stopped
    /// before the guest resumes.
    nbd_port: Option<u16>,
    /// Disks this source mirrors to a destination (targets).
    mirrors: Vec<String>,
    stops: Vec<StopWait>,
    /// A destination told to finish without resuming: the operator had
    /// suspended the guest on its source.
    finish_paused: bool,
}

impl Vm {
    /// The guest ran on this host: images created for its storage copy are
    /// its disks from now on, whatever the record on disk still says.
    fn ran_here(&mut self) {
        self.record.created_images.clear();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopPhase {
    /// `system_powerdown` sent.
    Powerdown,
    /// Waiting for the guest to power off.
    Acpi,
    /// `quit` sent.
    Quit,
    /// Waiting for QEMU to quit.
    QuitWait,
    /// SIGTERM sent (destroy).
    Term,
    /// SIGKILL sent.
    Kill,
}

struct StopWait {
    id: u64,
    /// `Some(timeout)` for a shutdown, `None` for a destroy.
    shutdown: Option<Duration>,
    phase: StopPhase,
    deadline: Option<Instant>,
}

struct StartCtx {
    id: u64,
    domain: Domain,
    incoming: Option<Incoming>,
    incarnation: u64,
}

/// What makes a start a migration's destination.
struct Incoming {
    postcopy: bool,
    /// See [`Request::MigrateIncoming`].
    storage_token: Option<String>,
    /// Disks to receive over NBD.
    copy: Option<StorageCopy>,
    /// `--unsafe`: unshared disks are accepted.
    allow_unsafe: bool,
}

/// One QMP command of a [`Pending::Chain`].
struct Link {
    cmd: QmpCommand,
    /// Its failure does not stop the chain (clean-up of what may not exist).
    best_effort: bool,
}

impl Link {
    fn must(cmd: QmpCommand) -> Link {
        Link {
            cmd,
            best_effort: false,
        }
    }

    fn may(cmd: QmpCommand) -> Link {
        Link {
            cmd,
            best_effort: true,
        }
    }
}

struct LaunchCtx {
    id: u64,
    name: String,
    uuid: String,
    ports: Vec<u16>,
    endpoints: Vec<ConsoleEndpoint>,
    live_xml: String,
    warnings: Vec<String>,
    migration_port: Option<u16>,
    uri: Option<String>,
    launched_at: Instant,
    nics: Vec<NicPlan>,
    nbd: Option<NbdServer>,
    created_images: Vec<PathBuf>,
    incarnation: u64,
    ha: bool,
}

/// What to answer when a single QMP command succeeds.
#[derive(Debug, Clone, Copy)]
enum QmpThen {
    Postcopy,
    ClientMigrateInfo,
    MigrationStatus,
    Cancel,
    Resume,
    Suspend,
    Reset,
    Monitor,
}

enum Pending {
    /// A guest agent command for `domifaddr --source agent`.
    GuestAgent {
        id: u64,
    },
    /// A record written after a suspend or resume; then the answer.
    SuspendRecord {
        id: u64,
        name: String,
        response: Response,
    },
    Scan,
    Strays,
    NicSweep,
    MarkQuery {
        id: u64,
        name: String,
        token: String,
    },
    Marked {
        id: u64,
        disks: Vec<DiskImage>,
    },
    /// QMP commands one after another, answered with `done` at the end.
    Chain {
        id: u64,
        name: String,
        cmd: &'static str,
        best_effort: bool,
        rest: VecDeque<Link>,
        done: String,
    },
    /// The mirrors' half of a source's migration status.
    MirrorStatus {
        id: u64,
        name: String,
        progress: MigrationProgress,
    },
    FinishNbdStop {
        id: u64,
        name: String,
    },
    Attach(Box<FoundRecord>),
    Observe(String),
    StartRead(Box<StartCtx>),
    Launch(Box<LaunchCtx>),
    StartRecord {
        id: u64,
        name: String,
        response: Response,
    },
    NetList {
        id: u64,
    },
    Reload {
        id: u64,
    },
    Qmp {
        id: u64,
        name: String,
        cmd: &'static str,
        then: QmpThen,
    },
    MigrateOut {
        id: u64,
        name: String,
        cmd: &'static str,
        uri: String,
        rest: VecDeque<QmpCommand>,
    },
    ListStatus {
        id: u64,
        index: usize,
    },
    FinishPoll {
        id: u64,
        name: String,
        deadline: Instant,
    },
    FinishLinks {
        id: u64,
        name: String,
    },
    SourceLinksDown {
        id: u64,
        response: Response,
    },
    ResumeLinks {
        id: u64,
        name: String,
    },
    FinishCont {
        id: u64,
        name: String,
    },
    FinishConsoles {
        id: u64,
        name: String,
    },
    FinishRecord {
        id: u64,
        name: String,
    },
    Stop {
        name: String,
        id: u64,
    },
    Ignore,
}

struct ListGather {
    rows: Vec<(VmRecord, Option<String>)>,
    remaining: usize,
}

/// The host agent's decisions: networks, ports, VM lifecycles.
pub struct HostCore {
    settings: AgentSettings,
    networks: HostNetworks,
    ports: PortAllocator,
    probe: PortProbe,
    reattach: bool,
    vms: BTreeMap<String, Vm>,
    starting: BTreeSet<String>,
    /// Exits of QEMUs whose launch has not answered yet: (pid, reason).
    early_exits: BTreeMap<String, (i32, String)>,
    /// See [`HostInput::CoordinatorRoute`].
    coordinator_route: Option<IpAddr>,
    pending: HashMap<u64, Pending>,
    next_op: u64,
    lists: HashMap<u64, ListGather>,
    /// Finish polls due: (when, request id, VM, deadline).
    polls: Vec<(Instant, u64, String, Instant)>,
    /// `None` until boot; `Some(n)`: n re-attaches outstanding.
    booting: Option<usize>,
    ready: bool,
    queued: VecDeque<(u64, Request)>,
    lease: Lease,
    /// HA guests being launched (name → UUID): the keeper must know them
    /// before their QEMU exists, or an agent that hangs mid-launch would
    /// leave one it cannot kill.
    ha_launching: BTreeMap<String, String>,
}

impl HostCore {
    /// A core for this host. With `reattach`, boot takes over running VMs
    /// and removes the records of dead ones; without it (one-shot starts)
    /// boot only reserves the live VMs' ports. `probe` says whether a port
    /// is free (a real bind in the agent).
    pub fn new(
        settings: AgentSettings,
        networks: HostNetworks,
        reattach: bool,
        probe: PortProbe,
    ) -> Self {
        HostCore {
            settings,
            networks,
            ports: PortAllocator::new(),
            probe,
            reattach,
            vms: BTreeMap::new(),
            starting: BTreeSet::new(),
            early_exits: BTreeMap::new(),
            coordinator_route: None,
            pending: HashMap::new(),
            next_op: 1,
            lists: HashMap::new(),
            polls: Vec::new(),
            booting: None,
            ready: false,
            queued: VecDeque::new(),
            lease: Lease::default(),
            ha_launching: BTreeMap::new(),
        }
    }

    /// The agent's state directory.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.settings.state_dir
    }

    /// This host's name.
    pub fn host(&self) -> &str {
        &self.settings.console.host
    }

    /// Whether boot (scan and re-attach) has finished and requests are served.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// A VM's lifecycle state; `None` when it does not run here.
    pub fn vm_state(&self, name: &str) -> Option<VmState> {
        if self.starting.contains(name) {
            return Some(VmState::Starting);
        }
        self.vms.get(name).map(|v| v.state)
    }

    /// VMs whose start has begun but not finished, as `prelaunch`: a report
    /// must list every VM the host may run, or a coordinator whose start got
    /// no answer would record it as shut off and could start it elsewhere.
    fn starting_summaries(&self) -> Vec<VmSummary> {
        self.starting
            .iter()
            .map(|name| VmSummary {
                suspended: false,
                name: name.clone(),
                uuid: String::new(),
                pid: 0,
                state: VmRunState::Prelaunch,
                consoles: Vec::new(),
                incarnation: 0,
                ha: false,
            })
            .collect()
    }

    /// Every VM this core knows, starting ones included, with its state (for
    /// a simulation's invariant checks).
    pub fn vm_states(&self) -> Vec<(String, VmState)> {
        let mut all: Vec<(String, VmState)> = self
            .vms
            .iter()
            .map(|(n, v)| (n.clone(), v.state))
            .chain(self.starting.iter().map(|n| (n.clone(), VmState::Starting)))
            .collect();
        all.sort();
        all
    }

    /// Whether `port` is reserved (consoles, migrations, re-attached VMs).
    pub fn port_reserved(&self, port: u16) -> bool {
        self.ports.is_reserved(port)
    }

    /// Host facts for a heartbeat: the VMs with their last known QEMU run
    /// state, the networks resolved against `interfaces`.
    pub fn facts(&self, cpus: u32, memory_mib: u64, interfaces: &InterfaceTable) -> HostFacts {
        HostFacts {
            host: self.host().to_string(),
            cpus,
            memory_mib,
            networks: self.net_statuses(interfaces),
            vms: self
                .vms
                .values()
                .map(|v| summary(&v.record, &v.status))
                .collect(),
            machine_types: Default::default(),
            fence: Default::default(),
        }
    }

    /// The HA guests running or being launched here, for the fence keeper
    /// (pid 0: not known yet; the keeper finds it by UUID).
    pub fn ha_guests(&self) -> Vec<HaGuest> {
        self.vms
            .values()
            .filter(|v| v.record.ha)
            .map(|v| HaGuest {
                name: v.record.name.clone(),
                uuid: v.record.uuid.clone(),
                pid: v.record.pid,
            })
            .chain(self.ha_launching.iter().map(|(name, uuid)| HaGuest {
                name: name.clone(),
                uuid: uuid.clone(),
                pid: 0,
            }))
            .collect()
    }

    /// Rewrites the fence keeper's file, when there is a lease to keep.
    fn publish_lease(&self, out: &mut Vec<HostEffect>) {
        if let Some(until) = self.lease.until() {
            out.push(HostEffect::LeaseFile {
                until,
                guests: self.ha_guests(),
            });
        }
    }

    /// Whether the fence holds, so a watchdog may be petted: the lease is
    /// valid (or was never granted), or no HA guest is left running here.
    pub fn fence_holds(&self, now: Instant) -> bool {
        self.lease.state(now) != crate::lease::LeaseState::Lapsed
            || (self.vms.values().all(|v| !v.record.ha) && self.ha_launching.is_empty())
    }

    /// At expiry: every HA guest is killed, since the coordinator may start
    /// it elsewhere from now on. Non-HA guests keep running: nobody
    /// restarts them.
    fn enforce_lease(&mut self, now: Instant, out: &mut Vec<HostEffect>) {
        if !self.lease.take_expiry(now) {
            return;
        }
        let doomed: Vec<(String, i32)> = self
            .vms
            .values()
            .filter(|v| v.record.ha)
            .map(|v| (v.record.name.clone(), v.record.pid))
            .collect();
        tracing::warn!(host = %self.host(), guests = doomed.len(),
            "lease from the coordinator expired: killing every HA guest");
        for (name, pid) in doomed {
            self.kill_fenced(&name, pid, out);
        }
    }

    fn kill_fenced(&mut self, name: &str, pid: i32, out: &mut Vec<HostEffect>) {
        tracing::warn!(vm = %name, pid, host = %self.host(), "fencing: SIGKILL to HA guest");
        self.set_state(name, VmState::Stopping);
        let call = HvCall::Signal {
            vm: name.to_string(),
            pid,
            signal: VmSignal::Kill,
        };
        self.hv(out, Pending::Ignore, call);
    }

    /// Feeds one input; returns what to do, in order.
    pub fn handle(&mut self, now: Instant, input: HostInput) -> Vec<HostEffect> {
        let mut out = Vec::new();
        match input {
            HostInput::Boot => {
                if self.booting.is_none() {
                    self.booting = Some(0);
                    let state_dir = self.settings.state_dir.clone();
                    self.hv(&mut out, Pending::Scan, HvCall::ScanRecords { state_dir });
                }
            }
            HostInput::Request { id, request } => {
                if self.ready {
                    self.request(now, id, request, &mut out);
                } else {
                    self.queued.push_back((id, request));
                }
            }
            HostInput::HvDone { op, result } => {
                if let Some(p) = self.pending.remove(&op) {
                    self.done(now, p, result, &mut out);
                }
            }
            HostInput::VmExited {
                name,
                pid,
                reason,
                log_tail,
            } => self.exited(name, pid, reason, log_tail, &mut out),
            HostInput::CoordinatorRoute { local } => self.coordinator_route = Some(local),
            HostInput::LeaseRenewed { until } => {
                self.lease.renew(until);
                out.extend(self.lease.wakes().into_iter().map(HostEffect::WakeAt));
                self.publish_lease(&mut out);
            }
            HostInput::Tick => self.tick(now, &mut out),
        }
        out
    }

    fn hv(&mut self, out: &mut Vec<HostEffect>, pending: Pending, call: HvCall) {
        let op = self.next_op;
        self.next_op += 1;
        self.pending.insert(op, pending);
        out.push(HostEffect::Hv { op, call });
    }

    fn qmp(&mut self, out: &mut Vec<HostEffect>, pending: Pending, vm: &str, cmd: QmpCommand) {
        self.qmp_timeout(out, pending, vm, cmd, QMP_TIMEOUT);
    }

    fn qmp_timeout(
        &mut self,
        out: &mut Vec<HostEffect>,
        pending: Pending,
        vm: &str,
        cmd: QmpCommand,
        timeout: Duration,
    ) {
        let call = HvCall::Qmp {
            vm: vm.to_string(),
            cmd,
            timeout,
        };
        self.hv(out, pending, call);
    }

    fn not_running(&self, name: &str) -> Response {
        Response::Error(format!(
            "Requested operation is not valid: domain '{name}' is not running on host {}",
            self.host()
        ))
    }

    fn paths(&self, name: &str) -> VmPaths {
        VmPaths::new(vm_dir(&self.settings.state_dir, name))
    }

    /// Moves a VM to `to` if that is a valid move; logs and stays otherwise.
    fn set_state(&mut self, name: &str, to: VmState) {
        if let Some(vm) = self.vms.get_mut(name) {
            match vm.state.transition(to) {
                Ok(s) => {
                    vm.state = s;
                    vm.status = s.qemu_status().to_string();
                    if s == VmState::Running {
                        vm.ran_here();
                    }
                }
                Err(e) => tracing::debug!(vm = %name, error = %e, "lifecycle move ignored"),
            }
        }
    }

    /// Records a `query-status` answer.
    fn observe(&mut self, name: &str, status: &str) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        vm.status = status.to_string();
        if status == "running" {
            vm.ran_here();
        }
        // While the guest is sent away it keeps running; query-migrate decides.
        if matches!(vm.state, VmState::Stopping | VmState::Outgoing) {
            return;
        }
        if let Some(to) = VmState::from_qemu_status(status) {
            if to != vm.state {
                if let Ok(s) = vm.state.transition(to) {
                    vm.state = s;
                }
            }
        }
    }

    // ------------------------------------------------------------ requests

    fn request(&mut self, now: Instant, id: u64, req: Request, out: &mut Vec<HostEffect>) {
        let reply =
            |out: &mut Vec<HostEffect>, response| out.push(HostEffect::Reply { id, response });
        match req {
            Request::Start { .. } | Request::MigrateIncoming { .. }
                if self.lease.refuses_start(now, self.host()).is_some() =>
            {
                let why = self
                    .lease
                    .refuses_start(now, self.host())
                    .unwrap_or_default();
                reply(out, Response::Error(why))
            }
            Request::Start {
                xml,
                source,
                incarnation,
            } => self.start(id, xml, source, incarnation, None, out),
            Request::MigrateIncoming {
                xml,
                source,
                postcopy,
                storage_token,
                copy,
                allow_unsafe,
                incarnation,
            } => {
                let incoming = Incoming {
                    postcopy,
                    storage_token,
                    copy,
                    allow_unsafe,
                };
                self.start(id, xml, source, incarnation, Some(incoming), out)
            }
            Request::MarkStorage { name, token } => {
                if !self.vms.contains_key(&name) {
                    return reply(out, self.not_running(&name));
                }
                // What QEMU has open (format, size, backing file) tells a
                // destination that copies the disks what to create.
                let pending = Pending::MarkQuery {
                    id,
                    name: name.clone(),
                    token,
                };
                self.qmp(out, pending, &name, QmpCommand::QueryBlock);
            }
            Request::MirrorStorage {
                name,
                nbd,
                targets,
                mode,
                bandwidth_mib_s,
            } => {
                let Some(vm) = self.vms.get_mut(&name) else {
                    return reply(out, self.not_running(&name));
                };
                let nodes = Domain::parse(&name, &vm.live_xml)
                    .map(|d| disk_top_nodes(&d.model))
                    .unwrap_or_default();
                let mut chain = Vec::new();
                for t in &targets {
                    let Some((_, node)) = nodes.iter().find(|(target, _)| target == t) else {
                        return reply(out, Response::Error(format!("VM '{name}' has no disk {t}")));
                    };
                    let job = storage_copy::mirror_job(t);
                    // What an earlier, failed attempt may have left behind.
                    chain.push(Link::may(QmpCommand::JobDismiss { job: job.clone() }));
                    chain.push(Link::may(QmpCommand::BlockdevDel { node: job.clone() }));
                    chain.push(Link::must(QmpCommand::NbdClientAdd {
                        node: job.clone(),
                        host: nbd.host.clone(),
                        port: nbd.port,
                        export: storage_copy::export_name(t),
                    }));
                    chain.push(Link::must(QmpCommand::BlockdevMirror {
                        job: job.clone(),
                        device: node.clone(),
                        target: job,
                        sync: storage_copy::sync_mode(mode),
                        speed: bandwidth_mib_s.unwrap_or(0) << 20,
                    }));
                }
                vm.mirrors = targets.clone();
                let done = format!(
                    "mirroring {} disk(s) of '{name}' to {}:{}",
                    targets.len(),
                    nbd.host,
                    nbd.port
                );
                self.chain(id, &name, chain, done, out);
            }
            Request::CompleteMirrors { name } => {
                let Some(vm) = self.vms.get(&name) else {
                    return reply(out, self.not_running(&name));
                };
                let chain = vm
                    .mirrors
                    .iter()
                    .map(|t| {
                        Link::must(QmpCommand::BlockJobCancel {
                            job: storage_copy::mirror_job(t),
                            force: false,
                        })
                    })
                    .collect();
                let done = format!("{} mirror(s) completing", vm.mirrors.len());
                self.chain(id, &name, chain, done, out);
            }
            Request::ContinueSwitchover { name } => {
                let Some(vm) = self.vms.get_mut(&name) else {
                    return reply(out, self.not_running(&name));
                };
                let mut chain = Vec::new();
                for t in std::mem::take(&mut vm.mirrors) {
                    let job = storage_copy::mirror_job(&t);
                    chain.push(Link::must(QmpCommand::JobDismiss { job: job.clone() }));
                    chain.push(Link::may(QmpCommand::BlockdevDel { node: job }));
                }
                chain.push(Link::must(QmpCommand::MigrateContinue));
                self.chain(id, &name, chain, "switching over".into(), out);
            }
            Request::CancelMirrors { name } => {
                let Some(vm) = self.vms.get_mut(&name) else {
                    return reply(out, self.not_running(&name));
                };
                // A source paused before switchover stays paused until told:
                // cancelling the migration (a no-op when none is active) runs
                // its guest again. Cancelled jobs conclude on their own; the
                // next attempt dismisses them and removes their NBD clients.
                let chain = std::iter::once(Link::may(QmpCommand::MigrateCancel))
                    .chain(std::mem::take(&mut vm.mirrors).iter().map(|t| {
                        Link::may(QmpCommand::BlockJobCancel {
                            job: storage_copy::mirror_job(t),
                            force: true,
                        })
                    }))
                    .collect();
                self.chain(id, &name, chain, "mirrors cancelled".into(), out);
            }
            Request::StartPostcopy { name } => self.simple_qmp(
                id,
                name,
                QmpCommand::MigrateStartPostcopy,
                QmpThen::Postcopy,
                out,
            ),
            Request::ClientMigrateInfo {
                name,
                hostname,
                port,
            } => self.simple_qmp(
                id,
                name,
                QmpCommand::ClientMigrateInfo { hostname, port },
                QmpThen::ClientMigrateInfo,
                out,
            ),
            Request::MigrateOut {
                name,
                uri,
                max_downtime_ms,
                bandwidth_mib_s,
                auto_converge,
                postcopy,
            } => {
                let Some(vm) = self.vms.get(&name) else {
                    return reply(out, self.not_running(&name));
                };
                // Mirrored disks must finish while the guest is stopped and
                // before the source lets go of them; always set, so a plain
                // retry after a copying attempt does not stop there.
                let pause = !vm.mirrors.is_empty();
                let rest: VecDeque<QmpCommand> = VecDeque::from([
                    QmpCommand::MigrateSetParameters {
                        downtime_limit_ms: max_downtime_ms,
                        max_bandwidth: bandwidth_mib_s.map(|mib| mib << 20),
                    },
                    QmpCommand::Migrate { uri: uri.clone() },
                ]);
                let first = QmpCommand::MigrateSetCapabilities {
                    capabilities: vec![
                        (MigrationCapability::AutoConverge, auto_converge),
                        (MigrationCapability::PostcopyRam, postcopy),
                        (MigrationCapability::PauseBeforeSwitchover, pause),
                    ],
                };
                let pending = Pending::MigrateOut {
                    id,
                    name: name.clone(),
                    cmd: first.name(),
                    uri,
                    rest,
                };
                self.qmp(out, pending, &name, first);
            }
            Request::MigrationStatus { name } => self.simple_qmp(
                id,
                name,
                QmpCommand::QueryMigrate,
                QmpThen::MigrationStatus,
                out,
            ),
            Request::MigrateCancel { name } => {
                self.simple_qmp(id, name, QmpCommand::MigrateCancel, QmpThen::Cancel, out)
            }
            Request::Resume {
                name,
                operator: false,
            } if self.vms.get(&name).is_some_and(|v| v.record.suspended) => {
                // A migration gives the guest back to its source, which the
                // operator had suspended: it holds the guest, paused.
                self.set_state(&name, VmState::Paused);
                reply(
                    out,
                    Response::Done(format!(
                        "Domain '{name}' kept paused: suspended by the operator"
                    )),
                )
            }
            Request::Resume { name, .. } => {
                // A source resumed after its migration completed had its
                // macvtaps taken down; they come back before its CPUs do.
                let devs = self.macvtaps(&name);
                if devs.is_empty() {
                    self.simple_qmp(id, name, QmpCommand::Cont, QmpThen::Resume, out)
                } else {
                    let call = HvCall::SetLinks { devs, up: true };
                    self.hv(out, Pending::ResumeLinks { id, name }, call);
                }
            }
            // A relay turns its stream into raw bytes, so only the
            // coordinator link can carry one out ([`crate::console_relay`]).
            Request::OpenConsole { .. } | Request::OpenSerial { .. } => reply(
                out,
                Response::Error(
                    "a console relay needs a stream of its own: open it from the coordinator"
                        .into(),
                ),
            ),
            Request::MonitorCommand { name, command } => self.simple_qmp(
                id,
                name,
                QmpCommand::HumanMonitor(command),
                QmpThen::Monitor,
                out,
            ),
            Request::MigrateFinish { name, paused } => {
                let Some(vm) = self.vms.get_mut(&name) else {
                    return reply(out, self.not_running(&name));
                };
                vm.finish_paused = paused;
                self.poll_finish(id, &name, now + FINISH_DEADLINE, out);
            }
            Request::Shutdown { name, timeout_secs } => {
                if !self.vms.contains_key(&name) {
                    return reply(out, self.not_running(&name));
                }
                self.set_state(&name, VmState::Stopping);
                if let Some(vm) = self.vms.get_mut(&name) {
                    vm.stops.push(StopWait {
                        id,
                        shutdown: Some(Duration::from_secs(timeout_secs.min(MAX_SHUTDOWN_SECS))),
                        phase: StopPhase::Powerdown,
                        deadline: None,
                    });
                }
                let pending = Pending::Stop {
                    name: name.clone(),
                    id,
                };
                self.qmp_timeout(out, pending, &name, QmpCommand::SystemPowerdown, STOP_STEP);
            }
            Request::Destroy { name } => {
                let Some(vm) = self.vms.get_mut(&name) else {
                    return reply(out, self.not_running(&name));
                };
                let pid = vm.record.pid;
                vm.stops.push(StopWait {
                    id,
                    shutdown: None,
                    phase: StopPhase::Term,
                    deadline: Some(now + TERM_GRACE),
                });
                self.set_state(&name, VmState::Stopping);
                let call = HvCall::Signal {
                    vm: name,
                    pid,
                    signal: VmSignal::Term,
                };
                self.hv(out, Pending::Ignore, call);
                out.push(HostEffect::WakeAt(now + TERM_GRACE));
            }
            Request::List => {
                if self.vms.is_empty() {
                    let vms = self.starting_summaries();
                    return reply(out, Response::Vms(vms));
                }
                let rows: Vec<(VmRecord, Option<String>)> = self
                    .vms
                    .values()
                    .map(|v| (v.record.clone(), None))
                    .collect();
                let names: Vec<String> = self.vms.keys().cloned().collect();
                self.lists.insert(
                    id,
                    ListGather {
                        remaining: rows.len(),
                        rows,
                    },
                );
                for (index, name) in names.iter().enumerate() {
                    let pending = Pending::ListStatus { id, index };
                    self.qmp_timeout(
                        out,
                        pending,
                        name,
                        QmpCommand::QueryStatus,
                        LIST_STATUS_TIMEOUT,
                    );
                }
            }
            Request::DomDisplay { name } => {
                let response = match self.vms.get(&name) {
                    Some(vm) => Response::Consoles(consoles(&vm.record.endpoints)),
                    None => self.not_running(&name),
                };
                reply(out, response)
            }
            Request::Reset { name } => {
                self.simple_qmp(id, name, QmpCommand::SystemReset, QmpThen::Reset, out)
            }
            Request::Suspend { name } => {
                self.simple_qmp(id, name, QmpCommand::Stop, QmpThen::Suspend, out)
            }
            Request::GuestInterfaces { name } => {
                let socket = match self.vms.get(&name) {
                    None => return reply(out, self.not_running(&name)),
                    Some(vm) => Domain::parse(&name, &vm.live_xml).ok().and_then(|d| {
                        crate::guest_agent::socket_of(&d.model, &self.paths(&name).run_dir())
                    }),
                };
                match socket {
                    Some(socket) => self.hv(
                        out,
                        Pending::GuestAgent { id },
                        HvCall::GuestAgent {
                            vm: name,
                            socket,
                            command: "guest-network-get-interfaces",
                            timeout: Duration::from_secs(5),
                        },
                    ),
                    None => reply(
                        out,
                        Response::Error(format!(
                            "domain '{name}' has no guest agent channel (<channel type='unix'>\
                             <target type='virtio' name='org.qemu.guest_agent.0'/></channel>)"
                        )),
                    ),
                }
            }
            Request::DumpXml { name } => {
                let response = match self.vms.get(&name) {
                    Some(vm) => Response::Xml(vm.live_xml.clone()),
                    None => self.not_running(&name),
                };
                reply(out, response)
            }
            Request::NetList => self.hv(
                out,
                Pending::NetList { id },
                HvCall::ReadHost {
                    paths: Vec::new(),
                    markers: Vec::new(),
                },
            ),
            Request::ReloadNetworks => {
                let dir = self.settings.networks_dir.clone();
                self.hv(out, Pending::Reload { id }, HvCall::LoadNetworks { dir })
            }
        }
    }

    fn simple_qmp(
        &mut self,
        id: u64,
        name: String,
        cmd: QmpCommand,
        then: QmpThen,
        out: &mut Vec<HostEffect>,
    ) {
        if !self.vms.contains_key(&name) {
            let response = self.not_running(&name);
            out.push(HostEffect::Reply { id, response });
            return;
        }
        let pending = Pending::Qmp {
            id,
            name: name.clone(),
            cmd: cmd.name(),
            then,
        };
        self.qmp(out, pending, &name, cmd);
    }

    fn start(
        &mut self,
        id: u64,
        xml: String,
        source: String,
        incarnation: u64,
        incoming: Option<Incoming>,
        out: &mut Vec<HostEffect>,
    ) {
        let mut reply = |response| out.push(HostEffect::Reply { id, response });
        let domain = match Domain::parse(&source, &xml) {
            Ok(d) => d.model,
            Err(e) => return reply(Response::Error(e.to_string())),
        };
        let name = domain.name.clone();
        if self.vms.contains_key(&name) || self.starting.contains(&name) {
            return reply(Response::Error(format!(
                "Requested operation is not valid: domain '{name}' is already running on host {}",
                self.host()
            )));
        }
        let uuid = domain.uuid.hyphenated().to_string();
        if let Some(other) = self.vms.values().find(|v| v.record.uuid == uuid) {
            return reply(Response::Error(format!(
                "domain '{name}' has the UUID {uuid} of running domain '{}'",
                other.record.name
            )));
        }
        // Migration moves memory, not disks: they must already be here, and
        // be the very storage the source uses.
        let mut paths: Vec<String> = match incoming {
            Some(_) => domain
                .disks()
                .filter_map(|d| d.source_path())
                .map(str::to_string)
                .collect(),
            None => Vec::new(),
        };
        // A copy of the top image needs its backing files here.
        if let Some(copy) = incoming.as_ref().and_then(|i| i.copy.as_ref()) {
            paths.extend(copy.disks.iter().filter_map(|d| d.backing.clone()));
        }
        let markers = match incoming.as_ref().and_then(|i| i.storage_token.as_ref()) {
            Some(_) => storage_proof::writable_disks(&domain)
                .iter()
                .map(storage_proof::WritableDisk::marker)
                .collect(),
            None => Vec::new(),
        };
        self.starting.insert(name);
        let ctx = StartCtx {
            id,
            domain,
            incoming,
            incarnation,
        };
        self.hv(
            out,
            Pending::StartRead(Box::new(ctx)),
            HvCall::ReadHost { paths, markers },
        );
    }

    /// Plans consoles, argv and the migration listener once the host is read.
    fn plan_start(
        &mut self,
        now: Instant,
        ctx: StartCtx,
        read: HostRead,
        out: &mut Vec<HostEffect>,
    ) {
        let StartCtx {
            id,
            domain,
            incoming,
            incarnation,
        } = ctx;
        let name = domain.name.clone();
        let host = self.host().to_string();
        let fail = |core: &mut Self, out: &mut Vec<HostEffect>, ports: &[u16], msg: String| {
            ports.iter().for_each(|p| core.ports.release(*p));
            core.starting.remove(&name);
            out.push(HostEffect::Reply {
                id,
                response: Response::Error(msg),
            });
        };
        let table = match read.interfaces {
            Ok(t) => t,
            Err(e) => return fail(self, out, &[], e),
        };
        let paths = self.paths(&name);
        let plan = match plan_consoles(
            &domain,
            &self.networks.networks,
            &table,
            &self.settings.console,
            &paths.run_dir(),
            &mut self.ports,
            &mut *self.probe,
        ) {
            Ok(p) => p,
            Err(e) => return fail(self, out, &[], e.to_string()),
        };
        for w in &plan.warnings {
            tracing::warn!(vm = %name, host = %host, "{w}");
        }
        let mut live = plan.live.clone();
        let taken = self.nic_devices_in_use();
        let nic_host = NicHost {
            host: &host,
            networks: &self.networks.networks,
            table: &table,
            vhost_net: read.vhost_net && self.settings.qemu.accel == Accel::Kvm,
            taken: &taken,
        };
        let nics = match plan_nics(&mut live, &nic_host) {
            Ok(n) => n,
            Err(e) => return fail(self, out, &plan.ports, e.to_string()),
        };
        let argv = match QemuArgv::build(&live, &self.settings.qemu, &paths, &nics) {
            Ok(a) => a,
            Err(e) => return fail(self, out, &plan.ports, e.to_string()),
        };
        let mut ports = plan.ports.clone();
        let mut images: Vec<NewImage> = Vec::new();
        let (argv, mode, migration_port) = if let Some(Incoming {
            postcopy,
            storage_token,
            copy,
            allow_unsafe,
        }) = incoming
        {
            // Copied disks are created here when missing.
            if let Some(copy) = &copy {
                images = match storage_copy::images_to_create(&name, &host, copy, &read.missing) {
                    Ok(i) => i,
                    Err(e) => return fail(self, out, &ports, e),
                };
            }
            let copied = |p: &String| {
                copy.as_ref()
                    .is_some_and(|c| c.disks.iter().any(|d| d.path == *p))
            };
            if let Some(missing) = read.missing.iter().find(|m| !copied(m)) {
                let msg = format!(
                    "cannot accept VM '{name}' on host {host}: disk source {missing} does not exist \
                     here (live migration needs storage both hosts see; --copy-storage-all \
                     copies writable disks)"
                );
                return fail(self, out, &ports, msg);
            }
            if let Some(token) = &storage_token {
                let disks = storage_proof::writable_disks(&domain);
                let usage = match &copy {
                    Some(c) => storage_proof::Use::Copied(c.mode.flag()),
                    None => storage_proof::Use::InPlace { allow_unsafe },
                };
                if let Err(msg) =
                    storage_proof::check(&name, &host, token, &disks, &read.markers, usage)
                {
                    return fail(self, out, &ports, msg);
                }
                if allow_unsafe && copy.is_none() {
                    tracing::warn!(vm = %name, host = %host, "accepting disks without proof of shared storage (--unsafe)");
                }
                // Proven: the markers have done their work.
                let paths = disks
                    .iter()
                    .map(storage_proof::WritableDisk::marker)
                    .collect();
                self.hv(out, Pending::Ignore, HvCall::RemoveMarkers { paths });
            }
            let addr = match self.migration_address(&table) {
                Ok(a) => a,
                Err(e) => return fail(self, out, &ports, e),
            };
            let Some(port) = self.migration_port() else {
                return fail(
                    self,
                    out,
                    &ports,
                    format!("no free migration port on host {host}"),
                );
            };
            ports.push(port);
            let uri = match addr {
                IpAddr::V6(a) => format!("tcp:[{a}]:{port}"),
                IpAddr::V4(a) => format!("tcp:{a}:{port}"),
            };
            // Copied disks arrive over NBD on the same network as the stream.
            let nbd = match copy.filter(|c| !c.disks.is_empty()) {
                None => None,
                Some(copy) => {
                    let Some(nbd_port) = self.migration_port() else {
                        return fail(
                            self,
                            out,
                            &ports,
                            format!("no free port for the disks' NBD server on host {host}"),
                        );
                    };
                    ports.push(nbd_port);
                    let nodes = disk_top_nodes(&domain);
                    let exports = copy
                        .disks
                        .iter()
                        .filter_map(|d| {
                            let (_, node) = nodes.iter().find(|(t, _)| *t == d.target)?;
                            Some((node.clone(), storage_copy::export_name(&d.target)))
                        })
                        .collect();
                    Some(NbdExports {
                        host: addr.to_string(),
                        port: nbd_port,
                        exports,
                    })
                }
            };
            (
                argv.with_incoming_defer(),
                LaunchMode::Incoming { uri, postcopy, nbd },
                Some(port),
            )
        } else {
            (argv, LaunchMode::Run, None)
        };
        let secrets: Vec<ConsoleSecret> = live
            .graphics()
            .filter_map(|g| {
                g.passwd.as_ref().map(|p| ConsoleSecret {
                    protocol: g.protocol.as_str(),
                    password: p.clone(),
                    valid_to: g.passwd_valid_to.clone(),
                })
            })
            .collect();
        tracing::info!(vm = %name, host = %host, argv = %argv, "starting QEMU");
        let (uri, nbd) = match &mode {
            LaunchMode::Incoming { uri, nbd, .. } => (
                Some(uri.clone()),
                nbd.as_ref().map(|n| NbdServer {
                    host: n.host.clone(),
                    port: n.port,
                }),
            ),
            LaunchMode::Run => (None, None),
        };
        let created_images = images.iter().map(|i| i.path.clone()).collect();
        let uuid = domain.uuid.hyphenated().to_string();
        let launch = LaunchPlan {
            name: name.clone(),
            uuid: uuid.clone(),
            argv,
            paths,
            secrets,
            endpoints: plan.endpoints.clone(),
            mode,
            nics: nics.clone(),
            timeouts: self.settings.timeouts,
            images,
        };
        let ctx = LaunchCtx {
            id,
            name,
            uuid,
            ports,
            endpoints: plan.endpoints,
            live_xml: live.to_xml(XmlFlavor::Live),
            nics,
            warnings: plan.warnings,
            migration_port,
            uri,
            launched_at: now,
            nbd,
            created_images,
            incarnation,
            ha: domain.ha(),
        };
        if ctx.ha {
            // Written before QEMU starts (effects run in order).
            self.ha_launching.insert(ctx.name.clone(), ctx.uuid.clone());
            self.publish_lease(out);
        }
        self.hv(
            out,
            Pending::Launch(Box::new(ctx)),
            HvCall::Launch(Box::new(launch)),
        );
    }

    /// A port from the migration range (streams and NBD servers), the one
    /// released longest ago first.
    fn migration_port(&mut self) -> Option<u16> {
        self.ports
            .allocate_least_recent(MIGRATION_PORTS, &mut *self.probe)
    }

    /// The VM's macvtaps (none if it is not here).
    fn macvtaps(&self, name: &str) -> Vec<String> {
        self.vms
            .get(name)
            .map(|v| v.record.macvtaps())
            .unwrap_or_default()
    }

    /// Host devices held by running VMs and by starts under way.
    fn nic_devices_in_use(&self) -> BTreeSet<String> {
        let running = self.vms.values().flat_map(|v| v.record.nic_devices());
        let launching = self.pending.values().flat_map(|p| match p {
            Pending::Launch(ctx) => ctx.nics.iter().filter_map(|n| n.dev.as_deref()).collect(),
            _ => Vec::new(),
        });
        running.chain(launching).map(str::to_string).collect()
    }

    fn migration_address(&self, table: &InterfaceTable) -> Result<IpAddr, String> {
        let resolver = NetworkResolver::new(self.host(), table);
        match &self.settings.migration_network {
            Some(n) => resolver
                .resolve_name(n, &self.networks.networks)
                .map(|r| r.address)
                .map_err(|e| format!("migration network: {e}")),
            // A coordinator on this very host says nothing about how other
            // hosts reach this one.
            None => match self.coordinator_route.filter(|ip| !ip.is_loopback()) {
                Some(ip) => Ok(ip),
                None => self
                    .networks
                    .networks
                    .iter()
                    .find_map(|n| resolver.resolve(n).ok())
                    .map(|r| r.address)
                    .ok_or_else(|| {
                        format!(
                            "host {} has no network with an address to receive migrations \
                             (define one, or pass --migration-network)",
                            self.host()
                        )
                    }),
            },
        }
    }

    fn net_statuses(&self, table: &InterfaceTable) -> Vec<NetStatus> {
        let resolver = NetworkResolver::new(self.host(), table);
        self.networks
            .networks
            .iter()
            .map(|n| {
                let resolved = resolver.resolve(n);
                let device = n
                    .bridge_name
                    .clone()
                    .or_else(|| n.first_forward_dev().map(str::to_string));
                NetStatus {
                    name: n.name.clone(),
                    mode: n
                        .forward_mode()
                        .map_or("isolated", |m| m.as_str())
                        .to_string(),
                    device: match &resolved {
                        Ok(r) => match &r.source {
                            AddressSource::Device(d) => Some(d.clone()),
                            AddressSource::DefinitionIp => device,
                        },
                        Err(_) => device,
                    },
                    address: resolved.as_ref().ok().map(|r| r.address.to_string()),
                    error: resolved.err().map(|e| e.to_string()),
                    attach_error: attach_problem(n, table),
                }
            })
            .collect()
    }

    // ------------------------------------------------------------ results

    fn done(
        &mut self,
        now: Instant,
        pending: Pending,
        result: HvResult,
        out: &mut Vec<HostEffect>,
    ) {
        match pending {
            Pending::Ignore => {}
            Pending::Scan => self.scanned(now, result, out),
            Pending::Strays => self.strays_found(now, result, out),
            Pending::MarkQuery { id, name, token } => {
                let answer = match result {
                    HvResult::Qmp(v) => v,
                    other => {
                        let response = Response::Error(format!("query-block: {}", failure(&other)));
                        return out.push(HostEffect::Reply { id, response });
                    }
                };
                let disks = self
                    .vms
                    .get(&name)
                    .and_then(|vm| Domain::parse(&name, &vm.live_xml).ok())
                    .map(|d| storage_proof::writable_disks(&d.model))
                    .unwrap_or_default();
                let images = match storage_copy::disk_images(&disks, &answer) {
                    Ok(i) => i,
                    Err(e) => {
                        let response = Response::Error(format!("VM '{name}': {e}"));
                        return out.push(HostEffect::Reply { id, response });
                    }
                };
                let markers = disks.iter().map(|d| (d.marker(), token.clone())).collect();
                let pending = Pending::Marked { id, disks: images };
                self.hv(out, pending, HvCall::WriteMarkers { markers });
            }
            Pending::Chain {
                id,
                name,
                cmd,
                best_effort,
                mut rest,
                done,
            } => {
                if let (false, HvResult::Failed(_) | HvResult::Exited) = (best_effort, &result) {
                    let response = Response::Error(format!("{cmd}: {}", failure(&result)));
                    return out.push(HostEffect::Reply { id, response });
                }
                match rest.pop_front() {
                    Some(next) => self.chain_link(id, &name, next, rest, done, out),
                    None => out.push(HostEffect::Reply {
                        id,
                        response: Response::Done(done),
                    }),
                }
            }
            Pending::MirrorStatus {
                id,
                name,
                mut progress,
            } => {
                let targets = self
                    .vms
                    .get(&name)
                    .map(|v| v.mirrors.clone())
                    .unwrap_or_default();
                let response = match result {
                    HvResult::Qmp(jobs) => {
                        progress.mirrors = storage_copy::mirror_progress(&targets, &jobs);
                        Response::Migration(progress)
                    }
                    other => Response::Error(format!("query-block-jobs: {}", failure(&other))),
                };
                out.push(HostEffect::Reply { id, response });
            }
            Pending::FinishNbdStop { id, name } => {
                // Nothing is lost if it failed: the mirrors concluded before
                // the switchover, and the server dies with QEMU at the latest.
                if let HvResult::Failed(e) = &result {
                    tracing::warn!(vm = %name, error = %e, "nbd-server-stop failed");
                }
                self.finish_resume(id, name, out);
            }
            Pending::Marked { id, disks } => {
                let response = match result {
                    HvResult::Done => Response::StorageMarked(disks),
                    other => Response::Error(format!(
                        "cannot mark the storage for migration: {}",
                        failure(&other)
                    )),
                };
                out.push(HostEffect::Reply { id, response });
            }
            Pending::NicSweep => {
                if let HvResult::Failed(e) = &result {
                    tracing::warn!(error = %e, "cannot remove the devices of VMs that are gone");
                }
                self.attach_finished(now, out);
            }
            Pending::Attach(found) => {
                let record = found.record;
                match result {
                    HvResult::Done => {
                        tracing::info!(vm = %record.name, pid = record.pid, "re-attached to running VM");
                        let name = record.name.clone();
                        self.vms.insert(
                            name.clone(),
                            Vm {
                                state: VmState::Running,
                                status: "running".into(),
                                record,
                                live_xml: found.live_xml,
                                migration_port: None,
                                nbd_port: None,
                                mirrors: Vec::new(),
                                stops: Vec::new(),
                                finish_paused: false,
                            },
                        );
                        self.qmp(
                            out,
                            Pending::Observe(name.clone()),
                            &name,
                            QmpCommand::QueryStatus,
                        );
                    }
                    HvResult::Exited => {
                        tracing::info!(vm = %record.name, pid = record.pid,
                            "recorded VM stopped while the agent re-attached");
                        for p in &record.ports {
                            self.ports.release(*p);
                        }
                        // Whether the guest ever ran on its copied images
                        // is unknown here: they stay.
                        let call = HvCall::RemoveRecord {
                            name: record.name.clone(),
                            paths: self.paths(&record.name),
                            macvtaps: record.macvtaps(),
                            images: Vec::new(),
                            restore_owners: true,
                        };
                        self.hv(out, Pending::Ignore, call);
                    }
                    other => {
                        tracing::error!(vm = %record.name, pid = record.pid, error = %failure(&other),
                            "VM runs but its monitor is unreachable; ports stay reserved");
                    }
                }
                self.attach_finished(now, out);
            }
            Pending::Observe(name) => {
                if let HvResult::Qmp(v) = result {
                    if let Some(status) = v.get("status").and_then(Value::as_str) {
                        // A re-attached VM takes whatever state QEMU is in.
                        if let (Some(vm), Some(s)) =
                            (self.vms.get_mut(&name), VmState::from_qemu_status(status))
                        {
                            vm.state = s;
                        }
                        self.observe(&name, status);
                    }
                }
            }
            Pending::StartRead(ctx) => match result {
                HvResult::Host(read) => self.plan_start(now, *ctx, read, out),
                other => {
                    let name = ctx.domain.name.clone();
                    self.starting.remove(&name);
                    out.push(HostEffect::Reply {
                        id: ctx.id,
                        response: Response::Error(failure(&other)),
                    });
                }
            },
            Pending::Launch(ctx) => self.launched(now, *ctx, result, out),
            Pending::StartRecord { id, name, response } => {
                if let HvResult::Failed(e) = &result {
                    tracing::error!(vm = %name, error = %e, "cannot record VM; it runs unrecorded");
                }
                out.push(HostEffect::Reply { id, response });
            }
            Pending::GuestAgent { id } => {
                let response = match result {
                    HvResult::Qmp(v) => {
                        Response::GuestInterfaces(crate::guest_agent::interfaces(&v))
                    }
                    other => Response::Error(failure(&other)),
                };
                out.push(HostEffect::Reply { id, response });
            }
            Pending::NetList { id } => {
                let response = match result {
                    HvResult::Host(HostRead {
                        interfaces: Ok(table),
                        ..
                    }) => Response::Networks {
                        networks: self.net_statuses(&table),
                        problems: self.networks.problems.clone(),
                    },
                    HvResult::Host(HostRead {
                        interfaces: Err(e), ..
                    }) => Response::Error(e),
                    other => Response::Error(failure(&other)),
                };
                out.push(HostEffect::Reply { id, response });
            }
            Pending::Reload { id } => {
                let response = match result {
                    HvResult::Networks(n) => {
                        let msg = format!(
                            "reloaded {} network(s) from {}",
                            n.networks.len(),
                            n.dir.display()
                        );
                        for p in &n.problems {
                            tracing::warn!("{p}");
                        }
                        self.networks = n;
                        Response::Done(msg)
                    }
                    other => Response::Error(failure(&other)),
                };
                out.push(HostEffect::Reply { id, response });
            }
            Pending::Qmp {
                id,
                name,
                cmd,
                then,
            } => {
                let was = self.vm_state(&name);
                // An operator's suspend outlives agent and coordinator
                // restarts: it is in the record, and reports say so.
                let suspended = match then {
                    QmpThen::Suspend => Some(true),
                    QmpThen::Resume => Some(false),
                    _ => None,
                };
                let response = match result {
                    HvResult::Qmp(v) => self.qmp_answer(&name, then, v),
                    other if matches!(then, QmpThen::Monitor) => Response::Error(failure(&other)),
                    other => Response::Error(format!("{cmd}: {}", failure(&other))),
                };
                if let (Some(flag), Response::Done(_)) = (suspended, &response) {
                    let paths = self.paths(&name);
                    if let Some(vm) = self.vms.get_mut(&name) {
                        if vm.record.suspended != flag {
                            vm.record.suspended = flag;
                            let call = HvCall::WriteRecord {
                                paths,
                                record: vm.record.clone(),
                                live_xml: None,
                            };
                            let pending = Pending::SuspendRecord { id, name, response };
                            self.hv(out, pending, call);
                            return;
                        }
                    }
                }
                let completed = was == Some(VmState::Outgoing)
                    && self.vm_state(&name) == Some(VmState::PostMigrate);
                let devs = self.macvtaps(&name);
                let mirroring = self.vms.get(&name).is_some_and(|v| !v.mirrors.is_empty());
                if let (Response::Migration(progress), true) = (&response, mirroring) {
                    // A storage copy: the mirrors' state goes with the sample.
                    let pending = Pending::MirrorStatus {
                        id,
                        name: name.clone(),
                        progress: progress.clone(),
                    };
                    self.qmp(out, pending, &name, QmpCommand::QueryBlockJobs);
                } else if completed && !devs.is_empty() {
                    // The guest is about to run on the destination: from now
                    // on nothing here may send with its MAC (the host's own
                    // IPv6 on an up macvtap would), and the completion is
                    // reported only once that holds.
                    let call = HvCall::SetLinks { devs, up: false };
                    self.hv(out, Pending::SourceLinksDown { id, response }, call);
                } else {
                    out.push(HostEffect::Reply { id, response });
                }
            }
            Pending::MigrateOut {
                id,
                name,
                cmd,
                uri,
                mut rest,
            } => match result {
                HvResult::Qmp(_) => match rest.pop_front() {
                    Some(next) => {
                        if matches!(next, QmpCommand::Migrate { .. }) {
                            self.set_state(&name, VmState::Outgoing);
                        }
                        let pending = Pending::MigrateOut {
                            id,
                            name: name.clone(),
                            cmd: next.name(),
                            uri,
                            rest,
                        };
                        self.qmp(out, pending, &name, next);
                    }
                    None => out.push(HostEffect::Reply {
                        id,
                        response: Response::Done(format!("migration of '{name}' to {uri} started")),
                    }),
                },
                other => {
                    if cmd == "migrate" {
                        self.set_state(&name, VmState::Running);
                    }
                    out.push(HostEffect::Reply {
                        id,
                        response: Response::Error(format!("{cmd}: {}", failure(&other))),
                    });
                }
            },
            Pending::ListStatus { id, index } => {
                let status = match &result {
                    HvResult::Qmp(v) => v
                        .get("status")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_string(),
                    _ => "unknown".to_string(),
                };
                let Some(g) = self.lists.get_mut(&id) else {
                    return;
                };
                let mut observed = None;
                if let Some(row) = g.rows.get_mut(index) {
                    row.1 = Some(status.clone());
                    observed = Some(row.0.name.clone());
                }
                g.remaining = g.remaining.saturating_sub(1);
                let finished = g.remaining == 0;
                if let (Some(name), HvResult::Qmp(_)) = (observed, &result) {
                    self.observe(&name, &status);
                }
                if finished {
                    if let Some(g) = self.lists.remove(&id) {
                        let mut vms: Vec<VmSummary> = g
                            .rows
                            .iter()
                            .map(|(r, s)| summary(r, s.as_deref().unwrap_or("unknown")))
                            .collect();
                        vms.extend(self.starting_summaries());
                        out.push(HostEffect::Reply {
                            id,
                            response: Response::Vms(vms),
                        });
                    }
                }
            }
            Pending::FinishPoll { id, name, deadline } => {
                let status = match result {
                    HvResult::Qmp(v) => v
                        .get("status")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_string(),
                    other => return self.finish_failed(id, &name, failure(&other), out),
                };
                self.observe(&name, &status);
                match status.as_str() {
                    "inmigrate" => {
                        if now > deadline {
                            return self.finish_failed(
                                id,
                                &name,
                                "the migration stream never completed".into(),
                                out,
                            );
                        }
                        let due = now + FINISH_POLL;
                        self.polls.push((due, id, name, deadline));
                        out.push(HostEffect::WakeAt(due));
                    }
                    "paused" | "running" => {
                        // As libvirt: the copied disks' NBD server stops
                        // before the guest runs on them.
                        match self.vms.get(&name).and_then(|v| v.nbd_port) {
                            Some(_) => {
                                let pending = Pending::FinishNbdStop {
                                    id,
                                    name: name.clone(),
                                };
                                self.qmp(out, pending, &name, QmpCommand::NbdServerStop);
                            }
                            None => self.finish_resume(id, name, out),
                        }
                    }
                    s => {
                        let msg = format!("unexpected state '{s}' after migration");
                        self.finish_failed(id, &name, msg, out)
                    }
                }
            }
            Pending::SourceLinksDown { id, response } => {
                if let HvResult::Failed(e) = &result {
                    tracing::warn!(error = %e, "cannot take a migrated guest's macvtaps down");
                }
                out.push(HostEffect::Reply { id, response });
            }
            Pending::ResumeLinks { id, name } => match result {
                HvResult::Done => self.simple_qmp(id, name, QmpCommand::Cont, QmpThen::Resume, out),
                other => {
                    let response = Response::Error(format!(
                        "cannot bring up the guest's devices: {}",
                        failure(&other)
                    ));
                    out.push(HostEffect::Reply { id, response });
                }
            },
            Pending::FinishLinks { id, name } => match result {
                HvResult::Done => {
                    let pending = Pending::FinishCont {
                        id,
                        name: name.clone(),
                    };
                    self.qmp(out, pending, &name, QmpCommand::Cont);
                }
                other => {
                    let msg = format!("cannot bring up the guest's devices: {}", failure(&other));
                    self.finish_failed(id, &name, msg, out)
                }
            },
            Pending::FinishCont { id, name } => match result {
                HvResult::Qmp(_) => {
                    self.set_state(&name, VmState::Running);
                    // Switches learn the guest's new port from its RARPs.
                    if self
                        .vms
                        .get(&name)
                        .is_some_and(|v| !v.record.nics.is_empty())
                    {
                        self.qmp(out, Pending::Ignore, &name, QmpCommand::AnnounceSelf);
                    }
                    let endpoints = self
                        .vms
                        .get(&name)
                        .map(|v| v.record.endpoints.clone())
                        .unwrap_or_default();
                    let call = HvCall::ConfirmConsoles {
                        vm: name.clone(),
                        endpoints,
                        timeout: self.settings.timeouts.console,
                    };
                    self.hv(out, Pending::FinishConsoles { id, name }, call);
                }
                other => self.finish_failed(id, &name, format!("cont: {}", failure(&other)), out),
            },
            Pending::FinishConsoles { id, name } => match result {
                HvResult::Done => {
                    let paths = self.paths(&name);
                    let mut write = None;
                    if let Some(vm) = self.vms.get_mut(&name) {
                        for p in [vm.migration_port.take(), vm.nbd_port.take()]
                            .into_iter()
                            .flatten()
                        {
                            self.ports.release(p);
                            vm.record.ports.retain(|x| *x != p);
                            write = Some(vm.record.clone());
                        }
                        // The guest runs on the copied images: they are its disks now.
                        if !vm.record.created_images.is_empty() {
                            vm.record.created_images.clear();
                            write = Some(vm.record.clone());
                        }
                    }
                    match write {
                        Some(record) => {
                            let call = HvCall::WriteRecord {
                                paths,
                                record,
                                live_xml: None,
                            };
                            self.hv(out, Pending::FinishRecord { id, name }, call);
                        }
                        None => self.finish_ok(id, &name, out),
                    }
                }
                other => self.finish_failed(id, &name, failure(&other), out),
            },
            Pending::SuspendRecord { id, name, response } => {
                if let HvResult::Failed(e) = &result {
                    tracing::error!(vm = %name, error = %e, "cannot update VM record");
                }
                out.push(HostEffect::Reply { id, response });
            }
            Pending::FinishRecord { id, name } => {
                if let HvResult::Failed(e) = &result {
                    tracing::error!(vm = %name, error = %e, "cannot update VM record");
                }
                self.finish_ok(id, &name, out);
            }
            Pending::Stop { name, id } => {
                let mut wake = None;
                if let Some(vm) = self.vms.get_mut(&name) {
                    if let Some(w) = vm.stops.iter_mut().find(|w| w.id == id) {
                        let (phase, wait) = match (w.phase, w.shutdown) {
                            (StopPhase::Powerdown, Some(t)) => (StopPhase::Acpi, t),
                            _ => (StopPhase::QuitWait, STOP_STEP),
                        };
                        w.phase = phase;
                        w.deadline = Some(now + wait);
                        wake = w.deadline;
                    }
                }
                if let Some(t) = wake {
                    out.push(HostEffect::WakeAt(t));
                }
            }
        }
    }

    /// Carries out one link of a chain of QMP commands.
    fn chain_link(
        &mut self,
        id: u64,
        name: &str,
        link: Link,
        rest: VecDeque<Link>,
        done: String,
        out: &mut Vec<HostEffect>,
    ) {
        let pending = Pending::Chain {
            id,
            name: name.to_string(),
            cmd: link.cmd.name(),
            best_effort: link.best_effort,
            rest,
            done,
        };
        self.qmp(out, pending, name, link.cmd);
    }

    /// Runs `links` in order and answers `done`, or the first failure of a
    /// link that must succeed.
    fn chain(
        &mut self,
        id: u64,
        name: &str,
        links: Vec<Link>,
        done: String,
        out: &mut Vec<HostEffect>,
    ) {
        let mut rest = VecDeque::from(links);
        match rest.pop_front() {
            Some(first) => self.chain_link(id, name, first, rest, done, out),
            None => out.push(HostEffect::Reply {
                id,
                response: Response::Done(done),
            }),
        }
    }

    /// The stream has landed (and any NBD server stopped): bring up the
    /// guest's macvtaps, then its CPUs. As libvirt: the destination's
    /// macvtaps stay down until then, so nothing with the guest's MAC leaves
    /// this host while the source still runs.
    fn finish_resume(&mut self, id: u64, name: String, out: &mut Vec<HostEffect>) {
        if let Some(vm) = self.vms.get_mut(&name).filter(|v| v.finish_paused) {
            // Suspended by the operator: it lands paused, and stays so
            // (recorded, so agent restarts and reports keep saying so).
            // Its macvtaps come up when `resume` starts its CPUs.
            vm.record.suspended = true;
            let endpoints = vm.record.endpoints.clone();
            self.set_state(&name, VmState::Paused);
            let call = HvCall::ConfirmConsoles {
                vm: name.clone(),
                endpoints,
                timeout: self.settings.timeouts.console,
            };
            self.hv(out, Pending::FinishConsoles { id, name }, call);
            return;
        }
        let devs = self.macvtaps(&name);
        if devs.is_empty() {
            let pending = Pending::FinishCont {
                id,
                name: name.clone(),
            };
            self.qmp(out, pending, &name, QmpCommand::Cont);
        } else {
            let call = HvCall::SetLinks { devs, up: true };
            self.hv(out, Pending::FinishLinks { id, name }, call);
        }
    }

    fn qmp_answer(&mut self, name: &str, then: QmpThen, v: Value) -> Response {
        match then {
            QmpThen::Postcopy => Response::Done("switched to post-copy".into()),
            QmpThen::ClientMigrateInfo => Response::Done("SPICE clients told to reconnect".into()),
            QmpThen::MigrationStatus => {
                let progress = migration_progress(&v);
                if self.vm_state(name) == Some(VmState::Outgoing) {
                    match progress.status.as_str() {
                        "completed" => self.set_state(name, VmState::PostMigrate),
                        "failed" | "cancelled" => self.set_state(name, VmState::Running),
                        _ => {}
                    }
                }
                Response::Migration(progress)
            }
            QmpThen::Cancel => Response::Done("migration cancel requested".into()),
            QmpThen::Resume => {
                self.set_state(name, VmState::Running);
                Response::Done("resumed".into())
            }
            QmpThen::Suspend => {
                self.set_state(name, VmState::Paused);
                Response::Done("suspended".into())
            }
            QmpThen::Reset => Response::Done("reset".into()),
            QmpThen::Monitor => Response::Done(v.as_str().unwrap_or_default().to_string()),
        }
    }

    fn finish_ok(&mut self, id: u64, name: &str, out: &mut Vec<HostEffect>) {
        let host = self.host().to_string();
        let message = if self.vm_state(name) == Some(VmState::Paused) {
            tracing::info!(vm = %name, host = %host, "incoming migration finished; VM kept paused (suspended)");
            format!("Domain '{name}' kept paused on host {host}: suspended by the operator")
        } else {
            tracing::info!(vm = %name, host = %host, "incoming migration finished; VM running");
            format!("Domain '{name}' resumed on host {host}")
        };
        out.push(HostEffect::Reply {
            id,
            response: Response::Done(message),
        });
    }

    fn finish_failed(&mut self, id: u64, name: &str, e: String, out: &mut Vec<HostEffect>) {
        let host = self.host();
        out.push(HostEffect::Reply {
            id,
            response: Response::Error(format!("VM '{name}' on host {host}: {e}")),
        });
    }

    fn launched(
        &mut self,
        now: Instant,
        ctx: LaunchCtx,
        result: HvResult,
        out: &mut Vec<HostEffect>,
    ) {
        let host = self.host().to_string();
        let LaunchCtx {
            id,
            name,
            uuid,
            ports,
            endpoints,
            live_xml,
            warnings,
            migration_port,
            uri,
            launched_at,
            nics,
            nbd,
            created_images,
            incarnation,
            ha,
        } = ctx;
        self.starting.remove(&name);
        self.ha_launching.remove(&name);
        let incoming = migration_port.is_some();
        let early_exit = self.early_exits.remove(&name);
        let result = match (result, early_exit) {
            // Its exit overtook the launch's answer: the start failed, and
            // what the launch created (record files, macvtaps) goes now.
            (HvResult::Launched { pid }, Some((dead, reason))) if dead == pid => {
                let call = HvCall::RemoveRecord {
                    name: name.clone(),
                    paths: self.paths(&name),
                    macvtaps: nics
                        .iter()
                        .filter(|n| n.is_macvtap())
                        .filter_map(|n| n.dev.clone())
                        .collect(),
                    images: created_images.clone(),
                    restore_owners: true,
                };
                self.hv(out, Pending::Ignore, call);
                HvResult::Failed(format!("QEMU exited right after it started: {reason}"))
            }
            (result, _) => result,
        };
        let pid = match result {
            HvResult::Launched { pid } => pid,
            other => {
                ports.iter().for_each(|p| self.ports.release(*p));
                count_launch(incoming, "error");
                // Images made for a copy that will not come are removed
                // (libvirt leaves them behind).
                if !created_images.is_empty() {
                    let paths = created_images.clone();
                    self.hv(out, Pending::Ignore, HvCall::RemoveImages { paths });
                }
                let e = failure(&other);
                tracing::error!(vm = %name, host = %host, error = %e, "start failed");
                out.push(HostEffect::Reply {
                    id,
                    response: Response::Error(format!(
                        "VM '{name}' failed to start on host {host}: {e}"
                    )),
                });
                return;
            }
        };
        let record = VmRecord {
            name: name.clone(),
            uuid,
            pid,
            ports,
            endpoints,
            nics,
            created_images,
            incarnation,
            ha,
            suspended: false,
        };
        let state = if incoming {
            VmState::Incoming
        } else {
            VmState::Running
        };
        tracing::info!(vm = %name, host = %host, pid, state = state.qemu_status(), "QEMU up");
        count_launch(incoming, "ok");
        if !incoming {
            metrics::histogram!("flotilla_agent_start_seconds")
                .record(now.saturating_duration_since(launched_at).as_secs_f64());
        }
        let vm = summary(&record, state.qemu_status());
        let response = match uri {
            Some(uri) => Response::Incoming {
                vm,
                uri,
                nbd: nbd.clone(),
            },
            None => Response::Started {
                vm,
                live_xml: live_xml.clone(),
                warnings,
            },
        };
        let state = VmState::Starting.transition(state).unwrap_or(state);
        self.vms.insert(
            name.clone(),
            Vm {
                state,
                status: state.qemu_status().to_string(),
                record: record.clone(),
                live_xml: live_xml.clone(),
                migration_port,
                nbd_port: nbd.map(|n| n.port),
                mirrors: Vec::new(),
                stops: Vec::new(),
                finish_paused: false,
            },
        );
        metrics::gauge!("flotilla_agent_vms").set(self.vms.len() as f64);
        if ha {
            // The keeper learns of the guest before anyone hears it started.
            self.publish_lease(out);
            if self.lease.state(now) == crate::lease::LeaseState::Lapsed {
                // The lease lapsed while QEMU launched: it must not run.
                self.kill_fenced(&name, pid, out);
            }
        }
        // The record must be on disk before we report success: it is how a
        // restarted agent finds this QEMU again.
        let call = HvCall::WriteRecord {
            paths: self.paths(&name),
            record,
            live_xml: Some(live_xml),
        };
        self.hv(out, Pending::StartRecord { id, name, response }, call);
    }

    fn scanned(&mut self, now: Instant, result: HvResult, out: &mut Vec<HostEffect>) {
        let found = match result {
            HvResult::Records(r) => r,
            other => {
                tracing::warn!(error = %failure(&other), "cannot scan VM records");
                Vec::new()
            }
        };
        let mut attaching = 0;
        let known: Vec<String> = found
            .iter()
            .filter(|f| f.alive)
            .map(|f| f.record.name.clone())
            .collect();
        for f in found {
            let record = &f.record;
            if f.alive {
                for p in &record.ports {
                    self.ports.reserve(*p);
                }
                if self.reattach {
                    let call = HvCall::Attach {
                        name: record.name.clone(),
                        uuid: record.uuid.clone(),
                        pid: record.pid,
                        paths: self.paths(&record.name),
                    };
                    attaching += 1;
                    self.hv(out, Pending::Attach(Box::new(f)), call);
                }
            } else if self.reattach {
                tracing::info!(vm = %record.name, pid = record.pid, "recorded VM is no longer running");
                // Whether the guest ever ran on its copied images is
                // unknown here: they stay.
                let call = HvCall::RemoveRecord {
                    name: record.name.clone(),
                    paths: self.paths(&record.name),
                    macvtaps: record.macvtaps(),
                    images: Vec::new(),
                    restore_owners: true,
                };
                self.hv(out, Pending::Ignore, call);
            }
        }
        if self.reattach {
            // Macvtaps outlive their QEMU: those of VMs that died with the
            // agent (with or without a record) go now, before any start
            // could create a device this sweep would take for a stray.
            let call = HvCall::RemoveStrayNics {
                keep: known.clone(),
            };
            attaching += 1;
            self.hv(out, Pending::NicSweep, call);
            // A QEMU spawned just before the agent died has no record yet: it
            // was never reported as started, so it goes before anything is served.
            let call = HvCall::FindStrays {
                state_dir: self.settings.state_dir.clone(),
                known,
            };
            attaching += 1;
            self.hv(out, Pending::Strays, call);
        }
        self.booting = Some(attaching);
        if attaching == 0 {
            self.become_ready(now, out);
        }
    }

    fn strays_found(&mut self, now: Instant, result: HvResult, out: &mut Vec<HostEffect>) {
        if let HvResult::Strays(strays) = result {
            for s in strays {
                tracing::warn!(vm = %s.name, pid = s.pid,
                    "killing a QEMU that was being started when the agent stopped");
                let call = HvCall::Signal {
                    vm: s.name,
                    pid: s.pid,
                    signal: VmSignal::Kill,
                };
                self.hv(out, Pending::Ignore, call);
            }
        }
        self.attach_finished(now, out);
    }

    fn attach_finished(&mut self, now: Instant, out: &mut Vec<HostEffect>) {
        if let Some(n) = self.booting.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 && !self.ready {
                self.become_ready(now, out);
            }
        }
    }

    fn become_ready(&mut self, now: Instant, out: &mut Vec<HostEffect>) {
        self.ready = true;
        metrics::gauge!("flotilla_agent_vms").set(self.vms.len() as f64);
        while let Some((id, request)) = self.queued.pop_front() {
            self.request(now, id, request, out);
        }
    }

    // ------------------------------------------------------------ exits, time

    fn exited(
        &mut self,
        name: String,
        pid: i32,
        reason: String,
        log_tail: String,
        out: &mut Vec<HostEffect>,
    ) {
        let matches = self.vms.get(&name).is_some_and(|v| v.record.pid == pid);
        if !matches && self.starting.contains(&name) {
            self.early_exits.insert(name, (pid, reason));
            return;
        }
        if !matches {
            tracing::debug!(vm = %name, pid, "exit of a QEMU the agent no longer owns");
            return;
        }
        tracing::info!(vm = %name, pid, reason = %reason, log_tail = %log_tail, "VM stopped");
        let Some(vm) = self.vms.remove(&name) else {
            return;
        };
        for p in &vm.record.ports {
            self.ports.release(*p);
        }
        metrics::gauge!("flotilla_agent_vms").set(self.vms.len() as f64);
        for w in vm.stops {
            let msg = match (w.shutdown, w.phase) {
                (None, _) => format!("Domain '{name}' destroyed"),
                (Some(_), StopPhase::Powerdown | StopPhase::Acpi) => {
                    format!("Domain '{name}' is being shutdown: guest powered off")
                }
                (Some(t), StopPhase::Quit | StopPhase::QuitWait) => format!(
                    "Domain '{name}' shut down: guest ignored ACPI power-down for {t:?}, QEMU quit"
                ),
                (Some(_), _) => format!("Domain '{name}' shut down: QEMU killed after quit failed"),
            };
            out.push(HostEffect::Reply {
                id: w.id,
                response: Response::Done(msg),
            });
        }
        // Images created for a copy go too, unless the guest ran here
        // (`Vm::ran_here`): then they are its disks.
        let call = HvCall::RemoveRecord {
            name: name.clone(),
            paths: self.paths(&name),
            macvtaps: vm.record.macvtaps(),
            images: vm.record.created_images.clone(),
            restore_owners: vm.state != VmState::PostMigrate,
        };
        self.hv(out, Pending::Ignore, call);
        // The shell only logs it for now: the coordinator learns of the exit
        // from the host's next report. A link that forwards it must number it
        // in its connection's sequence (it owns that), so 0 here.
        out.push(HostEffect::Event(AgentEvent::VmStopped {
            seq: 0,
            name,
            reason,
        }));
    }

    /// Asks an incoming QEMU whether the stream has arrived, for a finish
    /// that gives up at `deadline`.
    fn poll_finish(&mut self, id: u64, name: &str, deadline: Instant, out: &mut Vec<HostEffect>) {
        let pending = Pending::FinishPoll {
            id,
            name: name.to_string(),
            deadline,
        };
        self.qmp_timeout(
            out,
            pending,
            name,
            QmpCommand::QueryStatus,
            FINISH_STATUS_TIMEOUT,
        );
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<HostEffect>) {
        self.enforce_lease(now, out);
        // Incoming-migration polls that are due.
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.polls)
            .into_iter()
            .partition(|(at, ..)| *at <= now);
        self.polls = later;
        for (_, id, name, deadline) in due {
            if !self.vms.contains_key(&name) {
                self.finish_failed(id, &name, "the VM's QEMU exited".into(), out);
                continue;
            }
            self.poll_finish(id, &name, deadline, out);
        }
        // Shutdown and destroy escalations that are due.
        let mut calls = Vec::new();
        let mut replies = Vec::new();
        let mut wakes = Vec::new();
        for (name, vm) in self.vms.iter_mut() {
            let pid = vm.record.pid;
            vm.stops.retain_mut(|w| {
                let Some(deadline) = w.deadline else {
                    return true;
                };
                if deadline > now {
                    return true;
                }
                match w.phase {
                    StopPhase::Acpi => {
                        tracing::warn!(vm = %name, pid, "guest ignored ACPI power-down; escalating to quit");
                        w.phase = StopPhase::Quit;
                        w.deadline = None;
                        calls.push((name.clone(), Some(w.id), None));
                        true
                    }
                    StopPhase::QuitWait | StopPhase::Term => {
                        w.phase = StopPhase::Kill;
                        w.deadline = Some(now + STOP_STEP);
                        wakes.push(now + STOP_STEP);
                        calls.push((name.clone(), None, Some(pid)));
                        true
                    }
                    StopPhase::Kill => {
                        replies.push((
                            w.id,
                            format!("Domain '{name}': QEMU pid {pid} did not exit"),
                        ));
                        false
                    }
                    StopPhase::Powerdown | StopPhase::Quit => true,
                }
            });
        }
        for (name, quit_for, kill) in calls {
            if let Some(id) = quit_for {
                let pending = Pending::Stop {
                    name: name.clone(),
                    id,
                };
                self.qmp_timeout(out, pending, &name, QmpCommand::Quit, STOP_STEP);
            }
            if let Some(pid) = kill {
                let call = HvCall::Signal {
                    vm: name,
                    pid,
                    signal: VmSignal::Kill,
                };
                self.hv(out, Pending::Ignore, call);
            }
        }
        for (id, msg) in replies {
            out.push(HostEffect::Reply {
                id,
                response: Response::Error(msg),
            });
        }
        out.extend(wakes.into_iter().map(HostEffect::WakeAt));
    }
}

/// The text of a failed hypervisor result.
fn failure(r: &HvResult) -> String {
    match r {
        HvResult::Failed(e) => e.clone(),
        HvResult::Exited => "QEMU is no longer running".into(),
        other => format!("unexpected hypervisor result {other:?}"),
    }
}

/// Counts a QEMU launch: a start, or the destination of an incoming migration,
/// which is not a start and would skew the start latency it sits beside.
fn count_launch(incoming: bool, outcome: &'static str) {
    if incoming {
        metrics::counter!("flotilla_agent_incoming_migrations_total", "outcome" => outcome)
            .increment(1);
    } else {
        metrics::counter!("flotilla_agent_starts_total", "outcome" => outcome).increment(1);
    }
}

/// Reads QEMU's `query-migrate` answer.
pub fn migration_progress(v: &Value) -> MigrationProgress {
    let ram = &v["ram"];
    let u = |x: &Value| x.as_u64().unwrap_or(0);
    MigrationProgress {
        status: v["status"].as_str().unwrap_or("none").to_string(),
        transferred: u(&ram["transferred"]),
        remaining: u(&ram["remaining"]),
        total: u(&ram["total"]),
        throughput_bps: (ram["mbps"].as_f64().unwrap_or(0.0) * 1_000_000.0 / 8.0) as u64,
        dirty_sync_count: u(&ram["dirty-sync-count"]),
        expected_downtime_ms: u(&v["expected-downtime"]),
        downtime_ms: v["downtime"].as_u64(),
        total_time_ms: v["total-time"].as_u64(),
        error: v["error-desc"].as_str().map(str::to_string),
        mirrors: Vec::new(),
    }
}

fn consoles(endpoints: &[ConsoleEndpoint]) -> Vec<ConsoleInfo> {
    endpoints
        .iter()
        .map(|e| ConsoleInfo {
            uri: e.uri(),
            network: e.network.clone(),
            authenticated: !e.is_exposed_unauthenticated(),
        })
        .collect()
}

fn summary(r: &VmRecord, state: &str) -> VmSummary {
    VmSummary {
        suspended: r.suspended,
        name: r.name.clone(),
        uuid: r.uuid.clone(),
        pid: r.pid,
        state: VmRunState::from_qemu(state),
        consoles: consoles(&r.endpoints),
        incarnation: r.incarnation,
        ha: r.ha,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_qemu::{drive, sim_settings, FakeFabric, FakeQemu};
    use flotilla_shared::proto::CopyMode;
    use flotilla_shared::xml::Network;

    fn networks() -> HostNetworks {
        let xml =
            "<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>";
        HostNetworks {
            dir: PathBuf::from("/sim/networks"),
            networks: vec![Network::parse("public.xml", xml).expect("valid").model],
            problems: Vec::new(),
        }
    }

    fn fake(addr: &str) -> FakeQemu {
        let fake = FakeQemu::new(InterfaceTable::new().with("br0", &[addr]));
        fake.set_networks(networks());
        fake
    }

    fn core(host: &str, fake: &FakeQemu) -> HostCore {
        HostCore::new(
            sim_settings(host),
            fake.networks(),
            true,
            Box::new(|_| true),
        )
    }

    fn booted(host: &str, fake: &mut FakeQemu, now: Instant) -> HostCore {
        let mut c = core(host, fake);
        assert_eq!(drive(&mut c, fake, now, HostInput::Boot), vec![]);
        assert!(c.is_ready());
        c
    }

    const UUID: &str = "6f1c1d5e-0b7a-4c33-9a56-1b2c3d4e5f60";

    fn xml(name: &str) -> String {
        format!(
            "<domain type='kvm'><name>{name}</name><uuid>{UUID}</uuid><memory unit='MiB'>64</memory>\
             <os><type>hvm</type></os><devices><graphics type='vnc' passwd='s3cret'>\
             <listen type='network' network='public'/></graphics></devices></domain>"
        )
    }

    fn start(name: &str) -> Request {
        Request::Start {
            xml: xml(name),
            source: format!("{name}.xml"),
            incarnation: 0,
        }
    }

    fn req(id: u64, request: Request) -> HostInput {
        HostInput::Request { id, request }
    }

    /// The single reply among `effects`.
    fn reply(effects: &[HostEffect]) -> &Response {
        let replies: Vec<&Response> = effects
            .iter()
            .filter_map(|e| match e {
                HostEffect::Reply { response, .. } => Some(response),
                _ => None,
            })
            .collect();
        assert_eq!(replies.len(), 1, "{effects:?}");
        replies[0]
    }

    fn hv_calls(effects: &[HostEffect]) -> Vec<(u64, HvCall)> {
        effects
            .iter()
            .filter_map(|e| match e {
                HostEffect::Hv { op, call } => Some((*op, call.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn start_reads_the_host_launches_records_then_replies() {
        let now = Instant::now();
        let mut fake = fake("198.18.4.1");
        let mut c = booted("h1", &mut fake, now);
        let out = c.handle(now, req(7, start("web01")));
        let calls = hv_calls(&out);
        assert!(matches!(&calls[..], [(_, HvCall::ReadHost { paths, .. })] if paths.is_empty()));
        assert_eq!(c.vm_state("web01"), Some(VmState::Starting));
        let (op, call) = calls[0].clone();
        let out = c.handle(
            now,
            HostInput::HvDone {
                op,
                result: fake.call_now(call),
            },
        );
        let calls = hv_calls(&out);
        let [(op, HvCall::Launch(plan))] = &calls[..] else {
            panic!("expected a launch, got {out:?}");
        };
        assert_eq!(plan.mode, LaunchMode::Run);
        assert_eq!(plan.secrets.len(), 1);
        assert!(
            !plan.argv.args.iter().any(|a| a.contains("s3cret")),
            "secret on argv"
        );
        assert_eq!(plan.endpoints[0].uri(), "vnc://198.18.4.1:5900");
        assert!(c.port_reserved(5900));
        let result = fake.call_now(HvCall::Launch(plan.clone()));
        let out = c.handle(now, HostInput::HvDone { op: *op, result });
        let calls = hv_calls(&out);
        let [(
            op,
            call @ HvCall::WriteRecord {
                live_xml: Some(_), ..
            },
        )] = &calls[..]
        else {
            panic!("expected the record write, got {out:?}");
        };
        assert!(
            !out.iter().any(|e| matches!(e, HostEffect::Reply { .. })),
            "reply before record"
        );
        let result = fake.call_now(call.clone());
        let out = c.handle(now, HostInput::HvDone { op: *op, result });
        match &out[..] {
            [HostEffect::Reply {
                id: 7,
                response: Response::Started { vm, .. },
            }] => {
                assert_eq!(vm.state, VmRunState::Running);
                assert_eq!(vm.consoles[0].uri, "vnc://198.18.4.1:5900");
            }
            other => panic!("expected Started, got {other:?}"),
        }
        assert_eq!(c.vm_state("web01"), Some(VmState::Running));
        assert_eq!(fake.record("web01").map(|r| r.ports), Some(vec![5900]));
    }

    #[test]
    fn a_lapsed_lease_refuses_starts_kills_ha_guests_and_spares_the_rest() {
        let now = Instant::now();
        let s = Duration::from_secs;
        let mut fake = fake("198.18.4.1");
        let mut c = booted("h1", &mut fake, now);
        let ha_xml = xml("ha").replace(
            "<memory",
            "<metadata><flotilla:ha xmlns:flotilla='urn:flotilla:domain:1' restart='on'/></metadata><memory",
        );
        let plain = xml("plain").replace(UUID, "6f1c1d5e-0b7a-4c33-9a56-1b2c3d4e5f61");
        let out = drive(
            &mut c,
            &mut fake,
            now,
            HostInput::LeaseRenewed { until: now + s(8) },
        );
        assert!(out.contains(&HostEffect::WakeAt(now + s(6))));
        assert!(out.contains(&HostEffect::LeaseFile {
            until: now + s(8),
            guests: vec![]
        }));
        for (id, x, name) in [(1, ha_xml, "ha"), (2, plain, "plain")] {
            let out = drive(
                &mut c,
                &mut fake,
                now,
                req(
                    id,
                    Request::Start {
                        xml: x,
                        source: format!("{name}.xml"),
                        incarnation: 3,
                    },
                ),
            );
            assert!(
                matches!(reply(&out), Response::Started { vm, .. } if vm.incarnation == 3 && vm.ha == (name == "ha"))
            );
        }
        // The keeper knows the HA guest (and only it), by pid and UUID.
        let pid = fake.process("ha").map(|p| p.pid).expect("ha runs");
        let file = c.ha_guests();
        assert_eq!(file.len(), 1);
        assert_eq!(
            (file[0].name.as_str(), file[0].pid, file[0].uuid.as_str()),
            ("ha", pid, UUID)
        );

        // Two seconds before expiry: no new starts.
        let out = drive(&mut c, &mut fake, now + s(7), req(3, start("late")));
        assert!(
            matches!(reply(&out), Response::Error(e) if e.contains("host h1 is not starting VMs"))
        );
        assert!(c.fence_holds(now + s(7)));
        // At expiry: the HA guest is killed, the other runs on.
        let out = c.handle(now + s(8), HostInput::Tick);
        let kills: Vec<_> = out
            .iter()
            .filter_map(|e| match e {
                HostEffect::Hv {
                    call:
                        HvCall::Signal {
                            vm,
                            signal: VmSignal::Kill,
                            ..
                        },
                    ..
                } => Some(vm.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(kills, vec!["ha".to_string()]);
        assert!(
            !c.fence_holds(now + s(8)),
            "an HA guest still runs: no petting"
        );
        let exit = HostInput::VmExited {
            name: "ha".into(),
            pid,
            reason: "QEMU exited (signal: 9 (SIGKILL))".into(),
            log_tail: String::new(),
        };
        drive(&mut c, &mut fake, now + s(8), exit);
        assert!(c.fence_holds(now + s(9)), "every HA guest is dead");
        assert_eq!(c.vm_state("plain"), Some(VmState::Running));
        // Enforced once per expiry; a renewal re-arms.
        assert!(c
            .handle(now + s(9), HostInput::Tick)
            .iter()
            .all(|e| !matches!(e, HostEffect::Hv { .. })));
        drive(
            &mut c,
            &mut fake,
            now + s(9),
            HostInput::LeaseRenewed { until: now + s(17) },
        );
        let out = drive(&mut c, &mut fake, now + s(9), req(4, start("late")));
        assert!(matches!(reply(&out), Response::Started { .. }), "{out:?}");
    }

    #[test]
    fn refusals_table() {
        let now = Instant::now();
        let mut fake = fake("198.18.4.1");
        let mut c = booted("h1", &mut fake, now);
        let out = drive(&mut c, &mut fake, now, req(1, start("web01")));
        assert!(matches!(reply(&out), Response::Started { .. }));
        let other_name = xml("web02");
        let cases: Vec<(Request, String)> =
            vec![
            (
                start("web01"),
                "Requested operation is not valid: domain 'web01' is already running on host h1"
                    .into(),
            ),
            (
                Request::Start { xml: other_name, source: "web02.xml".into(), incarnation: 0 },
                format!("domain 'web02' has the UUID {UUID} of running domain 'web01'"),
            ),
            (
                Request::Destroy { name: "nope".into() },
                "Requested operation is not valid: domain 'nope' is not running on host h1".into(),
            ),
            (
                Request::MigrateFinish { name: "nope".into(), paused: false },
                "Requested operation is not valid: domain 'nope' is not running on host h1".into(),
            ),
            (
                Request::MigrateOut {
                    name: "nope".into(),
                    uri: "tcp:1.2.3.4:5".into(),
                    max_downtime_ms: None,
                    bandwidth_mib_s: None,
                    auto_converge: false,
                    postcopy: false,
                },
                "Requested operation is not valid: domain 'nope' is not running on host h1".into(),
            ),
        ];
        for (i, (request, expected)) in cases.into_iter().enumerate() {
            let out = drive(&mut c, &mut fake, now, req(10 + i as u64, request));
            assert_eq!(reply(&out), &Response::Error(expected));
        }
        // A failed launch releases its ports and leaves no VM behind.
        fake.fail_next_launch("web09", "QEMU exited during start");
        let xml9 = xml("web09").replace(UUID, "00000000-0000-4000-8000-000000000009");
        let out = drive(
            &mut c,
            &mut fake,
            now,
            req(
                20,
                Request::Start {
                    xml: xml9,
                    source: "w".into(),
                    incarnation: 0,
                },
            ),
        );
        assert_eq!(
            reply(&out),
            &Response::Error(
                "VM 'web09' failed to start on host h1: QEMU exited during start".into()
            )
        );
        assert!(!c.port_reserved(5901));
        assert_eq!(c.vm_state("web09"), None);
    }

    #[test]
    fn destroy_escalates_and_exit_replies_with_an_event() {
        let t0 = Instant::now();
        let mut fake = fake("198.18.4.1");
        let mut c = booted("h1", &mut fake, t0);
        drive(&mut c, &mut fake, t0, req(1, start("web01")));
        let pid = fake.process("web01").map(|p| p.pid).expect("runs");
        let out = c.handle(
            t0,
            req(
                2,
                Request::Destroy {
                    name: "web01".into(),
                },
            ),
        );
        assert_eq!(
            hv_calls(&out)
                .into_iter()
                .map(|(_, c)| c)
                .collect::<Vec<_>>(),
            vec![HvCall::Signal {
                vm: "web01".into(),
                pid,
                signal: VmSignal::Term
            }]
        );
        assert!(out.contains(&HostEffect::WakeAt(t0 + TERM_GRACE)));
        assert_eq!(c.vm_state("web01"), Some(VmState::Stopping));
        // QEMU ignores SIGTERM (we never deliver the fake's exit): SIGKILL at 3 s.
        let out = c.handle(t0 + TERM_GRACE, HostInput::Tick);
        assert_eq!(
            hv_calls(&out)
                .into_iter()
                .map(|(_, c)| c)
                .collect::<Vec<_>>(),
            vec![HvCall::Signal {
                vm: "web01".into(),
                pid,
                signal: VmSignal::Kill
            }]
        );
        // Not gone 5 s later either: the destroy fails.
        let out = c.handle(t0 + TERM_GRACE + STOP_STEP, HostInput::Tick);
        assert_eq!(
            reply(&out),
            &Response::Error(format!("Domain 'web01': QEMU pid {pid} did not exit"))
        );
        // A second destroy whose SIGTERM works.
        let out = drive(
            &mut c,
            &mut fake,
            t0,
            req(
                3,
                Request::Destroy {
                    name: "web01".into(),
                },
            ),
        );
        assert!(!out.iter().any(|e| matches!(e, HostEffect::Reply { .. })));
        let exits = fake.take_exits();
        assert_eq!(exits.len(), 1);
        let out = drive(&mut c, &mut fake, t0, exits[0].clone());
        assert_eq!(
            out,
            vec![
                HostEffect::Reply {
                    id: 3,
                    response: Response::Done("Domain 'web01' destroyed".into())
                },
                HostEffect::Event(AgentEvent::VmStopped {
                    seq: 0,
                    name: "web01".into(),
                    reason: "QEMU exited (signal: 15 (SIGTERM))".into()
                }),
            ]
        );
        assert_eq!(c.vm_state("web01"), None);
        assert!(!c.port_reserved(5900));
        assert_eq!(fake.record("web01"), None);
        // The exit of a QEMU the core no longer owns is ignored.
        let stale = HostInput::VmExited {
            name: "web01".into(),
            pid,
            reason: "x".into(),
            log_tail: String::new(),
        };
        assert_eq!(c.handle(t0, stale), vec![]);
    }

    #[test]
    fn shutdown_escalation_messages() {
        let t0 = Instant::now();
        // (guest obeys ACPI, expected message)
        let cases = [
            (true, "Domain 'web01' is being shutdown: guest powered off"),
            (
                false,
                "Domain 'web01' shut down: guest ignored ACPI power-down for 2s, QEMU quit",
            ),
        ];
        for (obeys, expected) in cases {
            let mut fake = fake("198.18.4.1");
            let mut c = booted("h1", &mut fake, t0);
            drive(&mut c, &mut fake, t0, req(1, start("web01")));
            fake.set_ignores_acpi("web01", !obeys);
            let shutdown = Request::Shutdown {
                name: "web01".into(),
                timeout_secs: 2,
            };
            let out = drive(&mut c, &mut fake, t0, req(2, shutdown));
            assert_eq!(out, vec![HostEffect::WakeAt(t0 + Duration::from_secs(2))]);
            if !obeys {
                assert!(fake.take_exits().is_empty());
                let out = drive(
                    &mut c,
                    &mut fake,
                    t0 + Duration::from_secs(2),
                    HostInput::Tick,
                );
                assert_eq!(
                    out,
                    vec![HostEffect::WakeAt(t0 + Duration::from_secs(2) + STOP_STEP)]
                );
                let cmds = fake.process("web01").map(|p| p.commands);
                assert!(cmds.is_none(), "quit ended QEMU");
            }
            let exits = fake.take_exits();
            let out = drive(&mut c, &mut fake, t0, exits[0].clone());
            assert_eq!(reply(&out), &Response::Done(expected.into()));
        }
    }

    #[test]
    fn requests_wait_for_reattach_and_dead_records_go() {
        let now = Instant::now();
        let mut fake = fake("198.18.4.1");
        let mut c = booted("h1", &mut fake, now);
        drive(&mut c, &mut fake, now, req(1, start("web01")));
        let xml2 = xml("web02").replace(UUID, "00000000-0000-4000-8000-000000000002");
        drive(
            &mut c,
            &mut fake,
            now,
            req(
                2,
                Request::Start {
                    xml: xml2,
                    source: "w".into(),
                    incarnation: 0,
                },
            ),
        );
        fake.crash("web02");
        fake.take_exits(); // the old agent is gone before it hears of it
        drop(c);
        let mut c = core("h1", &fake);
        // A request before boot waits.
        assert_eq!(
            c.handle(
                now,
                req(
                    5,
                    Request::DumpXml {
                        name: "web01".into()
                    }
                )
            ),
            vec![]
        );
        let out = c.handle(now, HostInput::Boot);
        let mut calls: Vec<HvCall> = hv_calls(&out).into_iter().map(|(_, c)| c).collect();
        calls.sort_by_key(|c| format!("{c:?}"));
        assert!(matches!(&calls[..], [HvCall::ScanRecords { .. }]));
        let (op, call) = hv_calls(&out)[0].clone();
        let out = c.handle(
            now,
            HostInput::HvDone {
                op,
                result: fake.call_now(call),
            },
        );
        let calls = hv_calls(&out);
        assert!(calls
            .iter()
            .any(|(_, c)| matches!(c, HvCall::Attach { name, .. } if name == "web01")));
        assert!(calls
            .iter()
            .any(|(_, c)| matches!(c, HvCall::RemoveRecord { name, .. } if name == "web02")));
        assert!(!c.is_ready());
        assert!(
            c.port_reserved(5900),
            "a live VM's ports are reserved before anything else"
        );
        let mut replies = Vec::new();
        for (op, call) in calls {
            let result = fake.call_now(call);
            replies.extend(drive(
                &mut c,
                &mut fake,
                now,
                HostInput::HvDone { op, result },
            ));
        }
        assert!(c.is_ready());
        assert!(matches!(reply(&replies), Response::Xml(x) if x.contains("<name>web01</name>")));
        assert_eq!(fake.record("web02"), None);
        assert_eq!(c.vm_state("web01"), Some(VmState::Running));
    }

    /// Feeds a start and its host read; returns the launch the core asks
    /// for, left unanswered.
    fn until_launch(
        c: &mut HostCore,
        fake: &mut FakeQemu,
        now: Instant,
        start: HostInput,
    ) -> (u64, LaunchPlan) {
        let out = c.handle(now, start);
        let (op, call) = hv_calls(&out)[0].clone();
        let result = fake.call_now(call);
        let out = c.handle(now, HostInput::HvDone { op, result });
        match &hv_calls(&out)[..] {
            [(op, HvCall::Launch(plan))] => (*op, (**plan).clone()),
            _ => panic!("expected a launch, got {out:?}"),
        }
    }

    /// A source host h1 (198.18.4.1) whose migrations complete when the test
    /// says so and a destination h2 (198.18.4.2) on one fabric, both booted.
    fn migration_pair(
        make: fn(&str) -> FakeQemu,
        t0: Instant,
    ) -> (FakeQemu, HostCore, FakeQemu, HostCore) {
        let fabric = FakeFabric::new();
        let mut src = make("198.18.4.1");
        let mut dst = make("198.18.4.2");
        src.join(&fabric);
        dst.join(&fabric);
        src.set_auto_complete(false);
        let a = booted("h1", &mut src, t0);
        let b = booted("h2", &mut dst, t0);
        (src, a, dst, b)
    }

    #[test]
    fn incoming_migration_finishes_after_the_stream_lands() {
        let t0 = Instant::now();
        let (mut src, mut a, mut dst, mut b) = migration_pair(fake, t0);
        drive(&mut a, &mut src, t0, req(1, start("web01")));
        let incoming = Request::MigrateIncoming {
            xml: xml("web01"),
            source: "w".into(),
            postcopy: false,
            storage_token: None,
            copy: None,
            allow_unsafe: false,
            incarnation: 0,
        };
        let out = drive(&mut b, &mut dst, t0, req(1, incoming));
        let Response::Incoming { vm, uri, .. } = reply(&out) else {
            panic!("{out:?}");
        };
        assert_eq!(uri, "tcp:198.18.4.2:49152");
        assert_eq!(vm.state, VmRunState::InMigrate);
        assert_eq!(b.vm_state("web01"), Some(VmState::Incoming));
        let out = drive(
            &mut a,
            &mut src,
            t0,
            req(
                2,
                Request::MigrateOut {
                    name: "web01".into(),
                    uri: uri.clone(),
                    max_downtime_ms: Some(300),
                    bandwidth_mib_s: None,
                    auto_converge: true,
                    postcopy: false,
                },
            ),
        );
        assert_eq!(
            reply(&out),
            &Response::Done(format!("migration of 'web01' to {uri} started"))
        );
        assert_eq!(a.vm_state("web01"), Some(VmState::Outgoing));
        let names: Vec<&str> = src
            .process("web01")
            .expect("runs")
            .commands
            .iter()
            .map(|c| c.name())
            .collect();
        assert_eq!(
            names,
            [
                "migrate-set-capabilities",
                "migrate-set-parameters",
                "migrate"
            ]
        );
        // The destination waits for the stream, polling every 5 ms.
        let out = drive(
            &mut b,
            &mut dst,
            t0,
            req(
                2,
                Request::MigrateFinish {
                    name: "web01".into(),
                    paused: false,
                },
            ),
        );
        assert_eq!(out, vec![HostEffect::WakeAt(t0 + FINISH_POLL)]);
        let out = drive(
            &mut a,
            &mut src,
            t0,
            req(
                3,
                Request::MigrationStatus {
                    name: "web01".into(),
                },
            ),
        );
        assert!(matches!(reply(&out), Response::Migration(p) if p.status == "active"));
        assert!(src.complete_migration("web01"));
        let out = drive(
            &mut a,
            &mut src,
            t0,
            req(
                4,
                Request::MigrationStatus {
                    name: "web01".into(),
                },
            ),
        );
        assert!(matches!(reply(&out), Response::Migration(p) if p.status == "completed"));
        assert_eq!(a.vm_state("web01"), Some(VmState::PostMigrate));
        let out = drive(&mut b, &mut dst, t0 + FINISH_POLL, HostInput::Tick);
        assert_eq!(
            reply(&out),
            &Response::Done("Domain 'web01' resumed on host h2".into())
        );
        assert_eq!(b.vm_states(), vec![("web01".to_string(), VmState::Running)]);
        assert_eq!(
            dst.record("web01").map(|r| r.ports),
            Some(vec![5900]),
            "migration port released"
        );
        assert!(!b.port_reserved(49152));
        let facts = b.facts(4, 1024, &dst.interfaces());
        assert_eq!(facts.vms[0].state, VmRunState::Running);
        assert_eq!(
            a.facts(4, 1024, &src.interfaces()).vms[0].state,
            VmRunState::PostMigrate
        );
        assert_eq!(facts.networks[0].address.as_deref(), Some("198.18.4.2"));
    }

    /// A host whose `public` is a macvtap on uplink0 and `lan` a bridge br1.
    fn nic_host(addr: &str) -> FakeQemu {
        let net = |xml: &str| Network::parse("n.xml", xml).expect("valid").model;
        let fake = FakeQemu::new(
            InterfaceTable::new()
                .with("uplink0", &[addr])
                .with("br1", &[]),
        );
        fake.set_networks(HostNetworks {
            dir: PathBuf::from("/sim/networks"),
            networks: vec![
                net("<network><name>lan</name><bridge name='br1'/></network>"),
                net("<network><name>public</name><forward mode='bridge' dev='uplink0'/></network>"),
            ],
            problems: Vec::new(),
        });
        fake
    }

    fn nic_vm(name: &str, uuid: &str) -> String {
        format!(
            "<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>64</memory>\
             <os><type>hvm</type></os><devices>\
             <interface type='network'><source network='public'/></interface>\
             <interface type='network'><source network='lan'/></interface>\
             </devices></domain>"
        )
    }

    #[test]
    fn nics_get_free_devices_and_an_incoming_macvtap_waits_for_the_cpus() {
        let t0 = Instant::now();
        let (mut src, mut a, mut dst, mut b) = migration_pair(nic_host, t0);
        let start = |name: &str, uuid: &str| Request::Start {
            xml: nic_vm(name, uuid),
            source: format!("{name}.xml"),
            incarnation: 0,
        };
        drive(&mut a, &mut src, t0, req(1, start("one", UUID)));
        let out = drive(
            &mut a,
            &mut src,
            t0,
            req(2, start("two", "6f1c1d5e-0b7a-4c33-9a56-000000000002")),
        );
        assert!(
            matches!(reply(&out), Response::Started { live_xml, .. }
            if live_xml.contains("macvtap1") && live_xml.contains("vnet1")),
            "{out:?}"
        );
        let devices: Vec<(String, String, bool)> = src
            .devices()
            .into_iter()
            .map(|(d, f)| (d, f.vm, f.up))
            .collect();
        assert_eq!(
            devices,
            [
                ("macvtap0".into(), "one".into(), true),
                ("macvtap1".into(), "two".into(), true),
                ("vnet0".into(), "one".into(), true),
                ("vnet1".into(), "two".into(), true),
            ]
        );

        // The destination plumbs its own devices, the macvtap down.
        let incoming = Request::MigrateIncoming {
            xml: nic_vm("one", UUID),
            source: "one.xml".into(),
            postcopy: false,
            storage_token: None,
            copy: None,
            allow_unsafe: false,
            incarnation: 0,
        };
        let out = drive(&mut b, &mut dst, t0, req(1, incoming));
        let Response::Incoming { uri, .. } = reply(&out) else {
            panic!("{out:?}");
        };
        assert_eq!(dst.devices().get("macvtap0").map(|d| d.up), Some(false));
        let out_req = Request::MigrateOut {
            name: "one".into(),
            uri: uri.clone(),
            max_downtime_ms: None,
            bandwidth_mib_s: None,
            auto_converge: false,
            postcopy: false,
        };
        drive(&mut a, &mut src, t0, req(3, out_req));
        assert!(src.complete_migration("one"));
        // The source learns of the completion and takes its macvtap down
        // before it says so.
        let status = Request::MigrationStatus { name: "one".into() };
        let out = drive(&mut a, &mut src, t0, req(5, status));
        assert!(matches!(reply(&out), Response::Migration(p) if p.status == "completed"));
        assert_eq!(src.devices().get("macvtap0").map(|d| d.up), Some(false));
        let finish = Request::MigrateFinish {
            name: "one".into(),
            paused: false,
        };
        let out = drive(&mut b, &mut dst, t0, req(2, finish));
        assert!(matches!(reply(&out), Response::Done(_)), "{out:?}");
        assert_eq!(dst.devices().get("macvtap0").map(|d| d.up), Some(true));
        let sent: Vec<&str> = dst
            .process("one")
            .expect("runs")
            .commands
            .iter()
            .map(QmpCommand::name)
            .filter(|c| *c != "query-status")
            .collect();
        assert_eq!(sent[sent.len() - 2..], ["cont", "announce-self"]);

        // Resumed (a migration undone), the source brings its macvtap back
        // first; then its QEMU quits: the tap goes with it, the macvtap with
        // the record.
        let out = drive(
            &mut a,
            &mut src,
            t0,
            req(
                6,
                Request::Resume {
                    name: "one".into(),
                    operator: true,
                },
            ),
        );
        assert!(matches!(reply(&out), Response::Done(_)), "{out:?}");
        assert_eq!(src.devices().get("macvtap0").map(|d| d.up), Some(true));
        drive(
            &mut a,
            &mut src,
            t0,
            req(4, Request::Destroy { name: "one".into() }),
        );
        for exit in src.take_exits() {
            drive(&mut a, &mut src, t0, exit);
        }
        let left: Vec<String> = src.devices().into_keys().collect();
        assert_eq!(left, ["macvtap1", "vnet1"]);
    }

    #[test]
    fn an_incoming_guest_is_refused_unless_it_sees_the_sources_storage() {
        let t0 = Instant::now();
        let disk = "<disk type='file' device='disk'><source file='/srv/web01.qcow2'/>\
                    <target dev='vda' bus='virtio'/></disk>";
        let with_disk = xml("web01").replace("<devices>", &format!("<devices>{disk}"));
        let fabric = FakeFabric::new();
        let mut src = fake("198.18.4.1");
        src.join(&fabric);
        let mut a = booted("h1", &mut src, t0);
        let start = Request::Start {
            xml: with_disk.clone(),
            source: "w".into(),
            incarnation: 0,
        };
        drive(&mut a, &mut src, t0, req(1, start));
        let mark = Request::MarkStorage {
            name: "web01".into(),
            token: "t-1".into(),
        };
        let out = drive(&mut a, &mut src, t0, req(2, mark));
        let image = DiskImage {
            target: "vda".into(),
            path: "/srv/web01.qcow2".into(),
            format: "raw".into(),
            virtual_size: 1 << 30,
            backing: None,
            backing_format: None,
        };
        assert_eq!(reply(&out), &Response::StorageMarked(vec![image.clone()]));
        let request =
            |token: &str, copy: Option<StorageCopy>, allow_unsafe| Request::MigrateIncoming {
                xml: with_disk.clone(),
                source: "w".into(),
                postcopy: false,
                storage_token: Some(token.into()),
                copy,
                allow_unsafe,
                incarnation: 0,
            };
        let incoming = |token: &str| request(token, None, false);
        // A host with a file of its own at the same path.
        let mut other = fake("198.18.4.3");
        other.join(&fabric);
        other.use_private_storage();
        let mut c = booted("h3", &mut other, t0);
        let out = drive(&mut c, &mut other, t0, req(1, incoming("t-1")));
        assert!(
            matches!(reply(&out), Response::Error(e) if e.contains("disk vda (/srv/web01.qcow2) is not on storage both hosts share")),
            "{out:?}"
        );
        assert!(other.process("web01").is_none(), "nothing started");
        // `--unsafe` takes the operator's word for it.
        let out = drive(&mut c, &mut other, t0, req(2, request("t-1", None, true)));
        assert!(
            matches!(reply(&out), Response::Incoming { nbd: None, .. }),
            "{out:?}"
        );
        // An older token is no proof either; the current one is.
        let mut dst = fake("198.18.4.2");
        dst.join(&fabric);
        let mut b = booted("h2", &mut dst, t0);
        let out = drive(&mut b, &mut dst, t0, req(1, incoming("t-0")));
        assert!(matches!(reply(&out), Response::Error(e) if e.contains("holds another token")));
        // Shared storage is never copied onto itself.
        let copy = StorageCopy {
            mode: CopyMode::All,
            disks: vec![image],
        };
        let out = drive(
            &mut b,
            &mut dst,
            t0,
            req(2, request("t-1", Some(copy), false)),
        );
        assert!(
            matches!(reply(&out), Response::Error(e) if e.contains("with --copy-storage-all: disk vda (/srv/web01.qcow2) is on storage both hosts share")),
            "{out:?}"
        );
        let out = drive(&mut b, &mut dst, t0, req(3, incoming("t-1")));
        assert!(matches!(reply(&out), Response::Incoming { .. }), "{out:?}");
    }

    #[test]
    fn incoming_migrations_listen_where_the_coordinator_is_reached_from() {
        let t0 = Instant::now();
        let incoming = || Request::MigrateIncoming {
            xml: xml("web01"),
            source: "w".into(),
            postcopy: false,
            storage_token: None,
            copy: None,
            allow_unsafe: false,
            incarnation: 0,
        };
        for (route, uri) in [
            // Before the link is up: the first network that resolves.
            (None, "tcp:198.18.4.2:49152"),
            (Some("198.19.0.12"), "tcp:198.19.0.12:49152"),
            // A coordinator on this host says nothing about the others.
            (Some("127.0.0.1"), "tcp:198.18.4.2:49152"),
        ] {
            let mut dst = fake("198.18.4.2");
            let mut b = booted("h2", &mut dst, t0);
            if let Some(ip) = route {
                let local = ip.parse().expect("ip");
                assert_eq!(b.handle(t0, HostInput::CoordinatorRoute { local }), vec![]);
            }
            let out = drive(&mut b, &mut dst, t0, req(1, incoming()));
            assert!(
                matches!(reply(&out), Response::Incoming { uri: u, .. } if u == uri),
                "{route:?}: {out:?}"
            );
        }
    }

    #[test]
    fn finish_gives_up_after_a_minute_and_missing_disks_refuse() {
        let t0 = Instant::now();
        let mut dst = fake("198.18.4.2");
        let mut b = booted("h2", &mut dst, t0);
        let incoming = Request::MigrateIncoming {
            xml: xml("web01"),
            source: "w".into(),
            postcopy: true,
            storage_token: None,
            copy: None,
            allow_unsafe: false,
            incarnation: 0,
        };
        drive(&mut b, &mut dst, t0, req(1, incoming));
        let caps = &dst.process("web01").expect("runs").plan.mode;
        assert!(matches!(caps, LaunchMode::Incoming { postcopy: true, .. }));
        drive(
            &mut b,
            &mut dst,
            t0,
            req(
                2,
                Request::MigrateFinish {
                    name: "web01".into(),
                    paused: false,
                },
            ),
        );
        let late = t0 + FINISH_DEADLINE + Duration::from_secs(1);
        let out = drive(&mut b, &mut dst, late, HostInput::Tick);
        assert_eq!(
            reply(&out),
            &Response::Error("VM 'web01' on host h2: the migration stream never completed".into())
        );
        // A disk that is not on this host refuses the migration before QEMU starts.
        let with_disk = xml("web03")
            .replace(UUID, "00000000-0000-4000-8000-000000000003")
            .replace(
                "<devices>",
                "<devices><disk type='file' device='disk'><source file='/images/web03.qcow2'/>\
             <target dev='vda' bus='virtio'/></disk>",
            );
        dst.set_missing("/images/web03.qcow2", true);
        let out = drive(
            &mut b,
            &mut dst,
            t0,
            req(
                3,
                Request::MigrateIncoming {
                    xml: with_disk,
                    source: "w".into(),
                    postcopy: false,
                    storage_token: None,
                    copy: None,
                    allow_unsafe: false,
                    incarnation: 0,
                },
            ),
        );
        assert_eq!(
            reply(&out),
            &Response::Error(
                "cannot accept VM 'web03' on host h2: disk source /images/web03.qcow2 does not exist \
                 here (live migration needs storage both hosts see; --copy-storage-all copies \
                 writable disks)"
                    .into()
            )
        );
        assert!(!b.port_reserved(5901), "console port released on refusal");
    }

    #[test]
    fn an_exit_that_overtakes_the_launch_answer_fails_the_start_and_removes_its_macvtaps() {
        let now = Instant::now();
        let mut fake = nic_host("198.18.4.1");
        let mut c = booted("h1", &mut fake, now);
        let start = Request::Start {
            xml: nic_vm("one", UUID),
            source: "one.xml".into(),
            incarnation: 0,
        };
        let (op, plan) = until_launch(&mut c, &mut fake, now, req(1, start));
        let result = fake.call_now(HvCall::Launch(Box::new(plan)));
        let HvResult::Launched { pid } = result else {
            panic!("{result:?}");
        };
        // The watcher reports the exit before the launch's answer arrives.
        let exit = HostInput::VmExited {
            name: "one".into(),
            pid,
            reason: "QEMU exited (signal: 6 (SIGABRT))".into(),
            log_tail: String::new(),
        };
        assert_eq!(c.handle(now, exit), vec![]);
        let out = c.handle(now, HostInput::HvDone { op, result });
        assert!(
            matches!(reply(&out), Response::Error(e) if e.contains("QEMU exited right after it started")),
            "{out:?}"
        );
        assert!(hv_calls(&out).iter().any(|(_, call)| matches!(call,
            HvCall::RemoveRecord { macvtaps, .. } if macvtaps == &["macvtap0".to_string()])));
        assert_eq!(c.vm_state("one"), None);
    }

    #[test]
    fn a_pending_start_does_not_hold_up_other_requests() {
        let now = Instant::now();
        let mut fake = fake("198.18.4.1");
        let mut c = booted("h1", &mut fake, now);
        drive(&mut c, &mut fake, now, req(1, start("web01")));
        // web02's launch is under way and stays so.
        let xml2 = xml("web02").replace(UUID, "00000000-0000-4000-8000-000000000002");
        let start = Request::Start {
            xml: xml2,
            source: "w".into(),
            incarnation: 0,
        };
        until_launch(&mut c, &mut fake, now, req(2, start));
        // Meanwhile web01 is served: a status poll, a console listing.
        let out = drive(
            &mut c,
            &mut fake,
            now,
            req(
                3,
                Request::MigrationStatus {
                    name: "web01".into(),
                },
            ),
        );
        assert!(matches!(reply(&out), Response::Migration(p) if p.status == "none"));
        let out = drive(
            &mut c,
            &mut fake,
            now,
            req(
                4,
                Request::DomDisplay {
                    name: "web01".into(),
                },
            ),
        );
        assert!(matches!(reply(&out), Response::Consoles(c) if c.len() == 1));
        // And web02 counts as not running yet.
        let out = drive(
            &mut c,
            &mut fake,
            now,
            req(
                5,
                Request::DumpXml {
                    name: "web02".into(),
                },
            ),
        );
        assert_eq!(
            reply(&out),
            &Response::Error(
                "Requested operation is not valid: domain 'web02' is not running on host h1".into()
            )
        );
        assert_eq!(c.vm_state("web02"), Some(VmState::Starting));
    }

    #[test]
    fn qmp_passthrough_and_errors_are_worded_as_before() {
        let now = Instant::now();
        let mut fake = fake("198.18.4.1");
        let mut c = booted("h1", &mut fake, now);
        drive(&mut c, &mut fake, now, req(1, start("web01")));
        let cases: Vec<(Request, Response)> = vec![
            (
                Request::MonitorCommand {
                    name: "web01".into(),
                    command: "info status".into(),
                },
                Response::Done(String::new()),
            ),
            (
                Request::StartPostcopy {
                    name: "web01".into(),
                },
                Response::Error(
                    "migrate-start-postcopy: QMP command 'migrate-start-postcopy' failed: \
                     GenericError: Postcopy must be started after migration has been started"
                        .into(),
                ),
            ),
            (
                Request::ClientMigrateInfo {
                    name: "web01".into(),
                    hostname: "h2".into(),
                    port: 5901,
                },
                Response::Done("SPICE clients told to reconnect".into()),
            ),
            (
                Request::MigrateCancel {
                    name: "web01".into(),
                },
                Response::Done("migration cancel requested".into()),
            ),
            (
                Request::Resume {
                    name: "web01".into(),
                    operator: true,
                },
                Response::Done("resumed".into()),
            ),
        ];
        for (i, (request, expected)) in cases.into_iter().enumerate() {
            let out = drive(&mut c, &mut fake, now, req(10 + i as u64, request));
            assert_eq!(reply(&out), &expected);
        }
        let sent: Vec<QmpCommand> = fake.process("web01").expect("runs").commands;
        assert_eq!(sent[0], QmpCommand::HumanMonitor("info status".into()));
        assert_eq!(
            sent[2],
            QmpCommand::ClientMigrateInfo {
                hostname: "h2".into(),
                port: 5901
            }
        );
    }

    #[test]
    fn list_queries_each_vm_and_unknown_on_failure() {
        let now = Instant::now();
        let mut fake = fake("198.18.4.1");
        let mut c = booted("h1", &mut fake, now);
        assert_eq!(
            drive(&mut c, &mut fake, now, req(1, Request::List)),
            vec![HostEffect::Reply {
                id: 1,
                response: Response::Vms(vec![])
            }]
        );
        drive(&mut c, &mut fake, now, req(2, start("web01")));
        let out = c.handle(now, req(3, Request::List));
        let calls = hv_calls(&out);
        assert_eq!(calls.len(), 1);
        let (op, _) = calls[0];
        let out = c.handle(
            now,
            HostInput::HvDone {
                op,
                result: HvResult::Failed("QMP command 'query-status' timed out".into()),
            },
        );
        assert!(matches!(reply(&out), Response::Vms(v) if v[0].state == VmRunState::Unknown));
    }
}
