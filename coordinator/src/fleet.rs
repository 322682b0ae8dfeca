//! `Fleet`: the coordinator's actor. It owns the live view of every host and
//! answers operator requests.
//!
//! Messages come from connection tasks ([`crate::server`]): host
//! registrations and heartbeats, disconnects, and operator requests. Decisions
//! are made by pure modules: [`crate::scheduler`] picks hosts,
//! [`crate::reconcile`] converges records with what hosts report. Durable
//! state lives in the [`Store`]; a placement is recorded before a start is
//! sent, so a crash can never leave a VM the coordinator does not know about,
//! and no VM is started while the records say it runs elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use flotilla_shared::net::quic;
use flotilla_shared::proto::{
    AgentRequest, AgentResponse, HelloAck, HostEntry, HostFacts, MigrationProgress, NetStatus,
    OperatorRequest, OperatorResponse, VmListEntry, VmSummary,
};
use flotilla_shared::xml::{tree, Domain, ListenKind, XmlFlavor};

use crate::events::EventLog;
use crate::migration::MigrationParams;
use crate::migration_driver::{self, MigrationJob};
use crate::reconcile::{overlay_recent, reconcile, Fix};
use crate::scheduler::{self, HostSnapshot, NetworkAddresses, Policy, VmNeeds};
use crate::store::{HostRow, NewDefinition, Store, StoreError, VmRow};
use crate::usage::{Footprint, Usage};

/// How long the coordinator waits for an agent to answer a request.
const AGENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Coordinator settings.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// Heartbeat interval asked of agents.
    pub heartbeat: Duration,
    /// A host with no heartbeat for this long is `unreachable`.
    pub heartbeat_timeout: Duration,
    /// Scheduling policy.
    pub policy: Policy,
}

struct HostState {
    conn: Option<quinn::Connection>,
    facts: HostFacts,
    /// `facts.networks` as the scheduler reads them, rebuilt only when they change.
    networks: Arc<NetworkAddresses>,
    last_seen: Instant,
}

/// The scheduler's view of a host's reported networks.
fn network_addresses(networks: &[NetStatus]) -> NetworkAddresses {
    networks
        .iter()
        .map(|n| {
            let v = match (&n.address, &n.error) {
                (Some(a), _) => Ok(a.clone()),
                (None, Some(e)) => Err(e.clone()),
                (None, None) => Err("no address".to_string()),
            };
            (n.name.clone(), v)
        })
        .collect()
}

/// The coordinator actor.
pub struct Fleet {
    store: Arc<dyn Store>,
    settings: FleetSettings,
    hosts: BTreeMap<String, HostState>,
    /// VMs with a start or stop in flight: a second request waits for none, it is refused.
    busy: BTreeSet<String>,
    /// The store's placements with each VM's footprint, for the scheduler.
    usage: Usage,
    /// The store's host rows, mirrored: read on every start and every second.
    host_rows: BTreeMap<String, HostRow>,
    /// Migrations in flight, by VM, with the channel that aborts them.
    migrations: BTreeMap<String, tokio::sync::mpsc::UnboundedSender<String>>,
    /// What `flotilla events` shows.
    events: EventLog,
    /// Each host's state when last reported, to log transitions once.
    host_states: BTreeMap<String, &'static str>,
    /// When the coordinator last started, stopped or moved each VM. A host
    /// report gathered before that moment would undo it, so reconciliation
    /// leaves the VM alone for one heartbeat timeout.
    touched: BTreeMap<String, Instant>,
}

/// An operator's event request, with the sink for the lines.
#[derive(Message)]
#[rtype(result = "()")]
pub struct EventsCall {
    /// Keep sending new events.
    pub follow: bool,
    /// Where lines go.
    pub sink: tokio::sync::mpsc::UnboundedSender<String>,
}

/// An operator's migration request, with a sink for its progress frames.
#[derive(Message)]
#[rtype(result = "OperatorResponse")]
pub struct MigrateCall {
    /// The operator's certificate name, for the log.
    pub operator: String,
    /// Must be [`OperatorRequest::Migrate`].
    pub request: OperatorRequest,
    /// Progress samples go here while the migration runs.
    pub progress: tokio::sync::mpsc::UnboundedSender<MigrationProgress>,
}

/// A host registered over `conn`.
#[derive(Message)]
#[rtype(result = "HelloAck")]
pub struct Register {
    /// What it reported.
    pub facts: HostFacts,
    /// Its connection, for sending it requests.
    pub conn: quinn::Connection,
}

/// A heartbeat from a registered host.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Heartbeat(pub HostFacts);

/// A host's QEMU stopped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct VmStopped {
    /// The host.
    pub host: String,
    /// The VM.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// A host's connection ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnected {
    /// The host.
    pub host: String,
    /// Which connection (a newer one may already have replaced it).
    pub stable_id: usize,
}

/// An operator's request.
#[derive(Message)]
#[rtype(result = "OperatorResponse")]
pub struct OperatorCall {
    /// The operator's certificate name, for the log.
    pub operator: String,
    /// The request.
    pub request: OperatorRequest,
}

