//! `Fleet`: the actix shell around [`FleetCore`].
//!
//! Connection tasks ([`crate::server`]) send it registrations, reports,
//! disconnects and operator requests. It numbers them, passes them to the
//! core as [`Input`]s and carries out the [`Effect`]s that come back: agent
//! calls over quinn, answers to operators, event lines, metrics, wake-ups.
//!
//! The core runs on a thread of its own, so its synchronous store writes
//! never stall the thread that serves QUIC. It takes every input already
//! queued as one batch inside a store group, so a batch costs one fsync,
//! and hands the batch's effects over only once that fsync returned. Inputs reach
//! it in the order this actor sends them and effects come back in the order
//! the core made them, so "record, then send" and "progress lines, then the
//! outcome line" survive the hop.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use flotilla_shared::net::quic;
use flotilla_shared::proto::{
    AgentReply, HelloAck, HostFacts, MigrationProgress, OperatorError, OperatorRequest,
    OperatorResponse,
};
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::events::EventLog;
pub use crate::fleet_core::FleetSettings;
use crate::fleet_core::{ConnId, ConsoleTarget, Effect, FleetCore, Input, Metric, RequestId};
use crate::store::{Store, StoreError};

/// The most inputs one group commit takes: bounds the wait of the first.
const BATCH_MAX: usize = 512;

/// How often the core gets a tick for gauges and host transitions.
const TICK: Duration = Duration::from_secs(1);

/// Where an operator request's answer and streamed lines go.
struct OperatorSinks {
    reply: oneshot::Sender<OperatorResponse>,
    progress: Option<tmpsc::UnboundedSender<MigrationProgress>>,
    notes: Option<tmpsc::UnboundedSender<String>>,
}

/// The coordinator actor.
pub struct Fleet {
    core: mpsc::Sender<Input>,
    core_thread: Option<(FleetCore, Arc<dyn Store>, std::thread::Builder)>,
    conns: BTreeMap<ConnId, quinn::Connection>,
    hellos: BTreeMap<ConnId, oneshot::Sender<HelloAck>>,
    /// Heartbeats waiting for the core to say whether it applied them.
    reports: BTreeMap<(ConnId, u64), oneshot::Sender<bool>>,
    operators: BTreeMap<RequestId, OperatorSinks>,
    next_request: RequestId,
    events: EventLog,
    inputs: Option<mpsc::Receiver<Input>>,
    /// The earliest wake-up already scheduled.
    wake: Option<Instant>,
    /// Web console lookups waiting for the core.
    console_routes: BTreeMap<RequestId, oneshot::Sender<Result<ConsoleLink, OperatorError>>>,
    /// Completed migrations, for web consoles to follow their guest.
    moves: tokio::sync::broadcast::Sender<Moved>,
}

/// A completed migration: `vm` runs on `to` now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// The VM.
    pub vm: String,
    /// Where it ran.
    pub from: String,
    /// Where it runs now.
    pub to: String,
}

/// Where to open a VM's console relay: its host's agent connection.
#[derive(Debug, Clone)]
pub struct ConsoleLink {
    /// The host that runs the VM.
    pub host: String,
    /// Its agent's connection.
    pub conn: quinn::Connection,
    /// The console password, for the coordinator's side of the handshake.
    pub password: Option<String>,
}

/// Where is `name`'s VNC console now?
#[derive(Message)]
#[rtype(result = "Result<ConsoleLink, OperatorError>")]
pub struct ConsoleCall {
    /// The VM.
    pub name: String,
    /// Its serial console rather than its VNC display.
    pub serial: bool,
}

/// An operator's event request, with the sink for the lines.
#[derive(Message)]
#[rtype(result = "()")]
pub struct EventsCall {
    /// Keep sending new events.
    pub follow: bool,
    /// Where lines go.
    pub sink: tmpsc::UnboundedSender<String>,
}

/// An operator's request, with sinks for what it streams before its answer.
#[derive(Message)]
#[rtype(result = "OperatorResponse")]
pub struct OperatorCall {
    /// The operator's certificate name, for the log.
    pub operator: String,
    /// The request.
    pub request: OperatorRequest,
    /// A migration's progress samples.
    pub progress: Option<tmpsc::UnboundedSender<MigrationProgress>>,
    /// A drain's per-VM lines.
    pub notes: Option<tmpsc::UnboundedSender<String>>,
}

/// A host registered over `conn`.
#[derive(Message)]
#[rtype(result = "HelloAck")]
pub struct Register {
    /// What it reported.
    pub facts: HostFacts,
    /// Its connection, for sending it requests.
    pub conn: quinn::Connection,
}

