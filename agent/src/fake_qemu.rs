//! `FakeQemu`: an in-memory [`Hypervisor`] for deterministic simulations.
//!
//! It does no I/O and every call completes at once: [`FakeQemu::call_now`]
//! answers synchronously, and the [`Hypervisor`] impl returns a ready future
//! (poll it with `futures_util::FutureExt::now_or_never`). It models one
//! host:
//!
//! - **processes** by VM name, each with a pid, the launch plan it got, and a
//!   QEMU run state (`running`, `paused`, `inmigrate`, `postmigrate`);
//!   `system_powerdown` powers the guest off unless
//!   [`FakeQemu::set_ignores_acpi`], `quit` and signals end it,
//!   [`FakeQemu::crash`] kills it;
//! - **migration**: an incoming QEMU listens on its URI on a [`FakeFabric`]
//!   shared by the hosts of a simulation; `migrate` to that URI completes
//!   immediately (the source goes `postmigrate`, the destination `paused`)
//!   or, after [`FakeQemu::set_auto_complete`]`(false)`, when the simulation
//!   calls [`FakeQemu::complete_migration`]; a URI nobody listens on fails;
//! - the **state directory**: records written and removed by the core. They
//!   and the processes live in the `FakeQemu`, not in the core, so a new
//!   [`HostCore`] over the same `FakeQemu` (an agent restart) re-attaches to
//!   the VMs still running and drops the records of those that died;
//! - the host's **interface table**, **network definitions** and which disk
//!   paths are missing;
//! - **storage copies**: an incoming QEMU launched with NBD exports serves
//!   them on the fabric; a source's mirror into it becomes ready at the next
//!   `query-block-jobs`, and concludes in sync when completed (cancel without
//!   force) while the source's guest is stopped. With
//!   `pause-before-switchover` a migration stops in `pre-switchover` until
//!   `migrate-continue`. A destination that resumes a guest on copied disks
//!   that never concluded in sync is recorded ([`FakeQemu::stale_disks`]).
//!
//! Process exits are not fed to the core by the fake: they queue up and the
//! simulation delivers them, in whatever order and at whatever time it
//! chooses, with [`FakeQemu::take_exits`]. [`drive`] runs one input to
//! quiescence, answering every hypervisor call with the fake. See
//! [`crate::host_core`] for a complete example.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde_json::{json, Value};

use crate::argv::{Accel, QemuHost};
use crate::console::ConsoleSettings;
use crate::host_core::{
    AgentSettings, FoundRecord, HostCore, HostEffect, HostInput, HostRead, HvCall, HvFuture,
    HvResult, Hypervisor, LaunchPlan, VmSignal,
};
use crate::host_networks::HostNetworks;
use crate::hypervisor::Stray;
use crate::interfaces::InterfaceTable;
use crate::qemu_process::{LaunchMode, StartTimeouts};
use crate::qmp::{MigrationCapability, QmpCommand};
use crate::vm_record::VmRecord;

/// Settings for a simulated host named `host`: fixed paths, TCG, defaults.
pub fn sim_settings(host: &str) -> AgentSettings {
    AgentSettings {
        networks_dir: PathBuf::from("/sim/networks"),
        state_dir: PathBuf::from(format!("/sim/{host}/state")),
        console: ConsoleSettings {
            host: host.to_string(),
            ..ConsoleSettings::default()
        },
        qemu: QemuHost {
            emulator: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            accel: Accel::Tcg,
            ovmf: None,
            hugepages: None,
            user: None,
            cgroups: None,
            spice_tls: None,
        },
        timeouts: StartTimeouts::default(),
        migration_network: None,
    }
}

/// Feeds `input` to `core` and answers every hypervisor call it makes with
/// `fake`, until none is left; returns the other effects (replies, events,
/// wake-ups) in order. QEMU exits caused meanwhile wait in
/// [`FakeQemu::take_exits`].
pub fn drive(
    core: &mut HostCore,
    fake: &mut FakeQemu,
    now: Instant,
    input: HostInput,
) -> Vec<HostEffect> {
    let mut inputs = VecDeque::from([input]);
    let mut out = Vec::new();
    while let Some(input) = inputs.pop_front() {
        for effect in core.handle(now, input) {
            match effect {
                HostEffect::Hv { op, call } => {
                    let result = fake.call_now(call);
                    inputs.push_back(HostInput::HvDone { op, result });
                }
                other => out.push(other),
            }
        }
    }
    out
}

/// The migration network of a simulation: which fake QEMU listens on which
/// URI, and the storage its hosts share (storage markers by path).
#[derive(Clone, Default)]
pub struct FakeFabric {
    listeners: Arc<Mutex<BTreeMap<String, (FakeQemu, String)>>>,
    storage: Arc<Mutex<BTreeMap<PathBuf, String>>>,
    /// NBD servers of incoming QEMUs, by `host:port`.
    nbd: Arc<Mutex<BTreeMap<String, (FakeQemu, String)>>>,
}

impl std::fmt::Debug for FakeFabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let uris: Vec<String> = lock(&self.listeners).keys().cloned().collect();
        f.debug_struct("FakeFabric")
            .field("listening", &uris)
            .finish()
    }
}

