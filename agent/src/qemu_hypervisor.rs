//! `QemuHypervisor`: the real [`Hypervisor`], carrying out the core's
//! [`HvCall`]s on this host.
//!
//! It spawns QEMU through [`crate::qemu_process::launch`], speaks QMP through
//! [`crate::qmp::QmpClient`] (one per VM, kept here by name), signals
//! processes, reads the interface table and the networks directory, and
//! writes or removes VM records. After a launch or a re-attach a watcher task
//! logs the VM's QMP events and, once the monitor closes, waits for the
//! process to be gone and reports a [`VmExit`] on the channel given at
//! construction; the shell feeds it to the core as
//! [`crate::host_core::HostInput::VmExited`]. Nothing here decides anything.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use crate::argv::VmPaths;
use crate::host_core::{
    FoundRecord, HostRead, HvCall, HvFuture, HvResult, Hypervisor, LaunchPlan, VmSignal,
};
use crate::host_networks::HostNetworks;
use crate::hypervisor::Stray;
use crate::interfaces::InterfaceTable;
use crate::nic_plumbing;
use crate::qemu_process::{confirm_console, launch, log_tail, process_matches, signal, LaunchMode};
use crate::qmp::{QmpClient, QmpError, QmpEvent};
use crate::storage_copy::NewImage;
use crate::vm_record::{vms_dir, write_atomic, VmRecord};

/// How long a re-attach waits for a running QEMU's monitor.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(5);

/// A VM's QEMU is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// The VM.
    pub name: String,
    /// Its pid.
    pub pid: i32,
    /// Why, as far as the agent knows.
    pub reason: String,
    /// The last lines QEMU wrote to stderr.
    pub log_tail: String,
}

/// A QEMU this hypervisor owns.
struct Owned {
    name: String,
    uuid: String,
    pid: i32,
    paths: VmPaths,
}

#[derive(Debug, Clone)]
struct Handle {
    pid: i32,
    qmp: QmpClient,
}

/// Real QEMU processes on this host. Cheap to clone; clones share the VMs.
#[derive(Debug, Clone)]
pub struct QemuHypervisor {
    vms: Arc<Mutex<HashMap<String, Handle>>>,
    exits: mpsc::UnboundedSender<VmExit>,
}

impl QemuHypervisor {
    /// A hypervisor reporting QEMU exits to `exits`.
    pub fn new(exits: mpsc::UnboundedSender<VmExit>) -> Self {
        QemuHypervisor {
            vms: Arc::new(Mutex::new(HashMap::new())),
            exits,
        }
    }

    fn handle(&self, name: &str) -> Option<Handle> {
        self.vms.lock().ok().and_then(|vms| vms.get(name).cloned())
    }

    /// Keeps `qmp` for `name` and watches the process until it is gone.
    fn adopt(
        &self,
        Owned {
            name,
            uuid,
            pid,
            paths,
        }: Owned,
        qmp: QmpClient,
        mut events: mpsc::UnboundedReceiver<QmpEvent>,
        child: Option<tokio::process::Child>,
    ) {
        if let Ok(mut vms) = self.vms.lock() {
            vms.insert(name.clone(), Handle { pid, qmp });
        }
        let vms = self.vms.clone();
        let exits = self.exits.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                tracing::info!(vm = %name, event = %event.name, data = %event.data, "QEMU event");
            }
            let reason = wait_for_exit(pid, &uuid, child).await;
            if let Ok(mut vms) = vms.lock() {
                if vms.get(&name).is_some_and(|h| h.pid == pid) {
                    vms.remove(&name);
                }
            }
            let _ = exits.send(VmExit {
                name,
                pid,
                reason,
                log_tail: log_tail(&paths.log(), 10),
            });
        });
    }

    async fn launch(self, plan: LaunchPlan) -> HvResult {
        let LaunchPlan {
            name,
            uuid,
            argv,
            paths,
            secrets,
            endpoints,
            mode,
            nics,
            timeouts,
            images,
        } = plan;
        for image in &images {
            if let Err(e) = create_image(image).await {
                return HvResult::Failed(e);
            }
        }
        if let Some((template, store)) = &argv.nvram_from {
            if let Err(e) = copy_nvram(template, store).await {
                return HvResult::Failed(e);
            }
        }
        let up = mode == LaunchMode::Run;
        let opened = match nic_plumbing::plumb(&name, &paths.dir, &nics, up).await {
            Ok(o) => o,
            Err(e) => return HvResult::Failed(e.to_string()),
        };
        let macvtaps = opened.macvtaps;
        let launched = launch(
            &argv, &paths, &secrets, &endpoints, mode, timeouts, opened.fds,
        )
        .await;
        if launched.is_err() {
            nic_plumbing::delete_links(&macvtaps).await;
        }
        match launched {
            Ok(l) => {
                let pid = l.pid;
                let owned = Owned {
                    name,
                    uuid,
                    pid,
                    paths,
                };
                self.adopt(owned, l.qmp, l.events, Some(l.child));
                HvResult::Launched { pid }
            }
            Err(e) => HvResult::Failed(e.to_string()),
        }
    }

    async fn attach(self, name: String, uuid: String, pid: i32, paths: VmPaths) -> HvResult {
        let (tx, rx) = mpsc::unbounded_channel();
        match QmpClient::connect(&paths.qmp_socket(), ATTACH_TIMEOUT, tx).await {
            Ok(qmp) => {
                let owned = Owned {
                    name,
                    uuid,
                    pid,
                    paths,
                };
                self.adopt(owned, qmp, rx, None);
                HvResult::Done
            }
            // Died between the scan and now: its record and devices go.
            Err(_) if !process_matches(pid, &uuid) => HvResult::Exited,
            Err(e) => HvResult::Failed(e.to_string()),
        }
    }
}

