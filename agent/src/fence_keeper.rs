//! The fence keeper: a small process apart from the agent that kills the
//! host's HA guests once the host's lease has lapsed, so they die on time
//! even when the agent is hung (SIGSTOP, a deadlock) or dead.
//!
//! The agent writes `STATE/lease.json` ([`LeaseFile`]) at every renewal
//! and whenever an HA guest starts: the deadline on `CLOCK_MONOTONIC` (one
//! clock for every process on the host, network namespaces included) and
//! each HA guest's pid and UUID. The keeper reads it every
//! [`KEEPER_POLL`]; past the deadline it sends SIGKILL to each guest whose
//! command line still carries its UUID (a pid can be reused) and waits until
//! the process is gone, logging each kill to `STATE/fence.log`.
//!
//! One keeper per state directory: it holds an exclusive `flock` on
//! `STATE/fence-keeper.lock`, which is also how the agent tells that one
//! runs ([`keeper_running`]) and reports a working fence. The agent starts
//! it when none runs ([`spawn_if_missing`]), in a process group of its own,
//! so killing the agent leaves it running. On a real host the kernel watchdog
//! is the stronger fence (it resets the machine); in a network namespace it
//! would reset the whole machine, which is why the keeper exists.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::host_core::HaGuest;

/// How often the keeper reads the lease: HA guests die at most this long
/// after the deadline (plus the kill itself).
pub const KEEPER_POLL: Duration = Duration::from_millis(100);

/// What the agent tells the keeper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseFile {
    /// The lease's expiry on `CLOCK_MONOTONIC`, in nanoseconds.
    pub deadline_mono_ns: u64,
    /// The HA guests to kill once it has passed.
    pub guests: Vec<HaGuest>,
}

/// The lease file of a state directory.
pub fn lease_path(state_dir: &Path) -> PathBuf {
    state_dir.join("lease.json")
}

fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("fence-keeper.lock")
}

/// The running keeper's pid, for whoever removes the host.
pub fn pid_path(state_dir: &Path) -> PathBuf {
    state_dir.join("fence-keeper.pid")
}

/// `CLOCK_MONOTONIC` now, in nanoseconds (what `Instant` reads on Linux).
pub fn mono_now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| (t.tv_sec() as u64) * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// `until` on `CLOCK_MONOTONIC`.
pub fn mono_ns(until: Instant) -> u64 {
    let now = Instant::now();
    let now_ns = mono_now_ns();
    match until.checked_duration_since(now) {
        Some(ahead) => now_ns.saturating_add(ahead.as_nanos() as u64),
        None => now_ns.saturating_sub(now.duration_since(until).as_nanos() as u64),
    }
}

/// Writes the lease file atomically (temp file, then rename).
pub fn write_lease(state_dir: &Path, until: Instant, guests: Vec<HaGuest>) -> std::io::Result<()> {
    let file = LeaseFile {
        deadline_mono_ns: mono_ns(until),
        guests,
    };
    let path = lease_path(state_dir);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(&file).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)
}

/// The guests to kill now: every guest of a lapsed lease.
pub fn due(lease: &LeaseFile, now_ns: u64) -> &[HaGuest] {
    if now_ns >= lease.deadline_mono_ns {
        &lease.guests
    } else {
        &[]
    }
}

/// Every live QEMU of this state directory whose command line carries
/// `uuid`: how a guest whose launch the agent never saw finish is found.
fn pids_with_uuid(state_dir: &Path, uuid: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            is_guest(
                state_dir,
                &HaGuest {
                    name: String::new(),
                    uuid: uuid.to_string(),
                    pid: *pid,
                },
            )
        })
        .collect()
}

/// Whether `pid` is still `guest`'s QEMU, started from this state
/// directory (not exited, not reaped and reused, not another agent's copy
/// of the same VM where hosts share a kernel, as namespace hosts do): its
/// command line names the guest's UUID and a file under `state_dir`.
fn is_guest(state_dir: &Path, guest: &HaGuest) -> bool {
    if guest.pid <= 0 || guest.uuid.is_empty() {
        return false;
    }
    let dir = PathBuf::from(format!("/proc/{}", guest.pid));
    let zombie = std::fs::read_to_string(dir.join("stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true);
    if zombie {
        return false;
    }
    let ours = state_dir.as_os_str().as_encoded_bytes();
    std::fs::read(dir.join("cmdline"))
        .map(|c| {
            let mut args = c.split(|b| *b == 0);
            args.clone().any(|arg| arg == guest.uuid.as_bytes())
                && args.any(|arg| arg.windows(ours.len()).any(|w| w == ours))
        })
        .unwrap_or(false)
}

/// Whether a keeper holds this state directory's lock.
pub fn keeper_running(state_dir: &Path) -> bool {
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path(state_dir))
    else {
        return false;
    };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        // We got it, so nobody holds it; dropping releases it.
        Ok(_) => false,
        Err((_, errno)) => errno == nix::errno::Errno::EWOULDBLOCK,
    }
}

