//! The kernel watchdog as a fence, as Proxmox uses it: the agent pets
//! `/dev/watchdog` (softdog, or a hardware one) once a second only while
//! its fence holds, that is while the lease is valid or every HA guest is
//! confirmed dead ([`crate::host_core::HostCore::fence_holds`]). A hung or
//! dead agent stops petting, and the machine resets within the timeout,
//! taking its guests with it; the coordinator adds that timeout (W) to its
//! fencing deadline. A deliberate stop writes the magic `V` so that the
//! device disarms instead of resetting the host.
//!
//! The timeout cannot be read without an ioctl (and this codebase has no
//! `unsafe`), so the operator states it: `--watchdog-timeout-secs` must be
//! at least the device's (softdog: `modprobe softdog soft_margin=10`).
//! Never point it at a real device inside a network namespace test: the
//! whole machine would reset.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// An open watchdog device.
pub struct Watchdog {
    path: PathBuf,
    file: std::fs::File,
    timeout_secs: u32,
}

impl Watchdog {
    /// Opens (and so arms) the device.
    pub fn open(path: &Path, timeout_secs: u32) -> std::io::Result<Watchdog> {
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        Ok(Watchdog {
            path: path.to_path_buf(),
            file,
            timeout_secs,
        })
    }

    /// The timeout the coordinator adds to its fencing deadline.
    pub fn timeout_secs(&self) -> u32 {
        self.timeout_secs
    }

    /// Restarts the countdown.
    pub fn pet(&mut self) {
        if let Err(e) = self.file.write_all(b"1").and_then(|()| self.file.flush()) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot pet the watchdog");
        }
    }

    /// Disarms it on a deliberate stop (the magic close).
    pub fn disarm(mut self) {
        let _ = self.file.write_all(b"V");
        let _ = self.file.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn petting_writes_and_disarming_writes_the_magic_close() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("watchdog");
        std::fs::write(&path, b"").expect("create");
        let mut w = Watchdog::open(&path, 10).expect("open");
        assert_eq!(w.timeout_secs(), 10);
        w.pet();
        w.pet();
        w.disarm();
        assert_eq!(std::fs::read(&path).expect("read"), b"11V");
        assert!(Watchdog::open(&dir.path().join("missing"), 10).is_err());
    }
}
