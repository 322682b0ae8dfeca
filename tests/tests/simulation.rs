//! The deterministic fleet simulation: one [`FleetCore`] and N simulated
//! hosts in one process, on virtual time, driven by a seeded fault plan.
//!
//! The hosts are the real agent: each is a [`HostCore`] (the agent's
//! decisions) over a [`FakeQemu`] (its QEMU processes and state directory),
//! all joined to one [`FakeFabric`] so that migrations between hosts land.
//! Every hypervisor operation the core asks for is carried out on the fake
//! when asked and its result fed back after a small random virtual delay, so
//! slow starts, migrations and stops overlap other requests; an outgoing
//! migration completes 50–1500 ms after it starts. Heartbeats carry facts
//! gathered as the agent's link gathers them: a `NetList` and a `List`
//! request to the core (a VM whose start has begun is listed as
//! `prelaunch`).
//!
//! No root, no sockets, no QEMU. Every message between the coordinator and a
//! host goes through a simulated network with latency, reordering (each
//! request is its own stream), one-way and two-way partitions, and connection
//! deaths, following QUIC's rules: a partition delays messages until it heals,
//! and kills the connection once a heartbeat goes unanswered for 3 s; a dead
//! connection drops what was in flight and fails every call on it. Agents
//! crash and restart (the `HostCore` is dropped with its memory; the
//! `FakeQemu`'s processes and state directory survive, and a new core boots
//! over them), QEMUs crash, the coordinator crashes and restarts over the same
//! store with its memory lost, and operators issue random verbs. Fault kinds
//! are weighted per seed (swarm testing).
//!
//! After every step the checker, which is separate from the system and reads
//! the truth from the `FakeQemu`s, checks:
//! - at most one running copy of each VM (a QEMU whose vCPUs run: not
//!   paused, `inmigrate` or `postmigrate`);
//! - every acknowledged define survives in the store;
//! - every operator request gets at most one answer, and in the end exactly one;
//! - at the end, with faults healed and the fleet quiet: the records agree
//!   with what runs (a VM recorded on a host has exactly one QEMU, there; a
//!   shut-off VM has none), and a VM whose last acknowledged verb started or
//!   moved it, with no fault since that could stop it, is running.
//!
//! `FLOTILLA_SIM_SEEDS=N` runs N seeds from `FLOTILLA_SIM_FIRST_SEED` (default
//! 1; default count: as many as fit in 60 s, at
//! least 500); `FLOTILLA_SIM_SEED=S` replays one seed (with
//! `FLOTILLA_SIM_TRACE=1`, every step and hypervisor operation is printed).
//! A failure prints its seed and the trace of its last 50 steps.
//!
//! An agent crash during a launch leaves the half-launched QEMU running, as
//! a real one would (QEMU has its own process group); the restarted agent
//! must find and kill it before it serves anything (seeds 16 and 51 found
//! the gap that this closes).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_agent::fake_qemu::{sim_settings, FakeFabric, FakeQemu};
use flotilla_agent::host_core::{HaGuest, HostCore, HostEffect, HostInput, HvCall, HvResult};
use flotilla_agent::host_networks::HostNetworks;
use flotilla_agent::interfaces::InterfaceTable;
use flotilla_agent::qmp::QmpCommand;
use flotilla_coordinator::fencing::FencePolicy;
use flotilla_coordinator::fleet_core::{
    CallId, ConnId, Effect, FleetCore, FleetSettings, Input, RequestId,
};
use flotilla_coordinator::lifecycle::VmLifecycle;
use flotilla_coordinator::scheduler::Policy;
use flotilla_coordinator::store::{MemStore, Store};
use flotilla_shared::proto::{
    AgentRequest, AgentResponse, CopyMode, FenceReport, HelloAck, HostFacts, MachineTypes,
    MigrationOutcome, NetStatus, OperatorError, OperatorRequest, OperatorResponse, VmSummary,
};
use flotilla_shared::xml::Network;

/// SplitMix64: small, fast, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }
}

const HEARTBEAT: Duration = Duration::from_secs(1);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// An agent drops a connection whose heartbeat is unanswered this long.
const HEARTBEAT_ANSWER: Duration = Duration::from_secs(3);
/// A crashed peer's connection is noticed by the other side after this.
const IDLE: Duration = Duration::from_secs(6);
/// Faults and operator verbs stop here; the fleet then settles.
const ACTIVE: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(40);
const HOSTS: usize = 3;
const MAX_VMS: usize = 5;
/// The lease and fencing rule, as the coordinator's defaults.
const LEASE: Duration = Duration::from_secs(8);
/// ρ: hosts' clocks run up to this much slower or faster than the coordinator's.
const CLOCK_RATE_BOUND: f64 = 1e-3;
/// How often a host's fence keeper reads the lease.
const KEEPER_POLL: Duration = Duration::from_millis(100);

/// What a host core's reply is for.
#[derive(Debug, Clone, Copy)]
enum Waiter {
    /// A coordinator's call over `conn`.
    Call {
        conn: ConnId,
        call: CallId,
        epoch: u64,
    },
    /// Part of a facts gathering (`NetList` or `List`).
    Gather,
    /// The agent's own request (killing a stale copy): nobody waits.
    Own,
}

/// Facts being gathered for a registration (`seq` None) or a heartbeat.
struct Gather {
    conn: ConnId,
    seq: Option<u64>,
    /// Request ids still unanswered.
    pending: BTreeSet<u64>,
    vms: Vec<VmSummary>,
    networks: Vec<NetStatus>,
}

/// One simulated host: the agent process (a real [`HostCore`]) and the fake
/// QEMUs and state directory it manages, which outlive it.
struct HostSim {
    name: String,
    fake: FakeQemu,
    /// The agent process; None while it is down.
    core: Option<HostCore>,
    /// Bumped at each agent start: results, wake-ups and exits meant for an
    /// earlier agent process are dropped.
    life: u64,
    /// The next request id given to the core.
    next_id: u64,
    /// Requests the core holds: id → whom the reply is for.
    waiting: BTreeMap<u64, Waiter>,
    gather: Option<Gather>,
    /// (connection, this connection's next sequence number), once registered.
    session: Option<(ConnId, u64)>,
    /// The current connection's registration was acknowledged: as the real
    /// agent, it serves the coordinator's requests only from then on.
    registered: bool,
    /// The highest coordinator epoch this host registered under: as the
    /// real agent, it refuses a coordinator with a lower one.
    epoch_seen: u64,
    /// A heartbeat sent at this time and not yet answered.
    heartbeat_out: Option<Duration>,
    dialing: bool,
    /// Messages toward the coordinator are held.
    cut_out: bool,
    /// Messages toward this host are held.
    cut_in: bool,
    /// The host's clock runs at this rate against the coordinator's.
    clock_rate: f64,
    /// The agent is stopped (SIGSTOP) until then: nothing reaches it, it
    /// sends nothing; its QEMUs and fence keeper carry on.
    hung_until: Option<Duration>,
    /// When the registration on the current connection was sent.
    hello_sent: Option<Duration>,
    /// The lease length the coordinator granted.
    lease: Option<Duration>,
    /// The fence keeper's file (it survives the agent): the lease's expiry
    /// on the host's clock and the HA guests.
    lease_file: Option<(Instant, Vec<HaGuest>)>,
}

impl HostSim {
    fn up(&self) -> bool {
        self.core.is_some()
    }
}

