//! `HostAgent`: the actor that owns this host's networks, ports and VMs.
//!
//! Requests arrive as [`Request`] (from the control socket today, from the
//! coordinator later) and are dispatched in one `match`. Decisions are made by
//! the pure modules ([`plan_consoles`], [`QemuArgv`], [`NetworkResolver`]);
//! this actor supplies their inputs (the interface table, a real bind probe)
//! and carries out the result. On start it re-attaches to every QEMU recorded
//! in the state directory that is still running, so restarting the agent
//! neither loses nor duplicates a VM and never reuses a port.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use actix::prelude::*;
use flotilla_shared::xml::{Domain, XmlFlavor};

use crate::argv::{QemuArgv, QemuHost, VmPaths};
use crate::console::{plan_consoles, ConsoleEndpoint, ConsoleSettings};
use crate::control::{AgentCall, ConsoleInfo, NetStatus, Request, Response, VmSummary};
use crate::host_networks::HostNetworks;
use crate::interfaces::InterfaceTable;
use crate::ports::{PortAllocator, MIGRATION_PORTS};
use crate::qemu_process::{
    confirm_console, launch, process_matches, ConsoleSecret, LaunchMode, StartTimeouts,
};
use crate::qmp::QmpClient;
use crate::resolver::{AddressSource, NetworkResolver};
use crate::vm_actor::{
    Destroy, MonitorCommand, QemuProcess, QmpCall, QueryStatus, Shutdown, VmActor, VmEvent, VmGone,
};
use crate::vm_record::{vm_dir, vms_dir, write_atomic, VmRecord};

/// Everything the agent is configured with.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Directory of libvirt network XML files.
    pub networks_dir: PathBuf,
    /// Directory for VM state (records, sockets, logs) and the control socket.
    pub state_dir: PathBuf,
    /// Console defaults and policy; `console.host` is this host's name.
    pub console: ConsoleSettings,
    /// QEMU binary and accelerator.
    pub qemu: QemuHost,
    /// Start step timeouts.
    pub timeouts: StartTimeouts,
    /// The network whose address receives incoming migrations; default: the
    /// first network (by name) that resolves.
    pub migration_network: Option<String>,
}

struct RunningVm {
    addr: Addr<VmActor>,
    record: VmRecord,
    live_xml: String,
    /// The port an incoming migration listens on, released when it finishes.
    migration_port: Option<u16>,
}

/// The host agent actor.
pub struct HostAgent {
    settings: AgentSettings,
    networks: HostNetworks,
    ports: PortAllocator,
    vms: BTreeMap<String, RunningVm>,
    starting: BTreeSet<String>,
    reattach: bool,
}

impl HostAgent {
    /// A host agent; with `reattach`, it takes over running VMs when started.
    ///
    /// Without it (one-shot starts) it only reserves their ports.
    pub fn new(settings: AgentSettings, networks: HostNetworks, reattach: bool) -> Self {
        HostAgent {
            settings,
            networks,
            ports: PortAllocator::new(),
            vms: BTreeMap::new(),
            starting: BTreeSet::new(),
            reattach,
        }
    }

    fn host(&self) -> &str {
        &self.settings.console.host
    }

    fn records_on_disk(&self) -> Vec<(PathBuf, VmRecord)> {
        let Ok(entries) = std::fs::read_dir(vms_dir(&self.settings.state_dir)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let dir = e.path();
            match VmRecord::load(&dir) {
                Ok(r) => out.push((dir, r)),
                Err(err) if VmRecord::path(&dir).exists() => {
                    tracing::warn!(error = %err, "skipping unreadable VM record")
                }
                Err(_) => {}
            }
        }
        out
    }

