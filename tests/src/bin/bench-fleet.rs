//! Fleet-scale benchmarks: the pure scheduler, the coordinator under many
//! simulated agents (fan-in), and fleet-wide start throughput.
//!
//! Simulated agents are real QUIC clients with real agent certificates, in one
//! process, over loopback inside a namespace of their own: they register,
//! heartbeat every second and acknowledge starts without running QEMU. The
//! coordinator is the real binary in its own process, so its CPU and RSS are
//! its own.
//!
//! Run as root after `cargo build --release --workspace --bins`:
//!
//! ```text
//! target/release/bench-fleet scheduler [VMS]
//! target/release/bench-fleet fanin [N ...] [etcd]
//! target/release/bench-fleet fleet-start [VMS] [AGENTS] [etcd]
//! ```
//!
//! With `etcd`, the coordinator keeps its state in a three-member etcd
//! (`--store etcd`, as `flotilla_tests::control_plane` runs it) instead of
//! its embedded redb.
//!
//! Each prints a markdown table.

#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_coordinator::host_index::HostIndex;
use flotilla_coordinator::scheduler::{self, HostSnapshot, Policy, VmNeeds};
use flotilla_shared::net::{pki, quic, tls};
use flotilla_shared::proto::FrameError;
use flotilla_shared::proto::{
    AgentEvent, AgentHello, AgentReply, AgentRequest, AgentResponse, ClientMessage, FenceReport,
    HelloAck, HostFacts, NetStatus, OperatorError, OperatorRequest, OperatorResponse,
    ServerMessage, VmRunState, VmSummary,
};
use flotilla_shared::report_delta::ReportSender;
use flotilla_tests::control_plane::ControlPlane;
use flotilla_tests::{
    cpu_seconds, flotilla, quantile, rss_mib, wait_until, CoordinatorProcess, Netns,
};

const NETWORKS: [&str; 5] = ["public", "storage", "backup", "tenant-a", "tenant-b"];

/// Where the coordinator keeps its state.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Redb,
    Etcd,
}

impl Backend {
    fn label(self) -> &'static str {
        match self {
            Backend::Redb => "redb",
            Backend::Etcd => "etcd (3 members)",
        }
    }
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let backend = if args.iter().any(|a| a == "etcd") {
        args.retain(|a| a != "etcd");
        Backend::Etcd
    } else {
        Backend::Redb
    };
    let num =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    match args.first().map(String::as_str) {
        Some("scheduler") => scheduler_bench(num(1, 100_000)),
        Some("fanin") => {
            let ns: Vec<usize> = args[1..].iter().filter_map(|a| a.parse().ok()).collect();
            fanin_bench(
                if ns.is_empty() {
                    vec![100, 1000, 5000]
                } else {
                    ns
                },
                backend,
            );
        }
        Some("fleet-start") => fleet_start_bench(num(1, 10_000), num(2, 1000), backend),
        _ => {
            eprintln!(
                "usage: bench-fleet scheduler [VMS] | fanin [N ...] [etcd] | fleet-start [VMS] [AGENTS] [etcd]"
            );
            std::process::exit(2);
        }
    }
}

// ------------------------------------------------------------------ scheduler

/// A deterministic pseudo-random sequence, so every run places the same VMs.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

/// The bench's synthetic fleet: every host defines all five networks; one in
/// ten has `tenant-b` unresolvable and one in a hundred is not connected, so
/// filters have work to do. Sized so 100,000 VMs fit on 1,000 hosts (about
/// 375 vCPUs and 310 GiB each): failures would time the slow path instead.
fn synthetic_fleet(hosts: usize) -> Vec<HostSnapshot> {
    (0..hosts)
        .map(|i| {
            let networks: BTreeMap<String, Result<String, String>> = NETWORKS
                .iter()
                .enumerate()
                .map(|(n, name)| {
                    let v = if n == 4 && i % 10 == 0 {
                        Err("device 'br4' has no address".to_string())
                    } else {
                        Ok(format!("198.18.{}.{}", n, i % 250 + 1))
                    };
                    (name.to_string(), v)
                })
                .collect();
            HostSnapshot {
                name: format!("host-{i:05}"),
                connected: i % 100 != 99,
                draining: false,
                cpus: 128,
                memory_mib: 512 * 1024,
                used_memory_mib: 0,
                used_vcpus: 0,
                networks: Arc::new(networks),
                nic_blocked: Arc::default(),
                machine_types: Arc::default(),
            }
        })
        .collect()
}

