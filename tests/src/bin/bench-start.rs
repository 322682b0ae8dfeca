//! Start latency and footprint: bare QEMU, `flotilla start` and `virsh start`
//! of the same 64 MiB diskless guest whose console listens on network
//! `public`, without and with one NIC on `public`, on one namespace host,
//! alternating round by round; then the
//! agent's and libvirtd's idle footprint with 0 and 10 VMs.
//!
//! Run as root after `cargo build --release --workspace --bins`:
//! `target/release/bench-start [ROUNDS]`. Needs libvirt (deploy/bench.sh
//! installs it). Creates and removes its own namespace; touches nothing else.

#![allow(clippy::expect_used)]

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_tests::{
    cpu_seconds, flotilla, median, output, quantile, rss_mib, AgentDaemon, AgentDirs,
    CoordinatorProcess, LibvirtDaemon, Netns,
};

/// The coordinator's listen address, inside the host namespace.
const COORD: &str = "127.0.0.1:7443";
/// br0's address: where `public` resolves on this host.
const PUBLIC: &str = "198.18.31.1";
/// The same `public` for the agent and for libvirt.
const PUBLIC_NET: &str =
    "<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>";

/// The benchmark guest: 64 MiB, no disk, one VNC console on `public`.
fn domain(name: &str, kvm: bool) -> String {
    with_devices(name, kvm, "")
}

/// The benchmark guest with one virtio NIC on `public` (a tap on br0).
fn domain_with_nic(name: &str, kvm: bool) -> String {
    with_devices(
        name,
        kvm,
        "<interface type='network'><mac address='52:54:00:be:00:01'/>\
         <source network='public'/><model type='virtio'/></interface>",
    )
}

fn with_devices(name: &str, kvm: bool, extra: &str) -> String {
    format!(
        "<domain type='{}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>{extra}\
         <graphics type='vnc'><listen type='network' network='public'/></graphics>\
         </devices></domain>",
        if kvm { "kvm" } else { "qemu" }
    )
}

/// Waits, from inside `ns`, until a VNC server at `port` sends its RFB banner;
/// returns the time since `t0`.
fn until_rfb(ns: &Netns, port: u16, t0: Instant) -> f64 {
    ns.run(move || {
        let addr = SocketAddr::new(PUBLIC.parse::<IpAddr>().expect("ip"), port);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut b = [0u8; 12];
                if std::io::Read::read_exact(&mut s, &mut b).is_ok() && b.starts_with(b"RFB ") {
                    return t0.elapsed().as_secs_f64() * 1000.0;
                }
            }
            assert!(Instant::now() < deadline, "no RFB banner on {addr}");
            std::thread::sleep(Duration::from_micros(500));
        }
    })
}

/// One markdown row: runs, median and p10–p90 of `v`.
fn row(label: &str, v: &[f64]) {
    println!(
        "| {label} | {} | {:.0} | {:.0}–{:.0} |",
        v.len(),
        median(v),
        quantile(v, 0.1),
        quantile(v, 0.9)
    );
}

