//! Framed messages over QUIC streams, with limits and timeouts.
//!
//! One request per bidirectional stream: the opener writes one frame and
//! finishes its side, the acceptor answers with one frame. A bad frame fails
//! that stream only.

use std::net::SocketAddr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::proto::{decode_payload, encode_frame, frame_len, FrameError};

/// What a fan-in socket asks the kernel for, each way. Linux caps it at
/// `net.core.rmem_max`/`wmem_max` (4 MiB on Debian) and doubles it.
pub const FAN_IN_BUFFER: usize = 16 * 1024 * 1024;

/// A non-blocking UDP socket bound to `addr` with large kernel buffers, for
/// an endpoint that thousands of peers talk to. The default receive buffer
/// (208 KiB) overflowed under 10,000 agents heartbeating every second: 18 %
/// of datagrams dropped (`RcvbufErrors`), and handshakes that kept losing
/// their packets backed off until they timed out.
pub fn fan_in_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer than asked for still works.
    let _ = socket.set_recv_buffer_size(FAN_IN_BUFFER);
    let _ = socket.set_send_buffer_size(FAN_IN_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Writes one frame to `send`.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    body: &T,
) -> Result<(), FrameError> {
    let bytes = encode_frame(body)?;
    send.write_all(&bytes)
        .await
        .map_err(|e| FrameError::Stream(e.to_string()))
}

/// Reads one frame from `recv`, refusing frames over the limit before reading them.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, FrameError> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| FrameError::Stream(e.to_string()))?;
    let len = frame_len(prefix)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload)
        .await
        .map_err(|e| FrameError::Stream(e.to_string()))?;
    decode_payload(&payload)
}

/// Sends `request` on a new bidirectional stream and waits up to `timeout` for the reply.
pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
    conn: &quinn::Connection,
    request: &Req,
    timeout: Duration,
) -> Result<Resp, FrameError> {
    let exchange = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| FrameError::Stream(e.to_string()))?;
        write_frame(&mut send, request).await?;
        let _ = send.finish();
        read_frame(&mut recv).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| FrameError::Stream(format!("no answer within {timeout:?}")))?
}

/// Resolves `HOST:PORT` (a name or an address) to a socket address.
pub async fn resolve(target: &str) -> Result<SocketAddr, std::io::Error> {
    tokio::net::lookup_host(target)
        .await?
        .next()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{target} resolves to nothing"),
            )
        })
}

/// Connects to the coordinator at `addr`, verifying it by its fixed
/// certificate name, waiting up to 10 s for the handshake (an agent redials
/// anyway; see [`connect_within`]).
pub async fn connect(
    addr: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<quinn::Connection, std::io::Error> {
    connect_within(addr, config, Duration::from_secs(10)).await
}

/// Like [`connect`] with the handshake bounded by `timeout`. A host where
/// nothing listens on the port fails at once: a probe from a connected
/// socket races the handshake, and Linux reports the host's ICMP port
/// unreachable on such a socket as `ConnectionRefused` (quinn's own socket
/// is not connected, so it would wait out the timeout).
pub async fn connect_within(
    addr: SocketAddr,
    config: quinn::ClientConfig,
    timeout: Duration,
) -> Result<quinn::Connection, std::io::Error> {
    let mut endpoint = quinn::Endpoint::client(unspecified(addr))?;
    endpoint.set_default_client_config(config);
    let connecting = endpoint
        .connect(addr, super::pki::COORDINATOR_NAME)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let handshake = async {
        tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer from {addr} within {timeout:?}"),
                )
            })?
            .map_err(|e| std::io::Error::other(e.to_string()))
    };
    tokio::pin!(handshake);
    tokio::select! {
        conn = &mut handshake => conn,
        refused = refused(addr) => match refused {
            true => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("nothing listens at {addr} (the host answered port unreachable)"),
            )),
            // Silence or an answer proves nothing: the handshake decides.
            false => handshake.await,
        },
    }
}

/// The first of `entries` (`HOST:PORT` each) to complete a handshake
/// within `timeout`, all dialled at once so that a dead entry costs nothing
/// while another lives: its address and connection, or each entry's
/// failure as `ENTRY: why`.
pub async fn connect_first(
    entries: &[&str],
    config: quinn::ClientConfig,
    timeout: Duration,
) -> Result<(SocketAddr, quinn::Connection), Vec<String>> {
    let mut attempts = tokio::task::JoinSet::new();
    for entry in entries {
        let (entry, config) = (entry.to_string(), config.clone());
        attempts.spawn(async move {
            let addr = resolve(&entry)
                .await
                .map_err(|e| format!("{entry}: cannot resolve: {e}"))?;
            connect_within(addr, config, timeout)
                .await
                .map(|conn| (addr, conn))
                .map_err(|e| format!("{entry}: {e}"))
        });
    }
    let mut failures = Vec::new();
    while let Some(attempt) = attempts.join_next().await {
        match attempt {
            // The rest are aborted as the set drops.
            Ok(Ok(found)) => return Ok(found),
            Ok(Err(e)) => failures.push(e),
            Err(e) => failures.push(format!("dial task: {e}")),
        }
    }
    Err(failures)
}

/// Returns once `addr`'s host says nothing listens on its port any more
/// (the peer process died and its port closed), probing five times a
/// second; pends forever while the port stays open. Raced against a call,
/// it turns a dead coordinator into a failure within a fifth of a second,
/// where QUIC would wait for its idle timeout.
pub async fn until_gone(addr: SocketAddr) {
    let every = Duration::from_millis(200);
    loop {
        if let Ok(true) = tokio::time::timeout(every, refused(addr)).await {
            return;
        }
    }
}

fn unspecified(addr: SocketAddr) -> SocketAddr {
    if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    }
}

/// Whether `addr`'s host says nothing listens on its port: an empty
/// datagram (a QUIC endpoint ignores it) from a connected socket, and the
/// ICMP port unreachable that comes back as `ConnectionRefused` on the
/// next receive. False on anything else; it waits for as long as nothing
/// comes back (a firewall may drop both ways), which the caller bounds.
async fn refused(addr: SocketAddr) -> bool {
    let Ok(socket) = tokio::net::UdpSocket::bind(unspecified(addr)).await else {
        return false;
    };
    if socket.connect(addr).await.is_err() || socket.send(&[]).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 1];
    match socket.recv(&mut buf).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => true,
        // A datagram back (none is expected) or another error: no verdict.
        Ok(_) | Err(_) => false,
    }
}