/// Starts a keeper for `state_dir` (this executable's `fence-keeper`
/// verb) unless one runs; it lives on when the agent dies.
pub fn spawn_if_missing(state_dir: &Path) -> std::io::Result<()> {
    if keeper_running(state_dir) {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_dir.join("fence-keeper.log"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--state-dir")
        .arg(state_dir)
        .arg("fence-keeper")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // A process group of its own: a signal to the agent's group (a
    // terminal's Ctrl-C) does not reach it.
    use std::os::unix::process::CommandExt as _;
    cmd.process_group(0);
    let child = cmd.spawn()?;
    tracing::info!(pid = child.id(), dir = %state_dir.display(), "fence keeper started");
    Ok(())
}

/// Why the keeper cannot run.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// Another keeper holds the lock.
    #[error("another fence keeper already watches {0}")]
    AlreadyRunning(String),
    /// The lock file cannot be opened.
    #[error("{path}: {source}")]
    Lock {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn log_line(state_dir: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_dir.join("fence.log"))
    {
        let _ = writeln!(f, "{line}");
    }
}

/// The keeper's loop; returns only when it cannot hold the lock.
pub fn run(state_dir: &Path) -> Result<(), KeeperError> {
    let path = lock_path(state_dir);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| KeeperError::Lock {
            path: path.display().to_string(),
            source,
        })?;
    let _lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| KeeperError::AlreadyRunning(state_dir.display().to_string()))?;
    let _ = std::fs::write(pid_path(state_dir), std::process::id().to_string());
    tracing::info!(dir = %state_dir.display(), "fence keeper watching the lease");
    loop {
        // The host's state is gone (the agent was uninstalled): nothing
        // left to guard.
        if !state_dir.is_dir() {
            tracing::info!(dir = %state_dir.display(), "state directory removed; fence keeper exits");
            return Ok(());
        }
        if let Some(lease) = std::fs::read(lease_path(state_dir))
            .ok()
            .and_then(|b| serde_json::from_slice::<LeaseFile>(&b).ok())
        {
            for guest in due(&lease, mono_now_ns()) {
                // By its recorded pid, and by UUID for one whose launch the
                // agent did not see finish (or whose pid it never learned).
                let mut pids = pids_with_uuid(state_dir, &guest.uuid);
                if is_guest(state_dir, guest) && !pids.contains(&guest.pid) {
                    pids.push(guest.pid);
                }
                for pid in pids {
                    let found = HaGuest {
                        pid,
                        ..guest.clone()
                    };
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    // Confirmed dead (exited or a zombie) before it is logged.
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while is_guest(state_dir, &found) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    let line = format!(
                        "lease expired: killed HA guest {} (pid {pid}, uuid {}){}",
                        guest.name,
                        guest.uuid,
                        if is_guest(state_dir, &found) {
                            " BUT IT STILL RUNS"
                        } else {
                            ""
                        }
                    );
                    tracing::warn!("{line}");
                    log_line(state_dir, &line);
                }
            }
        }
        std::thread::sleep(KEEPER_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guests_are_due_only_past_the_deadline() {
        let g = HaGuest {
            name: "web".into(),
            uuid: "u".into(),
            pid: 1,
        };
        let lease = LeaseFile {
            deadline_mono_ns: 1_000,
            guests: vec![g.clone()],
        };
        assert!(due(&lease, 999).is_empty());
        assert_eq!(due(&lease, 1_000), std::slice::from_ref(&g));
        assert_eq!(due(&lease, 5_000), &[g]);
    }

    #[test]
    fn instants_map_onto_the_monotonic_clock() {
        let now = mono_now_ns();
        let ahead = mono_ns(Instant::now() + Duration::from_secs(8));
        let d = ahead - now;
        assert!((7_900_000_000..8_100_000_000).contains(&d), "{d}");
        let behind = mono_ns(Instant::now() - Duration::from_secs(1));
        assert!(behind < now, "{behind} {now}");
    }

    #[test]
    fn a_second_keeper_is_refused_and_the_lock_tells_one_runs() {
        let dir = tempfile::tempdir().expect("tmp");
        assert!(!keeper_running(dir.path()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(lock_path(dir.path()))
            .expect("open");
        let held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .expect("lock");
        assert!(keeper_running(dir.path()));
        assert!(matches!(
            run(dir.path()),
            Err(KeeperError::AlreadyRunning(_))
        ));
        drop(held);
        assert!(!keeper_running(dir.path()));
    }

    #[test]
    fn a_pid_is_the_guest_only_with_its_uuid_on_the_command_line() {
        let me = HaGuest {
            name: "x".into(),
            uuid: "no-such-uuid-on-this-command-line".into(),
            pid: std::process::id() as i32,
        };
        let dir = Path::new("/nonexistent-state");
        assert!(!is_guest(dir, &me));
        let gone = HaGuest {
            pid: i32::MAX,
            ..me
        };
        assert!(!is_guest(dir, &gone));
        // A process naming both the UUID and the directory is the guest;
        // naming only the UUID (another host's copy) it is not.
        // `sh -c 'read x' my-uuid …`: the shell keeps these arguments, and
        // waits in a builtin (a forked `sleep` would briefly carry them too).
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read x", "my-uuid", "/srv/state-a/vms/x/qemu.pid"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let g = HaGuest {
            name: "x".into(),
            uuid: "my-uuid".into(),
            pid: child.id() as i32,
        };
        // Until the exec is done the command line is still ours.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_guest(Path::new("/srv/state-a"), &g) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(is_guest(Path::new("/srv/state-a"), &g));
        assert!(!is_guest(Path::new("/srv/state-b"), &g));
        assert_eq!(
            pids_with_uuid(Path::new("/srv/state-a"), "my-uuid"),
            vec![g.pid]
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}
