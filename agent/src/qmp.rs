//! A small QMP client: the only module that speaks to QEMU's monitor.
//!
//! One background task owns the socket. Commands go to it over a channel and
//! come back by id; asynchronous events (`STOP`, `RESUME`, `SHUTDOWN`, …) are
//! forwarded to the event channel given at connect. When QEMU closes the
//! socket (it exited, or another client took over) the event channel closes,
//! which is how the VM's owner learns QEMU is gone. Every call has a timeout
//! and every line read is bounded, so a wedged or hostile QEMU cannot hang or
//! balloon the agent.
//!
//! Lines are read through a [`FramedRead`] with a [`LinesCodec`], whose
//! `next()` is cancel-safe: the connection task waits for a reply line and a
//! command to send in one `select!`, and a command that wins the race must
//! not drop the part of a reply already read (a large `query-migrate` or
//! human-monitor answer often arrives in several pieces).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

/// Longest line accepted from QEMU; replies we use are a few KiB.
const MAX_LINE: usize = 4 * 1024 * 1024;

/// QEMU's side of the monitor, one JSON document per line.
type Lines = FramedRead<OwnedReadHalf, LinesCodec>;

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be opened.
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        /// The socket path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The greeting or negotiation was not QMP.
    #[error("QMP handshake failed: {0}")]
    Handshake(String),
    /// QEMU answered with an error.
    #[error("QMP command '{command}' failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No answer in time.
    #[error("QMP command '{0}' timed out")]
    Timeout(String),
    /// The connection is gone (QEMU exited or closed the monitor).
    #[error("QMP connection closed")]
    Closed,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, e.g. `SHUTDOWN`.
    pub name: String,
    /// Its data, `null` when absent.
    pub data: Value,
}

type Pending = oneshot::Sender<Result<Value, QmpError>>;

/// A handle to a connected QMP monitor. Cheap to clone.
#[derive(Debug, Clone)]
pub struct QmpClient {
    tx: mpsc::Sender<(String, Value, Pending)>,
}

impl QmpClient {
    /// Connects to the monitor at `path` and negotiates capabilities.
    ///
    /// Events are sent to `events`; it closes when the connection ends.
    pub async fn connect(
        path: &Path,
        timeout: Duration,
        events: mpsc::UnboundedSender<QmpEvent>,
    ) -> Result<QmpClient, QmpError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Connect {
                path: path.display().to_string(),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            })?
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (read, mut write) = stream.into_split();
        let mut reader = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_LINE));
        let greeting = tokio::time::timeout(timeout, read_json(&mut reader))
            .await
            .map_err(|_| QmpError::Handshake("no greeting".into()))??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Handshake(format!(
                "unexpected greeting {greeting}"
            )));
        }
        write_json(&mut write, &json!({"execute": "qmp_capabilities", "id": 0})).await?;
        loop {
            let v = tokio::time::timeout(timeout, read_json(&mut reader))
                .await
                .map_err(|_| QmpError::Handshake("no reply to qmp_capabilities".into()))??;
            if v.get("return").is_some() {
                break;
            }
            if let Some(err) = v.get("error") {
                return Err(QmpError::Handshake(err.to_string()));
            }
        }
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(run_connection(reader, write, rx, events));
        Ok(QmpClient { tx })
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.tx
            .send((command.to_string(), arguments, reply_tx))
            .await
            .map_err(|_| QmpError::Closed)?;
        match tokio::time::timeout(timeout, reply_rx).await {
            Err(_) => Err(QmpError::Timeout(command.to_string())),
            Ok(Err(_)) => Err(QmpError::Closed),
            Ok(Ok(r)) => r,
        }
    }

    /// `query-status`'s `status` field (`running`, `paused`, `inmigrate`, …).
    pub async fn status(&self, timeout: Duration) -> Result<String, QmpError> {
        let v = self.execute("query-status", Value::Null, timeout).await?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }
}

/// The next JSON line from QEMU. Cancel-safe: a partly received line stays
/// in the codec's buffer for the next call.
async fn read_json(reader: &mut Lines) -> Result<Value, QmpError> {
    match reader.next().await {
        None | Some(Err(LinesCodecError::Io(_))) => Err(QmpError::Closed),
        Some(Err(LinesCodecError::MaxLineLengthExceeded)) => Err(QmpError::Handshake(format!(
            "QMP line longer than {MAX_LINE} bytes"
        ))),
        Some(Ok(line)) => {
            serde_json::from_str(&line).map_err(|e| QmpError::Handshake(format!("bad JSON: {e}")))
        }
    }
}

