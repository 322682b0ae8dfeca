//! The agent's local control protocol: one closed request enum, one response enum.
//!
//! `flotilla-agent ctl …` and `--once-start` speak it over the unix socket
//! `STATE/agent.sock` as JSON lines (one request, one response per line). It
//! is the agent's equivalent of libvirt's local `qemu:///system` socket and is
//! only reachable by local root. The coordinator's QUIC protocol is separate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Largest request or response line.
const MAX_LINE: u64 = 4 * 1024 * 1024;

/// A request to the agent.
#[derive(Debug, Clone, Serialize, Deserialize, actix::Message)]
#[rtype(result = "Response")]
pub enum Request {
    /// Start a VM from its domain XML.
    Start {
        /// The XML text.
        xml: String,
        /// Where it came from, for error messages.
        source: String,
    },
    /// ACPI shutdown, escalating after `timeout_secs`.
    Shutdown {
        /// The VM.
        name: String,
        /// Seconds the guest gets.
        timeout_secs: u64,
    },
    /// Kill a VM.
    Destroy {
        /// The VM.
        name: String,
    },
    /// Running VMs.
    List,
    /// A VM's consoles.
    DomDisplay {
        /// The VM.
        name: String,
    },
    /// A VM's live XML.
    DumpXml {
        /// The VM.
        name: String,
    },
    /// Host networks with their current addresses.
    NetList,
    /// Re-read the networks directory.
    ReloadNetworks,
}

/// One console as reported to operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleInfo {
    /// `vnc://198.18.0.1:5900` and friends.
    pub uri: String,
    /// The network the address came from.
    pub network: Option<String>,
    /// Whether a password protects it.
    pub authenticated: bool,
}

/// One running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSummary {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// QEMU pid.
    pub pid: i32,
    /// QEMU run state (`running`, `paused`, …).
    pub state: String,
    /// Consoles.
    pub consoles: Vec<ConsoleInfo>,
}

/// A host network and what it resolves to now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStatus {
    /// Name.
    pub name: String,
    /// Forward mode (`bridge`, `nat`, …, or `isolated`).
    pub mode: String,
    /// The device the address comes from, if any.
    pub device: Option<String>,
    /// The address, when it resolves.
    pub address: Option<String>,
    /// Why it does not resolve.
    pub error: Option<String>,
}

/// The agent's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    /// A VM started.
    Started {
        /// The VM.
        vm: VmSummary,
        /// Its live XML.
        live_xml: String,
        /// Warnings (e.g. an unauthenticated console on a public address).
        warnings: Vec<String>,
    },
    /// An action finished.
    Done(String),
    /// Running VMs.
    Vms(Vec<VmSummary>),
    /// Consoles of one VM.
    Consoles(Vec<ConsoleInfo>),
    /// XML text.
    Xml(String),
    /// Host networks.
    Networks {
        /// Each network.
        networks: Vec<NetStatus>,
        /// Files in the networks directory that were skipped, and why.
        problems: Vec<String>,
    },
    /// The request failed.
    Error(String),
}

/// The control socket inside a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.sock")
}

/// Talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No agent listens.
    #[error("cannot reach the agent at {path} (is flotilla-agent running?)")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The conversation broke.
    #[error("agent connection failed: {0}")]
    Io(String),
}

/// Sends one request and waits up to `timeout` for the response.
pub async fn call(
    state_dir: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Response, ControlError> {
    let path = socket_path(state_dir);
    let stream = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(|e| ControlError::Io(e.to_string()))?;
    line.push(b'\n');
    write
        .write_all(&line)
        .await
        .map_err(|e| ControlError::Io(e.to_string()))?;
    let mut reader = BufReader::new(read).take(MAX_LINE);
    let mut buf = Vec::new();
    tokio::time::timeout(timeout, reader.read_until(b'\n', &mut buf))
        .await
        .map_err(|_| ControlError::Io(format!("no answer within {timeout:?}")))?
        .map_err(|e| ControlError::Io(e.to_string()))?;
    serde_json::from_slice(&buf).map_err(|e| ControlError::Io(format!("bad response: {e}")))
}

/// Serves the control socket, forwarding each request to `agent`.
pub async fn serve(
    state_dir: &Path,
    agent: actix::Recipient<Request>,
) -> Result<(), std::io::Error> {
    let path = socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let agent = agent.clone();
        actix::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut reader = BufReader::new(read).take(MAX_LINE);
            let mut buf = Vec::new();
            if reader.read_until(b'\n', &mut buf).await.is_err() {
                return;
            }
            let response = match serde_json::from_slice::<Request>(&buf) {
                Ok(req) => agent
                    .send(req)
                    .await
                    .unwrap_or_else(|e| Response::Error(format!("agent unavailable: {e}"))),
                Err(e) => Response::Error(format!("malformed request: {e}")),
            };
            if let Ok(mut out) = serde_json::to_vec(&response) {
                out.push(b'\n');
                let _ = write.write_all(&out).await;
            }
        });
    }
}
