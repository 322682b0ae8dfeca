//! The wire protocol: every message that crosses a process boundary.
//!
//! This module is a stability boundary: messages are closed enums, every frame
//! carries a protocol version, and a peer accepts its own version and the one
//! before it while their messages decode alike. A version that changes the
//! messages raises [`MIN_PROTOCOL_VERSION`] with it, so an older peer gets
//! [`FrameError::Retired`] by name instead of a misread message. Errors and
//! outcomes travel as types ([`OperatorError`], [`MigrationOutcome`],
//! [`VmRunState`]), never as text to parse back. Encoding is bincode 2 behind a 4-byte big-endian length, and
//! every decode is bounded by [`MAX_FRAME`].
//!
//! ```text
//! operator (flotilla)          coordinator                      agent (per host)
//!   │  QUIC+mTLS (role operator)   │   QUIC+mTLS (role agent)        │
//!   │                              │◀──── bi: AgentHello::Register ──│ facts: CPUs, memory,
//!   │                              │───── bi: HelloAck ─────────────▶│ networks, running VMs
//!   │                              │◀──── bi: AgentEvent::Heartbeat ─│ every few seconds,
//!   │                              │───── Ack ──────────────────────▶│ acknowledged
//!   │── bi: OperatorRequest ──────▶│                                 │
//!   │                              │───── bi: AgentRequest ─────────▶│ (start, shutdown, …)
//!   │                              │◀──── AgentResponse ─────────────│
//!   │◀─ OperatorResponse ──────────│                                 │
//! ```
//!
//! Pure: no sockets here; `net` moves these frames over QUIC.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
///
/// Version 2 numbers every agent report and reply ([`AgentEvent`],
/// [`AgentReply`]) so the coordinator can tell a report that predates one of
/// its actions exactly. Version 3 says per network whether guest NICs can
/// attach there ([`NetStatus::attach_error`]). Version 4 copies storage
/// during migrations ([`StorageCopy`], [`MirrorProgress`]) and lets an
/// operator override the storage safety rules (`allow_unsafe`). Version 5
/// adds web tickets ([`OperatorRequest::WebTicket`]), placement
/// explanations, console relays ([`AgentRequest::OpenConsole`]) and what
/// each host has committed ([`HostEntry`]). Version 6 adds high
/// availability: host leases and fencing ([`FenceReport`],
/// [`HelloAck::Accepted`]), VM incarnations, and the HA verbs. Version 7
/// sends heartbeats as deltas against the last acknowledged report
/// ([`Report`]). Version 8 refuses unsupported hardware at define by
/// element path ([`OperatorError::Unsupported`]). Version 9 runs several
/// coordinators: a fencing epoch in [`HelloAck::Accepted`], followers'
/// redirections ([`HelloAck::NotLeader`], [`OperatorError::NotLeader`]) and
/// [`OperatorRequest::Cluster`]; it also carries an operator's suspend
/// across a migration (`MigrateFinish::paused`, `Resume::operator`).
pub const PROTOCOL_VERSION: u32 = 9;
/// The oldest version this build still accepts. A version 8 agent cannot
/// read the fencing epoch, so it could register with a deposed leader:
/// refused by name.
pub const MIN_PROTOCOL_VERSION: u32 = 9;
/// Largest frame accepted, in bytes (payload, without the length prefix).
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

/// One framed message: the sender's protocol version and the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// The sender's protocol version.
    pub version: u32,
    /// The message.
    pub body: T,
}

/// A frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The bytes are not a message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The peer speaks an older version whose messages this build no longer reads.
    #[error("protocol version {got} is no longer supported (this build speaks {min} to {max}); upgrade the peer")]
    Retired {
        /// The peer's version.
        got: u32,
        /// Oldest accepted.
        min: u32,
        /// Newest accepted.
        max: u32,
    },
    /// The peer speaks a version this build does not.
    #[error("unsupported protocol version {got} (this build speaks {min} to {max})")]
    UnsupportedVersion {
        /// The peer's version.
        got: u32,
        /// Oldest accepted.
        min: u32,
        /// Newest accepted.
        max: u32,
    },
    /// The stream ended or failed.
    #[error("stream error: {0}")]
    Stream(String),
}

fn config() -> bincode::config::Configuration<
    bincode::config::BigEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME>,
> {
    bincode::config::standard()
        .with_big_endian()
        .with_limit::<MAX_FRAME>()
}

/// Encodes `body` as a length-prefixed frame of the current version.
pub fn encode_frame<T: Serialize>(body: &T) -> Result<Vec<u8>, FrameError> {
    let envelope = Envelope {
        version: PROTOCOL_VERSION,
        body,
    };
    let payload = bincode::serde::encode_to_vec(&envelope, config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            limit: MAX_FRAME,
        });
    }
    let mut out = Vec::with_capacity(payload.len() + 4);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Reads a frame's length prefix, refusing lengths over the limit.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len,
            limit: MAX_FRAME,
        });
    }
    Ok(len)
}

/// Decodes a frame's payload (after the length prefix), checking the version.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            limit: MAX_FRAME,
        });
    }
    // The version comes first, so a peer from the future is told so rather than "malformed".
    let (version, _): (u32, usize) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if version < MIN_PROTOCOL_VERSION {
        return Err(FrameError::Retired {
            got: version,
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
        });
    }
    if version > PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion {
            got: version,
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
        });
    }
    let (envelope, used): (Envelope<T>, usize) =
        bincode::serde::decode_from_slice(payload, config())
            .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            payload.len() - used
        )));
    }
    Ok(envelope.body)
}

/// Decodes one whole frame (prefix and payload) from `bytes`.
pub fn decode_frame<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    let Some((prefix, payload)) = bytes.split_first_chunk::<4>() else {
        return Err(FrameError::Malformed("shorter than a length prefix".into()));
    };
    let len = frame_len(*prefix)?;
    if payload.len() != len {
        return Err(FrameError::Malformed(format!(
            "length prefix says {len} bytes, frame has {}",
            payload.len()
        )));
    }
    decode_payload(payload)
}

// ---------------------------------------------------------------- agent ⇄ host

