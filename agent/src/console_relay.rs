//! Console relays: a VM's VNC console carried over a coordinator stream.
//!
//! The coordinator asks with [`AgentRequest::OpenConsole`] on a stream of its
//! own. The agent looks the console up where `domdisplay` does, connects to
//! it on this host (the console may listen on a network only this host
//! reaches), answers [`AgentResponse::ConsoleOpened`] and then copies bytes
//! both ways until either side closes. The RFB handshake, passwords
//! included, is the coordinator's business: the agent only carries bytes.

use std::net::SocketAddr;

use flotilla_shared::proto::{AgentResponse, ConsoleInfo};

/// Why a console cannot be relayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// The VM has no VNC console listening on a TCP address.
    #[error("domain '{name}' has no VNC console on a TCP address")]
    NoVnc {
        /// The VM.
        name: String,
    },
    /// The console did not accept the connection.
    #[error("cannot connect to the console of '{name}' at {addr}: {reason}")]
    Connect {
        /// The VM.
        name: String,
        /// Where it listens.
        addr: SocketAddr,
        /// The error.
        reason: String,
    },
}

/// The address of the first VNC console among `consoles`.
pub fn vnc_addr(name: &str, consoles: &[ConsoleInfo]) -> Result<SocketAddr, RelayError> {
    consoles
        .iter()
        .find_map(|c| c.uri.strip_prefix("vnc://")?.parse().ok())
        .ok_or_else(|| RelayError::NoVnc {
            name: name.to_string(),
        })
}

/// Connects to the console the agent reported in `display` (its answer to
/// `DomDisplay`): the TCP stream to relay, or the answer that refuses.
pub async fn connect(
    name: &str,
    display: AgentResponse,
) -> Result<(tokio::net::TcpStream, SocketAddr), AgentResponse> {
    let consoles = match display {
        AgentResponse::Consoles(c) => c,
        refusal => return Err(refusal),
    };
    let addr = vnc_addr(name, &consoles).map_err(|e| AgentResponse::Error(e.to_string()))?;
    match tokio::net::TcpStream::connect(addr).await {
        Ok(tcp) => {
            // Keystrokes and small updates must not wait for Nagle.
            let _ = tcp.set_nodelay(true);
            Ok((tcp, addr))
        }
        Err(e) => Err(AgentResponse::Error(
            RelayError::Connect {
                name: name.to_string(),
                addr,
                reason: e.to_string(),
            }
            .to_string(),
        )),
    }
}

/// Copies bytes between the coordinator's stream and the console until
/// either side closes; each direction's end is passed on to the other side.
pub async fn relay(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    tcp: tokio::net::TcpStream,
) -> std::io::Result<(u64, u64)> {
    let mut stream = tokio::io::join(recv, send);
    let mut tcp = tcp;
    tokio::io::copy_bidirectional(&mut stream, &mut tcp).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(uri: &str) -> ConsoleInfo {
        ConsoleInfo {
            uri: uri.into(),
            network: None,
            authenticated: false,
        }
    }

    #[test]
    fn the_first_vnc_console_on_a_tcp_address_is_relayed() {
        let cases: &[(&[&str], Result<&str, RelayError>)] = &[
            (&["vnc://198.18.1.1:5900"], Ok("198.18.1.1:5900")),
            (
                &["spice://198.18.1.1:5901", "vnc://[fd00::1]:5902"],
                Ok("[fd00::1]:5902"),
            ),
            (
                &["spice://198.18.1.1:5901"],
                Err(RelayError::NoVnc { name: "vm".into() }),
            ),
            (&[], Err(RelayError::NoVnc { name: "vm".into() })),
        ];
        for (uris, want) in cases {
            let consoles: Vec<ConsoleInfo> = uris.iter().map(|u| console(u)).collect();
            let got = vnc_addr("vm", &consoles);
            let want = want.clone().map(|a| a.parse::<SocketAddr>().expect("addr"));
            assert_eq!(got, want, "{uris:?}");
        }
    }
}
