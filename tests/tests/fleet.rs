//! The coordinator and agents as operators run them: certificates, QUIC with
//! mutual TLS, host-independent definitions started on hosts that resolve
//! `public` differently, scheduling that explains itself, durable defines.

#![allow(clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use flotilla_tests::{
    bin, domain_xml, flotilla, listed_vm, new_uuid, output, qemu_pids_for, rfb_banner, wait_until,
    AgentDaemon, AgentDirs, CoordinatorProcess, Lines, Netns,
};

const COORD: &str = "198.19.0.1:7443";
const VNC_PUBLIC: &str =
    "<graphics type='vnc'><listen type='network' network='public'/></graphics>";

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn certs(dir: &Path, args: &[&str]) {
    let mut c = std::process::Command::new(bin("flotilla"));
    c.arg("certs").args(args).arg("--dir").arg(dir);
    let o = output(c);
    assert!(o.status.success(), "certs {args:?}: {}", text(&o));
}

/// The coordinator's namespace with a management bridge at 198.19.0.1.
fn control_plane() -> Netns {
    let ctl = Netns::new("ctl");
    ctl.bridge("fleet0", Some("198.19.0.1/24"));
    ctl
}

/// A coordinator on the management bridge with no hosts, for tests of what
/// it answers by itself.
struct LoneCoordinator {
    ctl: Netns,
    tls: PathBuf,
    _work: tempfile::TempDir,
    _coordinator: CoordinatorProcess,
}

impl LoneCoordinator {
    fn start(prefix: &str) -> Self {
        let work = tempfile::Builder::new()
            .permissions(
                <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
            )
            .prefix(prefix)
            .tempdir_in("/tmp")
            .expect("tmp");
        let tls = work.path().join("tls");
        certs(&tls, &["init"]);
        let ctl = control_plane();
        let coordinator = CoordinatorProcess::start(
            &ctl,
            COORD,
            &work.path().join("data"),
            &tls,
            &work.path().join("coordinator.log"),
        );
        LoneCoordinator {
            ctl,
            tls,
            _work: work,
            _coordinator: coordinator,
        }
    }
}

/// A host namespace on the management bridge at 198.19.0.`n`.
fn host(ctl: &Netns, n: u8) -> Netns {
    let h = Netns::new(&format!("h{n}"));
    ctl.veth_to(
        &format!("mg{n}"),
        None,
        Some("fleet0"),
        &h,
        "mgmt0",
        &format!("198.19.0.{n}/24"),
    );
    h
}

struct Fleet {
    ctl: Netns,
    hosts: Vec<(Netns, AgentDirs, String)>,
    tls: PathBuf,
    work: tempfile::TempDir,
    coordinator: CoordinatorProcess,
    agents: Vec<AgentDaemon>,
    /// Far ends of uplink veths: deleting a namespace deletes both ends.
    _peers: Vec<Netns>,
}

impl Fleet {
    fn cli(&self, args: &[&str]) -> Output {
        flotilla(&self.ctl, COORD, &self.tls, args)
    }

