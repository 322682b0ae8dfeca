//! `FleetCore`: every decision the coordinator makes, as a plain struct.
//!
//! Sans-IO, like quinn-proto's `Connection`: the shell ([`crate::fleet`], or
//! the deterministic simulation in `tests/tests/simulation.rs`) feeds it
//! [`Input`]s with an explicit `now` and carries out the [`Effect`]s it
//! returns, in order. It holds a synchronous [`Store`], so "record the
//! placement, then send the start" is ordered by construction: the record is
//! written before `handle` returns the effect that sends the start.
//!
//! ```text
//!  shell ──Input (register, report, operator request, agent reply, tick)──▶ FleetCore::handle(now, ·)
//!  shell ◀──Effect (call an agent, reply to an operator, event line, metric, wake me at T)──┘
//! ```
//!
//! Rules it owns, each checked after every step of the simulation:
//! - A placement is recorded before a start is sent; a VM the records place
//!   on one host is never started on another.
//! - A VM's [`VmLifecycle`] changes only through `transition`; while it is
//!   starting, stopping or migrating, that action owns it.
//! - Reports are ordered by the agent's sequence numbers, not by time: a
//!   report numbered below the reply to one of the coordinator's actions may
//!   predate that action, so it is not trusted for that VM ("fences").
//! - An agent request that got no answer may have happened: a start stays
//!   recorded on its host and the host's connection is closed, so its next
//!   registration (a fresh report) says what runs there.
//! - Reconciliation never starts a VM and never touches a running copy.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_shared::hardware;
use flotilla_shared::proto::{
    AgentRequest, AgentResponse, ConsoleInfo, CopyMode, CpuNeed, DiskImage, DomInfo, FenceReport,
    HelloAck, HostEntry, HostFacts, MachineTypes, MigrationOutcome, MigrationProgress, NetStatus,
    OperatorError, OperatorRequest, OperatorResponse, PlacementNote, StorageCopy, VmListEntry,
    VmRunState, VmSummary,
};
use flotilla_shared::xml::{tree, Domain, GraphicsProtocol, ListenKind, XmlFlavor};

use crate::events::{migration_progress_line, ProgressSampler};
use crate::fencing::FencePolicy;
use crate::host_index::HostIndex;
use crate::lifecycle::{HostState, VmLifecycle};
use crate::migration::{
    Command, Input as MigInput, Migration, MigrationParams, Phase, Report, StepFailure,
};
use crate::reconcile::{reconcile, Fix};
use crate::scheduler::{HostSnapshot, NetworkAddresses, Policy, VmNeeds};
use crate::store::{HostRow, NewDefinition, Store, StoreError, VmRow};
use crate::usage::{Footprint, Usage};

/// A connection from an agent, numbered by the shell.
pub type ConnId = u64;
/// An operator request, numbered by the shell.
pub type RequestId = u64;
/// A request to an agent, numbered by the core.
pub type CallId = u64;

/// How often a migration's source is sampled: completion is noticed at most
/// this late. One poll is a round trip and a `query-migrate`.
pub const MIGRATION_POLL: Duration = Duration::from_millis(10);
/// How long an agent may take to answer a request (a start, a migration
/// step); longer is a lost answer, and the host's connection is closed.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// The destination's liveness is checked every this many polls (200 ms).
const DEST_CHECK_EVERY: u32 = 20;

/// Coordinator settings.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// Heartbeat interval asked of agents.
    pub heartbeat: Duration,
    /// A host with no heartbeat for this long is `unreachable`.
    pub heartbeat_timeout: Duration,
    /// Scheduling policy.
    pub policy: Policy,
    /// Random at each start of the coordinator: with a counter, the storage
    /// tokens of migrations, unique across restarts.
    pub token_seed: u64,
    /// Leases and when a silent host counts as fenced.
    pub fencing: FencePolicy,
    /// The fencing epoch agents are told (0 with one coordinator; the etcd
    /// revision the leadership began at with several).
    pub epoch: u64,
}

/// Something that happened, for the core to decide on.
#[derive(Debug, Clone)]
pub enum Input {
    /// A host registered over connection `conn` (its facts are report 0).
    Register {
        /// The host, as its certificate names it.
        host: String,
        /// What it reported.
        facts: HostFacts,
        /// The connection.
        conn: ConnId,
    },
    /// A numbered report from a registered host.
    Report {
        /// The host.
        host: String,
        /// Over which connection.
        conn: ConnId,
        /// Its place in that connection's sequence.
        seq: u64,
        /// What it runs now.
        facts: HostFacts,
    },
    /// A host's QEMU exited.
    VmStopped {
        /// The host.
        host: String,
        /// Over which connection.
        conn: ConnId,
        /// Its place in that connection's sequence.
        seq: u64,
        /// The VM.
        name: String,
        /// Why.
        reason: String,
    },
    /// A host's connection ended.
    Disconnected {
        /// The host.
        host: String,
        /// Which connection (a newer one may already have replaced it).
        conn: ConnId,
    },
    /// An operator's request; exactly one [`Effect::Reply`] answers it.
    Operator {
        /// Its number.
        id: RequestId,
        /// The request.
        request: OperatorRequest,
    },
    /// An agent answered a call, or the call failed in transport.
    AgentReplied {
        /// The call.
        call: CallId,
        /// `Ok((seq, response))`, or why no answer came.
        result: Result<(u64, AgentResponse), String>,
    },
    /// Time passed: timeouts, polls, gauges.
    Tick,
    /// Where to reach a VM's VNC console now, for the web console, or its
    /// serial console, for `flotilla console`; exactly one
    /// [`Effect::ConsoleRoute`] answers it.
    ConsoleRoute {
        /// Its number, shared with operator requests.
        id: RequestId,
        /// The VM.
        name: String,
        /// The serial console, which needs no VNC display.
        serial: bool,
    },
}

/// Where a VM's VNC console is reached: through its host's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleTarget {
    /// The host that runs the VM now.
    pub host: String,
    /// That host's connection, to open the relay stream on.
    pub conn: ConnId,
    /// The console password from the definition, for the coordinator to
    /// answer QEMU's challenge with; it never goes to the browser.
    pub password: Option<String>,
}

/// Something for the shell to carry out.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Answer a registration.
    Hello {
        /// The connection that registered.
        conn: ConnId,
        /// The answer.
        ack: HelloAck,
    },
    /// Answer a heartbeat: acknowledged only when its report was applied,
    /// since the acknowledgement renews the host's lease.
    ReportAnswer {
        /// The connection it came over.
        conn: ConnId,
        /// Its number.
        seq: u64,
        /// Applied (else the host must register again).
        accepted: bool,
    },
    /// Send `request` to `host` over `conn`; feed the answer back as
    /// [`Input::AgentReplied`] with `call`.
    Call {
        /// Its number.
        call: CallId,
        /// The host.
        host: String,
        /// The connection to use.
        conn: ConnId,
        /// The request.
        request: AgentRequest,
        /// How long the answer may take; no answer by then is a lost one.
        timeout: Duration,
    },
    /// Close a connection whose answers can no longer be trusted to come;
    /// the host registers again with a fresh report.
    Close {
        /// The host.
        host: String,
        /// The connection.
        conn: ConnId,
    },
    /// The one answer to an operator request.
    Reply {
        /// The request.
        id: RequestId,
        /// The answer.
        response: OperatorResponse,
    },
    /// A migration progress sample for the operator who asked for it.
    Progress {
        /// The request.
        id: RequestId,
        /// The sample.
        progress: MigrationProgress,
    },
    /// A note line for a streaming request (drain).
    Note {
        /// The request.
        id: RequestId,
        /// The line.
        line: String,
    },
    /// A line for `flotilla events`.
    Event(String),
    /// A metric to record.
    Metric(Metric),
    /// Feed [`Input::Tick`] at this time.
    WakeAt(Instant),
    /// The answer to [`Input::ConsoleRoute`].
    ConsoleRoute {
        /// The request.
        id: RequestId,
        /// Where the console is, or why there is none.
        result: Result<ConsoleTarget, OperatorError>,
    },
    /// A migration completed: the VM runs on `to` now. Web consoles of the
    /// VM reconnect there.
    Moved {
        /// The VM.
        vm: String,
        /// Where it ran.
        from: String,
        /// Where it runs now.
        to: String,
    },
}

