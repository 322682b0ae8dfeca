//! The coordinator's QUIC server: one task per connection, one per stream.
//!
//! The TLS handshake has already required a certificate from the fleet CA;
//! here the certificate's role and identity decide what the peer may do, in
//! one `match` over (role, message). Every message, heartbeats included, is a
//! request on its own bidirectional stream with a reply. A bad frame gets an
//! error reply and ends that stream only. Each agent connection keeps the
//! last report it acknowledged, and heartbeats (deltas against it) are
//! expanded to whole facts here, before the fleet sees them.
//!
//! With several coordinators ([`crate::leadership`]) a follower serves too:
//! it sends agents to the leader, answers read-only verbs from the store
//! ([`crate::follower`]) and names the leader for every other verb. Each
//! stream is served in the role the coordinator has when it arrives.

use actix::prelude::*;
use flotilla_shared::net::pki::{Identity, Role};
use flotilla_shared::net::{quic, tls};
use flotilla_shared::proto::{
    AgentEvent, AgentHello, AgentReply, AgentRequest, AgentResponse, ClientMessage, HelloAck,
    OperatorError, OperatorRequest, OperatorResponse, ServerMessage,
};
use flotilla_shared::report_delta::ReportReceiver;
use tracing::Instrument as _;

use std::sync::{Arc, Mutex};

use crate::fleet::{
    ConsoleCall, Disconnected, EventsCall, Fleet, Heartbeat, OperatorCall, Register, VmExited,
};
use crate::leadership::ClusterView;
use crate::web::Web;

/// The part this coordinator plays: a follower becomes the leader at most
/// once, and a leader never goes back (it stops when its lease is lost).
#[derive(Clone)]
pub enum Serving {
    /// Another coordinator leads (or none yet).
    Follower,
    /// This one leads: the fleet and its web pages.
    Leader {
        /// The fleet actor.
        fleet: Addr<Fleet>,
        /// The web console, when served.
        web: Option<Arc<Web>>,
    },
}

/// The role, and the view of the control plane behind `flotilla cluster`.
pub struct Plane {
    /// The role now.
    pub role: tokio::sync::watch::Receiver<Serving>,
    /// The coordinators and the store.
    pub cluster: Arc<ClusterView>,
}

impl Plane {
    /// One coordinator that leads from the start (the redb store).
    pub fn single(address: String, fleet: Addr<Fleet>, web: Option<Arc<Web>>) -> Arc<Plane> {
        let (tx, role) = tokio::sync::watch::channel(Serving::Leader { fleet, web });
        // Never changes: the receiver keeps the value after the sender is gone.
        drop(tx);
        Arc::new(Plane {
            role,
            cluster: Arc::new(ClusterView::Single { address }),
        })
    }

    fn role(&self) -> Serving {
        self.role.borrow().clone()
    }
}

/// A poisoned lock only means a stream task panicked mid-update; the
/// receiver's state is still one acknowledged report.
fn lock(reports: &Reports) -> std::sync::MutexGuard<'_, ReportReceiver> {
    reports
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Accepts connections until the endpoint closes.
pub async fn serve(endpoint: quinn::Endpoint, plane: Arc<Plane>) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(connection(incoming, plane.clone()));
    }
}

async fn connection(incoming: quinn::Incoming, plane: Arc<Plane>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        // A client that raced several coordinators closes the handshakes
        // it did not need: nothing to report.
        Err(quinn::ConnectionError::ApplicationClosed(_)) => return,
        Err(e) => {
            tracing::info!(%remote, error = %e, "handshake refused");
            return;
        }
    };
    let who = match tls::peer_identity(&conn) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(%remote, error = %e, "closing connection");
            conn.close(1u32.into(), b"unusable certificate");
            return;
        }
    };
    // Instrumented, not entered: a guard held across `.await` would leak this
    // span into whatever the executor polls next.
    let span = tracing::info_span!("conn", %remote, role = ?who.role, name = %who.name);
    // The last report acknowledged on this connection: heartbeats are
    // deltas against it.
    let reports: Reports = Arc::default();
    async move {
        tracing::debug!("connected");
        while let Ok((send, recv)) = conn.accept_bi().await {
            let peer = Peer {
                who: who.clone(),
                conn: conn.clone(),
                reports: reports.clone(),
            };
            match plane.role() {
                Serving::Leader { fleet, web } => tokio::spawn(
                    stream(send, recv, peer, fleet, web, plane.clone()).in_current_span(),
                ),
                Serving::Follower => tokio::spawn(
                    follower_stream(send, recv, peer.who, plane.clone()).in_current_span(),
                ),
            };
        }
        if let (Role::Agent, Serving::Leader { fleet, .. }) = (who.role, plane.role()) {
            fleet.do_send(Disconnected {
                host: who.name.clone(),
                stable_id: conn.stable_id(),
            });
        }
    }
    .instrument(span)
    .await;
}

