//! Starting, finding and stopping QEMU processes: the I/O shell around
//! [`crate::argv`] and [`crate::console`].
//!
//! QEMU runs in its own process group with stdout and stderr in a log file in
//! the VM's state directory, so neither a signal to the agent's group nor the
//! agent's death reaches the guest. Start is: spawn paused, connect QMP, set
//! console passwords, `cont`, then confirm each console really accepts
//! connections (for VNC, read the RFB banner).

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::argv::{QemuArgv, VmPaths};
use crate::console::{ConsoleEndpoint, ConsoleTarget};
use crate::qmp::{MigrationCapability, QmpClient, QmpCommand, QmpError, QmpEvent};

/// How long each start step may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartTimeouts {
    /// From spawn until QMP answers.
    pub qmp: Duration,
    /// For each QMP command.
    pub command: Duration,
    /// For each console to accept a connection.
    pub console: Duration,
}

impl Default for StartTimeouts {
    fn default() -> Self {
        StartTimeouts {
            qmp: Duration::from_secs(15),
            command: Duration::from_secs(10),
            console: Duration::from_secs(5),
        }
    }
}

/// A console secret to apply over QMP before the guest runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSecret {
    /// `vnc` or `spice`.
    pub protocol: &'static str,
    /// The password.
    pub password: String,
    /// libvirt's `passwdValidTo` (`YYYY-MM-DDTHH:MM:SS`, UTC), if any.
    pub valid_to: Option<String>,
}

/// Why a start failed. Every variant carries the tail of QEMU's log when QEMU ran.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The state directory or log could not be prepared.
    #[error("cannot prepare {path}: {source}")]
    Prepare {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The QEMU binary could not be executed.
    #[error("cannot execute {program}: {source}")]
    Spawn {
        /// The binary.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited during start.
    #[error("QEMU exited during start ({status}); its last output:\n{log_tail}")]
    Exited {
        /// Exit status.
        status: String,
        /// Last lines of QEMU's stderr.
        log_tail: String,
    },
    /// QEMU's user could not be given its files.
    #[error("{0}")]
    Access(String),
    /// `<vcpu cpuset>` could not be applied to QEMU's threads.
    #[error("cannot pin QEMU to CPUs {cpus:?}: {reason}")]
    Affinity {
        /// The CPUs asked for.
        cpus: Vec<u32>,
        /// Why.
        reason: String,
    },
    /// A QMP step failed.
    #[error("{step} failed; QEMU's last output:\n{log_tail}")]
    Qmp {
        /// Which step.
        step: &'static str,
        /// Why.
        #[source]
        source: QmpError,
        /// Last lines of QEMU's stderr.
        log_tail: String,
    },
    /// A console did not accept connections.
    #[error("console {uri} did not answer: {reason}")]
    Console {
        /// The console.
        uri: String,
        /// Why.
        reason: String,
    },
}

/// A QEMU that has started and runs the guest.
#[derive(Debug)]
pub struct Launched {
    /// Its pid.
    pub pid: i32,
    /// Its QMP connection.
    pub qmp: QmpClient,
    /// Its QMP events; closes when QEMU goes away.
    pub events: mpsc::UnboundedReceiver<QmpEvent>,
    /// The child handle, to reap it.
    pub child: tokio::process::Child,
}

/// How a launched QEMU should end up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchMode {
    /// Running, consoles confirmed.
    Run,
    /// Paused, waiting for a migration stream (argv has `-incoming defer`).
    Incoming {
        /// Where to listen, e.g. `tcp:198.18.100.2:49152`.
        uri: String,
        /// Enable `postcopy-ram`, which must match the source.
        postcopy: bool,
        /// Serve disks over NBD to receive a storage copy.
        nbd: Option<NbdExports>,
    },
}

/// A destination's NBD server for a storage copy, and what it exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdExports {
    /// Address to listen on (the migration network's).
    pub host: String,
    /// Port.
    pub port: u16,
    /// (block node, export name) for each copied disk, writable.
    pub exports: Vec<(String, String)>,
}

