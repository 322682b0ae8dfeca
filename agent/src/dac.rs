//! Discretionary access control for QEMU, as libvirt's DAC driver does it:
//! QEMU runs as an unprivileged user, the files it must open are handed to
//! that user when it starts, and given back to their owners when it stops.
//!
//! The original owners are kept beside the VM's record (`dac.json`), so an
//! agent restarted in between still gives them back. A VM that migrated
//! away keeps its (shared) disks labelled: its guest runs on them elsewhere.

use std::path::{Path, PathBuf};

use nix::unistd::{chown, Gid, Uid};
use serde::{Deserialize, Serialize};

/// The user QEMU runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuUser {
    /// Its name (`flotilla-qemu`).
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary group, which gives it `/dev/kvm` (Debian's `kvm`).
    pub gid: u32,
}

impl QemuUser {
    /// Looks `name` up; `root` means QEMU is not confined (`Ok(None)`).
    pub fn resolve(name: &str) -> Result<Option<QemuUser>, String> {
        if name == "root" {
            return Ok(None);
        }
        match nix::unistd::User::from_name(name) {
            Ok(Some(u)) => Ok(Some(QemuUser {
                name: name.to_string(),
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
            })),
            Ok(None) => Err(format!(
                "QEMU's user '{name}' does not exist: create it \
                 (useradd --system --gid kvm --no-create-home --shell /usr/sbin/nologin {name}), \
                 or run QEMU as root with --qemu-user root"
            )),
            Err(e) => Err(format!("cannot look up QEMU's user '{name}': {e}")),
        }
    }
}

/// A file's owner before QEMU's user was given it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The file.
    pub path: PathBuf,
    /// Its uid then.
    pub uid: u32,
    /// Its gid then.
    pub gid: u32,
    /// A directory made for QEMU (its huge-page files): removed afterwards.
    #[serde(default)]
    pub made: bool,
}

/// Where the original owners are kept, beside the VM's record (in the
/// VM's directory, which QEMU's user cannot write).
pub fn owners_file(vm_dir: &Path) -> PathBuf {
    vm_dir.join("dac.json")
}

/// Prepares what QEMU opens itself, before it starts: `run_dir` (where it
/// makes its sockets and pidfile) and `dirs` (made for it) are created,
/// and with a `user`, given to that user along with each of `files` (which
/// must exist) and `logs` (created empty when missing). The owners it
/// replaced, and the directories it made, are written to [`owners_file`]
/// in the root-owned `vm_dir`; on any failure everything is given back.
pub fn label(
    vm_dir: &Path,
    run_dir: &Path,
    dirs: &[PathBuf],
    files: &[PathBuf],
    logs: &[PathBuf],
    user: Option<&QemuUser>,
) -> Result<Vec<Owner>, String> {
    let mut owners = Vec::new();
    let result = label_into(&mut owners, run_dir, dirs, files, logs, user).and_then(|()| {
        let json = serde_json::to_vec(&owners).map_err(|e| e.to_string())?;
        crate::vm_record::write_atomic(&owners_file(vm_dir), &json)
            .map_err(|e| format!("cannot record the owners of QEMU's files: {e}"))
    });
    match result {
        Ok(()) => Ok(owners),
        Err(e) => {
            restore(&owners);
            Err(e)
        }
    }
}