#[derive(Debug, Clone)]
enum Ev {
    /// A message reaches the core (from an agent over `conn`, or an operator when None).
    ToCore {
        conn: Option<ConnId>,
        epoch: u64,
        input: Input,
    },
    /// A request reaches an agent.
    ToAgent {
        host: usize,
        conn: ConnId,
        call: CallId,
        epoch: u64,
        request: AgentRequest,
    },
    /// A registration answer reaches an agent.
    HelloAck {
        host: usize,
        conn: ConnId,
        ack: HelloAck,
    },
    /// A heartbeat answer reaches an agent.
    HeartbeatAck {
        host: usize,
        conn: ConnId,
    },
    AgentTick {
        host: usize,
    },
    Dial {
        host: usize,
    },
    CoreTick,
    CoreWake {
        epoch: u64,
    },
    /// An answer reaches the operator.
    OperatorGets {
        id: RequestId,
        response: OperatorResponse,
    },
    Operator,
    Fault,
    Heal {
        host: usize,
    },
    AgentStart {
        host: usize,
    },
    CoreStart,
    /// A hypervisor operation of agent process `life` finished. `watch`: the
    /// VM whose QEMU it launched or attached to (and the pid, for an attach),
    /// which must still be alive for the operation to succeed.
    HvDone {
        host: usize,
        life: u64,
        op: u64,
        result: HvResult,
        watch: Option<(String, Option<i32>)>,
    },
    /// A `WakeAt` of agent process `life` is due.
    HostWake {
        host: usize,
        life: u64,
    },
    /// QEMU exits reach agent process `life`.
    Exits {
        host: usize,
        life: u64,
        exits: Vec<HostInput>,
    },
    /// An outgoing migration's stream is through: the `nth` migrate command
    /// QEMU `pid` received completes (or fails if nobody listens any more).
    MigrationLands {
        host: usize,
        vm: String,
        pid: i32,
        nth: usize,
    },
    /// A dead connection is noticed by the coordinator.
    CoreNoticesDeath {
        conn: ConnId,
        host: usize,
        epoch: u64,
    },
    /// The host's fence keeper reads its lease file.
    KeeperPoll {
        host: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Running,
    ShutOff,
    /// A fault or an unanswered verb: either is right, as long as records agree.
    Either,
}

struct Op {
    request: OperatorRequest,
    answers: u32,
    /// When it was issued: a fault on its VM after this makes its outcome uncertain.
    issued: Duration,
}

/// Swarm testing: each seed weights the fault kinds differently.
struct Weights {
    partition: u64,
    one_way: u64,
    agent_crash: u64,
    core_crash: u64,
    qemu_crash: u64,
    reset: u64,
    operator_rate_ms: u64,
    slow_link: u64,
    refuse_finish: u64,
    hang: u64,
}

struct World {
    seed: u64,
    rng: Rng,
    base: Instant,
    now: Duration,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    events: BTreeMap<u64, Ev>,
    next_event: u64,
    store: Arc<MemStore>,
    core: Option<FleetCore>,
    /// Bumped at each coordinator restart; messages to an older one are dropped.
    epoch: u64,
    hosts: Vec<HostSim>,
    /// Live connections: id → host.
    conns: BTreeMap<ConnId, usize>,
    next_conn: ConnId,
    /// Calls in flight per connection, failed when it dies.
    calls: BTreeMap<ConnId, BTreeSet<CallId>>,
    ops: BTreeMap<RequestId, Op>,
    /// Requests the current coordinator holds, answered by the transport if it dies.
    ops_at_core: BTreeSet<RequestId>,
    next_op: RequestId,
    acked_defines: BTreeMap<String, String>,
    /// Migration ends announced to web consoles that disagree with the
    /// core's own record of where the VM runs.
    bad_moves: Vec<String>,
    /// The order in which the coordinator took requests.
    processed: u64,
    processed_at: BTreeMap<RequestId, u64>,
    undefine_processed: BTreeMap<String, u64>,
    /// Undefines in flight: request → (name, uuid) no longer checked meanwhile.
    undefining: BTreeMap<RequestId, (String, String)>,
    expect: BTreeMap<String, Expect>,
    uuids: BTreeMap<String, String>,
    /// When each VM's QEMU last crashed.
    faulted: BTreeMap<String, Duration>,
    weights: Weights,
    trace: VecDeque<String>,
    steps: u64,
    wake_at: Option<Duration>,
    /// Print every step (FLOTILLA_SIM_TRACE=1 with a replayed seed).
    verbose: bool,
    /// Each host's last reported VM list, to trace only changes.
    last_reported: BTreeMap<String, Vec<String>>,
    /// HA at work: hosts fenced, HA VMs restarted, guests a keeper killed.
    ha_stats: HaStats,
}

/// How often the HA machinery acted, summed over seeds.
#[derive(Debug, Default, Clone, Copy)]
struct HaStats {
    fenced: u64,
    restarted: u64,
    keeper_kills: u64,
}

/// A VM with a writable disk on the storage every host shares (each
/// migration proves that with a marker) and one NIC on `public`: a tap on
/// host-a and host-c, a macvtap on host-b.
fn domain_xml(name: &str, uuid: &str) -> String {
    // Every other VM is highly available: the coordinator restarts it
    // elsewhere once its host is fenced.
    let ha = if name.ends_with(['0', '2', '4']) {
        "<metadata><flotilla:ha xmlns:flotilla='urn:flotilla:domain:1' restart='on'/></metadata>"
    } else {
        ""
    };
    format!(
        "<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid>{ha}\
         <memory unit='MiB'>512</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
         <disk type='file' device='disk'><source file='/shared/{name}.qcow2'/>\
         <target dev='vda' bus='virtio'/></disk>\
         <interface type='network'><source network='public'/></interface>\
         </devices></domain>"
    )
}

fn settings() -> FleetSettings {
    FleetSettings {
        heartbeat: HEARTBEAT,
        heartbeat_timeout: HEARTBEAT_TIMEOUT,
        policy: Policy::default(),
        token_seed: 0,
        fencing: FencePolicy {
            lease: LEASE,
            clock_rate_bound: CLOCK_RATE_BOUND,
            margin: Duration::from_secs(2),
        },
        epoch: 0,
    }
}

/// Host `i`: one device with one address, network `public` over it (so
/// migrations have an address to arrive at and NICs a device: a bridge, or
/// on host-b an uplink for macvtaps), migrations that complete when the
/// simulation says so, and an agent that boots at time zero. host-c's
/// storage is its own: its guests move only with `--copy-storage-all`.
fn sim_host(i: usize, fabric: &FakeFabric) -> HostSim {
    let name = format!("host-{}", (b'a' + i as u8) as char);
    let addr = format!("198.18.4.{}", i + 1);
    let (dev, xml) = if i == 1 {
        (
            "uplink0",
            "<network><name>public</name><forward mode='bridge' dev='uplink0'/></network>",
        )
    } else {
        (
            "br0",
            "<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>",
        )
    };
    let fake = FakeQemu::new(InterfaceTable::new().with(dev, &[addr.as_str()]));
    let network = match Network::parse("public.xml", xml) {
        Ok(n) => n.model,
        Err(e) => panic!("the simulation's network does not parse: {e}"),
    };
    fake.set_networks(HostNetworks {
        dir: PathBuf::from("/sim/networks"),
        networks: vec![network],
        problems: Vec::new(),
    });
    fake.set_auto_complete(false);
    fake.join(fabric);
    if i == 2 {
        fake.use_private_storage();
    }
    HostSim {
        name,
        fake,
        core: None,
        life: 0,
        next_id: 1,
        waiting: BTreeMap::new(),
        gather: None,
        session: None,
        registered: false,
        epoch_seen: 0,
        heartbeat_out: None,
        dialing: false,
        cut_out: false,
        cut_in: false,
        clock_rate: 1.0,
        hung_until: None,
        hello_sent: None,
        lease: None,
        lease_file: None,
    }
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng(seed);
        let weights = Weights {
            partition: rng.below(4),
            one_way: rng.below(3),
            agent_crash: rng.below(3),
            core_crash: rng.below(3),
            qemu_crash: rng.below(3),
            reset: rng.below(3),
            operator_rate_ms: 100 + rng.below(600),
            slow_link: rng.below(3),
            refuse_finish: rng.below(3),
            hang: rng.below(3),
        };
        let store = Arc::new(MemStore::default());
        let fabric = FakeFabric::new();
        let mut hosts: Vec<HostSim> = (0..HOSTS).map(|i| sim_host(i, &fabric)).collect();
        // Each host's clock drifts within the bound the coordinator assumes.
        for h in &mut hosts {
            let off = (rng.below(2001) as f64 - 1000.0) / 1000.0;
            h.clock_rate = 1.0 + off * CLOCK_RATE_BOUND;
        }
        let mut w = World {
            seed,
            rng,
            base: Instant::now(),
            now: Duration::ZERO,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            core: None,
            store,
            epoch: 0,
            hosts,
            conns: BTreeMap::new(),
            next_conn: 1,
            calls: BTreeMap::new(),
            ops: BTreeMap::new(),
            ops_at_core: BTreeSet::new(),
            next_op: 1,
            acked_defines: BTreeMap::new(),
            bad_moves: Vec::new(),
            undefining: BTreeMap::new(),
            processed: 0,
            processed_at: BTreeMap::new(),
            undefine_processed: BTreeMap::new(),
            expect: BTreeMap::new(),
            uuids: BTreeMap::new(),
            faulted: BTreeMap::new(),
            weights,
            trace: VecDeque::new(),
            steps: 0,
            wake_at: None,
            verbose: std::env::var("FLOTILLA_SIM_TRACE").is_ok_and(|v| v == "1"),
            last_reported: BTreeMap::new(),
            ha_stats: HaStats::default(),
        };
        w.start_core();
        for h in 0..HOSTS {
            w.boot_agent(h);
            w.hosts[h].dialing = true;
            w.at(Duration::from_millis(10 * h as u64), Ev::Dial { host: h });
            w.at(HEARTBEAT, Ev::AgentTick { host: h });
        }
        w.at(Duration::from_millis(500), Ev::Operator);
        w.at(Duration::from_secs(2), Ev::Fault);
        w.at(HEARTBEAT, Ev::CoreTick);
        w
    }