impl Hypervisor for QemuHypervisor {
    fn call(&self, call: HvCall) -> HvFuture {
        match call {
            HvCall::ScanRecords { state_dir } => {
                Box::pin(std::future::ready(HvResult::Records(scan(&state_dir))))
            }
            HvCall::FindStrays { state_dir, known } => Box::pin(std::future::ready(
                HvResult::Strays(strays(&state_dir, &known)),
            )),
            HvCall::Attach {
                name,
                uuid,
                pid,
                paths,
            } => Box::pin(self.clone().attach(name, uuid, pid, paths)),
            HvCall::ReadHost { paths, markers } => {
                let read = HostRead {
                    markers: markers
                        .into_iter()
                        .map(|m| {
                            let text = std::fs::read_to_string(&m).ok();
                            (m, text)
                        })
                        .collect(),
                    interfaces: InterfaceTable::read_host().map_err(|e| e.to_string()),
                    missing: paths
                        .into_iter()
                        .filter(|p| !Path::new(p).exists())
                        .collect(),
                    vhost_net: Path::new("/dev/vhost-net").exists(),
                };
                Box::pin(std::future::ready(HvResult::Host(read)))
            }
            HvCall::LoadNetworks { dir } => {
                Box::pin(std::future::ready(match HostNetworks::load(&dir) {
                    Ok(n) => HvResult::Networks(n),
                    Err(e) => HvResult::Failed(e.to_string()),
                }))
            }
            HvCall::Launch(plan) => Box::pin(self.clone().launch(*plan)),
            HvCall::Qmp { vm, cmd, timeout } => {
                let handle = self.handle(&vm);
                Box::pin(async move {
                    let Some(h) = handle else {
                        return HvResult::Failed(QmpError::Closed.to_string());
                    };
                    match h.qmp.run(&cmd, timeout).await {
                        Ok(v) => HvResult::Qmp(v),
                        Err(e) => HvResult::Failed(e.to_string()),
                    }
                })
            }
            HvCall::GuestAgent {
                socket,
                command,
                timeout,
                ..
            } => Box::pin(async move {
                let sync_id = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_micros() as u64);
                match crate::guest_agent::run(&socket, command, timeout, sync_id).await {
                    Ok(v) => HvResult::Qmp(v),
                    Err(e) => HvResult::Failed(e),
                }
            }),
            HvCall::ConfirmConsoles {
                endpoints, timeout, ..
            } => Box::pin(async move {
                for e in &endpoints {
                    if let Err(e) = confirm_console(e, timeout).await {
                        return HvResult::Failed(e.to_string());
                    }
                }
                HvResult::Done
            }),
            HvCall::Signal { pid, signal: s, .. } => {
                signal(
                    pid,
                    match s {
                        VmSignal::Term => Signal::SIGTERM,
                        VmSignal::Kill => Signal::SIGKILL,
                    },
                );
                Box::pin(std::future::ready(HvResult::Done))
            }
            HvCall::WriteRecord {
                paths,
                record,
                live_xml,
            } => {
                let written = match &live_xml {
                    Some(xml) => write_atomic(&paths.live_xml(), xml.as_bytes()),
                    None => Ok(()),
                }
                .and_then(|()| record.save(&paths.dir));
                Box::pin(std::future::ready(match written {
                    Ok(()) => HvResult::Done,
                    Err(e) => HvResult::Failed(e.to_string()),
                }))
            }
            HvCall::RemoveRecord {
                paths,
                macvtaps,
                images,
                restore_owners,
                ..
            } => {
                if restore_owners {
                    crate::dac::restore_recorded(&paths.dir);
                }
                for f in ["record.json", "live.xml", "dac.json"] {
                    let _ = std::fs::remove_file(paths.dir.join(f));
                }
                let _ = std::fs::remove_file(paths.qmp_socket());
                let _ = std::fs::remove_file(paths.pidfile());
                for image in images {
                    let _ = std::fs::remove_file(image);
                }
                Box::pin(async move {
                    nic_plumbing::delete_links(&macvtaps).await;
                    crate::cgroup::remove_recorded(&paths.dir, Duration::from_secs(5)).await;
                    HvResult::Done
                })
            }
            HvCall::WriteMarkers { markers } => {
                let written = markers
                    .iter()
                    .try_for_each(|(path, token)| write_atomic(path, token.as_bytes()));
                Box::pin(std::future::ready(match written {
                    Ok(()) => HvResult::Done,
                    Err(e) => HvResult::Failed(e.to_string()),
                }))
            }
            HvCall::RemoveImages { paths } => {
                for p in paths {
                    let _ = std::fs::remove_file(p);
                }
                Box::pin(std::future::ready(HvResult::Done))
            }
            HvCall::RemoveMarkers { paths } => {
                for p in paths {
                    let _ = std::fs::remove_file(p);
                }
                Box::pin(std::future::ready(HvResult::Done))
            }
            HvCall::SetLinks { devs, up } => Box::pin(async move {
                match nic_plumbing::set_links(&devs, up).await {
                    Ok(()) => HvResult::Done,
                    Err(e) => HvResult::Failed(e.to_string()),
                }
            }),
            HvCall::RemoveStrayNics { keep } => Box::pin(async move {
                match nic_plumbing::remove_strays(&keep).await {
                    Ok(_) => HvResult::Done,
                    Err(e) => HvResult::Failed(e.to_string()),
                }
            }),
        }
    }
}