impl FakeFabric {
    /// An empty fabric.
    pub fn new() -> Self {
        Self::default()
    }

    fn listening(&self, uri: &str) -> bool {
        lock(&self.listeners).contains_key(uri)
    }

    /// A mirror into the NBD server at `target` concluded in sync with a
    /// stopped guest: that destination's disks now hold what the guest wrote.
    fn synced(&self, target: &str) {
        let dest = lock(&self.nbd).get(target).cloned();
        if let Some((host, name)) = dest {
            if let Some(p) = host.host().procs.get_mut(&name) {
                p.disk_synced = true;
            }
        }
    }

    /// The incoming QEMU on `uri` received the whole stream: it is now paused.
    fn land(&self, uri: &str) {
        let target = lock(&self.listeners).remove(uri);
        if let Some((host, name)) = target {
            let mut h = host.host();
            if let Some(p) = h.procs.get_mut(&name) {
                if p.status == "inmigrate" {
                    p.status = "paused".into();
                }
            }
        }
    }
}

/// An outgoing migration of a fake QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeMigration {
    /// Where to.
    pub uri: String,
    /// `active`, `postcopy-active`, `completed`, `failed`, `cancelled`.
    pub status: String,
    /// Why it failed.
    pub error: Option<String>,
}

/// One fake QEMU process.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeProcess {
    /// Its pid.
    pub pid: i32,
    /// What it was launched with.
    pub plan: LaunchPlan,
    /// QEMU's run state.
    pub status: String,
    /// The guest ignores `system_powerdown`.
    pub ignores_acpi: bool,
    /// Where it listens for an incoming migration.
    pub listening: Option<String>,
    /// Its outgoing migration, if any.
    pub migration: Option<FakeMigration>,
    /// Every QMP command it received, in order.
    pub commands: Vec<QmpCommand>,
    /// `pause-before-switchover` is on.
    pub pause_before_switchover: bool,
    /// Its disk mirrors (a storage copy's source), by job id.
    pub mirrors: BTreeMap<String, FakeMirror>,
    /// NBD client nodes and the `host:port` each reaches.
    pub nbd_clients: BTreeMap<String, String>,
    /// Where it serves copied disks (a storage copy's destination).
    pub nbd: Option<String>,
    /// A mirror into it concluded in sync with the guest stopped.
    pub disk_synced: bool,
}

/// One `blockdev-mirror` job of a fake QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeMirror {
    /// The NBD client node it writes to.
    pub target: String,
    /// `running`, `ready` or `concluded`.
    pub status: String,
    /// In sync; writes are mirrored.
    pub ready: bool,
}

/// What the fabric must learn after a call (done once the host is unlocked).
enum Follow {
    Nothing,
    /// The listener on this URI received a whole migration.
    Land(String),
    /// This host's VM listens on this URI (and serves NBD at this `host:port`).
    Listen(String, String, Option<String>),
    /// A mirror into the NBD server at this `host:port` concluded in sync.
    Synced(String),
}

/// A guest NIC's host device on a fake host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeDevice {
    /// The VM whose launch created it.
    pub vm: String,
    /// A macvtap (outlives QEMU) rather than a tap (goes with it).
    pub macvtap: bool,
    /// Administratively up.
    pub up: bool,
}

#[derive(Debug)]
struct FakeHost {
    interfaces: Result<InterfaceTable, String>,
    /// Guest NIC devices, by name.
    devices: BTreeMap<String, FakeDevice>,
    /// Launches refused because a device name was taken: a planning bug.
    collisions: Vec<String>,
    /// Guests resumed on copied disks that never concluded in sync.
    stale_disks: Vec<String>,
    /// Storage markers when this host does not share the fabric's storage.
    private_storage: Option<BTreeMap<PathBuf, String>>,
    networks: HostNetworks,
    missing: BTreeSet<String>,
    procs: BTreeMap<String, FakeProcess>,
    records: BTreeMap<String, (VmRecord, String)>,
    next_pid: i32,
    exits: Vec<HostInput>,
    auto_complete: bool,
    fail_launch: BTreeMap<String, String>,
    fabric: FakeFabric,
}

/// An in-memory host with fake QEMU processes. Cheap to clone; clones are
/// the same host.
#[derive(Debug, Clone)]
pub struct FakeQemu {
    inner: Arc<Mutex<FakeHost>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FakeQemu {
    /// A host with these interfaces, no networks, its own fabric.
    pub fn new(interfaces: InterfaceTable) -> Self {
        FakeQemu {
            inner: Arc::new(Mutex::new(FakeHost {
                interfaces: Ok(interfaces),
                devices: BTreeMap::new(),
                collisions: Vec::new(),
                stale_disks: Vec::new(),
                private_storage: None,
                networks: HostNetworks::default(),
                missing: BTreeSet::new(),
                procs: BTreeMap::new(),
                records: BTreeMap::new(),
                next_pid: 1000,
                exits: Vec::new(),
                auto_complete: true,
                fail_launch: BTreeMap::new(),
                fabric: FakeFabric::new(),
            })),
        }
    }

    fn host(&self) -> MutexGuard<'_, FakeHost> {
        lock(&self.inner)
    }

