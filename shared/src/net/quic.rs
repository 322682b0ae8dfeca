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

/// Connects to the coordinator at `addr`, verifying it by its fixed certificate name.
pub async fn connect(
    addr: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<quinn::Connection, std::io::Error> {
    let bind: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(config);
    let connecting = endpoint
        .connect(addr, super::pki::COORDINATOR_NAME)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer from {addr}"),
            )
        })?
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(conn)
}