/// A request to a host agent, from the coordinator or the local control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentRequest {
    /// Start a VM from its definition XML (host-independent).
    Start {
        /// The XML text.
        xml: String,
        /// Where it came from, for error messages.
        source: String,
        /// The VM's incarnation: raised each time the coordinator restarts
        /// it elsewhere after fencing a host, so a returning host can tell
        /// its copy is stale (0 from the local control socket).
        incarnation: u64,
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
    /// Migration destination: start the VM paused, waiting for an incoming stream.
    MigrateIncoming {
        /// The migratable XML (nothing host-specific).
        xml: String,
        /// Where it came from, for error messages.
        source: String,
        /// Enable `postcopy-ram` (it must be on for both QEMUs).
        postcopy: bool,
        /// The token the source wrote beside each writable disk
        /// ([`AgentRequest::MarkStorage`]): the destination reads it back to
        /// prove it sees the same storage, not a file at the same path.
        storage_token: Option<String>,
        /// Disks to receive over NBD instead of finding them shared
        /// (`--copy-storage-all` / `--copy-storage-inc`).
        copy: Option<StorageCopy>,
        /// Accept writable disks the destination does not share (`--unsafe`).
        allow_unsafe: bool,
        /// The VM's incarnation, carried to the destination's copy.
        incarnation: u64,
    },
    /// Migration source: write `token` beside each writable disk of the
    /// running VM, for the destination to read back.
    MarkStorage {
        /// The VM.
        name: String,
        /// A token no other migration uses.
        token: String,
    },
    /// Migration source: mirror each copied disk into the destination's NBD
    /// server (`blockdev-mirror`), before the memory stream starts.
    MirrorStorage {
        /// The VM.
        name: String,
        /// The destination's NBD server.
        nbd: NbdServer,
        /// The disks (targets, e.g. `vda`) to mirror; each is exported under its target.
        targets: Vec<String>,
        /// Whole disks, or only the top image of each chain.
        mode: CopyMode,
        /// Cap per mirror, MiB/s.
        bandwidth_mib_s: Option<u64>,
    },
    /// Migration source, paused before switchover: finish each ready mirror
    /// (`block-job-cancel` without force copies what is left, then stops).
    CompleteMirrors {
        /// The VM.
        name: String,
    },
    /// Migration source: every mirror has concluded: drop them and let the
    /// migration switch over (`migrate-continue`).
    ContinueSwitchover {
        /// The VM.
        name: String,
    },
    /// Migration source: abandon the mirrors (`block-job-cancel` with force)
    /// and remove their NBD clients; the guest keeps its own disks.
    CancelMirrors {
        /// The VM.
        name: String,
    },
    /// Migration source: send the running VM to `uri`.
    MigrateOut {
        /// The VM.
        name: String,
        /// The destination's `tcp:ADDR:PORT`.
        uri: String,
        /// QEMU `downtime-limit`, ms.
        max_downtime_ms: Option<u64>,
        /// QEMU `max-bandwidth`, MiB/s.
        bandwidth_mib_s: Option<u64>,
        /// The `auto-converge` capability.
        auto_converge: bool,
        /// The `postcopy-ram` capability.
        postcopy: bool,
    },
    /// `migrate-start-postcopy` on a source.
    StartPostcopy {
        /// The VM.
        name: String,
    },
    /// Tell connected SPICE clients where to reconnect (`client_migrate_info`).
    ClientMigrateInfo {
        /// The VM.
        name: String,
        /// Destination console address.
        hostname: String,
        /// Destination console port.
        port: u16,
    },
    /// `query-migrate` on a VM.
    MigrationStatus {
        /// The VM.
        name: String,
    },
    /// `migrate_cancel` on a source.
    MigrateCancel {
        /// The VM.
        name: String,
    },
    /// Migration destination: resume the received VM and confirm its console.
    MigrateFinish {
        /// The VM.
        name: String,
        /// The operator had suspended it on the source: it stays paused
        /// here (and recorded suspended), as libvirt keeps a paused domain
        /// paused across a migration.
        paused: bool,
    },
    /// `cont` a paused VM: the operator's `resume`, or a migration's
    /// source taken back (`operator` false), which an operator's suspend
    /// keeps paused.
    Resume {
        /// The VM.
        name: String,
        /// The operator asked (virsh resume); else a migration rolls back.
        operator: bool,
    },
    /// Run a human monitor command (`virsh qemu-monitor-command --hmp`).
    MonitorCommand {
        /// The VM.
        name: String,
        /// The HMP command line, e.g. `info status`.
        command: String,
    },
    /// Relay the VM's VNC console over this stream: after the
    /// [`AgentResponse::ConsoleOpened`] frame the stream carries the raw
    /// RFB bytes both ways, so a coordinator reaches a console on a network
    /// only the host can reach.
    OpenConsole {
        /// The VM.
        name: String,
    },
    /// Reset the guest's hardware at once (`system_reset`).
    Reset {
        /// The VM.
        name: String,
    },
    /// Pause the guest's CPUs (`stop`); [`AgentRequest::Resume`] undoes it.
    Suspend {
        /// The VM.
        name: String,
    },
    /// Ask the guest agent (`org.qemu.guest_agent.0`) for the guest's
    /// interfaces and addresses.
    GuestInterfaces {
        /// The VM.
        name: String,
    },
    /// Relay the VM's first serial port (its pty) over this stream, as
    /// `virsh console` does: after [`AgentResponse::ConsoleOpened`] (naming
    /// the pty) the stream carries the serial bytes both ways.
    OpenSerial {
        /// The VM.
        name: String,
    },
}

/// One guest interface as its guest agent reports it
/// (`guest-network-get-interfaces`), for `domifaddr --source agent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInterface {
    /// The guest's name for it (`eth0`, `lo`).
    pub name: String,
    /// Its MAC address, when it has one.
    pub mac: Option<String>,
    /// Addresses with prefix length (`198.18.1.10/24`).
    pub addresses: Vec<String>,
}

/// `virsh domifaddr`'s table: one row per address, the name and MAC on the
/// first row of each interface.
pub fn domifaddr_table(interfaces: &[GuestInterface]) -> String {
    let mut out = format!(
        " {:<10} {:<19} {:<10} {}\n{}\n",
        "Name",
        "MAC address",
        "Protocol",
        "Address",
        "-".repeat(64)
    );
    for i in interfaces {
        let mac = i.mac.as_deref().unwrap_or("-");
        if i.addresses.is_empty() {
            out.push_str(&format!(" {:<10} {mac:<19} {:<10} -\n", i.name, "-"));
        }
        for (n, a) in i.addresses.iter().enumerate() {
            let proto = if a.contains(':') { "ipv6" } else { "ipv4" };
            let (name, mac) = if n == 0 {
                (i.name.as_str(), mac)
            } else {
                ("-", "-")
            };
            out.push_str(&format!(" {name:<10} {mac:<19} {proto:<10} {a}\n"));
        }
    }
    out
}