    /// Joins a migration fabric shared with other fake hosts.
    pub fn join(&self, fabric: &FakeFabric) {
        self.host().fabric = fabric.clone();
    }

    /// Gives this host storage of its own: same paths, other files.
    pub fn use_private_storage(&self) {
        self.host().private_storage = Some(BTreeMap::new());
    }

    /// Replaces the network definitions (what `LoadNetworks` returns).
    pub fn set_networks(&self, networks: HostNetworks) {
        self.host().networks = networks;
    }

    /// The network definitions, e.g. for [`HostCore::new`].
    pub fn networks(&self) -> HostNetworks {
        self.host().networks.clone()
    }

    /// Replaces the interface table, or makes it unreadable with `Err`.
    pub fn set_interfaces(&self, interfaces: Result<InterfaceTable, String>) {
        self.host().interfaces = interfaces;
    }

    /// The interface table (empty when unreadable), e.g. for [`HostCore::facts`].
    pub fn interfaces(&self) -> InterfaceTable {
        self.host().interfaces.clone().unwrap_or_default()
    }

    /// Marks a disk path as absent on this host (or present again).
    pub fn set_missing(&self, path: &str, missing: bool) {
        let mut h = self.host();
        if missing {
            h.missing.insert(path.to_string());
        } else {
            h.missing.remove(path);
        }
    }

    /// Whether outgoing migrations complete at `migrate` (the default) or
    /// only at [`FakeQemu::complete_migration`].
    pub fn set_auto_complete(&self, auto: bool) {
        self.host().auto_complete = auto;
    }

    /// The next launch of `name` fails with `error`.
    pub fn fail_next_launch(&self, name: &str, error: &str) {
        self.host()
            .fail_launch
            .insert(name.to_string(), error.to_string());
    }

    /// Whether `name`'s guest ignores ACPI power-down.
    pub fn set_ignores_acpi(&self, name: &str, ignores: bool) {
        if let Some(p) = self.host().procs.get_mut(name) {
            p.ignores_acpi = ignores;
        }
    }

    /// Completes `name`'s outgoing migration: the source goes `postmigrate`,
    /// the destination `paused`. False when none is active or nobody listens.
    pub fn complete_migration(&self, name: &str) -> bool {
        let uri = {
            let mut h = self.host();
            let fabric = h.fabric.clone();
            let Some(p) = h.procs.get_mut(name) else {
                return false;
            };
            let Some(m) = p.migration.as_mut() else {
                return false;
            };
            if !matches!(m.status.as_str(), "active" | "postcopy-active")
                || !fabric.listening(&m.uri)
            {
                return false;
            }
            if p.pause_before_switchover {
                // Stopped before switchover, until `migrate-continue`.
                m.status = "pre-switchover".into();
                p.status = "finish-migrate".into();
                return true;
            }
            m.status = "completed".into();
            p.status = "postmigrate".into();
            m.uri.clone()
        };
        let fabric = self.host().fabric.clone();
        fabric.land(&uri);
        true
    }

    /// Fails `name`'s outgoing migration with `error`; the guest keeps running.
    pub fn fail_migration(&self, name: &str, error: &str) {
        if let Some(m) = self
            .host()
            .procs
            .get_mut(name)
            .and_then(|p| p.migration.as_mut())
        {
            m.status = "failed".into();
            m.error = Some(error.to_string());
        }
    }

    /// QEMU of `name` crashes (SIGABRT); its exit waits in [`FakeQemu::take_exits`].
    pub fn crash(&self, name: &str) {
        self.host().exit(name, "QEMU exited (signal: 6 (SIGABRT))");
    }

    /// Exits that happened since the last call, as inputs for the core.
    pub fn take_exits(&self) -> Vec<HostInput> {
        std::mem::take(&mut self.host().exits)
    }

    /// A process by VM name.
    pub fn process(&self, name: &str) -> Option<FakeProcess> {
        self.host().procs.get(name).cloned()
    }

    /// Names of the running processes.
    pub fn running(&self) -> Vec<String> {
        self.host().procs.keys().cloned().collect()
    }

    /// The guest NIC devices on this host.
    pub fn devices(&self) -> BTreeMap<String, FakeDevice> {
        self.host().devices.clone()
    }

    /// A launch whose QEMU died before it answered failed: as the real
    /// hypervisor does, delete the macvtaps it created (its taps went with
    /// QEMU).
    pub fn abandon_launch(&self, name: &str) {
        let mut host = self.host();
        if !host.procs.contains_key(name) {
            host.devices.retain(|_, d| !(d.macvtap && d.vm == name));
        }
    }

    /// Devices a launch wanted that another VM held (each one a bug).
    pub fn collisions(&self) -> Vec<String> {
        self.host().collisions.clone()
    }

    /// Guests this host resumed on copied disks that never concluded in sync.
    pub fn stale_disks(&self) -> Vec<String> {
        self.host().stale_disks.clone()
    }

