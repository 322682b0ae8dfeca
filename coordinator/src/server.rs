//! The coordinator's QUIC server: one task per connection, one per stream.
//!
//! The TLS handshake has already required a certificate from the fleet CA;
//! here the certificate's role and identity decide what the peer may do, in
//! one `match` over (role, first message). A bad frame gets an error reply and
//! ends that stream only.

use actix::prelude::*;
use flotilla_shared::net::pki::{Identity, Role};
use flotilla_shared::net::{quic, tls};
use flotilla_shared::proto::{
    AgentEvent, AgentHello, ClientMessage, HelloAck, OperatorResponse, ServerMessage,
};

use crate::fleet::{Disconnected, Fleet, Heartbeat, OperatorCall, Register, VmStopped};

/// Accepts connections until the endpoint closes.
pub async fn serve(endpoint: quinn::Endpoint, fleet: Addr<Fleet>) {
    while let Some(incoming) = endpoint.accept().await {
        actix::spawn(connection(incoming, fleet.clone()));
    }
}

async fn connection(incoming: quinn::Incoming, fleet: Addr<Fleet>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
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
    let span = tracing::info_span!("conn", %remote, role = ?who.role, name = %who.name);
    let _enter = span.enter();
    tracing::debug!("connected");
    loop {
        tokio::select! {
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => {
                    actix::spawn(stream(send, recv, who.clone(), conn.clone(), fleet.clone()));
                }
                Err(_) => break,
            },
            uni = conn.accept_uni() => match uni {
                Ok(mut recv) if who.role == Role::Agent => {
                    let fleet = fleet.clone();
                    let host = who.name.clone();
                    actix::spawn(async move {
                        match quic::read_frame::<AgentEvent>(&mut recv).await {
                            Ok(AgentEvent::Heartbeat(facts)) if facts.host == host => fleet.do_send(Heartbeat(facts)),
                            Ok(AgentEvent::VmStopped { name, reason }) => fleet.do_send(VmStopped { host, name, reason }),
                            Ok(_) => tracing::warn!(host = %host, "heartbeat for another host ignored"),
                            Err(e) => tracing::warn!(host = %host, error = %e, "bad event frame"),
                        }
                    });
                }
                Ok(_) => tracing::warn!("events are only accepted from agents"),
                Err(_) => break,
            },
        }
    }
    if who.role == Role::Agent {
        fleet.do_send(Disconnected {
            host: who.name.clone(),
            stable_id: conn.stable_id(),
        });
    }
}

async fn stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    who: Identity,
    conn: quinn::Connection,
    fleet: Addr<Fleet>,
) {
    let reply = match quic::read_frame::<ClientMessage>(&mut recv).await {
        Err(e) => ServerMessage::Operator(OperatorResponse::Error(format!("bad request: {e}"))),
        Ok(msg) => dispatch(msg, &who, conn, &fleet).await,
    };
    let _ = quic::write_frame(&mut send, &reply).await;
    let _ = send.finish();
    // Let the reply reach the peer before the stream is dropped.
    let _ = send.stopped().await;
}

async fn dispatch(
    msg: ClientMessage,
    who: &Identity,
    conn: quinn::Connection,
    fleet: &Addr<Fleet>,
) -> ServerMessage {
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
            match fleet.send(Register { facts, conn }).await {
                Ok(ack) => ServerMessage::Hello(ack),
                Err(e) => refused(format!("coordinator busy: {e}")),
            }
        }
        (Role::Operator, ClientMessage::Operator(request)) => {
            let call = OperatorCall {
                operator: who.name.clone(),
                request,
            };
            ServerMessage::Operator(
                fleet
                    .send(call)
                    .await
                    .unwrap_or_else(|e| OperatorResponse::Error(format!("coordinator busy: {e}"))),
            )
        }
        (Role::Agent, ClientMessage::Operator(_)) => {
            ServerMessage::Operator(OperatorResponse::Error(format!(
                "permission denied: agent certificate '{}' cannot make operator requests",
                who.name
            )))
        }
        (Role::Operator, ClientMessage::Hello(_)) => refused(format!(
            "permission denied: operator certificate '{}' cannot register as an agent",
            who.name
        )),
        (Role::Coordinator, _) => {
            refused("permission denied: a coordinator certificate is not a client".into())
        }
    }
}