    fn at(&mut self, after: Duration, ev: Ev) {
        let id = self.next_event;
        self.next_event += 1;
        self.queue.push(Reverse((self.now + after, id)));
        self.events.insert(id, ev);
    }

    fn note(&mut self, line: String) {
        if self.verbose {
            println!("[{:>8.3}s] {line}", self.now.as_secs_f64());
        }
        if self.trace.len() == 50 {
            self.trace.pop_front();
        }
        self.trace
            .push_back(format!("[{:>8.3}s] {line}", self.now.as_secs_f64()));
    }

    fn latency(&mut self) -> Duration {
        if self.weights.slow_link > 0 && self.rng.chance(0.05 * self.weights.slow_link as f64) {
            self.rng.ms(200, 2500)
        } else {
            self.rng.ms(1, 40)
        }
    }

    fn active(&self) -> bool {
        self.now < ACTIVE
    }

    // ------------------------------------------------------------ coordinator

    fn start_core(&mut self) {
        // Each restart is a new leadership with a newer epoch, as with etcd.
        let settings = FleetSettings {
            epoch: self.epoch,
            ..settings()
        };
        match FleetCore::new(self.store.clone(), settings) {
            Ok(core) => self.core = Some(core.without_stopwatch()),
            Err(e) => panic!("seed {}: core cannot start: {e}", self.seed),
        }
    }

    fn core_input(&mut self, input: Input) {
        let Some(core) = self.core.as_mut() else {
            return;
        };
        let now = self.base + self.now;
        let effects = core.handle(now, input);
        // The scheduler's index, kept up to date by marks, must equal
        // snapshots taken from scratch after every input.
        if let Some(d) = core.index_differs(now) {
            self.bad_moves.push(format!("scheduler index: {d}"));
        }
        for e in effects {
            self.effect(e);
        }
    }

    fn effect(&mut self, e: Effect) {
        match e {
            Effect::Hello { conn, ack } => {
                if let Some(&host) = self.conns.get(&conn) {
                    let d = self.latency();
                    self.at(d, Ev::HelloAck { host, conn, ack });
                }
            }
            Effect::Call {
                call,
                conn,
                request,
                ..
            } => match self.conns.get(&conn) {
                Some(&host) => {
                    self.detail(format!(
                        "core sends call {call} to {}: {}",
                        self.hosts[host].name,
                        short_agent_req(&request)
                    ));
                    self.calls.entry(conn).or_default().insert(call);
                    let d = self.latency();
                    let epoch = self.epoch;
                    self.at(
                        d,
                        Ev::ToAgent {
                            host,
                            conn,
                            call,
                            epoch,
                            request,
                        },
                    );
                }
                None => {
                    let epoch = self.epoch;
                    self.at(
                        Duration::ZERO,
                        Ev::ToCore {
                            conn: None,
                            epoch,
                            input: Input::AgentReplied {
                                call,
                                result: Err("connection closed".into()),
                            },
                        },
                    );
                }
            },
            Effect::Close { conn, .. } => self.kill_conn(conn, "closed by the coordinator"),
            // The shell acknowledges a heartbeat only once the core applied
            // it: the acknowledgement renews the host's lease.
            Effect::ReportAnswer {
                conn,
                accepted: true,
                ..
            } => {
                if let Some(&host) = self.conns.get(&conn) {
                    let d = self.send_delay(host, true);
                    self.at(d, Ev::HeartbeatAck { host, conn });
                }
            }
            Effect::ReportAnswer { .. } => {}
            Effect::Reply { id, response } => {
                self.ops_at_core.remove(&id);
                let d = self.rng.ms(1, 20);
                self.at(d, Ev::OperatorGets { id, response });
            }
            Effect::Event(line) => {
                if line.starts_with("host ") && line.contains(" fenced: ") {
                    self.ha_stats.fenced += 1;
                }
                if line.contains(" restarted on ") {
                    self.ha_stats.restarted += 1;
                }
                self.detail(format!("core event: {line}"))
            }
            Effect::Moved { vm, from, to } => {
                // Web consoles reconnect to `to`: it must be where the core
                // now records the VM, and somewhere else than before.
                let life = self.core.as_ref().and_then(|c| {
                    c.lifecycles()
                        .find(|(n, _)| *n == vm)
                        .map(|(_, l)| l.clone())
                });
                let recorded = matches!(&life, Some(VmLifecycle::Running { host }) if *host == to);
                if !recorded || from == to {
                    self.bad_moves.push(format!(
                        "moved {vm} from {from} to {to} while the core records {life:?}"
                    ));
                }
            }
            // The simulation opens no web consoles.
            Effect::ConsoleRoute { .. } => {}
            Effect::Progress { .. } | Effect::Note { .. } | Effect::Metric(_) => {}
            Effect::WakeAt(t) => {
                let at = t.saturating_duration_since(self.base);
                if self.wake_at.is_none_or(|w| w > at || w < self.now) {
                    self.wake_at = Some(at);
                    let epoch = self.epoch;
                    let after = at.saturating_sub(self.now);
                    self.at(after, Ev::CoreWake { epoch });
                }
            }
        }
    }

    /// The operator's client reports a transport failure: its answer.
    fn transport_error(&mut self, id: RequestId, what: &str) {
        let response = OperatorResponse::Error(OperatorError::Unavailable(what.into()));
        self.at(Duration::ZERO, Ev::OperatorGets { id, response });
    }

    fn crash_core(&mut self) {
        self.note("FAULT coordinator crash".into());
        self.core = None;
        // Every connection dies with it; agents redial. Nobody is left to
        // notice on this side, so the notices go to the dead epoch.
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for c in conns {
            self.kill_conn(c, "coordinator crashed");
        }
        self.calls.clear();
        self.epoch += 1;
        self.wake_at = None;
        // Operators waiting on it get a transport error.
        for id in std::mem::take(&mut self.ops_at_core) {
            self.transport_error(id, "connection lost");
        }
        let d = self.rng.ms(200, 4000);
        self.at(d, Ev::CoreStart);
    }

    // ------------------------------------------------------------ network

    fn kill_conn(&mut self, conn: ConnId, why: &str) {
        let Some(host) = self.conns.remove(&conn) else {
            return;
        };
        self.note(format!(
            "conn {conn} of {} dies: {why}",
            self.hosts[host].name
        ));
        if self.hosts[host].session.is_some_and(|(c, _)| c == conn) {
            self.hosts[host].session = None;
            self.hosts[host].heartbeat_out = None;
            if self.hosts[host].up() && !self.hosts[host].dialing {
                self.hosts[host].dialing = true;
                let d = self.rng.ms(250, 1000);
                self.at(d, Ev::Dial { host });
            }
        }
        let epoch = self.epoch;
        // The coordinator notices at once when the agent closed it or a reply
        // is due; a crashed agent only at the idle timeout.
        let notice = if self.hosts[host].up() {
            Duration::ZERO
        } else {
            IDLE
        };
        self.at(notice, Ev::CoreNoticesDeath { conn, host, epoch });
    }

    /// When a message sent now over `conn` toward (`to_host`) arrives, if at all.
    fn send_delay(&mut self, host: usize, to_host: bool) -> Duration {
        let cut = if to_host {
            self.hosts[host].cut_in
        } else {
            self.hosts[host].cut_out
        };
        let d = self.latency();
        if cut {
            // Held until the partition heals; the connection dies before that
            // if it lasts, and the message with it.
            d + HEARTBEAT_ANSWER + Duration::from_secs(1)
        } else {
            d
        }
    }

    // ------------------------------------------------------------ agents

    /// Printed only when tracing every step: too many to keep in the trace.
    fn detail(&self, line: String) {
        if self.verbose {
            println!("[{:>8.3}s]   {line}", self.now.as_secs_f64());
        }
    }

    /// The agent process of `host` starts: a new core over the same fake
    /// host (its QEMUs and state directory), booted.
    fn boot_agent(&mut self, host: usize) {
        let h = &mut self.hosts[host];
        h.life += 1;
        h.waiting.clear();
        h.gather = None;
        h.session = None;
        h.heartbeat_out = None;
        h.core = Some(HostCore::new(
            sim_settings(&h.name),
            h.fake.networks(),
            true,
            Box::new(|_| true),
        ));
        // Exits from while no agent ran are found by the boot scan.
        let _ = h.fake.take_exits();
        self.host_input(host, HostInput::Boot);
    }