    fn migration_address(&self, table: &InterfaceTable) -> Result<std::net::IpAddr, String> {
        let resolver = NetworkResolver::new(self.host(), table);
        match &self.settings.migration_network {
            Some(n) => resolver
                .resolve_name(n, &self.networks.networks)
                .map(|r| r.address)
                .map_err(|e| format!("migration network: {e}")),
            None => self
                .networks
                .networks
                .iter()
                .find_map(|n| resolver.resolve(n).ok())
                .map(|r| r.address)
                .ok_or_else(|| {
                    format!(
                        "host {} has no network with an address to receive migrations \
                         (define one, or pass --migration-network)",
                        self.host()
                    )
                }),
        }
    }

    fn start_vm(
        &mut self,
        xml: String,
        source: String,
        incoming: Option<bool>,
    ) -> ResponseActFuture<Self, Response> {
        let domain = match Domain::parse(&source, &xml) {
            Ok(d) => d.model,
            Err(e) => return reply(Response::Error(e.to_string())),
        };
        let name = domain.name.clone();
        let host = self.host().to_string();
        if self.vms.contains_key(&name) || self.starting.contains(&name) {
            return reply(Response::Error(format!(
                "Requested operation is not valid: domain '{name}' is already running on host {host}"
            )));
        }
        let uuid = domain.uuid.hyphenated().to_string();
        if let Some(other) = self.vms.values().find(|v| v.record.uuid == uuid) {
            return reply(Response::Error(format!(
                "domain '{name}' has the UUID {uuid} of running domain '{}'",
                other.record.name
            )));
        }
        let table = match InterfaceTable::read_host() {
            Ok(t) => t,
            Err(e) => return reply(Response::Error(e.to_string())),
        };
        let paths = VmPaths::new(vm_dir(&self.settings.state_dir, &name));
        let plan = match plan_consoles(
            &domain,
            &self.networks.networks,
            &table,
            &self.settings.console,
            &paths.dir,
            &mut self.ports,
            &mut port_is_free,
        ) {
            Ok(p) => p,
            Err(e) => return reply(Response::Error(e.to_string())),
        };
        for w in &plan.warnings {
            tracing::warn!(vm = %name, host = %host, "{w}");
        }
        let argv = match QemuArgv::build(&plan.live, &self.settings.qemu, &paths) {
            Ok(a) => a,
            Err(e) => {
                plan.ports.iter().for_each(|p| self.ports.release(*p));
                return reply(Response::Error(e.to_string()));
            }
        };
        let mut ports = plan.ports.clone();
        let (argv, mode, migration_port) = if let Some(postcopy) = incoming {
            let refuse = |act: &mut Self, ports: &[u16], msg: String| {
                ports.iter().for_each(|p| act.ports.release(*p));
                reply(Response::Error(msg))
            };
            // Migration moves memory, not disks: they must already be here.
            if let Some(missing) = domain
                .disks()
                .filter_map(|d| d.source_path())
                .find(|p| !std::path::Path::new(p).exists())
            {
                return refuse(self, &ports, format!(
                    "cannot accept VM '{name}' on host {host}: disk source {missing} does not exist \
                     here (live migration needs storage both hosts see)"
                ));
            }
            let addr = match self.migration_address(&table) {
                Ok(a) => a,
                Err(e) => return refuse(self, &ports, e),
            };
            let Some(port) = self.ports.allocate(MIGRATION_PORTS, &mut port_is_free) else {
                return refuse(
                    self,
                    &ports,
                    format!("no free migration port on host {host}"),
                );
            };
            ports.push(port);
            let uri = match addr {
                std::net::IpAddr::V6(a) => format!("tcp:[{a}]:{port}"),
                std::net::IpAddr::V4(a) => format!("tcp:{a}:{port}"),
            };
            (
                argv.with_incoming_defer(),
                LaunchMode::Incoming { uri, postcopy },
                Some(port),
            )
        } else {
            (argv, LaunchMode::Run, None)
        };
        let secrets: Vec<ConsoleSecret> = plan
            .live
            .graphics()
            .filter_map(|g| {
                g.passwd.as_ref().map(|p| ConsoleSecret {
                    protocol: g.protocol.as_str(),
                    password: p.clone(),
                    valid_to: g.passwd_valid_to.clone(),
                })
            })
            .collect();
        tracing::info!(vm = %name, host = %host, argv = %argv, "starting QEMU");
        self.starting.insert(name.clone());
        let timeouts = self.settings.timeouts;
        let endpoints = plan.endpoints.clone();
        let launch_paths = paths.clone();
        let launch_mode = mode.clone();
        let launched_at = std::time::Instant::now();
        Box::pin(
            async move {
                launch(
                    &argv,
                    &launch_paths,
                    &secrets,
                    &endpoints,
                    launch_mode,
                    timeouts,
                )
                .await
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                act.starting.remove(&name);
                let launched = match result {
                    Ok(l) => l,
                    Err(e) => {
                        ports.iter().for_each(|p| act.ports.release(*p));
                        count_launch(migration_port.is_some(), "error");
                        tracing::error!(vm = %name, host = %host, error = %e, "start failed");
                        return Response::Error(format!(
                            "VM '{name}' failed to start on host {host}: {e}"
                        ));
                    }
                };
                let record = VmRecord {
                    name: name.clone(),
                    uuid,
                    pid: launched.pid,
                    ports: ports.clone(),
                    endpoints: plan.endpoints.clone(),
                };
                let live_xml = plan.live.to_xml(XmlFlavor::Live);
                // The record must be on disk before we report success: it is how a
                // restarted agent finds this QEMU again.
                if let Err(e) = write_atomic(&paths.live_xml(), live_xml.as_bytes())
                    .and_then(|()| record.save(&paths.dir))
                {
                    tracing::error!(vm = %name, error = %e, "cannot record VM; it runs unrecorded");
                }
                let addr = VmActor::start(
                    QemuProcess {
                        name: name.clone(),
                        uuid: record.uuid.clone(),
                        pid: launched.pid,
                        paths,
                        qmp: launched.qmp,
                        events: launched.events,
                        child: Some(launched.child),
                    },
                    ctx.address().recipient(),
                    ctx.address().recipient(),
                );
                let state = if migration_port.is_some() {
                    "inmigrate"
                } else {
                    "running"
                };
                tracing::info!(vm = %name, host = %host, pid = launched.pid, state, "QEMU up");
                count_launch(migration_port.is_some(), "ok");
                if migration_port.is_none() {
                    metrics::histogram!("flotilla_agent_start_seconds")
                        .record(launched_at.elapsed().as_secs_f64());
                }
                let vm = summary(&record, state);
                act.vms.insert(
                    name,
                    RunningVm {
                        addr,
                        record,
                        live_xml: live_xml.clone(),
                        migration_port,
                    },
                );
                metrics::gauge!("flotilla_agent_vms").set(act.vms.len() as f64);
                match mode {
                    LaunchMode::Incoming { uri, .. } => Response::Incoming { vm, uri },
                    LaunchMode::Run => Response::Started {
                        vm,
                        live_xml,
                        warnings: plan.warnings,
                    },
                }
            }),
        )
    }

    fn net_list(&self) -> Response {
        let table = match InterfaceTable::read_host() {
            Ok(t) => t,
            Err(e) => return Response::Error(e.to_string()),
        };
        let resolver = NetworkResolver::new(self.host(), &table);
        let networks = self
            .networks
            .networks
            .iter()
            .map(|n| {
                let resolved = resolver.resolve(n);
                let device = n
                    .bridge_name
                    .clone()
                    .or_else(|| n.first_forward_dev().map(str::to_string));
                NetStatus {
                    name: n.name.clone(),
                    mode: n
                        .forward_mode()
                        .map_or("isolated", |m| m.as_str())
                        .to_string(),
                    device: match &resolved {
                        Ok(r) => match &r.source {
                            AddressSource::Device(d) => Some(d.clone()),
                            AddressSource::DefinitionIp => device,
                        },
                        Err(_) => device,
                    },
                    address: resolved.as_ref().ok().map(|r| r.address.to_string()),
                    error: resolved.err().map(|e| e.to_string()),
                }
            })
            .collect();
        Response::Networks {
            networks,
            problems: self.networks.problems.clone(),
        }
    }
}