    /// A VM's record in the state directory.
    pub fn record(&self, name: &str) -> Option<VmRecord> {
        self.host().records.get(name).map(|r| r.0.clone())
    }

    /// Carries out `call` at once.
    pub fn call_now(&mut self, call: HvCall) -> HvResult {
        let (result, follow) = self.host().call(call);
        let fabric = self.host().fabric.clone();
        match follow {
            Follow::Nothing => {}
            Follow::Land(uri) => fabric.land(&uri),
            Follow::Listen(uri, name, nbd) => {
                if let Some(target) = nbd {
                    lock(&fabric.nbd).insert(target, (self.clone(), name.clone()));
                }
                lock(&fabric.listeners).insert(uri, (self.clone(), name));
            }
            Follow::Synced(target) => fabric.synced(&target),
        }
        result
    }
}

impl Hypervisor for FakeQemu {
    fn call(&self, call: HvCall) -> HvFuture {
        let mut me = self.clone();
        Box::pin(std::future::ready(me.call_now(call)))
    }
}

impl FakeHost {
    fn exit(&mut self, name: &str, reason: &str) {
        if let Some(p) = self.procs.remove(name) {
            // A tap goes with QEMU's last fd; a macvtap stays until deleted.
            self.devices.retain(|_, d| d.macvtap || d.vm != name);
            if let Some(uri) = &p.listening {
                lock(&self.fabric.listeners).remove(uri);
            }
            if let Some(target) = &p.nbd {
                lock(&self.fabric.nbd).remove(target);
            }
            self.exits.push(HostInput::VmExited {
                name: name.to_string(),
                pid: p.pid,
                reason: reason.to_string(),
                log_tail: String::new(),
            });
        }
    }

    /// The result, and what the fabric must learn.
    fn call(&mut self, call: HvCall) -> (HvResult, Follow) {
        let result = match call {
            HvCall::FindStrays { known, .. } => HvResult::Strays(
                self.procs
                    .iter()
                    .filter(|(name, _)| !known.contains(name))
                    .map(|(name, p)| Stray {
                        name: name.clone(),
                        pid: p.pid,
                    })
                    .collect(),
            ),
            HvCall::ScanRecords { .. } => HvResult::Records(
                self.records
                    .values()
                    .map(|(record, live_xml)| {
                        let alive = self
                            .procs
                            .get(&record.name)
                            .is_some_and(|p| p.pid == record.pid && p.plan.uuid == record.uuid);
                        FoundRecord {
                            record: record.clone(),
                            alive,
                            live_xml: if alive {
                                live_xml.clone()
                            } else {
                                String::new()
                            },
                        }
                    })
                    .collect(),
            ),
            HvCall::Attach { name, pid, .. } => match self.procs.get(&name) {
                Some(p) if p.pid == pid => HvResult::Done,
                _ => HvResult::Exited,
            },
            HvCall::ReadHost { paths, markers } => HvResult::Host(HostRead {
                markers: {
                    let shared = lock(&self.fabric.storage).clone();
                    let storage = self.private_storage.as_ref().unwrap_or(&shared);
                    markers
                        .into_iter()
                        .map(|m| {
                            let text = storage.get(&m).cloned();
                            (m, text)
                        })
                        .collect()
                },
                interfaces: self.interfaces.clone().map(|mut t| {
                    for d in self.devices.keys() {
                        t.add(d, None);
                    }
                    t
                }),
                missing: paths
                    .into_iter()
                    .filter(|p| self.missing.contains(p))
                    .collect(),
                vhost_net: false,
            }),
            HvCall::LoadNetworks { .. } => HvResult::Networks(self.networks.clone()),
            HvCall::Launch(plan) => return self.launch(*plan),
            HvCall::Qmp { vm, cmd, .. } => return self.qmp(&vm, cmd),
            HvCall::ConfirmConsoles { .. } => HvResult::Done,
            // The simulated guests run no guest agent.
            HvCall::GuestAgent { .. } => HvResult::Failed("no guest agent".into()),
            HvCall::Signal { vm, pid, signal } => {
                if self.procs.get(&vm).is_some_and(|p| p.pid == pid) {
                    let reason = match signal {
                        VmSignal::Term => "QEMU exited (signal: 15 (SIGTERM))",
                        VmSignal::Kill => "QEMU exited (signal: 9 (SIGKILL))",
                    };
                    self.exit(&vm, reason);
                }
                HvResult::Done
            }
            HvCall::WriteRecord {
                record, live_xml, ..
            } => {
                let name = record.name.clone();
                let xml = match live_xml {
                    Some(x) => x,
                    None => self
                        .records
                        .get(&name)
                        .map(|r| r.1.clone())
                        .unwrap_or_default(),
                };
                self.records.insert(name, (record, xml));
                HvResult::Done
            }
            HvCall::RemoveImages { .. } => HvResult::Done,
            HvCall::RemoveRecord { name, macvtaps, .. } => {
                self.records.remove(&name);
                for d in macvtaps {
                    self.devices.remove(&d);
                }
                HvResult::Done
            }
            HvCall::SetLinks { devs, up } => {
                match devs.iter().find(|d| !self.devices.contains_key(*d)) {
                    Some(d) => HvResult::Failed(format!("no device '{d}' on this host")),
                    None => {
                        for d in devs {
                            if let Some(dev) = self.devices.get_mut(&d) {
                                dev.up = up;
                            }
                        }
                        HvResult::Done
                    }
                }
            }
            HvCall::WriteMarkers { markers } => {
                match self.private_storage.as_mut() {
                    Some(own) => own.extend(markers),
                    None => lock(&self.fabric.storage).extend(markers),
                }
                HvResult::Done
            }
            HvCall::RemoveMarkers { paths } => {
                for p in paths {
                    match self.private_storage.as_mut() {
                        Some(own) => own.remove(&p),
                        None => lock(&self.fabric.storage).remove(&p),
                    };
                }
                HvResult::Done
            }
            HvCall::RemoveStrayNics { keep } => {
                self.devices
                    .retain(|_, d| !d.macvtap || keep.contains(&d.vm));
                HvResult::Done
            }
        };
        (result, Follow::Nothing)
    }