/// One connection's reports: heartbeats are deltas against the last one
/// acknowledged.
type Reports = Arc<Mutex<ReportReceiver>>;

/// Who is on the other end of a stream, and its connection's state.
struct Peer {
    who: Identity,
    conn: quinn::Connection,
    reports: Reports,
}

async fn stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: Peer,
    fleet: Addr<Fleet>,
    web: Option<Arc<Web>>,
    plane: Arc<Plane>,
) {
    let who = &peer.who;
    let reply = match quic::read_frame::<ClientMessage>(&mut recv).await {
        Err(e) => ServerMessage::Operator(OperatorResponse::Error(OperatorError::BadRequest(
            e.to_string(),
        ))),
        Ok(ClientMessage::Operator(OperatorRequest::Cluster)) if who.role == Role::Operator => {
            ServerMessage::Operator(OperatorResponse::Cluster(plane.cluster.status().await))
        }
        Ok(ClientMessage::Operator(request @ OperatorRequest::Migrate { .. }))
            if who.role == Role::Operator =>
        {
            migrate(request, who, &mut send, &fleet).await
        }
        Ok(ClientMessage::Operator(OperatorRequest::HostDrain { host, parallel }))
            if who.role == Role::Operator =>
        {
            drain(host, parallel, who, &mut send, &fleet).await
        }
        Ok(ClientMessage::Operator(OperatorRequest::Events { follow }))
            if who.role == Role::Operator =>
        {
            events(follow, &mut send, &fleet).await
        }
        Ok(ClientMessage::Operator(OperatorRequest::WebTicket { console }))
            if who.role == Role::Operator =>
        {
            tracing::info!(operator = %who.name, ?console, "web ticket");
            ServerMessage::Operator(match web {
                Some(web) => web.ticket(console).await,
                None => OperatorResponse::Error(OperatorError::WebDisabled),
            })
        }
        Ok(ClientMessage::Operator(OperatorRequest::Console { name }))
            if who.role == Role::Operator =>
        {
            tracing::info!(operator = %who.name, vm = %name, "serial console");
            match serial_console(&name, send, recv, &fleet).await {
                Ok(()) => return,
                Err((s, reply)) => {
                    send = s;
                    reply
                }
            }
        }
        Ok(msg) => dispatch(msg, &peer, &fleet).await,
    };
    let _ = quic::write_frame(&mut send, &reply).await;
    let _ = send.finish();
    // Let the reply reach the peer before the stream is dropped.
    let _ = send.stopped().await;
}

/// A stream to a follower: agents are sent to the leader, read-only verbs
/// are answered from the store, and the rest name the leader.
async fn follower_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    who: Identity,
    plane: Arc<Plane>,
) {
    let reply = match quic::read_frame::<ClientMessage>(&mut recv).await {
        Err(e) => ServerMessage::Operator(OperatorResponse::Error(OperatorError::BadRequest(
            e.to_string(),
        ))),
        Ok(ClientMessage::Hello(_) | ClientMessage::Event(_)) if who.role == Role::Agent => {
            ServerMessage::Hello(HelloAck::NotLeader {
                leader: plane.cluster.leader().await,
            })
        }
        Ok(ClientMessage::Operator(OperatorRequest::Cluster)) if who.role == Role::Operator => {
            ServerMessage::Operator(OperatorResponse::Cluster(plane.cluster.status().await))
        }
        Ok(ClientMessage::Operator(request)) if who.role == Role::Operator => {
            ServerMessage::Operator(follower_answer(request, &plane).await)
        }
        Ok(_) => ServerMessage::Operator(OperatorResponse::Error(OperatorError::PermissionDenied(
            format!(
                "certificate '{}' ({:?}) cannot send this",
                who.name, who.role
            ),
        ))),
    };
    let _ = quic::write_frame(&mut send, &reply).await;
    let _ = send.finish();
    let _ = send.stopped().await;
}