/// One console as reported to operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleInfo {
    /// `vnc://198.18.0.1:5900` and friends.
    pub uri: String,
    /// The network the address came from.
    pub network: Option<String>,
    /// Whether a password protects it (loopback-only consoles count as protected).
    pub authenticated: bool,
}

/// One running VM on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSummary {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// QEMU pid.
    pub pid: i32,
    /// QEMU's run state.
    pub state: VmRunState,
    /// Consoles.
    pub consoles: Vec<ConsoleInfo>,
    /// The incarnation it was started (or received) with.
    pub incarnation: u64,
    /// Its definition asks for high availability: the host kills it when
    /// its lease lapses.
    pub ha: bool,
    /// The operator suspended it: paused on purpose, not a migration's half.
    pub suspended: bool,
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
    /// Why guest NICs cannot attach to it here (a missing bridge or uplink,
    /// PCI passthrough); `None` when they can, address or not.
    pub attach_error: Option<String>,
}

/// The `net-list` table both command lines print: one row per network,
/// and under a network guest NICs cannot attach to, why.
pub fn net_list_table(networks: &[NetStatus]) -> String {
    let mut out = format!("{:<16} {:<12} {:<12} ADDRESS\n", "NAME", "MODE", "DEVICE");
    for n in networks {
        let addr = match (&n.address, &n.error) {
            (Some(a), _) => a.clone(),
            (None, e) => format!("error: {}", e.as_deref().unwrap_or_default()),
        };
        let device = n.device.as_deref().unwrap_or("-");
        out.push_str(&format!(
            "{:<16} {:<12} {:<12} {addr}\n",
            n.name, n.mode, device
        ));
        if let Some(e) = &n.attach_error {
            out.push_str(&format!("{:<16} guest NICs cannot attach: {e}\n", ""));
        }
    }
    out
}

/// Which disks `--copy-storage-*` copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CopyMode {
    /// `--copy-storage-all`: every writable disk, whole.
    All,
    /// `--copy-storage-inc`: the top image of each writable disk's chain;
    /// its backing files must exist on the destination.
    Inc,
}

impl CopyMode {
    /// The flag that asks for it.
    pub fn flag(self) -> &'static str {
        match self {
            CopyMode::All => "--copy-storage-all",
            CopyMode::Inc => "--copy-storage-inc",
        }
    }
}

/// A writable disk image of a running guest, as its QEMU sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskImage {
    /// The guest's name for it (`vda`).
    pub target: String,
    /// The image file.
    pub path: String,
    /// `raw` or `qcow2`.
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// The backing file, for an image that has one.
    pub backing: Option<String>,
    /// The backing file's format.
    pub backing_format: Option<String>,
}

/// What a migration destination must receive over NBD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageCopy {
    /// Whole disks or top images.
    pub mode: CopyMode,
    /// The source's writable disks.
    pub disks: Vec<DiskImage>,
}

/// A destination's NBD server for incoming disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdServer {
    /// Address on the migration network.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// One disk mirror on a migration source (`query-block-jobs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorProgress {
    /// The disk's target (`vda`).
    pub target: String,
    /// QEMU's job status: `running`, `ready`, `concluded`, …
    pub status: String,
    /// Bytes the job must copy so far.
    pub len: u64,
    /// Bytes copied.
    pub offset: u64,
    /// Source and target are in sync; writes are mirrored from now on.
    pub ready: bool,
    /// Why the job failed, if it did.
    pub error: Option<String>,
}

/// A `query-migrate` sample.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// QEMU's status: `setup`, `active`, `postcopy-active`, `completed`, `failed`, `cancelled`, …
    pub status: String,
    /// Bytes sent.
    pub transferred: u64,
    /// Bytes left.
    pub remaining: u64,
    /// Guest RAM.
    pub total: u64,
    /// Throughput in bytes per second.
    pub throughput_bps: u64,
    /// Dirty-page sync passes.
    pub dirty_sync_count: u64,
    /// Expected downtime, ms.
    pub expected_downtime_ms: u64,
    /// Actual downtime, ms (completed only).
    pub downtime_ms: Option<u64>,
    /// Total time, ms (completed only).
    pub total_time_ms: Option<u64>,
    /// QEMU's error description (failed only).
    pub error: Option<String>,
    /// The disk mirrors of a storage-copying migration (none otherwise).
    pub mirrors: Vec<MirrorProgress>,
}

impl MigrationProgress {
    /// Disk bytes to copy and copied, over every mirror.
    pub fn disk(&self) -> (u64, u64) {
        self.mirrors
            .iter()
            .fold((0, 0), |(t, d), m| (t + m.len, d + m.offset))
    }
}

/// A QEMU's run state, as `query-status` names it, plus the agent's own
/// `prelaunch` for a VM whose start has begun.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
// In JSON (`ctl list --json`, `flotilla … --json`) as QEMU's own words.
#[serde(rename_all = "lowercase")]
pub enum VmRunState {
    /// vCPUs run.
    Running,
    /// Stopped by request (or started with `-S` and not yet resumed).
    Paused,
    /// Waiting for, or receiving, an incoming migration.
    InMigrate,
    /// The source after a completed migration: paused, its state sent.
    PostMigrate,
    /// The agent is starting it; QEMU may not exist yet.
    Prelaunch,
    /// The last phase of sending a migration.
    #[serde(rename = "finish-migrate")]
    FinishMigrate,
    /// Suspended by the guest (S3).
    Suspended,
    /// The guest shut down; QEMU not yet gone.
    Shutdown,
    /// The guest panicked.
    #[serde(rename = "guest-panicked")]
    GuestPanicked,
    /// QEMU hit an internal or I/O error, or a watchdog fired.
    Error,
    /// The agent could not ask QEMU, or QEMU said something else.
    Unknown,
}