    fn launch(&mut self, plan: LaunchPlan) -> (HvResult, Follow) {
        if let Some(e) = self.fail_launch.remove(&plan.name) {
            return (HvResult::Failed(e), Follow::Nothing);
        }
        if self.procs.contains_key(&plan.name) {
            let e = format!("a QEMU for '{}' already runs", plan.name);
            return (HvResult::Failed(e), Follow::Nothing);
        }
        let pid = self.next_pid;
        self.next_pid += 1;
        let wanted: Vec<(String, bool)> = plan
            .nics
            .iter()
            .filter_map(|n| n.dev.clone().map(|d| (d, n.is_macvtap())))
            .collect();
        if let Some((d, _)) = wanted.iter().find(|(d, _)| self.devices.contains_key(d)) {
            self.collisions.push(format!("{}: {d}", plan.name));
            let e = format!("cannot create device '{d}': Device or resource busy");
            return (HvResult::Failed(e), Follow::Nothing);
        }
        // Two QEMUs cannot listen on one address: the agent must not hand
        // out a migration port that a live incoming QEMU still holds.
        if let LaunchMode::Incoming { uri, .. } = &plan.mode {
            if lock(&self.fabric.listeners).contains_key(uri) {
                self.collisions.push(format!("{}: {uri}", plan.name));
                let e = format!("{uri}: Address already in use");
                return (HvResult::Failed(e), Follow::Nothing);
            }
        }
        let run = plan.mode == LaunchMode::Run;
        for (d, macvtap) in wanted {
            let device = FakeDevice {
                vm: plan.name.clone(),
                macvtap,
                // An incoming guest's macvtaps wait for SetLinks.
                up: !macvtap || run,
            };
            self.devices.insert(d, device);
        }
        let (status, listening, nbd) = match &plan.mode {
            LaunchMode::Run => ("running", None, None),
            LaunchMode::Incoming { uri, nbd, .. } => (
                "inmigrate",
                Some(uri.clone()),
                nbd.as_ref().map(|n| format!("{}:{}", n.host, n.port)),
            ),
        };
        let follow = match &listening {
            Some(uri) => Follow::Listen(uri.clone(), plan.name.clone(), nbd.clone()),
            None => Follow::Nothing,
        };
        self.procs.insert(
            plan.name.clone(),
            FakeProcess {
                pid,
                status: status.to_string(),
                ignores_acpi: false,
                listening,
                migration: None,
                commands: Vec::new(),
                plan,
                pause_before_switchover: false,
                mirrors: BTreeMap::new(),
                nbd_clients: BTreeMap::new(),
                nbd,
                disk_synced: false,
            },
        );
        (HvResult::Launched { pid }, follow)
    }