async fn follower_answer(request: OperatorRequest, plane: &Plane) -> OperatorResponse {
    let store = match plane.cluster.store() {
        Some(s) if crate::follower::answers(&request) => s,
        _ => {
            let leader = plane.cluster.leader().await;
            return crate::follower::answer(request, &[], &[], leader);
        }
    };
    let rows = tokio::task::spawn_blocking(move || {
        use crate::store::Store as _;
        Ok::<_, crate::store::StoreError>((store.list()?, store.hosts()?))
    })
    .await;
    match rows {
        Ok(Ok((vms, hosts))) => crate::follower::answer(request, &vms, &hosts, None),
        Ok(Err(e)) => OperatorResponse::Error(OperatorError::Store(e.to_string())),
        Err(e) => OperatorResponse::Error(OperatorError::Unavailable(e.to_string())),
    }
}

/// `flotilla console`: the VM's host's agent opens its serial pty on a
/// stream of its own, and this operator stream is joined to it byte for
/// byte. A refusal gives the send half back for the error frame.
async fn serial_console(
    name: &str,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    fleet: &Addr<Fleet>,
) -> Result<(), (quinn::SendStream, ServerMessage)> {
    let fail = |e: OperatorError| ServerMessage::Operator(OperatorResponse::Error(e));
    let link = match fleet
        .send(ConsoleCall {
            name: name.into(),
            serial: true,
        })
        .await
    {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => return Err((send, fail(e))),
        Err(e) => return Err((send, fail(OperatorError::Unavailable(e.to_string())))),
    };
    let agent_error = |message: String| {
        fail(OperatorError::Agent {
            host: link.host.clone(),
            message,
        })
    };
    let (mut a_send, mut a_recv) = match link.conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return Err((send, agent_error(e.to_string()))),
    };
    if let Err(e) =
        quic::write_frame(&mut a_send, &AgentRequest::OpenSerial { name: name.into() }).await
    {
        return Err((send, agent_error(e.to_string())));
    }
    let device = match quic::read_frame::<AgentReply>(&mut a_recv).await {
        Ok(AgentReply {
            response: AgentResponse::ConsoleOpened { addr },
            ..
        }) => addr,
        Ok(AgentReply {
            response: AgentResponse::Error(e),
            ..
        }) => return Err((send, agent_error(e))),
        Ok(other) => return Err((send, agent_error(format!("unexpected answer {other:?}")))),
        Err(e) => return Err((send, agent_error(e.to_string()))),
    };
    let attached = ServerMessage::Operator(OperatorResponse::ConsoleAttached {
        host: link.host.clone(),
        device,
    });
    if quic::write_frame(&mut send, &attached).await.is_err() {
        return Ok(());
    }
    let mut operator = tokio::io::join(recv, send);
    let mut agent = tokio::io::join(a_recv, a_send);
    let copied = tokio::io::copy_bidirectional(&mut operator, &mut agent).await;
    tracing::info!(vm = %name, ?copied, "serial console detached");
    Ok(())
}

/// A migration answers with progress frames on the same stream, then the outcome.
async fn migrate(
    request: OperatorRequest,
    who: &Identity,
    send: &mut quinn::SendStream,
    fleet: &Addr<Fleet>,
) -> ServerMessage {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let call = OperatorCall {
        operator: who.name.clone(),
        request,
        progress: Some(tx),
        notes: None,
    };
    let answer = fleet.send(call);
    tokio::pin!(answer);
    loop {
        tokio::select! {
            Some(p) = rx.recv() => {
                // A client that stops reading only loses progress, not the migration.
                let _ = quic::write_frame(send, &ServerMessage::Progress(p)).await;
            }
            r = &mut answer => {
                return ServerMessage::Operator(
                    r.unwrap_or_else(|e| OperatorResponse::Error(OperatorError::Unavailable(e.to_string()))),
                );
            }
        }
    }
}

/// Events answer with one note per line; without `follow` the stream ends
/// after the recent lines, with it when the operator goes away.
async fn events(follow: bool, send: &mut quinn::SendStream, fleet: &Addr<Fleet>) -> ServerMessage {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    if fleet.send(EventsCall { follow, sink: tx }).await.is_err() {
        return ServerMessage::Operator(OperatorResponse::Error(OperatorError::Unavailable(
            "busy".into(),
        )));
    }
    while let Some(line) = rx.recv().await {
        if quic::write_frame(send, &ServerMessage::Note(line))
            .await
            .is_err()
        {
            break;
        }
    }
    ServerMessage::Operator(OperatorResponse::Done(String::new()))
}

