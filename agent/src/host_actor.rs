//! `HostAgent`: the actix shell around [`HostCore`].
//!
//! Every decision is the core's. This actor turns each [`AgentCall`] into a
//! [`HostInput::Request`] (keeping the caller's reply channel by request id),
//! carries out each [`HostEffect::Hv`] on the real [`QemuHypervisor`] in a
//! future of its own and feeds the result back as [`HostInput::HvDone`],
//! turns [`HostEffect::WakeAt`] into a timer that feeds [`HostInput::Tick`],
//! and forwards the hypervisor's QEMU exits as [`HostInput::VmExited`].
//! Hypervisor calls run concurrently with each other and with new requests,
//! so a slow start never holds up a migration-status poll.
//!
//! At actor start the core is booted: it scans the state directory and
//! re-attaches to every recorded QEMU still running before it serves any
//! request (requests that arrive meanwhile wait in the core).

use std::collections::HashMap;
use std::time::Instant;

use actix::prelude::*;
use tokio::sync::{mpsc, oneshot};

use crate::control::{AgentCall, Response};
use crate::host_core::{HostCore, HostEffect, HostInput, Hypervisor as _};
use crate::host_networks::HostNetworks;
use crate::qemu_hypervisor::{QemuHypervisor, VmExit};

pub use crate::host_core::AgentSettings;

/// The host agent actor.
pub struct HostAgent {
    core: HostCore,
    /// Petted each second while the fence holds.
    watchdog: Option<crate::watchdog::Watchdog>,
    /// The watchdog went unpetted (logged once per lapse).
    unpetted: bool,
    hv: QemuHypervisor,
    exits: Option<mpsc::UnboundedReceiver<VmExit>>,
    replies: HashMap<u64, oneshot::Sender<Response>>,
    next_id: u64,
}

/// A QEMU exit reported by the hypervisor's watcher.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Exited(VmExit);

impl HostAgent {
    /// A host agent; with `reattach`, it takes over running VMs when started.
    ///
    /// Without it (one-shot starts) it only reserves their ports.
    pub fn new(settings: AgentSettings, networks: HostNetworks, reattach: bool) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        HostAgent {
            core: HostCore::new(settings, networks, reattach, Box::new(port_is_free)),
            watchdog: None,
            unpetted: false,
            hv: QemuHypervisor::new(tx),
            exits: Some(rx),
            replies: HashMap::new(),
            next_id: 1,
        }
    }

    /// Pets `watchdog` once a second while the fence holds.
    pub fn with_watchdog(mut self, watchdog: crate::watchdog::Watchdog) -> Self {
        self.watchdog = Some(watchdog);
        self
    }

    /// A deliberate stop: the watchdog disarms instead of resetting the host.
    pub fn disarm_watchdog(&mut self) {
        if let Some(w) = self.watchdog.take() {
            w.disarm();
        }
    }

    fn pet_watchdog(&mut self) {
        let holds = self.core.fence_holds(Instant::now());
        let Some(w) = self.watchdog.as_mut() else {
            return;
        };
        if holds {
            w.pet();
            self.unpetted = false;
        } else if !self.unpetted {
            self.unpetted = true;
            tracing::error!(
                "not petting the watchdog: the lease lapsed and an HA guest still runs; \
                 the host resets unless it dies first"
            );
        }
    }

    /// Feeds one input to the core and carries out what it returns.
    fn feed(&mut self, input: HostInput, ctx: &mut Context<Self>) {
        for effect in self.core.handle(Instant::now(), input) {
            match effect {
                HostEffect::Reply { id, response } => {
                    if let Some(tx) = self.replies.remove(&id) {
                        let _ = tx.send(response);
                    }
                }
                HostEffect::Hv { op, call } => {
                    let fut = self.hv.call(call);
                    ctx.spawn(fut.into_actor(self).map(move |result, act, ctx| {
                        act.feed(HostInput::HvDone { op, result }, ctx)
                    }));
                }
                HostEffect::Event(event) => tracing::info!(?event, "host event"),
                HostEffect::LeaseFile { until, guests } => {
                    let dir = self.core.state_dir().to_path_buf();
                    if let Err(e) = crate::fence_keeper::write_lease(&dir, until, guests) {
                        tracing::error!(error = %e, "cannot write the fence keeper's lease file");
                    }
                }
                HostEffect::WakeAt(at) => {
                    ctx.run_later(at.saturating_duration_since(Instant::now()), |act, ctx| {
                        act.feed(HostInput::Tick, ctx)
                    });
                }
            }
        }
    }
}

/// A real bind on the wildcard addresses, as libvirt's port allocator checks.
fn port_is_free(port: u16) -> bool {
    let in_use = |r: std::io::Result<std::net::TcpListener>| matches!(r, Err(e) if e.kind() == std::io::ErrorKind::AddrInUse);
    !in_use(std::net::TcpListener::bind(("0.0.0.0", port)))
        && !in_use(std::net::TcpListener::bind(("::", port)))
}

impl Actor for HostAgent {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(mut exits) = self.exits.take() {
            let me = ctx.address().downgrade();
            actix::spawn(async move {
                while let Some(exit) = exits.recv().await {
                    match me.upgrade() {
                        Some(addr) => addr.do_send(Exited(exit)),
                        None => break,
                    }
                }
            });
        }
        self.feed(HostInput::Boot, ctx);
        if self.watchdog.is_some() {
            // A hung agent stops this timer too: that is the point.
            self.pet_watchdog();
            ctx.run_interval(std::time::Duration::from_secs(1), |act, _| {
                act.pet_watchdog()
            });
        }
    }
}

/// Disarm the watchdog: the agent is stopping on purpose.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct DisarmWatchdog;

impl Handler<DisarmWatchdog> for HostAgent {
    type Result = ();

    fn handle(&mut self, _: DisarmWatchdog, _: &mut Self::Context) {
        self.disarm_watchdog();
    }
}

impl Handler<AgentCall> for HostAgent {
    type Result = ResponseFuture<Response>;

    fn handle(&mut self, AgentCall(request): AgentCall, ctx: &mut Self::Context) -> Self::Result {
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = oneshot::channel();
        self.replies.insert(id, tx);
        self.feed(HostInput::Request { id, request }, ctx);
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Response::Error("the host agent dropped the request".into()))
        })
    }
}

impl Handler<Exited> for HostAgent {
    type Result = ();

    fn handle(&mut self, Exited(exit): Exited, ctx: &mut Self::Context) {
        let VmExit {
            name,
            pid,
            reason,
            log_tail,
        } = exit;
        let input = HostInput::VmExited {
            name,
            pid,
            reason,
            log_tail,
        };
        self.feed(input, ctx);
    }
}

/// The address this host reaches its coordinator from: the default address
/// for incoming migrations (see [`HostInput::CoordinatorRoute`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CoordinatorRoute(pub std::net::IpAddr);

/// The coordinator acknowledged a heartbeat: the lease runs until this instant.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RenewLease(pub Instant);

impl Handler<RenewLease> for HostAgent {
    type Result = ();

    fn handle(&mut self, RenewLease(until): RenewLease, ctx: &mut Self::Context) {
        self.feed(HostInput::LeaseRenewed { until }, ctx);
    }
}

impl Handler<CoordinatorRoute> for HostAgent {
    type Result = ();

    fn handle(&mut self, CoordinatorRoute(local): CoordinatorRoute, ctx: &mut Self::Context) {
        self.feed(HostInput::CoordinatorRoute { local }, ctx);
    }
}