impl Fleet {
    /// A fleet over `store`, its in-memory mirrors loaded from it.
    ///
    /// A store that cannot be read refuses the start: empty mirrors would
    /// overcommit hosts and write a drained host back as undrained.
    pub fn new(store: Arc<dyn Store>, settings: FleetSettings) -> Result<Self, StoreError> {
        let mut usage = Usage::default();
        for row in store.list()? {
            if let Some(h) = &row.placement {
                usage.set(&row.name, Some((h, footprint(&row))));
            }
        }
        let host_rows = store
            .hosts()?
            .into_iter()
            .map(|h| (h.name.clone(), h))
            .collect();
        Ok(Fleet {
            store,
            settings,
            hosts: BTreeMap::new(),
            busy: BTreeSet::new(),
            usage,
            host_rows,
            migrations: BTreeMap::new(),
            events: EventLog::default(),
            host_states: BTreeMap::new(),
            touched: BTreeMap::new(),
        })
    }

    fn connected(&self, h: &HostState) -> bool {
        h.conn.is_some() && h.last_seen.elapsed() <= self.settings.heartbeat_timeout
    }

    fn host_state_word(&self, name: &str, draining: bool) -> &'static str {
        match self.hosts.get(name) {
            Some(h) if self.connected(h) && draining => "draining",
            Some(h) if self.connected(h) => "connected",
            _ => "unreachable",
        }
    }

    fn runs_on(&self, host: &str, vm: &str) -> bool {
        self.hosts
            .get(host)
            .is_some_and(|h| self.connected(h) && h.facts.vms.iter().any(|v| v.name == vm))
    }

    fn converge(&mut self, host: &str) {
        let Some(h) = self.hosts.get(host) else {
            return;
        };
        let reported: BTreeMap<String, String> = h
            .facts
            .vms
            .iter()
            .map(|v| (v.name.clone(), v.state.clone()))
            .collect();
        let conn = h.conn.clone();
        // Only the rows this report can concern: VMs placed here and VMs it lists.
        let mut names: BTreeSet<&str> = self.usage.vms_on(host).collect();
        names.extend(reported.keys().map(String::as_str));
        let mut rows = Vec::with_capacity(names.len());
        for name in names {
            match self.store.get(name) {
                Ok(Some(r)) => rows.push(r),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot read store for reconciliation");
                    return;
                }
            }
        }
        let fixes = reconcile(host, &reported, &rows, &|other, vm| {
            other != host && self.runs_on(other, vm)
        });
        for fix in fixes {
            match fix {
                Fix::Place { name } if !self.busy.contains(&name) => {
                    tracing::info!(vm = %name, host, "reconcile: VM runs here; recording placement");
                    let fp = rows
                        .iter()
                        .find(|r| r.name == name)
                        .map(footprint)
                        .unwrap_or_default();
                    let _ = self.record_placement(&name, Some((host, fp)));
                }
                Fix::Stopped { name } if !self.busy.contains(&name) => {
                    tracing::info!(vm = %name, host, "reconcile: VM no longer runs; recording shut off");
                    let _ = self.record_placement(&name, None);
                }
                Fix::Conflict { name, .. }
                | Fix::Place { name }
                | Fix::Stopped { name }
                | Fix::DestroyStale { name, .. }
                    if self.migrations.contains_key(&name) || self.recently_touched(&name) => {}
                Fix::DestroyStale { name, state } => {
                    tracing::warn!(vm = %name, host, state = %state,
                        "removing the stale half of an interrupted migration");
                    if let Some(conn) = conn.clone() {
                        actix::spawn(async move {
                            let req = AgentRequest::Destroy { name };
                            let _ =
                                quic::call::<_, AgentResponse>(&conn, &req, AGENT_TIMEOUT).await;
                        });
                    }
                }
                Fix::Conflict { name, recorded } => {
                    tracing::error!(vm = %name, host, recorded = %recorded,
                        "VM reported running on two hosts; not touching either copy")
                }
                Fix::Unmanaged { name } => {
                    tracing::warn!(vm = %name, host, "host runs a VM with no definition")
                }
                _ => {}
            }
        }
    }

    fn snapshots(&self) -> Vec<HostSnapshot> {
        self.host_rows
            .values()
            .map(|row| {
                let used = self.usage.used(&row.name);
                let live = self.hosts.get(&row.name);
                HostSnapshot {
                    connected: live.is_some_and(|h| self.connected(h)),
                    draining: row.draining,
                    cpus: live.map_or(row.cpus, |h| h.facts.cpus),
                    memory_mib: live.map_or(row.memory_mib, |h| h.facts.memory_mib),
                    used_memory_mib: used.memory_mib,
                    used_vcpus: used.vcpus,
                    networks: live.map(|h| h.networks.clone()).unwrap_or_default(),
                    name: row.name.clone(),
                }
            })
            .collect()
    }

    fn agent_conn(&self, host: &str) -> Result<quinn::Connection, String> {
        match self.hosts.get(host) {
            Some(h) if self.connected(h) => h
                .conn
                .clone()
                .ok_or_else(|| format!("host {host} is unreachable")),
            Some(_) => Err(format!("host {host} is unreachable")),
            None => Err(format!("host '{host}' is not known")),
        }
    }

    fn define(&mut self, xml: String, source: String) -> OperatorResponse {
        let doc = match Domain::parse(&source, &xml) {
            Ok(d) => d,
            Err(e) => return OperatorResponse::Error(e.to_string()),
        };
        let mut domain = doc.model.without_runtime_state();
        let mut warnings = Vec::new();
        for g in domain.graphics() {
            for l in &g.listens {
                if let ListenKind::Address { address: Some(a) } = &l.kind {
                    let loopback = a
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                    if !loopback {
                        warnings.push(format!(
                            "{} console of '{}' pins the host-specific address {a}; \
                             use <listen type='network' network='NAME'/> so each host resolves its own",
                            g.protocol.as_str(),
                            domain.name
                        ));
                    }
                }
            }
        }
        // As virsh define: a definition without <uuid> keeps the stored VM's UUID.
        let has_uuid = tree::parse_document(&source, &xml)
            .map(|root| root.elements().any(|e| e.name == "uuid"))
            .unwrap_or(true);
        if !has_uuid {
            if let Ok(Some(existing)) = self.store.get(&domain.name) {
                if let Some(u) = flotilla_shared::xml::domain::parse_uuid(&existing.uuid) {
                    domain.uuid = u;
                }
            }
        }
        let def = NewDefinition {
            name: domain.name.clone(),
            uuid: domain.uuid.hyphenated().to_string(),
            xml: domain.to_xml(XmlFlavor::Inactive),
        };
        match self.store.define(def) {
            Ok(row) => {
                tracing::info!(vm = %row.name, generation = row.generation, "defined");
                OperatorResponse::Defined {
                    name: row.name,
                    uuid: row.uuid,
                    generation: row.generation,
                    warnings,
                }
            }
            Err(e) => OperatorResponse::Error(e.to_string()),
        }
    }

    fn vm_state(&self, row: &VmRow) -> (String, Option<String>) {
        match row.placement.as_deref() {
            Some(h) if self.runs_on(h, &row.name) => ("running".into(), Some(h.to_string())),
            Some(h) if !self.hosts.get(h).is_some_and(|s| self.connected(s)) => {
                ("unknown".into(), Some(h.to_string()))
            }
            _ => ("shut off".into(), None),
        }
    }

    fn start(
        &mut self,
        name: String,
        host: Option<String>,
    ) -> ResponseActFuture<Self, OperatorResponse> {
        let row = match self.vm_row(&name) {
            Ok(r) => r,
            Err(e) => return reply(OperatorResponse::Error(e)),
        };
        if let Some(e) = self.busy_error(&name) {
            return reply(OperatorResponse::Error(e));
        }
        if let Some(h) = row.placement.as_deref() {
            let state = if self.runs_on(h, &name) {
                "running"
            } else {
                "recorded as running (host unreachable)"
            };
            return reply(OperatorResponse::Error(format!(
                "Requested operation is not valid: domain '{name}' is {state} on host {h}"
            )));
        }
        let domain = match Domain::parse(&name, &row.xml) {
            Ok(d) => d.model,
            Err(e) => {
                return reply(OperatorResponse::Error(format!(
                    "stored definition unreadable: {e}"
                )))
            }
        };
        let needs = VmNeeds {
            name: name.clone(),
            memory_mib: domain.memory.mib(),
            vcpus: domain.vcpus(),
            networks: domain.referenced_networks(),
        };
        let snapshots = self.snapshots();
        let scheduling = Instant::now();
        let decision = match &host {
            Some(h) => scheduler::place_on(&needs, h, &snapshots, &self.settings.policy),
            None => scheduler::place(&needs, &snapshots, &self.settings.policy),
        };
        metrics::histogram!("flotilla_scheduling_seconds")
            .record(scheduling.elapsed().as_secs_f64());
        let decision = match decision {
            Ok(d) => d,
            Err(e) => {
                tracing::info!(vm = %name, reason = %e, "no placement");
                self.emit(format!("vm {name} not placed: {e}"));
                metrics::counter!("flotilla_starts_total", "outcome" => "no_placement")
                    .increment(1);
                return reply(OperatorResponse::Error(e.to_string()));
            }
        };
        let target = decision.host.clone();
        let mut explanation = decision
            .ranking
            .iter()
            .map(|(h, s)| format!("{h} ({s:.3})"))
            .collect::<Vec<_>>()
            .join(", ");
        if decision.feasible > decision.ranking.len() {
            explanation.push_str(&format!(", … of {} hosts that fit", decision.feasible));
        }
        tracing::info!(vm = %name, host = %target, ranking = %explanation, "placing");
        let conn = match self.agent_conn(&target) {
            Ok(c) => c,
            Err(e) => return reply(OperatorResponse::Error(e)),
        };
        // Record first: if we crash after the host starts it, the host's next
        // report matches the record instead of surprising us.
        let fp = Footprint {
            memory_mib: needs.memory_mib,
            vcpus: needs.vcpus,
        };
        if let Err(e) = self.record_placement(&name, Some((&target, fp))) {
            return reply(OperatorResponse::Error(e.to_string()));
        }
        self.busy.insert(name.clone());
        let started = Instant::now();
        let request = AgentRequest::Start {
            xml: row.xml.clone(),
            source: format!("definition of '{name}' (generation {})", row.generation),
        };
        Box::pin(
            async move { quic::call::<_, AgentResponse>(&conn, &request, AGENT_TIMEOUT).await }
                .into_actor(self)
                .map(move |result, act, _| {
                    act.busy.remove(&name);
                    act.touch(&name);
                    match result {
                        Ok(AgentResponse::Started { vm, warnings, .. }) => {
                            if let Some(h) = act.hosts.get_mut(&target) {
                                h.facts.vms.retain(|v| v.name != vm.name);
                                h.facts.vms.push(vm.clone());
                            }
                            tracing::info!(vm = %name, host = %target, "started");
                            act.emit(format!("vm {name} started on {target} (ranked: {explanation})"));
                            metrics::counter!("flotilla_starts_total", "outcome" => "ok").increment(1);
                            metrics::histogram!("flotilla_start_seconds")
                                .record(started.elapsed().as_secs_f64());
                            OperatorResponse::Started {
                                name,
                                host: target,
                                consoles: vm.consoles,
                                explanation: format!("ranked: {explanation}"),
                                warnings,
                            }
                        }
                        other => {
                            let _ = act.record_placement(&name, None);
                            let msg = match other {
                                Ok(AgentResponse::Error(e)) => e,
                                Ok(r) => format!("unexpected answer {r:?}"),
                                Err(e) => e.to_string(),
                            };
                            tracing::warn!(vm = %name, host = %target, error = %msg, "start failed");
                            act.emit(format!("vm {name} failed to start on {target}: {msg}"));
                            metrics::counter!("flotilla_starts_total", "outcome" => "error").increment(1);
                            OperatorResponse::Error(format!("host {target}: {msg}"))
                        }
                    }
                }),
        )
    }

    fn stop(
        &mut self,
        name: String,
        request: AgentRequest,
    ) -> ResponseActFuture<Self, OperatorResponse> {
        let row = match self.vm_row(&name) {
            Ok(r) => r,
            Err(e) => return reply(OperatorResponse::Error(e)),
        };
        if let Some(e) = self.busy_error(&name) {
            return reply(OperatorResponse::Error(e));
        }
        let Some(host) = row.placement.clone() else {
            return reply(OperatorResponse::Error(format!(
                "Requested operation is not valid: domain '{name}' is not running"
            )));
        };
        let conn = match self.agent_conn(&host) {
            Ok(c) => c,
            Err(e) => return reply(OperatorResponse::Error(e)),
        };
        self.busy.insert(name.clone());
        Box::pin(
            async move { quic::call::<_, AgentResponse>(&conn, &request, AGENT_TIMEOUT).await }
                .into_actor(self)
                .map(move |result, act, _| {
                    act.busy.remove(&name);
                    match result {
                        Ok(AgentResponse::Done(msg)) => {
                            act.touch(&name);
                            tracing::info!(vm = %name, host = %host, reason = %msg, "stopped");
                            act.emit(format!("vm {name} stopped on {host}: {msg}"));
                            let _ = act.record_placement(&name, None);
                            if let Some(h) = act.hosts.get_mut(&host) {
                                h.facts.vms.retain(|v| v.name != name);
                            }
                            OperatorResponse::Done(msg)
                        }
                        Ok(AgentResponse::Error(e)) => {
                            OperatorResponse::Error(format!("host {host}: {e}"))
                        }
                        Ok(r) => {
                            OperatorResponse::Error(format!("host {host}: unexpected answer {r:?}"))
                        }
                        Err(e) => OperatorResponse::Error(format!("host {host}: {e}")),
                    }
                }),
        )
    }

    fn ask_agent(
        &mut self,
        host: String,
        request: AgentRequest,
        map: impl FnOnce(String, AgentResponse) -> OperatorResponse + 'static,
    ) -> ResponseActFuture<Self, OperatorResponse> {
        let conn = match self.agent_conn(&host) {
            Ok(c) => c,
            Err(e) => return reply(OperatorResponse::Error(e)),
        };
        Box::pin(
            async move {
                match quic::call::<_, AgentResponse>(&conn, &request, AGENT_TIMEOUT).await {
                    Ok(AgentResponse::Error(e)) => {
                        OperatorResponse::Error(format!("host {host}: {e}"))
                    }
                    Ok(r) => map(host, r),
                    Err(e) => OperatorResponse::Error(format!("host {host}: {e}")),
                }
            }
            .into_actor(self),
        )
    }

    /// The stored VM called `name`, or virsh's words for its absence.
    fn vm_row(&self, name: &str) -> Result<VmRow, String> {
        match self.store.get(name) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(format!(
                "failed to get domain '{name}': no domain with matching name"
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// While a VM migrates the migration owns it; other requests are refused.
    fn busy_error(&self, name: &str) -> Option<String> {
        if self.migrations.contains_key(name) {
            Some(format!(
                "Requested operation is not valid: domain '{name}' is migrating \
                 (flotilla migrate-abort {name} cancels it)"
            ))
        } else if self.busy.contains(name) {
            Some(format!(
                "Requested operation is not valid: domain '{name}' has an operation in progress"
            ))
        } else {
            None
        }
    }

    fn migrate(
        &mut self,
        call: MigrateCall,
        fleet: Addr<Self>,
    ) -> Result<ResponseActFuture<Self, OperatorResponse>, String> {
        let OperatorRequest::Migrate {
            name,
            to,
            max_downtime_ms,
            bandwidth_mib_s,
            auto_converge,
            postcopy,
            timeout_secs,
        } = call.request
        else {
            return Err("not a migration request".into());
        };
        let row = self.vm_row(&name)?;
        if let Some(e) = self.busy_error(&name) {
            return Err(e);
        }
        let Some(source) = row.placement.clone().filter(|h| self.runs_on(h, &name)) else {
            return Err(format!(
                "Requested operation is not valid: domain '{name}' is not running"
            ));
        };
        let domain = Domain::parse(&name, &row.xml)
            .map_err(|e| e.to_string())?
            .model;
        let needs = VmNeeds {
            name: name.clone(),
            memory_mib: domain.memory.mib(),
            vcpus: domain.vcpus(),
            networks: domain.referenced_networks(),
        };
        let snapshots = self.snapshots();
        let decision = match &to {
            Some(h) if *h == source => return Err(format!("domain '{name}' already runs on {h}")),
            Some(h) => scheduler::place_on(&needs, h, &snapshots, &self.settings.policy),
            None => {
                scheduler::place_excluding(&needs, &snapshots, &[&source], &self.settings.policy)
            }
        }
        .map_err(|e| e.to_string())?;
        let dest = decision.host;
        let source_conn = self.agent_conn(&source)?;
        let dest_conn = self.agent_conn(&dest)?;
        let (abort_tx, aborts) = tokio::sync::mpsc::unbounded_channel();
        self.migrations.insert(name.clone(), abort_tx);
        metrics::gauge!("flotilla_migrations_in_progress").set(self.migrations.len() as f64);
        tracing::info!(vm = %name, from = %source, to = %dest, operator = %call.operator, "migrating");
        self.emit(format!("vm {name} migrating from {source} to {dest}"));
        let (progress, tee) = progress_tee(name.clone(), call.progress, fleet);
        let job = MigrationJob {
            name: name.clone(),
            source,
            dest: dest.clone(),
            source_conn,
            dest_conn,
            // The stored definition is host-independent: exactly the migratable XML.
            xml: row.xml,
            params: MigrationParams {
                max_downtime_ms,
                bandwidth_mib_s,
                auto_converge,
                postcopy,
                timeout: timeout_secs.map(Duration::from_secs),
            },
            store: self.store.clone(),
            progress,
            aborts,
            dest_consoles: Vec::new(),
        };
        let run = async move {
            let response = migration_driver::run(job).await;
            // The job, and with it the tee's sender, is gone: its last lines land first.
            let _ = tee.await;
            response
        };
        Ok(Box::pin(run.into_actor(self).map(
            move |response, act, _| {
                act.migrations.remove(&name);
                if let OperatorResponse::Migrated { on, .. } = &response {
                    // The driver recorded the new placement in the store.
                    act.usage.relocate(&name, on);
                }
                metrics::gauge!("flotilla_migrations_in_progress").set(act.migrations.len() as f64);
                act.touch(&name);
                let outcome = match &response {
                    OperatorResponse::Migrated { outcome, .. } => {
                        outcome.split(':').next().unwrap_or("failed").to_string()
                    }
                    _ => "failed".to_string(),
                };
                if let OperatorResponse::Migrated {
                    outcome: full,
                    on,
                    elapsed_ms,
                    ..
                } = &response
                {
                    act.emit(format!(
                        "vm {name} migration {full} after {:.2}s; runs on {on}",
                        *elapsed_ms as f64 / 1000.0
                    ));
                }
                metrics::counter!("flotilla_migrations_total", "outcome" => outcome).increment(1);
                if let OperatorResponse::Migrated { on, .. } = &response {
                    // Until the next heartbeats arrive, reflect the move at once:
                    // the VM runs on `on` and nowhere else. Its pid and consoles
                    // there are the destination's to report.
                    let mut moved = None;
                    for (h, state) in act.hosts.iter_mut() {
                        if h != on {
                            if let Some(i) = state.facts.vms.iter().position(|v| v.name == name) {
                                moved = Some(state.facts.vms.remove(i));
                            }
                        }
                    }
                    if let (Some(vm), Some(dest)) = (moved, act.hosts.get_mut(on)) {
                        if !dest.facts.vms.iter().any(|v| v.name == name) {
                            dest.facts.vms.push(VmSummary {
                                pid: 0,
                                state: "running".into(),
                                consoles: Vec::new(),
                                ..vm
                            });
                        }
                    }
                }
                response
            },
        )))
    }

    fn placed_host(&self, name: &str) -> Result<String, String> {
        self.vm_row(name)?.placement.ok_or_else(|| {
            format!("Requested operation is not valid: domain '{name}' is not running")
        })
    }
}

/// What a stored definition holds on its host; an unreadable one holds nothing.
fn footprint(row: &VmRow) -> Footprint {
    Domain::parse(&row.name, &row.xml).map_or_else(
        |_| Footprint::default(),
        |d| Footprint {
            memory_mib: d.model.memory.mib(),
            vcpus: d.model.vcpus(),
        },
    )
}

fn reply(r: OperatorResponse) -> ResponseActFuture<Fleet, OperatorResponse> {
    Box::pin(actix::fut::ready(r))
}

impl Actor for Fleet {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Gauges are derived state: recompute them rather than track every change.
        ctx.run_interval(Duration::from_secs(1), |act, _| act.publish_gauges());
    }
}

impl Fleet {
    /// Records a placement (or none) in the store and mirrors it in `usage`.
    fn record_placement(
        &mut self,
        name: &str,
        placement: Option<(&str, Footprint)>,
    ) -> Result<(), StoreError> {
        self.store.set_placement(
            name,
            placement.map(|(h, _)| h.to_string()),
            placement.is_some(),
        )?;
        self.usage.set(name, placement);
        Ok(())
    }

    fn touch(&mut self, name: &str) {
        self.touched.insert(name.to_string(), Instant::now());
    }

    fn recently_touched(&self, name: &str) -> bool {
        self.touched
            .get(name)
            .is_some_and(|t| t.elapsed() < self.settings.heartbeat_timeout)
    }

    fn emit(&mut self, line: String) {
        self.events.emit(std::time::SystemTime::now(), &line);
    }

    fn publish_gauges(&mut self) {
        let grace = self.settings.heartbeat_timeout;
        self.touched.retain(|_, at| at.elapsed() < grace);
        let mut hosts: BTreeMap<&str, f64> =
            [("connected", 0.0), ("unreachable", 0.0), ("draining", 0.0)].into();
        let mut changes = Vec::new();
        for row in self.host_rows.values() {
            let state = self.host_state_word(&row.name, row.draining);
            *hosts.entry(state).or_default() += 1.0;
            if self.host_states.insert(row.name.clone(), state) != Some(state) {
                changes.push(format!("host {} {state}", row.name));
            }
        }
        for line in changes {
            self.emit(line);
        }
        for (state, n) in hosts {
            metrics::gauge!("flotilla_hosts", "state" => state).set(n);
        }
        let mut vms: BTreeMap<String, f64> = [
            ("running".to_string(), 0.0),
            ("shut off".to_string(), 0.0),
            ("unknown".to_string(), 0.0),
        ]
        .into();
        for row in self.store.list().unwrap_or_default() {
            *vms.entry(self.vm_state(&row).0).or_default() += 1.0;
        }
        for (state, n) in vms {
            metrics::gauge!("flotilla_vms", "state" => state).set(n);
        }
        metrics::gauge!("flotilla_migrations_in_progress").set(self.migrations.len() as f64);
    }
}

impl Handler<Register> for Fleet {
    type Result = MessageResult<Register>;

    fn handle(&mut self, msg: Register, _: &mut Self::Context) -> Self::Result {
        let host = msg.facts.host.clone();
        let stored = self.host_rows.get(&host);
        let row = HostRow {
            name: host.clone(),
            cpus: msg.facts.cpus,
            memory_mib: msg.facts.memory_mib,
            draining: stored.is_some_and(|h| h.draining),
        };
        if stored != Some(&row) {
            if let Err(e) = self.store.put_host(&row, false) {
                return MessageResult(HelloAck::Refused(e.to_string()));
            }
            self.host_rows.insert(host.clone(), row.clone());
        }
        tracing::info!(host = %host, vms = msg.facts.vms.len(), networks = msg.facts.networks.len(), "host registered");
        self.hosts.insert(
            host.clone(),
            HostState {
                conn: Some(msg.conn),
                networks: Arc::new(network_addresses(&msg.facts.networks)),
                facts: msg.facts,
                last_seen: Instant::now(),
            },
        );
        self.converge(&host);
        // The gauges catch up within a second; the event should not wait.
        let state = self.host_state_word(&host, row.draining);
        if self.host_states.insert(host.clone(), state) != Some(state) {
            self.emit(format!("host {host} {state}"));
        }
        MessageResult(HelloAck::Accepted {
            heartbeat_secs: self.settings.heartbeat.as_secs().max(1),
        })
    }
}

impl Handler<Heartbeat> for Fleet {
    type Result = ();

    fn handle(&mut self, Heartbeat(mut facts): Heartbeat, _: &mut Self::Context) {
        let host = facts.host.clone();
        // Only VMs this report can concern: placed here or listed by it.
        let recent: BTreeMap<String, Option<String>> = self
            .usage
            .vms_on(&host)
            .chain(facts.vms.iter().map(|v| v.name.as_str()))
            .filter(|name| self.recently_touched(name))
            .map(|name| {
                (
                    name.to_string(),
                    self.usage.host_of(name).map(str::to_string),
                )
            })
            .collect();
        if let Some(h) = self.hosts.get_mut(&host) {
            facts.vms = overlay_recent(&host, &h.facts.vms, facts.vms, &recent);
            if h.facts.networks != facts.networks {
                h.networks = Arc::new(network_addresses(&facts.networks));
            }
            h.facts = facts;
            h.last_seen = Instant::now();
            self.converge(&host);
        }
    }
}

impl Handler<VmStopped> for Fleet {
    type Result = ();

    fn handle(&mut self, msg: VmStopped, _: &mut Self::Context) {
        tracing::info!(vm = %msg.name, host = %msg.host, reason = %msg.reason, "VM stopped");
        self.emit(format!(
            "vm {} stopped on {}: {}",
            msg.name, msg.host, msg.reason
        ));
        if let Some(h) = self.hosts.get_mut(&msg.host) {
            h.facts.vms.retain(|v| v.name != msg.name);
        }
        if !self.busy.contains(&msg.name) {
            if let Ok(Some(row)) = self.store.get(&msg.name) {
                if row.placement.as_deref() == Some(msg.host.as_str()) {
                    let _ = self.record_placement(&msg.name, None);
                }
            }
        }
    }
}

impl Handler<Disconnected> for Fleet {
    type Result = ();

    fn handle(&mut self, msg: Disconnected, _: &mut Self::Context) {
        if let Some(h) = self.hosts.get_mut(&msg.host) {
            if h.conn
                .as_ref()
                .is_some_and(|c| c.stable_id() == msg.stable_id)
            {
                tracing::warn!(host = %msg.host, "host disconnected; its VMs are not moved (no fencing)");
                h.conn = None;
            }
        }
        self.publish_gauges();
    }
}

impl Handler<OperatorCall> for Fleet {
    type Result = ResponseActFuture<Self, OperatorResponse>;

    fn handle(&mut self, call: OperatorCall, _: &mut Self::Context) -> Self::Result {
        tracing::debug!(operator = %call.operator, request = ?call.request, "operator request");
        match call.request {
            OperatorRequest::Define { xml, source } => reply(self.define(xml, source)),
            OperatorRequest::Undefine { name } => reply(match self.store.get(&name) {
                Ok(Some(r)) if r.placement.is_some() => OperatorResponse::Error(format!(
                    "Requested operation is not valid: domain '{name}' is running; stop it first"
                )),
                _ => match self.store.undefine(&name) {
                    Ok(()) => OperatorResponse::Done(format!("Domain '{name}' has been undefined")),
                    Err(e) => OperatorResponse::Error(e.to_string()),
                },
            }),
            OperatorRequest::List { all } => reply(match self.store.list() {
                Ok(rows) => OperatorResponse::Vms(
                    rows.iter()
                        .map(|r| {
                            let (state, host) = self.vm_state(r);
                            VmListEntry {
                                name: r.name.clone(),
                                uuid: r.uuid.clone(),
                                state,
                                host,
                                generation: r.generation,
                            }
                        })
                        .filter(|e| all || e.state != "shut off")
                        .collect(),
                ),
                Err(e) => OperatorResponse::Error(e.to_string()),
            }),
            OperatorRequest::DumpXml { name, live: false } => reply(match self.vm_row(&name) {
                Ok(r) => OperatorResponse::Xml(r.xml),
                Err(e) => OperatorResponse::Error(e),
            }),
            OperatorRequest::DumpXml { name, live: true } => match self.placed_host(&name) {
                Err(e) => reply(OperatorResponse::Error(e)),
                Ok(h) => self.ask_agent(h, AgentRequest::DumpXml { name }, |_, r| match r {
                    AgentResponse::Xml(x) => OperatorResponse::Xml(x),
                    other => OperatorResponse::Error(format!("unexpected answer {other:?}")),
                }),
            },
            OperatorRequest::Start { name, host } => self.start(name, host),
            OperatorRequest::Shutdown { name, timeout_secs } => {
                self.stop(name.clone(), AgentRequest::Shutdown { name, timeout_secs })
            }
            OperatorRequest::Destroy { name } => {
                self.stop(name.clone(), AgentRequest::Destroy { name })
            }
            OperatorRequest::DomDisplay { name } => match self.placed_host(&name) {
                Err(e) => reply(OperatorResponse::Error(e)),
                Ok(h) => self.ask_agent(h, AgentRequest::DomDisplay { name }, |host, r| match r {
                    AgentResponse::Consoles(consoles) => {
                        OperatorResponse::Consoles { host, consoles }
                    }
                    other => OperatorResponse::Error(format!("unexpected answer {other:?}")),
                }),
            },
            OperatorRequest::Hosts => {
                let entries = self
                    .host_rows
                    .values()
                    .map(|r| {
                        let live = self.hosts.get(&r.name);
                        HostEntry {
                            name: r.name.clone(),
                            state: self.host_state_word(&r.name, r.draining).to_string(),
                            cpus: live.map_or(r.cpus, |h| h.facts.cpus),
                            memory_mib: live.map_or(r.memory_mib, |h| h.facts.memory_mib),
                            vms: live.map_or(0, |h| h.facts.vms.len() as u32),
                            last_seen_secs: live
                                .map_or(u64::MAX, |h| h.last_seen.elapsed().as_secs()),
                        }
                    })
                    .collect();
                reply(OperatorResponse::Hosts(entries))
            }
            OperatorRequest::Migrate { .. } => reply(OperatorResponse::Error(
                "migrations stream progress; send them as MigrateCall".into(),
            )),
            OperatorRequest::MigrateAbort { name } => reply(match self.migrations.get(&name) {
                Some(tx) => {
                    let _ = tx.send("aborted by operator".into());
                    OperatorResponse::Done(format!("abort of the migration of '{name}' requested"))
                }
                None => OperatorResponse::Error(format!("no migration of '{name}' is in progress")),
            }),
            OperatorRequest::Events { .. } => reply(OperatorResponse::Error(
                "events stream notes; send them as EventsCall".into(),
            )),
            OperatorRequest::HostDrain { .. } => reply(OperatorResponse::Error(
                "drains stream notes; send them as DrainCall".into(),
            )),
            OperatorRequest::HostUndrain { host } => reply(match self.set_draining(&host, false) {
                Ok(()) => {
                    tracing::info!(host = %host, "undrained");
                    OperatorResponse::Done(format!("host {host} accepts VMs again"))
                }
                Err(e) => OperatorResponse::Error(e),
            }),
            OperatorRequest::NetList { host } => {
                self.ask_agent(host, AgentRequest::NetList, |host, r| match r {
                    AgentResponse::Networks { networks, .. } => {
                        OperatorResponse::Networks { host, networks }
                    }
                    other => OperatorResponse::Error(format!("unexpected answer {other:?}")),
                })
            }
        }
    }
}

/// An operator's drain request, with a sink for per-VM notes.
#[derive(Message)]
#[rtype(result = "OperatorResponse")]
pub struct DrainCall {
    /// The operator's certificate name, for the log.
    pub operator: String,
    /// The host to empty.
    pub host: String,
    /// Migrations at once.
    pub parallel: u32,
    /// Per-VM progress lines.
    pub notes: tokio::sync::mpsc::UnboundedSender<String>,
}

impl Fleet {
    fn set_draining(&mut self, host: &str, draining: bool) -> Result<(), String> {
        let mut row = self
            .host_rows
            .get(host)
            .cloned()
            .ok_or_else(|| format!("host '{host}' is not known"))?;
        row.draining = draining;
        self.store.put_host(&row, true).map_err(|e| e.to_string())?;
        self.host_rows.insert(host.to_string(), row);
        Ok(())
    }
}

impl Handler<DrainCall> for Fleet {
    type Result = ResponseActFuture<Self, OperatorResponse>;

    fn handle(&mut self, call: DrainCall, ctx: &mut Self::Context) -> Self::Result {
        let host = call.host.clone();
        if let Err(e) = self.set_draining(&host, true) {
            return reply(OperatorResponse::Error(e));
        }
        tracing::info!(host = %host, operator = %call.operator, "draining");
        let vms: Vec<String> = self
            .store
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.placement.as_deref() == Some(host.as_str()))
            .map(|r| r.name)
            .collect();
        let fleet = ctx.address();
        let parallel = call.parallel.max(1) as usize;
        let notes = call.notes;
        let operator = call.operator;
        Box::pin(
            async move {
                let (mut moved, mut failed) = (Vec::new(), Vec::new());
                for batch in vms.chunks(parallel) {
                    let runs = batch.iter().map(|vm| {
                        let _ = notes.send(format!("{vm}: migrating off {host}"));
                        let (progress, _) = tokio::sync::mpsc::unbounded_channel();
                        fleet.send(MigrateCall {
                            operator: operator.clone(),
                            request: OperatorRequest::Migrate {
                                name: vm.clone(),
                                to: None,
                                max_downtime_ms: None,
                                bandwidth_mib_s: None,
                                auto_converge: true,
                                postcopy: false,
                                timeout_secs: Some(600),
                            },
                            progress,
                        })
                    });
                    let results = futures_util::future::join_all(runs).await;
                    for (vm, result) in batch.iter().zip(results) {
                        let line = match result {
                            Ok(OperatorResponse::Migrated {
                                on,
                                outcome,
                                elapsed_ms,
                                ..
                            }) if outcome == "completed" => {
                                let l = format!(
                                    "{vm}: now on {on} ({:.2}s)",
                                    elapsed_ms as f64 / 1000.0
                                );
                                moved.push((vm.clone(), on));
                                l
                            }
                            Ok(OperatorResponse::Migrated { outcome, .. }) => {
                                failed.push((vm.clone(), outcome.clone()));
                                format!("{vm}: could not move: {outcome}")
                            }
                            Ok(OperatorResponse::Error(e)) => {
                                failed.push((vm.clone(), e.clone()));
                                format!("{vm}: could not move: {e}")
                            }
                            Ok(other) => {
                                failed.push((vm.clone(), format!("{other:?}")));
                                format!("{vm}: could not move: {other:?}")
                            }
                            Err(e) => {
                                failed.push((vm.clone(), e.to_string()));
                                format!("{vm}: could not move: {e}")
                            }
                        };
                        let _ = notes.send(line);
                    }
                }
                OperatorResponse::Drained {
                    host,
                    moved,
                    failed,
                }
            }
            .into_actor(self),
        )
    }
}