    /// `host`'s clock at virtual time `at`.
    fn host_clock(&self, host: usize, at: Duration) -> Instant {
        self.base + at.mul_f64(self.hosts[host].clock_rate)
    }

    /// The virtual time at which `host`'s clock reads `t`.
    fn virtual_at(&self, host: usize, t: Instant) -> Duration {
        t.saturating_duration_since(self.base)
            .div_f64(self.hosts[host].clock_rate)
    }

    /// Feeds one input to `host`'s core, if its agent runs, and carries out
    /// what the core asks.
    fn host_input(&mut self, host: usize, input: HostInput) {
        let now = self.host_clock(host, self.now);
        let Some(core) = self.hosts[host].core.as_mut() else {
            return;
        };
        let effects = core.handle(now, input);
        for e in effects {
            self.host_effect(host, e);
        }
    }

    /// How long a hypervisor operation takes.
    fn hv_time(&mut self, call: &HvCall) -> Duration {
        match call {
            HvCall::Launch(_) => self.rng.ms(50, 400),
            HvCall::ScanRecords { .. } | HvCall::FindStrays { .. } | HvCall::Attach { .. } => {
                self.rng.ms(1, 20)
            }
            HvCall::ConfirmConsoles { .. } | HvCall::GuestAgent { .. } => self.rng.ms(1, 20),
            HvCall::Qmp {
                cmd: QmpCommand::SystemPowerdown | QmpCommand::Quit,
                ..
            } => self.rng.ms(1, 50),
            HvCall::Qmp { .. } => self.rng.ms(0, 10),
            HvCall::Signal { .. } => self.rng.ms(0, 2),
            HvCall::ReadHost { .. }
            | HvCall::LoadNetworks { .. }
            | HvCall::WriteRecord { .. }
            | HvCall::RemoveRecord { .. }
            | HvCall::RemoveImages { .. }
            | HvCall::SetLinks { .. }
            | HvCall::WriteMarkers { .. }
            | HvCall::RemoveMarkers { .. }
            | HvCall::RemoveStrayNics { .. } => self.rng.ms(0, 5),
        }
    }

    fn host_effect(&mut self, host: usize, e: HostEffect) {
        let life = self.hosts[host].life;
        match e {
            HostEffect::Hv { op, call } => {
                // Done on the fake now; the core learns the result later.
                let took = self.hv_time(&call);
                let watch = match &call {
                    HvCall::Launch(plan) => Some((plan.name.clone(), None)),
                    HvCall::Attach { name, pid, .. } => Some((name.clone(), Some(*pid))),
                    _ => None,
                };
                let migrate = match &call {
                    HvCall::Qmp {
                        vm,
                        cmd: QmpCommand::Migrate { .. },
                        ..
                    } => Some(vm.clone()),
                    _ => None,
                };
                self.detail(format!(
                    "{} hv op {op}: {}",
                    self.hosts[host].name,
                    short_hv(&call)
                ));
                let result = self.hosts[host].fake.call_now(call);
                if let Some(vm) = migrate {
                    self.migration_started(host, vm);
                }
                self.collect_exits(host);
                self.at(
                    took,
                    Ev::HvDone {
                        host,
                        life,
                        op,
                        result,
                        watch,
                    },
                );
            }
            HostEffect::Reply { id, response } => self.host_reply(host, id, response),
            // The agent's link does not forward events yet.
            HostEffect::Event(_) => {}
            HostEffect::WakeAt(t) => {
                // Rounded up: the host's clock must have reached `t`.
                let after =
                    (self.virtual_at(host, t) + Duration::from_micros(1)).saturating_sub(self.now);
                self.at(after, Ev::HostWake { host, life });
            }
            HostEffect::LeaseFile { until, guests } => {
                self.hosts[host].lease_file = Some((until, guests));
                // The keeper reads the file on its own schedule: the first
                // read past the deadline is up to one poll late.
                let due = self.virtual_at(host, until) + Duration::from_micros(1);
                let poll = self.rng.ms(0, KEEPER_POLL.as_millis() as u64);
                let after = (due + poll).saturating_sub(self.now);
                self.at(after, Ev::KeeperPoll { host });
            }
        }
    }

    /// The fence keeper's poll: past the lease in its file (on the host's
    /// clock), every HA guest it lists that still runs is killed, whether
    /// or not the agent runs or answers.
    fn keeper_poll(&mut self, host: usize) {
        let Some((until, guests)) = self.hosts[host].lease_file.clone() else {
            return;
        };
        if self.host_clock(host, self.now) < until {
            return;
        }
        for g in guests {
            // By UUID, as the real keeper also finds a guest whose launch
            // the agent never saw finish.
            let alive = self.hosts[host]
                .fake
                .process(&g.name)
                .is_some_and(|p| p.plan.uuid == g.uuid);
            if alive {
                self.ha_stats.keeper_kills += 1;
                self.note(format!(
                    "fence keeper of {} kills HA guest {} (lease lapsed)",
                    self.hosts[host].name, g.name
                ));
                self.hosts[host].fake.crash(&g.name);
            }
        }
        self.collect_exits(host);
    }

    /// A `migrate` command was carried out on `host`: if the migration is
    /// under way, its stream lands after a while.
    fn migration_started(&mut self, host: usize, vm: String) {
        let Some(p) = self.hosts[host].fake.process(&vm) else {
            return;
        };
        if p.migration.as_ref().is_none_or(|m| m.status != "active") {
            return;
        }
        let nth = migrate_commands(&p.commands);
        let d = self.rng.ms(50, 1500);
        self.note(format!(
            "{} starts migrating {vm} (lands in {} ms)",
            self.hosts[host].name,
            d.as_millis()
        ));
        self.at(
            d,
            Ev::MigrationLands {
                host,
                vm,
                pid: p.pid,
                nth,
            },
        );
    }

    /// Hands the QEMU exits the fake saw to the agent, a little later (or
    /// drops them if no agent runs: its boot scan will find them).
    fn collect_exits(&mut self, host: usize) {
        let exits = self.hosts[host].fake.take_exits();
        if exits.is_empty() || !self.hosts[host].up() {
            return;
        }
        for e in &exits {
            if let HostInput::VmExited { name, reason, .. } = e {
                self.note(format!(
                    "QEMU of {name} on {} exits: {reason}",
                    self.hosts[host].name
                ));
            }
        }
        let life = self.hosts[host].life;
        let d = self.rng.ms(1, 20);
        self.at(d, Ev::Exits { host, life, exits });
    }

    /// The core answered request `id`.
    fn host_reply(&mut self, host: usize, id: u64, response: AgentResponse) {
        let Some(waiter) = self.hosts[host].waiting.remove(&id) else {
            return;
        };
        match waiter {
            Waiter::Call { conn, call, epoch } => {
                self.detail(format!(
                    "{} answers call {call}: {}",
                    self.hosts[host].name,
                    short_agent(&response)
                ));
                if epoch != self.epoch || !self.conns.contains_key(&conn) {
                    return;
                }
                let Some((c, seq)) = self.hosts[host].session.as_mut() else {
                    return;
                };
                if *c != conn {
                    return;
                }
                // Numbered after the action took effect.
                *seq += 1;
                let seq = *seq;
                self.agent_send_core(
                    host,
                    conn,
                    Input::AgentReplied {
                        call,
                        result: Ok((seq, response)),
                    },
                );
            }
            Waiter::Own => {}
            Waiter::Gather => {
                let Some(g) = self.hosts[host].gather.as_mut() else {
                    return;
                };
                if !g.pending.remove(&id) {
                    return;
                }
                match response {
                    AgentResponse::Vms(vms) => g.vms = vms,
                    AgentResponse::Networks { networks, .. } => g.networks = networks,
                    _ => {}
                }
                if g.pending.is_empty() {
                    if let Some(g) = self.hosts[host].gather.take() {
                        self.send_facts(host, g);
                    }
                }
            }
        }
    }

    /// Gathers facts as the agent's link does (`NetList`, then `List`), for
    /// a registration (`seq` None) or a heartbeat numbered `seq`.
    fn start_gather(&mut self, host: usize, conn: ConnId, seq: Option<u64>) {
        let h = &mut self.hosts[host];
        let (net, list) = (h.next_id, h.next_id + 1);
        h.next_id += 2;
        h.waiting.insert(net, Waiter::Gather);
        h.waiting.insert(list, Waiter::Gather);
        h.gather = Some(Gather {
            conn,
            seq,
            pending: BTreeSet::from([net, list]),
            vms: Vec::new(),
            networks: Vec::new(),
        });
        self.host_input(
            host,
            HostInput::Request {
                id: net,
                request: AgentRequest::NetList,
            },
        );
        self.host_input(
            host,
            HostInput::Request {
                id: list,
                request: AgentRequest::List,
            },
        );
    }