impl VmRunState {
    /// The state QEMU's `query-status` word stands for.
    pub fn from_qemu(status: &str) -> VmRunState {
        match status {
            "running" => VmRunState::Running,
            "paused" | "debug" | "restore-vm" | "save-vm" => VmRunState::Paused,
            "inmigrate" => VmRunState::InMigrate,
            "postmigrate" => VmRunState::PostMigrate,
            "prelaunch" => VmRunState::Prelaunch,
            "finish-migrate" => VmRunState::FinishMigrate,
            "suspended" => VmRunState::Suspended,
            "shutdown" => VmRunState::Shutdown,
            "guest-panicked" => VmRunState::GuestPanicked,
            "internal-error" | "io-error" | "watchdog" => VmRunState::Error,
            _ => VmRunState::Unknown,
        }
    }

    /// QEMU's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            VmRunState::Running => "running",
            VmRunState::Paused => "paused",
            VmRunState::InMigrate => "inmigrate",
            VmRunState::PostMigrate => "postmigrate",
            VmRunState::Prelaunch => "prelaunch",
            VmRunState::FinishMigrate => "finish-migrate",
            VmRunState::Suspended => "suspended",
            VmRunState::Shutdown => "shutdown",
            VmRunState::GuestPanicked => "guest-panicked",
            VmRunState::Error => "error",
            VmRunState::Unknown => "unknown",
        }
    }

    /// A copy that holds the whole guest and can run it (now or once
    /// resumed): not a destination still waiting for the stream, nor a
    /// source that sent it.
    pub fn holds_guest(self) -> bool {
        !matches!(self, VmRunState::InMigrate | VmRunState::PostMigrate)
    }

    /// A half of a live migration whose vCPUs do not run: a destination
    /// waiting for or holding the stream, or a completed source.
    pub fn is_migration_half(self) -> bool {
        matches!(
            self,
            VmRunState::InMigrate | VmRunState::PostMigrate | VmRunState::Paused
        )
    }
}

impl std::fmt::Display for VmRunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a live migration ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationOutcome {
    /// The guest runs on the destination only.
    Completed,
    /// Cancelled (by an operator or a timeout); the guest runs on the source.
    Aborted {
        /// Why.
        reason: String,
    },
    /// Failed; the guest runs on the source.
    Failed {
        /// Why.
        reason: String,
    },
    /// The destination was lost at switchover: the guest belongs to it, and
    /// the source stays paused until it reports.
    InDoubt {
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for MigrationOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationOutcome::Completed => write!(f, "completed"),
            MigrationOutcome::Aborted { reason } => write!(f, "aborted: {reason}"),
            MigrationOutcome::Failed { reason } => write!(f, "failed: {reason}"),
            MigrationOutcome::InDoubt { reason } => write!(f, "in doubt: {reason}"),
        }
    }
}

/// Why the coordinator refused or could not carry out an operator request.
///
/// On the wire as itself, so clients match variants instead of parsing
/// text; the words are virsh's where virsh has them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum OperatorError {
    /// No VM by that name.
    #[error("failed to get domain '{name}': no domain with matching name")]
    NoSuchDomain {
        /// The name asked for.
        name: String,
    },
    /// The verb needs a running VM.
    #[error("Requested operation is not valid: domain '{name}' is not running")]
    NotRunning {
        /// The VM.
        name: String,
    },
    /// A start of a VM that runs.
    #[error("Requested operation is not valid: domain '{name}' is running on host {host}")]
    RunningOn {
        /// The VM.
        name: String,
        /// Where.
        host: String,
    },
    /// A start of a VM recorded on a host that cannot be reached: it may run there.
    #[error("Requested operation is not valid: domain '{name}' is recorded as running (host unreachable) on host {host}")]
    RecordedOnUnreachable {
        /// The VM.
        name: String,
        /// The host the records name.
        host: String,
    },
    /// An undefine of a VM that is not shut off.
    #[error("Requested operation is not valid: domain '{name}' is running; stop it first")]
    StillRunning {
        /// The VM.
        name: String,
    },
    /// A migration owns the VM.
    #[error("Requested operation is not valid: domain '{name}' is migrating (flotilla migrate-abort {name} cancels it)")]
    Migrating {
        /// The VM.
        name: String,
    },
    /// A start or stop owns the VM.
    #[error("Requested operation is not valid: domain '{name}' has an operation in progress")]
    Busy {
        /// The VM.
        name: String,
    },
    /// The coordinator is removing or resuming a half of an interrupted migration.
    #[error("Requested operation is not valid: domain '{name}' is being repaired after an interrupted migration")]
    Repairing {
        /// The VM.
        name: String,
    },
    /// Stopping one half could leave the other running unrecorded.
    #[error("Requested operation is not valid: domain '{name}' has an unsettled migration to host {dest}; it can be stopped once both hosts have reported")]
    UnsettledMigration {
        /// The VM.
        name: String,
        /// The migration's destination.
        dest: String,
    },
    /// A migration to the host the VM runs on.
    #[error("domain '{name}' already runs on {host}")]
    AlreadyOn {
        /// The VM.
        name: String,
        /// Where it runs.
        host: String,
    },
    /// An abort with nothing to abort.
    #[error("no migration of '{name}' is in progress")]
    NoMigration {
        /// The VM.
        name: String,
    },
    /// The migration is past the point where it can be cancelled.
    #[error("{reason}")]
    AbortRefused {
        /// Why.
        reason: String,
    },
    /// No host can take the VM; the scheduler's explanation names every host's reasons.
    #[error("{explanation}")]
    NoPlacement {
        /// The scheduler's words.
        explanation: String,
    },
    /// The host never registered.
    #[error("host '{host}' is not known")]
    UnknownHost {
        /// The host.
        host: String,
    },
    /// The host has no live connection.
    #[error("host {host} is unreachable")]
    HostUnreachable {
        /// The host.
        host: String,
    },
    /// The host's agent refused or failed the request.
    #[error("host {host}: {message}")]
    Agent {
        /// The host.
        host: String,
        /// The agent's words.
        message: String,
    },
    /// No answer from the host: the request may or may not have happened.
    #[error("host {host}: {detail}")]
    NoAnswer {
        /// The host.
        host: String,
        /// What the transport said.
        detail: String,
    },
    /// A start got no answer: the VM stays recorded there until the host reports.
    #[error("host {host}: no answer to the start ({detail}); '{name}' stays recorded on {host} until the host reports whether it runs")]
    StartUnanswered {
        /// The VM.
        name: String,
        /// The host.
        host: String,
        /// What the transport said.
        detail: String,
    },
    /// The VM stopped but the records could not say so yet.
    #[error("{message}, but the records still place it: {store}")]
    StoppedUnrecorded {
        /// The agent's words.
        message: String,
        /// The store's error.
        store: String,
    },
    /// The definition was refused (file, line, element and reason).
    #[error("{0}")]
    InvalidDefinition(String),
    /// The definition asks for hardware Flotilla does not build yet: refused
    /// at define, each item by element path, so nothing runs with less.
    #[error("{file}: {refused}")]
    Unsupported {
        /// The file the definition came from.
        file: String,
        /// What, by element path.
        refused: crate::hardware::Refused,
    },
    /// The stored definition no longer parses.
    #[error("stored definition unreadable: {0}")]
    StoredDefinitionUnreadable(String),
    /// The store refused or failed (names and UUIDs taken, backend errors).
    #[error("{0}")]
    Store(String),
    /// The request could not be read.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Two options that cannot go together (as virsh's `VIR_ERR_INVALID_ARG`).
    #[error("invalid argument: {first} cannot be combined with {second}")]
    Incompatible {
        /// One option.
        first: String,
        /// The other.
        second: String,
    },
    /// The certificate's role may not do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// `host-fenced` for a host that is connected: it is not fenced.
    #[error(
        "host '{host}' is connected; only a host that is cut off or down can be declared fenced"
    )]
    HostConnected {
        /// The host.
        host: String,
    },
    /// A web ticket from a coordinator that serves no web pages.
    #[error("this coordinator serves no web pages: start it with --web-listen ADDR")]
    WebDisabled,
    /// A web console for a VM without a VNC console.
    #[error("domain '{name}' has no VNC console for the web console to show")]
    NoVncConsole {
        /// The VM.
        name: String,
    },
    /// The coordinator cannot take requests now.
    #[error("coordinator unavailable: {0}")]
    Unavailable(String),
    /// This coordinator is a follower and the verb changes the fleet: ask
    /// the leader.
    #[error("this coordinator is not the leader{}", match leader { Some(l) => format!("; the leader is {l}"), None => "; no leader is elected yet".to_string() })]
    NotLeader {
        /// The leader's address, when one is elected.
        leader: Option<String>,
    },
    /// An answer this build does not expect.
    #[error("unexpected answer {0}")]
    UnexpectedAnswer(String),
}

