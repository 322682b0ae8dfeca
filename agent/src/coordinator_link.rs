//! The agent's connection to the coordinator.
//!
//! The agent dials (so hosts behind NAT or firewalls need no inbound port),
//! registers its host facts, then heartbeats fresh facts and serves the
//! coordinator's requests, each on its own QUIC stream, through the same
//! [`HostAgent`] actor the local control socket uses. A lost connection is
//! redialled with exponential backoff; VMs keep running meanwhile.
//!
//! With several coordinators (`--coordinator A,B,C`) every entry is dialled
//! at once and the first handshake wins; a follower answers the
//! registration with the leader's address, which is dialled next. The agent
//! keeps the highest fencing epoch it was registered under and refuses a
//! coordinator with a lower one: a deposed leader cannot take the host back.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use flotilla_shared::net::pki::Role;
use flotilla_shared::net::{quic, tls};
use flotilla_shared::proto::{
    AgentEvent, AgentHello, AgentReply, AgentRequest, AgentResponse, ClientMessage, FenceReport,
    HelloAck, HostFacts, MachineTypes, ServerMessage,
};
use flotilla_shared::report_delta::ReportSender;

use crate::control::AgentCall;
use crate::host_actor::{CoordinatorRoute, HostAgent, RenewLease};

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// `HOST:PORT` of the coordinator, or several separated by commas.
    pub coordinator: String,
    /// Directory with `ca.pem` and `agent-HOST.pem`.
    pub tls_dir: PathBuf,
    /// This host's name (must match the certificate).
    pub host: String,
    /// Its QEMU's machine types ([`crate::machine_types::probe`], once at start).
    pub machine_types: MachineTypes,
    /// The agent's state directory, where the fence keeper's lock is.
    pub state_dir: PathBuf,
    /// The watchdog's timeout, when the agent pets one.
    pub watchdog_secs: Option<u32>,
}

/// Why a session with the coordinator ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Certificates could not be loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The coordinator could not be reached.
    #[error("cannot reach coordinator {0}: {1}")]
    Connect(String, std::io::Error),
    /// A message could not be exchanged.
    #[error("coordinator link: {0}")]
    Frame(#[from] flotilla_shared::proto::FrameError),
    /// The coordinator refused the registration.
    #[error("coordinator refused registration: {0}")]
    Refused(String),
    /// A follower answered; the leader is named when one is elected.
    #[error("coordinator is not the leader (leader: {})", .0.as_deref().unwrap_or("none elected yet"))]
    NotLeader(Option<String>),
    /// The coordinator leads under an older epoch than one this host saw.
    #[error("coordinator's epoch {offered} is older than {seen}, which this host already registered under: refusing a deposed leader")]
    StaleEpoch {
        /// What it offered.
        offered: u64,
        /// The highest seen.
        seen: u64,
    },
    /// The connection closed.
    #[error("coordinator connection closed: {0}")]
    Closed(String),
}