/// A heartbeat: true once the core applied its report (only then may it
/// be acknowledged, since the acknowledgement renews the host's lease).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Heartbeat {
    /// The host, as its certificate names it.
    pub host: String,
    /// Its connection's `stable_id`.
    pub conn: usize,
    /// Its number in the connection's sequence.
    pub seq: u64,
    /// What it reports.
    pub facts: HostFacts,
}

/// A numbered exit from a registered host (heartbeats come as [`Heartbeat`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct VmExited {
    /// The host, as its certificate names it.
    pub host: String,
    /// Its connection's `stable_id`.
    pub conn: usize,
    /// Its number in the connection's sequence.
    pub seq: u64,
    /// The VM.
    pub name: String,
    /// Why its QEMU went away.
    pub reason: String,
}

/// A host's connection ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnected {
    /// The host.
    pub host: String,
    /// Which connection (a newer one may already have replaced it).
    pub stable_id: usize,
}

/// Effects from the core thread.
#[derive(Message)]
#[rtype(result = "()")]
struct Effects(Vec<Effect>);

impl Fleet {
    /// A fleet over the core's store, its mirrors loaded from it.
    ///
    /// A store that cannot be read refuses the start: empty mirrors would
    /// overcommit hosts and write a drained host back as undrained.
    pub fn new(store: Arc<dyn Store>, settings: FleetSettings) -> Result<Self, StoreError> {
        let core = FleetCore::new(store.clone(), settings)?;
        let (tx, rx) = mpsc::channel();
        Ok(Fleet {
            core: tx,
            core_thread: Some((
                core,
                store,
                std::thread::Builder::new().name("fleet-core".into()),
            )),
            conns: BTreeMap::new(),
            hellos: BTreeMap::new(),
            reports: BTreeMap::new(),
            operators: BTreeMap::new(),
            next_request: 1,
            events: EventLog::default(),
            inputs: Some(rx),
            wake: None,
            console_routes: BTreeMap::new(),
            moves: tokio::sync::broadcast::channel(64).0,
        })
    }

    /// Where completed migrations are announced; subscribe before starting.
    pub fn moves(&self) -> tokio::sync::broadcast::Sender<Moved> {
        self.moves.clone()
    }

    fn input(&self, input: Input) {
        if self.core.send(input).is_err() {
            tracing::error!("the fleet core thread is gone");
        }
    }

    fn carry_out(&mut self, effect: Effect, ctx: &mut Context<Self>) {
        match effect {
            Effect::Hello { conn, ack } => {
                if let Some(tx) = self.hellos.remove(&conn) {
                    let _ = tx.send(ack);
                }
            }
            Effect::ReportAnswer {
                conn,
                seq,
                accepted,
            } => {
                if let Some(tx) = self.reports.remove(&(conn, seq)) {
                    let _ = tx.send(accepted);
                }
            }
            Effect::Call {
                call,
                conn,
                request,
                timeout,
                ..
            } => {
                let core = self.core.clone();
                let Some(c) = self.conns.get(&conn).cloned() else {
                    let _ = core.send(Input::AgentReplied {
                        call,
                        result: Err("connection closed".into()),
                    });
                    return;
                };
                actix::spawn(async move {
                    let result = quic::call::<_, AgentReply>(&c, &request, timeout)
                        .await
                        .map(|r| (r.seq, r.response))
                        .map_err(|e| e.to_string());
                    let _ = core.send(Input::AgentReplied { call, result });
                });
            }
            Effect::Close { conn, .. } => {
                if let Some(c) = self.conns.remove(&conn) {
                    c.close(2u32.into(), b"request unanswered; register again");
                }
            }
            Effect::Reply { id, response } => {
                if let Some(s) = self.operators.remove(&id) {
                    let _ = s.reply.send(response);
                }
            }
            Effect::Progress { id, progress } => {
                if let Some(tx) = self.operators.get(&id).and_then(|s| s.progress.as_ref()) {
                    // A gone operator (Ctrl-C'd CLI) must not stop the migration.
                    let _ = tx.send(progress);
                }
            }
            Effect::Note { id, line } => {
                if let Some(tx) = self.operators.get(&id).and_then(|s| s.notes.as_ref()) {
                    let _ = tx.send(line);
                }
            }
            Effect::Event(line) => self.events.emit(SystemTime::now(), &line),
            Effect::ConsoleRoute { id, result } => {
                if let Some(tx) = self.console_routes.remove(&id) {
                    let _ = tx.send(result.and_then(|t| self.console_link(t)));
                }
            }
            Effect::Moved { vm, from, to } => {
                // Nobody watching is fine: no web console is open.
                let _ = self.moves.send(Moved { vm, from, to });
            }
            Effect::Metric(m) => record(m),
            Effect::WakeAt(at) => {
                if self.wake.is_some_and(|w| w <= at && w > Instant::now()) {
                    return;
                }
                self.wake = Some(at);
                ctx.run_later(at.saturating_duration_since(Instant::now()), |act, _| {
                    act.wake = None;
                    act.input(Input::Tick);
                });
            }
        }
    }
}

