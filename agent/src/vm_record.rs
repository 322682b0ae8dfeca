//! What the agent remembers about a running VM, on disk, so a restarted agent
//! can find its QEMU processes again.
//!
//! Layout of a VM's state directory (`STATE/vms/NAME/`): `record.json` (this
//! record), `live.xml`, `qemu.log`, and `run/` (QEMU's own: `qmp.sock`,
//! `qemu.pid`, other sockets). The record is
//! written atomically (temp file + rename) after QEMU has started and before
//! the start is reported, so a crash never leaves a VM the agent cannot find.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::console::ConsoleEndpoint;
use crate::nic_plan::NicPlan;

/// A running VM as the agent recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Domain name.
    pub name: String,
    /// Domain UUID, also on QEMU's command line (used to recognise the process).
    pub uuid: String,
    /// QEMU's pid.
    pub pid: i32,
    /// Console ports reserved for it.
    pub ports: Vec<u16>,
    /// Its consoles.
    pub endpoints: Vec<ConsoleEndpoint>,
    /// Its NICs and their host devices (absent in records from before NICs).
    #[serde(default)]
    pub nics: Vec<NicPlan>,
    /// Images this host created to receive a storage copy, until the guest
    /// runs on them: removed with the record if it never does.
    #[serde(default)]
    pub created_images: Vec<PathBuf>,
    /// The incarnation the coordinator started (or moved) it with.
    #[serde(default)]
    pub incarnation: u64,
    /// Its definition asks for high availability: killed when the lease
    /// lapses.
    #[serde(default)]
    pub ha: bool,
    /// The operator suspended it (`flotilla suspend`): it stays paused
    /// until resumed, and is no half of a migration to finish.
    #[serde(default)]
    pub suspended: bool,
}

impl VmRecord {
    /// The host devices its NICs hold.
    pub fn nic_devices(&self) -> impl Iterator<Item = &str> {
        self.nics.iter().filter_map(|n| n.dev.as_deref())
    }

    /// Its macvtap devices, which outlive QEMU and must be deleted.
    pub fn macvtaps(&self) -> Vec<String> {
        self.nics
            .iter()
            .filter(|n| n.is_macvtap())
            .filter_map(|n| n.dev.clone())
            .collect()
    }
}

/// Reading or writing a record failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// File I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a record.
    #[error("{path}: not a VM record: {source}")]
    Format {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// The directory that holds all VM state directories.
pub fn vms_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("vms")
}

/// One VM's state directory.
pub fn vm_dir(state_dir: &Path, name: &str) -> PathBuf {
    vms_dir(state_dir).join(name)
}

/// Writes `contents` to `path` atomically.
///
/// The file is mode 0600 (the live XML holds console passwords), and both it
/// and its directory are synced, so a crash leaves the old or the new
/// contents, never an empty file.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), RecordError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| RecordError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    // A leftover from a crash may carry wider permissions; start afresh.
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

impl VmRecord {
    /// The record file in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("record.json")
    }

    /// Saves the record into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), RecordError> {
        let path = Self::path(dir);
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| RecordError::Format {
            path: path.display().to_string(),
            source,
        })?;
        write_atomic(&path, &bytes)
    }

    /// Loads the record from `dir`.
    pub fn load(dir: &Path) -> Result<VmRecord, RecordError> {
        let path = Self::path(dir);
        let bytes = std::fs::read(&path).map_err(|source| RecordError::Io {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| RecordError::Format {
            path: path.display().to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn records_and_live_xml_are_private_and_replaced_whole() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("live.xml");
        std::fs::write(path.with_extension("tmp"), "stale").expect("leftover");
        std::fs::set_permissions(
            path.with_extension("tmp"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        write_atomic(&path, b"<domain passwd='x'/>").expect("first");
        write_atomic(&path, b"<domain/>").expect("second");
        assert_eq!(std::fs::read(&path).expect("read"), b"<domain/>");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!path.with_extension("tmp").exists());
    }
}