impl HostAgent {
    fn qmp_request(
        &mut self,
        name: &str,
        command: &'static str,
        map: impl FnOnce(serde_json::Value) -> Response + 'static,
    ) -> ResponseActFuture<Self, Response> {
        let Some(vm) = self.vms.get(name) else {
            return reply(Response::Error(format!(
                "Requested operation is not valid: domain '{name}' is not running on host {}",
                self.host()
            )));
        };
        let fut = vm.addr.send(QmpCall {
            command,
            arguments: serde_json::Value::Null,
        });
        Box::pin(
            async move {
                match fut.await {
                    Ok(Ok(v)) => map(v),
                    Ok(Err(e)) => Response::Error(format!("{command}: {e}")),
                    Err(e) => Response::Error(format!("VM actor unavailable: {e}")),
                }
            }
            .into_actor(self),
        )
    }

    /// Waits for the incoming stream to land, resumes the guest, confirms its consoles.
    fn finish_incoming(&mut self, name: String) -> ResponseActFuture<Self, Response> {
        let host = self.host().to_string();
        let Some(vm) = self.vms.get(&name) else {
            return reply(Response::Error(format!(
                "Requested operation is not valid: domain '{name}' is not running on host {host}"
            )));
        };
        let addr = vm.addr.clone();
        let endpoints = vm.record.endpoints.clone();
        let timeout = self.settings.timeouts.console;
        Box::pin(
            async move {
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                loop {
                    match addr.send(QueryStatus(Duration::from_secs(5))).await {
                        Ok(Ok(s)) if s == "inmigrate" => {}
                        Ok(Ok(s)) if s == "paused" || s == "running" => break,
                        Ok(Ok(s)) => return Err(format!("unexpected state '{s}' after migration")),
                        Ok(Err(e)) => return Err(e),
                        Err(e) => return Err(e.to_string()),
                    }
                    if std::time::Instant::now() > deadline {
                        return Err("the migration stream never completed".to_string());
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let cont = QmpCall {
                    command: "cont",
                    arguments: serde_json::Value::Null,
                };
                match addr.send(cont).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(format!("cont: {e}")),
                    Err(e) => return Err(e.to_string()),
                }
                for e in &endpoints {
                    confirm_console(e, timeout).await.map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            .into_actor(self)
            .map(move |result, act, _| match result {
                Ok(()) => {
                    if let Some(vm) = act.vms.get_mut(&name) {
                        if let Some(p) = vm.migration_port.take() {
                            act.ports.release(p);
                            vm.record.ports.retain(|x| *x != p);
                            let dir = vm_dir(&act.settings.state_dir, &name);
                            if let Err(e) = vm.record.save(&dir) {
                                tracing::error!(vm = %name, error = %e, "cannot update VM record");
                            }
                        }
                    }
                    tracing::info!(vm = %name, host = %host, "incoming migration finished; VM running");
                    Response::Done(format!("Domain '{name}' resumed on host {host}"))
                }
                Err(e) => Response::Error(format!("VM '{name}' on host {host}: {e}")),
            }),
        )
    }
}

/// Counts a QEMU launch: a start, or the destination of an incoming migration,
/// which is not a start and would skew the start latency it sits beside.
fn count_launch(incoming: bool, outcome: &'static str) {
    if incoming {
        metrics::counter!("flotilla_agent_incoming_migrations_total", "outcome" => outcome)
            .increment(1);
    } else {
        metrics::counter!("flotilla_agent_starts_total", "outcome" => outcome).increment(1);
    }
}

/// Reads QEMU's `query-migrate` answer.
fn migration_progress(v: &serde_json::Value) -> flotilla_shared::proto::MigrationProgress {
    let ram = &v["ram"];
    let u = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
    flotilla_shared::proto::MigrationProgress {
        status: v["status"].as_str().unwrap_or("none").to_string(),
        transferred: u(&ram["transferred"]),
        remaining: u(&ram["remaining"]),
        total: u(&ram["total"]),
        throughput_bps: (ram["mbps"].as_f64().unwrap_or(0.0) * 1_000_000.0 / 8.0) as u64,
        dirty_sync_count: u(&ram["dirty-sync-count"]),
        expected_downtime_ms: u(&v["expected-downtime"]),
        downtime_ms: v["downtime"].as_u64(),
        total_time_ms: v["total-time"].as_u64(),
        error: v["error-desc"].as_str().map(str::to_string),
    }
}

fn reply(r: Response) -> ResponseActFuture<HostAgent, Response> {
    Box::pin(actix::fut::ready(r))
}

fn consoles(endpoints: &[ConsoleEndpoint]) -> Vec<ConsoleInfo> {
    endpoints
        .iter()
        .map(|e| ConsoleInfo {
            uri: e.uri(),
            network: e.network.clone(),
            authenticated: !e.is_exposed_unauthenticated(),
        })
        .collect()
}

fn summary(r: &VmRecord, state: &str) -> VmSummary {
    VmSummary {
        name: r.name.clone(),
        uuid: r.uuid.clone(),
        pid: r.pid,
        state: state.to_string(),
        consoles: consoles(&r.endpoints),
    }
}

/// A real bind on the wildcard addresses, as libvirt's port allocator checks.
fn port_is_free(port: u16) -> bool {
    let in_use = |r: std::io::Result<std::net::TcpListener>| matches!(r, Err(e) if e.kind() == std::io::ErrorKind::AddrInUse);
    !in_use(std::net::TcpListener::bind(("0.0.0.0", port)))
        && !in_use(std::net::TcpListener::bind(("::", port)))
}

impl Actor for HostAgent {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let mut alive = Vec::new();
        for (dir, record) in self.records_on_disk() {
            if process_matches(record.pid, &record.uuid) {
                for p in &record.ports {
                    self.ports.reserve(*p);
                }
                alive.push((dir, record));
            } else if self.reattach {
                tracing::info!(vm = %record.name, pid = record.pid, "recorded VM is no longer running");
                for f in ["record.json", "live.xml", "qmp.sock", "qemu.pid"] {
                    let _ = std::fs::remove_file(dir.join(f));
                }
            }
        }
        if !self.reattach {
            return;
        }
        // Hold other requests until every surviving VM is attached again.
        ctx.wait(
            async move {
                let mut attached = Vec::new();
                for (dir, record) in alive {
                    let paths = VmPaths::new(dir);
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    let qmp =
                        QmpClient::connect(&paths.qmp_socket(), Duration::from_secs(5), tx).await;
                    attached.push((paths, record, qmp.map(|q| (q, rx))));
                }
                attached
            }
            .into_actor(self)
            .map(|attached, act, ctx| {
                for (paths, record, qmp) in attached {
                    let (qmp, events) = match qmp {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::error!(vm = %record.name, pid = record.pid, error = %e,
                                "VM runs but its monitor is unreachable; ports stay reserved");
                            continue;
                        }
                    };
                    let live_xml = std::fs::read_to_string(paths.live_xml()).unwrap_or_default();
                    let addr = VmActor::start(
                        QemuProcess {
                            name: record.name.clone(),
                            uuid: record.uuid.clone(),
                            pid: record.pid,
                            paths,
                            qmp,
                            events,
                            child: None,
                        },
                        ctx.address().recipient(),
                        ctx.address().recipient(),
                    );
                    tracing::info!(vm = %record.name, pid = record.pid, "re-attached to running VM");
                    act.vms.insert(
                        record.name.clone(),
                        RunningVm {
                            addr,
                            record,
                            live_xml,
                            migration_port: None,
                        },
                    );
                }
            }),
        );
    }
}

impl Handler<AgentCall> for HostAgent {
    type Result = ResponseActFuture<Self, Response>;