    /// The coordinator dies (kill -9) and starts again on the same store.
    fn restart_coordinator(&mut self) {
        self.coordinator.kill9();
        self.coordinator = CoordinatorProcess::start(
            &self.ctl,
            COORD,
            &self.work.path().join("data"),
            &self.tls,
            &self.work.path().join("coordinator.log"),
        );
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // A failing test's story is in the coordinator's log, which goes
        // with the work directory: show its end first.
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.work.path().join("coordinator.log"))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- coordinator log (last 60 lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// host-a: `public` is bridge br0 at 198.18.1.1; host-b: `public` is a
/// macvtap-style uplink at 198.18.2.1; host-c has no `public` at all.
fn fleet() -> Fleet {
    fleet_with(false, &[])
}

/// Like [`fleet`], with each host's `local` directory its own (a tmpfs in
/// the agent's private mount namespace): storage no other host sees, at
/// the same path everywhere.
fn fleet_with(private_local: bool, coordinator_args: &[&str]) -> Fleet {
    let work = tempfile::Builder::new()
        .permissions(<std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755))
        .prefix("flt-fleet-")
        .tempdir_in("/tmp")
        .expect("tmp");
    let tls = work.path().join("tls");
    certs(&tls, &["init"]);
    let local = work.path().join("local");
    std::fs::create_dir(&local).expect("local");
    let ctl = control_plane();
    let coordinator = CoordinatorProcess::start_with(
        &ctl,
        COORD,
        &work.path().join("data"),
        &tls,
        &work.path().join("coordinator.log"),
        &[&["--metrics-listen", "198.19.0.1:9464"], coordinator_args].concat(),
    );
    let mut hosts = Vec::new();
    let mut agents = Vec::new();
    let mut peers = Vec::new();
    let names = [(11u8, "host-a"), (12, "host-b"), (13, "host-c")];
    let spaces: Vec<Netns> = names.iter().map(|(n, _)| host(&ctl, *n)).collect();
    // No network for migrations and no --migration-network: the hosts
    // share only the management bridge, and each one's `public` is its own
    // (not routed between hosts), so migration streams must go where each
    // agent reaches the coordinator from, as libvirt goes by host name.
    for ((_, name), h) in names.into_iter().zip(spaces) {
        let mut c = std::process::Command::new(bin("flotilla"));
        c.args(["certs", "issue", "--agent", name])
            .arg("--dir")
            .arg(&tls);
        assert!(output(c).status.success());
        let dirs = AgentDirs::new();
        let mut extra = Vec::new();
        match name {
            "host-a" => {
                h.bridge("br0", Some("198.18.1.1/24"));
                dirs.network("public", "<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>");
            }
            "host-b" => {
                let peer = Netns::new("peer");
                h.veth_to(
                    "uplink0",
                    Some("198.18.2.1/24"),
                    None,
                    &peer,
                    "eth0",
                    "198.18.2.100/24",
                );
                peers.push(peer);
                dirs.network(
                    "public",
                    "<network><name>public</name><forward mode='bridge' dev='uplink0'/></network>",
                );
            }
            _ => dirs.network(
                "mgmt",
                "<network><name>mgmt</name><forward mode='bridge' dev='mgmt0'/></network>",
            ),
        }
        let tls_arg = tls.to_str().expect("utf8").to_string();
        extra.extend([
            "--coordinator".to_string(),
            COORD.to_string(),
            "--tls-dir".to_string(),
            tls_arg,
        ]);
        // Each agent serves metrics on its management address.
        extra.extend([
            "--metrics-listen".to_string(),
            format!("198.19.0.{}:9465", 11 + hosts.len()),
        ]);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        agents.push(match private_local {
            true => {
                let setup = format!("mount -t tmpfs tmpfs {}", local.display());
                AgentDaemon::start_with_private_mounts(&h, name, &dirs, &extra, &setup)
            }
            false => AgentDaemon::start(&h, name, &dirs, &extra),
        });
        hosts.push((h, dirs, name.to_string()));
    }
    let f = Fleet {
        ctl,
        hosts,
        tls,
        work,
        coordinator,
        agents,
        _peers: peers,
    };
    assert!(
        wait_until(Duration::from_secs(20), || {
            let o = f.cli(&["hosts"]);
            text(&o).matches(" connected ").count() == 3
        }),
        "hosts never all connected: {}",
        text(&f.cli(&["hosts"]))
    );
    f
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn one_definition_gets_each_hosts_own_console_address() {
    let f = fleet();
    let xml = f.work.path().join("web01.xml");
    // virt-install's shape: a NIC on network `public`, no MAC.
    let devices = format!(
        "{VNC_PUBLIC}<interface type='network'><source network='public'/>\
         <model type='virtio'/></interface>"
    );
    std::fs::write(&xml, domain_xml("web01", &new_uuid(), &devices)).expect("write");
    let o = f.cli(&["define", xml.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", text(&o));
    let stored = text(&f.cli(&["dumpxml", "web01"]));
    let mac = stored
        .split("<mac address=\"")
        .nth(1)
        .and_then(|r| r.get(..17))
        .unwrap_or_else(|| panic!("define stored no MAC: {stored}"))
        .to_string();
    assert!(mac.starts_with("52:54:00:"), "{mac}");
    // Defined with machine='pc': stored as the versioned type the hosts'
    // QEMU has behind that alias, as libvirt does.
    let versioned = stored
        .split("machine=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_default();
    assert!(versioned.starts_with("pc-i440fx-"), "{stored}");

    // host-a's `public` is bridge br0 (a tap), host-b's the uplink (a macvtap).
    for (host, addr, idx, dev) in [
        ("host-a", "198.18.1.1", 0usize, "vnet0"),
        ("host-b", "198.18.2.1", 1, "macvtap0"),
    ] {
        let o = f.cli(&["start", "web01", "--host", host]);
        assert!(o.status.success(), "start on {host}: {}", text(&o));
        let o = f.cli(&["domiflist", "web01"]);
        assert!(o.status.success(), "{}", text(&o));
        let row = String::from_utf8_lossy(&o.stdout)
            .lines()
            .nth(2)
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default();
        assert_eq!(
            row,
            [dev, "network", "public", "virtio", mac.as_str()],
            "{host}"
        );
        let o = f.cli(&["domdisplay", "web01"]);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).lines().next(),
            Some(format!("vnc://{addr}:5900  (unauthenticated)").as_str()),
            "{host}"
        );
        let a = ip(addr);
        let banner = f.hosts[idx]
            .0
            .run(move || rfb_banner(a, 5900))
            .expect("VNC");
        assert!(banner.starts_with("RFB 003.00"), "{banner:?}");
        let stored = f.cli(&["dumpxml", "web01"]);
        assert!(
            !text(&stored).contains("198.18"),
            "dumpxml leaks an address: {}",
            text(&stored)
        );
        assert!(
            text(&stored).contains("network=\"public\""),
            "{}",
            text(&stored)
        );
        let live = f.cli(&["dumpxml", "web01", "--live"]);
        assert!(
            text(&live).contains(&format!("address=\"{addr}\"")),
            "{}",
            text(&live)
        );
        let o = f.cli(&["destroy", "web01"]);
        assert!(o.status.success(), "{}", text(&o));
    }

    // Without --host the scheduler never picks host-c, which lacks `public`.
    for _ in 0..3 {
        let o = f.cli(&["start", "web01"]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(!text(&o).contains("started on host-c"), "{}", text(&o));
        assert!(f.cli(&["destroy", "web01"]).status.success());
    }
    let o = f.cli(&["start", "web01", "--host", "host-c"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("host-c: network 'public' is not defined"),
        "{}",
        text(&o)
    );
    let list = f.cli(&["list", "--all", "--json"]);
    assert!(
        text(&list).contains("\"state\": \"shut off\""),
        "{}",
        text(&list)
    );

    // Both daemons serve Prometheus metrics with the named series.
    let scrape = |addr: &'static str| {
        f.ctl
            .run(move || flotilla_tests::http_get(addr.parse().expect("addr"), "/metrics"))
            .unwrap_or_else(|e| panic!("metrics endpoint {addr}: {e}"))
    };
    // Gauges are refreshed every second: wait for them to settle.
    let mut coordinator = String::new();
    wait_until(Duration::from_secs(5), || {
        coordinator = scrape("198.19.0.1:9464");
        coordinator.contains("flotilla_hosts{state=\"connected\"} 3")
            && coordinator.contains("flotilla_vms{state=\"shut off\"} 1")
    });
    for series in [
        "flotilla_hosts{state=\"connected\"} 3",
        "flotilla_vms{state=\"shut off\"} 1",
        "flotilla_starts_total{outcome=\"ok\"} 5",
        "flotilla_starts_total{outcome=\"no_placement\"} 1",
        "flotilla_scheduling_seconds_bucket",
        "flotilla_start_seconds_bucket",
    ] {
        assert!(
            coordinator.contains(series),
            "missing {series} in:\n{coordinator}"
        );
    }
    let agent = scrape("198.19.0.11:9465");
    for series in [
        "flotilla_agent_starts_total{outcome=\"ok\"}",
        "flotilla_agent_start_seconds_bucket",
        "flotilla_agent_vms 0",
    ] {
        assert!(agent.contains(series), "missing {series} in:\n{agent}");
    }

    // The event log tells the story so far, and a follower sees new events live.
    let events = text(&f.cli(&["events"]));
    for line in [
        "host host-a connected",
        "vm web01 started on host-a (ranked: host-a",
        "vm web01 stopped on host-b: Domain 'web01' destroyed",
        "vm web01 not placed: no host can run VM 'web01': host-c: network 'public' is not defined",
    ] {
        assert!(events.contains(line), "missing {line:?} in:\n{events}");
    }
    let before = events.matches("vm web01 started on host-a").count();
    let follower = {
        let mut c = f.ctl.command(&bin("flotilla"));
        c.arg("--coordinator")
            .arg(COORD)
            .arg("--tls-dir")
            .arg(&f.tls);
        c.args(["events", "--follow"]);
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        c.spawn().expect("spawn events --follow")
    };
    // The follower prints the history first and then streams: once it has
    // printed every past start, it is subscribed.
    let mut follower = follower;
    let mut streamed = Lines::read(follower.stdout.take().expect("piped stdout"));
    let starts = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| l.contains("vm web01 started on host-a"))
            .count()
    };
    streamed
        .wait_for(Duration::from_secs(10), |l| starts(l) == before)
        .expect("the follower never printed the history");
    let o = f.cli(&["start", "web01", "--host", "host-a"]);
    assert!(o.status.success(), "{}", text(&o));
    streamed
        .wait_for(Duration::from_secs(10), |l| starts(l) == before + 1)
        .expect("the follower did not see the new start");
    let _ = follower.kill();
    let _ = follower.wait();
}

#[test]
fn a_coordinator_address_where_nothing_listens_fails_at_once_and_a_list_skips_it() {
    // Bound in this order so they drop as separate locals did: the
    // coordinator first, the work directory last.
    let LoneCoordinator {
        _work,
        ctl,
        tls,
        _coordinator,
    } = LoneCoordinator::start("flt-dead-");
    // The same host, a port where nothing listens: its port unreachable
    // ends the attempt, not the handshake timeout.
    let dead = "198.19.0.1:7444";
    let o = flotilla(&ctl, dead, &tls, &["hosts"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains(
            "cannot connect to the coordinator: 198.19.0.1:7444: nothing listens at \
             198.19.0.1:7444 (the host answered port unreachable)"
        ),
        "{}",
        text(&o)
    );
    // Listed first, the dead entry does not stand in the way of a live one.
    let o = flotilla(&ctl, &format!("{dead},{COORD}"), &tls, &["hosts"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = flotilla(&ctl, &format!("{COORD}, {dead}"), &tls, &["list", "--all"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn defines_acknowledged_before_a_kill_9_survive() {
    let work = tempfile::Builder::new()
        .permissions(<std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755))
        .prefix("flt-durable-")
        .tempdir_in("/tmp")
        .expect("tmp");
    let tls = work.path().join("tls");
    certs(&tls, &["init"]);
    let ctl = control_plane();
    let data = work.path().join("data");
    let log = work.path().join("coordinator.log");
    let mut coordinator = CoordinatorProcess::start(&ctl, COORD, &data, &tls, &log);
    let acks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The kill lands from another thread while the define loop is mid-flight.
    let killer = {
        let acks = acks.clone();
        std::thread::spawn(move || {
            wait_until(Duration::from_secs(120), || {
                acks.load(std::sync::atomic::Ordering::SeqCst) >= 100
            });
            coordinator.kill9();
        })
    };
    let mut acknowledged = Vec::new();
    for i in 0..200 {
        let name = format!("vm{i:03}");
        let file = work.path().join(format!("{name}.xml"));
        std::fs::write(&file, domain_xml(&name, &new_uuid(), VNC_PUBLIC)).expect("write");
        let o = flotilla(&ctl, COORD, &tls, &["define", file.to_str().expect("utf8")]);
        if !o.status.success() {
            break; // the coordinator is gone: the run ends here, as an operator's would
        }
        acknowledged.push(name);
        acks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    killer.join().expect("killer thread");
    assert!(
        acknowledged.len() >= 100,
        "only {} defines acknowledged",
        acknowledged.len()
    );
    assert!(
        acknowledged.len() < 200,
        "the kill never interrupted the run"
    );
    let _restarted = CoordinatorProcess::start(&ctl, COORD, &data, &tls, &log);
    let list = flotilla(&ctl, COORD, &tls, &["list", "--all", "--json"]);
    let listed = text(&list);
    for name in &acknowledged {
        assert!(
            listed.contains(&format!("\"name\": \"{name}\"")),
            "{name} lost"
        );
    }
}

#[test]
fn certificates_fail_closed() {
    let f = fleet();
    // An operator certificate from another CA.
    let other = f.work.path().join("other-ca");
    certs(&other, &["init"]);
    let mut mixed = other.clone();
    mixed.push("ca.pem");
    let foreign = f.work.path().join("foreign");
    std::fs::create_dir_all(&foreign).expect("mkdir");
    // Trust the real CA (so only the client side is foreign).
    std::fs::copy(f.tls.join("ca.pem"), foreign.join("ca.pem")).expect("ca");
    std::fs::copy(
        other.join("operator-admin.pem"),
        foreign.join("operator-admin.pem"),
    )
    .expect("cert");
    std::fs::copy(
        other.join("operator-admin-key.pem"),
        foreign.join("operator-admin-key.pem"),
    )
    .expect("key");
    let o = flotilla(&f.ctl, COORD, &foreign, &["hosts"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "foreign CA accepted: {}",
        text(&o)
    );

    // An agent certificate making operator requests.
    let posing = f.work.path().join("posing");
    std::fs::create_dir_all(&posing).expect("mkdir");
    std::fs::copy(f.tls.join("ca.pem"), posing.join("ca.pem")).expect("ca");
    std::fs::copy(
        f.tls.join("agent-host-a.pem"),
        posing.join("operator-admin.pem"),
    )
    .expect("cert");
    std::fs::copy(
        f.tls.join("agent-host-a-key.pem"),
        posing.join("operator-admin-key.pem"),
    )
    .expect("key");
    let o = flotilla(&f.ctl, COORD, &posing, &["list", "--all"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains(
            "permission denied: agent certificate 'host-a' cannot make operator requests"
        ),
        "{}",
        text(&o)
    );

    // An agent certificate registering as another host, and an operator
    // certificate posing as an agent: both refused, neither host appears.
    for (cert, name, words) in [
        (
            "agent-host-a",
            "host-x",
            "certificate is for host 'host-a', cannot register as 'host-x'",
        ),
        (
            "operator-admin",
            "host-y",
            "operator certificate 'admin' cannot register as an agent",
        ),
    ] {
        let dir = f.work.path().join(format!("as-{name}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::copy(f.tls.join("ca.pem"), dir.join("ca.pem")).expect("ca");
        std::fs::copy(
            f.tls.join(format!("{cert}.pem")),
            dir.join(format!("agent-{name}.pem")),
        )
        .expect("cert");
        std::fs::copy(
            f.tls.join(format!("{cert}-key.pem")),
            dir.join(format!("agent-{name}-key.pem")),
        )
        .expect("key");
        let h = host(&f.ctl, if name == "host-x" { 21 } else { 22 });
        let dirs = AgentDirs::new();
        let log = dirs.root.path().join(format!("agent-{name}.log"));
        let _agent = AgentDaemon::start(
            &h,
            name,
            &dirs,
            &[
                "--coordinator",
                COORD,
                "--tls-dir",
                dir.to_str().expect("utf8"),
            ],
        );
        assert!(
            wait_until(Duration::from_secs(10), || std::fs::read_to_string(&log)
                .is_ok_and(|l| l.contains(words))),
            "{name}: expected refusal {words:?} in agent log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let hosts = text(&f.cli(&["hosts"]));
        assert!(!hosts.contains(name), "{name} registered: {hosts}");
    }
    // A client that presents no certificate at all gets nothing.
    let ca = f.tls.join("ca.pem");
    let outcome = f.ctl.run(move || without_client_certificate(&ca));
    let err = outcome.expect_err("coordinator answered a client with no certificate");
    eprintln!("no-certificate client: {err}");
    assert!(
        err.contains("certificate"),
        "refused for the wrong reason: {err}"
    );
    let _ = &f.hosts;
}

fn report_unexpected_answer(reply: &flotilla_shared::proto::ServerMessage) {
    eprintln!("coordinator answered a certificate-less client: {reply:?}");
}

/// Connects with a TLS client that trusts the fleet CA but presents no
/// certificate, and tries one request. Ok means the coordinator answered.
fn without_client_certificate(ca: &Path) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
            roots
                .add(c.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![flotilla_shared::net::tls::ALPN.to_vec()];
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(cfg).map_err(|e| e.to_string())?;
        let config = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
        let addr = COORD
            .parse()
            .map_err(|e: std::net::AddrParseError| e.to_string())?;
        let conn = flotilla_shared::net::quic::connect(addr, config)
            .await
            .map_err(|e| e.to_string())?;
        let reply: flotilla_shared::proto::ServerMessage = flotilla_shared::net::quic::call(
            &conn,
            &flotilla_shared::proto::ClientMessage::Operator(
                flotilla_shared::proto::OperatorRequest::Hosts,
            ),
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| match conn.close_reason() {
            // The coordinator's TLS alert says why it closed the connection.
            Some(reason) => reason.to_string(),
            None => e.to_string(),
        })?;
        report_unexpected_answer(&reply);
        Ok(())
    })
}

#[test]
fn restarts_converge_without_starting_twice_and_silent_hosts_go_unreachable() {
    let mut f = fleet();
    let uuid = new_uuid();
    let xml = f.work.path().join("web01.xml");
    std::fs::write(&xml, domain_xml("web01", &uuid, VNC_PUBLIC)).expect("write");
    assert!(f
        .cli(&["define", xml.to_str().expect("utf8")])
        .status
        .success());
    let o = f.cli(&["start", "web01", "--host", "host-a"]);
    assert!(o.status.success(), "{}", text(&o));

    // The coordinator dies and comes back: the host's report is the truth.
    f.restart_coordinator();
    assert!(
        wait_until(Duration::from_secs(20), || {
            let l = text(&f.cli(&["list", "--json"]));
            l.contains("\"host\": \"host-a\"") && l.contains("\"state\": \"running\"")
        }),
        "web01 not reconciled onto host-a: {}",
        text(&f.cli(&["list", "--all", "--json"]))
    );
    assert_eq!(qemu_pids_for(&uuid).len(), 1, "started twice");
    let o = f.cli(&["start", "web01"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("domain 'web01' is running on host host-a"),
        "{}",
        text(&o)
    );

    // host-a's agent goes silent: the host turns unreachable, its VM unknown, and
    // nothing is started elsewhere (that needs fencing).
    f.agents[0].kill9();
    assert!(
        wait_until(Duration::from_secs(20), || text(&f.cli(&["hosts"]))
            .lines()
            .any(|l| l.starts_with("host-a") && l.contains("unreachable"))),
        "{}",
        text(&f.cli(&["hosts"]))
    );
    let list = text(&f.cli(&["list", "--all", "--json"]));
    assert!(list.contains("\"state\": \"unknown\""), "{list}");
    let o = f.cli(&["start", "web01"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "started while its host is unreachable"
    );
    assert_eq!(qemu_pids_for(&uuid).len(), 1);
}

#[test]
fn bad_frames_fail_their_stream_not_the_coordinator_and_pinned_addresses_warn() {
    let f = fleet();
    let tls = f.tls.clone();
    let replies = f.ctl.run(move || raw_frames(&tls));
    assert_eq!(replies.len(), 4, "{replies:?}");
    assert!(
        replies[0].contains("bad request: malformed frame"),
        "{replies:?}"
    );
    assert!(
        replies[1].contains("bad request: frame of 4294967295 bytes exceeds the limit of 4194304"),
        "{replies:?}"
    );
    assert!(
        replies[2].contains("bad request: unsupported protocol version 99"),
        "{replies:?}"
    );
    // A version 1 client is told so by name, never answered with garbage.
    assert!(
        replies[3].contains("bad request: protocol version 1 is no longer supported"),
        "{replies:?}"
    );
    // The coordinator still serves everyone else.
    assert!(f.cli(&["hosts"]).status.success());

    let pinned = f.work.path().join("pinned.xml");
    std::fs::write(
        &pinned,
        domain_xml(
            "pinned",
            &new_uuid(),
            "<graphics type='vnc'><listen type='address' address='198.18.1.1'/></graphics>",
        ),
    )
    .expect("write");
    let o = f.cli(&["define", pinned.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o)
            .contains("warning: vnc console of 'pinned' pins the host-specific address 198.18.1.1"),
        "{}",
        text(&o)
    );
}

/// Sends four bad frames on four streams of one operator connection and
/// returns the coordinator's replies as the CLI prints them.
fn raw_frames(tls: &Path) -> Vec<String> {
    use flotilla_shared::net::{pki::Role, quic, tls as ftls};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let config = ftls::client_config(tls, Role::Operator, "admin").expect("config");
        let conn = quic::connect(COORD.parse().expect("addr"), config)
            .await
            .expect("connect");
        let mut future = Vec::new();
        future.extend_from_slice(&[0, 0, 0, 2, 99, 0]); // version 99, then garbage
                                                        // A well-formed request as a version 1 client sends it: the version
                                                        // (one varint byte) follows the length prefix.
        let mut v1 =
            flotilla_shared::proto::encode_frame(&flotilla_shared::proto::ClientMessage::Operator(
                flotilla_shared::proto::OperatorRequest::Hosts,
            ))
            .expect("encode");
        v1[4] = 1;
        let frames: [&[u8]; 4] = [
            &[0, 0, 0, 3, 0xff, 0xfe, 0xfd],
            &[0xff, 0xff, 0xff, 0xff],
            &future,
            &v1,
        ];
        let mut out = Vec::new();
        for bytes in frames {
            let (mut send, mut recv) = conn.open_bi().await.expect("stream");
            send.write_all(bytes).await.expect("write");
            let _ = send.finish();
            let reply: flotilla_shared::proto::ServerMessage = quic::read_frame(&mut recv)
                .await
                .expect("a reply, not a dropped connection");
            out.push(match reply {
                flotilla_shared::proto::ServerMessage::Operator(
                    flotilla_shared::proto::OperatorResponse::Error(e),
                ) => e.to_string(),
                other => format!("{other:?}"),
            });
        }
        out
    })
}

/// The counting guest, defined with its disk on storage every host sees.
fn define_counter(f: &Fleet, name: &str) -> String {
    define_counter_with(f, name, VNC_PUBLIC)
}

fn define_counter_with(f: &Fleet, name: &str, graphics: &str) -> String {
    let image = f.work.path().join(format!("{name}.img"));
    std::fs::write(&image, flotilla_tests::guest::counting_disk_image()).expect("image");
    let disk = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/><readonly/></disk>",
        image.display()
    );
    define_counter_on(f, name, &disk, graphics)
}

/// The counting guest on a writable qcow2 disk at `image`.
fn qcow2_disk(image: &Path) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>",
        image.display()
    )
}

fn define_counter_on(f: &Fleet, name: &str, disk: &str, graphics: &str) -> String {
    let uuid = new_uuid();
    let devices = format!("{disk}{graphics}");
    let xml = domain_xml(name, &uuid, &devices).replace(
        "<os><type arch='x86_64' machine='pc'>hvm</type></os>",
        "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>",
    );
    let file = f.work.path().join(format!("{name}.xml"));
    std::fs::write(&file, xml).expect("write");
    let o = f.cli(&["define", file.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", text(&o));
    uuid
}

#[test]
fn flotilla_console_carries_the_serial_port_both_ways_and_ctrl_bracket_detaches() {
    let f = fleet();
    // A virt-install-shaped server whose system disk echoes COM1.
    let raw = f.work.path().join("echo.raw");
    std::fs::write(&raw, flotilla_tests::guest::serial_echo_disk_image()).expect("image");
    let disk = f.work.path().join("echo.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2"], &[&raw, &disk]);
    let iso = f.work.path().join("debian-12.iso");
    std::fs::write(&iso, vec![0u8; 1 << 20]).expect("iso");
    let uuid = new_uuid();
    let xml = flotilla_tests::virt_install_domain(
        "echo",
        &uuid,
        &disk,
        &iso,
        "<os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>",
    );
    let file = f.work.path().join("echo.xml");
    std::fs::write(&file, xml).expect("write");
    let o = f.cli(&["define", file.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", text(&o));
    // Define stored what libvirt's define would: root ports and addresses.
    let stored = text(&f.cli(&["dumpxml", "echo"]));
    for wanted in [
        "model=\"pcie-root-port\"",
        "<address type=\"pci\" domain=\"0x0000\" bus=\"0x01\"",
        "<address type=\"drive\" controller=\"0\" bus=\"0\" target=\"0\" unit=\"0\"/>",
        "<address type=\"virtio-serial\" controller=\"0\" bus=\"0\" port=\"1\"/>",
    ] {
        assert!(stored.contains(wanted), "no {wanted} in:\n{stored}");
    }
    let o = f.cli(&["start", "echo", "--host", "host-a"]);
    assert!(o.status.success(), "{}", text(&o));
    let mut c = f.ctl.command(&bin("flotilla"));
    c.arg("--coordinator")
        .arg(COORD)
        .arg("--tls-dir")
        .arg(&f.tls)
        .args(["console", "echo"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().expect("flotilla console");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut out = Lines::read(child.stdout.take().expect("stdout"));
    let mut err = Lines::read(child.stderr.take().expect("stderr"));
    err.wait_for(Duration::from_secs(10), |l| {
        l.iter().any(|l| l.contains("Escape character is ^]"))
    })
    .expect("attached");
    assert!(
        err.seen()
            .iter()
            .any(|l| l.starts_with("Connected to domain 'echo' on host-a (/dev/pts/")),
        "{:?}",
        err.seen()
    );
    // The guest answers what it reads on COM1, in upper case: bytes went
    // to the serial port and came back from it.
    use std::io::Write;
    stdin.write_all(b"hello flotilla\n").expect("type");
    stdin.flush().expect("flush");
    out.wait_for(Duration::from_secs(10), |l| {
        l.iter().any(|l| l.contains("HELLO FLOTILLA"))
    })
    .expect("the guest's answer");
    // Ctrl-] detaches; the guest keeps running.
    stdin.write_all(&[0x1d]).expect("escape");
    stdin.flush().expect("flush");
    let mut status = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            status = child.try_wait().expect("wait");
            status.is_some()
        }),
        "console did not detach"
    );
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert_eq!(qemu_pids_for(&uuid).len(), 1, "the guest stopped");
    // A VM without a serial pty is refused by name, through its host.
    let o = f.cli(&["console", "nosuchvm"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("failed to get domain 'nosuchvm'"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_suspended_guest_migrates_paused_and_counts_again_only_when_resumed() {
    let f = fleet();
    let uuid = start_counting_on_a(&f, "sleeper");
    let o = f.cli(&["suspend", "sleeper"]);
    assert!(o.status.success(), "{}", text(&o));
    let paused_at = counter(&f, 0, "sleeper").expect("counter");
    // As libvirt: a paused domain stays paused across a migration.
    let o = f.cli(&["migrate", "sleeper", "--to", "host-b"]);
    assert!(o.status.success(), "{}", text(&o));
    let listed = |f: &Fleet| text(&f.cli(&["list", "--json"]));
    assert!(
        wait_until(Duration::from_secs(10), || {
            let l = listed(&f);
            l.contains("\"state\": \"paused\"") && l.contains("\"host\": \"host-b\"")
        }),
        "{}",
        listed(&f)
    );
    assert_eq!(qemu_pids_for(&uuid).len(), 1, "one copy");
    assert_eq!(
        counter(&f, 1, "sleeper"),
        Some(paused_at),
        "its memory came along"
    );
    assert!(
        !wait_until(Duration::from_millis(500), || counter(&f, 1, "sleeper")
            != Some(paused_at)),
        "the migrated guest runs although it was suspended"
    );
    let o = f.cli(&["resume", "sleeper"]);
    assert!(o.status.success(), "{}", text(&o));
    runs_only_on(&f, 1, "sleeper", &uuid);
}

#[test]
fn operator_verbs_suspend_resume_reset_list_disks_edit_and_autostart() {
    let mut f = fleet();
    let uuid = start_counting_on_a(&f, "worker");
    // suspend: the counter stands still; resume: it moves again.
    let o = f.cli(&["suspend", "worker"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("Domain 'worker' suspended"),
        "{}",
        text(&o)
    );
    let paused_at = counter(&f, 0, "worker").expect("counter");
    assert!(
        wait_until(Duration::from_secs(5), || text(&f.cli(&["list", "--json"]))
            .contains("\"state\": \"paused\"")),
        "{}",
        text(&f.cli(&["list", "--json"]))
    );
    assert!(
        !wait_until(Duration::from_millis(500), || counter(&f, 0, "worker")
            != Some(paused_at)),
        "a suspended guest counted"
    );
    let o = f.cli(&["resume", "worker"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        wait_until(Duration::from_secs(5), || counter(&f, 0, "worker")
            .is_some_and(|c| c > paused_at)),
        "the resumed guest does not count"
    );
    // reboot resets the hardware: the guest boots again and counts from 0,
    // in the same QEMU. It first counts long enough that its count after
    // the reset stays below this one for a good while, however slowly the
    // samples come.
    assert!(
        wait_until(Duration::from_secs(30), || counter(&f, 0, "worker")
            .is_some_and(|c| c > 3000)),
        "the guest does not count on"
    );
    let before = counter(&f, 0, "worker").expect("counter");
    let o = f.cli(&["reboot", "worker"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        wait_until(Duration::from_secs(10), || counter(&f, 0, "worker")
            .is_some_and(|c| c < before)),
        "no reset"
    );
    assert_eq!(qemu_pids_for(&uuid).len(), 1);
    // domblklist names each disk's target and source.
    let o = f.cli(&["domblklist", "worker"]);
    assert!(o.status.success(), "{}", text(&o));
    let image = f.work.path().join("worker.img");
    assert!(
        text(&o)
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["vda", image.to_str().expect("utf8")]),
        "{}",
        text(&o)
    );
    // domifaddr asks the guest agent, which this guest has no channel for.
    let o = f.cli(&["domifaddr", "worker", "--source", "agent"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("has no guest agent channel"),
        "{}",
        text(&o)
    );
    // edit: an editor that changes the vCPU count stores a new generation;
    // one that adds hardware Flotilla does not build changes nothing.
    let edit = |script: &str| {
        let mut c = f.ctl.command(&bin("flotilla"));
        c.env("EDITOR", script)
            .arg("--coordinator")
            .arg(COORD)
            .arg("--tls-dir")
            .arg(&f.tls)
            .args(["edit", "worker"]);
        output(c)
    };
    let o = edit("sed -i -e 's|<vcpu>1</vcpu>|<vcpu>2</vcpu>|'");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("Domain 'worker' XML configuration edited."),
        "{}",
        text(&o)
    );
    let stored = text(&f.cli(&["dumpxml", "worker"]));
    assert!(stored.contains("<vcpu>2</vcpu>"), "{stored}");
    let o = edit("sed -i -e 's|</devices>|<hostdev mode=\"subsystem\" type=\"usb\"/></devices>|'");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("/domain/devices/hostdev: element is not supported by Flotilla yet"),
        "{}",
        text(&o)
    );
    let kept = text(&o)
        .split("your edit is kept in ")
        .nth(1)
        .map(|p| p.trim().to_string())
        .expect("the kept file is named");
    assert!(
        std::fs::read_to_string(&kept).is_ok_and(|x| x.contains("<hostdev")),
        "{kept}"
    );
    let _ = std::fs::remove_file(&kept);
    assert_eq!(
        text(&f.cli(&["dumpxml", "worker"])),
        stored,
        "a refused edit changed the definition"
    );
    let o = edit("true");
    assert!(
        text(&o).contains("XML configuration not changed"),
        "{}",
        text(&o)
    );
    // autostart: after a coordinator restart with the VM shut off, the
    // coordinator starts it once the fleet is up.
    let o = f.cli(&["autostart", "worker"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = f.cli(&["destroy", "worker"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(wait_until(Duration::from_secs(10), || qemu_pids_for(&uuid).is_empty()));
    f.restart_coordinator();
    assert!(
        wait_until(Duration::from_secs(30), || qemu_pids_for(&uuid).len() == 1),
        "not autostarted: {}",
        text(&f.cli(&["events"]))
    );
    assert!(
        wait_until(Duration::from_secs(10), || text(
            &f.cli(&["list", "--json"])
        )
        .contains("\"state\": \"running\"")),
        "{}",
        text(&f.cli(&["list", "--json"]))
    );
}

/// Reads the guest's counter through the agent on host `idx`.
fn counter(f: &Fleet, idx: usize, name: &str) -> Option<u32> {
    let (ns, dirs, host) = &f.hosts[idx];
    let mut c = flotilla_tests::agent_command(ns, host, dirs);
    c.args(["ctl", "qemu-monitor-command", name, "--hmp"])
        .arg(format!(
            "xp /1wx {:#x}",
            flotilla_tests::guest::COUNTER_ADDR
        ));
    let o = output(c);
    flotilla_tests::guest::parse_xp_word(&String::from_utf8_lossy(&o.stdout))
}

/// Exactly one QEMU runs the VM, on host `idx`, and it is running.
fn runs_only_on(f: &Fleet, idx: usize, name: &str, uuid: &str) {
    assert_eq!(
        qemu_pids_for(uuid).len(),
        1,
        "VM must run on exactly one host"
    );
    let before = counter(f, idx, name).expect("readable on its host");
    assert!(
        wait_until(Duration::from_secs(5), || counter(f, idx, name)
            .is_some_and(|c| c > before)),
        "guest is not running on {}",
        f.hosts[idx].2
    );
}

fn start_counting_on_a(f: &Fleet, name: &str) -> String {
    let uuid = define_counter(f, name);
    count_on_a(f, name);
    uuid
}

/// Starts the defined counting guest on host-a and waits until it counts.
fn count_on_a(f: &Fleet, name: &str) {
    let o = f.cli(&["start", name, "--host", "host-a"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        wait_until(Duration::from_secs(30), || counter(f, 0, name)
            .is_some_and(|c| c > 0)),
        "guest never counted"
    );
}

#[test]
fn live_migration_moves_the_guest_and_its_console() {
    let f = fleet();
    // A writable qcow2 system disk on storage both hosts share.
    let image = f.work.path().join("mover.qcow2");
    let raw = f.work.path().join("mover.raw");
    std::fs::write(&raw, flotilla_tests::guest::counting_disk_image()).expect("image");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2"], &[&raw, &image]);
    let uuid = define_counter_on(&f, "mover", &qcow2_disk(&image), VNC_PUBLIC);
    count_on_a(&f, "mover");
    let stored = text(&f.cli(&["dumpxml", "mover"]));
    let before = counter(&f, 0, "mover").expect("counter");
    // No --to: the scheduler excludes the source and host-c lacks `public`.
    let o = f.cli(&["migrate", "mover", "--max-downtime", "300"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("Migration of 'mover' from host-a to host-b completed in"),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("downtime"), "{}", text(&o));
    let after = counter(&f, 1, "mover").expect("counter on host-b");
    assert!(
        after > before,
        "counter went {before} -> {after}: restarted, not migrated"
    );
    runs_only_on(&f, 1, "mover", &uuid);
    // The destination launched a QEMU, but it counts as an incoming
    // migration, not as a start with a start latency.
    let dest_metrics = f
        .ctl
        .run(|| flotilla_tests::http_get(SocketAddr::new(ip("198.19.0.12"), 9465), "/metrics"))
        .expect("host-b metrics");
    assert!(
        dest_metrics.contains("flotilla_agent_incoming_migrations_total{outcome=\"ok\"} 1"),
        "{dest_metrics}"
    );
    assert!(
        !dest_metrics.contains("flotilla_agent_starts_total")
            && !dest_metrics.contains("flotilla_agent_start_seconds_count"),
        "{dest_metrics}"
    );
    let o = f.cli(&["domdisplay", "mover"]);
    assert!(text(&o).contains("vnc://198.18.2.1:5900"), "{}", text(&o));
    let banner = f.hosts[1]
        .0
        .run(|| rfb_banner(ip("198.18.2.1"), 5900))
        .expect("VNC on b");
    assert!(banner.starts_with("RFB 003.00"), "{banner:?}");
    assert!(f.hosts[0]
        .0
        .run(|| flotilla_tests::refused(ip("198.18.1.1"), 5900)));
    assert_eq!(
        text(&f.cli(&["dumpxml", "mover"])),
        stored,
        "definition changed"
    );
    assert!(
        wait_until(Duration::from_secs(5), || text(&f.cli(&["list", "--json"]))
            .contains("\"host\": \"host-b\"")),
        "{}",
        text(&f.cli(&["list", "--json"]))
    );
    // The guest kept writing its count to the shared disk from host-b.
    let last = counter(&f, 1, "mover").expect("counter");
    stop_and_check_disk(&f, 1, "mover", &uuid, &image, last);
}

/// Runs `qemu-img ARGS PATHS…` and insists it succeeds.
fn qemu_img(args: &[&str], paths: &[&Path]) -> String {
    let mut c = std::process::Command::new("qemu-img");
    c.args(args).args(paths);
    let o = output(c);
    assert!(o.status.success(), "qemu-img {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `script` in host `idx`'s mount namespace (its `local` storage).
fn in_host_mounts(f: &Fleet, idx: usize, script: &str) -> Output {
    let mut c = std::process::Command::new("nsenter");
    c.arg("-t")
        .arg(f.agents[idx].child.id().to_string())
        .args(["-m", "sh", "-c", script]);
    output(c)
}

/// Destroys the VM, then checks the image it ran on from host `idx`'s view:
/// `qemu-img check` is clean and the guest's last count, at least `seen`,
/// is on the disk.
fn stop_and_check_disk(f: &Fleet, idx: usize, name: &str, uuid: &str, image: &Path, seen: u32) {
    let o = f.cli(&["destroy", name]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        wait_until(Duration::from_secs(10), || qemu_pids_for(uuid).is_empty()),
        "QEMU still runs"
    );
    let raw = f.work.path().join(format!("{name}-check-{idx}.raw"));
    let script = format!(
        "qemu-img check {img} && qemu-img convert -O raw {img} {raw}",
        img = image.display(),
        raw = raw.display()
    );
    let o = in_host_mounts(f, idx, &script);
    assert!(o.status.success(), "{}", text(&o));
    let bytes = std::fs::read(&raw).expect("raw copy");
    let on_disk = flotilla_tests::guest::disk_counter(&bytes).expect("counter sector");
    assert!(
        on_disk >= seen,
        "the disk holds count {on_disk}, but the guest had counted to {seen}"
    );
}

/// The counting guest's qcow2 disk in host-a's own `local` storage, with
/// `data_mib` MiB of written data after it (a disk that takes a while to copy).
fn local_counter_on_a(f: &Fleet, local: &Path, name: &str, data_mib: u32) -> (String, PathBuf) {
    let raw = f.work.path().join(format!("{name}.raw"));
    std::fs::write(&raw, flotilla_tests::guest::counting_disk_image()).expect("image");
    let image = local.join(format!("{name}.qcow2"));
    let mut script = format!(
        "qemu-img convert -f raw -O qcow2 {raw} {img} && qemu-img resize -q {img} {size}M",
        raw = raw.display(),
        img = image.display(),
        size = 32 + data_mib
    );
    if data_mib > 0 {
        script.push_str(&format!(
            " && qemu-io -f qcow2 -c 'write -P 0xa5 8M {data_mib}M' {}",
            image.display()
        ));
    }
    let o = in_host_mounts(f, 0, &script);
    assert!(o.status.success(), "{}", text(&o));
    let uuid = define_counter_on(f, name, &qcow2_disk(&image), "");
    count_on_a(f, name);
    (uuid, image)
}

/// A fleet whose hosts each have their own `local` storage, and its path.
fn local_fleet() -> (Fleet, PathBuf) {
    let f = fleet_with(true, &[]);
    let local = f.work.path().join("local");
    (f, local)
}

#[test]
fn a_local_disk_is_refused_without_a_copy_and_moves_with_copy_storage_all() {
    let (f, local) = local_fleet();
    let (uuid, image) = local_counter_on_a(&f, &local, "loner", 0);

    let o = f.cli(&["migrate", "loner", "--to", "host-b"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains(&format!(
            "destination refused: cannot accept VM 'loner' on host host-b: disk source {} \
             does not exist here (live migration needs storage both hosts see; \
             --copy-storage-all copies writable disks)",
            image.display()
        )),
        "{}",
        text(&o)
    );
    runs_only_on(&f, 0, "loner", &uuid);
    // Nothing was left on host-b: no image, no QEMU.
    let o = in_host_mounts(&f, 1, &format!("test ! -e {}", image.display()));
    assert!(o.status.success(), "host-b kept an image");

    let before = counter(&f, 0, "loner").expect("counter");
    let o = f.cli(&["migrate", "loner", "--to", "host-b", "--copy-storage-all"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("Migration of 'loner' from host-a to host-b completed in"),
        "{}",
        text(&o)
    );
    let after = counter(&f, 1, "loner").expect("counter on host-b");
    assert!(
        after > before,
        "counter went {before} -> {after}: restarted"
    );
    runs_only_on(&f, 1, "loner", &uuid);
    let events = text(&f.cli(&["events"]));
    assert!(
        events
            .lines()
            .any(|l| l.contains("vm loner migration ") && l.contains("disks ")),
        "no disk progress in:\n{events}"
    );
    // host-b's own copy holds what the guest kept writing there.
    let last = counter(&f, 1, "loner").expect("counter");
    stop_and_check_disk(&f, 1, "loner", &uuid, &image, last);
}

#[test]
fn aborting_a_storage_copy_leaves_the_guest_and_its_disk_on_the_source() {
    let (f, local) = local_fleet();
    // A 48 MiB disk at 4 MiB/s: the disks take about 12 s, then memory.
    let (uuid, image) = local_counter_on_a(&f, &local, "keeper", 16);
    let args = [
        "migrate",
        "keeper",
        "--to",
        "host-b",
        "--copy-storage-all",
        "--bandwidth",
        "4",
        "--max-downtime",
        "1",
    ];
    for (stage, line) in [
        ("copying the disks", "vm keeper migration copying disks"),
        ("sending memory", "vm keeper migration active "),
    ] {
        let cli = {
            let mut c = f.ctl.command(&bin("flotilla"));
            c.arg("--coordinator")
                .arg(COORD)
                .arg("--tls-dir")
                .arg(&f.tls)
                .args(args);
            c.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            c.spawn().expect("spawn migrate")
        };
        let seen = |l: &str| {
            text(&f.cli(&["events"]))
                .lines()
                .filter(|e| e.contains(l))
                .count()
        };
        let earlier = seen(line);
        assert!(
            wait_until(Duration::from_secs(60), || seen(line) > earlier),
            "never reached '{stage}': {}",
            text(&f.cli(&["events"]))
        );
        let o = f.cli(&["migrate-abort", "keeper"]);
        assert!(o.status.success(), "{stage}: {}", text(&o));
        let o = cli.wait_with_output().expect("migrate");
        assert_eq!(o.status.code(), Some(1), "{stage}: {}", text(&o));
        assert!(
            text(&o).contains("aborted: aborted by operator; it runs on host-a"),
            "{stage}: {}",
            text(&o)
        );
        runs_only_on(&f, 0, "keeper", &uuid);
        // The image host-b created for the copy is gone with its QEMU.
        let gone = || {
            in_host_mounts(&f, 1, &format!("test ! -e {}", image.display()))
                .status
                .success()
        };
        assert!(
            wait_until(Duration::from_secs(10), gone),
            "{stage}: host-b kept its half-copied image"
        );
    }
    let last = counter(&f, 0, "keeper").expect("counter");
    stop_and_check_disk(&f, 0, "keeper", &uuid, &image, last);
}

#[test]
fn copy_storage_inc_moves_only_the_top_of_a_qcow2_chain() {
    let (f, local) = local_fleet();
    let raw = f.work.path().join("base.raw");
    std::fs::write(&raw, flotilla_tests::guest::counting_disk_image()).expect("image");
    let base = local.join("base.qcow2");
    let top = local.join("layer.qcow2");
    // The same base on both hosts (as from one template), with data the
    // top image does not hold; the top image only on host-a.
    let make_base = format!(
        "qemu-img convert -f raw -O qcow2 {raw} {base} && qemu-img resize -q {base} 64M && \
         qemu-io -f qcow2 -c 'write -P 0x5a 8M 8M' {base}",
        raw = raw.display(),
        base = base.display()
    );
    for idx in [0, 1] {
        let o = in_host_mounts(&f, idx, &make_base);
        assert!(o.status.success(), "{}", text(&o));
    }
    let o = in_host_mounts(
        &f,
        0,
        &format!(
            "qemu-img create -q -f qcow2 -b {} -F qcow2 {}",
            base.display(),
            top.display()
        ),
    );
    assert!(o.status.success(), "{}", text(&o));
    let uuid = define_counter_on(&f, "layered", &qcow2_disk(&top), "");
    count_on_a(&f, "layered");
    let o = f.cli(&["migrate", "layered", "--to", "host-b", "--copy-storage-inc"]);
    assert!(o.status.success(), "{}", text(&o));
    runs_only_on(&f, 1, "layered", &uuid);
    // host-b's top image has host-b's base behind it, and holds only what
    // the guest wrote (the first cluster), not the base's 8 MiB.
    let o = in_host_mounts(
        &f,
        1,
        &format!("qemu-img map -U --output=json {}", top.display()),
    );
    assert!(o.status.success(), "{}", text(&o));
    let map: serde_json::Value = serde_json::from_slice(&o.stdout).expect("map");
    let in_top: u64 = map
        .as_array()
        .expect("extents")
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        in_top > 0 && in_top <= 1 << 20,
        "host-b's top image holds {in_top} bytes: {}",
        text(&o)
    );
    let last = counter(&f, 1, "layered").expect("counter");
    stop_and_check_disk(&f, 1, "layered", &uuid, &top, last);
}

/// A migration that never converges: the guest dirties its counter page
/// continuously, and 1 ms of downtime at 1 MiB/s is never enough.
const STUCK: &[&str] = &["--to", "host-b", "--max-downtime", "1", "--bandwidth", "1"];

#[test]
fn abort_timeout_and_a_dead_destination_leave_the_guest_on_its_source() {
    let f = fleet();
    let uuid = start_counting_on_a(&f, "stay");

    // Operator abort from another terminal.
    let mut args = vec!["migrate", "stay"];
    args.extend_from_slice(STUCK);
    let cli = {
        let mut c = f.ctl.command(&bin("flotilla"));
        c.arg("--coordinator")
            .arg(COORD)
            .arg("--tls-dir")
            .arg(&f.tls)
            .args(&args);
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.spawn().expect("spawn migrate")
    };
    assert!(
        wait_until(Duration::from_secs(10), || qemu_pids_for(&uuid).len() == 2),
        "destination never prepared"
    );
    let o = f.cli(&["start", "stay"]);
    assert!(
        text(&o).contains("domain 'stay' is migrating"),
        "{}",
        text(&o)
    );
    // Without a terminal the CLI prints a progress line a second instead of
    // a bar. Abort only once it has shown the migration active, so that
    // what is aborted is a running migration on a machine of any speed.
    let mut cli = cli;
    let mut cli_stderr = Lines::read(cli.stderr.take().expect("piped stderr"));
    cli_stderr
        .wait_for(Duration::from_secs(30), |lines| {
            lines
                .iter()
                .any(|l| l.starts_with("progress: active ") && l.contains(" MiB sent"))
        })
        .expect("no active progress line");
    let o = f.cli(&["migrate-abort", "stay"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = cli.wait_with_output().expect("migrate");
    let told = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        cli_stderr.finish()
    );
    assert_eq!(o.status.code(), Some(1), "{told}");
    assert!(
        told.contains("aborted: aborted by operator; it runs on host-a"),
        "{told}"
    );
    runs_only_on(&f, 0, "stay", &uuid);
    // The event log tells the same story, with sampled progress in between.
    let events = text(&f.cli(&["events"]));
    assert!(
        events.contains("vm stay migrating from host-a to host-b"),
        "{events}"
    );
    assert!(
        events
            .lines()
            .any(|l| l.contains("vm stay migration active ") && l.contains("% of ")),
        "no progress line in:\n{events}"
    );
    let lines: Vec<&str> = events.lines().collect();
    let last_progress = lines
        .iter()
        .rposition(|l| l.contains("vm stay migration active "));
    let outcome = lines
        .iter()
        .position(|l| l.contains("vm stay migration aborted: aborted by operator"));
    assert!(
        outcome.is_some() && last_progress < outcome,
        "the outcome must follow every progress line:\n{events}"
    );

    // --timeout does the same.
    let mut args = vec!["migrate", "stay", "--timeout", "2"];
    args.extend_from_slice(STUCK);
    let o = f.cli(&args);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("aborted: timed out after 2s; it runs on host-a"),
        "{}",
        text(&o)
    );
    runs_only_on(&f, 0, "stay", &uuid);

    // The destination QEMU dies mid-migration: the source carries on.
    let mut args = vec!["migrate", "stay"];
    args.extend_from_slice(STUCK);
    let cli = {
        let mut c = f.ctl.command(&bin("flotilla"));
        c.arg("--coordinator")
            .arg(COORD)
            .arg("--tls-dir")
            .arg(&f.tls)
            .args(&args);
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.spawn().expect("spawn migrate")
    };
    let mut dest = None;
    assert!(wait_until(Duration::from_secs(10), || {
        dest = qemu_pids_for(&uuid).into_iter().find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("-incoming"))
        });
        dest.is_some()
    }));
    // Killed while memory is streaming, not while it is being prepared.
    let mut cli = cli;
    let mut cli_stderr = Lines::read(cli.stderr.take().expect("piped stderr"));
    cli_stderr
        .wait_for(Duration::from_secs(30), |lines| {
            lines.iter().any(|l| l.starts_with("progress: active "))
        })
        .expect("no active progress line");
    let pid = nix::unistd::Pid::from_raw(dest.expect("destination pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill destination");
    let o = cli.wait_with_output().expect("migrate");
    let told = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        cli_stderr.finish()
    );
    assert_eq!(o.status.code(), Some(1), "{told}");
    assert!(told.contains("it runs on host-a"), "{told}");
    runs_only_on(&f, 0, "stay", &uuid);
    let o = f.cli(&["domdisplay", "stay"]);
    assert!(text(&o).contains("vnc://198.18.1.1:5900"), "{}", text(&o));
}

#[test]
fn postcopy_finishes_what_precopy_cannot_and_spice_clients_are_redirected() {
    let f = fleet();
    let uuid = start_counting_on_a(&f, "busy");
    let before = counter(&f, 0, "busy").expect("counter");
    // 1 ms of downtime at 1 MiB/s never converges in pre-copy; post-copy ends it.
    let mut args = vec!["migrate", "busy", "--postcopy", "--timeout", "60"];
    args.extend_from_slice(STUCK);
    let o = f.cli(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("from host-a to host-b completed"),
        "{}",
        text(&o)
    );
    assert!(counter(&f, 1, "busy").expect("counter on b") > before);
    runs_only_on(&f, 1, "busy", &uuid);

    // A SPICE console: client_migrate_info must succeed for the migration to proceed.
    let spice = "<graphics type='spice'><listen type='network' network='public'/></graphics>";
    let suuid = define_counter_with(&f, "spicy", spice);
    let o = f.cli(&["start", "spicy", "--host", "host-a"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = f.cli(&["migrate", "spicy", "--to", "host-b"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = f.cli(&["domdisplay", "spicy"]);
    assert!(text(&o).contains("spice://198.18.2.1:"), "{}", text(&o));
    assert_eq!(qemu_pids_for(&suuid).len(), 1);
}

#[test]
fn draining_a_host_moves_all_its_vms_and_stops_placements_there() {
    let f = fleet();
    let mut uuids = Vec::new();
    for name in ["d1", "d2", "d3"] {
        let uuid = new_uuid();
        let file = f.work.path().join(format!("{name}.xml"));
        std::fs::write(&file, domain_xml(name, &uuid, VNC_PUBLIC)).expect("write");
        assert!(f
            .cli(&["define", file.to_str().expect("utf8")])
            .status
            .success());
        let o = f.cli(&["start", name, "--host", "host-a"]);
        assert!(o.status.success(), "{}", text(&o));
        uuids.push(uuid);
    }
    let o = f.cli(&["host-drain", "host-a", "--parallel", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("Host host-a drained: 3 VM(s) moved, 0 could not move"),
        "{out}"
    );
    for name in ["d1", "d2", "d3"] {
        assert!(
            out.contains(&format!("{name}: migrating off host-a")),
            "{out}"
        );
        assert!(out.contains(&format!("{name} -> host-b")), "{out}");
    }
    for u in &uuids {
        assert_eq!(qemu_pids_for(u).len(), 1, "exactly one copy");
    }
    let hosts = text(&f.cli(&["hosts"]));
    assert!(
        hosts
            .lines()
            .any(|l| l.starts_with("host-a") && l.contains("draining")),
        "{hosts}"
    );
    let o = f.cli(&["destroy", "d1"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = f.cli(&["start", "d1", "--host", "host-a"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("host-a: draining"), "{}", text(&o));
    assert!(f.cli(&["host-undrain", "host-a"]).status.success());
    let o = f.cli(&["start", "d1", "--host", "host-a"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_stale_half_of_an_interrupted_migration_is_removed() {
    let f = fleet();
    let uuid = new_uuid();
    let file = f.work.path().join("half.xml");
    std::fs::write(&file, domain_xml("half", &uuid, VNC_PUBLIC)).expect("write");
    assert!(f
        .cli(&["define", file.to_str().expect("utf8")])
        .status
        .success());
    let o = f.cli(&["start", "half", "--host", "host-a"]);
    assert!(o.status.success(), "{}", text(&o));
    // A destination left waiting, as after a coordinator crash mid-migration.
    let (ns, dirs, host) = &f.hosts[1];
    let mut c = flotilla_tests::agent_command(ns, host, dirs);
    c.args(["ctl", "migrate-incoming"]).arg(&file);
    let o = output(c);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(qemu_pids_for(&uuid).len(), 2);
    assert!(
        wait_until(Duration::from_secs(15), || qemu_pids_for(&uuid).len() == 1),
        "the stale paused copy on host-b was not removed"
    );
    // The running copy is the one that stayed.
    let o = f.cli(&["domdisplay", "half"]);
    assert!(text(&o).contains("vnc://198.18.1.1:5900"), "{}", text(&o));
    let a = ip("198.18.1.1");
    assert!(f.hosts[0].0.run(move || rfb_banner(a, 5900)).is_ok());
}

/// Where the coordinator serves its web pages in these tests.
const WEB: &str = "198.19.0.1:8443";

/// A fleet whose coordinator serves the web console (noVNC from the npm
/// prefix deploy/lib/web.sh installed), with tickets that expire after
/// `ticket_secs`.
fn web_fleet(ticket_secs: &str) -> Fleet {
    let novnc = flotilla_tests::browser::novnc_dir();
    fleet_with(
        false,
        &[
            "--web-listen",
            WEB,
            "--novnc-dir",
            novnc.to_str().expect("utf8"),
            "--web-ticket-secs",
            ticket_secs,
        ],
    )
}

/// The URL `flotilla webconsole NAME` (or `web-login`) prints.
fn web_url(f: &Fleet, args: &[&str]) -> String {
    let o = f.cli(args);
    assert!(o.status.success(), "{}", text(&o));
    let url = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(url.starts_with(&format!("https://{WEB}/")), "{url}");
    assert!(url.contains("?ticket="), "{url}");
    url
}

/// Established TCP connections to port 5900 inside host `idx`: the agent's
/// console relay to QEMU.
fn relays_on(f: &Fleet, idx: usize) -> usize {
    let mut c = f.hosts[idx].0.command(Path::new("ss"));
    c.args(["-Htn", "state", "established", "( dport = :5900 )"]);
    String::from_utf8_lossy(&output(c).stdout).lines().count()
}

#[test]
fn the_web_console_follows_the_guest_across_live_migrations() {
    let f = web_fleet("5");
    // A console with a password: the coordinator answers QEMU's challenge.
    let secret = "s3cret-pw";
    let graphics = format!(
        "<graphics type='vnc' passwd='{secret}'><listen type='network' network='public'/></graphics>"
    );
    let uuid = define_counter_with(&f, "watched", &graphics);
    count_on_a(&f, "watched");
    // Tickets only for a running VM with a VNC console.
    define_counter_with(&f, "headless", "");
    for (name, refusal) in [
        (
            "nosuch",
            "failed to get domain 'nosuch': no domain with matching name",
        ),
        ("headless", "domain 'headless' is not running"),
    ] {
        let o = f.cli(&["webconsole", name]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains(refusal), "{}", text(&o));
    }
    assert!(f.cli(&["start", "headless"]).status.success());
    let o = f.cli(&["webconsole", "headless"]);
    assert!(
        text(&o).contains("domain 'headless' has no VNC console for the web console to show"),
        "{}",
        text(&o)
    );
    let issued = std::time::Instant::now();
    let stale = web_url(&f, &["webconsole", "watched"]);
    let url = web_url(&f, &["webconsole", "watched"]);
    // FLOTILLA_WEB_SHOTS=DIR keeps the screenshots for a person to look at.
    let shots = std::env::var_os("FLOTILLA_WEB_SHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| f.work.path().join("shots"));
    std::fs::create_dir_all(&shots).expect("shots");
    let shot = |name: &str| shots.join(name).display().to_string();

    let mut b = flotilla_tests::browser::Browser::launch(&f.ctl, &f.tls.join("coordinator.pem"));
    let page = b.ask(serde_json::json!({"cmd": "open", "page": "console", "url": url}));
    assert_eq!(page["status"], 200, "{page}");
    // The ticket left the address bar, and the password never reached the page.
    assert_eq!(
        page["url"],
        format!("https://{WEB}/console/watched"),
        "{page}"
    );
    let first = b.ask(serde_json::json!({
        "cmd": "wait_counter", "page": "console", "connects": 1,
        "timeout_ms": 30000, "shot": shot("1-host-a.png"),
    }));
    let c1 = first["counter"].as_u64().expect("counter on screen");
    let second = b.ask(serde_json::json!({
        "cmd": "wait_counter", "page": "console", "above": c1, "timeout_ms": 10000,
        "shot": shot("2-host-a.png"),
    }));
    assert!(second["counter"].as_u64() > Some(c1), "{second}");
    assert_eq!(relays_on(&f, 0), 1, "host-a's agent relays the console");
    let html = b.ask(serde_json::json!({"cmd": "text", "page": "console"}));
    assert!(!html.to_string().contains(secret), "{html}");

    // Replayed, wrong and expired tickets: 403, and nothing is proxied.
    let replay = b.ask(serde_json::json!({"cmd": "open", "page": "replay", "url": url}));
    assert_eq!(replay["status"], 403, "{replay}");
    assert!(
        replay["text"]
            .as_str()
            .is_some_and(|t| t.contains("ticket already used")),
        "{replay}"
    );
    let wrong = url.replace("?ticket=", "?ticket=00");
    let wrong = b.ask(serde_json::json!({"cmd": "open", "page": "replay", "url": wrong}));
    assert_eq!(wrong["status"], 403, "{wrong}");
    if let Some(left) = Duration::from_secs(5).checked_sub(issued.elapsed()) {
        // The ticket's lifetime is what is under test here.
        std::thread::sleep(left + Duration::from_millis(100));
    }
    let expired = b.ask(serde_json::json!({"cmd": "open", "page": "replay", "url": stale}));
    assert_eq!(expired["status"], 403, "{expired}");
    assert!(
        expired["text"]
            .as_str()
            .is_some_and(|t| t.contains("ticket expired")),
        "{expired}"
    );
    assert_eq!(relays_on(&f, 0), 1, "refused pages opened no relay");

    // The fleet page, open while the guest moves.
    let login = web_url(&f, &["web-login"]);
    let fleet = b.ask(serde_json::json!({"cmd": "open", "page": "fleet", "url": login}));
    assert_eq!(fleet["status"], 200, "{fleet}");
    for words in [
        "host-a",
        "host-b",
        "host-c",
        "watched",
        "started on host-a (ranked: host-a",
    ] {
        b.ask(serde_json::json!({"cmd": "wait_text", "page": "fleet", "contains": words}));
    }

    // Live-migrate with the page open: it reconnects to host-b by itself.
    for (to, idx, n) in [("host-b", 1, 2), ("host-a", 0, 3)] {
        let o = f.cli(&["migrate", "watched", "--to", to]);
        assert!(o.status.success(), "{}", text(&o));
        let at_switch = b.ask(serde_json::json!({"cmd": "counter", "page": "console"}));
        let shown = at_switch["counter"].as_u64().unwrap_or(0);
        let back = b.ask(serde_json::json!({
            "cmd": "wait_counter", "page": "console", "above": shown, "connects": n,
            "timeout_ms": 30000, "shot": shot(&format!("{n}-{to}.png")),
        }));
        eprintln!(
            "screen back {} ms after the migration of 'watched' to {to} completed",
            back["ms"]
        );
        assert_eq!(back["banner"], format!("moved to {to}"), "{back}");
        assert_eq!(back["movedTo"], to, "{back}");
        // Told by the coordinator (its notice, or the 4001 close), not guessed.
        assert!(
            back["moves"]
                .as_array()
                .is_some_and(|m| m.len() == n - 1 && m.last().is_some_and(|m| m["to"] == to)),
            "{back}"
        );
        assert!(
            wait_until(Duration::from_secs(10), || relays_on(&f, idx) == 1),
            "the console is not relayed by {to}"
        );
        b.ask(serde_json::json!({
            "cmd": "wait_text", "page": "fleet",
            "contains": format!("vm watched migration completed"),
        }));
    }
    let events = b.ask(serde_json::json!({"cmd": "text", "page": "fleet"}));
    let text_now = events["text"].as_str().unwrap_or_default().to_string();
    for line in [
        "vm watched migrating from host-a to host-b",
        "vm watched migrating from host-b to host-a",
        "migrated from host-b to host-a",
    ] {
        assert!(
            text_now.contains(line),
            "fleet page lacks {line:?}:\n{text_now}"
        );
    }
    b.ask(serde_json::json!({"cmd": "wait_text", "page": "fleet", "contains": "", "shot": shot("fleet.png")}));
    runs_only_on(&f, 0, "watched", &uuid);
}

#[test]
fn a_coordinator_without_web_listen_issues_no_web_tickets() {
    // Bound in this order so they drop as separate locals did: the
    // coordinator first, the work directory last.
    let LoneCoordinator {
        _work,
        ctl,
        tls,
        _coordinator,
    } = LoneCoordinator::start("flt-noweb-");
    for args in [&["webconsole", "web01"][..], &["web-login"]] {
        let o = flotilla(&ctl, COORD, &tls, args);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            text(&o)
                .contains("this coordinator serves no web pages: start it with --web-listen ADDR"),
            "{}",
            text(&o)
        );
    }
}

// ------------------------------------------------------------ high availability

/// How a test cuts host-a off from the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Its management link goes down.
    LinkDown,
    /// One way only: a blackhole route to the coordinator inside host-a, so
    /// the coordinator's packets still arrive but nothing gets back.
    OneWay,
    /// Its agent is stopped (SIGSTOP): alive, silent.
    AgentHung,
    /// Its agent is killed and not restarted (until the heal).
    AgentKilled,
}

/// Short leases keep the suite fast; the benchmark measures the defaults.
const HA_ARGS: &[&str] = &[
    "--lease-secs",
    "4",
    "--fence-margin-secs",
    "1",
    "--heartbeat-secs",
    "1",
    "--heartbeat-timeout-secs",
    "3",
];

/// Samples every 100 ms, over every namespace, how many QEMUs carry each
/// UUID; the most ever seen per UUID comes back from `stop`.
struct TwiceWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<usize>>,
}

impl TwiceWatch {
    fn start(uuids: Vec<String>) -> TwiceWatch {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut most = vec![0; uuids.len()];
            let tick = || std::thread::sleep(Duration::from_millis(100));
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                for (i, u) in uuids.iter().enumerate() {
                    most[i] = most[i].max(qemu_pids_for(u).len());
                }
                // Sampling, not synchronisation: the period is the spec.
                tick();
            }
            most
        });
        TwiceWatch { stop, thread }
    }

    fn stop(self) -> Vec<usize> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("sampler")
    }
}

/// `name`'s row in `flotilla list --all --json`.
fn listed(f: &Fleet, name: &str) -> serde_json::Value {
    listed_vm(&f.cli(&["list", "--all", "--json"]), name)
}

use flotilla_tests::qemu_runs_in as runs_in;

fn ha_guests_restart_elsewhere_and_never_run_twice(cut: Cut) {
    let mut f = fleet_with(false, HA_ARGS);
    // With the link cut, host-a's agent also pets a "watchdog" (a plain
    // file here: a real device would reset the machine) and reports its
    // timeout, which the coordinator adds to the fencing deadline.
    let watchdog = (cut == Cut::LinkDown).then(|| {
        let file = f.hosts[0].1.file("watchdog", "");
        let tls = f.tls.to_str().expect("utf8").to_string();
        f.agents[0].kill9();
        let (ns, dirs, name) = &f.hosts[0];
        f.agents[0] = AgentDaemon::start(
            ns,
            name,
            dirs,
            &[
                "--coordinator",
                COORD,
                "--tls-dir",
                &tls,
                "--watchdog",
                file.to_str().expect("utf8"),
                "--watchdog-timeout-secs",
                "1",
            ],
        );
        assert!(
            wait_until(Duration::from_secs(20), || {
                std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) >= 2
            }),
            "the watchdog is not petted"
        );
        file
    });
    let ha =
        r"<metadata><flotilla:ha xmlns:flotilla='urn:flotilla:domain:1' restart='on'/></metadata>";
    let mut uuids = Vec::new();
    for name in ["ha1", "ha2", "plain"] {
        let uuid = new_uuid();
        let mut xml = domain_xml(name, &uuid, VNC_PUBLIC);
        // ha2 says so in its definition; ha1 gets it from `flotilla ha`.
        if name == "ha2" {
            xml = xml.replace("<memory", &format!("{ha}<memory"));
        }
        let path = f.work.path().join(format!("{name}.xml"));
        std::fs::write(&path, xml).expect("write");
        let o = f.cli(&["define", path.to_str().expect("utf8")]);
        assert!(o.status.success(), "{}", text(&o));
        uuids.push(uuid);
    }
    let o = f.cli(&["ha", "ha1", "on"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = f.cli(&["dominfo", "ha1"]);
    assert!(
        text(&o)
            .lines()
            .any(|l| l.starts_with("HA:") && l.ends_with(" on")),
        "{}",
        text(&o)
    );
    for name in ["ha1", "ha2", "plain"] {
        let o = f.cli(&["start", name, "--host", "host-a"]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let list = text(&f.cli(&["list"]));
    assert!(
        list.lines()
            .any(|l| l.starts_with("ha1 ") && l.contains(" on ")),
        "{list}"
    );
    let watch = TwiceWatch::start(uuids.clone());
    let (a, b) = (&f.hosts[0].0, &f.hosts[1].0);
    for u in &uuids {
        assert!(runs_in(a, u));
    }

    let cut_at = std::time::Instant::now();
    match cut {
        Cut::LinkDown => a.ip(&["link", "set", "mgmt0", "down"]),
        Cut::OneWay => a.ip(&["route", "add", "blackhole", "198.19.0.1/32"]),
        Cut::AgentHung => {
            let pid = f.agents[0].child.id().to_string();
            assert!(std::process::Command::new("kill")
                .args(["-STOP", &pid])
                .status()
                .expect("kill")
                .success());
        }
        Cut::AgentKilled => f.agents[0].kill9(),
    }
    // The HA guests die on host-a (by the agent's lease, or its fence
    // keeper when the agent cannot act), then run on host-b, the other
    // host with `public`, with consoles answering there.
    assert!(
        wait_until(Duration::from_secs(30), || !runs_in(a, &uuids[0])
            && !runs_in(a, &uuids[1])),
        "{cut:?}: HA guests still run on host-a"
    );
    let died = cut_at.elapsed();
    assert!(
        wait_until(Duration::from_secs(30), || ["ha1", "ha2"].iter().all(|n| {
            let v = listed(&f, n);
            v["host"] == "host-b" && v["state"] == "running"
        })),
        "{cut:?}: HA guests not restarted on host-b: {}",
        text(&f.cli(&["list", "--all"]))
    );
    let restarted = cut_at.elapsed();
    for (n, u) in ["ha1", "ha2"].iter().zip(&uuids) {
        assert!(runs_in(b, u), "{n} not on host-b");
        assert_eq!(listed(&f, n)["incarnation"], 1, "{n}");
        let o = f.cli(&["domdisplay", n]);
        let uri = text(&o).trim().to_string();
        let addr: SocketAddr = uri
            .split_whitespace()
            .next()
            .and_then(|u| u.strip_prefix("vnc://"))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{n}: {uri}"));
        assert_eq!(addr.ip(), ip("198.18.2.1"), "{n}: {uri}");
        let banner = b.run(move || rfb_banner(addr.ip(), addr.port()));
        assert!(
            banner.is_ok_and(|s| s.starts_with("RFB ")),
            "{n}: no console at {addr}"
        );
    }
    // The non-HA guest runs on where it was; nobody restarts it.
    assert!(runs_in(a, &uuids[2]), "{cut:?}: plain guest killed");
    assert_eq!(listed(&f, "plain")["host"], "host-a");
    let events = text(&f.cli(&["events"]));
    assert!(
        events.contains("host host-a fenced: silent for"),
        "{events}"
    );
    // Never before L × (1 + ρ) + W + margin after host-a was last heard.
    let silent: f64 = events
        .split("host host-a fenced: silent for ")
        .nth(1)
        .and_then(|r| r.split('s').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    let w = if watchdog.is_some() { 1.0 } else { 0.0 };
    assert!(silent >= 4.0 * 1.001 + w + 1.0 - 0.05, "{events}");
    if let Some(file) = &watchdog {
        // Its HA guests are dead, so the fence holds: still petted.
        let before = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        assert!(
            wait_until(Duration::from_secs(10), || std::fs::metadata(file)
                .map(|m| m.len())
                .unwrap_or(0)
                > before),
            "the watchdog went unpetted although every HA guest is dead"
        );
    }
    assert!(
        events.contains("vm ha1 restarted on host-b: host host-a was fenced"),
        "{events}"
    );
    eprintln!(
        "{cut:?}: HA guests dead on host-a {:.1}s and running on host-b {:.1}s after the cut",
        died.as_secs_f64(),
        restarted.as_secs_f64()
    );

    // Heal: host-a comes back and runs none of the fenced VMs.
    match cut {
        Cut::LinkDown => a.ip(&["link", "set", "mgmt0", "up"]),
        Cut::OneWay => a.ip(&["route", "del", "blackhole", "198.19.0.1/32"]),
        Cut::AgentHung => {
            let pid = f.agents[0].child.id().to_string();
            assert!(std::process::Command::new("kill")
                .args(["-CONT", &pid])
                .status()
                .expect("kill")
                .success());
        }
        Cut::AgentKilled => {
            let tls = f.tls.to_str().expect("utf8").to_string();
            let (ns, dirs, name) = &f.hosts[0];
            f.agents[0] =
                AgentDaemon::start(ns, name, dirs, &["--coordinator", COORD, "--tls-dir", &tls]);
        }
    }
    assert!(
        wait_until(Duration::from_secs(30), || text(&f.cli(&["hosts"]))
            .lines()
            .any(|l| l.starts_with("host-a") && l.contains(" connected "))),
        "{cut:?}: host-a never came back: {}",
        text(&f.cli(&["hosts"]))
    );
    assert!(
        wait_until(Duration::from_secs(10), || listed(&f, "plain")["state"]
            == "running"),
        "{}",
        text(&f.cli(&["list", "--all"]))
    );
    for (n, u) in ["ha1", "ha2"].iter().zip(&uuids) {
        assert!(!runs_in(a, u), "{cut:?}: {n} runs on host-a again");
        assert!(runs_in(b, u), "{cut:?}: {n} left host-b");
        assert_eq!(listed(&f, n)["host"], "host-b");
    }
    assert!(runs_in(a, &uuids[2]));
    let most = watch.stop();
    assert_eq!(
        most,
        vec![1, 1, 1],
        "{cut:?}: a VM ran twice at some sample"
    );
}

#[test]
fn ha_guests_of_a_host_whose_link_goes_down_restart_elsewhere() {
    ha_guests_restart_elsewhere_and_never_run_twice(Cut::LinkDown);
}

#[test]
fn ha_guests_of_a_host_cut_off_one_way_restart_elsewhere() {
    ha_guests_restart_elsewhere_and_never_run_twice(Cut::OneWay);
}

#[test]
fn ha_guests_of_a_host_whose_agent_hangs_are_killed_by_its_fence_keeper() {
    ha_guests_restart_elsewhere_and_never_run_twice(Cut::AgentHung);
}

#[test]
fn ha_guests_of_a_host_whose_agent_dies_are_killed_by_its_fence_keeper() {
    ha_guests_restart_elsewhere_and_never_run_twice(Cut::AgentKilled);
}