/// A metric the shell records.
#[derive(Debug, Clone, PartialEq)]
pub enum Metric {
    /// A start ended (`ok`, `error`, `no_placement`).
    Start(&'static str),
    /// A start's wall time, request to answer.
    StartSeconds(f64),
    /// How long one scheduling decision took (measured only by real shells).
    SchedulingSeconds(f64),
    /// A migration ended (`completed`, `aborted`, `failed`, `in-doubt`).
    Migration(&'static str),
    /// A silent host was declared fenced (`lease` when its lease lapsed,
    /// `operator` after `flotilla host-fenced`).
    HostFenced(&'static str),
    /// An HA VM runs again elsewhere: seconds from when its host was last
    /// heard until the restart was acknowledged.
    HaRestartSeconds(f64),
    /// The current counts: hosts by state, VMs by state, migrations in flight.
    Gauges {
        /// (state, count) for every host state.
        hosts: Vec<(&'static str, u64)>,
        /// (state, count) for every VM state.
        vms: Vec<(&'static str, u64)>,
        /// Migrations in flight.
        migrations: u64,
    },
}

struct HostLive {
    conn: Option<ConnId>,
    facts: HostFacts,
    /// `facts.networks` as the scheduler reads them, rebuilt only when they change.
    networks: Arc<NetworkAddresses>,
    /// Networks guest NICs cannot attach to, with why; rebuilt with `networks`.
    nic_blocked: Arc<BTreeMap<String, String>>,
    /// `facts.machine_types`, shared with every scheduling snapshot.
    machine_types: Arc<MachineTypes>,
    last_seen: Instant,
    /// The newest report's number on `conn`.
    seq: u64,
    /// Its entry in `FleetCore::index_expiry`, if any.
    expiry_indexed: Instant,
}

struct VmEntry {
    uuid: String,
    generation: u64,
    footprint: Footprint,
    life: VmLifecycle,
    /// The stored destination of a migration that may have moved it: until
    /// that host has been heard from, "not on the recorded host" is not
    /// "shut off".
    pending_dest: Option<String>,
    /// The scheduler's explanation of its last placement seen by this
    /// coordinator (not stored: it is news, not state).
    placement: Option<String>,
    /// High availability is on in its definition.
    ha: bool,
    /// See [`VmRow::incarnation`].
    incarnation: u64,
    /// Why this HA VM waits to run again, while it does.
    pending_restart: Option<String>,
    /// See [`VmRow::ha_running`].
    ha_running: bool,
    /// The guest CPU its definition asks of a host, read once per definition
    /// rather than on every placement.
    cpu: CpuNeed,
}

/// Who a start answers to.
#[derive(Debug)]
struct StartOwner {
    op: Option<RequestId>,
    restart: Option<(String, Instant)>,
}

#[derive(Debug)]
enum Ask {
    LiveXml {
        security_info: bool,
    },
    Display,
    Networks,
    /// A verb the agent answers with `Done`; the operator reads `message`.
    Done {
        message: String,
    },
    /// `suspend` (`paused`) or `resume`: as `Done`, and the host's view of
    /// the VM says so at once, so a migration asked for right after
    /// carries the operator's wish without waiting for a heartbeat.
    Pause {
        message: String,
        vm: String,
        paused: bool,
    },
    GuestInterfaces,
}

#[derive(Debug)]
enum Purpose {
    Start {
        /// The operator's request, or `None` for an HA restart.
        op: Option<RequestId>,
        vm: String,
        sent: Instant,
        explanation: String,
        /// An HA restart: why, and since when it was owed.
        restart: Option<(String, Instant)>,
    },
    Stop {
        op: RequestId,
        vm: String,
    },
    Ask {
        op: RequestId,
        ask: Ask,
    },
    /// Removing the stale half of an interrupted migration.
    Cleanup {
        vm: String,
    },
    /// Resuming the one remaining half of an interrupted migration.
    Resume {
        vm: String,
    },
    Migration {
        vm: String,
        step: MigStep,
    },
}

#[derive(Debug)]
enum MigStep {
    Command(Command),
    /// The source marks its storage for `PrepareDestination`; the destination
    /// is asked next, with the token.
    MarkStorage {
        token: String,
    },
    /// A SPICE client-migrate-info before `migrate`; then the next one, then `migrate`.
    ClientInfo,
    PollSource,
    PollDest,
}

struct PendingCall {
    host: String,
    conn: ConnId,
    purpose: Purpose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Operator(RequestId),
    Drain(RequestId),
    /// Taking over a switchover that a crashed coordinator left half done.
    Recovery,
}

struct MigrationJob {
    machine: Migration,
    owner: Owner,
    source: String,
    dest: String,
    xml: String,
    params: MigrationParams,
    dest_consoles: Vec<ConsoleInfo>,
    /// The source's writable disks, as it reported them when it marked them.
    disks: Vec<DiskImage>,
    /// Steps not yet carried out, in order.
    steps: VecDeque<Command>,
    /// A step's agent call is in flight; the next waits for its answer.
    step_in_flight: bool,
    /// SPICE clients still to tell before `migrate`, then the `migrate` itself.
    client_infos: VecDeque<(String, u16)>,
    start: Option<(String, MigrationParams)>,
    polls: u32,
    poll_in_flight: bool,
    next_poll: Instant,
    /// `migrate` was answered: polls before that could read the status of
    /// the previous migration of the same QEMU.
    streaming: bool,
    sampler: ProgressSampler,
}

impl MigrationJob {
    fn new(
        machine: Migration,
        owner: Owner,
        source: String,
        dest: String,
        xml: String,
        params: MigrationParams,
        now: Instant,
    ) -> MigrationJob {
        MigrationJob {
            machine,
            owner,
            source,
            dest,
            xml,
            params,
            dest_consoles: Vec::new(),
            disks: Vec::new(),
            steps: VecDeque::new(),
            step_in_flight: false,
            client_infos: VecDeque::new(),
            start: None,
            polls: 0,
            poll_in_flight: false,
            next_poll: now,
            streaming: false,
            sampler: ProgressSampler::default(),
        }
    }
}

struct DrainJob {
    host: String,
    queue: VecDeque<String>,
    parallel: usize,
    active: usize,
    moved: Vec<(String, String)>,
    failed: Vec<(String, String)>,
}

/// The coordinator's decisions.
pub struct FleetCore {
    store: Arc<dyn Store>,
    settings: FleetSettings,
    hosts: BTreeMap<String, HostLive>,
    host_rows: BTreeMap<String, HostRow>,
    vms: BTreeMap<String, VmEntry>,
    usage: Usage,
    calls: BTreeMap<CallId, PendingCall>,
    next_call: CallId,
    migrations: BTreeMap<String, MigrationJob>,
    /// Storage tokens handed out (see `FleetSettings::token_seed`).
    tokens: u64,
    /// `migrations.len()` as the gauges last published it.
    published_migrations: usize,
    drains: BTreeMap<RequestId, DrainJob>,
    /// Each host's state when last logged, to log transitions once.
    host_states: BTreeMap<String, HostState>,
    /// (host, VM) → the sequence number of the host's reply to the newest
    /// action on the VM there: reports numbered below it may predate it.
    fences: BTreeMap<(String, String), u64>,
    /// Repairs in flight per VM (removing a stale half, resuming the last
    /// one): the VM is owned until each is answered, as by any other action.
    repairs: BTreeMap<String, u32>,
    /// Measures scheduling time for the metric; the simulation has no clock.
    stopwatch: fn() -> Option<Instant>,
    effects: Vec<Effect>,
    /// The first `now` this core saw: every host's lease is counted from no
    /// earlier than this, so a restarted coordinator fences nobody before a
    /// full lease has passed under its own eyes.
    armed_at: Option<Instant>,
    /// Hosts declared fenced, with when they were last heard: their HA VMs
    /// restart elsewhere. Cleared when the host is heard from again.
    fenced_hosts: BTreeMap<String, Instant>,
    /// Hosts already reported as cut off without a working fence.
    unfenceable: BTreeSet<String>,
    /// What the scheduler chooses among, brought up to date before each
    /// decision from the hosts marked here and in `usage`.
    index: HostIndex,
    /// Hosts whose snapshot may have changed since the index last saw them.
    index_stale: BTreeSet<String>,
    /// (when its heartbeat timeout expires, host) for each host the index
    /// holds as connected: it goes unreachable without any input arriving.
    index_expiry: BTreeSet<(Instant, String)>,
    /// VMs marked autostart and shut off when this coordinator started:
    /// started once, when the fleet is up (`autostart_fleet`).
    autostart: BTreeSet<String>,
}

/// `pc-i440fx-9.2` → (`pc-i440fx-`, [9, 2]), so 10.0 sorts after 9.2.
fn machine_version(name: &str) -> (&str, Vec<u64>) {
    let split = name
        .rfind(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or(0, |i| i + 1);
    let (prefix, version) = name.split_at(split);
    let parts = version.split('.').filter_map(|p| p.parse().ok()).collect();
    (prefix, parts)
}

/// The networks of a host's report that guest NICs cannot attach to.
fn nic_blocked(networks: &[NetStatus]) -> BTreeMap<String, String> {
    networks
        .iter()
        .filter_map(|n| n.attach_error.clone().map(|e| (n.name.clone(), e)))
        .collect()
}

/// The scheduler's view of a host's reported networks.
fn network_addresses(networks: &[NetStatus]) -> NetworkAddresses {
    networks
        .iter()
        .map(|n| {
            let v = match (&n.address, &n.error) {
                (Some(a), _) => Ok(a.clone()),
                (None, Some(e)) => Err(e.clone()),
                (None, None) => Err("no address".to_string()),
            };
            (n.name.clone(), v)
        })
        .collect()
}

/// What a stored definition holds on its host; an unreadable one holds nothing.
/// `xml` with high availability `on`, rewritten only when it differs.
fn xml_with_ha(xml: String, on: bool) -> String {
    match Domain::parse("the definition", &xml) {
        Ok(mut d) if d.model.ha() != on => {
            d.model.set_ha(on);
            d.model.to_xml(XmlFlavor::Inactive)
        }
        _ => xml,
    }
}

/// The guest CPU a stored definition asks of its host.
fn row_cpu_need(row: &VmRow) -> CpuNeed {
    Domain::parse(&row.name, &row.xml).map_or_else(|_| CpuNeed::default(), |d| cpu_need(&d.model))
}

/// The guest CPU a definition asks of its host (nothing, for a definition
/// stored before define checked its hardware and that no longer plans).
fn cpu_need(domain: &Domain) -> CpuNeed {
    let Ok(hw) = hardware::plan(domain) else {
        return CpuNeed::default();
    };
    let mode = domain
        .cpu
        .as_ref()
        .and_then(|c| c.mode.clone())
        .unwrap_or_else(|| "custom".into());
    CpuNeed {
        kvm: hw.cpu.needs_kvm(),
        mode,
        model: hw.cpu.model().map(str::to_string),
    }
}

pub(crate) fn is_ha(row: &VmRow) -> bool {
    Domain::parse(&row.name, &row.xml).is_ok_and(|d| d.model.ha())
}

pub(crate) fn footprint(row: &VmRow) -> Footprint {
    Domain::parse(&row.name, &row.xml).map_or_else(
        |_| Footprint::default(),
        |d| Footprint {
            memory_mib: d.model.memory.mib(),
            vcpus: d.model.vcpus(),
        },
    )
}

/// A definition as `dumpxml` shows it without `--security-info`: no
/// console passwords. XML that does not parse is not shown at all, rather
/// than shown with its secrets.
pub(crate) fn shown_xml(xml: &str, flavor: XmlFlavor) -> OperatorResponse {
    match Domain::parse("the definition", xml) {
        Ok(mut d) => {
            d.model.hide_secrets();
            OperatorResponse::Xml(d.model.to_xml(flavor))
        }
        Err(e) => OperatorResponse::Error(OperatorError::StoredDefinitionUnreadable(e.to_string())),
    }
}

pub(crate) fn not_found(name: &str) -> OperatorError {
    OperatorError::NoSuchDomain {
        name: name.to_string(),
    }
}

fn not_running(name: &str) -> OperatorError {
    OperatorError::NotRunning {
        name: name.to_string(),
    }
}

/// `spice://ADDR:PORT` → (ADDR, PORT); other consoles need no relocation.
fn spice_target(uri: &str) -> Option<(String, u16)> {
    let rest = uri.strip_prefix("spice://")?;
    let (host, port) = rest.rsplit_once(':')?;
    Some((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port.parse().ok()?,
    ))
}

fn real_stopwatch() -> Option<Instant> {
    Some(Instant::now())
}

impl FleetCore {
    /// A core over `store`, its in-memory mirrors loaded from it.
    ///
    /// A store that cannot be read refuses the start: empty mirrors would
    /// overcommit hosts and write a drained host back as undrained. Every VM
    /// the records place on a host starts as `Running` there; the host's next
    /// registration confirms or corrects it.
    pub fn new(store: Arc<dyn Store>, settings: FleetSettings) -> Result<Self, StoreError> {
        let mut usage = Usage::default();
        let mut vms = BTreeMap::new();
        let mut autostart = BTreeSet::new();
        for row in store.list()? {
            let cpu = row_cpu_need(&row);
            if row.placement.is_none()
                && Domain::parse(&row.name, &row.xml).is_ok_and(|d| d.model.autostart())
            {
                autostart.insert(row.name.clone());
            }
            let fp = footprint(&row);
            let ha = is_ha(&row);
            // Fenced away and not yet running again: still owed a restart.
            let pending_restart = (ha && row.want_running && row.placement.is_none())
                .then(|| "waiting to restart after its host was fenced".to_string());
            let life = match &row.placement {
                Some(h) => {
                    usage.set(&row.name, Some((h, fp)));
                    VmLifecycle::Running { host: h.clone() }
                }
                None => VmLifecycle::ShutOff,
            };
            vms.insert(
                row.name.clone(),
                VmEntry {
                    uuid: row.uuid,
                    generation: row.generation,
                    footprint: fp,
                    life,
                    pending_dest: row.migrating_to,
                    placement: None,
                    ha,
                    incarnation: row.incarnation,
                    pending_restart,
                    ha_running: row.ha_running,
                    cpu,
                },
            );
        }
        let host_rows: BTreeMap<String, HostRow> = store
            .hosts()?
            .into_iter()
            .map(|h| (h.name.clone(), h))
            .collect();
        let index_stale = host_rows.keys().cloned().collect();
        let index = HostIndex::new(settings.policy.clone());
        Ok(FleetCore {
            store,
            settings,
            hosts: BTreeMap::new(),
            host_rows,
            vms,
            usage,
            calls: BTreeMap::new(),
            next_call: 1,
            migrations: BTreeMap::new(),
            tokens: 0,
            published_migrations: 0,
            drains: BTreeMap::new(),
            host_states: BTreeMap::new(),
            fences: BTreeMap::new(),
            repairs: BTreeMap::new(),
            stopwatch: real_stopwatch,
            effects: Vec::new(),
            armed_at: None,
            fenced_hosts: BTreeMap::new(),
            unfenceable: BTreeSet::new(),
            index,
            index_stale,
            index_expiry: BTreeSet::new(),
            autostart,
        })
    }

    /// Turns off scheduling-time measurement (the simulation has no clock).
    pub fn without_stopwatch(mut self) -> Self {
        self.stopwatch = || None;
        self
    }

    /// Feeds one input at `now`; returns what to carry out, in order.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        self.armed_at.get_or_insert(now);
        match input {
            Input::Register { host, facts, conn } => self.register(now, host, facts, conn),
            Input::Report {
                host,
                conn,
                seq,
                facts,
            } => {
                let accepted = self.report(now, &host, conn, seq, facts);
                self.effects.push(Effect::ReportAnswer {
                    conn,
                    seq,
                    accepted,
                });
            }
            Input::VmStopped {
                host,
                conn,
                seq,
                name,
                reason,
            } => self.vm_stopped(&host, conn, seq, &name, &reason),
            Input::Disconnected { host, conn } => {
                if let Some(h) = self.hosts.get_mut(&host) {
                    if h.conn == Some(conn) {
                        tracing::warn!(host = %host, "host disconnected; its VMs are not moved (no fencing)");
                        h.conn = None;
                    }
                }
                self.touch(&host);
                self.log_host_transition(&host, now);
            }
            Input::Operator { id, request } => {
                self.operator(now, id, request);
                self.publish_migration_change(now);
            }
            Input::AgentReplied { call, result } => {
                self.replied(now, call, result);
                self.publish_migration_change(now);
            }
            Input::Tick => self.tick(now),
            Input::ConsoleRoute { id, name, serial } => {
                let result = self.console_route(&name, serial, now);
                self.effects.push(Effect::ConsoleRoute { id, result });
            }
        }
        std::mem::take(&mut self.effects)
    }

    // ------------------------------------------------------------ queries

    /// The lifecycle of every VM, for checkers.
    pub fn lifecycles(&self) -> impl Iterator<Item = (&str, &VmLifecycle)> {
        self.vms.iter().map(|(n, v)| (n.as_str(), &v.life))
    }

    /// For checkers: refreshes the scheduler's index and compares it with
    /// snapshots of every host taken from scratch; the first difference.
    pub fn index_differs(&mut self, now: Instant) -> Option<String> {
        self.refresh_index(now);
        if self.index.len() != self.host_rows.len() {
            return Some(format!(
                "the index holds {} hosts, the records {}",
                self.index.len(),
                self.host_rows.len()
            ));
        }
        self.host_rows.values().find_map(|row| {
            let want = self.snapshot_of(row, now);
            (self.index.get(&row.name) != Some(&want)).then(|| {
                format!(
                    "the index holds {:?} for {}, the records say {want:?}",
                    self.index.get(&row.name),
                    row.name
                )
            })
        })
    }

    /// Calls sent and not yet answered.
    pub fn calls_in_flight(&self) -> usize {
        self.calls.len()
    }

    fn connected(&self, h: &HostLive, now: Instant) -> bool {
        h.conn.is_some()
            && now.saturating_duration_since(h.last_seen) <= self.settings.heartbeat_timeout
    }

    fn host_state(&self, name: &str, draining: bool, now: Instant) -> HostState {
        match self.hosts.get(name) {
            Some(h) if self.connected(h, now) && draining => HostState::Draining,
            Some(h) if self.connected(h, now) => HostState::Connected,
            _ => HostState::Unreachable,
        }
    }

    fn runs_on(&self, host: &str, vm: &str, now: Instant) -> bool {
        self.hosts
            .get(host)
            .is_some_and(|h| self.connected(h, now) && h.facts.vms.iter().any(|v| v.name == vm))
    }

    /// The host reports a copy whose vCPUs may run (not a paused migration half).
    fn runs_guest(&self, host: &str, vm: &str, now: Instant) -> bool {
        self.hosts.get(host).is_some_and(|h| {
            self.connected(h, now)
                && h.facts
                    .vms
                    .iter()
                    .any(|v| v.name == vm && (v.suspended || !v.state.is_migration_half()))
        })
    }

    /// What `list` shows: running only when its host reports it, paused
    /// when the operator suspended it.
    fn vm_state_word(
        &self,
        name: &str,
        life: &VmLifecycle,
        now: Instant,
    ) -> (&'static str, Option<String>) {
        let suspended = |h: &str| {
            self.hosts
                .get(h)
                .is_some_and(|l| l.facts.vms.iter().any(|v| v.name == name && v.suspended))
        };
        match life.host() {
            Some(h) if self.runs_on(h, name, now) && suspended(h) => {
                ("paused", Some(h.to_string()))
            }
            Some(h) if self.runs_on(h, name, now) => ("running", Some(h.to_string())),
            Some(h) if !self.hosts.get(h).is_some_and(|s| self.connected(s, now)) => {
                ("unknown", Some(h.to_string()))
            }
            _ => ("shut off", None),
        }
    }

    /// The host and connection that reach `name`'s VNC console, and its
    /// password. A migrating VM's console is still on its source.
    fn console_route(
        &self,
        name: &str,
        serial: bool,
        now: Instant,
    ) -> Result<ConsoleTarget, OperatorError> {
        let vm = self.vms.get(name).ok_or_else(|| not_found(name))?;
        let host = match &vm.life {
            VmLifecycle::Running { host } => host.clone(),
            VmLifecycle::Migrating { source, .. } => source.clone(),
            _ => {
                return Err(OperatorError::NotRunning {
                    name: name.to_string(),
                })
            }
        };
        let conn = self.conn_of(&host, now)?;
        if serial {
            // Whether it has a serial port on a pty is its host's to say.
            return Ok(ConsoleTarget {
                host,
                conn,
                password: None,
            });
        }
        let row = self
            .store
            .get(name)
            .map_err(|e| OperatorError::Store(e.to_string()))?
            .ok_or_else(|| not_found(name))?;
        let doc = Domain::parse(name, &row.xml)
            .map_err(|e| OperatorError::StoredDefinitionUnreadable(e.to_string()))?;
        let vnc = doc
            .model
            .graphics()
            .find(|g| g.protocol == GraphicsProtocol::Vnc)
            .ok_or_else(|| OperatorError::NoVncConsole {
                name: name.to_string(),
            })?;
        Ok(ConsoleTarget {
            host,
            conn,
            password: vnc.passwd.clone(),
        })
    }

    fn conn_of(&self, host: &str, now: Instant) -> Result<ConnId, OperatorError> {
        let unreachable = || OperatorError::HostUnreachable {
            host: host.to_string(),
        };
        match self.hosts.get(host) {
            Some(h) if self.connected(h, now) => h.conn.ok_or_else(unreachable),
            Some(_) => Err(unreachable()),
            None => Err(OperatorError::UnknownHost {
                host: host.to_string(),
            }),
        }
    }

    fn snapshot_of(&self, row: &HostRow, now: Instant) -> HostSnapshot {
        let used = self.usage.used(&row.name);
        let live = self.hosts.get(&row.name);
        HostSnapshot {
            connected: live.is_some_and(|h| self.connected(h, now)),
            draining: row.draining,
            cpus: live.map_or(row.cpus, |h| h.facts.cpus),
            memory_mib: live.map_or(row.memory_mib, |h| h.facts.memory_mib),
            used_memory_mib: used.memory_mib,
            used_vcpus: used.vcpus,
            networks: live.map(|h| h.networks.clone()).unwrap_or_default(),
            nic_blocked: live.map(|h| h.nic_blocked.clone()).unwrap_or_default(),
            machine_types: live.map(|h| h.machine_types.clone()).unwrap_or_default(),
            name: row.name.clone(),
        }
    }

    /// Marks `host`'s snapshot as possibly changed (its connection, facts,
    /// drain flag); placements mark theirs in `usage`.
    fn touch(&mut self, host: &str) {
        self.index_stale.insert(host.to_string());
    }

    /// Brings the scheduler's index up to `now`: O(hosts changed), not
    /// O(hosts). `the_index_follows_every_host_change` checks it against
    /// snapshots taken from scratch.
    fn refresh_index(&mut self, now: Instant) {
        let mut stale = std::mem::take(&mut self.index_stale);
        stale.extend(self.usage.take_changed());
        while let Some((at, host)) = self.index_expiry.first().cloned() {
            if at >= now {
                break;
            }
            self.index_expiry.pop_first();
            stale.insert(host);
        }
        for host in stale {
            let Some(row) = self.host_rows.get(&host) else {
                self.index.remove(&host);
                continue;
            };
            let snapshot = self.snapshot_of(row, now);
            if let Some(old) = self.index.get(&host) {
                if old.connected {
                    if let Some(h) = self.hosts.get(&host) {
                        self.index_expiry.remove(&(h.expiry_indexed, host.clone()));
                    }
                }
            }
            if snapshot.connected {
                if let Some(h) = self.hosts.get_mut(&host) {
                    h.expiry_indexed = h.last_seen + self.settings.heartbeat_timeout;
                    self.index_expiry.insert((h.expiry_indexed, host.clone()));
                }
            }
            self.index.upsert(snapshot);
        }
    }

    // ------------------------------------------------------------ effects

    fn emit(&mut self, line: String) {
        self.effects.push(Effect::Event(line));
    }

    fn note_placement(&mut self, vm: &str, explanation: String) {
        if let Some(v) = self.vms.get_mut(vm) {
            v.placement = Some(explanation);
        }
    }

    /// Answers the operator who asked, if one did (an HA restart has none).
    fn reply_to(&mut self, id: Option<RequestId>, response: OperatorResponse) {
        if let Some(id) = id {
            self.reply(id, response);
        }
    }

    fn reply(&mut self, id: RequestId, response: OperatorResponse) {
        self.effects.push(Effect::Reply { id, response });
    }

    fn call(&mut self, host: &str, conn: ConnId, request: AgentRequest, purpose: Purpose) {
        if let Purpose::Cleanup { vm } | Purpose::Resume { vm } = &purpose {
            *self.repairs.entry(vm.clone()).or_default() += 1;
        }
        let call = self.next_call;
        self.next_call += 1;
        self.calls.insert(
            call,
            PendingCall {
                host: host.to_string(),
                conn,
                purpose,
            },
        );
        let timeout = match &request {
            // The agent answers a shutdown once the guest is down or the
            // shutdown escalated, so the answer may take that long.
            AgentRequest::Shutdown { timeout_secs, .. } => {
                Duration::from_secs((*timeout_secs).min(86_400)) + CALL_TIMEOUT
            }
            _ => CALL_TIMEOUT,
        };
        self.effects.push(Effect::Call {
            call,
            host: host.to_string(),
            conn,
            request,
            timeout,
        });
    }

    /// Moves a VM's lifecycle; a refused move is a bug in this module, logged
    /// and left undone rather than corrupting the state.
    fn set_life(&mut self, name: &str, to: VmLifecycle) -> bool {
        let Some(vm) = self.vms.get_mut(name) else {
            return false;
        };
        match vm.life.transition(to) {
            Ok(next) => {
                // Placed again (started, found running): no restart is owed.
                if next != VmLifecycle::ShutOff {
                    vm.pending_restart = None;
                }
                vm.life = next;
                true
            }
            Err(e) => {
                tracing::error!(vm = %name, error = %e, "refused lifecycle move");
                false
            }
        }
    }

    /// Records a placement (or none) in the store and mirrors it in `usage`.
    fn record_placement(&mut self, name: &str, host: Option<&str>) -> Result<(), StoreError> {
        // A new placement runs the definition as it is now; a move keeps
        // what the running copy enforces.
        let starting = self
            .vms
            .get(name)
            .is_some_and(|v| v.life == VmLifecycle::ShutOff && host.is_some());
        let ha_running = match self.vms.get(name) {
            Some(v) if starting => v.ha,
            Some(v) => v.ha_running && host.is_some(),
            None => false,
        };
        self.store.update_row(name, &mut |row| {
            row.placement = host.map(str::to_string);
            row.want_running = host.is_some();
            row.ha_running = ha_running;
        })?;
        if let Some(v) = self.vms.get_mut(name) {
            v.ha_running = ha_running;
        }
        let fp = self.vms.get(name).map(|v| v.footprint).unwrap_or_default();
        self.usage.set(name, host.map(|h| (h, fp)));
        Ok(())
    }

    fn fence(&mut self, host: &str, conn: ConnId, vm: &str, seq: u64) {
        if self.hosts.get(host).is_some_and(|h| h.conn == Some(conn)) {
            let f = self
                .fences
                .entry((host.to_string(), vm.to_string()))
                .or_default();
            *f = (*f).max(seq);
        }
    }

    fn fenced(&self, host: &str, vm: &str, seq: u64) -> bool {
        self.fences
            .get(&(host.to_string(), vm.to_string()))
            .is_some_and(|f| *f > seq)
    }

    fn set_reported(&mut self, host: &str, vm: Option<VmSummary>, name: &str) {
        if let Some(h) = self.hosts.get_mut(host) {
            h.facts.vms.retain(|v| v.name != name);
            h.facts.vms.extend(vm);
        }
    }

    // ------------------------------------------------------------ hosts

    fn register(&mut self, now: Instant, host: String, mut facts: HostFacts, conn: ConnId) {
        let stored = self.host_rows.get(&host);
        let row = HostRow {
            name: host.clone(),
            cpus: facts.cpus,
            memory_mib: facts.memory_mib,
            draining: stored.is_some_and(|h| h.draining),
            fence: facts.fence.clone(),
        };
        if stored != Some(&row) {
            if let Err(e) = self.store.put_host(&row, false) {
                self.effects.push(Effect::Hello {
                    conn,
                    ack: HelloAck::Refused(e.to_string()),
                });
                return;
            }
            self.host_rows.insert(host.clone(), row);
        }
        // Copies older than the VM's incarnation were fenced away and run
        // elsewhere now: the agent kills them before serving anything, and
        // they never count as running here.
        let stale: Vec<String> = facts
            .vms
            .iter()
            .filter(|v| v.state != VmRunState::Prelaunch)
            .filter(|v| {
                self.vms
                    .get(&v.name)
                    .is_some_and(|e| v.incarnation < e.incarnation)
            })
            .map(|v| v.name.clone())
            .collect();
        for name in &stale {
            tracing::warn!(vm = %name, host = %host, "a fenced host still reports a stale copy; it kills it");
            self.emit(format!(
                "vm {name} on returning host {host} is a stale copy (restarted elsewhere); killed there"
            ));
        }
        facts.vms.retain(|v| !stale.contains(&v.name));
        if self.fenced_hosts.remove(&host).is_some() || self.unfenceable.remove(&host) {
            self.emit(format!("host {host} is back"));
        }
        tracing::info!(host = %host, vms = facts.vms.len(), networks = facts.networks.len(), "host registered");
        // A new connection starts a new sequence: the old one's fences mean nothing.
        self.fences.retain(|(h, _), _| h != &host);
        self.hosts.insert(
            host.clone(),
            HostLive {
                conn: Some(conn),
                networks: Arc::new(network_addresses(&facts.networks)),
                nic_blocked: Arc::new(nic_blocked(&facts.networks)),
                machine_types: Arc::new(facts.machine_types.clone()),
                facts,
                last_seen: now,
                seq: 0,
                expiry_indexed: now,
            },
        );
        self.touch(&host);
        self.converge(now, &host, 0);
        self.sync_ha_running(&host);
        self.log_host_transition(&host, now);
        self.effects.push(Effect::Hello {
            conn,
            ack: HelloAck::Accepted {
                heartbeat_secs: self.settings.heartbeat.as_secs().max(1),
                lease_ms: self.settings.fencing.lease.as_millis() as u64,
                stale,
                epoch: self.settings.epoch,
            },
        });
    }

    /// Applies a heartbeat's report; false when it is not this host's
    /// current connection's newest (then it must not be acknowledged: the
    /// host would renew a lease the coordinator does not count).
    fn report(
        &mut self,
        now: Instant,
        host: &str,
        conn: ConnId,
        seq: u64,
        facts: HostFacts,
    ) -> bool {
        let fenced: Vec<String> = {
            let Some(h) = self.hosts.get(host) else {
                return false;
            };
            if h.conn != Some(conn) || seq <= h.seq {
                // Another connection's, or older than one already applied.
                return false;
            }
            h.facts
                .vms
                .iter()
                .chain(facts.vms.iter())
                .map(|v| v.name.clone())
                .filter(|vm| self.fenced(host, vm, seq))
                .collect()
        };
        // A copy older than the VM's incarnation (a paused half left from
        // before its host was fenced, say) is not the VM: it goes.
        let stale: Vec<String> = facts
            .vms
            .iter()
            .filter(|v| v.state != VmRunState::Prelaunch && !fenced.contains(&v.name))
            .filter(|v| {
                self.vms
                    .get(&v.name)
                    .is_some_and(|e| v.incarnation < e.incarnation)
            })
            .map(|v| v.name.clone())
            .filter(|vm| !self.repairs.contains_key(vm))
            .collect();
        for vm in stale {
            self.emit(format!(
                "vm {vm} on {host} is a copy older than its incarnation; removing it"
            ));
            self.remove_half(host, conn, &vm, "a stale copy (older incarnation)");
        }
        let Some(h) = self.hosts.get_mut(host) else {
            return false;
        };
        // For a VM the coordinator acted on after this report was numbered,
        // what it already knows wins over what the report says. A copy
        // older than the VM's incarnation is not the VM: it is being killed.
        let vms_now = &self.vms;
        let mut vms: Vec<VmSummary> = facts
            .vms
            .into_iter()
            .filter(|v| !fenced.contains(&v.name))
            .filter(|v| {
                v.state == VmRunState::Prelaunch
                    || vms_now
                        .get(&v.name)
                        .is_none_or(|e| v.incarnation >= e.incarnation)
            })
            .collect();
        vms.extend(
            h.facts
                .vms
                .iter()
                .filter(|v| fenced.contains(&v.name))
                .cloned(),
        );
        if h.facts.networks != facts.networks {
            h.networks = Arc::new(network_addresses(&facts.networks));
            h.nic_blocked = Arc::new(nic_blocked(&facts.networks));
        }
        if h.facts.machine_types != facts.machine_types {
            h.machine_types = Arc::new(facts.machine_types.clone());
        }
        h.facts = HostFacts { vms, ..facts };
        h.last_seen = now;
        h.seq = seq;
        self.index_stale.insert(host.to_string());
        // Heard again (a hung agent resumed, a partition healed without
        // the connection dying): VMs that come here from now on are not
        // fenced away, and its own copies of fenced VMs, older than their
        // incarnation, were left out of this report above.
        if self.fenced_hosts.remove(host).is_some() || self.unfenceable.remove(host) {
            self.emit(format!("host {host} is back"));
        }
        self.converge(now, host, seq);
        self.sync_ha_running(host);
        true
    }

    fn vm_stopped(&mut self, host: &str, conn: ConnId, seq: u64, name: &str, reason: &str) {
        let current = self.hosts.get(host).is_some_and(|h| h.conn == Some(conn));
        if !current || self.fenced(host, name, seq) {
            return;
        }
        tracing::info!(vm = %name, host, reason, "VM stopped");
        self.emit(format!("vm {name} stopped on {host}: {reason}"));
        self.set_reported(host, None, name);
        let here = matches!(self.vms.get(name), Some(v) if v.life == VmLifecycle::Running { host: host.to_string() });
        if here {
            self.record_stopped(name, host, reason);
        }
    }

    /// Records a VM that stopped on its own (no operator verb owns it) as
    /// shut off; an HA VM that did not exit cleanly (the guest powering
    /// off, QEMU quitting) is owed a restart, as oVirt restarts HA VMs that
    /// crash or are killed.
    fn record_stopped(&mut self, name: &str, host: &str, reason: &str) {
        let ha = self.vms.get(name).is_some_and(|v| v.ha_running);
        if self.record_placement(name, None).is_err() {
            return;
        }
        self.set_life(name, VmLifecycle::ShutOff);
        if ha && !reason.contains("exit status: 0") {
            let why = format!("its QEMU stopped on {host}: {reason}");
            if self
                .store
                .update_row(name, &mut |r| r.want_running = true)
                .is_ok()
            {
                self.emit(format!("vm {name} is HA and {why}; restarting it"));
                if let Some(v) = self.vms.get_mut(name) {
                    v.pending_restart = Some(why);
                }
            }
        }
    }

    /// Converges the records with `host`'s report number `seq`.
    fn converge(&mut self, now: Instant, host: &str, seq: u64) {
        let Some(h) = self.hosts.get(host) else {
            return;
        };
        let reported: BTreeMap<String, VmRunState> = h
            .facts
            .vms
            .iter()
            .map(|v| (v.name.clone(), v.state))
            .collect();
        // Only the VMs this report can concern, and not those an action owns
        // or that the coordinator acted on after the report was numbered.
        let mut names: Vec<String> = self.usage.vms_on(host).map(str::to_string).collect();
        names.extend(reported.keys().cloned());
        names.sort();
        names.dedup();
        let rows: Vec<VmRow> = names
            .iter()
            .filter(|n| !self.fenced(host, n, seq))
            .filter_map(|n| {
                let v = self.vms.get(n)?;
                Some(VmRow {
                    name: n.clone(),
                    uuid: v.uuid.clone(),
                    xml: String::new(),
                    generation: v.generation,
                    want_running: v.life.host().is_some(),
                    placement: v.life.host().map(str::to_string),
                    migrating_to: v.pending_dest.clone(),
                    incarnation: v.incarnation,
                    ha_running: v.ha_running,
                })
            })
            .collect();
        let reported: BTreeMap<String, VmRunState> = reported
            .into_iter()
            .filter(|(n, _)| !self.fenced(host, n, seq))
            .collect();
        let fixes = reconcile(host, &reported, &rows, &|other, vm| {
            other != host && self.runs_guest(other, vm, now)
        });
        for fix in fixes {
            let name = match &fix {
                Fix::Place { name }
                | Fix::Stopped { name }
                | Fix::Conflict { name, .. }
                | Fix::DestroyStale { name, .. }
                | Fix::Unmanaged { name } => name.clone(),
            };
            let owned = self.repairs.contains_key(&name)
                || self
                    .vms
                    .get(&name)
                    .is_some_and(|v| v.life.is_transitional());
            match fix {
                Fix::Unmanaged { .. } => {
                    tracing::warn!(vm = %name, host, "host runs a VM with no definition")
                }
                _ if owned => {}
                Fix::Place { .. } => {
                    tracing::info!(vm = %name, host, "reconcile: VM runs here; recording placement");
                    if self.record_placement(&name, Some(host)).is_ok() {
                        self.set_life(
                            &name,
                            VmLifecycle::Running {
                                host: host.to_string(),
                            },
                        );
                    }
                }
                Fix::Stopped { .. } if self.may_run_elsewhere(now, &name, host) => {
                    match self.destination_holds(now, &name) {
                        None => tracing::info!(vm = %name, host,
                            "reconcile: VM gone here; waiting for its migration's destination to report"),
                        Some(dest) => {
                            // The destination holds the whole guest: the VM is there.
                            tracing::info!(vm = %name, host, dest = %dest,
                                "reconcile: VM gone here; its migration's destination holds it");
                            if self.record_placement(&name, Some(&dest)).is_ok() {
                                self.set_life(&name, VmLifecycle::Running { host: dest });
                            }
                        }
                    }
                }
                Fix::Stopped { .. } => {
                    tracing::info!(vm = %name, host, "reconcile: VM no longer runs; recording shut off");
                    self.record_stopped(&name, host, "it is gone (killed while unobserved)");
                }
                Fix::DestroyStale { state, .. } => {
                    if let Some(conn) = self.hosts.get(host).and_then(|h| h.conn) {
                        let what = format!("the stale {state} half of an interrupted migration");
                        self.remove_half(host, conn, &name, &what);
                    }
                }
                Fix::Conflict { recorded, .. } => {
                    tracing::error!(vm = %name, host, recorded = %recorded,
                        "VM reported running on two hosts; not touching either copy")
                }
            }
        }
        for name in names {
            if !self.fenced(host, &name, seq) {
                self.recover_switchover(now, &name);
                self.settle_migration_record(now, &name);
            }
        }
    }

    /// A migration the records say may have moved `vm` names a host other
    /// than `host` that has not yet shown it does not run it.
    fn may_run_elsewhere(&self, now: Instant, vm: &str, host: &str) -> bool {
        let Some(dest) = self.vms.get(vm).and_then(|v| v.pending_dest.as_deref()) else {
            return false;
        };
        // A destination still waiting for the stream cannot run the guest
        // once its source is gone, nor can a completed source without the
        // coordinator; one that holds it whole can.
        dest != host
            && !self.hosts.get(dest).is_some_and(|h| {
                self.connected(h, now)
                    && !h
                        .facts
                        .vms
                        .iter()
                        .any(|v| v.name == vm && v.state.holds_guest())
            })
    }

    /// The connected destination of `vm`'s recorded migration, when it
    /// reports a copy holding the whole guest (running or paused).
    fn destination_holds(&self, now: Instant, vm: &str) -> Option<String> {
        let dest = self.vms.get(vm)?.pending_dest.clone()?;
        let h = self.hosts.get(&dest)?;
        let holds = self.connected(h, now)
            && h.facts
                .vms
                .iter()
                .any(|v| v.name == vm && v.state.holds_guest());
        holds.then_some(dest)
    }

    /// Clears a stored migration destination once the VM is known to run on
    /// exactly one host, or on none.
    fn settle_migration_record(&mut self, now: Instant, vm: &str) {
        let Some(entry) = self.vms.get(vm) else {
            return;
        };
        let Some(dest) = entry.pending_dest.clone() else {
            return;
        };
        if entry.life.is_transitional() || self.migrations.contains_key(vm) {
            return;
        }
        let settled = match entry.life.host() {
            None => true,
            Some(h) => {
                self.runs_guest(h, vm, now)
                    && (h == dest
                        || self.hosts.get(&dest).is_some_and(|d| {
                            self.connected(d, now) && !d.facts.vms.iter().any(|v| v.name == vm)
                        }))
            }
        };
        if settled && self.store.set_migrating_to(vm, None).is_ok() {
            if let Some(v) = self.vms.get_mut(vm) {
                v.pending_dest = None;
            }
        }
    }

    /// Finishes a switchover that a crashed coordinator left half done.
    ///
    /// Only when no connected host reports a copy that may run: a source in
    /// `postmigrate` and a destination holding the received guest `paused`
    /// are driven to the end from `Finishing` (the destination runs before
    /// the source quits). A lone half is resumed only when every host that
    /// might hold a copy has reported, after any destination still waiting
    /// for a stream is gone. Halves of a VM the records hold shut off, and
    /// completed sources of older migrations, are removed.
    fn recover_switchover(&mut self, now: Instant, vm: &str) {
        let Some(entry) = self.vms.get(vm) else {
            return;
        };
        if entry.life.is_transitional()
            || self.migrations.contains_key(vm)
            || self.repairs.contains_key(vm)
        {
            return;
        }
        let (mut sources, mut holders, mut waiting) = (Vec::new(), Vec::new(), Vec::new());
        let mut before_switchover = None;
        for (h, live) in &self.hosts {
            if !self.connected(live, now) {
                continue;
            }
            let (Some(v), Some(conn)) = (live.facts.vms.iter().find(|v| v.name == vm), live.conn)
            else {
                continue;
            };
            match v.state {
                VmRunState::PostMigrate => sources.push((h.clone(), conn)),
                // Paused by the operator: no half of anything, left as it is.
                VmRunState::Paused if v.suspended => return,
                VmRunState::Paused => holders.push((h.clone(), conn)),
                VmRunState::InMigrate => waiting.push((h.clone(), conn)),
                // Paused before switchover (a storage copy) with no job to
                // finish it: nothing switched over, so the guest is the
                // source's, and cancelling the migration runs it again.
                VmRunState::FinishMigrate => before_switchover = Some((h.clone(), conn)),
                // A copy that may run: reconciliation's business, not ours.
                _ => return,
            }
        }
        if let Some((host, conn)) = before_switchover {
            tracing::warn!(vm, host = %host, "cancelling a migration left paused before switchover");
            let request = AgentRequest::MigrateCancel {
                name: vm.to_string(),
            };
            self.call(&host, conn, request, Purpose::Resume { vm: vm.to_string() });
            return;
        }
        // Every host that might hold a copy has reported: each known host,
        // and the recorded migration's destination even if it is not known.
        let everyone = self
            .host_rows
            .keys()
            .chain(entry.pending_dest.as_ref())
            .all(|h| self.hosts.get(h).is_some_and(|l| self.connected(l, now)));
        let Some(recorded) = entry.life.host().map(str::to_string) else {
            // Shut off in the records: any half left behind is stale.
            for (host, conn) in sources.into_iter().chain(holders).chain(waiting) {
                self.remove_half(
                    &host,
                    conn,
                    vm,
                    "a paused half of a VM recorded as shut off",
                );
            }
            return;
        };
        // A completed source other than the recorded host's is an older
        // migration's leftover: its guest state is stale, never resumed.
        let pick = sources
            .iter()
            .position(|(h, _)| *h == recorded)
            .unwrap_or(0);
        let source = (!sources.is_empty()).then(|| sources.remove(pick));
        for (other, conn) in sources {
            self.remove_half(&other, conn, vm, "the paused source of an older migration");
        }
        let dest = holders.into_iter().next();
        match (source, dest) {
            (Some((source, _)), Some((dest, _))) if recorded == source || recorded == dest => {
                self.take_over_switchover(now, vm, source, dest)
            }
            (Some((host, conn)), None) if everyone && recorded == host => {
                if waiting.is_empty() {
                    // The one copy left: the source sent everything and no
                    // destination holds it.
                    tracing::warn!(vm, host = %host, "resuming the source of an interrupted migration");
                    let request = AgentRequest::Resume {
                        name: vm.to_string(),
                        operator: false,
                    };
                    self.call(&host, conn, request, Purpose::Resume { vm: vm.to_string() });
                } else {
                    // A destination still waiting can only be stale or about
                    // to hold a paused copy: it goes first.
                    for (other, c) in waiting {
                        self.remove_half(
                            &other,
                            c,
                            vm,
                            "the unfinished destination of an interrupted migration",
                        );
                    }
                }
            }
            (None, Some((host, conn))) if everyone && recorded == host => {
                // No source is left, so a destination still waiting can never
                // receive: it goes, and the one holding the whole guest resumes.
                for (other, c) in waiting {
                    self.remove_half(&other, c, vm, "an unfinished destination with no source");
                }
                tracing::warn!(vm, host = %host, "resuming the destination of an interrupted migration");
                // The source is gone, and with it what the operator wanted.
                let request = AgentRequest::MigrateFinish {
                    name: vm.to_string(),
                    paused: false,
                };
                self.call(&host, conn, request, Purpose::Resume { vm: vm.to_string() });
            }
            _ => {}
        }
    }

    /// As libvirt's define: an alias machine type (`pc`, `q35`, or none,
    /// which means `pc`) becomes the versioned type behind it on the
    /// connected hosts' QEMU, so the guest keeps its virtual hardware across
    /// migrations and QEMU upgrades. The newest type every such host runs is
    /// chosen; when there is none, the first host's, with a warning.
    fn expand_machine(&self, now: Instant, domain: &mut Domain) -> Option<String> {
        let alias = domain.os.machine.clone().unwrap_or_else(|| "pc".into());
        let catalogs: Vec<&MachineTypes> = self
            .hosts
            .values()
            .filter(|h| self.connected(h, now) && !h.facts.machine_types.is_empty())
            .map(|h| &h.facts.machine_types)
            .collect();
        let targets: Vec<&str> = catalogs.iter().filter_map(|c| c.resolve(&alias)).collect();
        let everywhere = targets
            .iter()
            .filter(|t| catalogs.iter().all(|c| c.has(t)))
            .max_by_key(|t| machine_version(t));
        let (chosen, warning) = match (everywhere, targets.first()) {
            (Some(t), _) => (*t, None),
            (None, Some(t)) => (
                *t,
                Some(format!(
                    "machine type '{alias}' of '{}' is stored as '{t}', which not every host's \
                     QEMU runs; the VM will only be placed where it does",
                    domain.name
                )),
            ),
            // Already versioned, or no host knows it: kept as written.
            (None, None) => return None,
        };
        domain.os.machine = Some(chosen.to_string());
        warning
    }

    /// Sends the destination its `MigrateIncoming`, with the token the
    /// source wrote beside its disks.
    fn ask_destination(&mut self, vm: &str, token: String) -> Result<(), StepFailure> {
        let Some(job) = self.migrations.get(vm) else {
            return Ok(());
        };
        let dest = job.dest.clone();
        let request = AgentRequest::MigrateIncoming {
            xml: job.xml.clone(),
            source: format!("migration of '{vm}' from {}", job.source),
            postcopy: job.params.postcopy,
            storage_token: Some(token),
            copy: job.params.copy_storage.map(|mode| StorageCopy {
                mode,
                disks: job.disks.clone(),
            }),
            allow_unsafe: job.params.allow_unsafe,
            incarnation: self.vms.get(vm).map_or(0, |v| v.incarnation),
        };
        let conn = self
            .hosts
            .get(&dest)
            .and_then(|h| h.conn)
            .ok_or_else(|| StepFailure::Lost(format!("host {dest} is unreachable")))?;
        let purpose = Purpose::Migration {
            vm: vm.to_string(),
            step: MigStep::Command(Command::PrepareDestination),
        };
        self.call(&dest, conn, request, purpose);
        Ok(())
    }

    /// Until `host` reports again, its copy of `vm` runs: a resume it
    /// answered must not leave a report of a paused half behind for
    /// decisions to read (a take-over once finished a second copy).
    fn mark_running(&mut self, host: &str, vm: &str) {
        if let Some(h) = self.hosts.get_mut(host) {
            for v in h.facts.vms.iter_mut().filter(|v| v.name == vm) {
                v.state = VmRunState::Running;
            }
        }
    }

    /// Removes a half of a migration that can no longer run the guest.
    fn remove_half(&mut self, host: &str, conn: ConnId, vm: &str, what: &str) {
        tracing::warn!(vm, host, "removing {what}");
        let request = AgentRequest::Destroy {
            name: vm.to_string(),
        };
        self.call(host, conn, request, Purpose::Cleanup { vm: vm.to_string() });
    }

    /// Drives a switchover from `Finishing`: the destination holds the guest
    /// paused, the source completed.
    fn take_over_switchover(&mut self, now: Instant, vm: &str, source: String, dest: String) {
        tracing::warn!(vm, source = %source, dest = %dest, "finishing an interrupted switchover");
        // The records stay where they are (either half) until the machine
        // says which host the guest ends on.
        if self.store.set_migrating_to(vm, Some(dest.clone())).is_err() {
            return;
        }
        if let Some(v) = self.vms.get_mut(vm) {
            v.pending_dest = Some(dest.clone());
        }
        self.set_life(
            vm,
            VmLifecycle::Migrating {
                source: source.clone(),
                dest: dest.clone(),
            },
        );
        self.emit(format!(
            "vm {vm} finishing an interrupted migration from {source} to {dest}"
        ));
        let (machine, first) = Migration::resume_switchover(now);
        let job = MigrationJob::new(
            machine,
            Owner::Recovery,
            source,
            dest,
            String::new(),
            MigrationParams::default(),
            now,
        );
        self.migrations.insert(vm.to_string(), job);
        self.run_commands(now, vm, first);
    }

    fn log_host_transitions(&mut self, now: Instant) {
        let mut changes = Vec::new();
        for row in self.host_rows.values() {
            let state = self.host_state(&row.name, row.draining, now);
            if self.host_states.get(&row.name) != Some(&state) {
                changes.push((row.name.clone(), state));
            }
        }
        for (host, state) in changes {
            self.host_states.insert(host.clone(), state);
            self.emit(format!("host {host} {}", state.as_str()));
        }
    }

    /// One host's transition, where only it changed: a registration or a
    /// disconnect must not cost O(hosts) (10,000 registering would be
    /// quadratic). Others' time-outs are logged by the tick.
    fn log_host_transition(&mut self, host: &str, now: Instant) {
        let Some(draining) = self.host_rows.get(host).map(|r| r.draining) else {
            return;
        };
        let state = self.host_state(host, draining, now);
        if self.host_states.get(host) != Some(&state) {
            self.host_states.insert(host.to_string(), state);
            self.emit(format!("host {host} {}", state.as_str()));
        }
    }

    // ------------------------------------------------------------ HA

    /// What the host says its copies enforce wins: a VM restarted elsewhere
    /// only if the copy here kills itself when the lease lapses.
    fn sync_ha_running(&mut self, host: &str) {
        let Some(h) = self.hosts.get(host) else {
            return;
        };
        let changed: Vec<(String, bool)> = h
            .facts
            .vms
            .iter()
            .filter(|s| s.state != VmRunState::Prelaunch)
            .filter_map(|s| {
                let v = self.vms.get(&s.name)?;
                (v.life.host() == Some(host) && !v.life.is_transitional() && v.ha_running != s.ha)
                    .then(|| (s.name.clone(), s.ha))
            })
            .collect();
        for (name, ha) in changed {
            if self
                .store
                .update_row(&name, &mut |r| r.ha_running = ha)
                .is_ok()
            {
                if let Some(v) = self.vms.get_mut(&name) {
                    v.ha_running = ha;
                }
            }
        }
    }

    fn list_entry(&self, name: &str, v: &VmEntry, now: Instant) -> VmListEntry {
        let (state, host) = self.vm_state_word(name, &v.life, now);
        VmListEntry {
            name: name.to_string(),
            uuid: v.uuid.clone(),
            state: state.to_string(),
            host,
            generation: v.generation,
            ha: v.ha,
            incarnation: v.incarnation,
            pending_restart: v.pending_restart.clone(),
        }
    }

    /// When the host was last heard, as far as fencing counts: never before
    /// this core's first instant.
    fn last_heard(&self, host: &str) -> Instant {
        let armed = self.armed_at.unwrap_or_else(Instant::now);
        self.hosts
            .get(host)
            .map_or(armed, |h| h.last_seen.max(armed))
    }

    /// The fencing a host last reported (live, or stored from an earlier run).
    fn fence_report(&self, host: &str) -> FenceReport {
        self.hosts.get(host).map_or_else(
            || {
                self.host_rows
                    .get(host)
                    .map(|r| r.fence.clone())
                    .unwrap_or_default()
            },
            |h| h.facts.fence.clone(),
        )
    }

    /// HA VMs whose running copy is recorded on `host`.
    fn ha_vms_on(&self, host: &str) -> Vec<String> {
        self.vms
            .iter()
            .filter(|(_, v)| v.ha_running && v.life.host() == Some(host))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Declares fenced every silent host whose lease has certainly lapsed
    /// and that runs HA VMs, when it has a working fence.
    fn fence_silent_hosts(&mut self, now: Instant) {
        let mut hosts: Vec<String> = self
            .vms
            .values()
            .filter(|v| v.ha_running)
            .filter_map(|v| v.life.host().map(str::to_string))
            .collect();
        hosts.sort();
        hosts.dedup();
        for host in hosts {
            if self.fenced_hosts.contains_key(&host) {
                continue;
            }
            let report = self.fence_report(&host);
            let watchdog = report
                .watchdog_secs
                .map(|s| Duration::from_secs(u64::from(s)));
            let last_heard = self.last_heard(&host);
            let deadline = self.settings.fencing.deadline(last_heard, watchdog);
            if now < deadline {
                self.effects.push(Effect::WakeAt(deadline));
                continue;
            }
            let silent = now.saturating_duration_since(last_heard).as_secs_f64();
            if !report.works() {
                if self.unfenceable.insert(host.clone()) {
                    let why = format!(
                        "host {host} has been silent for {silent:.1}s and reports no working fence \
                         (no fence keeper, no watchdog); after making sure it is off, run \
                         flotilla host-fenced {host}"
                    );
                    tracing::error!("{why}");
                    self.emit(why.clone());
                    for vm in self.ha_vms_on(&host) {
                        if let Some(v) = self.vms.get_mut(&vm) {
                            v.pending_restart = Some(why.clone());
                        }
                    }
                }
                continue;
            }
            tracing::warn!(host = %host, silent_secs = silent, "host fenced: its lease has lapsed");
            self.emit(format!(
                "host {host} fenced: silent for {silent:.1}s, past its lease of {:.1}s \
                 (its HA guests are dead); restarting its HA VMs elsewhere",
                self.settings.fencing.lease.as_secs_f64()
            ));
            self.effects
                .push(Effect::Metric(Metric::HostFenced("lease")));
            self.fenced_hosts.insert(host, last_heard);
        }
    }

    /// `flotilla host-fenced HOST`: the operator vouches that the host is
    /// off; its HA VMs restart at once.
    fn operator_fenced(&mut self, now: Instant, host: &str) -> OperatorResponse {
        if !self.host_rows.contains_key(host) {
            return OperatorResponse::Error(OperatorError::UnknownHost {
                host: host.to_string(),
            });
        }
        if self.hosts.get(host).is_some_and(|h| self.connected(h, now)) {
            return OperatorResponse::Error(OperatorError::HostConnected {
                host: host.to_string(),
            });
        }
        self.unfenceable.remove(host);
        let last_heard = self.last_heard(host);
        self.fenced_hosts.insert(host.to_string(), last_heard);
        self.emit(format!(
            "host {host} declared fenced by an operator; restarting its HA VMs elsewhere"
        ));
        self.effects
            .push(Effect::Metric(Metric::HostFenced("operator")));
        let vms = self.ha_vms_on(host);
        self.restart_fenced(now);
        OperatorResponse::Done(format!(
            "host {host} fenced; {} HA VM(s) restarting elsewhere",
            vms.len()
        ))
    }

    /// An HA VM whose only copy is a destination that never received its
    /// guest (`inmigrate` with no migration left to feed it: the source died
    /// after a switchover in doubt) is not running: the empty copy goes and
    /// the VM is owed a restart.
    fn reclaim_empty_destinations(&mut self, now: Instant) {
        let empty: Vec<(String, String, ConnId)> = self
            .vms
            .iter()
            .filter(|(n, v)| {
                v.ha_running && !self.migrations.contains_key(*n) && !self.repairs.contains_key(*n)
            })
            .filter_map(|(n, v)| {
                let VmLifecycle::Running { host } = &v.life else {
                    return None;
                };
                // Recorded on the destination of the migration that never
                // finished, or on a host with no migration at all.
                if v.pending_dest.as_ref().is_some_and(|d| d != host) {
                    return None;
                }
                let h = self.hosts.get(host)?;
                let conn = h.conn.filter(|_| self.connected(h, now))?;
                // The report must postdate the last action on the VM there
                // (a resume answered after it was numbered, say).
                if self.fenced(host, n, h.seq) {
                    return None;
                }
                let shell = h
                    .facts
                    .vms
                    .iter()
                    .any(|s| s.name == **n && s.state == VmRunState::InMigrate);
                let elsewhere = self
                    .hosts
                    .iter()
                    .any(|(other, o)| other != host && o.facts.vms.iter().any(|s| s.name == **n));
                (shell && !elsewhere).then(|| (n.clone(), host.clone(), conn))
            })
            .collect();
        for (vm, host, conn) in empty {
            let why = "its only copy never received the guest (a migration's source died)";
            self.emit(format!("vm {vm} on {host}: {why}; removing it"));
            self.remove_half(
                &host,
                conn,
                &vm,
                "an incoming copy that never received its guest",
            );
            self.record_stopped(&vm, &host, why);
        }
    }

    /// Restarts elsewhere every HA VM still recorded on a fenced host, and
    /// retries HA VMs that wait for room.
    fn restart_fenced(&mut self, now: Instant) {
        let fenced: Vec<(String, Instant)> = self
            .fenced_hosts
            .iter()
            .map(|(h, t)| (h.clone(), *t))
            .collect();
        for (host, last_heard) in fenced {
            for vm in self.ha_vms_on(&host) {
                let transitional = self.vms.get(&vm).is_some_and(|v| v.life.is_transitional())
                    || self.migrations.contains_key(&vm)
                    || self.repairs.contains_key(&vm);
                if transitional {
                    // Its action ends first (a call to a silent host fails).
                    continue;
                }
                // The new incarnation is durable before any start is sent: a
                // copy reported later with the old one is known to be stale.
                let stored = self.store.update_row(&vm, &mut |row| {
                    row.incarnation += 1;
                    row.placement = None;
                    row.want_running = true;
                });
                let row = match stored {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(vm = %vm, error = %e, "cannot record the new incarnation");
                        continue;
                    }
                };
                self.usage.set(&vm, None);
                if let Some(v) = self.vms.get_mut(&vm) {
                    v.incarnation = row.incarnation;
                    v.pending_dest = None;
                    v.pending_restart =
                        Some(format!("waiting to restart after host {host} was fenced"));
                }
                self.set_life(&vm, VmLifecycle::ShutOff);
                self.emit(format!(
                    "vm {vm} fenced away from {host} (incarnation {})",
                    row.incarnation
                ));
                let cause = format!("host {host} was fenced, last heard");
                self.try_ha_restart(now, &vm, Some((cause, last_heard)));
            }
        }
        let waiting: Vec<String> = self
            .vms
            .iter()
            .filter(|(n, v)| {
                v.ha && v.pending_restart.is_some()
                    && v.life == VmLifecycle::ShutOff
                    && !self.repairs.contains_key(*n)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for vm in waiting {
            self.try_ha_restart(now, &vm, None);
        }
    }

    /// Starts the autostart VMs once the fleet is up: every known host is
    /// connected, or one is and hosts that were up have had a heartbeat
    /// timeout to register. Tried once, as libvirtd does at its start; a VM
    /// the scheduler cannot place says why in the events.
    fn autostart_fleet(&mut self, now: Instant) {
        if self.autostart.is_empty() {
            return;
        }
        let Some(armed) = self.armed_at else { return };
        let connected = |h: &str| self.hosts.get(h).is_some_and(|l| self.connected(l, now));
        let all_up = !self.host_rows.is_empty() && self.host_rows.keys().all(|h| connected(h));
        let any_up = self.host_rows.keys().any(|h| connected(h));
        if !(all_up || (any_up && now >= armed + self.settings.heartbeat_timeout)) {
            return;
        }
        for vm in std::mem::take(&mut self.autostart) {
            let off = self
                .vms
                .get(&vm)
                .is_some_and(|v| v.life == VmLifecycle::ShutOff && v.pending_restart.is_none());
            if !off || self.repairs.contains_key(&vm) {
                continue;
            }
            tracing::info!(vm = %vm, "autostart");
            if let Err(e) = self.place_and_send(now, &vm, None, None, None) {
                self.emit(format!("vm {vm} not autostarted: {e}"));
            }
        }
    }

    fn try_ha_restart(&mut self, now: Instant, vm: &str, from: Option<(String, Instant)>) {
        let restart = from.unwrap_or_else(|| {
            let why = self
                .vms
                .get(vm)
                .and_then(|v| v.pending_restart.clone())
                .unwrap_or_default();
            (why, now)
        });
        if let Err(e) = self.place_and_send(now, vm, None, None, Some(restart)) {
            let why = match e {
                OperatorError::NoPlacement { explanation } => format!("not placed: {explanation}"),
                other => other.to_string(),
            };
            if let Some(v) = self.vms.get_mut(vm) {
                v.pending_restart = Some(why);
            }
        }
    }

    /// Edits `name`'s stored definition in place (a new generation): the
    /// stored row, or why not.
    fn edit_stored(
        &mut self,
        name: &str,
        edit: impl FnOnce(&mut Domain),
    ) -> Result<VmRow, Box<OperatorError>> {
        let row = match self.store.get(name) {
            Ok(Some(r)) => r,
            Ok(None) => return Err(Box::new(not_found(name))),
            Err(e) => return Err(Box::new(OperatorError::Store(e.to_string()))),
        };
        let mut doc = Domain::parse(name, &row.xml)
            .map_err(|e| Box::new(OperatorError::StoredDefinitionUnreadable(e.to_string())))?
            .model;
        edit(&mut doc);
        let xml = doc.to_xml(XmlFlavor::Inactive);
        let row = self
            .store
            .update_row(name, &mut |r| {
                r.xml = xml.clone();
                r.generation += 1;
            })
            .map_err(|e| Box::new(OperatorError::Store(e.to_string())))?;
        if let Some(v) = self.vms.get_mut(name) {
            v.generation = row.generation;
        }
        Ok(row)
    }

    /// `flotilla autostart NAME [--disable]`: edits the stored definition.
    fn set_autostart(&mut self, name: &str, on: bool) -> OperatorResponse {
        match self.edit_stored(name, |d| d.set_autostart(on)) {
            Ok(_) if on => OperatorResponse::Done(format!("Domain '{name}' marked as autostarted")),
            Ok(_) => OperatorResponse::Done(format!("Domain '{name}' unmarked as autostarted")),
            Err(e) => OperatorResponse::Error(*e),
        }
    }

    /// `flotilla ha NAME on|off`: edits the stored definition.
    fn set_ha(&mut self, name: &str, on: bool) -> OperatorResponse {
        if let Err(e) = self.edit_stored(name, |d| d.set_ha(on)) {
            return OperatorResponse::Error(*e);
        }
        let running = match self.vms.get_mut(name) {
            Some(v) => {
                v.ha = on;
                if !on {
                    v.pending_restart = None;
                }
                v.life.host().is_some() && v.ha_running != on
            }
            None => false,
        };
        let word = if on { "on" } else { "off" };
        self.emit(format!("vm {name} high availability {word}"));
        OperatorResponse::Done(if running {
            format!(
                "Domain '{name}' high availability {word} in its definition; the running copy \
                 keeps what it started with until its next start"
            )
        } else {
            format!("Domain '{name}' high availability {word}")
        })
    }

    fn tick(&mut self, now: Instant) {
        self.log_host_transitions(now);
        self.fence_silent_hosts(now);
        self.reclaim_empty_destinations(now);
        self.restart_fenced(now);
        self.autostart_fleet(now);
        self.publish_gauges(now);
        // Migrations: timeouts, and the polls that are due.
        let names: Vec<String> = self.migrations.keys().cloned().collect();
        for vm in names {
            self.feed_migration(now, &vm, MigInput::Tick);
            self.poll_migration(now, &vm);
        }
        // The shell keeps only the earliest wake-up: ask again for the next
        // poll due, so no migration waits for the once-a-second tick.
        let next = self
            .migrations
            .values()
            .filter(|j| {
                matches!(
                    j.machine.phase(),
                    Phase::Mirroring | Phase::Performing | Phase::Aborting { .. }
                ) && j.streaming
                    && !j.poll_in_flight
                    && j.next_poll > now
            })
            .map(|j| j.next_poll)
            .min();
        if let Some(at) = next {
            self.effects.push(Effect::WakeAt(at));
        }
    }

    /// A migration that begins or ends is published at once (a scrape right
    /// after `flotilla migrate` returns must see it over). Everything else
    /// waits for the tick: recounting every host and VM on each start would
    /// put O(fleet) work on the start path.
    fn publish_migration_change(&mut self, now: Instant) {
        if self.migrations.len() != self.published_migrations {
            self.publish_gauges(now);
        }
    }

    fn publish_gauges(&mut self, now: Instant) {
        self.published_migrations = self.migrations.len();
        let mut hosts: BTreeMap<&'static str, u64> =
            HostState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for row in self.host_rows.values() {
            *hosts
                .entry(self.host_state(&row.name, row.draining, now).as_str())
                .or_default() += 1;
        }
        let mut vms: BTreeMap<&'static str, u64> = [
            ("running", 0),
            ("paused", 0),
            ("shut off", 0),
            ("unknown", 0),
        ]
        .into();
        for (name, v) in &self.vms {
            *vms.entry(self.vm_state_word(name, &v.life, now).0)
                .or_default() += 1;
        }
        self.effects.push(Effect::Metric(Metric::Gauges {
            hosts: hosts.into_iter().collect(),
            vms: vms.into_iter().collect(),
            migrations: self.migrations.len() as u64,
        }));
    }

    // ------------------------------------------------------------ operator

    fn operator(&mut self, now: Instant, id: RequestId, request: OperatorRequest) {
        match request {
            OperatorRequest::Define { xml, source } => {
                let r = self.define(now, xml, source);
                self.reply(id, r);
            }
            OperatorRequest::Undefine { name } => {
                let r = self.undefine(&name);
                self.reply(id, r);
            }
            OperatorRequest::List { all } => {
                let entries = self
                    .vms
                    .iter()
                    .map(|(name, v)| self.list_entry(name, v, now))
                    .filter(|e| all || e.state != "shut off")
                    .collect();
                self.reply(id, OperatorResponse::Vms(entries));
            }
            OperatorRequest::DumpXml {
                name,
                live: false,
                security_info,
            } => {
                let r = match self.store.get(&name) {
                    Ok(Some(r)) if security_info => OperatorResponse::Xml(r.xml),
                    Ok(Some(r)) => shown_xml(&r.xml, XmlFlavor::Inactive),
                    Ok(None) => OperatorResponse::Error(not_found(&name)),
                    Err(e) => OperatorResponse::Error(OperatorError::Store(e.to_string())),
                };
                self.reply(id, r);
            }
            OperatorRequest::DumpXml {
                name,
                live: true,
                security_info,
            } => self.ask(
                now,
                id,
                &name,
                AgentRequest::DumpXml { name: name.clone() },
                Ask::LiveXml { security_info },
            ),
            OperatorRequest::Reboot { name } => {
                let message = format!("Domain '{name}' is being reset");
                let req = AgentRequest::Reset { name: name.clone() };
                self.ask(now, id, &name, req, Ask::Done { message })
            }
            OperatorRequest::Suspend { name } => {
                let ask = Ask::Pause {
                    message: format!("Domain '{name}' suspended"),
                    vm: name.clone(),
                    paused: true,
                };
                let req = AgentRequest::Suspend { name: name.clone() };
                self.ask(now, id, &name, req, ask)
            }
            OperatorRequest::Resume { name } => {
                let ask = Ask::Pause {
                    message: format!("Domain '{name}' resumed"),
                    vm: name.clone(),
                    paused: false,
                };
                let req = AgentRequest::Resume {
                    name: name.clone(),
                    operator: true,
                };
                self.ask(now, id, &name, req, ask)
            }
            OperatorRequest::DomIfAddr { name } => {
                let req = AgentRequest::GuestInterfaces { name: name.clone() };
                self.ask(now, id, &name, req, Ask::GuestInterfaces)
            }
            OperatorRequest::SetAutostart { name, on } => {
                let r = self.set_autostart(&name, on);
                self.reply(id, r);
            }
            OperatorRequest::DomDisplay { name } => self.ask(
                now,
                id,
                &name,
                AgentRequest::DomDisplay { name: name.clone() },
                Ask::Display,
            ),
            OperatorRequest::NetList { host } => match self.conn_of(&host, now) {
                Ok(conn) => self.call(
                    &host,
                    conn,
                    AgentRequest::NetList,
                    Purpose::Ask {
                        op: id,
                        ask: Ask::Networks,
                    },
                ),
                Err(e) => self.reply(id, OperatorResponse::Error(e)),
            },
            OperatorRequest::Start { name, host } => self.start(now, id, name, host),
            OperatorRequest::Shutdown { name, timeout_secs } => {
                let req = AgentRequest::Shutdown {
                    name: name.clone(),
                    timeout_secs,
                };
                self.stop(now, id, name, req)
            }
            OperatorRequest::Destroy { name } => {
                let req = AgentRequest::Destroy { name: name.clone() };
                self.stop(now, id, name, req)
            }
            OperatorRequest::Hosts => {
                let entries = self
                    .host_rows
                    .values()
                    .map(|r| {
                        let live = self.hosts.get(&r.name);
                        HostEntry {
                            name: r.name.clone(),
                            state: self
                                .host_state(&r.name, r.draining, now)
                                .as_str()
                                .to_string(),
                            cpus: live.map_or(r.cpus, |h| h.facts.cpus),
                            memory_mib: live.map_or(r.memory_mib, |h| h.facts.memory_mib),
                            vms: live.map_or(0, |h| h.facts.vms.len() as u32),
                            committed_vcpus: self.usage.used(&r.name).vcpus,
                            committed_memory_mib: self.usage.used(&r.name).memory_mib,
                            networks: live.map(|h| h.facts.networks.clone()).unwrap_or_default(),
                            last_seen_secs: live.map_or(u64::MAX, |h| {
                                now.saturating_duration_since(h.last_seen).as_secs()
                            }),
                        }
                    })
                    .collect();
                self.reply(id, OperatorResponse::Hosts(entries));
            }
            OperatorRequest::Migrate {
                name,
                to,
                max_downtime_ms,
                bandwidth_mib_s,
                auto_converge,
                postcopy,
                timeout_secs,
                copy_storage,
                allow_unsafe,
            } => {
                // Post-copy would run the guest on the destination before
                // its mirrored disks are in sync there.
                if let (true, Some(mode)) = (postcopy, copy_storage) {
                    let e = OperatorError::Incompatible {
                        first: "--postcopy".into(),
                        second: mode.flag().into(),
                    };
                    self.reply(id, OperatorResponse::Error(e));
                    return;
                }
                let params = MigrationParams {
                    max_downtime_ms,
                    bandwidth_mib_s,
                    auto_converge,
                    postcopy,
                    timeout: timeout_secs.map(Duration::from_secs),
                    copy_storage,
                    allow_unsafe,
                };
                if let Err(e) = self.migrate(now, Owner::Operator(id), &name, to, params) {
                    self.reply(id, OperatorResponse::Error(e));
                }
            }
            OperatorRequest::MigrateAbort { name } => {
                if !self.migrations.contains_key(&name) {
                    self.reply(
                        id,
                        OperatorResponse::Error(OperatorError::NoMigration { name }),
                    );
                    return;
                }
                let refused =
                    self.feed_migration(now, &name, MigInput::Abort("aborted by operator".into()));
                let r = match refused {
                    Some(reason) => OperatorResponse::Error(OperatorError::AbortRefused { reason }),
                    None => OperatorResponse::Done(format!(
                        "abort of the migration of '{name}' requested"
                    )),
                };
                self.reply(id, r);
            }
            OperatorRequest::HostDrain { host, parallel } => self.drain(now, id, host, parallel),
            OperatorRequest::HostUndrain { host } => {
                let r = match self.set_draining(&host, false) {
                    Ok(()) => {
                        tracing::info!(host = %host, "undrained");
                        OperatorResponse::Done(format!("host {host} accepts VMs again"))
                    }
                    Err(e) => OperatorResponse::Error(e),
                };
                self.log_host_transitions(now);
                self.reply(id, r);
            }
            OperatorRequest::Events { .. } | OperatorRequest::Console { .. } => self.reply(
                id,
                OperatorResponse::Error(OperatorError::UnexpectedAnswer(
                    "a streaming request; the shell serves it".into(),
                )),
            ),
            // The control plane is the server's to describe.
            OperatorRequest::Cluster => self.reply(
                id,
                OperatorResponse::Error(OperatorError::UnexpectedAnswer(
                    "the cluster view is the server's; the core does not see it".into(),
                )),
            ),
            // The web shell issues tickets; one that reaches the core came
            // to a coordinator that serves no web pages.
            OperatorRequest::WebTicket { .. } => {
                self.reply(id, OperatorResponse::Error(OperatorError::WebDisabled))
            }
            OperatorRequest::Placements => {
                let notes = self
                    .vms
                    .iter()
                    .filter_map(|(name, v)| {
                        Some(PlacementNote {
                            name: name.clone(),
                            explanation: v.placement.clone()?,
                        })
                    })
                    .collect();
                self.reply(id, OperatorResponse::Placements(notes));
            }
            OperatorRequest::SetHa { name, on } => {
                let r = self.set_ha(&name, on);
                self.reply(id, r);
            }
            OperatorRequest::HostFenced { host } => {
                let r = self.operator_fenced(now, &host);
                self.reply(id, r);
            }
            OperatorRequest::DomInfo { name } => {
                let r = match self.vms.get(&name) {
                    None => OperatorResponse::Error(not_found(&name)),
                    Some(v) => {
                        let (vcpus, memory_kib) = match self.store.get(&name) {
                            Ok(Some(row)) => Domain::parse(&name, &row.xml)
                                .map_or((0, 0), |d| (d.model.vcpus(), d.model.memory.kib)),
                            _ => (0, 0),
                        };
                        OperatorResponse::DomInfo(DomInfo {
                            entry: self.list_entry(&name, v, now),
                            vcpus,
                            memory_kib,
                        })
                    }
                };
                self.reply(id, r);
            }
        }
    }

    fn define(&mut self, now: Instant, xml: String, source: String) -> OperatorResponse {
        let doc = match Domain::parse(&source, &xml) {
            Ok(d) => d,
            Err(e) => {
                return OperatorResponse::Error(OperatorError::InvalidDefinition(e.to_string()))
            }
        };
        let mut domain = doc.model.without_runtime_state();
        let mut warnings = Vec::new();
        for i in domain.interfaces() {
            let pinned = match i.if_type.as_str() {
                "bridge" => i.source_bridge.as_deref().map(|b| format!("bridge {b}")),
                "direct" => i.source_dev.as_deref().map(|d| format!("device {d}")),
                _ => None,
            };
            if let Some(what) = pinned {
                warnings.push(format!(
                    "interface of '{}' pins the host-specific {what}; use \
                     <interface type='network'><source network='NAME'/> so each host resolves its own",
                    domain.name
                ));
            }
        }
        for g in domain.graphics() {
            for l in &g.listens {
                if let ListenKind::Address { address: Some(a) } = &l.kind {
                    let loopback = a
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                    if !loopback {
                        warnings.push(format!(
                            "{} console of '{}' pins the host-specific address {a}; \
                             use <listen type='network' network='NAME'/> so each host resolves its own",
                            g.protocol.as_str(),
                            domain.name
                        ));
                    }
                }
            }
        }
        // As virsh define: a definition without <uuid> keeps the stored VM's UUID.
        let has_uuid = tree::parse_document(&source, &xml)
            .map(|root| root.elements().any(|e| e.name == "uuid"))
            .unwrap_or(true);
        if !has_uuid {
            if let Some(u) = self
                .vms
                .get(&domain.name)
                .and_then(|v| flotilla_shared::xml::domain::parse_uuid(&v.uuid))
            {
                domain.uuid = u;
            }
        }
        if let Some(w) = self.expand_machine(now, &mut domain) {
            warnings.push(w);
        }
        // As libvirt's define: a NIC without <mac> gets one now (from the UUID
        // kept above), stored, so it is the same on every start and host.
        domain.assign_missing_macs();
        if let Some(mac) = domain
            .interfaces()
            .filter_map(|i| i.mac.as_deref())
            .find(|m| m.to_ascii_lowercase().starts_with("fe"))
        {
            return OperatorResponse::Error(OperatorError::InvalidDefinition(format!(
                "{source}: <interface><mac address='{mac}'>: unable to use MAC address starting \
                 with reserved value 0xFE (host devices carry the guest MAC with that first byte)"
            )));
        }
        // As libvirt's define: implied controllers and every device's address
        // are stored, so slots (and guest NIC names) stay put; and what
        // Flotilla cannot build is refused now, not at start.
        let domain = match hardware::complete(&domain).and_then(|d| {
            hardware::plan(&d)?;
            Ok(d)
        }) {
            Ok(d) => d,
            Err(refused) => {
                return OperatorResponse::Error(OperatorError::Unsupported {
                    file: source,
                    refused,
                })
            }
        };
        let cpu = cpu_need(&domain);
        let def = NewDefinition {
            name: domain.name.clone(),
            uuid: domain.uuid.hyphenated().to_string(),
            xml: domain.to_xml(XmlFlavor::Inactive),
        };
        match self.store.define(def) {
            Ok(row) => {
                tracing::info!(vm = %row.name, generation = row.generation, "defined");
                let fp = footprint(&row);
                match self.vms.get_mut(&row.name) {
                    Some(v) => {
                        // A running VM keeps the footprint it started with until it restarts.
                        v.uuid = row.uuid.clone();
                        v.generation = row.generation;
                        v.ha = is_ha(&row);
                        if v.life == VmLifecycle::ShutOff {
                            v.footprint = fp;
                        }
                        v.cpu = cpu.clone();
                    }
                    None => {
                        self.vms.insert(
                            row.name.clone(),
                            VmEntry {
                                uuid: row.uuid.clone(),
                                generation: row.generation,
                                footprint: fp,
                                life: VmLifecycle::ShutOff,
                                pending_dest: None,
                                placement: None,
                                ha: is_ha(&row),
                                incarnation: row.incarnation,
                                pending_restart: None,
                                ha_running: false,
                                cpu: cpu.clone(),
                            },
                        );
                    }
                }
                OperatorResponse::Defined {
                    name: row.name,
                    uuid: row.uuid,
                    generation: row.generation,
                    warnings,
                }
            }
            Err(e) => OperatorResponse::Error(OperatorError::Store(e.to_string())),
        }
    }

    fn undefine(&mut self, name: &str) -> OperatorResponse {
        match self.vms.get(name) {
            None => OperatorResponse::Error(not_found(name)),
            Some(v) if v.life != VmLifecycle::ShutOff => {
                OperatorResponse::Error(OperatorError::StillRunning {
                    name: name.to_string(),
                })
            }
            Some(_) => match self.store.undefine(name) {
                Ok(()) => {
                    self.vms.remove(name);
                    OperatorResponse::Done(format!("Domain '{name}' has been undefined"))
                }
                Err(e) => OperatorResponse::Error(OperatorError::Store(e.to_string())),
            },
        }
    }

    fn repaired(&mut self, vm: &str) {
        if let Some(n) = self.repairs.get_mut(vm) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.repairs.remove(vm);
            }
        }
    }

    /// While an action owns a VM, other requests are refused.
    fn busy_error(&self, name: &str) -> Option<OperatorError> {
        let name = name.to_string();
        if self.repairs.contains_key(&name) {
            return Some(OperatorError::Repairing { name });
        }
        match self.vms.get(&name).map(|v| &v.life) {
            Some(VmLifecycle::Migrating { .. }) => Some(OperatorError::Migrating { name }),
            Some(l) if l.is_transitional() => Some(OperatorError::Busy { name }),
            _ => None,
        }
    }

    fn ask(&mut self, now: Instant, id: RequestId, name: &str, request: AgentRequest, ask: Ask) {
        let host = match self.vms.get(name) {
            None => Err(not_found(name)),
            Some(v) => v
                .life
                .host()
                .map(str::to_string)
                .ok_or_else(|| not_running(name)),
        };
        match host.and_then(|h| self.conn_of(&h, now).map(|c| (h, c))) {
            Ok((host, conn)) => self.call(&host, conn, request, Purpose::Ask { op: id, ask }),
            Err(e) => self.reply(id, OperatorResponse::Error(e)),
        }
    }

    fn needs(&self, name: &str) -> Result<(VmNeeds, String, u64), OperatorError> {
        let row = match self.store.get(name) {
            Ok(Some(r)) => r,
            Ok(None) => return Err(not_found(name)),
            Err(e) => return Err(OperatorError::Store(e.to_string())),
        };
        let domain = Domain::parse(name, &row.xml)
            .map_err(|e| OperatorError::StoredDefinitionUnreadable(e.to_string()))?
            .model;
        Ok((
            VmNeeds {
                name: name.to_string(),
                memory_mib: domain.memory.mib(),
                vcpus: domain.vcpus(),
                networks: domain.listen_networks(),
                nic_networks: domain.interface_networks(),
                machine: domain.os.machine.clone(),
                cpu: self
                    .vms
                    .get(name)
                    .map(|v| v.cpu.clone())
                    .unwrap_or_default(),
            },
            row.xml,
            row.generation,
        ))
    }

    fn start(&mut self, now: Instant, id: RequestId, name: String, host: Option<String>) {
        let life = match self.vms.get(&name) {
            Some(v) => v.life.clone(),
            None => return self.reply(id, OperatorResponse::Error(not_found(&name))),
        };
        if let Some(e) = self.busy_error(&name) {
            return self.reply(id, OperatorResponse::Error(e));
        }
        if let Some(h) = life.host() {
            let host = h.to_string();
            let e = if self.runs_on(h, &name, now) {
                OperatorError::RunningOn { name, host }
            } else {
                OperatorError::RecordedOnUnreachable { name, host }
            };
            return self.reply(id, OperatorResponse::Error(e));
        }
        if let Err(e) = self.place_and_send(now, &name, host, Some(id), None) {
            self.reply(id, OperatorResponse::Error(e));
        }
    }

    /// Chooses a host (or checks `host`), records the placement and sends
    /// the start; the answer comes to [`Self::start_replied`]. `restart`
    /// marks an HA restart after fencing (the fenced host, when it was last
    /// heard). An error means nothing was sent.
    fn place_and_send(
        &mut self,
        now: Instant,
        name: &str,
        host: Option<String>,
        op: Option<RequestId>,
        restart: Option<(String, Instant)>,
    ) -> Result<(), OperatorError> {
        let name = name.to_string();
        let (needs, xml, generation) = self.needs(&name)?;
        self.refresh_index(now);
        let began = (self.stopwatch)();
        let decision = match &host {
            Some(h) => self.index.place_on(&needs, h),
            None => self.index.place(&needs, &[]),
        };
        if let (Some(b), Some(e)) = (began, (self.stopwatch)()) {
            self.effects.push(Effect::Metric(Metric::SchedulingSeconds(
                e.duration_since(b).as_secs_f64(),
            )));
        }
        let decision = match decision {
            Ok(d) => d,
            Err(e) => {
                tracing::info!(vm = %name, reason = %e, "no placement");
                let repeated = restart.is_some()
                    && self
                        .vms
                        .get(&name)
                        .and_then(|v| v.pending_restart.as_deref())
                        == Some(&format!("not placed: {e}"));
                if !repeated {
                    self.emit(format!("vm {name} not placed: {e}"));
                    self.effects
                        .push(Effect::Metric(Metric::Start("no_placement")));
                }
                self.note_placement(&name, format!("not placed: {e}"));
                return Err(OperatorError::NoPlacement {
                    explanation: e.to_string(),
                });
            }
        };
        let target = decision.host.clone();
        let mut explanation = decision
            .ranking
            .iter()
            .map(|(h, s)| format!("{h} ({s:.3})"))
            .collect::<Vec<_>>()
            .join(", ");
        if decision.feasible > decision.ranking.len() {
            explanation.push_str(&format!(", … of {} hosts that fit", decision.feasible));
        }
        tracing::info!(vm = %name, host = %target, ranking = %explanation, "placing");
        let conn = self.conn_of(&target, now)?;
        // The footprint the scheduler counted is the one it holds while running.
        if let Some(v) = self.vms.get_mut(&name) {
            v.footprint = Footprint {
                memory_mib: needs.memory_mib,
                vcpus: needs.vcpus,
            };
        }
        // Record first: if we crash after the host starts it, the host's next
        // report matches the record instead of surprising us.
        self.record_placement(&name, Some(&target))
            .map_err(|e| OperatorError::Store(e.to_string()))?;
        self.set_life(
            &name,
            VmLifecycle::Starting {
                host: target.clone(),
            },
        );
        let incarnation = self.vms.get(&name).map_or(0, |v| v.incarnation);
        let request = AgentRequest::Start {
            xml,
            source: format!("definition of '{name}' (generation {generation})"),
            incarnation,
        };
        self.call(
            &target,
            conn,
            request,
            Purpose::Start {
                op,
                vm: name,
                sent: now,
                explanation,
                restart,
            },
        );
        Ok(())
    }

    fn stop(&mut self, now: Instant, id: RequestId, name: String, request: AgentRequest) {
        let life = match self.vms.get(&name) {
            Some(v) => v.life.clone(),
            None => return self.reply(id, OperatorResponse::Error(not_found(&name))),
        };
        if let Some(e) = self.busy_error(&name) {
            return self.reply(id, OperatorResponse::Error(e));
        }
        let Some(host) = life.host().map(str::to_string) else {
            return self.reply(id, OperatorResponse::Error(not_running(&name)));
        };
        // Stopping one half of an unsettled migration would record the VM as
        // shut off while the other half may run it.
        if let Some(dest) = self.vms.get(&name).and_then(|v| v.pending_dest.clone()) {
            let e = OperatorError::UnsettledMigration { name, dest };
            return self.reply(id, OperatorResponse::Error(e));
        }
        let conn = match self.conn_of(&host, now) {
            Ok(c) => c,
            Err(e) => return self.reply(id, OperatorResponse::Error(e)),
        };
        self.set_life(&name, VmLifecycle::Stopping { host: host.clone() });
        self.call(&host, conn, request, Purpose::Stop { op: id, vm: name });
    }

    fn set_draining(&mut self, host: &str, draining: bool) -> Result<(), OperatorError> {
        let mut row =
            self.host_rows
                .get(host)
                .cloned()
                .ok_or_else(|| OperatorError::UnknownHost {
                    host: host.to_string(),
                })?;
        row.draining = draining;
        self.store
            .put_host(&row, true)
            .map_err(|e| OperatorError::Store(e.to_string()))?;
        self.host_rows.insert(host.to_string(), row);
        self.touch(host);
        Ok(())
    }

    fn drain(&mut self, now: Instant, id: RequestId, host: String, parallel: u32) {
        if let Err(e) = self.set_draining(&host, true) {
            return self.reply(id, OperatorResponse::Error(e));
        }
        self.log_host_transition(&host, now);
        tracing::info!(host = %host, "draining");
        let queue = self
            .vms
            .iter()
            .filter(|(_, v)| v.life.host() == Some(host.as_str()))
            .map(|(n, _)| n.clone())
            .collect();
        self.drains.insert(
            id,
            DrainJob {
                host,
                queue,
                parallel: parallel.max(1) as usize,
                active: 0,
                moved: Vec::new(),
                failed: Vec::new(),
            },
        );
        self.advance_drain(now, id);
    }

    /// Starts the drain's next migrations up to its parallelism, or answers it.
    fn advance_drain(&mut self, now: Instant, id: RequestId) {
        loop {
            let Some(d) = self.drains.get_mut(&id) else {
                return;
            };
            if d.active >= d.parallel {
                return;
            }
            let Some(vm) = d.queue.pop_front() else {
                if d.active == 0 {
                    if let Some(d) = self.drains.remove(&id) {
                        self.reply(
                            id,
                            OperatorResponse::Drained {
                                host: d.host,
                                moved: d.moved,
                                failed: d.failed,
                            },
                        );
                    }
                }
                return;
            };
            d.active += 1;
            let host = d.host.clone();
            self.effects.push(Effect::Note {
                id,
                line: format!("{vm}: migrating off {host}"),
            });
            let params = MigrationParams {
                auto_converge: true,
                timeout: Some(Duration::from_secs(600)),
                ..MigrationParams::default()
            };
            if let Err(e) = self.migrate(now, Owner::Drain(id), &vm, None, params) {
                self.drain_result(now, id, &vm, Err(e.to_string()));
            }
        }
    }

    fn drain_result(
        &mut self,
        now: Instant,
        id: RequestId,
        vm: &str,
        result: Result<(String, u64), String>,
    ) {
        let Some(d) = self.drains.get_mut(&id) else {
            return;
        };
        d.active = d.active.saturating_sub(1);
        let line = match result {
            Ok((on, elapsed_ms)) => {
                d.moved.push((vm.to_string(), on.clone()));
                format!("{vm}: now on {on} ({:.2}s)", elapsed_ms as f64 / 1000.0)
            }
            Err(e) => {
                d.failed.push((vm.to_string(), e.clone()));
                format!("{vm}: could not move: {e}")
            }
        };
        self.effects.push(Effect::Note { id, line });
        self.advance_drain(now, id);
    }

    // ------------------------------------------------------------ migration

    fn migrate(
        &mut self,
        now: Instant,
        owner: Owner,
        name: &str,
        to: Option<String>,
        params: MigrationParams,
    ) -> Result<(), OperatorError> {
        if !self.vms.contains_key(name) {
            return Err(not_found(name));
        }
        if let Some(e) = self.busy_error(name) {
            return Err(e);
        }
        let source = self
            .vms
            .get(name)
            .and_then(|v| v.life.host().map(str::to_string))
            .filter(|h| self.runs_guest(h, name, now))
            .ok_or_else(|| not_running(name))?;
        let (needs, xml, _) = self.needs(name)?;
        self.refresh_index(now);
        let decision = match &to {
            Some(h) if *h == source => {
                return Err(OperatorError::AlreadyOn {
                    name: name.to_string(),
                    host: h.clone(),
                })
            }
            Some(h) => self.index.place_on(&needs, h),
            None => self.index.place(&needs, &[&source]),
        }
        .map_err(|e| OperatorError::NoPlacement {
            explanation: e.to_string(),
        })?;
        let dest = decision.host;
        self.conn_of(&source, now)?;
        self.conn_of(&dest, now)?;
        // Recorded before the destination hears of it: a coordinator that
        // restarts mid-migration must know which other host may run the VM.
        self.store
            .set_migrating_to(name, Some(dest.clone()))
            .map_err(|e| OperatorError::Store(e.to_string()))?;
        if let Some(v) = self.vms.get_mut(name) {
            v.pending_dest = Some(dest.clone());
        }
        self.set_life(
            name,
            VmLifecycle::Migrating {
                source: source.clone(),
                dest: dest.clone(),
            },
        );
        tracing::info!(vm = %name, from = %source, to = %dest, "migrating");
        self.emit(format!("vm {name} migrating from {source} to {dest}"));
        let (machine, first) = Migration::start(params.clone(), now);
        // The destination's copy enforces what the source's does, whatever
        // the definition says now.
        let ha_running = self.vms.get(name).is_some_and(|v| v.ha_running);
        let xml = xml_with_ha(xml, ha_running);
        let job = MigrationJob::new(machine, owner, source, dest, xml, params, now);
        self.migrations.insert(name.to_string(), job);
        self.run_commands(now, name, first);
        Ok(())
    }

    /// Feeds the migration of `vm` one input; returns a refusal it reported.
    fn feed_migration(&mut self, now: Instant, vm: &str, input: MigInput) -> Option<String> {
        let job = self.migrations.get_mut(vm)?;
        let cmds = job.machine.handle(input, now);
        self.run_commands(now, vm, cmds)
    }

    /// Takes a migration's commands: reports at once, agent steps in order,
    /// one at a time, as each step's answer may change what comes next.
    /// Returns a refusal it reported.
    fn run_commands(&mut self, now: Instant, vm: &str, cmds: Vec<Command>) -> Option<String> {
        let mut refused = None;
        for cmd in cmds {
            match cmd {
                Command::Report(Report::Progress(p)) => {
                    let Some(job) = self.migrations.get_mut(vm) else {
                        continue;
                    };
                    let log = job.sampler.should_log(now, &p.status);
                    if let Owner::Operator(id) = job.owner {
                        self.effects.push(Effect::Progress {
                            id,
                            progress: p.clone(),
                        });
                    }
                    if log {
                        self.emit(migration_progress_line(vm, &p));
                    }
                }
                Command::Report(Report::Postcopy) => {}
                Command::Report(Report::Refused(msg)) => {
                    tracing::warn!(vm, "{msg}");
                    refused = Some(msg);
                }
                other => {
                    if let Some(job) = self.migrations.get_mut(vm) {
                        job.steps.push_back(other);
                    }
                }
            }
        }
        self.pump(now, vm);
        refused
    }

    /// Carries out the migration's next steps until one waits for an answer.
    fn pump(&mut self, now: Instant, vm: &str) {
        loop {
            let Some(job) = self.migrations.get_mut(vm) else {
                return;
            };
            if job.step_in_flight {
                return;
            }
            let Some(cmd) = job.steps.pop_front() else {
                return;
            };
            let (source, dest) = (job.source.clone(), job.dest.clone());
            tracing::info!(vm, command = ?cmd, "migration step");
            let name = vm.to_string();
            let mut step = MigStep::Command(cmd.clone());
            let call = match &cmd {
                // Preparing starts on the source: it marks its writable disks
                // with a token the destination must read back (storage_proof).
                Command::PrepareDestination => {
                    self.tokens += 1;
                    let token = format!("{:016x}-{:x}", self.settings.token_seed, self.tokens);
                    step = MigStep::MarkStorage {
                        token: token.clone(),
                    };
                    Some((source.clone(), AgentRequest::MarkStorage { name, token }))
                }
                Command::StartMirrors { nbd } => Some((
                    source.clone(),
                    AgentRequest::MirrorStorage {
                        name,
                        nbd: nbd.clone(),
                        targets: job.disks.iter().map(|d| d.target.clone()).collect(),
                        mode: job.params.copy_storage.unwrap_or(CopyMode::All),
                        bandwidth_mib_s: job.params.bandwidth_mib_s,
                    },
                )),
                Command::CompleteMirrors => {
                    Some((source.clone(), AgentRequest::CompleteMirrors { name }))
                }
                Command::ContinueSwitchover => {
                    Some((source.clone(), AgentRequest::ContinueSwitchover { name }))
                }
                Command::CancelMirrors => {
                    Some((source.clone(), AgentRequest::CancelMirrors { name }))
                }
                Command::SwitchToPostcopy => {
                    Some((source.clone(), AgentRequest::StartPostcopy { name }))
                }
                Command::CancelMigration => {
                    Some((source.clone(), AgentRequest::MigrateCancel { name }))
                }
                Command::FinishDestination => {
                    // An operator's suspend travels with the guest.
                    let paused = self
                        .hosts
                        .get(&source)
                        .is_some_and(|h| h.facts.vms.iter().any(|v| v.name == name && v.suspended));
                    Some((dest.clone(), AgentRequest::MigrateFinish { name, paused }))
                }
                Command::ResumeSource => Some((
                    source.clone(),
                    AgentRequest::Resume {
                        name,
                        operator: false,
                    },
                )),
                Command::QuitSource => Some((source.clone(), AgentRequest::Destroy { name })),
                Command::DestroyDestination => Some((dest.clone(), AgentRequest::Destroy { name })),
                _ => None,
            };
            // Record before acting: the records must name the source before
            // it runs the guest again (they may name the destination after a
            // switchover that was in doubt), so a coordinator that dies here
            // does not take the guest for lost.
            if matches!(cmd, Command::ResumeSource)
                && self.usage.host_of(vm) != Some(source.as_str())
                && self.record_placement(vm, Some(&source)).is_err()
            {
                tracing::error!(
                    vm,
                    "cannot record the source before resuming it; it stays paused"
                );
                continue;
            }
            let Some(job) = self.migrations.get_mut(vm) else {
                return;
            };
            if let Some((host, request)) = call {
                match self.hosts.get(&host).and_then(|h| h.conn) {
                    Some(conn) => {
                        job.step_in_flight = true;
                        self.call(
                            &host,
                            conn,
                            request,
                            Purpose::Migration {
                                vm: vm.to_string(),
                                step,
                            },
                        );
                    }
                    None => {
                        let failure = StepFailure::Lost(format!("host {host} is unreachable"));
                        if let Some(input) = cmd.failure_input(failure) {
                            let more = job.machine.handle(input, now);
                            self.run_commands(now, vm, more);
                        }
                    }
                }
                continue;
            }
            match cmd {
                Command::StartMigration { uri, params } => {
                    // As libvirt does: SPICE clients learn the destination before switchover.
                    job.client_infos = job
                        .dest_consoles
                        .iter()
                        .filter_map(|c| spice_target(&c.uri))
                        .collect();
                    job.start = Some((uri, params));
                    self.next_start_step(now, vm);
                }
                Command::RecordPlacement => {
                    let input = match self.record_placement(vm, Some(&dest)) {
                        Ok(()) => MigInput::Confirmed,
                        Err(e) => {
                            tracing::error!(vm, error = %e, "cannot record the new placement");
                            MigInput::RecordFailed(e.to_string())
                        }
                    };
                    self.feed_migration(now, vm, input);
                }
                Command::Report(Report::Outcome {
                    phase,
                    elapsed,
                    stats,
                }) => {
                    self.end_migration(now, vm, phase, elapsed, stats);
                    return;
                }
                _ => {}
            }
        }
    }

    /// The next step of starting the stream: a SPICE client to tell, or `migrate`.
    fn next_start_step(&mut self, now: Instant, vm: &str) {
        let Some(job) = self.migrations.get_mut(vm) else {
            return;
        };
        let source = job.source.clone();
        let (request, step) = match job.client_infos.pop_front() {
            Some((hostname, port)) => (
                AgentRequest::ClientMigrateInfo {
                    name: vm.to_string(),
                    hostname,
                    port,
                },
                MigStep::ClientInfo,
            ),
            None => {
                let Some((uri, params)) = job.start.take() else {
                    return;
                };
                // Until `migrate` is answered, a poll reads the status of
                // whatever migration this QEMU ran before.
                job.streaming = false;
                (
                    AgentRequest::MigrateOut {
                        name: vm.to_string(),
                        uri: uri.clone(),
                        max_downtime_ms: params.max_downtime_ms,
                        bandwidth_mib_s: params.bandwidth_mib_s,
                        auto_converge: params.auto_converge,
                        postcopy: params.postcopy,
                    },
                    MigStep::Command(Command::StartMigration { uri, params }),
                )
            }
        };
        match self.hosts.get(&source).and_then(|h| h.conn) {
            Some(conn) => {
                job.step_in_flight = true;
                self.call(
                    &source,
                    conn,
                    request,
                    Purpose::Migration {
                        vm: vm.to_string(),
                        step,
                    },
                )
            }
            None => {
                let e = format!("host {source} is unreachable");
                self.feed_migration(now, vm, MigInput::SourceFailed(e));
            }
        }
    }

    fn poll_migration(&mut self, now: Instant, vm: &str) {
        let Some(job) = self.migrations.get_mut(vm) else {
            return;
        };
        if !matches!(
            job.machine.phase(),
            Phase::Mirroring | Phase::Performing | Phase::Aborting { .. }
        ) || job.poll_in_flight
            || !job.streaming
            || now < job.next_poll
        {
            return;
        }
        job.poll_in_flight = true;
        job.polls = job.polls.wrapping_add(1);
        let check_dest = job.polls.is_multiple_of(DEST_CHECK_EVERY);
        let (source, dest) = (job.source.clone(), job.dest.clone());
        if check_dest {
            if let Some(conn) = self.hosts.get(&dest).and_then(|h| h.conn) {
                self.call(
                    &dest,
                    conn,
                    AgentRequest::MigrationStatus {
                        name: vm.to_string(),
                    },
                    Purpose::Migration {
                        vm: vm.to_string(),
                        step: MigStep::PollDest,
                    },
                );
            }
        }
        match self.hosts.get(&source).and_then(|h| h.conn) {
            Some(conn) => self.call(
                &source,
                conn,
                AgentRequest::MigrationStatus {
                    name: vm.to_string(),
                },
                Purpose::Migration {
                    vm: vm.to_string(),
                    step: MigStep::PollSource,
                },
            ),
            None => {
                if let Some(job) = self.migrations.get_mut(vm) {
                    job.poll_in_flight = false;
                }
                let e = format!("host {source} is unreachable");
                self.feed_migration(now, vm, MigInput::SourceFailed(e));
            }
        }
    }

    fn end_migration(
        &mut self,
        now: Instant,
        vm: &str,
        phase: Phase,
        elapsed: Duration,
        stats: Option<MigrationProgress>,
    ) {
        let Some(job) = self.migrations.remove(vm) else {
            return;
        };
        // Settled at once: a completed migration (the destination runs the
        // guest; the source holds at most a paused copy), or one whose
        // destination never got the whole guest. Then the VM can be stopped.
        let settled = phase == Phase::Completed
            || (!phase.on_destination() && !job.machine.reached_switchover());
        if settled && self.store.set_migrating_to(vm, None).is_ok() {
            if let Some(v) = self.vms.get_mut(vm) {
                v.pending_dest = None;
            }
        }
        let on = if phase.on_destination() {
            job.dest.clone()
        } else {
            job.source.clone()
        };
        if phase == Phase::Completed {
            self.usage.relocate(vm, &on);
            // Until the next reports arrive, reflect the move at once: the VM
            // runs on `on` and nowhere else. Its pid and consoles there are
            // the destination's to report.
            let moved = self
                .hosts
                .get(&job.source)
                .and_then(|h| h.facts.vms.iter().find(|v| v.name == vm).cloned());
            self.set_reported(&job.source, None, vm);
            // The destination's last report may still show its incoming
            // half (`inmigrate`, `paused`): it runs the guest now.
            let there = self
                .hosts
                .get(&on)
                .and_then(|h| h.facts.vms.iter().find(|x| x.name == vm).cloned());
            let summary = match (there, moved) {
                (Some(t), _) => Some(VmSummary {
                    suspended: false,
                    state: VmRunState::Running,
                    ..t
                }),
                (None, Some(v)) => Some(VmSummary {
                    suspended: false,
                    pid: 0,
                    state: VmRunState::Running,
                    consoles: Vec::new(),
                    ..v
                }),
                (None, None) => None,
            };
            if let Some(summary) = summary {
                self.set_reported(&on, Some(summary), vm);
            }
        }
        if matches!(phase, Phase::InDoubt { .. }) {
            // The records still name the source; the guest belongs to the
            // destination. Both hosts' next reports say what each holds.
            let _ = self.record_placement(vm, Some(&on));
        }
        if self.usage.host_of(vm) != Some(on.as_str()) {
            // A taken-over switchover may end on the half the records did not name.
            let _ = self.record_placement(vm, Some(&on));
        }
        self.set_life(vm, VmLifecycle::Running { host: on.clone() });
        let (outcome, metric) = match &phase {
            Phase::Completed => (MigrationOutcome::Completed, "completed"),
            Phase::Aborted { reason } => (
                MigrationOutcome::Aborted {
                    reason: reason.clone(),
                },
                "aborted",
            ),
            Phase::Failed { reason } => (
                MigrationOutcome::Failed {
                    reason: reason.clone(),
                },
                "failed",
            ),
            Phase::InDoubt { reason } => (
                MigrationOutcome::InDoubt {
                    reason: reason.clone(),
                },
                "in-doubt",
            ),
            // Not terminal: end_migration is only called with an outcome.
            other => (
                MigrationOutcome::Failed {
                    reason: format!("ended in {other:?}"),
                },
                "failed",
            ),
        };
        let word = outcome.to_string();
        let elapsed_ms = elapsed.as_millis() as u64;
        tracing::info!(vm, outcome = %word, elapsed_ms, "migration ended");
        self.emit(format!(
            "vm {vm} migration {word} after {:.2}s; runs on {on}",
            elapsed_ms as f64 / 1000.0
        ));
        self.effects.push(Effect::Metric(Metric::Migration(metric)));
        if phase == Phase::Completed {
            self.note_placement(vm, format!("migrated from {} to {on}", job.source));
            self.effects.push(Effect::Moved {
                vm: vm.to_string(),
                from: job.source.clone(),
                to: on.clone(),
            });
        }
        match job.owner {
            Owner::Operator(id) => self.reply(
                id,
                OperatorResponse::Migrated {
                    name: vm.to_string(),
                    from: job.source,
                    on,
                    outcome,
                    elapsed_ms,
                    stats,
                },
            ),
            Owner::Recovery => {}
            Owner::Drain(id) => {
                let result = if phase == Phase::Completed {
                    Ok((on, elapsed_ms))
                } else {
                    Err(word)
                };
                self.drain_result(now, id, vm, result);
            }
        }
    }

    // ------------------------------------------------------------ replies

    fn replied(
        &mut self,
        now: Instant,
        call: CallId,
        result: Result<(u64, AgentResponse), String>,
    ) {
        let Some(pending) = self.calls.remove(&call) else {
            return;
        };
        let PendingCall {
            host,
            conn,
            purpose,
        } = pending;
        // A call that got no answer on a connection still thought alive: close
        // it, so the host's next registration says what really happened.
        if let Err(e) = &result {
            if self.hosts.get(&host).is_some_and(|h| h.conn == Some(conn)) {
                tracing::warn!(host = %host, error = %e, "no answer; closing the connection");
                if let Some(h) = self.hosts.get_mut(&host) {
                    h.conn = None;
                }
                self.touch(&host);
                self.effects.push(Effect::Close {
                    host: host.clone(),
                    conn,
                });
                self.log_host_transition(&host, now);
            }
        }
        match purpose {
            Purpose::Start {
                op,
                vm,
                sent,
                explanation,
                restart,
            } => {
                let owner = StartOwner { op, restart };
                self.start_replied(now, owner, &vm, &host, conn, sent, explanation, result)
            }
            Purpose::Stop { op, vm } => self.stop_replied(op, &vm, &host, conn, result),
            Purpose::Ask { op, ask } => {
                let r = match (ask, result) {
                    (_, Err(detail)) => {
                        OperatorResponse::Error(OperatorError::NoAnswer { host, detail })
                    }
                    (_, Ok((_, AgentResponse::Error(message)))) => {
                        OperatorResponse::Error(OperatorError::Agent { host, message })
                    }
                    (
                        Ask::LiveXml {
                            security_info: true,
                        },
                        Ok((_, AgentResponse::Xml(x))),
                    ) => OperatorResponse::Xml(x),
                    (Ask::LiveXml { .. }, Ok((_, AgentResponse::Xml(x)))) => {
                        shown_xml(&x, XmlFlavor::Live)
                    }
                    (Ask::Display, Ok((_, AgentResponse::Consoles(consoles)))) => {
                        OperatorResponse::Consoles { host, consoles }
                    }
                    (Ask::Networks, Ok((_, AgentResponse::Networks { networks, .. }))) => {
                        OperatorResponse::Networks { host, networks }
                    }
                    (Ask::Done { message }, Ok((_, AgentResponse::Done(_)))) => {
                        OperatorResponse::Done(message)
                    }
                    (
                        Ask::Pause {
                            message,
                            vm,
                            paused,
                        },
                        Ok((_, AgentResponse::Done(_))),
                    ) => {
                        if let Some(v) = self
                            .hosts
                            .get_mut(&host)
                            .and_then(|h| h.facts.vms.iter_mut().find(|v| v.name == vm))
                        {
                            v.suspended = paused;
                        }
                        OperatorResponse::Done(message)
                    }
                    (Ask::GuestInterfaces, Ok((_, AgentResponse::GuestInterfaces(interfaces)))) => {
                        OperatorResponse::GuestInterfaces { host, interfaces }
                    }
                    (_, Ok((_, other))) => OperatorResponse::Error(
                        OperatorError::UnexpectedAnswer(format!("{other:?}")),
                    ),
                };
                self.reply(op, r);
            }
            Purpose::Cleanup { vm } => {
                self.repaired(&vm);
                // Gone from there (destroyed, or "not running"): a report
                // numbered before this answer must not bring it back.
                if let Ok((seq, _)) = result {
                    self.fence(&host, conn, &vm, seq);
                    self.set_reported(&host, None, &vm);
                }
            }
            Purpose::Resume { vm } => {
                self.repaired(&vm);
                if let Ok((seq, AgentResponse::Done(_))) = result {
                    self.fence(&host, conn, &vm, seq);
                    self.mark_running(&host, &vm);
                }
            }
            Purpose::Migration { vm, step } => {
                self.migration_replied(now, &vm, &host, conn, step, result)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_replied(
        &mut self,
        now: Instant,
        owner: StartOwner,
        vm: &str,
        host: &str,
        conn: ConnId,
        sent: Instant,
        explanation: String,
        result: Result<(u64, AgentResponse), String>,
    ) {
        match result {
            Ok((
                seq,
                AgentResponse::Started {
                    vm: summary,
                    warnings,
                    ..
                },
            )) => {
                self.fence(host, conn, vm, seq);
                let consoles = summary.consoles.clone();
                self.set_reported(host, Some(summary), vm);
                self.set_life(
                    vm,
                    VmLifecycle::Running {
                        host: host.to_string(),
                    },
                );
                tracing::info!(vm, host, "started");
                if let Some(v) = self.vms.get_mut(vm) {
                    v.pending_restart = None;
                }
                match &owner.restart {
                    Some((cause, since)) => {
                        let secs = now.saturating_duration_since(*since).as_secs_f64();
                        self.emit(format!(
                            "vm {vm} restarted on {host}: {cause} {secs:.1}s before \
                             (ranked: {explanation})"
                        ));
                        self.note_placement(
                            vm,
                            format!("restarted on {host}: {cause} (ranked: {explanation})"),
                        );
                        self.effects
                            .push(Effect::Metric(Metric::HaRestartSeconds(secs)));
                    }
                    None => {
                        self.emit(format!("vm {vm} started on {host} (ranked: {explanation})"));
                        self.note_placement(
                            vm,
                            format!("started on {host} (ranked: {explanation})"),
                        );
                    }
                }
                self.effects.push(Effect::Metric(Metric::Start("ok")));
                self.effects.push(Effect::Metric(Metric::StartSeconds(
                    now.saturating_duration_since(sent).as_secs_f64(),
                )));
                self.reply_to(
                    owner.op,
                    OperatorResponse::Started {
                        name: vm.to_string(),
                        host: host.to_string(),
                        consoles,
                        explanation: format!("ranked: {explanation}"),
                        warnings,
                    },
                );
            }
            Err(e) => {
                // It may have started: it stays recorded there, and the host's
                // next registration (its connection is closed) says.
                self.set_life(
                    vm,
                    VmLifecycle::Running {
                        host: host.to_string(),
                    },
                );
                tracing::warn!(vm, host, error = %e, "start unanswered");
                self.emit(format!("vm {vm} start on {host} unanswered: {e}"));
                self.effects.push(Effect::Metric(Metric::Start("error")));
                self.reply_to(
                    owner.op,
                    OperatorResponse::Error(OperatorError::StartUnanswered {
                        name: vm.to_string(),
                        host: host.to_string(),
                        detail: e,
                    }),
                );
            }
            Ok((seq, other)) => {
                self.fence(host, conn, vm, seq);
                let msg = match other {
                    AgentResponse::Error(e) => e,
                    r => format!("unexpected answer {r:?}"),
                };
                // An HA restart that failed is still owed: it stays wanted.
                let placed = match owner.restart {
                    Some(_) => self
                        .store
                        .set_placement(vm, None, true)
                        .map(|_| self.usage.set(vm, None)),
                    None => self.record_placement(vm, None),
                };
                if placed.is_ok() {
                    self.set_life(vm, VmLifecycle::ShutOff);
                    if owner.restart.is_some() {
                        if let Some(v) = self.vms.get_mut(vm) {
                            v.pending_restart = Some(format!("failed to start on {host}: {msg}"));
                        }
                    }
                } else {
                    self.set_life(
                        vm,
                        VmLifecycle::Running {
                            host: host.to_string(),
                        },
                    );
                }
                tracing::warn!(vm, host, error = %msg, "start failed");
                self.emit(format!("vm {vm} failed to start on {host}: {msg}"));
                self.effects.push(Effect::Metric(Metric::Start("error")));
                let e = OperatorError::Agent {
                    host: host.to_string(),
                    message: msg,
                };
                self.reply_to(owner.op, OperatorResponse::Error(e));
            }
        }
    }

    fn stop_replied(
        &mut self,
        op: RequestId,
        vm: &str,
        host: &str,
        conn: ConnId,
        result: Result<(u64, AgentResponse), String>,
    ) {
        let r = match result {
            Ok((seq, AgentResponse::Done(msg))) => {
                self.fence(host, conn, vm, seq);
                tracing::info!(vm, host, reason = %msg, "stopped");
                self.emit(format!("vm {vm} stopped on {host}: {msg}"));
                self.set_reported(host, None, vm);
                match self.record_placement(vm, None) {
                    Ok(()) => {
                        self.set_life(vm, VmLifecycle::ShutOff);
                        // The operator stopped it: HA owes it nothing.
                        if let Some(v) = self.vms.get_mut(vm) {
                            v.pending_restart = None;
                        }
                        OperatorResponse::Done(msg)
                    }
                    Err(e) => {
                        // It is gone; the next report records that.
                        self.set_life(
                            vm,
                            VmLifecycle::Running {
                                host: host.to_string(),
                            },
                        );
                        OperatorResponse::Error(OperatorError::StoppedUnrecorded {
                            message: msg,
                            store: e.to_string(),
                        })
                    }
                }
            }
            Ok((seq, other)) => {
                self.fence(host, conn, vm, seq);
                self.set_life(
                    vm,
                    VmLifecycle::Running {
                        host: host.to_string(),
                    },
                );
                match other {
                    AgentResponse::Error(message) => {
                        OperatorResponse::Error(OperatorError::Agent {
                            host: host.to_string(),
                            message,
                        })
                    }
                    r => OperatorResponse::Error(OperatorError::UnexpectedAnswer(format!(
                        "from host {host}: {r:?}"
                    ))),
                }
            }
            Err(e) => {
                self.set_life(
                    vm,
                    VmLifecycle::Running {
                        host: host.to_string(),
                    },
                );
                OperatorResponse::Error(OperatorError::NoAnswer {
                    host: host.to_string(),
                    detail: e,
                })
            }
        };
        self.reply(op, r);
    }

    fn migration_replied(
        &mut self,
        now: Instant,
        vm: &str,
        host: &str,
        conn: ConnId,
        step: MigStep,
        result: Result<(u64, AgentResponse), String>,
    ) {
        if let Ok((seq, _)) = &result {
            if !matches!(step, MigStep::PollSource | MigStep::PollDest) {
                self.fence(host, conn, vm, *seq);
            }
        }
        let failure = match &result {
            Ok((_, AgentResponse::Error(e))) => Some(StepFailure::Refused(e.clone())),
            Err(e) => Some(StepFailure::Lost(e.clone())),
            Ok(_) => None,
        };
        if matches!(step, MigStep::Command(_) | MigStep::ClientInfo) {
            if let Some(job) = self.migrations.get_mut(vm) {
                job.step_in_flight = false;
            }
        }
        match step {
            MigStep::MarkStorage { token } => {
                let prepare = Command::PrepareDestination;
                if let (Ok((_, AgentResponse::StorageMarked(disks))), Some(job)) =
                    (&result, self.migrations.get_mut(vm))
                {
                    job.disks = disks.clone();
                }
                let sent = match failure {
                    Some(f) => Err(f),
                    None => self.ask_destination(vm, token),
                };
                if let Err(f) = sent {
                    if let Some(job) = self.migrations.get_mut(vm) {
                        job.step_in_flight = false;
                    }
                    if let Some(input) = prepare.failure_input(f) {
                        self.feed_migration(now, vm, input);
                    }
                    self.pump(now, vm);
                }
            }
            MigStep::PollDest => {
                if let Some(f) = failure {
                    let e = match f {
                        StepFailure::Refused(e) | StepFailure::Lost(e) => e,
                    };
                    self.feed_migration(now, vm, MigInput::DestinationLost(e));
                }
            }
            MigStep::PollSource => {
                if let Some(job) = self.migrations.get_mut(vm) {
                    job.poll_in_flight = false;
                    job.next_poll = now + MIGRATION_POLL;
                    self.effects.push(Effect::WakeAt(now + MIGRATION_POLL));
                }
                let mirroring = self
                    .migrations
                    .get(vm)
                    .is_some_and(|j| *j.machine.phase() == Phase::Mirroring);
                let input = match result {
                    // No stream yet: the status is an earlier migration's.
                    Ok((_, AgentResponse::Migration(p))) if mirroring => MigInput::Progress(p),
                    Ok((_, AgentResponse::Migration(p))) => match p.status.as_str() {
                        "completed" => MigInput::SourceCompleted(p),
                        "failed" => MigInput::SourceFailed(
                            p.error.clone().unwrap_or_else(|| "failed".into()),
                        ),
                        "cancelled" => MigInput::SourceFailed("cancelled".into()),
                        _ => MigInput::Progress(p),
                    },
                    Ok((_, AgentResponse::Error(e))) | Err(e) => MigInput::SourceFailed(e),
                    Ok((_, other)) => {
                        MigInput::SourceFailed(format!("unexpected answer {other:?}"))
                    }
                };
                self.feed_migration(now, vm, input);
            }
            MigStep::ClientInfo => match failure {
                Some(f) => {
                    let cmd = Command::StartMigration {
                        uri: String::new(),
                        params: MigrationParams::default(),
                    };
                    if let Some(input) = cmd.failure_input(f) {
                        self.feed_migration(now, vm, input);
                    }
                }
                None => self.next_start_step(now, vm),
            },
            MigStep::Command(cmd) => {
                let input = match (failure, &cmd, result) {
                    (Some(f), _, _) => cmd.failure_input(f),
                    (
                        None,
                        Command::PrepareDestination,
                        Ok((
                            _,
                            AgentResponse::Incoming {
                                uri,
                                vm: summary,
                                nbd,
                            },
                        )),
                    ) => {
                        if let Some(job) = self.migrations.get_mut(vm) {
                            job.dest_consoles = summary.consoles;
                        }
                        Some(MigInput::Prepared { uri, nbd })
                    }
                    (None, Command::PrepareDestination, Ok((_, other))) => Some(
                        MigInput::PrepareFailed(format!("unexpected answer {other:?}")),
                    ),
                    (None, Command::StartMirrors { .. }, _) => {
                        if let Some(job) = self.migrations.get_mut(vm) {
                            job.streaming = true;
                            job.next_poll = now + MIGRATION_POLL;
                            self.effects.push(Effect::WakeAt(now + MIGRATION_POLL));
                        }
                        Some(MigInput::MirrorsStarted)
                    }
                    (None, Command::StartMigration { .. }, _) => {
                        if let Some(job) = self.migrations.get_mut(vm) {
                            job.streaming = true;
                            job.next_poll = now + MIGRATION_POLL;
                            self.effects.push(Effect::WakeAt(now + MIGRATION_POLL));
                        }
                        None
                    }
                    (None, Command::FinishDestination, _) => Some(MigInput::Finished),
                    // (The source's report moves to the destination when
                    // the migration ends: `end_migration`.)
                    (None, Command::QuitSource, _) => Some(MigInput::SourceQuit),
                    // Gone from there: until that host reports again, no
                    // decision may count on the copy its last report listed
                    // (a take-over once finished on a destroyed destination).
                    (None, Command::DestroyDestination, _) => {
                        self.set_reported(host, None, vm);
                        Some(MigInput::DestinationDestroyed)
                    }
                    (None, Command::ResumeSource, _) => {
                        self.mark_running(host, vm);
                        None
                    }
                    (None, _, _) => None,
                };
                if let Some(input) = input {
                    self.feed_migration(now, vm, input);
                }
                self.pump(now, vm);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    const XML: &str = "<domain type='kvm'><name>web</name>\
        <uuid>6f3c1a52-2f4e-4a59-9d3e-5a0c2b9d1e11</uuid>\
        <memory unit='MiB'>512</memory><vcpu>1</vcpu>\
        <os><type arch='x86_64' machine='pc'>hvm</type></os></domain>";

    struct Rig {
        core: FleetCore,
        store: Arc<MemStore>,
        t0: Instant,
        next_op: RequestId,
    }

    fn facts(host: &str, vms: &[(&str, VmRunState)]) -> HostFacts {
        HostFacts {
            host: host.into(),
            cpus: 4,
            memory_mib: 4096,
            networks: Vec::new(),
            vms: vms
                .iter()
                .map(|(n, s)| VmSummary {
                    suspended: false,
                    name: n.to_string(),
                    uuid: String::new(),
                    pid: 1,
                    state: *s,
                    consoles: Vec::new(),
                    incarnation: 0,
                    ha: false,
                })
                .collect(),
            machine_types: MachineTypes {
                names: vec!["pc-i440fx-10.0".into(), "pc-i440fx-9.2".into()],
                aliases: vec![("pc".into(), "pc-i440fx-10.0".into())],
                ..Default::default()
            },
            fence: Default::default(),
        }
    }

    fn migrate_web_to_b() -> OperatorRequest {
        migrate_web_to("b")
    }

    fn migrate_web_to(host: &str) -> OperatorRequest {
        OperatorRequest::Migrate {
            name: "web".into(),
            to: Some(host.into()),
            max_downtime_ms: None,
            bandwidth_mib_s: None,
            auto_converge: false,
            postcopy: false,
            timeout_secs: None,
            copy_storage: None,
            allow_unsafe: false,
        }
    }

    impl Rig {
        fn new() -> Rig {
            let store = Arc::new(MemStore::default());
            let core = FleetCore::new(
                store.clone(),
                FleetSettings {
                    heartbeat: Duration::from_secs(1),
                    heartbeat_timeout: Duration::from_secs(5),
                    policy: Policy::default(),
                    token_seed: 7,
                    fencing: Default::default(),
                    epoch: 0,
                },
            )
            .expect("core")
            .without_stopwatch();
            Rig {
                core,
                store,
                t0: Instant::now(),
                next_op: 1,
            }
        }

        /// `web` defined and running on host a; host b registered and empty.
        fn web_on_a_and_b_free() -> Rig {
            let mut r = Rig::new();
            r.register("a", 1, &[]);
            r.define();
            r.start(1);
            r.register("b", 2, &[]);
            r
        }

        fn register(&mut self, host: &str, conn: ConnId, vms: &[(&str, VmRunState)]) {
            let input = Input::Register {
                host: host.into(),
                facts: facts(host, vms),
                conn,
            };
            self.core.handle(self.t0, input);
        }

        fn op(&mut self, request: OperatorRequest) -> (RequestId, Vec<Effect>) {
            let id = self.next_op;
            self.next_op += 1;
            (
                id,
                self.core.handle(self.t0, Input::Operator { id, request }),
            )
        }

        fn answer(id: RequestId, effects: &[Effect]) -> Option<&OperatorResponse> {
            effects.iter().find_map(|e| match e {
                Effect::Reply { id: i, response } if *i == id => Some(response),
                _ => None,
            })
        }

        fn calls(effects: &[Effect]) -> Vec<(CallId, String, AgentRequest)> {
            effects
                .iter()
                .filter_map(|e| match e {
                    Effect::Call {
                        call,
                        host,
                        request,
                        ..
                    } => Some((*call, host.clone(), request.clone())),
                    _ => None,
                })
                .collect()
        }

        fn define(&mut self) {
            let (id, out) = self.op(OperatorRequest::Define {
                xml: XML.into(),
                source: "web.xml".into(),
            });
            assert!(matches!(
                Rig::answer(id, &out),
                Some(OperatorResponse::Defined { .. })
            ));
        }

        /// Starts `web` on the one registered host; returns the reply's effects.
        fn start(&mut self, seq: u64) -> Vec<Effect> {
            let (id, out) = self.op(OperatorRequest::Start {
                name: "web".into(),
                host: None,
            });
            let (call, _, _) = Rig::calls(&out).pop().expect("a start call");
            let started = AgentResponse::Started {
                vm: facts("a", &[("web", VmRunState::Running)]).vms.remove(0),
                live_xml: String::new(),
                warnings: Vec::new(),
            };
            let out = self.core.handle(
                self.t0,
                Input::AgentReplied {
                    call,
                    result: Ok((seq, started)),
                },
            );
            assert!(matches!(
                Rig::answer(id, &out),
                Some(OperatorResponse::Started { .. })
            ));
            out
        }
    }

    #[test]
    fn a_placement_is_recorded_before_the_start_is_sent() {
        let mut r = Rig::new();
        r.register("a", 1, &[]);
        r.define();
        let (_, out) = r.op(OperatorRequest::Start {
            name: "web".into(),
            host: None,
        });
        assert_eq!(Rig::calls(&out).len(), 1, "{out:?}");
        let row = r.store.get("web").expect("read").expect("row");
        assert_eq!(
            row.placement.as_deref(),
            Some("a"),
            "recorded when the call leaves"
        );
        let life: Vec<_> = r.core.lifecycles().collect();
        assert_eq!(
            life,
            vec![("web", &VmLifecycle::Starting { host: "a".into() })]
        );
    }

    #[test]
    fn refusals_are_typed() {
        let mut r = Rig::new();
        r.register("a", 1, &[]);
        let (id, out) = r.op(OperatorRequest::Start {
            name: "nope".into(),
            host: None,
        });
        assert_eq!(
            Rig::answer(id, &out),
            Some(&OperatorResponse::Error(OperatorError::NoSuchDomain {
                name: "nope".into()
            }))
        );
        r.define();
        r.start(1);
        let (id, out) = r.op(OperatorRequest::Undefine { name: "web".into() });
        assert_eq!(
            Rig::answer(id, &out),
            Some(&OperatorResponse::Error(OperatorError::StillRunning {
                name: "web".into()
            }))
        );
        let (id, out) = r.op(OperatorRequest::Start {
            name: "web".into(),
            host: None,
        });
        assert_eq!(
            Rig::answer(id, &out),
            Some(&OperatorResponse::Error(OperatorError::RunningOn {
                name: "web".into(),
                host: "a".into()
            }))
        );
        let (id, out) = r.op(OperatorRequest::MigrateAbort { name: "web".into() });
        assert_eq!(
            Rig::answer(id, &out),
            Some(&OperatorResponse::Error(OperatorError::NoMigration {
                name: "web".into()
            }))
        );
        // Post-copy would run the guest before its copied disks are in sync.
        let mut both = migrate_web_to_b();
        if let OperatorRequest::Migrate {
            postcopy,
            copy_storage,
            ..
        } = &mut both
        {
            *postcopy = true;
            *copy_storage = Some(CopyMode::All);
        }
        let (id, out) = r.op(both);
        assert_eq!(
            Rig::answer(id, &out),
            Some(&OperatorResponse::Error(OperatorError::Incompatible {
                first: "--postcopy".into(),
                second: "--copy-storage-all".into()
            }))
        );
    }

    #[test]
    fn define_stores_generated_macs_refuses_fe_and_warns_of_pinned_devices() {
        let mut r = Rig::new();
        let nics =
            |devices: &str| XML.replace("</os>", &format!("</os><devices>{devices}</devices>"));
        let define = |r: &mut Rig, xml: String| {
            let (id, out) = r.op(OperatorRequest::Define {
                xml,
                source: "web.xml".into(),
            });
            Rig::answer(id, &out).cloned()
        };
        let answer = define(
            &mut r,
            nics(
                "<interface type='network'><source network='public'/></interface>\
                  <interface type='bridge'><source bridge='br7'/></interface>",
            ),
        );
        let Some(OperatorResponse::Defined { warnings, .. }) = answer else {
            panic!("{answer:?}");
        };
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("pins the host-specific bridge br7"),
            "{warnings:?}"
        );
        let stored = r.store.get("web").expect("read").expect("row").xml;
        let first = Domain::parse("s", &stored).expect("parse").model;
        let macs: Vec<_> = first.interfaces().filter_map(|i| i.mac.clone()).collect();
        assert_eq!(macs.len(), 2, "{stored}");
        assert!(macs.iter().all(|m| m.starts_with("52:54:00:")) && macs[0] != macs[1]);
        // A redefinition without MACs gets the same ones.
        define(
            &mut r,
            nics(
                "<interface type='network'><source network='public'/></interface>\
                  <interface type='bridge'><source bridge='br7'/></interface>",
            ),
        );
        let again = r.store.get("web").expect("read").expect("row").xml;
        assert_eq!(again, stored);
        // So does one without <uuid>: it keeps the stored UUID, and the MACs.
        define(
            &mut r,
            nics(
                "<interface type='network'><source network='public'/></interface>\
                  <interface type='bridge'><source bridge='br7'/></interface>",
            )
            .replace("<uuid>6f3c1a52-2f4e-4a59-9d3e-5a0c2b9d1e11</uuid>", ""),
        );
        let again = r.store.get("web").expect("read").expect("row").xml;
        assert_eq!(again, stored);
        // A reserved MAC is refused and the stored definition stays.
        let answer = define(
            &mut r,
            nics("<interface type='network'><mac address='fe:54:00:00:00:01'/><source network='public'/></interface>"),
        );
        assert!(
            matches!(&answer, Some(OperatorResponse::Error(OperatorError::InvalidDefinition(m))) if m.contains("reserved value 0xFE")),
            "{answer:?}"
        );
        assert_eq!(r.store.get("web").expect("read").expect("row").xml, stored);
    }

    #[test]
    fn define_stores_the_versioned_machine_type_behind_an_alias() {
        assert!(machine_version("pc-i440fx-10.0") > machine_version("pc-i440fx-9.2"));
        let mut r = Rig::new();
        r.register("a", 1, &[]);
        r.define();
        let stored = r.store.get("web").expect("read").expect("row").xml;
        assert!(stored.contains("machine=\"pc-i440fx-10.0\""), "{stored}");
        // Already versioned: kept as written, even where a newer type exists.
        let (id, out) = r.op(OperatorRequest::Define {
            xml: XML.replace("machine='pc'", "machine='pc-i440fx-9.2'"),
            source: "web.xml".into(),
        });
        assert!(matches!(
            Rig::answer(id, &out),
            Some(OperatorResponse::Defined { .. })
        ));
        let stored = r.store.get("web").expect("read").expect("row").xml;
        assert!(stored.contains("machine=\"pc-i440fx-9.2\""), "{stored}");
    }

    #[test]
    fn dumpxml_hides_console_passwords_without_security_info() {
        let mut r = Rig::new();
        r.register("a", 1, &[]);
        let xml = XML.replace(
            "</os>",
            "</os><devices><graphics type='vnc' passwd='s3cret'>\
             <listen type='address' address='127.0.0.1'/></graphics></devices>",
        );
        let (id, out) = r.op(OperatorRequest::Define {
            xml,
            source: "web.xml".into(),
        });
        assert!(matches!(
            Rig::answer(id, &out),
            Some(OperatorResponse::Defined { .. })
        ));
        let dump = |r: &mut Rig, security_info| {
            let (id, out) = r.op(OperatorRequest::DumpXml {
                name: "web".into(),
                live: false,
                security_info,
            });
            match Rig::answer(id, &out) {
                Some(OperatorResponse::Xml(x)) => x.clone(),
                other => panic!("{other:?}"),
            }
        };
        let hidden = dump(&mut r, false);
        assert!(
            !hidden.contains("s3cret") && hidden.contains("<graphics"),
            "{hidden}"
        );
        assert!(dump(&mut r, true).contains("passwd=\"s3cret\""));
        // The live XML from the host is filtered the same way.
        r.start(1);
        let (id, out) = r.op(OperatorRequest::DumpXml {
            name: "web".into(),
            live: true,
            security_info: false,
        });
        let (call, _, _) = Rig::calls(&out).pop().expect("asks the host");
        let live = dump(&mut r, true);
        let out = r.core.handle(
            r.t0,
            Input::AgentReplied {
                call,
                result: Ok((5, AgentResponse::Xml(live))),
            },
        );
        let Some(OperatorResponse::Xml(shown)) = Rig::answer(id, &out) else {
            panic!("{out:?}");
        };
        assert!(
            !shown.contains("s3cret") && shown.contains("127.0.0.1"),
            "{shown}"
        );
    }

    #[test]
    fn a_report_numbered_before_the_start_answer_does_not_undo_it() {
        let mut r = Rig::new();
        r.register("a", 1, &[]);
        r.define();
        r.start(5);
        // Numbered 4: gathered before the start took effect, delivered after.
        let stale = Input::Report {
            host: "a".into(),
            conn: 1,
            seq: 4,
            facts: facts("a", &[]),
        };
        r.core.handle(r.t0, stale);
        assert_eq!(
            r.store
                .get("web")
                .expect("read")
                .expect("row")
                .placement
                .as_deref(),
            Some("a")
        );
        // Numbered 6 and still without it: it really is gone.
        let fresh = Input::Report {
            host: "a".into(),
            conn: 1,
            seq: 6,
            facts: facts("a", &[]),
        };
        r.core.handle(r.t0, fresh);
        assert_eq!(
            r.store.get("web").expect("read").expect("row").placement,
            None
        );
    }

    #[test]
    fn an_unanswered_start_stays_recorded_and_the_connection_is_closed() {
        let mut r = Rig::new();
        r.register("a", 1, &[]);
        r.define();
        let (id, out) = r.op(OperatorRequest::Start {
            name: "web".into(),
            host: None,
        });
        let (call, _, _) = Rig::calls(&out).pop().expect("call");
        let out = r.core.handle(
            r.t0,
            Input::AgentReplied {
                call,
                result: Err("timed out".into()),
            },
        );
        assert_eq!(
            Rig::answer(id, &out),
            Some(&OperatorResponse::Error(OperatorError::StartUnanswered {
                name: "web".into(),
                host: "a".into(),
                detail: "timed out".into()
            }))
        );
        assert!(out.contains(&Effect::Close {
            host: "a".into(),
            conn: 1
        }));
        // It may run there: a start elsewhere is refused until the host reports.
        let (id, out) = r.op(OperatorRequest::Start {
            name: "web".into(),
            host: None,
        });
        assert_eq!(
            Rig::answer(id, &out),
            Some(&OperatorResponse::Error(
                OperatorError::RecordedOnUnreachable {
                    name: "web".into(),
                    host: "a".into()
                }
            ))
        );
        // The host's next registration settles it.
        r.register("a", 2, &[("web", VmRunState::Running)]);
        let life: Vec<_> = r.core.lifecycles().collect();
        assert_eq!(
            life,
            vec![("web", &VmLifecycle::Running { host: "a".into() })]
        );
    }

    #[test]
    fn a_migration_records_its_destination_before_the_destination_hears_of_it() {
        let mut r = Rig::web_on_a_and_b_free();
        let (_, out) = r.op(migrate_web_to_b());
        // The source marks its storage first; the destination then gets the
        // token to read back.
        let calls = Rig::calls(&out);
        let [(call, h, AgentRequest::MarkStorage { token, .. })] = &calls[..] else {
            panic!("{calls:?}");
        };
        assert_eq!(h, "a");
        let row = r.store.get("web").expect("read").expect("row");
        assert_eq!(row.migrating_to.as_deref(), Some("b"));
        assert_eq!(row.placement.as_deref(), Some("a"));
        let marked = Input::AgentReplied {
            call: *call,
            result: Ok((2, AgentResponse::Done("1 disk(s) marked".into()))),
        };
        let calls = Rig::calls(&r.core.handle(r.t0, marked));
        assert!(
            matches!(&calls[..], [(_, h, AgentRequest::MigrateIncoming { storage_token: Some(t), .. })]
                if h == "b" && t == token),
            "{calls:?}"
        );
    }

    #[test]
    fn a_source_that_cannot_mark_its_storage_fails_the_migration_before_it_starts() {
        let mut r = Rig::web_on_a_and_b_free();
        let (id, out) = r.op(migrate_web_to_b());
        let (call, _, _) = Rig::calls(&out).pop().expect("mark storage");
        let refused = Input::AgentReplied {
            call,
            result: Ok((
                2,
                AgentResponse::Error("cannot mark the storage: disk full".into()),
            )),
        };
        let out = r.core.handle(r.t0, refused);
        assert!(Rig::calls(&out).is_empty(), "{out:?}");
        let answer = Rig::answer(id, &out);
        assert!(
            matches!(answer, Some(OperatorResponse::Migrated { outcome: MigrationOutcome::Failed { .. }, on, .. }) if on == "a"),
            "{answer:?}"
        );
        let row = r.store.get("web").expect("read").expect("row");
        assert_eq!(row.migrating_to, None);
    }

    #[test]
    fn a_completed_migration_is_settled_at_once() {
        let mut r = Rig::web_on_a_and_b_free();
        let (id, out) = r.op(migrate_web_to_b());
        // Walk the steps: prepare, migrate, poll completed, finish, quit.
        let mut out = out;
        let mut done = None;
        for step in 1..20u64 {
            let now = r.t0 + Duration::from_secs(step);
            let calls = Rig::calls(&out);
            if calls.is_empty() {
                out = r.core.handle(now, Input::Tick);
                continue;
            }
            let mut next = Vec::new();
            for (call, _, request) in calls {
                let response = match request {
                    AgentRequest::MigrateIncoming { .. } => AgentResponse::Incoming {
                        vm: facts("b", &[("web", VmRunState::InMigrate)]).vms.remove(0),
                        uri: "tcp:b:49152".into(),
                        nbd: None,
                    },
                    AgentRequest::MigrationStatus { .. } => {
                        AgentResponse::Migration(MigrationProgress {
                            status: "completed".into(),
                            ..MigrationProgress::default()
                        })
                    }
                    _ => AgentResponse::Done("ok".into()),
                };
                let incoming = matches!(response, AgentResponse::Incoming { .. });
                let input = Input::AgentReplied {
                    call,
                    result: Ok((10, response)),
                };
                next.extend(r.core.handle(now, input));
                if incoming {
                    // b's heartbeat shows its incoming half, as a real one does.
                    let report = Input::Report {
                        host: "b".into(),
                        conn: 2,
                        seq: 11,
                        facts: facts("b", &[("web", VmRunState::InMigrate)]),
                    };
                    next.extend(r.core.handle(now, report));
                }
            }
            if let Some(resp) = Rig::answer(id, &next) {
                done = Some(resp.clone());
                // A scrape right after the reply sees the migration over.
                let in_progress = next.iter().rev().find_map(|e| match e {
                    Effect::Metric(Metric::Gauges { migrations, .. }) => Some(*migrations),
                    _ => None,
                });
                assert_eq!(in_progress, Some(0), "{next:?}");
                break;
            }
            out = next;
        }
        assert!(
            matches!(
                done,
                Some(OperatorResponse::Migrated {
                    outcome: MigrationOutcome::Completed,
                    ..
                })
            ),
            "{done:?}"
        );
        assert_eq!(
            r.store.get("web").expect("read").expect("row").migrating_to,
            None
        );
        // Listed as running on the destination at once, not shut off until
        // the destination's next report (the demo once showed that).
        let (id, out) = r.op(OperatorRequest::List { all: true });
        let Some(OperatorResponse::Vms(vms)) = Rig::answer(id, &out) else {
            panic!("{out:?}");
        };
        assert_eq!(
            (vms[0].state.as_str(), vms[0].host.as_deref()),
            ("running", Some("b"))
        );
        // And it can move on at once, though b's last report showed its
        // incoming half (the web console test once migrated back within
        // that window and was told the guest did not run).
        let (id, out) = r.op(migrate_web_to("a"));
        assert!(
            Rig::answer(id, &out).is_none(),
            "sent, not refused: {out:?}"
        );
        assert_eq!(Rig::calls(&out).len(), 1);
    }

    #[test]
    fn a_coordinator_restarted_mid_switchover_finishes_it_destination_first() {
        let mut r = Rig::new();
        r.register("a", 1, &[]);
        r.define();
        r.start(1);
        r.store
            .set_migrating_to("web", Some("b".into()))
            .expect("record");
        // A new coordinator over the same store; the source completed, the
        // destination holds the guest paused.
        let mut core = FleetCore::new(r.store.clone(), r.core.settings.clone())
            .expect("core")
            .without_stopwatch();
        let first = core.handle(
            r.t0,
            Input::Register {
                host: "a".into(),
                facts: facts("a", &[("web", VmRunState::PostMigrate)]),
                conn: 3,
            },
        );
        assert!(
            Rig::calls(&first).is_empty(),
            "nothing before b reports: {first:?}"
        );
        let out = core.handle(
            r.t0,
            Input::Register {
                host: "b".into(),
                facts: facts("b", &[("web", VmRunState::Paused)]),
                conn: 4,
            },
        );
        let calls = Rig::calls(&out);
        assert!(
            matches!(&calls[..], [(_, h, AgentRequest::MigrateFinish { .. })] if h == "b"),
            "the destination resumes first, and nothing else happens yet: {out:?}"
        );
    }

    #[test]
    fn a_source_left_paused_before_switchover_is_cancelled_so_its_guest_runs_again() {
        let mut r = Rig::new();
        r.register("a", 1, &[]);
        r.define();
        r.start(1);
        r.store
            .set_migrating_to("web", Some("b".into()))
            .expect("record");
        // A new coordinator; the storage copy's source waits before
        // switchover, and nothing will ever tell it to continue.
        let mut core = FleetCore::new(r.store.clone(), r.core.settings.clone())
            .expect("core")
            .without_stopwatch();
        core.handle(
            r.t0,
            Input::Register {
                host: "b".into(),
                facts: facts("b", &[]),
                conn: 4,
            },
        );
        let out = core.handle(
            r.t0,
            Input::Register {
                host: "a".into(),
                facts: facts("a", &[("web", VmRunState::FinishMigrate)]),
                conn: 3,
            },
        );
        let calls = Rig::calls(&out);
        assert!(
            matches!(&calls[..], [(_, h, AgentRequest::MigrateCancel { name })] if h == "a" && name == "web"),
            "{out:?}"
        );
    }

    #[test]
    fn a_host_cpu_definition_is_not_placed_where_there_is_no_kvm_and_unsupported_hardware_is_refused_at_define(
    ) {
        let mut r = Rig::new();
        r.register("a", 1, &[]);
        let (id, out) = r.op(OperatorRequest::Define {
            xml: XML.replace("</os>", "</os><cpu mode='host-passthrough'/>"),
            source: "web.xml".into(),
        });
        assert!(matches!(
            Rig::answer(id, &out),
            Some(OperatorResponse::Defined { .. })
        ));
        let (id, out) = r.op(OperatorRequest::Start {
            name: "web".into(),
            host: None,
        });
        let Some(OperatorResponse::Error(OperatorError::NoPlacement { explanation })) =
            Rig::answer(id, &out)
        else {
            panic!("{out:?}")
        };
        assert!(
            explanation.contains("a: it cannot give a host-passthrough CPU without KVM"),
            "{explanation}"
        );
        // Hardware Flotilla does not build is refused at define, by path,
        // and the stored definition stays as it was.
        let before = r.store.get("web").expect("get").expect("row");
        let (id, out) = r.op(OperatorRequest::Define {
            xml: XML.replace(
                "</os>",
                "</os><devices><hostdev mode='subsystem' type='usb'/></devices>",
            ),
            source: "web.xml".into(),
        });
        let Some(OperatorResponse::Error(OperatorError::Unsupported { file, refused })) =
            Rig::answer(id, &out)
        else {
            panic!("{out:?}")
        };
        assert_eq!(file, "web.xml");
        assert_eq!(refused.0[0].path, "/domain/devices/hostdev");
        assert_eq!(r.store.get("web").expect("get").expect("row"), before);
    }

    #[test]
    fn a_vm_the_operator_suspended_is_listed_paused_and_never_resumed_by_recovery() {
        let mut r = Rig::new();
        r.register("a", 1, &[]);
        r.define();
        r.start(1);
        // A new coordinator meets the VM paused on a: a migration's half
        // would be resumed; the operator's suspend is left alone.
        let mut core = FleetCore::new(r.store.clone(), r.core.settings.clone())
            .expect("core")
            .without_stopwatch();
        let mut paused = facts("a", &[("web", VmRunState::Paused)]);
        paused.vms[0].suspended = true;
        let out = core.handle(
            r.t0,
            Input::Register {
                host: "a".into(),
                facts: paused,
                conn: 3,
            },
        );
        assert!(Rig::calls(&out).is_empty(), "{out:?}");
        let out = core.handle(r.t0 + Duration::from_secs(1), Input::Tick);
        assert!(Rig::calls(&out).is_empty(), "{out:?}");
        let (id, out) = (
            99,
            core.handle(
                r.t0,
                Input::Operator {
                    id: 99,
                    request: OperatorRequest::List { all: true },
                },
            ),
        );
        let Some(OperatorResponse::Vms(list)) = Rig::answer(id, &out) else {
            panic!("{out:?}")
        };
        assert_eq!(list[0].state, "paused");
        // Without the operator's mark, the same report is a migration's
        // landed half, finished so that its guest runs.
        let mut core = FleetCore::new(r.store.clone(), r.core.settings.clone())
            .expect("core")
            .without_stopwatch();
        let out = core.handle(
            r.t0,
            Input::Register {
                host: "a".into(),
                facts: facts("a", &[("web", VmRunState::Paused)]),
                conn: 3,
            },
        );
        let calls = Rig::calls(&out);
        assert!(
            matches!(&calls[..], [(_, h, AgentRequest::MigrateFinish { .. })] if h == "a"),
            "{out:?}"
        );
    }

    /// `web` with HA on, running on a; b registered; both run fence keepers.
    fn ha_web_on_a_and_b_free() -> Rig {
        let mut r = Rig::new();
        let keeper = |host: &str| HostFacts {
            fence: FenceReport {
                keeper: true,
                watchdog_secs: None,
            },
            ..facts(host, &[])
        };
        r.core.handle(
            r.t0,
            Input::Register {
                host: "a".into(),
                facts: keeper("a"),
                conn: 1,
            },
        );
        let (id, out) = r.op(OperatorRequest::Define {
            xml: XML.replace(
                "<memory",
                "<metadata><flotilla:ha xmlns:flotilla='urn:flotilla:domain:1' restart='on'/></metadata><memory",
            ),
            source: "web.xml".into(),
        });
        assert!(matches!(
            Rig::answer(id, &out),
            Some(OperatorResponse::Defined { .. })
        ));
        r.start(1);
        r.core.handle(
            r.t0,
            Input::Register {
                host: "b".into(),
                facts: keeper("b"),
                conn: 2,
            },
        );
        r
    }

    fn starts(out: &[Effect]) -> Vec<(String, u64)> {
        Rig::calls(out)
            .into_iter()
            .filter_map(|(_, host, req)| match req {
                AgentRequest::Start { incarnation, .. } => Some((host, incarnation)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_silent_hosts_ha_vm_restarts_elsewhere_only_after_the_fence_deadline() {
        let mut r = ha_web_on_a_and_b_free();
        let s = Duration::from_secs;
        // b keeps reporting; a falls silent at t0.
        for (i, at) in [4u64, 8, 9].into_iter().enumerate() {
            let out = r.core.handle(
                r.t0 + s(at),
                Input::Report {
                    host: "b".into(),
                    conn: 2,
                    seq: i as u64 + 1,
                    facts: HostFacts {
                        fence: FenceReport {
                            keeper: true,
                            watchdog_secs: None,
                        },
                        ..facts("b", &[])
                    },
                },
            );
            assert!(starts(&out).is_empty());
            let out = r.core.handle(r.t0 + s(at), Input::Tick);
            assert!(
                starts(&out).is_empty(),
                "nothing restarts before the deadline"
            );
        }
        // L × (1 + ρ) + margin = 10.008 s after a was last heard.
        let out = r
            .core
            .handle(r.t0 + Duration::from_millis(10_007), Input::Tick);
        assert!(starts(&out).is_empty());
        let out = r
            .core
            .handle(r.t0 + Duration::from_millis(10_008), Input::Tick);
        assert_eq!(starts(&out), vec![("b".to_string(), 1)]);
        // Recorded before it was sent: the new incarnation and host.
        let row = r.store.get("web").expect("get").expect("row");
        assert_eq!((row.incarnation, row.placement.as_deref()), (1, Some("b")));
        assert!(out
            .iter()
            .any(|e| matches!(e, Effect::Metric(Metric::HostFenced("lease")))));

        // a comes back still reporting its old copy: it is told to kill it,
        // and the record stays on b.
        let out = r.core.handle(
            r.t0 + s(12),
            Input::Register {
                host: "a".into(),
                facts: facts("a", &[("web", VmRunState::Running)]),
                conn: 3,
            },
        );
        let stale = out.iter().find_map(|e| match e {
            Effect::Hello {
                ack: HelloAck::Accepted {
                    stale, lease_ms, ..
                },
                ..
            } => Some((stale.clone(), *lease_ms)),
            _ => None,
        });
        assert_eq!(stale, Some((vec!["web".to_string()], 8000)));
        let row = r.store.get("web").expect("get").expect("row");
        assert_eq!(row.placement.as_deref(), Some("b"));
    }

    #[test]
    fn a_new_leader_rearms_ha_deadlines_at_full_length_and_tells_hosts_its_epoch() {
        let r = ha_web_on_a_and_b_free();
        let ms = Duration::from_millis;
        // The leader dies 9 s after host a was last heard; another loads
        // the same store (etcd) and has heard from nobody yet.
        let takeover = r.t0 + ms(9_000);
        let mut core = FleetCore::new(
            r.store.clone(),
            FleetSettings {
                heartbeat: Duration::from_secs(1),
                heartbeat_timeout: Duration::from_secs(5),
                policy: Policy::default(),
                token_seed: 8,
                fencing: Default::default(),
                epoch: 42,
            },
        )
        .expect("core")
        .without_stopwatch();
        let out = core.handle(
            takeover,
            Input::Register {
                host: "b".into(),
                facts: HostFacts {
                    fence: FenceReport {
                        keeper: true,
                        watchdog_secs: None,
                    },
                    ..facts("b", &[])
                },
                conn: 5,
            },
        );
        assert!(out.iter().any(|e| matches!(
            e,
            Effect::Hello {
                ack: HelloAck::Accepted { epoch: 42, .. },
                ..
            }
        )));
        // Its own clock starts at its start: not the old leader's deadline
        // (10.008 s after a was last heard), but a full one from takeover.
        // b keeps reporting throughout.
        for (seq, at) in [(1, 1_008), (2, 4_000), (3, 8_000), (4, 10_007)] {
            let out = core.handle(
                takeover + ms(at),
                Input::Report {
                    host: "b".into(),
                    conn: 5,
                    seq,
                    facts: HostFacts {
                        fence: FenceReport {
                            keeper: true,
                            watchdog_secs: None,
                        },
                        ..facts("b", &[])
                    },
                },
            );
            assert!(starts(&out).is_empty(), "restarted early");
            let out = core.handle(takeover + ms(at), Input::Tick);
            assert!(starts(&out).is_empty(), "restarted early");
        }
        let out = core.handle(takeover + ms(10_008), Input::Tick);
        assert_eq!(starts(&out), vec![("b".to_string(), 1)]);
    }

    #[test]
    fn a_host_without_a_fence_gets_no_restart_until_an_operator_vouches() {
        let mut r = Rig::new();
        r.register("a", 1, &[]);
        let (_, _) = r.op(OperatorRequest::Define {
            xml: XML.replace(
                "<memory",
                "<metadata><flotilla:ha xmlns:flotilla='urn:flotilla:domain:1' restart='on'/></metadata><memory",
            ),
            source: "web.xml".into(),
        });
        r.start(1);
        r.register("b", 2, &[]);
        let s = Duration::from_secs;
        r.core.handle(
            r.t0 + s(9),
            Input::Report {
                host: "b".into(),
                conn: 2,
                seq: 1,
                facts: facts("b", &[]),
            },
        );
        let out = r.core.handle(r.t0 + s(11), Input::Tick);
        assert!(starts(&out).is_empty());
        assert!(out.iter().any(|e| matches!(e,
            Effect::Event(l) if l.contains("reports no working fence") && l.contains("flotilla host-fenced a"))));
        // b is connected: it cannot be declared fenced.
        let (id, out) = r.op(OperatorRequest::HostFenced { host: "b".into() });
        assert_eq!(
            Rig::answer(id, &out),
            Some(&OperatorResponse::Error(OperatorError::HostConnected {
                host: "b".into()
            }))
        );
        let id = r.next_op;
        r.next_op += 1;
        let out = r.core.handle(
            r.t0 + s(11),
            Input::Operator {
                id,
                request: OperatorRequest::HostFenced { host: "a".into() },
            },
        );
        assert!(matches!(
            Rig::answer(id, &out),
            Some(OperatorResponse::Done(_))
        ));
        assert_eq!(starts(&out), vec![("b".to_string(), 1)]);
    }

    #[test]
    fn ha_on_a_running_vm_takes_effect_at_its_next_start() {
        let mut r = Rig::web_on_a_and_b_free();
        let (id, out) = r.op(OperatorRequest::SetHa {
            name: "web".into(),
            on: true,
        });
        let Some(OperatorResponse::Done(msg)) = Rig::answer(id, &out) else {
            panic!("{out:?}");
        };
        assert!(msg.contains("until its next start"), "{msg}");
        let row = r.store.get("web").expect("get").expect("row");
        assert!(row.xml.contains("urn:flotilla:domain:1"), "{}", row.xml);
        assert!(!row.ha_running);
        let (id, out) = r.op(OperatorRequest::DomInfo { name: "web".into() });
        let Some(OperatorResponse::DomInfo(info)) = Rig::answer(id, &out) else {
            panic!("{out:?}");
        };
        assert!(info.entry.ha);
        assert_eq!((info.vcpus, info.memory_kib), (1, 512 * 1024));
    }
}