/// Average CPU % of `pid` over `window`, and its RSS at the end.
fn footprint(pid: u32, window: Duration) -> (f64, f64) {
    let (c0, t0) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(window);
    let cpu = (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64() * 100.0;
    (cpu, rss_mib(pid))
}

/// Times the three start paths round by round, then measures the footprint.
fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let kvm = flotilla_agent::qemu_process::kvm_usable();
    let work = tempfile::Builder::new()
        .permissions(<std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755))
        .prefix("flt-bench-start-")
        .tempdir_in("/tmp")
        .expect("tmp");
    let tls = work.path().join("tls");
    let mut c = Command::new(flotilla_tests::bin("flotilla"));
    c.args(["certs", "init", "--dir"]).arg(&tls);
    assert!(output(c).status.success());
    let mut c = Command::new(flotilla_tests::bin("flotilla"));
    c.args(["certs", "issue", "--agent", "host-a", "--dir"])
        .arg(&tls);
    assert!(output(c).status.success());

    let host = Netns::new("bstart");
    host.bridge("br0", Some(&format!("{PUBLIC}/24")));
    // Ten idle 1-vCPU guests for the footprint must fit on a 2-core machine.
    let _coordinator = CoordinatorProcess::start_with(
        &host,
        COORD,
        &work.path().join("data"),
        &tls,
        &work.path().join("coordinator.log"),
        &["--cpu-overcommit", "8"],
    );
    let dirs = AgentDirs::new();
    dirs.network("public", PUBLIC_NET);
    let tls_s = tls.to_str().expect("utf8").to_string();
    let agent = AgentDaemon::start(
        &host,
        "host-a",
        &dirs,
        &["--coordinator", COORD, "--tls-dir", &tls_s],
    );
    let fl = |args: &[&str]| flotilla(&host, COORD, &tls, args);
    assert!(flotilla_tests::wait_until(Duration::from_secs(20), || {
        String::from_utf8_lossy(&fl(&["hosts"]).stdout).contains(" connected ")
    }));
    let libvirt = LibvirtDaemon::start(&host, &work.path().join("libvirt"));
    let net = work.path().join("public.xml");
    std::fs::write(&net, PUBLIC_NET).expect("net");
    libvirt.virsh_ok(&["net-define", net.to_str().expect("utf8")]);
    libvirt.virsh_ok(&["net-start", "public"]);

    let xml = work.path().join("startbench.xml");
    std::fs::write(&xml, domain("startbench", kvm)).expect("xml");
    let xml_s = xml.to_str().expect("utf8");
    assert!(fl(&["define", xml_s]).status.success());
    libvirt.virsh_ok(&["define", xml_s]);
    let nic_xml = work.path().join("nicbench.xml");
    std::fs::write(&nic_xml, domain_with_nic("nicbench", kvm)).expect("xml");
    let nic_s = nic_xml.to_str().expect("utf8");
    assert!(fl(&["define", nic_s]).status.success());
    libvirt.virsh_ok(&["define", nic_s]);

    let accel = if kvm { "kvm" } else { "tcg" };
    let (mut bare, mut ours, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ours_nic, mut theirs_nic) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        // (a) bare QEMU, hand-written args: exec until the RFB banner.
        let t0 = Instant::now();
        let mut q: Child = host
            .command(Path::new("qemu-system-x86_64"))
            .args(["-machine", "pc", "-accel", accel, "-m", "64", "-nodefaults"])
            .args(["-vga", "std", "-display", "none", "-vnc"])
            .arg(format!("{PUBLIC}:0"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu");
        bare.push(until_rfb(&host, 5900, t0));
        let _ = q.kill();
        let _ = q.wait();

        // (b) flotilla start: the CLI returns once the agent has read the RFB banner.
        let t0 = Instant::now();
        let o = fl(&["start", "startbench"]);
        ours.push(t0.elapsed().as_secs_f64() * 1000.0);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success() && text.contains(&format!("vnc://{PUBLIC}:5900")),
            "{text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(fl(&["destroy", "startbench"]).status.success());

        // (c) virsh start, then the RFB banner at the address libvirt resolved.
        let t0 = Instant::now();
        libvirt.virsh_ok(&["start", "startbench"]);
        theirs.push(until_rfb(&host, 5900, t0));
        // Untimed: the banner came from where libvirt itself resolved `public`.
        let shown = libvirt.virsh_ok(&["domdisplay", "startbench"]);
        assert_eq!(
            shown.trim(),
            format!("vnc://{PUBLIC}:0"),
            "libvirt's console"
        );
        libvirt.virsh_ok(&["destroy", "startbench"]);

        // (d) and (e): the same with one NIC, a tap on br0 for each.
        let t0 = Instant::now();
        let o = fl(&["start", "nicbench"]);
        ours_nic.push(t0.elapsed().as_secs_f64() * 1000.0);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(fl(&["destroy", "nicbench"]).status.success());
        let t0 = Instant::now();
        libvirt.virsh_ok(&["start", "nicbench"]);
        theirs_nic.push(until_rfb(&host, 5900, t0));
        libvirt.virsh_ok(&["destroy", "nicbench"]);
    }
    println!("| path | runs | median ms | p10–p90 ms |");
    println!("|---|---|---|---|");
    row("(a) bare `qemu-system-x86_64`, exec → RFB banner", &bare);
    row(
        "(b) `flotilla start` (CLI → coordinator → agent, console confirmed)",
        &ours,
    );
    row("(c) `virsh start` → RFB banner", &theirs);
    row("(d) `flotilla start`, one NIC (tap on br0)", &ours_nic);
    row(
        "(e) `virsh start`, one NIC (tap on br0) → RFB banner",
        &theirs_nic,
    );
    println!();
    println!(
        "One NIC costs Flotilla {:.0} ms ((d)−(b)) and libvirt {:.0} ms ((e)−(c)).",
        median(&ours_nic) - median(&ours),
        median(&theirs_nic) - median(&theirs)
    );
    println!(
        "Overhead (b)−(a): {:.0} ms. Ratio (b)/(c): {:.2}. Ratio (b)/(a): {:.2}.",
        median(&ours) - median(&bare),
        median(&ours) / median(&theirs),
        median(&ours) / median(&bare)
    );

    // 6. Footprint: idle, then with 10 running VMs, each daemon on its own.
    let window = Duration::from_secs(10);
    let agent_pid = agent.child.id();
    let libvirtd_pid = libvirt.child.id();
    let (agent_cpu0, agent_rss0) = footprint(agent_pid, window);
    let (lv_cpu0, lv_rss0) = footprint(libvirtd_pid, window);
    for i in 0..10 {
        let name = format!("idle{i}");
        let f = work.path().join(format!("{name}.xml"));
        std::fs::write(&f, domain(&name, kvm)).expect("xml");
        assert!(fl(&["define", f.to_str().expect("utf8")]).status.success());
        let o = fl(&["start", &name]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (agent_cpu10, agent_rss10) = footprint(agent_pid, window);
    for i in 0..10 {
        assert!(fl(&["destroy", &format!("idle{i}")]).status.success());
    }
    for i in 0..10 {
        let name = format!("idle{i}");
        let f = work.path().join(format!("{name}.xml"));
        libvirt.virsh_ok(&["define", f.to_str().expect("utf8")]);
        libvirt.virsh_ok(&["start", &name]);
    }
    let (lv_cpu10, lv_rss10) = footprint(libvirtd_pid, window);
    for i in 0..10 {
        libvirt.virsh_ok(&["destroy", &format!("idle{i}")]);
    }
    println!();
    println!("| daemon | VMs | RSS MiB | CPU % (10 s idle) |");
    println!("|---|---|---|---|");
    println!("| flotilla-agent | 0 | {agent_rss0:.1} | {agent_cpu0:.2} |");
    println!("| flotilla-agent | 10 | {agent_rss10:.1} | {agent_cpu10:.2} |");
    println!("| libvirtd | 0 | {lv_rss0:.1} | {lv_cpu0:.2} |");
    println!("| libvirtd | 10 | {lv_rss10:.1} | {lv_cpu10:.2} |");
    println!();
    println!(
        "The agent heartbeats to its coordinator every second with fresh facts \
         (a QMP query-status per VM); libvirtd has no such duty."
    );
}