    fn qmp(&mut self, vm: &str, cmd: QmpCommand) -> (HvResult, Follow) {
        let auto = self.auto_complete;
        let fabric = self.fabric.clone();
        let Some(p) = self.procs.get_mut(vm) else {
            return (
                HvResult::Failed("QMP connection closed".into()),
                Follow::Nothing,
            );
        };
        p.commands.push(cmd.clone());
        let err = |class: &str, desc: &str| {
            HvResult::Failed(format!(
                "QMP command '{}' failed: {class}: {desc}",
                cmd.name()
            ))
        };
        let mut follow = Follow::Nothing;
        let mut stale = None;
        let result = match &cmd {
            QmpCommand::QueryStatus => HvResult::Qmp(json!({
                "status": p.status, "running": p.status == "running", "singlestep": false
            })),
            QmpCommand::Cont if p.status == "inmigrate" => {
                err("GenericError", "Migration is not finalized yet")
            }
            QmpCommand::Cont => {
                if p.nbd.is_some() && !p.disk_synced && p.status == "paused" {
                    stale = Some(format!(
                        "{vm}: resumed on copied disks that never concluded in sync"
                    ));
                }
                p.status = "running".into();
                HvResult::Qmp(json!({}))
            }
            QmpCommand::Stop => {
                p.status = "paused".into();
                HvResult::Qmp(json!({}))
            }
            QmpCommand::SystemReset => HvResult::Qmp(json!({})),
            QmpCommand::SystemPowerdown => {
                if !p.ignores_acpi {
                    self.exit(vm, "QEMU exited (exit status: 0)");
                }
                HvResult::Qmp(json!({}))
            }
            QmpCommand::Quit => {
                self.exit(vm, "QEMU exited (exit status: 0)");
                HvResult::Qmp(json!({}))
            }
            QmpCommand::QueryMigrate => HvResult::Qmp(match &p.migration {
                None => json!({}),
                Some(m) => {
                    let mut v = json!({
                        "status": m.status,
                        "ram": {"transferred": 0, "remaining": 0, "total": 0, "mbps": 0.0,
                                "dirty-sync-count": 1},
                        "expected-downtime": 0,
                    });
                    if m.status == "completed" {
                        v["downtime"] = json!(0);
                        v["total-time"] = json!(0);
                    }
                    if let Some(e) = &m.error {
                        v["error-desc"] = json!(e);
                    }
                    v
                }
            }),
            QmpCommand::Migrate { uri } => {
                if p.migration
                    .as_ref()
                    .is_some_and(|m| matches!(m.status.as_str(), "active" | "postcopy-active"))
                {
                    err("GenericError", "There's a migration process in progress")
                } else {
                    let listening = fabric.listening(uri);
                    let (status, error) = match (listening, auto) {
                        (false, _) => (
                            "failed",
                            Some(format!("Failed to connect to '{uri}': Connection refused")),
                        ),
                        (true, true) if p.pause_before_switchover => ("pre-switchover", None),
                        (true, true) => ("completed", None),
                        (true, false) => ("active", None),
                    };
                    if status == "completed" {
                        p.status = "postmigrate".into();
                        follow = Follow::Land(uri.clone());
                    }
                    if status == "pre-switchover" {
                        p.status = "finish-migrate".into();
                    }
                    p.migration = Some(FakeMigration {
                        uri: uri.clone(),
                        status: status.into(),
                        error,
                    });
                    HvResult::Qmp(json!({}))
                }
            }
            QmpCommand::MigrateCancel => {
                if let Some(m) = p.migration.as_mut() {
                    if m.status == "pre-switchover" {
                        // QEMU runs the guest again.
                        p.status = "running".into();
                    }
                    if matches!(m.status.as_str(), "active" | "pre-switchover") {
                        m.status = "cancelled".into();
                    }
                }
                HvResult::Qmp(json!({}))
            }
            QmpCommand::MigrateContinue => match p.migration.as_mut() {
                Some(m) if m.status == "pre-switchover" => {
                    m.status = "completed".into();
                    p.status = "postmigrate".into();
                    follow = Follow::Land(m.uri.clone());
                    HvResult::Qmp(json!({}))
                }
                _ => err("GenericError", "Migration not in pre-switchover state"),
            },
            QmpCommand::MigrateStartPostcopy => match p.migration.as_mut() {
                Some(m) if m.status == "active" => {
                    m.status = "postcopy-active".into();
                    HvResult::Qmp(json!({}))
                }
                _ => err(
                    "GenericError",
                    "Postcopy must be started after migration has been started",
                ),
            },
            QmpCommand::MigrateIncoming { uri } => {
                p.listening = Some(uri.clone());
                HvResult::Qmp(json!({}))
            }
            QmpCommand::HumanMonitor(_) => HvResult::Qmp(Value::String(String::new())),
            QmpCommand::QueryBlock => HvResult::Qmp(query_block(&p.plan.argv.args)),
            QmpCommand::QueryBlockJobs => {
                let jobs: Vec<Value> = p
                    .mirrors
                    .iter()
                    .map(|(id, m)| {
                        json!({"device": id, "type": "mirror", "status": m.status,
                               "ready": m.ready, "len": 100, "offset": if m.ready { 100 } else { 50 }})
                    })
                    .collect();
                // A mirror catches up by the next look.
                for m in p.mirrors.values_mut().filter(|m| m.status == "running") {
                    m.status = "ready".into();
                    m.ready = true;
                }
                HvResult::Qmp(Value::Array(jobs))
            }
            QmpCommand::NbdClientAdd {
                node, host, port, ..
            } => {
                let target = format!("{host}:{port}");
                if p.nbd_clients.contains_key(node) {
                    err("GenericError", "Duplicate nodes with node-name")
                } else if lock(&fabric.nbd).contains_key(&target) {
                    p.nbd_clients.insert(node.clone(), target);
                    HvResult::Qmp(json!({}))
                } else {
                    err(
                        "GenericError",
                        "Failed to connect to the NBD server: Connection refused",
                    )
                }
            }
            QmpCommand::BlockdevMirror { job, target, .. } => {
                match (p.mirrors.contains_key(job), p.nbd_clients.get(target)) {
                    (true, _) => err("GenericError", "Job ID already in use"),
                    (false, None) => err("GenericError", "Cannot find target node"),
                    (false, Some(t)) => {
                        let mirror = FakeMirror {
                            target: t.clone(),
                            status: "running".into(),
                            ready: false,
                        };
                        p.mirrors.insert(job.clone(), mirror);
                        HvResult::Qmp(json!({}))
                    }
                }
            }
            QmpCommand::BlockJobCancel { job, force } => {
                let stopped = p.status != "running";
                match p.mirrors.get_mut(job) {
                    Some(m) if m.status != "concluded" => {
                        if m.ready && !force && stopped {
                            follow = Follow::Synced(m.target.clone());
                        }
                        m.status = "concluded".into();
                        HvResult::Qmp(json!({}))
                    }
                    _ => err("DeviceNotActive", "Block job not found"),
                }
            }
            QmpCommand::JobDismiss { job } => match p.mirrors.get(job) {
                Some(m) if m.status == "concluded" => {
                    p.mirrors.remove(job);
                    HvResult::Qmp(json!({}))
                }
                _ => err("GenericError", "Job not found or not concluded"),
            },
            QmpCommand::BlockdevDel { node } => {
                if p.mirrors
                    .values()
                    .any(|m| p.nbd_clients.get(node) == Some(&m.target))
                {
                    err("GenericError", "Node is in use")
                } else if p.nbd_clients.remove(node).is_some() {
                    HvResult::Qmp(json!({}))
                } else {
                    err("GenericError", "Failed to find node")
                }
            }
            QmpCommand::NbdServerStart { .. }
            | QmpCommand::NbdExport { .. }
            | QmpCommand::NbdServerStop => HvResult::Qmp(json!({})),
            QmpCommand::MigrateSetCapabilities { capabilities } => {
                if let Some((_, on)) = capabilities
                    .iter()
                    .find(|(c, _)| *c == MigrationCapability::PauseBeforeSwitchover)
                {
                    p.pause_before_switchover = *on;
                }
                HvResult::Qmp(json!({}))
            }
            QmpCommand::MigrateSetParameters { .. }
            | QmpCommand::ClientMigrateInfo { .. }
            | QmpCommand::SetPassword { .. }
            | QmpCommand::ExpirePassword { .. }
            | QmpCommand::AnnounceSelf => HvResult::Qmp(json!({})),
        };
        self.stale_disks.extend(stale);
        (result, follow)
    }
}