    fn send_facts(&mut self, host: usize, g: Gather) {
        if self.hosts[host].session.is_none_or(|(c, _)| c != g.conn)
            || !self.conns.contains_key(&g.conn)
        {
            return;
        }
        let name = self.hosts[host].name.clone();
        let facts = HostFacts {
            host: name.clone(),
            cpus: 4,
            memory_mib: 4096,
            networks: g.networks,
            vms: g.vms,
            // Every host's QEMU: definitions name `pc`, stored expanded.
            machine_types: MachineTypes {
                names: vec!["pc-i440fx-10.0".into()],
                aliases: vec![("pc".into(), "pc-i440fx-10.0".into())],
                ..Default::default()
            },
            fence: FenceReport {
                keeper: true,
                watchdog_secs: None,
            },
        };
        let conn = g.conn;
        match g.seq {
            None => {
                self.hosts[host].hello_sent = Some(self.now);
                self.note(format!("{name} registers over conn {conn}"));
                self.agent_send_core(
                    host,
                    conn,
                    Input::Register {
                        host: name,
                        facts,
                        conn,
                    },
                );
            }
            Some(seq) => {
                self.hosts[host].heartbeat_out = Some(self.now);
                self.agent_send_core(
                    host,
                    conn,
                    Input::Report {
                        host: name,
                        conn,
                        seq,
                        facts,
                    },
                );
            }
        }
    }

    fn agent_send_core(&mut self, host: usize, conn: ConnId, input: Input) {
        let d = self.send_delay(host, false);
        let epoch = self.epoch;
        self.at(
            d,
            Ev::ToCore {
                conn: Some(conn),
                epoch,
                input,
            },
        );
    }

    // ------------------------------------------------------------ operators

    fn operator(&mut self) {
        let names: Vec<String> = self.uuids.keys().cloned().collect();
        let pick = |rng: &mut Rng, v: &[String]| -> Option<String> {
            if v.is_empty() {
                None
            } else {
                Some(v[rng.below(v.len() as u64) as usize].clone())
            }
        };
        let host =
            |rng: &mut Rng| format!("host-{}", (b'a' + rng.below(HOSTS as u64) as u8) as char);
        let roll = self.rng.below(100);
        let request = match roll {
            0..=14 if names.len() < MAX_VMS || roll < 3 => {
                let name = format!("vm{}", self.rng.below(MAX_VMS as u64 + 1));
                let uuid = self.uuids.get(&name).cloned().unwrap_or_else(|| {
                    let a = self.rng.next();
                    let b = self.rng.next();
                    format!(
                        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
                        a >> 32,
                        (a >> 16) & 0xffff,
                        a & 0xfff,
                        b >> 52,
                        b & 0xffff_ffff_ffff
                    )
                });
                self.uuids.insert(name.clone(), uuid.clone());
                OperatorRequest::Define {
                    xml: domain_xml(&name, &uuid),
                    source: format!("{name}.xml"),
                }
            }
            0..=44 => match pick(&mut self.rng, &names) {
                Some(name) => {
                    let host = self.rng.chance(0.3).then(|| host(&mut self.rng));
                    OperatorRequest::Start { name, host }
                }
                None => OperatorRequest::Hosts,
            },
            45..=54 => match pick(&mut self.rng, &names) {
                Some(name) if self.rng.chance(0.5) => OperatorRequest::Destroy { name },
                Some(name) => OperatorRequest::Shutdown {
                    name,
                    timeout_secs: 5,
                },
                None => OperatorRequest::Hosts,
            },
            55..=74 => match pick(&mut self.rng, &names) {
                Some(name) => OperatorRequest::Migrate {
                    name,
                    to: self.rng.chance(0.3).then(|| host(&mut self.rng)),
                    max_downtime_ms: None,
                    bandwidth_mib_s: None,
                    auto_converge: false,
                    postcopy: false,
                    timeout_secs: self.rng.chance(0.2).then_some(1),
                    copy_storage: self.rng.chance(0.4).then_some(CopyMode::All),
                    allow_unsafe: false,
                },
                None => OperatorRequest::Hosts,
            },
            75..=79 => match pick(&mut self.rng, &names) {
                Some(name) => OperatorRequest::MigrateAbort { name },
                None => OperatorRequest::Hosts,
            },
            80..=82 => OperatorRequest::HostDrain {
                host: host(&mut self.rng),
                parallel: 1 + self.rng.below(2) as u32,
            },
            83..=87 => OperatorRequest::HostUndrain {
                host: host(&mut self.rng),
            },
            88..=91 => match pick(&mut self.rng, &names) {
                Some(name) => OperatorRequest::Undefine { name },
                None => OperatorRequest::Hosts,
            },
            92..=95 => OperatorRequest::List { all: true },
            _ => OperatorRequest::Hosts,
        };
        let id = self.next_op;
        self.next_op += 1;
        self.note(format!("operator #{id}: {}", short(&request)));
        if let OperatorRequest::Undefine { name } = &request {
            // It may vanish from now on; its answer says whether it did.
            let uuid = self.acked_defines.remove(name).unwrap_or_default();
            self.undefining.insert(id, (name.clone(), uuid));
        }
        self.ops.insert(
            id,
            Op {
                request: request.clone(),
                answers: 0,
                issued: self.now,
            },
        );
        let d = self.rng.ms(1, 20);
        let epoch = self.epoch;
        self.at(
            d,
            Ev::ToCore {
                conn: None,
                epoch,
                input: Input::Operator { id, request },
            },
        );
    }

    fn operator_gets(&mut self, id: RequestId, response: OperatorResponse) -> Result<(), String> {
        let Some(op) = self.ops.get_mut(&id) else {
            return Err(format!("answer to unknown request #{id}"));
        };
        op.answers += 1;
        if op.answers > 1 {
            return Err(format!("request #{id} answered {} times", op.answers));
        }
        let ok = !matches!(response, OperatorResponse::Error(_));
        let request = op.request.clone();
        let issued = op.issued;
        self.note(format!(
            "operator #{id} answered: {}",
            short_response(&response)
        ));
        match (&request, &response) {
            (OperatorRequest::Define { .. }, OperatorResponse::Defined { name, uuid, .. }) => {
                // An undefine the coordinator took after it, or one still
                // unanswered, may have removed it.
                let mine = self.processed_at.get(&id).copied().unwrap_or(0);
                let later = self.undefine_processed.get(name).is_some_and(|u| *u > mine);
                if !later && !self.undefining.values().any(|(n, _)| n == name) {
                    self.acked_defines.insert(name.clone(), uuid.clone());
                }
                self.expect.entry(name.clone()).or_insert(Expect::ShutOff);
            }
            (OperatorRequest::Undefine { name }, OperatorResponse::Done(_)) => {
                self.undefining.remove(&id);
                self.expect.remove(name);
            }
            (OperatorRequest::Undefine { .. }, OperatorResponse::Error(e)) => {
                // Refused by the coordinator: it must still be there. Lost in
                // transport: it may or may not be.
                if let Some((name, uuid)) = self.undefining.remove(&id) {
                    if !matches!(e, OperatorError::Unavailable(_)) && !uuid.is_empty() {
                        self.acked_defines.insert(name, uuid);
                    }
                }
            }
            (OperatorRequest::Start { name, .. }, OperatorResponse::Started { .. }) => {
                let faulted = self.faulted.get(name).is_some_and(|t| *t >= issued);
                let e = if faulted {
                    Expect::Either
                } else {
                    Expect::Running
                };
                self.expect.insert(name.clone(), e);
            }
            (
                OperatorRequest::Shutdown { name, .. } | OperatorRequest::Destroy { name },
                OperatorResponse::Done(_),
            ) => {
                self.expect.insert(name.clone(), Expect::ShutOff);
            }
            // A migration that ended, whichever way, leaves the guest running
            // where it was or where it went; one in doubt may have left it paused.
            (OperatorRequest::Migrate { .. }, OperatorResponse::Migrated { outcome, .. })
                if !matches!(outcome, MigrationOutcome::InDoubt { .. }) => {}
            (
                OperatorRequest::Start { name, .. }
                | OperatorRequest::Shutdown { name, .. }
                | OperatorRequest::Destroy { name }
                | OperatorRequest::Migrate { name, .. },
                _,
            ) if (!ok || matches!(response, OperatorResponse::Migrated { .. }))
                && self.expect.contains_key(name) =>
            {
                // An unanswered or failed verb may have half-happened.
                self.expect.insert(name.clone(), Expect::Either);
            }
            _ => {}
        }
        Ok(())
    }