/// The same VMs every run.
fn synthetic_vms(vms: usize) -> Vec<VmNeeds> {
    let mut rng = Lcg(42);
    let sizes = [512u64, 1024, 2048, 4096, 8192];
    (0..vms)
        .map(|v| VmNeeds {
            name: format!("vm-{v}"),
            memory_mib: sizes[(rng.next() % 5) as usize],
            vcpus: 1 << (rng.next() % 4),
            networks: (0..1 + rng.next() % 2)
                .map(|_| NETWORKS[(rng.next() % 5) as usize].to_string())
                .collect(),
            nic_networks: Vec::new(),
            machine: None,
            cpu: Default::default(),
        })
        .collect()
}

/// Places `vms` one by one, each placement charged to its host before the
/// next decision, as the coordinator does. Returns the row's figures and
/// the hosts chosen.
fn place_all(
    vms: &[VmNeeds],
    mut decide: impl FnMut(&VmNeeds) -> Option<String>,
) -> (f64, Vec<f64>, Vec<Option<String>>) {
    let mut micros = Vec::with_capacity(vms.len());
    let mut chosen = Vec::with_capacity(vms.len());
    let all = Instant::now();
    for needs in vms {
        let t = Instant::now();
        let host = decide(needs);
        micros.push(t.elapsed().as_secs_f64() * 1e6);
        chosen.push(host);
    }
    (
        vms.len() as f64 / all.elapsed().as_secs_f64(),
        micros,
        chosen,
    )
}

fn scheduler_bench(vms: usize) {
    println!("| hosts | scheduler | VMs placed | placements/s | p50 µs | p99 µs | unplaced |");
    println!("|---|---|---|---|---|---|---|");
    let policy = Policy::default();
    for hosts in [1_000usize, 10_000] {
        // The scan is the reference the index must agree with; at 10,000
        // hosts it gets a tenth of the VMs, or this row alone takes a minute.
        let scanned = if hosts > 1_000 { vms / 10 } else { vms };
        let needs = synthetic_vms(vms);
        let mut fleet = synthetic_fleet(hosts);
        let position: BTreeMap<String, usize> = fleet
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.clone(), i))
            .collect();
        let (rate, micros, by_scan) = place_all(&needs[..scanned], |vm| {
            let d = scheduler::place(vm, &fleet, &policy).ok()?;
            let h = &mut fleet[position[&d.host]];
            h.used_memory_mib += vm.memory_mib;
            h.used_vcpus += vm.vcpus;
            Some(d.host)
        });
        row(hosts, "scan (reference)", scanned, rate, &micros, &by_scan);

        let mut index = HostIndex::new(policy.clone());
        for h in synthetic_fleet(hosts) {
            index.upsert(h);
        }
        let (rate, micros, by_index) = place_all(&needs, |vm| {
            let d = index.place(vm, &[]).ok()?;
            let mut h = index.get(&d.host)?.clone();
            h.used_memory_mib += vm.memory_mib;
            h.used_vcpus += vm.vcpus;
            index.upsert(h);
            Some(d.host)
        });
        assert_eq!(
            by_index[..scanned],
            by_scan[..],
            "the index chose differently from the scan"
        );
        row(hosts, "index", vms, rate, &micros, &by_index);
    }
}

fn row(
    hosts: usize,
    which: &str,
    vms: usize,
    rate: f64,
    micros: &[f64],
    chosen: &[Option<String>],
) {
    println!(
        "| {hosts} | {which} | {vms} | {rate:.0} | {:.1} | {:.1} | {} |",
        quantile(micros, 0.5),
        quantile(micros, 0.99),
        chosen.iter().filter(|c| c.is_none()).count()
    );
}

// ----------------------------------------------------------- simulated agents

/// Heartbeat round trips and answered requests, shared by all simulated agents.
#[derive(Default)]
struct Stats {
    heartbeat_ms: Mutex<Vec<(Instant, f64)>>,
    failures: Mutex<Vec<String>>,
    /// Registrations whose connection was lost and redialled, as a real
    /// agent does; counted, since on this machine they mean overload.
    redials: std::sync::atomic::AtomicUsize,
}