/// An agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentResponse {
    /// A migration destination is waiting for the stream.
    Incoming {
        /// The VM, paused.
        vm: VmSummary,
        /// Where to send the stream.
        uri: String,
        /// Where to mirror copied disks, when the request asked for a copy.
        nbd: Option<NbdServer>,
    },
    /// A migration source marked its writable disks; what they are.
    StorageMarked(Vec<DiskImage>),
    /// Migration progress.
    Migration(MigrationProgress),
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
    /// What the guest agent says of the guest's interfaces.
    GuestInterfaces(Vec<GuestInterface>),
    /// A console relay is connected; raw RFB bytes follow on the stream.
    ConsoleOpened {
        /// The console address the host connected to.
        addr: String,
    },
    /// The request failed.
    Error(String),
}

/// What a host tells the coordinator about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// Host name (must match the agent certificate's identity).
    pub host: String,
    /// Online CPUs.
    pub cpus: u32,
    /// Total memory in MiB.
    pub memory_mib: u64,
    /// Every network with its current address or error.
    pub networks: Vec<NetStatus>,
    /// Every VM running on the host.
    pub vms: Vec<VmSummary>,
    /// The machine types its QEMU offers (empty: unknown).
    pub machine_types: MachineTypes,
    /// What kills its HA guests when its lease lapses, whether or not the
    /// agent still runs.
    pub fence: FenceReport,
}

/// A host's fencing: what guarantees that its HA guests are dead once its
/// lease has lapsed, even if its agent is hung or gone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceReport {
    /// A fence keeper (a process apart from the agent) watches the lease.
    pub keeper: bool,
    /// The kernel watchdog's timeout, when the agent pets `/dev/watchdog`
    /// only while the lease is valid.
    pub watchdog_secs: Option<u32>,
}

impl FenceReport {
    /// Something other than the agent enforces the lease.
    pub fn works(&self) -> bool {
        self.keeper || self.watchdog_secs.is_some()
    }
}

/// What a host's QEMU can build: its machine types (versioned ones, and
/// the aliases that stand for one) and the guest CPUs it can give.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineTypes {
    /// Machine types that are not aliases (`pc-i440fx-10.0`, `microvm`).
    pub names: Vec<String>,
    /// (alias, the type it stands for): `("pc", "pc-i440fx-10.0")`.
    pub aliases: Vec<(String, String)>,
    /// QEMU runs guests under KVM here (host CPU models need it).
    pub kvm: bool,
    /// Named CPU models this host can give in full (`query-cpu-definitions`
    /// with no unavailable feature); empty: unknown, so not a filter.
    pub cpu_models: Vec<String>,
}

impl MachineTypes {
    /// The type an alias stands for here.
    pub fn resolve(&self, alias: &str) -> Option<&str> {
        self.aliases
            .iter()
            .find(|(a, _)| a == alias)
            .map(|(_, t)| t.as_str())
    }

    /// Whether this QEMU runs `machine` (a versioned type or an alias).
    pub fn has(&self, machine: &str) -> bool {
        self.names.iter().any(|n| n == machine) || self.resolve(machine).is_some()
    }

    /// Nothing is known (the agent could not ask its QEMU).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.aliases.is_empty()
    }

    /// Why this host cannot give the guest CPU `cpu` asks for, if it cannot.
    pub fn cpu_refusal(&self, cpu: &CpuNeed) -> Option<String> {
        if cpu.kvm && !self.kvm {
            return Some(format!("it cannot give a {} CPU without KVM", cpu.mode));
        }
        match &cpu.model {
            Some(m) if !self.cpu_models.is_empty() && !self.cpu_models.contains(m) => Some(
                format!("it cannot give CPU model '{m}' in full (its QEMU or host CPU lacks it)"),
            ),
            _ => None,
        }
    }
}

/// The guest CPU a definition asks of its host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CpuNeed {
    /// `host-passthrough` or `host-model`: only KVM gives them.
    pub kvm: bool,
    /// The `<cpu mode>`, for messages.
    pub mode: String,
    /// A named model (`<cpu mode='custom'><model>`).
    pub model: Option<String>,
}

/// The first message on an agent's connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentHello {
    /// Register this host.
    Register(HostFacts),
}