/// A drain answers with one note per VM step, then the summary.
async fn drain(
    host: String,
    parallel: u32,
    who: &Identity,
    send: &mut quinn::SendStream,
    fleet: &Addr<Fleet>,
) -> ServerMessage {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let answer = fleet.send(OperatorCall {
        operator: who.name.clone(),
        request: OperatorRequest::HostDrain { host, parallel },
        progress: None,
        notes: Some(tx),
    });
    tokio::pin!(answer);
    loop {
        tokio::select! {
            Some(line) = rx.recv() => {
                let _ = quic::write_frame(send, &ServerMessage::Note(line)).await;
            }
            r = &mut answer => {
                // Flush notes sent just before the end.
                while let Ok(line) = rx.try_recv() {
                    let _ = quic::write_frame(send, &ServerMessage::Note(line)).await;
                }
                return ServerMessage::Operator(
                    r.unwrap_or_else(|e| OperatorResponse::Error(OperatorError::Unavailable(e.to_string()))),
                );
            }
        }
    }
}

async fn dispatch(msg: ClientMessage, peer: &Peer, fleet: &Addr<Fleet>) -> ServerMessage {
    let who = &peer.who;
    let refused = |m: String| ServerMessage::Hello(HelloAck::Refused(m));
    match (who.role, msg) {
        (Role::Agent, ClientMessage::Hello(AgentHello::Register(facts))) => {
            if facts.host != who.name {
                tracing::warn!(claimed = %facts.host, "agent tried to register as another host");
                return refused(format!(
                    "permission denied: certificate is for host '{}', cannot register as '{}'",
                    who.name, facts.host
                ));
            }
            let registered = facts.clone();
            match fleet
                .send(Register {
                    facts,
                    conn: peer.conn.clone(),
                })
                .await
            {
                Ok(ack) => {
                    if matches!(ack, HelloAck::Accepted { .. }) {
                        lock(&peer.reports).registered(&registered);
                    }
                    ServerMessage::Hello(ack)
                }
                Err(e) => refused(format!("coordinator busy: {e}")),
            }
        }
        (Role::Operator, ClientMessage::Operator(request)) => {
            let call = OperatorCall {
                operator: who.name.clone(),
                request,
                progress: None,
                notes: None,
            };
            ServerMessage::Operator(fleet.send(call).await.unwrap_or_else(|e| {
                OperatorResponse::Error(OperatorError::Unavailable(e.to_string()))
            }))
        }
        (Role::Agent, ClientMessage::Event(event)) => match event {
            // Acknowledged only once applied: the acknowledgement renews the
            // host's lease, which must never outrun what the coordinator
            // counts.
            AgentEvent::Heartbeat { report, .. } if report.host() != who.name => {
                tracing::warn!(claimed = %report.host(), "heartbeat for another host ignored");
                refused(format!(
                    "heartbeat for host '{}' over the connection of '{}'",
                    report.host(),
                    who.name
                ))
            }
            AgentEvent::Heartbeat { seq, report } => {
                let facts = match lock(&peer.reports).expand(report) {
                    Ok(f) => f,
                    Err(e) => {
                        return refused(format!("heartbeat not applied: {e}; register again"))
                    }
                };
                let applied = fleet
                    .send(Heartbeat {
                        host: who.name.clone(),
                        conn: peer.conn.stable_id(),
                        seq,
                        facts: facts.clone(),
                    })
                    .await
                    .unwrap_or(false);
                match applied {
                    true => {
                        lock(&peer.reports).acked(seq, facts);
                        ServerMessage::Ack
                    }
                    false => refused("heartbeat not applied (not this host's current connection); register again".into()),
                }
            }
            AgentEvent::VmStopped { seq, name, reason } => {
                fleet.do_send(VmExited {
                    host: who.name.clone(),
                    conn: peer.conn.stable_id(),
                    seq,
                    name,
                    reason,
                });
                ServerMessage::Ack
            }
        },
        (Role::Operator, ClientMessage::Event(_)) => ServerMessage::Operator(
            OperatorResponse::Error(OperatorError::PermissionDenied(format!(
                "operator certificate '{}' cannot send host events",
                who.name
            ))),
        ),
        (Role::Agent, ClientMessage::Operator(_)) => ServerMessage::Operator(
            OperatorResponse::Error(OperatorError::PermissionDenied(format!(
                "agent certificate '{}' cannot make operator requests",
                who.name
            ))),
        ),
        (Role::Operator, ClientMessage::Hello(_)) => refused(format!(
            "permission denied: operator certificate '{}' cannot register as an agent",
            who.name
        )),
        (Role::Coordinator, _) => {
            refused("permission denied: a coordinator certificate is not a client".into())
        }
    }
}