/// Every readable record under `state_dir`, and whether its QEMU still runs.
/// Processes whose command line names a file under this agent's VM
/// directories (QEMU's monitor socket and pidfile are there) and whose VM is
/// not among `known`.
fn strays(state_dir: &Path, known: &[String]) -> Vec<Stray> {
    let prefix = format!("{}/", vms_dir(state_dir).display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline);
        let Some(at) = text.find(&prefix) else {
            continue;
        };
        let rest = &text[at + prefix.len()..];
        let name: String = rest.chars().take_while(|c| *c != '/').collect();
        if !name.is_empty() && !known.contains(&name) && text.contains("-uuid") {
            out.push(Stray { name, pid });
        }
    }
    out
}

fn scan(state_dir: &Path) -> Vec<FoundRecord> {
    let Ok(entries) = std::fs::read_dir(vms_dir(state_dir)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let dir = e.path();
        match VmRecord::load(&dir) {
            Ok(record) => {
                let alive = process_matches(record.pid, &record.uuid);
                let live_xml = if alive {
                    std::fs::read_to_string(VmPaths::new(dir.clone()).live_xml())
                        .unwrap_or_default()
                } else {
                    String::new()
                };
                out.push(FoundRecord {
                    record,
                    alive,
                    live_xml,
                });
            }
            Err(err) if VmRecord::path(&dir).exists() => {
                tracing::warn!(error = %err, "skipping unreadable VM record")
            }
            Err(_) => {}
        }
    }
    out
}

/// Waits until the process is really gone after its QMP connection closed.
async fn wait_for_exit(pid: i32, uuid: &str, child: Option<tokio::process::Child>) -> String {
    if let Some(mut child) = child {
        return match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(Ok(status)) => format!("QEMU exited ({status})"),
            Ok(Err(e)) => format!("QEMU exited (status unknown: {e})"),
            Err(_) => {
                // The monitor closed but the process lingers: it is unmanageable, end it.
                let _ = child.start_kill();
                let _ = child.wait().await;
                "QEMU closed its monitor and was killed".to_string()
            }
        };
    }
    for _ in 0..1000 {
        if !process_matches(pid, uuid) {
            return "QEMU exited".to_string();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(pid, Signal::SIGKILL);
    "QEMU closed its monitor and was killed".to_string()
}

/// `qemu-img create` for an image a storage copy lands in.
async fn create_image(image: &NewImage) -> Result<(), String> {
    let out = tokio::process::Command::new("qemu-img")
        .args(image.qemu_img_args())
        .output()
        .await
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "cannot create {} for the storage copy: {}",
        image.path.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// Gives a UEFI guest its own variable store, copied from the template the
/// first time: an existing store holds the guest's boot entries and stays.
async fn copy_nvram(template: &Path, store: &Path) -> Result<(), String> {
    if tokio::fs::try_exists(store).await.unwrap_or(false) {
        return Ok(());
    }
    if let Some(dir) = store.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let tmp = store.with_extension("fd.tmp");
    tokio::fs::copy(template, &tmp).await.map_err(|e| {
        format!(
            "cannot copy the UEFI variable template {} to {}: {e}",
            template.display(),
            store.display()
        )
    })?;
    tokio::fs::rename(&tmp, store)
        .await
        .map_err(|e| format!("cannot create {}: {e}", store.display()))
}