impl Handler<MigrateCall> for Fleet {
    type Result = ResponseActFuture<Self, OperatorResponse>;

    fn handle(&mut self, call: MigrateCall, ctx: &mut Self::Context) -> Self::Result {
        match self.migrate(call, ctx.address()) {
            Ok(fut) => fut,
            Err(e) => reply(OperatorResponse::Error(e)),
        }
    }
}

/// A line for the event log from outside the actor.
#[derive(Message)]
#[rtype(result = "()")]
struct EventLine(String);

impl Handler<EventLine> for Fleet {
    type Result = ();

    fn handle(&mut self, line: EventLine, _: &mut Self::Context) {
        self.emit(line.0);
    }
}

/// Passes every progress sample to the operator and a sampled few to the event log.
///
/// The task ends once the sender is dropped and every line it logged has been
/// handled, so awaiting it before the outcome line keeps the log in order.
fn progress_tee(
    name: String,
    operator: tokio::sync::mpsc::UnboundedSender<MigrationProgress>,
    fleet: Addr<Fleet>,
) -> (
    tokio::sync::mpsc::UnboundedSender<MigrationProgress>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<MigrationProgress>();
    let task = actix::spawn(async move {
        let mut sampler = crate::events::ProgressSampler::default();
        while let Some(p) = rx.recv().await {
            if sampler.should_log(Instant::now(), &p.status) {
                let line = crate::events::migration_progress_line(&name, &p);
                let _ = fleet.send(EventLine(line)).await;
            }
            // A gone operator (Ctrl-C'd CLI, drain stream) must not stop the log.
            let _ = operator.send(p);
        }
    });
    (tx, task)
}

