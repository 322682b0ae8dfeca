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

/// A migration capability the agent sets (`migrate-set-capabilities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationCapability {
    /// `auto-converge`: throttle the guest's vCPUs until the copy converges.
    AutoConverge,
    /// `postcopy-ram`: allow switching to post-copy.
    PostcopyRam,
    /// `pause-before-switchover`: stop in `pre-switchover` with the guest
    /// paused, so disk mirrors finish before the source lets go of its disks.
    PauseBeforeSwitchover,
}

impl MigrationCapability {
    /// QEMU's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationCapability::AutoConverge => "auto-converge",
            MigrationCapability::PostcopyRam => "postcopy-ram",
            MigrationCapability::PauseBeforeSwitchover => "pause-before-switchover",
        }
    }
}

/// Every QMP command the agent sends: a closed set, each encoded to the
/// exact JSON QEMU expects by [`QmpCommand::encode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpCommand {
    /// `cont`: resume the guest.
    Cont,
    /// `stop`: pause the guest.
    Stop,
    /// `quit`: QEMU exits.
    Quit,
    /// `system_powerdown`: ACPI power button.
    SystemPowerdown,
    /// `system_reset`: the reset button.
    SystemReset,
    /// `query-status`: the run state (`running`, `paused`, `inmigrate`, …).
    QueryStatus,
    /// `query-migrate`: migration progress.
    QueryMigrate,
    /// `migrate-incoming`: listen for the migration stream (after `-incoming defer`).
    MigrateIncoming {
        /// Where to listen, e.g. `tcp:198.18.100.2:49152`.
        uri: String,
    },
    /// `migrate`: send this VM to `uri`.
    Migrate {
        /// The destination's listening URI.
        uri: String,
    },
    /// `migrate-set-parameters`; absent fields are left as QEMU has them.
    MigrateSetParameters {
        /// `downtime-limit`, in milliseconds.
        downtime_limit_ms: Option<u64>,
        /// `max-bandwidth`, in bytes per second.
        max_bandwidth: Option<u64>,
    },
    /// `migrate-set-capabilities`.
    MigrateSetCapabilities {
        /// Each capability and its state, in this order.
        capabilities: Vec<(MigrationCapability, bool)>,
    },
    /// `migrate_cancel`.
    MigrateCancel,
    /// `migrate-start-postcopy`.
    MigrateStartPostcopy,
    /// `client_migrate_info`: tell SPICE clients where the VM goes.
    ClientMigrateInfo {
        /// The destination host's console address.
        hostname: String,
        /// The destination's SPICE port.
        port: u16,
    },
    /// `set_password` for a console protocol.
    SetPassword {
        /// `vnc` or `spice`.
        protocol: String,
        /// The password.
        password: String,
    },
    /// `expire_password` for a console protocol.
    ExpirePassword {
        /// `vnc` or `spice`.
        protocol: String,
        /// `now`, `never`, or seconds since the epoch.
        time: String,
    },
    /// `human-monitor-command`: an HMP command line, passed through.
    HumanMonitor(String),
    /// `announce-self`: the guest's NICs send RARP (or a guest announce) so
    /// switches learn their new port after a migration. QEMU's own timing
    /// (50 ms first, 100 ms more each round, 5 rounds).
    AnnounceSelf,
    /// `query-block`: each drive and its image (format, size, backing file).
    QueryBlock,
    /// `nbd-server-start` on a TCP address (a migration destination).
    NbdServerStart {
        /// Address to listen on.
        host: String,
        /// Port.
        port: u16,
    },
    /// `block-export-add` of a node over the running NBD server, writable.
    NbdExport {
        /// Export id.
        id: String,
        /// The block node.
        node: String,
        /// The name clients ask for.
        name: String,
    },
    /// `nbd-server-stop`.
    NbdServerStop,
    /// `blockdev-add` of an NBD client node (a mirror's target).
    NbdClientAdd {
        /// The new node's name.
        node: String,
        /// Server address.
        host: String,
        /// Server port.
        port: u16,
        /// Export name.
        export: String,
    },
    /// `blockdev-mirror` from `device` into `target`; the job stays until
    /// dismissed, so its end (in sync or failed) can be read back.
    BlockdevMirror {
        /// Job id.
        job: String,
        /// The disk's top node.
        device: String,
        /// The target node.
        target: String,
        /// `full` or `top`.
        sync: &'static str,
        /// Bytes per second, 0 for no limit.
        speed: u64,
    },
    /// `query-block-jobs`.
    QueryBlockJobs,
    /// `block-job-cancel`: without force a ready mirror copies what is left
    /// and concludes in sync; with force it stops at once.
    BlockJobCancel {
        /// Job id.
        job: String,
        /// Stop without finishing.
        force: bool,
    },
    /// `job-dismiss` of a concluded job.
    JobDismiss {
        /// Job id.
        job: String,
    },
    /// `blockdev-del`.
    BlockdevDel {
        /// The node.
        node: String,
    },
    /// `migrate-continue` from `pre-switchover`.
    MigrateContinue,
}