    // ------------------------------------------------------------ faults

    fn fault(&mut self) {
        let w = &self.weights;
        let total = w.partition
            + w.one_way
            + w.agent_crash
            + w.core_crash
            + w.qemu_crash
            + w.reset
            + w.hang;
        if total == 0 {
            return;
        }
        let mut roll = self.rng.below(total);
        let host = self.rng.below(HOSTS as u64) as usize;
        let name = self.hosts[host].name.clone();
        let mut pick = |weight: u64| {
            if roll < weight {
                true
            } else {
                roll -= weight;
                false
            }
        };
        if pick(self.weights.partition) {
            self.note(format!("FAULT two-way partition of {name}"));
            self.hosts[host].cut_in = true;
            self.hosts[host].cut_out = true;
            let d = self.rng.ms(500, 12_000);
            self.at(d, Ev::Heal { host });
        } else if pick(self.weights.one_way) {
            let out = self.rng.chance(0.5);
            self.note(format!(
                "FAULT one-way partition of {name} ({})",
                if out {
                    "host→coordinator"
                } else {
                    "coordinator→host"
                }
            ));
            if out {
                self.hosts[host].cut_out = true;
            } else {
                self.hosts[host].cut_in = true;
            }
            let d = self.rng.ms(500, 12_000);
            self.at(d, Ev::Heal { host });
        } else if pick(self.weights.agent_crash) {
            if self.hosts[host].up() {
                self.note(format!("FAULT agent of {name} crashes"));
                // Its memory goes; its QEMUs and state directory stay.
                let h = &mut self.hosts[host];
                h.core = None;
                h.waiting.clear();
                h.gather = None;
                h.dialing = false;
                h.hung_until = None;
                if let Some((c, _)) = self.hosts[host].session {
                    self.kill_conn(c, "agent crashed");
                }
                let d = self.rng.ms(100, 8000);
                self.at(d, Ev::AgentStart { host });
            }
        } else if pick(self.weights.core_crash) {
            if self.core.is_some() {
                self.crash_core();
            }
        } else if pick(self.weights.qemu_crash) {
            let vms = self.hosts[host].fake.running();
            if !vms.is_empty() {
                let vm = vms[self.rng.below(vms.len() as u64) as usize].clone();
                self.note(format!("FAULT QEMU of {vm} on {name} crashes"));
                self.hosts[host].fake.crash(&vm);
                self.collect_exits(host);
                self.faulted.insert(vm.clone(), self.now);
                if self.expect.contains_key(&vm) {
                    self.expect.insert(vm, Expect::Either);
                }
            }
        } else if pick(self.weights.hang) {
            if self.hosts[host].up() && self.hosts[host].hung_until.is_none() {
                let d = self.rng.ms(500, 15_000);
                self.note(format!(
                    "FAULT agent of {name} hangs for {} ms (SIGSTOP)",
                    d.as_millis()
                ));
                self.hosts[host].hung_until = Some(self.now + d);
            }
        } else if pick(self.weights.reset) {
            if let Some((c, _)) = self.hosts[host].session {
                self.kill_conn(c, "connection reset");
            }
        }
    }

    // ------------------------------------------------------------ the loop

    /// The host an event is for, when only its agent process handles it.
    fn agent_of(ev: &Ev) -> Option<usize> {
        match ev {
            Ev::ToAgent { host, .. }
            | Ev::HelloAck { host, .. }
            | Ev::HeartbeatAck { host, .. }
            | Ev::AgentTick { host }
            | Ev::Dial { host }
            | Ev::HvDone { host, .. }
            | Ev::HostWake { host, .. }
            | Ev::Exits { host, .. } => Some(*host),
            _ => None,
        }
    }