/// The coordinator's answer to a hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloAck {
    /// Registered; heartbeats are expected every `heartbeat_secs`.
    Accepted {
        /// Heartbeat interval.
        heartbeat_secs: u64,
        /// The lease each acknowledged heartbeat (and this registration)
        /// renews, measured on the agent's monotonic clock from when it sent
        /// the message; at expiry the host kills its HA guests.
        lease_ms: u64,
        /// VMs the host reported whose copy is stale: the coordinator fenced
        /// the host and restarted them elsewhere (a newer incarnation). The
        /// agent kills these before it serves anything else.
        stale: Vec<String>,
        /// The coordinator's fencing epoch: 0 with one coordinator, the
        /// etcd revision its leadership began at with several. An agent
        /// never registers with a lower epoch than one it has seen, so a
        /// deposed leader cannot take a host back.
        epoch: u64,
    },
    /// Refused, with the reason.
    Refused(String),
    /// This coordinator is a follower: register with the leader.
    NotLeader {
        /// The leader's address, when one is elected.
        leader: Option<String>,
    },
}

/// Unsolicited agent → coordinator messages, each acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
///
/// Reports, exits and replies share one sequence per connection (see
/// [`AgentReply`]): a number is taken *before* a report's facts are gathered
/// and *after* a reply's action took effect, so a report numbered below a
/// reply may predate that action and is not trusted for its VM.
pub enum AgentEvent {
    /// Periodic liveness with fresh facts.
    Heartbeat {
        /// Position in this connection's sequence.
        seq: u64,
        /// What the host runs now, whole or as a change.
        report: Report,
    },
    /// A VM's QEMU went away.
    VmStopped {
        /// Position in this connection's sequence.
        seq: u64,
        /// The VM.
        name: String,
        /// Why.
        reason: String,
    },
}

/// A heartbeat's facts: whole, or what changed since the report the
/// coordinator last acknowledged on this connection (see
/// [`crate::report_delta`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Report {
    /// Everything.
    Full(HostFacts),
    /// Only the changes.
    Delta(FactsDelta),
}

impl Report {
    /// The host the report is for.
    pub fn host(&self) -> &str {
        match self {
            Report::Full(f) => &f.host,
            Report::Delta(d) => &d.host,
        }
    }
}

/// What changed in a host's facts since the acknowledged report `base`.
/// A field left `None` is unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FactsDelta {
    /// Host name (must match the agent certificate's identity).
    pub host: String,
    /// The sequence number of the acknowledged report this applies to (0:
    /// the registration's facts).
    pub base: u64,
    /// Online CPUs, if changed.
    pub cpus: Option<u32>,
    /// Memory in MiB, if changed.
    pub memory_mib: Option<u64>,
    /// Every network, if any changed.
    pub networks: Option<Vec<NetStatus>>,
    /// Machine types, if changed.
    pub machine_types: Option<MachineTypes>,
    /// Fencing, if changed.
    pub fence: Option<FenceReport>,
    /// VMs that are new or differ from `base`.
    pub vms_changed: Vec<VmSummary>,
    /// VMs in `base` that are gone.
    pub vms_gone: Vec<String>,
}

/// An agent's answer to a coordinator request, numbered in the connection's
/// sequence once the action it answers has taken effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReply {
    /// Position in this connection's sequence.
    pub seq: u64,
    /// The answer.
    pub response: AgentResponse,
}

// ------------------------------------------------------ client → coordinator

/// Every stream a client opens to the coordinator starts with one of these.
///
/// The coordinator dispatches on (certificate role, variant), so an agent
/// certificate cannot make operator requests and an operator certificate
/// cannot register as a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// An agent registering its host.
    Hello(AgentHello),
    /// An operator request.
    Operator(OperatorRequest),
    /// An agent's heartbeat or report. A heartbeat is acknowledged only once
    /// the coordinator applied it (the acknowledgement renews the host's
    /// lease); otherwise the answer is a refusal and the agent registers
    /// again. An unanswered one means the coordinator is gone.
    Event(AgentEvent),
}

/// The coordinator's reply on a client-opened stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// Answer to [`ClientMessage::Hello`].
    Hello(HelloAck),
    /// Answer to [`ClientMessage::Operator`].
    Operator(OperatorResponse),
    /// Answer to [`ClientMessage::Event`].
    Ack,
    /// A progress frame sent before the final answer of a long request.
    Progress(MigrationProgress),
    /// A line of progress for a person (per-VM steps of a drain).
    Note(String),
}

// ---------------------------------------------------------- operator ⇄ fleet