/// Pins every thread of `pid` to `cpus` (those the kernel does not have
/// are left out by it; none at all is an error).
fn pin(pid: i32, cpus: &[u32]) -> Result<(), LaunchError> {
    use nix::sched::{sched_setaffinity, CpuSet};
    let fail = |reason: String| LaunchError::Affinity {
        cpus: cpus.to_vec(),
        reason,
    };
    let mut set = CpuSet::new();
    for c in cpus {
        // CPUs past what a set can name cannot exist here either.
        let _ = set.set(*c as usize);
    }
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| fail(format!("cannot list QEMU's threads: {e}")))?;
    for t in tasks.flatten() {
        let Ok(tid) = t.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        match sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set) {
            // A thread that ended while the list was read.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(nix::errno::Errno::EINVAL) => {
                return Err(fail("none of these CPUs is online on this host".into()))
            }
            Err(other) => return Err(fail(other.to_string())),
        }
    }
    Ok(())
}

/// The error for a path the launch could not prepare.
fn prepare(path: &Path) -> impl FnOnce(std::io::Error) -> LaunchError {
    let path = path.display().to_string();
    move |source| LaunchError::Prepare { path, source }
}

/// Spawns QEMU paused, applies `secrets`, then either resumes it and confirms
/// `endpoints`, or (incoming migration) starts listening for the stream.
///
/// `fds` are open NIC devices, each with the number QEMU's argv expects it
/// on; they are mapped in the child only, so no other QEMU inherits them.
#[allow(clippy::too_many_arguments)]
pub async fn launch(
    argv: &QemuArgv,
    paths: &VmPaths,
    secrets: &[ConsoleSecret],
    endpoints: &[ConsoleEndpoint],
    mode: LaunchMode,
    timeouts: StartTimeouts,
    fds: Vec<(OwnedFd, i32)>,
) -> Result<Launched, LaunchError> {
    std::fs::create_dir_all(&paths.dir).map_err(prepare(&paths.dir))?;
    // QEMU's directory and files first (given to its user when confined);
    // all given back, and its cgroup removed, if the start fails.
    crate::dac::label(
        &paths.dir,
        &paths.run_dir(),
        &argv.dac_dirs,
        &argv.dac,
        &argv.dac_logs,
        argv.run_as.as_ref(),
    )
    .map_err(LaunchError::Access)?;
    let launched = launch_labelled(argv, paths, secrets, endpoints, mode, timeouts, fds).await;
    if launched.is_err() {
        crate::dac::restore_recorded(&paths.dir);
        crate::cgroup::remove_recorded(&paths.dir, Duration::from_secs(5)).await;
    }
    launched
}