    fn step(&mut self, ev: Ev) -> Result<(), String> {
        // A stopped agent handles nothing until it resumes, then everything.
        if let Some(host) = Self::agent_of(&ev) {
            match self.hosts[host].hung_until {
                Some(t) if t > self.now => {
                    self.at(t - self.now, ev);
                    return Ok(());
                }
                Some(_) => {
                    self.hosts[host].hung_until = None;
                    self.note(format!("agent of {} resumes", self.hosts[host].name));
                }
                None => {}
            }
        }
        match ev {
            Ev::ToCore { conn, epoch, input } => {
                if epoch != self.epoch {
                    // An operator's stream to a coordinator that died meanwhile.
                    if let Input::Operator { id, .. } = input {
                        self.transport_error(id, "connection lost");
                    }
                    return Ok(());
                }
                if let Some(c) = conn {
                    if !self.conns.contains_key(&c) {
                        return Ok(());
                    }
                }
                if let Input::AgentReplied { call, result } = &input {
                    if let Some(c) = conn {
                        if let Some(set) = self.calls.get_mut(&c) {
                            if !set.remove(call) {
                                return Ok(());
                            }
                        }
                    }
                    self.note(format!(
                        "core gets reply to call {call}: {}",
                        match result {
                            Ok((s, r)) => format!("seq {s} {}", short_agent(r)),
                            Err(e) => format!("error {e}"),
                        }
                    ));
                }
                if let Input::Operator { id, request } = &input {
                    self.processed += 1;
                    self.processed_at.insert(*id, self.processed);
                    if let OperatorRequest::Undefine { name } = request {
                        self.undefine_processed.insert(name.clone(), self.processed);
                    }
                    if self.core.is_none() {
                        let id = *id;
                        self.transport_error(id, "connection refused");
                        return Ok(());
                    }
                    self.ops_at_core.insert(*id);
                }
                if let Input::Report {
                    host, seq, facts, ..
                }
                | Input::Register {
                    host,
                    facts,
                    conn: seq,
                } = &input
                {
                    let vms: Vec<String> = facts
                        .vms
                        .iter()
                        .map(|v| format!("{}:{}", v.name, v.state))
                        .collect();
                    if self.last_reported.get(host) != Some(&vms) {
                        self.note(format!("core gets report {seq} of {host}: {vms:?}"));
                        self.last_reported.insert(host.clone(), vms);
                    }
                }
                self.core_input(input);
            }
            Ev::ToAgent {
                host,
                conn,
                call,
                epoch,
                request,
            } => {
                if epoch != self.epoch || !self.conns.contains_key(&conn) || !self.hosts[host].up()
                {
                    return Ok(());
                }
                // A request that overtook the registration's answer waits
                // for it: the agent accepts streams only once registered.
                let h = &self.hosts[host];
                if h.session.is_some_and(|(c, _)| c == conn) && !h.registered {
                    self.at(
                        Duration::from_millis(5),
                        Ev::ToAgent {
                            host,
                            conn,
                            call,
                            epoch,
                            request,
                        },
                    );
                    return Ok(());
                }
                self.note(format!(
                    "{} serves call {call}: {}",
                    self.hosts[host].name,
                    short_agent_req(&request)
                ));
                let h = &mut self.hosts[host];
                let id = h.next_id;
                h.next_id += 1;
                h.waiting.insert(id, Waiter::Call { conn, call, epoch });
                // A resume that fails before `cont` (the agent answers an
                // error and the guest stays paused there): the guest must go
                // on running on its source.
                if matches!(request, AgentRequest::MigrateFinish { .. })
                    && self.weights.refuse_finish > 0
                    && self.rng.chance(0.1 * self.weights.refuse_finish as f64)
                {
                    self.note(format!("FAULT {} refuses to resume", self.hosts[host].name));
                    let response = AgentResponse::Error("console did not answer".into());
                    self.host_reply(host, id, response);
                    return self.check();
                }
                self.host_input(host, HostInput::Request { id, request });
            }
            Ev::HelloAck { host, conn, ack } => {
                if !self.conns.contains_key(&conn) || !self.hosts[host].up() {
                    return Ok(());
                }
                match ack {
                    HelloAck::Accepted {
                        lease_ms,
                        stale,
                        epoch,
                        ..
                    } => {
                        if epoch < self.hosts[host].epoch_seen {
                            self.kill_conn(conn, "refused: a deposed coordinator's epoch");
                            return Ok(());
                        }
                        self.hosts[host].epoch_seen = epoch;
                        self.hosts[host].dialing = false;
                        self.hosts[host].registered = true;
                        let lease = Duration::from_millis(lease_ms);
                        self.hosts[host].lease = Some(lease);
                        // Stale copies die before anything else is served.
                        for name in stale {
                            self.note(format!(
                                "{} kills stale copy of {name}",
                                self.hosts[host].name
                            ));
                            let h = &mut self.hosts[host];
                            let id = h.next_id;
                            h.next_id += 1;
                            h.waiting.insert(id, Waiter::Own);
                            self.host_input(
                                host,
                                HostInput::Request {
                                    id,
                                    request: AgentRequest::Destroy { name },
                                },
                            );
                        }
                        if let Some(sent) = self.hosts[host].hello_sent {
                            let until = self.host_clock(host, sent) + lease;
                            self.host_input(host, HostInput::LeaseRenewed { until });
                        }
                    }
                    HelloAck::Refused(e) => {
                        self.kill_conn(conn, &format!("refused: {e}"));
                    }
                    // One coordinator here: it always leads.
                    HelloAck::NotLeader { .. } => {
                        self.kill_conn(conn, "not the leader");
                    }
                }
            }
            Ev::HeartbeatAck { host, conn } => {
                if self.hosts[host].session.is_some_and(|(c, _)| c == conn) {
                    // Renewed from when the heartbeat was sent, on the
                    // host's clock.
                    if let (Some(sent), Some(lease)) =
                        (self.hosts[host].heartbeat_out, self.hosts[host].lease)
                    {
                        let until = self.host_clock(host, sent) + lease;
                        self.host_input(host, HostInput::LeaseRenewed { until });
                    }
                    self.hosts[host].heartbeat_out = None;
                }
            }
            Ev::KeeperPoll { host } => self.keeper_poll(host),
            Ev::AgentTick { host } => {
                self.at(HEARTBEAT, Ev::AgentTick { host });
                if !self.hosts[host].up() {
                    return Ok(());
                }
                if let Some(sent) = self.hosts[host].heartbeat_out {
                    if self.now.saturating_sub(sent) >= HEARTBEAT_ANSWER {
                        if let Some((c, _)) = self.hosts[host].session {
                            self.kill_conn(c, "heartbeat unanswered");
                        }
                    }
                    return Ok(());
                }
                // Still gathering the last facts (or the registration's), or
                // not registered yet: heartbeats start after the answer.
                if self.hosts[host].gather.is_some() || !self.hosts[host].registered {
                    return Ok(());
                }
                if let Some((conn, seq)) = self.hosts[host].session.as_mut() {
                    // Numbered before gathering: an action answered after
                    // this may or may not show in these facts.
                    *seq += 1;
                    let (conn, seq) = (*conn, *seq);
                    self.start_gather(host, conn, Some(seq));
                }
            }
            Ev::Dial { host } => {
                let h = &self.hosts[host];
                if !h.up() || h.session.is_some() {
                    self.hosts[host].dialing = false;
                    return Ok(());
                }
                if h.cut_in || h.cut_out || self.core.is_none() {
                    let d = self.rng.ms(250, 1000);
                    self.at(d, Ev::Dial { host });
                    return Ok(());
                }
                let conn = self.next_conn;
                self.next_conn += 1;
                self.conns.insert(conn, host);
                self.detail(format!("{} connects: conn {conn}", self.hosts[host].name));
                let h = &mut self.hosts[host];
                h.session = Some((conn, 0));
                h.registered = false;
                h.heartbeat_out = None;
                h.dialing = false;
                // The registration's facts are number 0 of this connection.
                self.start_gather(host, conn, None);
            }
            Ev::CoreTick => {
                self.at(HEARTBEAT, Ev::CoreTick);
                self.core_input(Input::Tick);
            }
            Ev::CoreWake { epoch } => {
                if epoch == self.epoch {
                    self.wake_at = None;
                    self.core_input(Input::Tick);
                }
            }
            Ev::OperatorGets { id, response } => self.operator_gets(id, response)?,
            Ev::Operator => {
                if self.active() {
                    self.operator();
                    let d = self.rng.ms(10, self.weights.operator_rate_ms);
                    self.at(d, Ev::Operator);
                }
            }
            Ev::Fault => {
                if self.active() {
                    self.fault();
                    let d = self.rng.ms(500, 4000);
                    self.at(d, Ev::Fault);
                }
            }
            Ev::Heal { host } => {
                self.note(format!("heal {}", self.hosts[host].name));
                self.hosts[host].cut_in = false;
                self.hosts[host].cut_out = false;
            }
            Ev::AgentStart { host } => {
                if self.hosts[host].up() {
                    return Ok(());
                }
                self.note(format!("agent of {} starts", self.hosts[host].name));
                self.boot_agent(host);
                self.hosts[host].dialing = true;
                self.at(Duration::from_millis(1), Ev::Dial { host });
            }
            Ev::CoreStart => {
                if self.core.is_some() {
                    return Ok(());
                }
                let records: Vec<String> = self
                    .store
                    .list()
                    .unwrap_or_default()
                    .iter()
                    .map(|r| {
                        let dest = r.migrating_to.as_deref().map(|d| format!("→{d}"));
                        let on = r.placement.as_deref().unwrap_or("-");
                        format!("{}@{on}{}", r.name, dest.unwrap_or_default())
                    })
                    .collect();
                self.note(format!("coordinator starts over records {records:?}"));
                self.start_core();
            }
            Ev::HvDone {
                host,
                life,
                op,
                result,
                watch,
            } => {
                if life != self.hosts[host].life {
                    return Ok(());
                }
                // A QEMU that died while it was being launched or attached
                // to fails the operation, as its monitor closes.
                let result = match (watch, result) {
                    (Some((vm, pid)), r @ (HvResult::Launched { .. } | HvResult::Done)) => {
                        let pid = match (&r, pid) {
                            (HvResult::Launched { pid }, _) => Some(*pid),
                            (_, pid) => pid,
                        };
                        let alive = self.hosts[host]
                            .fake
                            .process(&vm)
                            .is_some_and(|p| Some(p.pid) == pid);
                        match (alive, r) {
                            (true, r) => r,
                            (false, HvResult::Launched { .. }) => {
                                self.hosts[host].fake.abandon_launch(&vm);
                                HvResult::Failed(format!("QEMU of '{vm}' exited"))
                            }
                            // The real hypervisor checks the process when
                            // its monitor does not answer.
                            (false, _) => HvResult::Exited,
                        }
                    }
                    (_, r) => r,
                };
                self.host_input(host, HostInput::HvDone { op, result });
            }
            Ev::HostWake { host, life } => {
                if life == self.hosts[host].life {
                    self.host_input(host, HostInput::Tick);
                }
            }
            Ev::Exits { host, life, exits } => {
                if life == self.hosts[host].life {
                    for exit in exits {
                        self.host_input(host, exit);
                    }
                }
            }
            Ev::MigrationLands { host, vm, pid, nth } => {
                let fake = self.hosts[host].fake.clone();
                let Some(p) = fake.process(&vm) else {
                    return Ok(());
                };
                if p.pid != pid || migrate_commands(&p.commands) != nth {
                    return Ok(());
                }
                if fake.complete_migration(&vm) {
                    self.note(format!(
                        "migration of {vm} from {} lands",
                        self.hosts[host].name
                    ));
                } else if p
                    .migration
                    .as_ref()
                    .is_some_and(|m| matches!(m.status.as_str(), "active" | "postcopy-active"))
                {
                    // Nobody listens any more: the stream breaks.
                    fake.fail_migration(&vm, "Connection reset by peer");
                    self.note(format!(
                        "migration of {vm} from {} fails: nobody listens",
                        self.hosts[host].name
                    ));
                }
            }
            Ev::CoreNoticesDeath { conn, host, epoch } => {
                if epoch != self.epoch {
                    return Ok(());
                }
                // Every call still waiting on the connection fails.
                let calls = self.calls.remove(&conn).unwrap_or_default();
                for call in calls {
                    self.core_input(Input::AgentReplied {
                        call,
                        result: Err("connection lost".into()),
                    });
                }
                let name = self.hosts[host].name.clone();
                self.core_input(Input::Disconnected { host: name, conn });
            }
        }
        self.check()
    }

    // ------------------------------------------------------------ checker

    /// Every QEMU of `vm` on every host, with its run state: the truth,
    /// read from the fakes.
    fn copies(&self, vm: &str) -> Vec<(&str, String)> {
        self.hosts
            .iter()
            .filter_map(|h| h.fake.process(vm).map(|p| (h.name.as_str(), p.status)))
            .collect()
    }