/// A test fleet: a coordinator in a namespace and a client endpoint in it.
struct Bench {
    /// The namespace, and with etcd the members in it.
    place: Place,
    coordinator: CoordinatorProcess,
    addr: SocketAddr,
    tls: std::path::PathBuf,
    endpoint: quinn::Endpoint,
    _work: tempfile::TempDir,
}

/// Where the coordinator runs.
enum Place {
    Alone(Netns),
    OnEtcd(ControlPlane),
}

impl Bench {
    fn ns(&self) -> &Netns {
        match &self.place {
            Place::Alone(ns) => ns,
            Place::OnEtcd(cp) => &cp.ns,
        }
    }

    fn new(agents: usize, rt: &tokio::runtime::Runtime, backend: Backend) -> Bench {
        let work = tempfile::Builder::new()
            .permissions(
                <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
            )
            .prefix("flt-bench-fleet-")
            .tempdir_in("/tmp")
            .expect("tmp");
        let tls = work.path().join("tls");
        pki::init(&tls, "admin", &[]).expect("certs init");
        for i in 0..agents {
            pki::issue(&tls, pki::Role::Agent, &sim_name(i), &[]).expect("issue");
        }
        let (place, addr, store_args): (Place, SocketAddr, Vec<String>) = match backend {
            Backend::Redb => (
                Place::Alone(Netns::new("bfleet")),
                "127.0.0.1:7443".parse().expect("addr"),
                Vec::new(),
            ),
            Backend::Etcd => {
                let cp = ControlPlane::etcd_only("bfleetetcd", &[]);
                let endpoints = cp.endpoints();
                let (cert, key) = cp.etcd_cert(0);
                let args = vec![
                    "--store".into(),
                    "etcd".into(),
                    "--etcd-endpoints".into(),
                    endpoints,
                    "--etcd-ca".into(),
                    cp.tls.join("ca.pem").display().to_string(),
                    "--etcd-cert".into(),
                    cert.display().to_string(),
                    "--etcd-key".into(),
                    key.display().to_string(),
                ];
                (
                    Place::OnEtcd(cp),
                    "198.18.9.1:7443".parse().expect("addr"),
                    args,
                )
            }
        };
        let mut flags: Vec<&str> = vec![
            "--heartbeat-secs",
            "1",
            "--lease-secs",
            "8",
            "--heartbeat-timeout-secs",
            "10",
        ];
        flags.extend(store_args.iter().map(String::as_str));
        let ns = match &place {
            Place::Alone(ns) => ns,
            Place::OnEtcd(cp) => &cp.ns,
        };
        let coordinator = CoordinatorProcess::start_with(
            ns,
            &addr.to_string(),
            &work.path().join("data"),
            &tls,
            &work.path().join("coordinator.log"),
            &flags,
        );
        if backend == Backend::Etcd {
            // Answering is not leading: agents register only with the leader.
            let leads = wait_until(Duration::from_secs(30), || {
                String::from_utf8_lossy(
                    &flotilla(ns, &addr.to_string(), &tls, &["--json", "cluster"]).stdout,
                )
                .contains("\"leader\": true")
            });
            assert!(leads, "the coordinator never led");
        }
        // The socket is made inside the namespace, so all its traffic stays there.
        // One socket for every simulated agent: it needs the buffers the
        // coordinator's has.
        let local: SocketAddr = SocketAddr::new(addr.ip(), 0);
        let socket = ns.run(move || quic::fan_in_socket(local).expect("bind"));
        let endpoint = {
            let _guard = rt.enter();
            quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                Arc::new(quinn::TokioRuntime),
            )
            .expect("endpoint")
        };
        Bench {
            place,
            coordinator,
            addr,
            tls,
            endpoint,
            _work: work,
        }
    }

    async fn connect(&self, role: pki::Role, name: &str) -> Result<quinn::Connection, String> {
        let config = tls::client_config(&self.tls, role, name).expect("client config");
        self.endpoint
            .connect_with(config, self.addr, pki::COORDINATOR_NAME)
            .expect("connect")
            .await
            .map_err(|e| format!("handshake: {e}"))
    }

    fn pid(&self) -> u32 {
        self.coordinator.child.id()
    }
}

fn sim_name(i: usize) -> String {
    format!("sim-{i:05}")
}