impl QmpCommand {
    /// The QMP command name.
    pub fn name(&self) -> &'static str {
        match self {
            QmpCommand::Cont => "cont",
            QmpCommand::Stop => "stop",
            QmpCommand::Quit => "quit",
            QmpCommand::SystemPowerdown => "system_powerdown",
            QmpCommand::SystemReset => "system_reset",
            QmpCommand::QueryStatus => "query-status",
            QmpCommand::QueryMigrate => "query-migrate",
            QmpCommand::MigrateIncoming { .. } => "migrate-incoming",
            QmpCommand::Migrate { .. } => "migrate",
            QmpCommand::MigrateSetParameters { .. } => "migrate-set-parameters",
            QmpCommand::MigrateSetCapabilities { .. } => "migrate-set-capabilities",
            QmpCommand::MigrateCancel => "migrate_cancel",
            QmpCommand::MigrateStartPostcopy => "migrate-start-postcopy",
            QmpCommand::ClientMigrateInfo { .. } => "client_migrate_info",
            QmpCommand::SetPassword { .. } => "set_password",
            QmpCommand::ExpirePassword { .. } => "expire_password",
            QmpCommand::HumanMonitor(_) => "human-monitor-command",
            QmpCommand::AnnounceSelf => "announce-self",
            QmpCommand::QueryBlock => "query-block",
            QmpCommand::NbdServerStart { .. } => "nbd-server-start",
            QmpCommand::NbdExport { .. } => "block-export-add",
            QmpCommand::NbdServerStop => "nbd-server-stop",
            QmpCommand::NbdClientAdd { .. } => "blockdev-add",
            QmpCommand::BlockdevMirror { .. } => "blockdev-mirror",
            QmpCommand::QueryBlockJobs => "query-block-jobs",
            QmpCommand::BlockJobCancel { .. } => "block-job-cancel",
            QmpCommand::JobDismiss { .. } => "job-dismiss",
            QmpCommand::BlockdevDel { .. } => "blockdev-del",
            QmpCommand::MigrateContinue => "migrate-continue",
        }
    }

    /// The command name and its `arguments` (`null` for none).
    pub fn encode(&self) -> (&'static str, Value) {
        let arguments = match self {
            QmpCommand::Cont
            | QmpCommand::Stop
            | QmpCommand::Quit
            | QmpCommand::SystemPowerdown
            | QmpCommand::SystemReset
            | QmpCommand::QueryStatus
            | QmpCommand::QueryMigrate
            | QmpCommand::MigrateCancel
            | QmpCommand::MigrateStartPostcopy
            | QmpCommand::QueryBlock
            | QmpCommand::NbdServerStop
            | QmpCommand::QueryBlockJobs => Value::Null,
            QmpCommand::NbdServerStart { host, port } => json!({
                "addr": {"type": "inet", "data": {"host": host, "port": port.to_string()}}
            }),
            QmpCommand::NbdExport { id, node, name } => json!({
                "type": "nbd", "id": id, "node-name": node, "name": name, "writable": true
            }),
            QmpCommand::NbdClientAdd {
                node,
                host,
                port,
                export,
            } => json!({
                "driver": "nbd", "node-name": node, "export": export,
                "server": {"type": "inet", "host": host, "port": port.to_string()}
            }),
            QmpCommand::BlockdevMirror {
                job,
                device,
                target,
                sync,
                speed,
            } => json!({
                "job-id": job, "device": device, "target": target, "sync": sync,
                "speed": speed, "auto-dismiss": false
            }),
            QmpCommand::BlockJobCancel { job, force } => json!({"device": job, "force": force}),
            QmpCommand::JobDismiss { job } => json!({ "id": job }),
            QmpCommand::BlockdevDel { node } => json!({ "node-name": node }),
            QmpCommand::MigrateContinue => json!({"state": "pre-switchover"}),
            QmpCommand::MigrateIncoming { uri } | QmpCommand::Migrate { uri } => {
                json!({ "uri": uri })
            }
            QmpCommand::MigrateSetParameters {
                downtime_limit_ms,
                max_bandwidth,
            } => {
                let mut parameters = serde_json::Map::new();
                if let Some(ms) = downtime_limit_ms {
                    parameters.insert("downtime-limit".into(), (*ms).into());
                }
                if let Some(bps) = max_bandwidth {
                    parameters.insert("max-bandwidth".into(), (*bps).into());
                }
                Value::Object(parameters)
            }
            QmpCommand::MigrateSetCapabilities { capabilities } => {
                let caps: Vec<Value> = capabilities
                    .iter()
                    .map(|(c, state)| json!({"capability": c.as_str(), "state": state}))
                    .collect();
                json!({ "capabilities": caps })
            }
            QmpCommand::ClientMigrateInfo { hostname, port } => {
                json!({"protocol": "spice", "hostname": hostname, "port": port})
            }
            QmpCommand::SetPassword { protocol, password } => {
                json!({"protocol": protocol, "password": password})
            }
            QmpCommand::ExpirePassword { protocol, time } => {
                json!({"protocol": protocol, "time": time})
            }
            QmpCommand::HumanMonitor(line) => json!({ "command-line": line }),
            QmpCommand::AnnounceSelf => {
                json!({"initial": 50, "max": 550, "rounds": 5, "step": 100})
            }
        };
        (self.name(), arguments)
    }
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

    /// Runs one of the agent's [`QmpCommand`]s and returns its `return` value.
    pub async fn run(&self, command: &QmpCommand, timeout: Duration) -> Result<Value, QmpError> {
        let (name, arguments) = command.encode();
        self.execute(name, arguments, timeout).await
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

    #[test]
    fn commands_encode_as_qemu_expects() {
        use MigrationCapability::*;
        let cases: Vec<(QmpCommand, &str, Value)> = vec![
            (QmpCommand::Cont, "cont", Value::Null),
            (QmpCommand::Quit, "quit", Value::Null),
            (QmpCommand::SystemPowerdown, "system_powerdown", Value::Null),
            (QmpCommand::SystemReset, "system_reset", Value::Null),
            (QmpCommand::MigrateCancel, "migrate_cancel", Value::Null),
            (
                QmpCommand::Migrate {
                    uri: "tcp:10.0.0.2:49152".into(),
                },
                "migrate",
                json!({"uri": "tcp:10.0.0.2:49152"}),
            ),
            (
                QmpCommand::MigrateSetParameters {
                    downtime_limit_ms: Some(300),
                    max_bandwidth: None,
                },
                "migrate-set-parameters",
                json!({"downtime-limit": 300}),
            ),
            (
                QmpCommand::MigrateSetParameters {
                    downtime_limit_ms: None,
                    max_bandwidth: None,
                },
                "migrate-set-parameters",
                json!({}),
            ),
            (
                QmpCommand::MigrateSetCapabilities {
                    capabilities: vec![(AutoConverge, true), (PostcopyRam, false)],
                },
                "migrate-set-capabilities",
                json!({"capabilities": [
                    {"capability": "auto-converge", "state": true},
                    {"capability": "postcopy-ram", "state": false}]}),
            ),
            (
                QmpCommand::ClientMigrateInfo {
                    hostname: "h2".into(),
                    port: 5901,
                },
                "client_migrate_info",
                json!({"protocol": "spice", "hostname": "h2", "port": 5901}),
            ),
            (
                QmpCommand::ExpirePassword {
                    protocol: "vnc".into(),
                    time: "never".into(),
                },
                "expire_password",
                json!({"protocol": "vnc", "time": "never"}),
            ),
            (
                QmpCommand::HumanMonitor("info status".into()),
                "human-monitor-command",
                json!({"command-line": "info status"}),
            ),
        ];
        for (cmd, name, args) in cases {
            assert_eq!(cmd.encode(), (name, args), "{cmd:?}");
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