    fn check(&self) -> Result<(), String> {
        if let Some(m) = self.bad_moves.first() {
            return Err(m.clone());
        }
        for h in &self.hosts {
            if let Some(c) = h.fake.collisions().first() {
                return Err(format!(
                    "{}: a launch wanted a device another VM holds ({c})",
                    h.name
                ));
            }
            if let Some(v) = h.fake.stale_disks().first() {
                return Err(format!("{}: {v}", h.name));
            }
        }
        // An up macvtap carries the guest MAC (the host's IPv6 sends from
        // it): a waiting destination's stays down while the guest runs on
        // another host. (A completed source takes its own down when it
        // learns of the completion; one that learns late keeps it up until
        // its QEMU quits and the record goes, as libvirt's does.)
        for h in &self.hosts {
            for (dev, d) in h.fake.devices() {
                if !(d.macvtap && d.up) {
                    continue;
                }
                let here = h.fake.process(&d.vm).map(|p| p.status);
                if !matches!(here.as_deref(), Some("inmigrate" | "paused")) {
                    continue;
                }
                if let Some((other, _)) = self
                    .copies(&d.vm)
                    .into_iter()
                    .find(|(host, status)| *host != h.name && status == "running")
                {
                    return Err(format!(
                        "{} has {dev} up with {}'s MAC while {} runs it",
                        h.name, d.vm, other
                    ));
                }
            }
        }
        let mut running: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for h in &self.hosts {
            for vm in h.fake.running() {
                if h.fake.process(&vm).is_some_and(|p| p.status == "running") {
                    running.entry(vm).or_default().push(&h.name);
                }
            }
        }
        for (vm, hosts) in &running {
            if hosts.len() > 1 {
                return Err(format!(
                    "VM {vm} runs on {} hosts at once: {hosts:?}",
                    hosts.len()
                ));
            }
        }
        for (name, uuid) in &self.acked_defines {
            match self.store.get(name) {
                Ok(Some(row)) if &row.uuid == uuid => {}
                other => return Err(format!("acknowledged define of {name} lost: {other:?}")),
            }
        }
        Ok(())
    }

    fn final_check(&self) -> Result<(), String> {
        for (id, op) in &self.ops {
            if op.answers != 1 {
                return Err(format!(
                    "request #{id} ({}) got {} answers",
                    short(&op.request),
                    op.answers
                ));
            }
        }
        for h in &self.hosts {
            for (dev, d) in h.fake.devices() {
                if h.fake.process(&d.vm).is_none() {
                    return Err(format!(
                        "{} still has {dev} of {}, which runs nowhere there",
                        h.name, d.vm
                    ));
                }
            }
        }
        let rows = self.store.list().map_err(|e| e.to_string())?;
        let lifecycles: BTreeMap<&str, &VmLifecycle> = self
            .core
            .as_ref()
            .map(|c| c.lifecycles().collect())
            .unwrap_or_default();
        // Room for an HA VM: a host the scheduler may use (memory is ample).
        let room = self
            .store
            .hosts()
            .map_err(|e| e.to_string())?
            .iter()
            .any(|h| !h.draining);
        for row in &rows {
            let copies = self.copies(&row.name);
            let life = lifecycles.get(row.name.as_str());
            let ha = flotilla_shared::xml::Domain::parse(&row.name, &row.xml)
                .is_ok_and(|d| d.model.ha());
            let running = copies.iter().any(|c| c.1 == "running");
            if ha && row.want_running && !running && room {
                return Err(format!(
                    "HA VM {} is owed a restart ({life:?}) but its QEMUs are {copies:?}, \
                     with room to run it",
                    row.name
                ));
            }
            match &row.placement {
                Some(h) => {
                    if copies.len() != 1 || copies[0].0 != h {
                        return Err(format!(
                            "{} is recorded on {h} ({life:?}) but its QEMUs are {copies:?}",
                            row.name
                        ));
                    }
                }
                None => {
                    if !copies.is_empty() {
                        return Err(format!(
                            "{} is recorded shut off ({life:?}) but its QEMUs are {copies:?}",
                            row.name
                        ));
                    }
                }
            }
            match self.expect.get(&row.name) {
                Some(Expect::Running)
                    if copies.first().map(|c| c.1.as_str()) != Some("running") =>
                {
                    return Err(format!(
                        "{} was started or moved, with no fault since, but its QEMUs are {copies:?}",
                        row.name
                    ))
                }
                Some(Expect::ShutOff) if !copies.is_empty() => {
                    return Err(format!("{} was stopped but its QEMUs are {copies:?}", row.name))
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn run(&mut self) -> Result<(), String> {
        let end = ACTIVE + SETTLE;
        let mut healed = false;
        while let Some(Reverse((t, id))) = self.queue.pop() {
            if t > end {
                break;
            }
            self.now = t;
            if !healed && t >= ACTIVE {
                healed = true;
                self.note("faults stop; everything heals".into());
                for h in 0..HOSTS {
                    self.hosts[h].cut_in = false;
                    self.hosts[h].cut_out = false;
                    if !self.hosts[h].up() {
                        self.at(Duration::ZERO, Ev::AgentStart { host: h });
                    }
                }
                if self.core.is_none() {
                    self.at(Duration::ZERO, Ev::CoreStart);
                }
            }
            let Some(ev) = self.events.remove(&id) else {
                continue;
            };
            self.steps += 1;
            self.step(ev)?;
        }
        self.final_check()
    }
}

fn short(r: &OperatorRequest) -> String {
    match r {
        OperatorRequest::Define { source, .. } => format!("define {source}"),
        other => format!("{other:?}"),
    }
}

fn short_response(r: &OperatorResponse) -> String {
    let s = format!("{r:?}");
    s.chars().take(160).collect()
}

fn short_agent(r: &AgentResponse) -> String {
    match r {
        AgentResponse::Started { vm, .. } => format!("Started {}", vm.name),
        AgentResponse::Incoming { vm, .. } => format!("Incoming {}", vm.name),
        AgentResponse::Migration(p) => format!("Migration {}", p.status),
        other => format!("{other:?}").chars().take(100).collect(),
    }
}

/// How many `migrate` commands a QEMU received.
fn migrate_commands(commands: &[QmpCommand]) -> usize {
    commands
        .iter()
        .filter(|c| matches!(c, QmpCommand::Migrate { .. }))
        .count()
}

fn short_hv(c: &HvCall) -> String {
    match c {
        HvCall::Launch(plan) => format!("Launch({}, {:?})", plan.name, plan.mode),
        HvCall::WriteRecord { record, .. } => format!("WriteRecord({})", record.name),
        HvCall::Qmp { vm, cmd, .. } => format!("Qmp({vm}, {})", cmd.name()),
        other => format!("{other:?}").chars().take(100).collect(),
    }
}

fn short_agent_req(r: &AgentRequest) -> String {
    match r {
        AgentRequest::Start { source, .. } => format!("Start({source})"),
        AgentRequest::MigrateIncoming { source, .. } => format!("MigrateIncoming({source})"),
        other => format!("{other:?}"),
    }
}

/// Runs one seed; on failure, the seed and the trace.
fn run_seed(seed: u64) -> Result<(u64, HaStats), String> {
    let mut w = World::new(seed);
    match w.run() {
        Ok(()) => Ok((w.steps, w.ha_stats)),
        Err(e) => {
            let trace: Vec<String> = w.trace.iter().cloned().collect();
            Err(format!(
                "seed {seed} (replay: FLOTILLA_SIM_SEED={seed}): {e}\nlast {} steps:\n{}",
                trace.len(),
                trace.join("\n")
            ))
        }
    }
}

#[test]
fn fleet_simulation_keeps_its_invariants() {
    if let Some(seed) = std::env::var("FLOTILLA_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        match run_seed(seed) {
            Ok((steps, ha)) => println!("seed {seed}: ok ({steps} steps, {ha:?})"),
            Err(e) => panic!("{e}"),
        }
        return;
    }
    let wanted: Option<u64> = std::env::var("FLOTILLA_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let began = Instant::now();
    let budget = Duration::from_secs(60);
    let (mut seeds, mut steps) = (0u64, 0u64);
    let mut ha = HaStats::default();
    // Splits a long run across processes (one per core).
    let first: u64 = std::env::var("FLOTILLA_SIM_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    loop {
        let done = match wanted {
            Some(n) => seeds >= n,
            None => seeds >= 500 && began.elapsed() >= budget,
        };
        if done {
            break;
        }
        match run_seed(first + seeds) {
            Ok((s, h)) => {
                steps += s;
                ha.fenced += h.fenced;
                ha.restarted += h.restarted;
                ha.keeper_kills += h.keeper_kills;
            }
            Err(e) => panic!("{e}"),
        }
        seeds += 1;
    }
    println!(
        "simulation: {seeds} seeds, {steps} steps, 0 violations in {:.1}s; \
         {} hosts fenced, {} HA restarts, {} HA guests killed by fence keepers",
        began.elapsed().as_secs_f64(),
        ha.fenced,
        ha.restarted,
        ha.keeper_kills
    );
}