async fn write_json(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    v: &Value,
) -> Result<(), QmpError> {
    let mut bytes = serde_json::to_vec(v).map_err(|e| QmpError::Handshake(e.to_string()))?;
    bytes.push(b'\n');
    write.write_all(&bytes).await.map_err(|_| QmpError::Closed)
}

async fn run_connection(
    mut reader: Lines,
    mut write: tokio::net::unix::OwnedWriteHalf,
    mut commands: mpsc::Receiver<(String, Value, Pending)>,
    events: mpsc::UnboundedSender<QmpEvent>,
) {
    let mut pending: HashMap<u64, (String, Pending)> = HashMap::new();
    let mut next_id: u64 = 1;
    loop {
        tokio::select! {
            cmd = commands.recv() => {
                let Some((command, arguments, reply)) = cmd else { break };
                let id = next_id;
                next_id += 1;
                let mut msg = json!({"execute": command, "id": id});
                if !arguments.is_null() {
                    msg["arguments"] = arguments;
                }
                if write_json(&mut write, &msg).await.is_err() {
                    let _ = reply.send(Err(QmpError::Closed));
                    break;
                }
                pending.insert(id, (command, reply));
            }
            line = read_json(&mut reader) => {
                let Ok(v) = line else { break };
                if let Some(name) = v.get("event").and_then(Value::as_str) {
                    let _ = events.send(QmpEvent {
                        name: name.to_string(),
                        data: v.get("data").cloned().unwrap_or(Value::Null),
                    });
                    continue;
                }
                let Some(id) = v.get("id").and_then(Value::as_u64) else { continue };
                let Some((command, reply)) = pending.remove(&id) else { continue };
                let result = if let Some(r) = v.get("return") {
                    Ok(r.clone())
                } else {
                    let err = v.get("error").cloned().unwrap_or(Value::Null);
                    Err(QmpError::Command {
                        command,
                        class: err.get("class").and_then(Value::as_str).unwrap_or("?").to_string(),
                        desc: err.get("desc").and_then(Value::as_str).unwrap_or("?").to_string(),
                    })
                };
                let _ = reply.send(result);
            }
        }
    }
    for (_, (_, reply)) in pending.drain() {
        let _ = reply.send(Err(QmpError::Closed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt as _, BufReader};
    use tokio::net::UnixListener;

    /// Size of each reply's payload: far more than one socket read.
    const BLOB: usize = 200 * 1024;

    /// A fake QEMU monitor: greeting, capabilities, then for each command a
    /// `BLOB`-byte reply written a few bytes at a time, yielding between
    /// pieces so the client sees the reply arrive in many partial reads.
    async fn fake_qemu(listener: UnixListener) {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n";
        if write.write_all(greeting).await.is_err() {
            return;
        }
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(cmd) = serde_json::from_str::<Value>(&line) else {
                return;
            };
            let id = cmd["id"].clone();
            let reply = if cmd["execute"] == "qmp_capabilities" {
                json!({"return": {}, "id": id})
            } else {
                json!({"return": {"blob": "x".repeat(BLOB)}, "id": id})
            };
            let mut bytes = reply.to_string().into_bytes();
            bytes.push(b'\n');
            for piece in bytes.chunks(13) {
                if write.write_all(piece).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        }
    }

    /// Replies that arrive in pieces while further commands are being sent
    /// must each reach their caller intact: the reader may be interrupted by
    /// the command branch of its `select!` at any point of a line.
    #[tokio::test]
    async fn replies_in_pieces_survive_concurrent_commands() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(fake_qemu(listener));
        let (events, _events_rx) = mpsc::unbounded_channel();
        let timeout = Duration::from_secs(20);
        let qmp = QmpClient::connect(&path, timeout, events)
            .await
            .expect("connect");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        // Issue commands without waiting for earlier replies, spaced so that
        // each lands while some reply is only partly received.
        let mut calls = Vec::new();
        for _ in 0..12 {
            let qmp = qmp.clone();
            calls.push(tokio::spawn(async move {
                qmp.execute("query-status", Value::Null, timeout).await
            }));
            for _ in 0..700 {
                tokio::task::yield_now().await;
            }
        }
        for call in calls {
            let result = tokio::time::timeout_at(deadline, call)
                .await
                .expect("every reply arrives before the deadline")
                .expect("caller task");
            match result {
                Ok(v) => assert_eq!(v["blob"].as_str().map(str::len), Some(BLOB)),
                Err(e) => panic!("a command failed: {e:?}"),
            }
        }
        server.abort();
    }
}