/// Keeps this host registered with the coordinator, forever.
pub async fn run(settings: LinkSettings, agent: Addr<HostAgent>) {
    let mut backoff = Duration::from_millis(250);
    let mut link = Link::default();
    loop {
        match session(&settings, &agent, &mut backoff, &mut link).await {
            Ok(()) => {}
            Err(LinkError::NotLeader(named)) => {
                // Straight to the named leader; while none is elected, the
                // usual backoff (capped low: an election takes a second).
                let retry = named.is_none() || named == link.leader;
                tracing::info!(leader = ?named, "registered with a follower; moving to the leader");
                link.leader = named;
                if retry {
                    tokio::time::sleep(backoff.min(Duration::from_millis(500))).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                continue;
            }
            Err(e) => {
                link.leader = None;
                tracing::warn!(coordinator = %settings.coordinator, error = %e, retry_in = ?backoff, "coordinator link down")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// What the link remembers between sessions.
#[derive(Debug, Default)]
struct Link {
    /// The leader a follower named, dialled first next time.
    leader: Option<String>,
    /// The highest fencing epoch this host registered under.
    epoch: u64,
}

/// The epoch to keep after a coordinator accepted this host under
/// `offered`, having seen `seen` before: a lower one is a deposed leader's.
fn admit_epoch(seen: u64, offered: u64) -> Result<u64, LinkError> {
    if offered < seen {
        Err(LinkError::StaleEpoch { offered, seen })
    } else {
        Ok(offered)
    }
}

/// The first of `entries` to complete a handshake, dialled all at once;
/// the agent redials anyway, so each may take 10 s.
async fn dial(
    entries: &[String],
    config: quinn::ClientConfig,
) -> Result<(std::net::SocketAddr, quinn::Connection), LinkError> {
    let entries: Vec<&str> = entries.iter().map(String::as_str).collect();
    quic::connect_first(&entries, config, Duration::from_secs(10))
        .await
        .map_err(|failures| {
            LinkError::Connect(
                entries.join(","),
                std::io::Error::other(failures.join("; ")),
            )
        })
}

async fn session(
    settings: &LinkSettings,
    agent: &Addr<HostAgent>,
    backoff: &mut Duration,
    link: &mut Link,
) -> Result<(), LinkError> {
    let config = tls::client_config(&settings.tls_dir, Role::Agent, &settings.host)?;
    let listed: Vec<String> = settings
        .coordinator
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect();
    let (addr, conn) = match &link.leader {
        Some(leader) => match dial(std::slice::from_ref(leader), config.clone()).await {
            Ok(found) => found,
            Err(_) => dial(&listed, config).await?,
        },
        None => dial(&listed, config).await?,
    };
    if let Some(local) = route_source(addr) {
        agent.do_send(CoordinatorRoute(local));
    }
    let facts = gather_facts(agent, settings).await;
    // Heartbeats send what changed since the last acknowledged report.
    let mut reports = ReportSender::registered(&facts);
    let sent = Instant::now();
    let ack: ServerMessage = quic::call(
        &conn,
        &ClientMessage::Hello(AgentHello::Register(facts)),
        Duration::from_secs(30),
    )
    .await?;
    let (interval, lease, stale) = match ack {
        ServerMessage::Hello(HelloAck::Accepted {
            heartbeat_secs,
            lease_ms,
            stale,
            epoch,
        }) => {
            link.epoch = match admit_epoch(link.epoch, epoch) {
                Ok(e) => e,
                Err(e) => {
                    conn.close(1u32.into(), b"stale epoch");
                    return Err(e);
                }
            };
            (
                Duration::from_secs(heartbeat_secs.max(1)),
                Duration::from_millis(lease_ms),
                stale,
            )
        }
        ServerMessage::Hello(HelloAck::NotLeader { leader }) => {
            conn.close(0u32.into(), b"not the leader");
            return Err(LinkError::NotLeader(leader));
        }
        ServerMessage::Hello(HelloAck::Refused(r)) => return Err(LinkError::Refused(r)),
        other => return Err(LinkError::Refused(format!("unexpected answer {other:?}"))),
    };
    // Copies the coordinator restarted elsewhere die before anything else
    // is served on this connection.
    for name in stale {
        tracing::warn!(vm = %name, "coordinator restarted this VM elsewhere (newer incarnation): killing the stale copy");
        let _ = agent.send(AgentCall(AgentRequest::Destroy { name })).await;
    }
    agent.do_send(RenewLease(sent + lease));
    tracing::info!(coordinator = %addr, epoch = link.epoch, "registered with coordinator");
    *backoff = Duration::from_millis(250);
    let mut tick = tokio::time::interval(interval);
    // The registration's facts are number 0 of this connection's sequence.
    let seq = Arc::new(AtomicU64::new(0));
    loop {
        tokio::select! {
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => {
                    actix::spawn(serve_request(send, recv, agent.clone(), seq.clone()));
                }
                Err(e) => return Err(LinkError::Closed(e.to_string())),
            },
            _ = tick.tick() => {
                // Numbered before gathering: an action answered after this
                // number was taken may or may not show in these facts.
                let seq = seq.fetch_add(1, Ordering::SeqCst) + 1;
                let report = reports.report(seq, gather_facts(agent, settings).await);
                let sent = Instant::now();
                // An unanswered heartbeat means the coordinator is gone: redial
                // now rather than at the transport's idle timeout, and soon
                // enough that another coordinator renews the lease before
                // it runs out (a third of it is left for that).
                let ack: ServerMessage = quic::call(
                    &conn,
                    &ClientMessage::Event(AgentEvent::Heartbeat { seq, report }),
                    (interval * 3)
                        .max(Duration::from_secs(3))
                        .min((lease / 3).max(Duration::from_secs(1))),
                )
                .await?;
                if ack != ServerMessage::Ack {
                    return Err(LinkError::Refused(format!("heartbeat answered with {ack:?}")));
                }
                reports.acked();
                // Measured from when it was sent: the coordinator counts
                // from its arrival, which is later.
                agent.do_send(RenewLease(sent + lease));
            }
        }
    }
}

async fn serve_request(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    agent: Addr<HostAgent>,
    seq: Arc<AtomicU64>,
) {
    let response = match quic::read_frame::<AgentRequest>(&mut recv).await {
        Ok(AgentRequest::OpenConsole { name }) => {
            tracing::info!(vm = %name, "console relay");
            let display = agent
                .send(AgentCall(AgentRequest::DomDisplay { name: name.clone() }))
                .await
                .unwrap_or_else(|e| AgentResponse::Error(format!("agent unavailable: {e}")));
            match crate::console_relay::connect(&name, display).await {
                Ok((tcp, addr)) => {
                    let reply = AgentReply {
                        seq: seq.fetch_add(1, Ordering::SeqCst) + 1,
                        response: AgentResponse::ConsoleOpened {
                            addr: addr.to_string(),
                        },
                    };
                    if quic::write_frame(&mut send, &reply).await.is_ok() {
                        let copied = crate::console_relay::relay(send, recv, tcp).await;
                        tracing::info!(vm = %name, ?copied, "console relay ended");
                    }
                    return;
                }
                Err(refusal) => refusal,
            }
        }
        Ok(AgentRequest::OpenSerial { name }) => {
            tracing::info!(vm = %name, "serial console relay");
            let chardevs = agent
                .send(AgentCall(AgentRequest::MonitorCommand {
                    name: name.clone(),
                    command: "info chardev".into(),
                }))
                .await
                .unwrap_or_else(|e| AgentResponse::Error(format!("agent unavailable: {e}")));
            let opened = match chardevs {
                AgentResponse::Done(info) => match crate::serial_relay::pty_of(&info) {
                    Some(path) => crate::serial_relay::open(&path)
                        .map(|pty| (pty, path.clone()))
                        .map_err(|e| format!("cannot open the serial console {path}: {e}")),
                    None => Err(format!(
                        "domain '{name}' has no serial console on a pty (virsh console needs \
                         <serial type='pty'> or <console type='pty'>)"
                    )),
                },
                AgentResponse::Error(e) => Err(e),
                other => Err(format!("unexpected answer {other:?}")),
            };
            match opened {
                Ok((mut pty, path)) => {
                    let reply = AgentReply {
                        seq: seq.fetch_add(1, Ordering::SeqCst) + 1,
                        response: AgentResponse::ConsoleOpened { addr: path },
                    };
                    if quic::write_frame(&mut send, &reply).await.is_ok() {
                        let mut stream = tokio::io::join(recv, send);
                        let copied = tokio::io::copy_bidirectional(&mut stream, &mut pty).await;
                        tracing::info!(vm = %name, ?copied, "serial console relay ended");
                    }
                    return;
                }
                Err(e) => AgentResponse::Error(e),
            }
        }
        Ok(req) => {
            tracing::info!(request = ?RequestName(&req), "coordinator request");
            agent
                .send(AgentCall(req))
                .await
                .unwrap_or_else(|e| AgentResponse::Error(format!("agent unavailable: {e}")))
        }
        Err(e) => AgentResponse::Error(format!("bad request: {e}")),
    };
    // Numbered after the action took effect: every report numbered later shows it.
    let reply = AgentReply {
        seq: seq.fetch_add(1, Ordering::SeqCst) + 1,
        response,
    };
    let _ = quic::write_frame(&mut send, &reply).await;
    let _ = send.finish();
    let _ = send.stopped().await;
}

/// Logs a request by kind without its (possibly large) XML body.
struct RequestName<'a>(&'a AgentRequest);

impl std::fmt::Debug for RequestName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            AgentRequest::Start { source, .. } => write!(f, "Start({source})"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// The local address the kernel routes to `peer` from. A UDP `connect`
/// only picks the route: nothing is sent.
fn route_source(peer: std::net::SocketAddr) -> Option<std::net::IpAddr> {
    let any: std::net::SocketAddr = if peer.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(peer).ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

/// This host's facts: CPUs, memory, networks with addresses, running VMs.
pub async fn gather_facts(agent: &Addr<HostAgent>, settings: &LinkSettings) -> HostFacts {
    let networks = match agent.send(AgentCall(AgentRequest::NetList)).await {
        Ok(AgentResponse::Networks { networks, .. }) => networks,
        _ => Vec::new(),
    };
    let vms = match agent.send(AgentCall(AgentRequest::List)).await {
        Ok(AgentResponse::Vms(v)) => v,
        _ => Vec::new(),
    };
    HostFacts {
        host: settings.host.clone(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_mib: memory_mib(),
        networks,
        vms,
        machine_types: settings.machine_types.clone(),
        fence: FenceReport {
            keeper: crate::fence_keeper::keeper_running(&settings.state_dir),
            watchdog_secs: settings.watchdog_secs,
        },
    }
}

fn memory_mib() -> u64 {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    info.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coordinator_with_an_older_epoch_than_one_seen_is_refused() {
        assert_eq!(admit_epoch(0, 0).ok(), Some(0), "one coordinator: always 0");
        assert_eq!(admit_epoch(0, 17).ok(), Some(17));
        assert_eq!(admit_epoch(17, 17).ok(), Some(17), "the same leader again");
        assert_eq!(admit_epoch(17, 40).ok(), Some(40), "a newer leader");
        assert!(matches!(
            admit_epoch(40, 17),
            Err(LinkError::StaleEpoch {
                offered: 17,
                seen: 40
            })
        ));
    }
}