impl Handler<EventsCall> for Fleet {
    type Result = ();

    fn handle(&mut self, call: EventsCall, _: &mut Self::Context) {
        self.events.subscribe(call.sink, call.follow);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store whose every read fails, as a damaged database would.
    struct Unreadable;

    fn broken<T>() -> Result<T, StoreError> {
        Err(StoreError::Backend("unreadable".into()))
    }

    impl Store for Unreadable {
        fn define(&self, _: NewDefinition) -> Result<VmRow, StoreError> {
            broken()
        }
        fn undefine(&self, _: &str) -> Result<(), StoreError> {
            broken()
        }
        fn get(&self, _: &str) -> Result<Option<VmRow>, StoreError> {
            broken()
        }
        fn list(&self) -> Result<Vec<VmRow>, StoreError> {
            broken()
        }
        fn set_placement(&self, _: &str, _: Option<String>, _: bool) -> Result<VmRow, StoreError> {
            broken()
        }
        fn put_host(&self, _: &HostRow, _: bool) -> Result<(), StoreError> {
            broken()
        }
        fn get_host(&self, _: &str) -> Result<Option<HostRow>, StoreError> {
            broken()
        }
        fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
            broken()
        }
    }

    #[test]
    fn a_store_that_cannot_be_read_refuses_the_start() {
        let settings = FleetSettings {
            heartbeat: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            policy: Policy::default(),
        };
        // Empty mirrors would overcommit hosts and undrain drained ones.
        match Fleet::new(Arc::new(Unreadable), settings) {
            Err(e) => assert_eq!(e.to_string(), "store: unreadable"),
            Ok(_) => panic!("a fleet started over an unreadable store"),
        }
    }
}