#[allow(clippy::too_many_arguments)]
async fn launch_labelled(
    argv: &QemuArgv,
    paths: &VmPaths,
    secrets: &[ConsoleSecret],
    endpoints: &[ConsoleEndpoint],
    mode: LaunchMode,
    timeouts: StartTimeouts,
    fds: Vec<(OwnedFd, i32)>,
) -> Result<Launched, LaunchError> {
    for stale in [paths.qmp_socket(), paths.pidfile()] {
        match std::fs::remove_file(&stale) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(prepare(&stale)(e)),
            _ => {}
        }
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.log())
        .map_err(prepare(&paths.log()))?;
    let log_err = log.try_clone().map_err(prepare(&paths.log()))?;
    let mut cmd = std::process::Command::new(&argv.program);
    cmd.args(&argv.args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: Ctrl-C or a kill of the agent's group spares the guest.
        .process_group(0);
    if let Some(user) = &argv.run_as {
        cmd.uid(user.uid).gid(user.gid);
    }
    let mappings = fds
        .into_iter()
        .map(|(parent_fd, child_fd)| FdMapping {
            parent_fd,
            child_fd,
        })
        .collect();
    cmd.fd_mappings(mappings).map_err(|e| LaunchError::Spawn {
        program: argv.program.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(false)
        .spawn()
        .map_err(|source| LaunchError::Spawn {
            program: argv.program.display().to_string(),
            source,
        })?;
    let pid = child.id().map_or(-1, |p| p as i32);
    let (events_tx, events) = mpsc::unbounded_channel();

    let qmp = match connect_while_alive(&mut child, paths, timeouts, events_tx).await {
        Ok(q) => q,
        Err(e) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(e);
        }
    };
    if let Some(cgroup) = &argv.cgroup {
        // Before the guest runs (QEMU's own start-up, memory included, was
        // counted where the agent is).
        if let Err(reason) = crate::cgroup::place(cgroup, &paths.dir, pid) {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(LaunchError::Access(reason));
        }
    }
    if let Some(cpus) = &argv.affinity {
        // QEMU is paused and its threads exist: each is pinned before any
        // guest code runs, as libvirt pins a `<vcpu cpuset>` guest.
        if let Err(e) = pin(pid, cpus) {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(e);
        }
    }
    let qmp_step = |step: &'static str| {
        let log = paths.log();
        move |source| LaunchError::Qmp {
            step,
            source,
            log_tail: log_tail(&log, 20),
        }
    };
    let result: Result<(), LaunchError> = async {
        for s in secrets {
            let set = QmpCommand::SetPassword {
                protocol: s.protocol.to_string(),
                password: s.password.clone(),
            };
            qmp.run(&set, timeouts.command)
                .await
                .map_err(qmp_step("set_password"))?;
            let time = match &s.valid_to {
                Some(t) => parse_valid_to(t)
                    .map(|secs| secs.to_string())
                    .unwrap_or_else(|| "now".to_string()),
                None => "never".to_string(),
            };
            let expire = QmpCommand::ExpirePassword {
                protocol: s.protocol.to_string(),
                time,
            };
            qmp.run(&expire, timeouts.command)
                .await
                .map_err(qmp_step("expire_password"))?;
        }
        match &mode {
            LaunchMode::Run => {
                qmp.run(&QmpCommand::Cont, timeouts.command)
                    .await
                    .map_err(qmp_step("cont"))?;
                for e in endpoints {
                    confirm_console(e, timeouts.console).await?;
                }
            }
            LaunchMode::Incoming { uri, postcopy, nbd } => {
                if *postcopy {
                    let caps = QmpCommand::MigrateSetCapabilities {
                        capabilities: vec![(MigrationCapability::PostcopyRam, true)],
                    };
                    qmp.run(&caps, timeouts.command)
                        .await
                        .map_err(qmp_step("migrate-set-capabilities"))?;
                }
                let incoming = QmpCommand::MigrateIncoming { uri: uri.clone() };
                qmp.run(&incoming, timeouts.command)
                    .await
                    .map_err(qmp_step("migrate-incoming"))?;
                if let Some(nbd) = nbd {
                    let start = QmpCommand::NbdServerStart {
                        host: nbd.host.clone(),
                        port: nbd.port,
                    };
                    qmp.run(&start, timeouts.command)
                        .await
                        .map_err(qmp_step("nbd-server-start"))?;
                    for (node, name) in &nbd.exports {
                        let export = QmpCommand::NbdExport {
                            id: crate::storage_copy::export_id(name),
                            node: node.clone(),
                            name: name.clone(),
                        };
                        qmp.run(&export, timeouts.command)
                            .await
                            .map_err(qmp_step("block-export-add"))?;
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Err(e);
    }
    Ok(Launched {
        pid,
        qmp,
        events,
        child,
    })
}

async fn connect_while_alive(
    child: &mut tokio::process::Child,
    paths: &VmPaths,
    timeouts: StartTimeouts,
    events: mpsc::UnboundedSender<QmpEvent>,
) -> Result<QmpClient, LaunchError> {
    let deadline = Instant::now() + timeouts.qmp;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(LaunchError::Exited {
                status: status.to_string(),
                log_tail: log_tail(&paths.log(), 20),
            });
        }
        if paths.qmp_socket().exists() {
            match QmpClient::connect(&paths.qmp_socket(), timeouts.command, events.clone()).await {
                Ok(q) => return Ok(q),
                Err(e) if Instant::now() >= deadline => {
                    return Err(LaunchError::Qmp {
                        step: "QMP connect",
                        source: e,
                        log_tail: log_tail(&paths.log(), 20),
                    })
                }
                Err(_) => {}
            }
        } else if Instant::now() >= deadline {
            return Err(LaunchError::Qmp {
                step: "QMP connect",
                source: QmpError::Timeout("waiting for the QMP socket".into()),
                log_tail: log_tail(&paths.log(), 20),
            });
        }
        // QEMU creates the socket 30–50 ms after exec; a short poll costs a
        // stat() and keeps the start from waiting up to a whole interval longer.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Confirms a console accepts connections; for VNC, reads the RFB banner.
pub async fn confirm_console(e: &ConsoleEndpoint, timeout: Duration) -> Result<(), LaunchError> {
    let fail = |reason: String| LaunchError::Console {
        uri: e.uri(),
        reason,
    };
    let banner = async {
        match &e.target {
            ConsoleTarget::None => Ok(None),
            ConsoleTarget::Tcp { address, port } => {
                let s = tokio::net::TcpStream::connect((*address, *port))
                    .await
                    .map_err(|x| x.to_string())?;
                read_banner(s, &e.protocol).await
            }
            ConsoleTarget::Unix { path } => {
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|x| x.to_string())?;
                read_banner(s, &e.protocol).await
            }
        }
    };
    match tokio::time::timeout(timeout, banner).await {
        Err(_) => Err(fail(format!("no answer within {timeout:?}"))),
        Ok(Err(reason)) => Err(fail(reason)),
        Ok(Ok(Some(b))) if !b.starts_with(b"RFB ") => Err(fail(format!(
            "not an RFB banner: {:?}",
            String::from_utf8_lossy(&b)
        ))),
        Ok(Ok(_)) => Ok(()),
    }
}

/// A VNC server speaks first (its RFB banner); other protocols wait for the client.
async fn read_banner(
    mut stream: impl tokio::io::AsyncRead + Unpin,
    protocol: &str,
) -> Result<Option<[u8; 12]>, String> {
    if protocol != "vnc" {
        return Ok(None);
    }
    let mut b = [0u8; 12];
    stream.read_exact(&mut b).await.map_err(|x| x.to_string())?;
    Ok(Some(b))
}

/// Whether this process may use KVM: `/dev/kvm` opens read-write, as QEMU needs it.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The last `n` lines of a log file, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut buf = String::new();
    let _ = f.read_to_string(&mut buf);
    let lines: Vec<&str> = buf.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether `pid` is a live QEMU started for the VM with `uuid`.
pub fn process_matches(pid: i32, uuid: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    // A zombie has an empty command line: it is gone as far as the guest goes.
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == b"-uuid" && w[1] == uuid.as_bytes())
}

/// Sends `signal` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: i32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
}

/// Seconds since the epoch for libvirt's `passwdValidTo` (`YYYY-MM-DDTHH:MM:SS`, UTC).
pub fn parse_valid_to(s: &str) -> Option<i64> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next().flatten().unwrap_or(0));
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_to_is_seconds_since_epoch() {
        assert_eq!(parse_valid_to("1970-01-01T00:00:00"), Some(0));
        assert_eq!(parse_valid_to("2010-04-09T15:51:00"), Some(1_270_828_260));
        assert_eq!(parse_valid_to("2024-02-29T12:00:00"), Some(1_709_208_000));
        assert_eq!(parse_valid_to("2010-13-09T15:51:00"), None);
        assert_eq!(parse_valid_to("yesterday"), None);
    }
}
