//! The agent's local control protocol: one closed request enum, one response enum.
//!
//! The messages are `shared::proto`'s `AgentRequest`/`AgentResponse`, the same
//! ones the coordinator sends over QUIC. Locally, `flotilla-agent ctl …` and
//! `--once-start` speak them over the unix socket `STATE/agent.sock` as JSON
//! lines (one request, one response per line): the agent's equivalent of
//! libvirt's local `qemu:///system` socket, reachable only by local root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Largest request or response line.
const MAX_LINE: u64 = 4 * 1024 * 1024;

pub use flotilla_shared::proto::{
    AgentRequest as Request, AgentResponse as Response, ConsoleInfo, NetStatus, VmSummary,
};

/// A request delivered to the host actor (the actix envelope for [`Request`]).
#[derive(Debug, Clone, actix::Message)]
#[rtype(result = "Response")]
pub struct AgentCall(pub Request);

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
    agent: actix::Recipient<AgentCall>,
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
                    .send(AgentCall(req))
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