/// A request from an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorRequest {
    /// Store a definition (domain XML).
    Define {
        /// The XML text.
        xml: String,
        /// The file it came from.
        source: String,
    },
    /// Remove a stopped VM's definition.
    Undefine {
        /// The VM.
        name: String,
    },
    /// VMs; with `all`, also the ones not running.
    List {
        /// Include stopped VMs.
        all: bool,
    },
    /// The stored definition, or with `live` the running VM's live XML.
    DumpXml {
        /// The VM.
        name: String,
        /// Ask the VM's host for its live XML.
        live: bool,
        /// Include console passwords (virsh's `--security-info`).
        security_info: bool,
    },
    /// Start a VM, on `host` or where the scheduler chooses.
    Start {
        /// The VM.
        name: String,
        /// A host to insist on.
        host: Option<String>,
    },
    /// ACPI shutdown.
    Shutdown {
        /// The VM.
        name: String,
        /// Seconds before escalating.
        timeout_secs: u64,
    },
    /// Kill a VM.
    Destroy {
        /// The VM.
        name: String,
    },
    /// Where a VM's consoles listen now.
    DomDisplay {
        /// The VM.
        name: String,
    },
    /// The fleet's hosts.
    Hosts,
    /// A host's networks.
    NetList {
        /// The host.
        host: String,
    },
    /// Live-migrate a running VM; progress frames precede the answer.
    Migrate {
        /// The VM.
        name: String,
        /// Destination; the scheduler picks one when absent.
        to: Option<String>,
        /// QEMU `downtime-limit`, ms.
        max_downtime_ms: Option<u64>,
        /// QEMU `max-bandwidth`, MiB/s.
        bandwidth_mib_s: Option<u64>,
        /// QEMU's `auto-converge`.
        auto_converge: bool,
        /// Switch to post-copy after the first pass.
        postcopy: bool,
        /// Abort when not done in this many seconds.
        timeout_secs: Option<u64>,
        /// Copy the writable disks to the destination during the migration.
        copy_storage: Option<CopyMode>,
        /// Migrate although the storage safety rules say no (`virsh migrate --unsafe`).
        allow_unsafe: bool,
    },
    /// Cancel a running migration.
    MigrateAbort {
        /// The VM.
        name: String,
    },
    /// Stop placing on a host and migrate every VM off it; notes precede the answer.
    HostDrain {
        /// The host.
        host: String,
        /// Migrations at once.
        parallel: u32,
    },
    /// Place on a drained host again.
    HostUndrain {
        /// The host.
        host: String,
    },
    /// Recent fleet events as notes; with `follow`, keep streaming new ones.
    Events {
        /// Keep the stream open for new events.
        follow: bool,
    },
    /// A one-time ticket for the web pages: a VM's console page, or the
    /// fleet page when `console` is `None`.
    WebTicket {
        /// The VM whose console the ticket opens.
        console: Option<String>,
    },
    /// Why each VM is where it is: the scheduler's explanation of its last
    /// placement, as far as this coordinator has seen it.
    Placements,
    /// Turn high availability on or off in a VM's definition.
    SetHa {
        /// The VM.
        name: String,
        /// On or off.
        on: bool,
    },
    /// The operator confirms that `host` is powered off (or its guests are
    /// otherwise dead): its HA VMs restart elsewhere at once.
    HostFenced {
        /// The host.
        host: String,
    },
    /// One VM in detail (virsh `dominfo`).
    DomInfo {
        /// The VM.
        name: String,
    },
    /// Reset the VM's hardware at once (`virsh reset`).
    Reboot {
        /// The VM.
        name: String,
    },
    /// Pause the VM's CPUs (`virsh suspend`).
    Suspend {
        /// The VM.
        name: String,
    },
    /// Resume a suspended VM (`virsh resume`).
    Resume {
        /// The VM.
        name: String,
    },
    /// The guest's interfaces and addresses from its guest agent
    /// (`virsh domifaddr --source agent`).
    DomIfAddr {
        /// The VM.
        name: String,
    },
    /// Start the VM when the fleet comes up, or not (`virsh autostart`).
    SetAutostart {
        /// The VM.
        name: String,
        /// On or off.
        on: bool,
    },
    /// The coordinators, which one leads, and the store under them.
    Cluster,
    /// Attach to a VM's serial console (`virsh console`): after
    /// [`OperatorResponse::ConsoleAttached`] the stream carries the guest's
    /// serial bytes both ways until either side closes.
    Console {
        /// The VM.
        name: String,
    },
}

/// The scheduler's explanation of one VM's last placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementNote {
    /// The VM.
    pub name: String,
    /// `started on host-a (ranked: …)`, `not placed: …` or `migrated from … to …`.
    pub explanation: String,
}

/// One VM in detail (`flotilla dominfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomInfo {
    /// What `list` shows.
    pub entry: VmListEntry,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in KiB.
    pub memory_kib: u64,
}

/// One VM in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmListEntry {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// `running` or `shut off` (libvirt's words), or `unknown` while its host is unreachable.
    pub state: String,
    /// Where it runs.
    pub host: Option<String>,
    /// Definition generation.
    pub generation: u64,
    /// High availability is on in its definition.
    pub ha: bool,
    /// Its incarnation (raised at each restart after fencing).
    pub incarnation: u64,
    /// Why an HA VM waits to be restarted (no room anywhere, no working
    /// fence on its host), when it does.
    pub pending_restart: Option<String>,
}

/// One host in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEntry {
    /// Name.
    pub name: String,
    /// `connected`, `unreachable` or `draining`.
    pub state: String,
    /// CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// VMs running there.
    pub vms: u32,
    /// vCPUs committed to VMs placed there.
    pub committed_vcpus: u32,
    /// Memory committed to VMs placed there, MiB.
    pub committed_memory_mib: u64,
    /// Its networks as it last reported them (empty while unreachable).
    pub networks: Vec<NetStatus>,
    /// Seconds since the last heartbeat.
    pub last_seen_secs: u64,
}

/// The coordinator's answer to an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorResponse {
    /// A definition was stored durably.
    Defined {
        /// The VM.
        name: String,
        /// Its UUID.
        uuid: String,
        /// The new generation.
        generation: u64,
        /// Warnings (e.g. a pinned host-specific address).
        warnings: Vec<String>,
    },
    /// An action finished.
    Done(String),
    /// VMs.
    Vms(Vec<VmListEntry>),
    /// XML text.
    Xml(String),
    /// A VM started.
    Started {
        /// The VM.
        name: String,
        /// Where.
        host: String,
        /// Its consoles.
        consoles: Vec<ConsoleInfo>,
        /// Why this host (the scheduler's ranking).
        explanation: String,
        /// Warnings from the host.
        warnings: Vec<String>,
    },
    /// Consoles of a VM and the host they are on.
    Consoles {
        /// The host.
        host: String,
        /// The consoles.
        consoles: Vec<ConsoleInfo>,
    },
    /// Hosts.
    Hosts(Vec<HostEntry>),
    /// A host's networks.
    Networks {
        /// The host.
        host: String,
        /// Its networks.
        networks: Vec<NetStatus>,
    },
    /// A migration ended.
    Migrated {
        /// The VM.
        name: String,
        /// Where it was.
        from: String,
        /// Where it is now (the source when the migration did not complete).
        on: String,
        /// How it ended.
        outcome: MigrationOutcome,
        /// Wall time from request to end, ms.
        elapsed_ms: u64,
        /// Final QEMU statistics, when the source got that far.
        stats: Option<MigrationProgress>,
    },
    /// A drain ended.
    Drained {
        /// The host.
        host: String,
        /// VMs moved, with their new host.
        moved: Vec<(String, String)>,
        /// VMs that could not move, with the reason.
        failed: Vec<(String, String)>,
    },
    /// A URL that opens a web page once.
    WebUrl {
        /// The URL, with its one-time ticket.
        url: String,
        /// Seconds until the ticket expires unused.
        expires_secs: u64,
    },
    /// Each VM's last placement, by name.
    Placements(Vec<PlacementNote>),
    /// One VM in detail.
    DomInfo(DomInfo),
    /// The guest's interfaces, from its guest agent.
    GuestInterfaces {
        /// The host the VM runs on.
        host: String,
        /// What the guest agent said.
        interfaces: Vec<GuestInterface>,
    },
    /// A serial console is attached; its raw bytes follow on the stream.
    ConsoleAttached {
        /// The host the VM runs on.
        host: String,
        /// The serial device there (`/dev/pts/N`).
        device: String,
    },
    /// The control plane.
    Cluster(ClusterStatus),
    /// The request was refused or failed.
    Error(OperatorError),
}