/// `query-block` as QEMU answers it for the `-blockdev`s of `argv`: each
/// file with the format of the node above it, 1 GiB.
fn query_block(argv: &[String]) -> Value {
    let nodes: Vec<Value> = argv
        .windows(2)
        .filter(|w| w[0] == "-blockdev")
        .filter_map(|w| serde_json::from_str(&w[1]).ok())
        .collect();
    let rows: Vec<Value> = nodes
        .iter()
        .filter_map(|n| {
            let file = n.get("filename")?.as_str()?;
            let name = n.get("node-name")?.as_str()?;
            let format = nodes
                .iter()
                .find(|f| f.get("file").and_then(Value::as_str) == Some(name))
                .and_then(|f| f.get("driver").and_then(Value::as_str))
                .unwrap_or("raw");
            Some(
                json!({"device": "", "inserted": {"file": file, "node-name": name,
                "image": {"filename": file, "format": format, "virtual-size": 1u64 << 30}}}),
            )
        })
        .collect();
    Value::Array(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Request, Response};
    use crate::host_core::VmState;
    use flotilla_shared::proto::AgentEvent;
    use flotilla_shared::xml::Network;
    use futures_util::FutureExt as _;

    fn host(addr: &str, fabric: &FakeFabric) -> FakeQemu {
        let xml =
            "<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>";
        let fake = FakeQemu::new(InterfaceTable::new().with("br0", &[addr]));
        fake.set_networks(HostNetworks {
            dir: PathBuf::from("/sim/networks"),
            networks: vec![Network::parse("public.xml", xml).expect("valid").model],
            problems: Vec::new(),
        });
        fake.join(fabric);
        fake
    }

    fn agent(name: &str, fake: &mut FakeQemu, now: Instant) -> HostCore {
        let mut core = HostCore::new(
            sim_settings(name),
            fake.networks(),
            true,
            Box::new(|_| true),
        );
        assert_eq!(drive(&mut core, fake, now, HostInput::Boot), vec![]);
        core
    }

    fn xml(name: &str, n: u8) -> String {
        format!(
            "<domain type='kvm'><name>{name}</name>\
             <uuid>00000000-0000-4000-8000-0000000000{n:02}</uuid><memory unit='MiB'>64</memory>\
             <os><type>hvm</type></os><devices><graphics type='vnc' passwd='pw'>\
             <listen type='network' network='public'/></graphics></devices></domain>"
        )
    }

    /// Sends one request and returns its only reply.
    fn call(
        core: &mut HostCore,
        fake: &mut FakeQemu,
        now: Instant,
        id: u64,
        request: Request,
    ) -> Response {
        let out = drive(core, fake, now, HostInput::Request { id, request });
        let replies: Vec<Response> = out
            .into_iter()
            .filter_map(|e| match e {
                HostEffect::Reply { id: got, response } => {
                    assert_eq!(got, id);
                    Some(response)
                }
                _ => None,
            })
            .collect();
        assert_eq!(replies.len(), 1, "{replies:?}");
        replies.into_iter().next().expect("one reply")
    }

    fn list(core: &mut HostCore, fake: &mut FakeQemu, now: Instant) -> Vec<(String, String)> {
        match call(core, fake, now, 99, Request::List) {
            Response::Vms(vms) => vms
                .into_iter()
                .map(|v| (v.name, v.state.as_str().to_string()))
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    /// Start, migrate (incoming, out, finish), crash, and an agent restart,
    /// driven synchronously the way a fleet simulation drives it.
    #[test]
    fn a_simulation_drives_two_hosts_through_a_migration_a_crash_and_a_restart() {
        let now = Instant::now();
        let fabric = FakeFabric::new();
        let mut f1 = host("198.18.4.1", &fabric);
        let mut f2 = host("198.18.4.2", &fabric);
        let mut h1 = agent("h1", &mut f1, now);
        let mut h2 = agent("h2", &mut f2, now);
        let start = |name: &str, n| Request::Start {
            xml: xml(name, n),
            source: format!("{name}.xml"),
            incarnation: 0,
        };

        assert!(matches!(
            call(&mut h1, &mut f1, now, 1, start("web01", 1)),
            Response::Started { .. }
        ));
        assert!(matches!(
            call(&mut h2, &mut f2, now, 1, start("web02", 2)),
            Response::Started { .. }
        ));

        // Live migration of web01 from h1 to h2.
        let incoming = Request::MigrateIncoming {
            xml: xml("web01", 1),
            source: "web01.xml".into(),
            postcopy: false,
            storage_token: None,
            copy: None,
            allow_unsafe: false,
            incarnation: 0,
        };
        let Response::Incoming { uri, .. } = call(&mut h2, &mut f2, now, 2, incoming) else {
            panic!("no incoming");
        };
        let out = Request::MigrateOut {
            name: "web01".into(),
            uri,
            max_downtime_ms: None,
            bandwidth_mib_s: None,
            auto_converge: false,
            postcopy: false,
        };
        assert!(matches!(
            call(&mut h1, &mut f1, now, 2, out),
            Response::Done(_)
        ));
        let status = call(
            &mut h1,
            &mut f1,
            now,
            3,
            Request::MigrationStatus {
                name: "web01".into(),
            },
        );
        assert!(matches!(status, Response::Migration(p) if p.status == "completed"));
        assert_eq!(
            call(
                &mut h2,
                &mut f2,
                now,
                3,
                Request::MigrateFinish {
                    name: "web01".into(),
                    paused: false
                }
            ),
            Response::Done("Domain 'web01' resumed on host h2".into())
        );
        assert_eq!(
            list(&mut h1, &mut f1, now),
            [("web01".to_string(), "postmigrate".to_string())]
        );
        // The paused source is destroyed; the reply waits for QEMU's exit.
        let destroy = HostInput::Request {
            id: 4,
            request: Request::Destroy {
                name: "web01".into(),
            },
        };
        let out = drive(&mut h1, &mut f1, now, destroy);
        assert!(matches!(&out[..], [HostEffect::WakeAt(_)]), "{out:?}");
        let exits = f1.take_exits();
        let out = drive(&mut h1, &mut f1, now, exits[0].clone());
        assert_eq!(
            out[0],
            HostEffect::Reply {
                id: 4,
                response: Response::Done("Domain 'web01' destroyed".into())
            }
        );
        assert_eq!(f1.running(), Vec::<String>::new());

        // web02 crashes; the simulation delivers the exit when it likes.
        f2.crash("web02");
        let exits = f2.take_exits();
        let out = drive(&mut h2, &mut f2, now, exits[0].clone());
        assert_eq!(
            out,
            vec![HostEffect::Event(AgentEvent::VmStopped {
                seq: 0,
                name: "web02".into(),
                reason: "QEMU exited (signal: 6 (SIGABRT))".into()
            })]
        );

        // The agent on h2 restarts: a new core over the same fake host.
        drop(h2);
        let mut h2 = agent("h2", &mut f2, now);
        assert_eq!(h2.vm_state("web01"), Some(VmState::Running));
        assert_eq!(
            list(&mut h2, &mut f2, now),
            [("web01".to_string(), "running".to_string())]
        );
        let facts = h2.facts(2, 2048, &f2.interfaces());
        assert_eq!(facts.vms.len(), 1);
        // Its console port stays taken: web02 starts on the next one.
        let web01_ports = f2.record("web01").map(|r| r.ports).unwrap_or_default();
        let Response::Started { vm, .. } = call(&mut h2, &mut f2, now, 5, start("web02", 2)) else {
            panic!("web02 did not start again");
        };
        let port: u16 = vm.consoles[0]
            .uri
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        assert!(!web01_ports.contains(&port), "{port} reused");

        // The Hypervisor trait's futures are ready at once.
        let read = HvCall::ReadHost {
            paths: Vec::new(),
            markers: Vec::new(),
        };
        let result = Hypervisor::call(&f2, read).now_or_never();
        assert!(matches!(result, Some(HvResult::Host(_))));
    }
}