fn sim_facts(name: &str, i: usize, vms: Vec<VmSummary>) -> HostFacts {
    HostFacts {
        host: name.to_string(),
        cpus: 64,
        memory_mib: 512 * 1024,
        networks: NETWORKS
            .iter()
            .enumerate()
            .map(|(n, net)| NetStatus {
                name: net.to_string(),
                mode: "bridge".to_string(),
                device: Some(format!("br{n}")),
                address: Some(format!("198.18.{n}.{}", i % 250 + 1)),
                error: None,
                attach_error: None,
            })
            .collect(),
        vms,
        machine_types: Default::default(),
        // A keeper, as every real agent in a fleet runs one.
        fence: FenceReport {
            keeper: true,
            watchdog_secs: None,
        },
    }
}

/// The text of the first `<tag>` in `xml`, enough to answer a start.
fn element_text(xml: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    xml.split_once(&open)
        .and_then(|(_, rest)| rest.split_once('<'))
        .map(|(text, _)| text.to_string())
        .unwrap_or_default()
}

/// Handshakes the simulated fleet allows in flight at once.
static HANDSHAKES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(64);

/// Registers, heartbeats every `interval`, and acknowledges starts and stops.
async fn sim_agent(
    bench: Arc<Bench>,
    i: usize,
    stats: Arc<Stats>,
    registered: tokio::sync::mpsc::UnboundedSender<()>,
) {
    let name = sim_name(i);
    let vms: Arc<Mutex<Vec<VmSummary>>> = Arc::default();
    let (conn, mut reports, hello) = loop {
        // At most HANDSHAKES in flight: a thousand simultaneous Initial
        // packets overflow a default UDP receive buffer and cost a
        // one-second retransmit.
        let permit = HANDSHAKES.acquire().await;
        let conn = match bench.connect(pki::Role::Agent, &name).await {
            Ok(c) => c,
            // An overloaded coordinator is a result, not a crash of the bench.
            Err(e) => {
                stats
                    .failures
                    .lock()
                    .expect("lock")
                    .push(format!("{name}: {e}"));
                return;
            }
        };
        drop(permit);
        let registration = sim_facts(&name, i, Vec::new());
        // Heartbeats are deltas against the last acknowledged report, as
        // the real agent sends them.
        let reports = ReportSender::registered(&registration);
        match quic::call::<_, ServerMessage>(
            &conn,
            &ClientMessage::Hello(AgentHello::Register(registration)),
            Duration::from_secs(60),
        )
        .await
        {
            Ok(m) => break (conn, reports, m),
            // A lost connection is redialled, as the real agent does.
            Err(FrameError::Stream(_))
                if stats.redials.load(std::sync::atomic::Ordering::Relaxed) < 100 =>
            {
                stats
                    .redials
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => {
                stats
                    .failures
                    .lock()
                    .expect("lock")
                    .push(format!("{name}: register: {e}"));
                return;
            }
        }
    };
    let interval = match hello {
        ServerMessage::Hello(HelloAck::Accepted { heartbeat_secs, .. }) => {
            Duration::from_secs(heartbeat_secs.max(1))
        }
        other => {
            stats
                .failures
                .lock()
                .expect("lock")
                .push(format!("{name}: {other:?}"));
            return;
        }
    };
    let _ = registered.send(());
    let mut tick = tokio::time::interval(interval);
    // One sequence per connection, as the real agent numbers reports and replies.
    let seq = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Spread the heartbeats over the interval, as independent hosts would be.
    tokio::time::sleep(interval.mul_f64((i % 1000) as f64 / 1000.0)).await;
    loop {
        tokio::select! {
            bi = conn.accept_bi() => {
                let Ok((mut send, mut recv)) = bi else { return };
                let vms = vms.clone();
                let seq = seq.clone();
                tokio::spawn(async move {
                    let Ok(req) = quic::read_frame::<AgentRequest>(&mut recv).await else { return };
                    let answer = match req {
                        AgentRequest::Start { xml, incarnation, .. } => {
                            let vm = VmSummary {
                                suspended: false,
                                name: element_text(&xml, "name"),
                                uuid: element_text(&xml, "uuid"),
                                pid: 0,
                                state: VmRunState::Running,
                                consoles: Vec::new(),
                                incarnation,
                                ha: false,
                            };
                            vms.lock().expect("lock").push(vm.clone());
                            AgentResponse::Started { vm, live_xml: xml, warnings: Vec::new() }
                        }
                        AgentRequest::Destroy { name } | AgentRequest::Shutdown { name, .. } => {
                            vms.lock().expect("lock").retain(|v| v.name != name);
                            AgentResponse::Done(format!("Domain '{name}' destroyed"))
                        }
                        other => AgentResponse::Error(format!("simulated agent: {other:?} not simulated")),
                    };
                    let answer = AgentReply {
                        seq: seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1,
                        response: answer,
                    };
                    let _ = quic::write_frame(&mut send, &answer).await;
                    let _ = send.finish();
                    let _ = send.stopped().await;
                });
            }
            _ = tick.tick() => {
                let seq = seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                let report = reports.report(seq, sim_facts(&name, i, vms.lock().expect("lock").clone()));
                let t = Instant::now();
                let ack: Result<ServerMessage, _> = quic::call(
                    &conn,
                    &ClientMessage::Event(AgentEvent::Heartbeat { seq, report }),
                    Duration::from_secs(30),
                ).await;
                if matches!(ack, Ok(ServerMessage::Ack)) {
                    reports.acked();
                }
                match ack {
                    Ok(ServerMessage::Ack) => stats
                        .heartbeat_ms
                        .lock()
                        .expect("lock")
                        .push((Instant::now(), t.elapsed().as_secs_f64() * 1000.0)),
                    Ok(other) => stats.failures.lock().expect("lock").push(format!("{name}: {other:?}")),
                    Err(e) => {
                        stats.failures.lock().expect("lock").push(format!("{name}: heartbeat: {e}"));
                        return;
                    }
                }
            }
        }
    }
}

/// Starts `n` simulated agents and waits until all registered.
fn start_agents(
    bench: &Arc<Bench>,
    rt: &tokio::runtime::Runtime,
    n: usize,
    stats: &Arc<Stats>,
) -> Duration {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let t = Instant::now();
    for i in 0..n {
        rt.spawn(sim_agent(bench.clone(), i, stats.clone(), tx.clone()));
    }
    drop(tx);
    rt.block_on(async {
        let mut got = 0;
        while got < n {
            match tokio::time::timeout(Duration::from_secs(120), rx.recv()).await {
                Ok(Some(())) => got += 1,
                _ => break,
            }
        }
        assert_eq!(
            got,
            n,
            "only {got} of {n} agents registered: {:?}",
            stats.failures.lock().expect("lock").first()
        );
    });
    t.elapsed()
}

fn probe_xml(name: &str) -> String {
    format!(
        "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
         <graphics type='vnc'><listen type='network' network='public'/></graphics>\
         </devices></domain>"
    )
}

fn fanin_bench(sizes: Vec<usize>, backend: Backend) {
    println!("| store | agents | register all s | coordinator CPU % | coordinator RSS MiB | heartbeat p50 ms | p99 ms | `flotilla start` median ms (range) | redials | errors |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("rt");
        let bench = Arc::new(Bench::new(n, &rt, backend));
        let stats = Arc::new(Stats::default());
        let registering = start_agents(&bench, &rt, n, &stats);
        // Let heartbeats settle into their spread, then measure a window.
        std::thread::sleep(Duration::from_secs(3));
        let pid = bench.pid();
        let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
        std::thread::sleep(Duration::from_secs(10));
        let cpu_pct = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
        let rss = rss_mib(pid);
        let beats: Vec<f64> = stats
            .heartbeat_ms
            .lock()
            .expect("lock")
            .iter()
            .filter(|(at, _)| *at >= t0)
            .map(|(_, ms)| *ms)
            .collect();
        // One operator start while the fleet heartbeats.
        let xml = bench._work.path().join("probe.xml");
        std::fs::write(&xml, probe_xml("probe")).expect("xml");
        // An operator who cannot get through counts as an error of the row,
        // not a crash of the bench: an overloaded coordinator is a result.
        let ask = |args: &[&str]| {
            let mut with = vec!["--connect-timeout-secs", "10"];
            with.extend_from_slice(args);
            let o = flotilla(bench.ns(), &bench.addr.to_string(), &bench.tls, &with);
            if !o.status.success() {
                stats.failures.lock().expect("lock").push(format!(
                    "operator {args:?}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
            o.status.success()
        };
        let mut starts = Vec::new();
        if ask(&["define", &xml.to_string_lossy()]) {
            for _ in 0..5 {
                let t = Instant::now();
                if !ask(&["start", "probe"]) {
                    break;
                }
                starts.push(t.elapsed().as_secs_f64() * 1000.0);
                if !ask(&["destroy", "probe"]) {
                    break;
                }
            }
        }
        if let Some(e) = stats.failures.lock().expect("lock").first() {
            eprintln!("{n} agents: first error: {e}");
        }
        let min = starts.iter().copied().fold(f64::INFINITY, f64::min);
        let max = starts.iter().copied().fold(0.0, f64::max);
        let errors = stats.failures.lock().expect("lock").len();
        let redials = stats.redials.load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "| {} | {n} | {:.1} | {cpu_pct:.1} | {rss:.0} | {:.1} | {:.1} | {:.0} ({min:.0}–{max:.0}) | {redials} | {errors} |",
            backend.label(),
            registering.as_secs_f64(),
            quantile(&beats, 0.5),
            quantile(&beats, 0.99),
            quantile(&starts, 0.5),
        );
        rt.shutdown_timeout(Duration::from_secs(1));
    }
}

async fn operator(conn: &quinn::Connection, request: OperatorRequest) -> OperatorResponse {
    match quic::call::<_, ServerMessage>(
        conn,
        &ClientMessage::Operator(request),
        Duration::from_secs(120),
    )
    .await
    {
        Ok(ServerMessage::Operator(r)) => r,
        Ok(other) => OperatorResponse::Error(OperatorError::UnexpectedAnswer(format!("{other:?}"))),
        Err(e) => OperatorResponse::Error(OperatorError::Unavailable(e.to_string())),
    }
}

/// Runs `requests` over `conn` with at most `in_flight` outstanding; returns
/// each request's latency in ms and the errors.
fn run_all(
    rt: &tokio::runtime::Runtime,
    conn: &quinn::Connection,
    requests: Vec<OperatorRequest>,
    in_flight: usize,
) -> (Vec<f64>, Vec<String>) {
    rt.block_on(async {
        use futures_util::StreamExt as _;
        let results: Vec<(f64, Option<String>)> = futures_util::stream::iter(requests)
            .map(|r| async move {
                let t = Instant::now();
                let answer = operator(conn, r).await;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                match answer {
                    OperatorResponse::Error(e) => (ms, Some(e.to_string())),
                    _ => (ms, None),
                }
            })
            .buffer_unordered(in_flight)
            .collect()
            .await;
        let errors = results.iter().filter_map(|(_, e)| e.clone()).collect();
        (results.into_iter().map(|(ms, _)| ms).collect(), errors)
    })
}

fn fleet_start_bench(vms: usize, agents: usize, backend: Backend) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("rt");
    let bench = Arc::new(Bench::new(agents, &rt, backend));
    let stats = Arc::new(Stats::default());
    start_agents(&bench, &rt, agents, &stats);
    let conn = rt
        .block_on(bench.connect(pki::Role::Operator, "admin"))
        .expect("operator connection");
    let defines = (0..vms)
        .map(|v| OperatorRequest::Define {
            xml: probe_xml(&format!("vm-{v:05}")),
            source: format!("bench vm-{v:05}"),
        })
        .collect();
    let t = Instant::now();
    let (_, errors) = run_all(&rt, &conn, defines, 64);
    let define_s = t.elapsed().as_secs_f64();
    assert!(errors.is_empty(), "defines failed: {:?}", errors.first());
    let cpu0 = cpu_seconds(bench.pid());
    let starts = (0..vms)
        .map(|v| OperatorRequest::Start {
            name: format!("vm-{v:05}"),
            host: None,
        })
        .collect();
    let t = Instant::now();
    let (ms, errors) = run_all(&rt, &conn, starts, 64);
    let start_s = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds(bench.pid()) - cpu0;
    println!("| store | VMs | agents | define/s | start/s end to end | start p50 ms | p99 ms | coordinator CPU s | RSS MiB | errors |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {vms} | {agents} | {:.0} | {:.0} | {:.1} | {:.1} | {cpu:.1} | {:.0} | {} |",
        backend.label(),
        vms as f64 / define_s,
        vms as f64 / start_s,
        quantile(&ms, 0.5),
        quantile(&ms, 0.99),
        rss_mib(bench.pid()),
        errors.len()
    );
    if let Some(e) = errors.first() {
        eprintln!("first error: {e}");
    }
    rt.shutdown_timeout(Duration::from_secs(1));
}