/// The control plane as one coordinator sees it (`flotilla cluster`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// `redb` (one coordinator) or `etcd`.
    pub store: String,
    /// The coordinator that answered.
    pub answered_by: String,
    /// Every coordinator that is up, by address.
    pub coordinators: Vec<CoordinatorEntry>,
    /// etcd's members (empty on redb).
    pub members: Vec<EtcdMember>,
}

/// One coordinator in [`ClusterStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorEntry {
    /// Its QUIC address.
    pub address: String,
    /// It is the leader.
    pub leader: bool,
    /// The leader's fencing epoch (0 on a follower).
    pub epoch: u64,
    /// Its process id.
    pub pid: u32,
}

/// One etcd member in [`ClusterStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdMember {
    /// Its name.
    pub name: String,
    /// Its id, in hex as etcdctl prints it.
    pub id: String,
    /// Its client URLs.
    pub client_urls: Vec<String>,
    /// It answered a status request.
    pub healthy: bool,
    /// It is etcd's raft leader.
    pub raft_leader: bool,
    /// What was wrong, when it did not answer.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip() {
        let req = OperatorRequest::Start {
            name: "web01".into(),
            host: Some("host-a".into()),
        };
        let bytes = encode_frame(&req).expect("encode");
        assert_eq!(decode_frame::<OperatorRequest>(&bytes), Ok(req));
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        let prefix = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert_eq!(
            frame_len(prefix),
            Err(FrameError::TooLarge {
                len: MAX_FRAME + 1,
                limit: MAX_FRAME
            })
        );
    }

    #[test]
    fn unknown_versions_are_named() {
        let future = Envelope {
            version: PROTOCOL_VERSION + 5,
            body: OperatorRequest::Hosts,
        };
        let payload = bincode::serde::encode_to_vec(&future, config()).expect("encode");
        assert_eq!(
            decode_payload::<OperatorRequest>(&payload),
            Err(FrameError::UnsupportedVersion {
                got: PROTOCOL_VERSION + 5,
                min: MIN_PROTOCOL_VERSION,
                max: PROTOCOL_VERSION
            })
        );
        let previous = Envelope {
            version: MIN_PROTOCOL_VERSION,
            body: OperatorRequest::Hosts,
        };
        let payload = bincode::serde::encode_to_vec(&previous, config()).expect("encode");
        assert_eq!(
            decode_payload::<OperatorRequest>(&payload),
            Ok(OperatorRequest::Hosts)
        );
    }

    #[test]
    fn retired_versions_are_refused_by_name() {
        // Version 1's agent messages had no sequence numbers, version 2's
        // network statuses no NIC field, version 3's migrations no storage
        // copy, version 4's host entries no committed capacity, version 5's
        // hosts no lease, version 6's heartbeats no deltas, version 7 no
        // hardware refusal, version 8 no fencing epoch; their frames are
        // refused before their body is read, whatever the body.
        for old in [1u8, 2, 3, 4, 5, 6, 7, 8] {
            let mut bytes =
                encode_frame(&ClientMessage::Operator(OperatorRequest::Hosts)).expect("encode");
            bytes[4] = old;
            let e = decode_frame::<ClientMessage>(&bytes).expect_err("refused");
            assert_eq!(
                e,
                FrameError::Retired {
                    got: u32::from(old),
                    min: 9,
                    max: 9
                }
            );
            assert_eq!(
                e.to_string(),
                format!(
                    "protocol version {old} is no longer supported (this build speaks 9 to 9); \
                     upgrade the peer"
                )
            );
        }
    }

    #[test]
    fn typed_errors_and_outcomes_cross_the_wire_as_themselves() {
        let r = OperatorResponse::Error(OperatorError::Migrating { name: "web".into() });
        let bytes = encode_frame(&r).expect("encode");
        assert_eq!(decode_frame::<OperatorResponse>(&bytes), Ok(r));
        assert_eq!(
            OperatorError::Migrating { name: "web".into() }.to_string(),
            "Requested operation is not valid: domain 'web' is migrating \
             (flotilla migrate-abort web cancels it)"
        );
        let outcome = MigrationOutcome::Aborted {
            reason: "timed out after 2s".into(),
        };
        assert_eq!(outcome.to_string(), "aborted: timed out after 2s");
        for word in ["running", "paused", "inmigrate", "postmigrate", "prelaunch"] {
            assert_eq!(VmRunState::from_qemu(word).as_str(), word);
        }
        assert_eq!(VmRunState::from_qemu("io-error"), VmRunState::Error);
        assert_eq!(VmRunState::from_qemu("colo"), VmRunState::Unknown);
        // JSON shows QEMU's words, as before the type existed.
        for state in [
            VmRunState::InMigrate,
            VmRunState::PostMigrate,
            VmRunState::FinishMigrate,
            VmRunState::GuestPanicked,
        ] {
            let json = serde_json::to_string(&state).expect("json");
            assert_eq!(json, format!("\"{}\"", state.as_str()));
        }
    }

    #[test]
    fn trailing_garbage_is_malformed() {
        let mut bytes = encode_frame(&OperatorRequest::Hosts).expect("encode");
        bytes.push(0);
        let len = (bytes.len() - 4) as u32;
        bytes[..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            decode_frame::<OperatorRequest>(&bytes),
            Err(FrameError::Malformed(m)) if m.contains("trailing")
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<OperatorRequest>(&bytes);
            let _ = decode_frame::<AgentHello>(&bytes);
            let _ = decode_frame::<AgentEvent>(&bytes);
            let _ = decode_payload::<OperatorResponse>(&bytes);
            let _ = decode_payload::<AgentRequest>(&bytes);
        }

        #[test]
        fn mutated_frames_never_panic(idx in 0usize..64, val in any::<u8>(), name in "[a-z]{0,20}") {
            let mut bytes = encode_frame(&OperatorRequest::Define { xml: name.clone(), source: name }).expect("encode");
            let i = idx % bytes.len();
            bytes[i] = val;
            let _ = decode_frame::<OperatorRequest>(&bytes);
        }
    }
}
