//! A cgroup of its own for each VM's QEMU, as libvirt gives each guest one.
//!
//! The VM cgroups sit under the agent's own (cgroup v2): with systemd that
//! is the agent's service, whose subtree `Delegate=yes` hands to the agent.
//! QEMU is moved there once its monitor answers, before the guest runs
//! (its own start-up stays counted where the agent is), and the cgroup is
//! removed once QEMU has exited.
//! Its path is kept beside the VM's record (`cgroup`), so an agent
//! restarted in between still removes it.

use std::path::{Path, PathBuf};

/// Where this process's VM cgroups go, if the host has cgroup v2 here:
/// the unified hierarchy (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
/// a hybrid host) at this process's own cgroup.
pub fn parent_here() -> Option<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let mount = [
        Path::new("/sys/fs/cgroup"),
        Path::new("/sys/fs/cgroup/unified"),
    ]
    .into_iter()
    .find(|m| m.join("cgroup.procs").exists() && m.join("cgroup.subtree_control").exists())?;
    let dir = mount.join(path.trim_start_matches('/'));
    dir.is_dir().then_some(dir)
}

/// The VM's cgroup under `parent`, named by host and UUID: a migration's
/// two QEMUs are never in one cgroup, even where hosts share a machine.
pub fn of_vm(parent: &Path, host: &str, uuid: &str) -> PathBuf {
    parent.join(format!("flotilla-{host}-{uuid}"))
}

/// The file beside the VM's record that names its cgroup.
pub fn record_file(vm_dir: &Path) -> PathBuf {
    vm_dir.join("cgroup")
}

/// Creates the VM's cgroup `dir`, notes it in `vm_dir`, and moves `pid`
/// (all its threads) into it.
pub fn place(dir: &Path, vm_dir: &Path, pid: i32) -> Result<PathBuf, String> {
    let dir = dir.to_path_buf();
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create cgroup {}: {e}", dir.display())),
    }
    std::fs::write(record_file(vm_dir), dir.display().to_string())
        .map_err(|e| format!("cannot note the cgroup in {}: {e}", vm_dir.display()))?;
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
        .map_err(|e| format!("cannot move QEMU into cgroup {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Removes the cgroup noted in `vm_dir` once QEMU has left it: its exit
/// may be seen (its monitor closing) before its parent has reaped it, and
/// until then the cgroup is busy. Waits at most `limit` for that.
pub async fn remove_recorded(vm_dir: &Path, limit: std::time::Duration) {
    let file = record_file(vm_dir);
    if let Ok(dir) = std::fs::read_to_string(&file) {
        let dir = PathBuf::from(dir.trim());
        // Only ever one of ours.
        if dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("flotilla-"))
        {
            let deadline = tokio::time::Instant::now() + limit;
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(nix::libc::EBUSY)
                            && tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                    Err(e) => {
                        tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove VM cgroup");
                        break;
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_file(file);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_cgroup_is_named_by_host_and_uuid_under_the_parent() {
        assert_eq!(
            of_vm(
                Path::new("/sys/fs/cgroup/system.slice/flotilla-agent.service"),
                "host-a",
                "u-1"
            ),
            PathBuf::from("/sys/fs/cgroup/system.slice/flotilla-agent.service/flotilla-host-a-u-1")
        );
    }

    #[tokio::test]
    async fn a_process_is_placed_and_its_cgroup_removed_after_it_exits() {
        let Some(parent) = parent_here() else {
            return;
        };
        let dir = tempfile::tempdir().expect("dir");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let uuid = format!("test-{}", std::process::id());
        let placed = place(
            &of_vm(&parent, "test", &uuid),
            dir.path(),
            child.id() as i32,
        )
        .expect("placed");
        let procs = std::fs::read_to_string(placed.join("cgroup.procs")).expect("procs");
        assert_eq!(procs.trim(), child.id().to_string());
        // Killed but not yet reaped: the removal waits for the reaping.
        let _ = child.kill();
        let reaper = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let _ = child.wait();
        });
        remove_recorded(dir.path(), std::time::Duration::from_secs(5)).await;
        reaper.join().expect("reaper");
        assert!(!placed.exists());
        assert!(!record_file(dir.path()).exists());
    }
}