fn label_into(
    owners: &mut Vec<Owner>,
    run_dir: &Path,
    dirs: &[PathBuf],
    files: &[PathBuf],
    logs: &[PathBuf],
    user: Option<&QemuUser>,
) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let give = |p: &Path| match user {
        Some(u) => chown(p, Some(Uid::from_raw(u.uid)), Some(Gid::from_raw(u.gid)))
            .map_err(|e| format!("cannot give {} to {}: {e}", p.display(), u.name)),
        None => Ok(()),
    };
    std::fs::create_dir_all(run_dir)
        .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
    give(run_dir)?;
    for d in dirs {
        let made = !d.exists();
        std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        owners.push(Owner {
            path: d.clone(),
            uid: 0,
            gid: 0,
            made,
        });
        give(d)?;
    }
    let Some(user) = user else {
        return Ok(());
    };
    for log in logs {
        if !log.exists() {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        }
    }
    for f in files.iter().chain(logs) {
        // A file that is not there is QEMU's to report, naming it.
        let Ok(meta) = std::fs::metadata(f) else {
            continue;
        };
        if (meta.uid(), meta.gid()) == (user.uid, user.gid) {
            continue;
        }
        give(f)?;
        owners.push(Owner {
            path: f.clone(),
            uid: meta.uid(),
            gid: meta.gid(),
            made: false,
        });
    }
    Ok(())
}

/// Gives each file back to its owner; a file gone is not an error.
pub fn restore(owners: &[Owner]) {
    for o in owners {
        if o.made {
            let _ = std::fs::remove_dir_all(&o.path);
            continue;
        }
        match chown(
            &o.path,
            Some(Uid::from_raw(o.uid)),
            Some(Gid::from_raw(o.gid)),
        ) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => tracing::warn!(path = %o.path.display(), error = %e, "cannot restore owner"),
        }
    }
}

/// Restores what [`label`] recorded for the VM in `vm_dir`, then forgets it.
pub fn restore_recorded(vm_dir: &Path) {
    let file = owners_file(vm_dir);
    if let Ok(bytes) = std::fs::read(&file) {
        if let Ok(owners) = serde_json::from_slice::<Vec<Owner>>(&bytes) {
            restore(&owners);
        }
    }
    let _ = std::fs::remove_file(file);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn root_is_no_confinement_and_an_unknown_user_says_how_to_create_it() {
        assert_eq!(QemuUser::resolve("root"), Ok(None));
        let e = QemuUser::resolve("flotilla-no-such-user").expect_err("unknown");
        assert!(e.contains("useradd --system --gid kvm"), "{e}");
    }

    /// Labels to a user that is not root (nobody) and gives files back.
    #[test]
    fn files_are_given_to_qemus_user_and_back_with_their_owners_recorded() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
            return;
        };
        let user = QemuUser {
            name: "nobody".into(),
            uid: nobody.uid.as_raw(),
            gid: nobody.gid.as_raw(),
        };
        let dir = tempfile::tempdir().expect("dir");
        let vm = dir.path().join("vm");
        std::fs::create_dir(&vm).expect("vm dir");
        let run = vm.join("run");
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, b"x").expect("disk");
        chown(&disk, Some(Uid::from_raw(0)), Some(Gid::from_raw(4))).expect("chown");
        let log = dir.path().join("serial.log");
        let huge = dir.path().join("hugepages/flotilla-vm");
        let missing = dir.path().join("no-such-disk.img");
        let owners = label(
            &vm,
            &run,
            std::slice::from_ref(&huge),
            &[disk.clone(), missing.clone()],
            std::slice::from_ref(&log),
            Some(&user),
        )
        .expect("label");
        let uid_of = |p: &Path| std::fs::metadata(p).expect("meta").uid();
        assert_eq!(uid_of(&disk), user.uid);
        assert_eq!(uid_of(&run), user.uid);
        assert_eq!(uid_of(&vm), 0, "the records' directory stays root's");
        assert!(log.exists(), "a missing log is created for QEMU");
        assert!(!missing.exists(), "a missing disk is not made up");
        assert_eq!(uid_of(&huge), user.uid);
        assert_eq!(
            owners[1],
            Owner {
                path: disk.clone(),
                uid: 0,
                gid: 4,
                made: false
            }
        );
        restore_recorded(&vm);
        assert!(!huge.exists(), "the directory made for QEMU is removed");
        let meta = std::fs::metadata(&disk).expect("meta");
        assert_eq!((meta.uid(), meta.gid()), (0, 4));
        assert!(!owners_file(&vm).exists());
    }
}