    fn handle(&mut self, AgentCall(req): AgentCall, _: &mut Self::Context) -> Self::Result {
        let not_running = |name: &str, host: &str| {
            Response::Error(format!(
                "Requested operation is not valid: domain '{name}' is not running on host {host}"
            ))
        };
        match req {
            Request::Start { xml, source } => self.start_vm(xml, source, None),
            Request::MigrateIncoming {
                xml,
                source,
                postcopy,
            } => self.start_vm(xml, source, Some(postcopy)),
            Request::StartPostcopy { name } => {
                self.qmp_request(&name, "migrate-start-postcopy", |_| {
                    Response::Done("switched to post-copy".into())
                })
            }
            Request::ClientMigrateInfo {
                name,
                hostname,
                port,
            } => match self.vms.get(&name) {
                None => reply(not_running(&name, self.host())),
                Some(vm) => {
                    let fut = vm.addr.send(QmpCall {
                        command: "client_migrate_info",
                        arguments: serde_json::json!({
                            "protocol": "spice", "hostname": hostname, "port": port
                        }),
                    });
                    Box::pin(
                        async move {
                            match fut.await {
                                Ok(Ok(_)) => {
                                    Response::Done("SPICE clients told to reconnect".into())
                                }
                                Ok(Err(e)) => Response::Error(format!("client_migrate_info: {e}")),
                                Err(e) => Response::Error(format!("VM actor unavailable: {e}")),
                            }
                        }
                        .into_actor(self),
                    )
                }
            },
            Request::MigrateOut {
                name,
                uri,
                max_downtime_ms,
                bandwidth_mib_s,
                auto_converge,
                postcopy,
            } => match self.vms.get(&name) {
                None => reply(not_running(&name, self.host())),
                Some(vm) => {
                    let addr = vm.addr.clone();
                    let mut parameters = serde_json::Map::new();
                    if let Some(ms) = max_downtime_ms {
                        parameters.insert("downtime-limit".into(), ms.into());
                    }
                    if let Some(mib) = bandwidth_mib_s {
                        parameters.insert("max-bandwidth".into(), (mib << 20).into());
                    }
                    Box::pin(
                        async move {
                            let calls = [
                                QmpCall {
                                    command: "migrate-set-capabilities",
                                    arguments: serde_json::json!({"capabilities": [
                                        {"capability": "auto-converge", "state": auto_converge},
                                        {"capability": "postcopy-ram", "state": postcopy}
                                    ]}),
                                },
                                QmpCall {
                                    command: "migrate-set-parameters",
                                    arguments: serde_json::Value::Object(parameters),
                                },
                                QmpCall {
                                    command: "migrate",
                                    arguments: serde_json::json!({ "uri": uri }),
                                },
                            ];
                            for call in calls {
                                let command = call.command;
                                match addr.send(call).await {
                                    Ok(Ok(_)) => {}
                                    Ok(Err(e)) => {
                                        return Response::Error(format!("{command}: {e}"))
                                    }
                                    Err(e) => {
                                        return Response::Error(format!(
                                            "VM actor unavailable: {e}"
                                        ))
                                    }
                                }
                            }
                            Response::Done(format!("migration of '{name}' to {uri} started"))
                        }
                        .into_actor(self),
                    )
                }
            },
            Request::MigrationStatus { name } => self.qmp_request(&name, "query-migrate", |v| {
                Response::Migration(migration_progress(&v))
            }),
            Request::MigrateCancel { name } => self.qmp_request(&name, "migrate_cancel", |_| {
                Response::Done("migration cancel requested".into())
            }),
            Request::Resume { name } => {
                self.qmp_request(&name, "cont", |_| Response::Done("resumed".into()))
            }
            Request::MigrateFinish { name } => self.finish_incoming(name),
            Request::Shutdown { name, timeout_secs } => match self.vms.get(&name) {
                None => reply(not_running(&name, self.host())),
                Some(vm) => {
                    let fut = vm.addr.send(Shutdown {
                        timeout: Duration::from_secs(timeout_secs),
                    });
                    Box::pin(async move { done(fut.await) }.into_actor(self))
                }
            },
            Request::Destroy { name } => match self.vms.get(&name) {
                None => reply(not_running(&name, self.host())),
                Some(vm) => {
                    let fut = vm.addr.send(Destroy);
                    Box::pin(async move { done(fut.await) }.into_actor(self))
                }
            },
            Request::List => {
                let vms: Vec<_> = self
                    .vms
                    .values()
                    .map(|v| (v.addr.clone(), v.record.clone()))
                    .collect();
                Box::pin(
                    async move {
                        let mut out = Vec::new();
                        for (addr, record) in vms {
                            // Heartbeats list VMs: a busy QEMU must not delay them.
                            let status = addr.send(QueryStatus(Duration::from_millis(500)));
                            let state = match status.await {
                                Ok(Ok(s)) => s,
                                _ => "unknown".to_string(),
                            };
                            out.push(summary(&record, &state));
                        }
                        Response::Vms(out)
                    }
                    .into_actor(self),
                )
            }
            Request::DomDisplay { name } => reply(match self.vms.get(&name) {
                Some(vm) => Response::Consoles(consoles(&vm.record.endpoints)),
                None => not_running(&name, self.host()),
            }),
            Request::DumpXml { name } => reply(match self.vms.get(&name) {
                Some(vm) => Response::Xml(vm.live_xml.clone()),
                None => not_running(&name, self.host()),
            }),
            Request::NetList => reply(self.net_list()),
            Request::MonitorCommand { name, command } => match self.vms.get(&name) {
                None => reply(not_running(&name, self.host())),
                Some(vm) => {
                    let fut = vm.addr.send(MonitorCommand(command));
                    Box::pin(async move { done(fut.await) }.into_actor(self))
                }
            },
            Request::ReloadNetworks => {
                reply(match HostNetworks::load(&self.settings.networks_dir) {
                    Ok(n) => {
                        let msg = format!(
                            "reloaded {} network(s) from {}",
                            n.networks.len(),
                            n.dir.display()
                        );
                        for p in &n.problems {
                            tracing::warn!("{p}");
                        }
                        self.networks = n;
                        Response::Done(msg)
                    }
                    Err(e) => Response::Error(e.to_string()),
                })
            }
        }
    }
}

fn done(r: Result<Result<String, String>, MailboxError>) -> Response {
    match r {
        Ok(Ok(msg)) => Response::Done(msg),
        Ok(Err(e)) => Response::Error(e),
        Err(e) => Response::Error(format!("VM actor unavailable: {e}")),
    }
}

impl Handler<VmGone> for HostAgent {
    type Result = ();

    fn handle(&mut self, msg: VmGone, _: &mut Self::Context) {
        tracing::info!(vm = %msg.name, pid = msg.pid, reason = %msg.reason, log_tail = %msg.log_tail, "VM stopped");
        if let Some(vm) = self.vms.remove(&msg.name) {
            for p in &vm.record.ports {
                self.ports.release(*p);
            }
        }
        metrics::gauge!("flotilla_agent_vms").set(self.vms.len() as f64);
        let dir = vm_dir(&self.settings.state_dir, &msg.name);
        for f in ["record.json", "live.xml", "qmp.sock", "qemu.pid"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
    }
}

impl Handler<VmEvent> for HostAgent {
    type Result = ();

    fn handle(&mut self, msg: VmEvent, _: &mut Self::Context) {
        tracing::info!(vm = %msg.name, event = %msg.event.name, data = %msg.event.data, "QEMU event");
    }
}