impl Fleet {
    fn console_link(&self, t: ConsoleTarget) -> Result<ConsoleLink, OperatorError> {
        let conn = self
            .conns
            .get(&t.conn)
            .cloned()
            .ok_or(OperatorError::HostUnreachable {
                host: t.host.clone(),
            })?;
        Ok(ConsoleLink {
            host: t.host,
            conn,
            password: t.password,
        })
    }
}

fn record(m: Metric) {
    match m {
        Metric::Start(outcome) => {
            metrics::counter!("flotilla_starts_total", "outcome" => outcome).increment(1)
        }
        Metric::StartSeconds(s) => metrics::histogram!("flotilla_start_seconds").record(s),
        Metric::SchedulingSeconds(s) => {
            metrics::histogram!("flotilla_scheduling_seconds").record(s)
        }
        Metric::Migration(outcome) => {
            metrics::counter!("flotilla_migrations_total", "outcome" => outcome).increment(1)
        }
        Metric::HostFenced(how) => {
            metrics::counter!("flotilla_hosts_fenced_total", "how" => how).increment(1)
        }
        Metric::HaRestartSeconds(s) => metrics::histogram!("flotilla_ha_restart_seconds").record(s),
        Metric::Gauges {
            hosts,
            vms,
            migrations,
        } => {
            for (state, n) in hosts {
                metrics::gauge!("flotilla_hosts", "state" => state).set(n as f64);
            }
            for (state, n) in vms {
                metrics::gauge!("flotilla_vms", "state" => state).set(n as f64);
            }
            metrics::gauge!("flotilla_migrations_in_progress").set(migrations as f64);
        }
    }
}

impl Actor for Fleet {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let (Some((mut core, store, builder)), Some(inputs)) =
            (self.core_thread.take(), self.inputs.take())
        {
            let addr = ctx.address();
            let spawned = builder.spawn(move || {
                // Group commit: every input already queued joins the batch,
                // its writes share one fsync, and its effects leave only
                // after that.
                while let Ok(first) = inputs.recv() {
                    store.begin_group();
                    let mut effects = Vec::new();
                    let mut next = Some(first);
                    let mut taken = 0;
                    while let Some(input) = next {
                        let handled =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                core.handle(Instant::now(), input)
                            }));
                        match handled {
                            Ok(more) => effects.extend(more),
                            Err(_) => {
                                // Without its core the coordinator can answer
                                // no one: exit, so the supervisor restarts it
                                // over the durable store, rather than leave
                                // every caller waiting.
                                tracing::error!("the fleet core panicked; exiting");
                                std::process::exit(70);
                            }
                        }
                        taken += 1;
                        next = (taken < BATCH_MAX).then(|| inputs.try_recv().ok()).flatten();
                    }
                    if let Err(e) = store.end_group() {
                        // The core believes writes the disk may not hold: no
                        // effect of this batch may leave, and the core cannot
                        // take them back. Exit; a restart reloads the store.
                        tracing::error!(error = %e, "the store could not make a batch durable; exiting");
                        std::process::exit(74);
                    }
                    if !effects.is_empty() {
                        addr.do_send(Effects(effects));
                    }
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the fleet core thread");
                ctx.stop();
            }
        }
        ctx.run_interval(TICK, |act, _| act.input(Input::Tick));
    }
}

impl Handler<Effects> for Fleet {
    type Result = ();

    fn handle(&mut self, Effects(effects): Effects, ctx: &mut Self::Context) {
        for e in effects {
            self.carry_out(e, ctx);
        }
    }
}

impl Handler<Register> for Fleet {
    type Result = ResponseFuture<HelloAck>;

    fn handle(&mut self, msg: Register, _: &mut Self::Context) -> Self::Result {
        let conn = msg.conn.stable_id() as ConnId;
        let (tx, rx) = oneshot::channel();
        self.hellos.insert(conn, tx);
        self.conns.insert(conn, msg.conn);
        self.input(Input::Register {
            host: msg.facts.host.clone(),
            facts: msg.facts,
            conn,
        });
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| HelloAck::Refused("coordinator shutting down".into()))
        })
    }
}

impl Handler<Heartbeat> for Fleet {
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, msg: Heartbeat, _: &mut Self::Context) -> Self::Result {
        let conn = msg.conn as ConnId;
        let (tx, rx) = oneshot::channel();
        self.reports.insert((conn, msg.seq), tx);
        self.input(Input::Report {
            host: msg.host,
            conn,
            seq: msg.seq,
            facts: msg.facts,
        });
        Box::pin(async move { rx.await.unwrap_or(false) })
    }
}

impl Handler<VmExited> for Fleet {
    type Result = ();

    fn handle(&mut self, msg: VmExited, _: &mut Self::Context) {
        self.input(Input::VmStopped {
            host: msg.host,
            conn: msg.conn as ConnId,
            seq: msg.seq,
            name: msg.name,
            reason: msg.reason,
        });
    }
}

impl Handler<Disconnected> for Fleet {
    type Result = ();

    fn handle(&mut self, msg: Disconnected, _: &mut Self::Context) {
        let conn = msg.stable_id as ConnId;
        self.conns.remove(&conn);
        self.hellos.remove(&conn);
        self.reports.retain(|(c, _), _| *c != conn);
        self.input(Input::Disconnected {
            host: msg.host,
            conn,
        });
    }
}

impl Handler<OperatorCall> for Fleet {
    type Result = ResponseFuture<OperatorResponse>;

    fn handle(&mut self, call: OperatorCall, _: &mut Self::Context) -> Self::Result {
        tracing::debug!(operator = %call.operator, request = ?call.request, "operator request");
        let id = self.next_request;
        self.next_request += 1;
        let (tx, rx) = oneshot::channel();
        self.operators.insert(
            id,
            OperatorSinks {
                reply: tx,
                progress: call.progress,
                notes: call.notes,
            },
        );
        self.input(Input::Operator {
            id,
            request: call.request,
        });
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                OperatorResponse::Error(OperatorError::Unavailable("shutting down".into()))
            })
        })
    }
}

impl Handler<ConsoleCall> for Fleet {
    type Result = ResponseFuture<Result<ConsoleLink, OperatorError>>;

    fn handle(&mut self, call: ConsoleCall, _: &mut Self::Context) -> Self::Result {
        let id = self.next_request;
        self.next_request += 1;
        let (tx, rx) = oneshot::channel();
        self.console_routes.insert(id, tx);
        self.input(Input::ConsoleRoute {
            id,
            name: call.name,
            serial: call.serial,
        });
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(OperatorError::Unavailable("shutting down".into())))
        })
    }
}

impl Handler<EventsCall> for Fleet {
    type Result = ();

    fn handle(&mut self, call: EventsCall, _: &mut Self::Context) {
        self.events.subscribe(call.sink, call.follow);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::Policy;
    use crate::store::{HostRow, NewDefinition, Store, VmRow};

    /// A store whose every read fails, as a damaged database would.
    struct Unreadable;

    fn broken<T>() -> Result<T, StoreError> {
        Err(StoreError::Backend("unreadable".into()))
    }

    impl Store for Unreadable {
        fn define(&self, _: NewDefinition) -> Result<VmRow, StoreError> {
            broken()
        }
        fn undefine(&self, _: &str) -> Result<(), StoreError> {
            broken()
        }
        fn get(&self, _: &str) -> Result<Option<VmRow>, StoreError> {
            broken()
        }
        fn list(&self) -> Result<Vec<VmRow>, StoreError> {
            broken()
        }
        fn update_row(&self, _: &str, _: &mut dyn FnMut(&mut VmRow)) -> Result<VmRow, StoreError> {
            broken()
        }
        fn put_host(&self, _: &HostRow, _: bool) -> Result<(), StoreError> {
            broken()
        }
        fn get_host(&self, _: &str) -> Result<Option<HostRow>, StoreError> {
            broken()
        }
        fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
            broken()
        }
    }

    #[test]
    fn a_store_that_cannot_be_read_refuses_the_start() {
        let settings = FleetSettings {
            heartbeat: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            policy: Policy::default(),
            token_seed: 7,
            fencing: Default::default(),
            epoch: 0,
        };
        // Empty mirrors would overcommit hosts and undrain drained ones.
        match Fleet::new(std::sync::Arc::new(Unreadable), settings) {
            Err(e) => assert_eq!(e.to_string(), "store: unreadable"),
            Ok(_) => panic!("a fleet started over an unreadable store"),
        }
    }
}
