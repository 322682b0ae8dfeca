//! The agent resolves `<listen type='network'>` on the host where the VM starts,
//! and QEMU's console really listens there: real QEMU, real namespaces, real
//! VNC and SPICE handshakes from a client outside the host.

#![allow(clippy::expect_used)]

use std::net::IpAddr;
use std::path::Path;

use flotilla_tests::{
    agent_command, domain_xml, new_uuid, output, qemu_pids_for, refused, rfb_banner,
    rfb_security_types, spice_link, AgentDaemon, AgentDirs, Netns,
};

const VNC_PUBLIC: &str =
    "<graphics type='vnc'><listen type='network' network='public'/></graphics>";
const BRIDGE_PUBLIC: &str =
    "<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip literal")
}

struct Started {
    code: i32,
    stdout: String,
    stderr: String,
}

fn once_start(ns: &Netns, host: &str, dirs: &AgentDirs, file: &Path, extra: &[&str]) -> Started {
    let mut c = agent_command(ns, host, dirs);
    c.args(extra).arg("--once-start").arg(file);
    let out = output(c);
    Started {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ctl(ns: &Netns, host: &str, dirs: &AgentDirs, args: &[&str]) -> Started {
    let mut c = agent_command(ns, host, dirs);
    c.arg("ctl").args(args);
    let out = output(c);
    Started {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A host with `br0` at 198.18.1.1 and an outside client on that bridge.
fn bridge_host() -> (Netns, Netns) {
    let host = Netns::new("host");
    let client = Netns::new("client");
    host.bridge("br0", Some("198.18.1.1/24"));
    host.veth_to("vc0", None, Some("br0"), &client, "eth0", "198.18.1.100/24");
    (host, client)
}

#[test]
fn vnc_on_a_bridge_network_listens_on_the_bridge_address_only() {
    let (host, client) = bridge_host();
    let dirs = AgentDirs::new();
    dirs.network("public", BRIDGE_PUBLIC);
    let uuid = new_uuid();
    let f = dirs.file("web01.xml", &domain_xml("web01", &uuid, VNC_PUBLIC));
    let r = once_start(&host, "host-a", &dirs, &f, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("console: vnc://198.18.1.1:5900"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("<listen type=\"network\" address=\"198.18.1.1\" network=\"public\"/>"),
        "live XML carries the resolved address: {}",
        r.stdout
    );
    assert!(
        r.stderr.contains("with no password or TLS"),
        "warned: {}",
        r.stderr
    );
    let banner = client
        .run(|| rfb_banner(ip("198.18.1.1"), 5900))
        .expect("VNC answers");
    assert!(banner.starts_with("RFB 003.00"), "{banner:?}");
    assert!(
        host.run(|| refused(ip("127.0.0.1"), 5900)),
        "nothing on loopback"
    );
    assert_eq!(qemu_pids_for(&uuid).len(), 1);
}

#[test]
fn vnc_on_a_macvtap_style_network_listens_on_the_uplink_address() {
    let host = Netns::new("host");
    let client = Netns::new("client");
    // No dummy driver here: a veth pair stands in for the uplink NIC.
    host.veth_to(
        "uplink0",
        Some("198.18.2.1/24"),
        None,
        &client,
        "eth0",
        "198.18.2.100/24",
    );
    let dirs = AgentDirs::new();
    dirs.network(
        "public",
        "<network><name>public</name><forward mode='bridge' dev='uplink0'/></network>",
    );
    let f = dirs.file("web01.xml", &domain_xml("web01", &new_uuid(), VNC_PUBLIC));
    let r = once_start(&host, "host-b", &dirs, &f, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("console: vnc://198.18.2.1:5900"),
        "{}",
        r.stdout
    );
    let banner = client
        .run(|| rfb_banner(ip("198.18.2.1"), 5900))
        .expect("VNC answers");
    assert!(banner.starts_with("RFB 003.00"), "{banner:?}");
}

#[test]
fn vnc_on_a_nat_network_listens_on_the_networks_ip() {
    let host = Netns::new("host");
    let client = Netns::new("client");
    // What libvirt would have set up for an active NAT network.
    host.bridge("virbr1", Some("198.18.3.1/24"));
    host.veth_to(
        "vc0",
        None,
        Some("virbr1"),
        &client,
        "eth0",
        "198.18.3.100/24",
    );
    let dirs = AgentDirs::new();
    dirs.network(
        "public",
        "<network><name>public</name><forward mode='nat'/><bridge name='virbr1'/>\
         <ip address='198.18.3.1' netmask='255.255.255.0'/></network>",
    );
    let f = dirs.file("web01.xml", &domain_xml("web01", &new_uuid(), VNC_PUBLIC));
    let r = once_start(&host, "host-c", &dirs, &f, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("console: vnc://198.18.3.1:5900"),
        "{}",
        r.stdout
    );
    let banner = client
        .run(|| rfb_banner(ip("198.18.3.1"), 5900))
        .expect("VNC answers");
    assert!(banner.starts_with("RFB 003.00"), "{banner:?}");
}

#[test]
fn spice_on_a_network_completes_a_link_handshake_there() {
    let (host, client) = bridge_host();
    let dirs = AgentDirs::new();
    dirs.network("public", BRIDGE_PUBLIC);
    let f = dirs.file(
        "web01.xml",
        &domain_xml(
            "web01",
            &new_uuid(),
            "<graphics type='spice'><listen type='network' network='public'/></graphics>",
        ),
    );
    let r = once_start(&host, "host-a", &dirs, &f, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("console: spice://198.18.1.1:5900"),
        "{}",
        r.stdout
    );
    assert!(client
        .run(|| spice_link(ip("198.18.1.1"), 5900))
        .expect("SPICE answers"));
    assert!(host.run(|| refused(ip("127.0.0.1"), 5900)));
}

#[test]
fn two_vms_on_one_host_get_ports_5900_and_5901() {
    let (host, client) = bridge_host();
    let dirs = AgentDirs::new();
    dirs.network("public", BRIDGE_PUBLIC);
    for (name, port) in [("web01", 5900), ("web02", 5901)] {
        let f = dirs.file(
            &format!("{name}.xml"),
            &domain_xml(name, &new_uuid(), VNC_PUBLIC),
        );
        let r = once_start(&host, "host-a", &dirs, &f, &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(
            r.stdout
                .contains(&format!("console: vnc://198.18.1.1:{port}")),
            "{}",
            r.stdout
        );
    }
    for port in [5900, 5901] {
        let banner = client
            .run(move || rfb_banner(ip("198.18.1.1"), port))
            .expect("VNC");
        assert!(banner.starts_with("RFB 003.00"), "{port}: {banner:?}");
    }
}

#[test]
fn resolution_errors_use_libvirts_words_and_start_nothing() {
    let host = Netns::new("host");
    host.bridge("br0", None); // a bridge with no address
    let dirs = AgentDirs::new();
    let uuid = new_uuid();
    let f = dirs.file("web01.xml", &domain_xml("web01", &uuid, VNC_PUBLIC));
    let cases: &[(Option<&str>, &str)] = &[
        (None, "no network with matching name 'public' on host host-e"),
        (Some(BRIDGE_PUBLIC), "no IP address found for interface 'br0'"),
        (
            Some("<network><name>public</name><forward mode='bridge'/><bridge name='br9'/></network>"),
            "network 'public' uses interface 'br9', which does not exist on host host-e",
        ),
        (
            Some("<network><name>public</name><forward mode='nat'/></network>"),
            "network 'public' doesn't have an IP address",
        ),
        (
            Some("<network><name>public</name><forward mode='bridge'/></network>"),
            "network 'public' has no associated interface or bridge",
        ),
        (
            Some("<network><name>public</name><forward mode='hostdev'/></network>"),
            "network 'public' has forward mode='hostdev', which passes PCI devices to guests",
        ),
    ];
    for (net, want) in cases {
        let _ = std::fs::remove_file(dirs.nets().join("public.xml"));
        if let Some(xml) = net {
            dirs.network("public", xml);
        }
        let r = once_start(&host, "host-e", &dirs, &f, &[]);
        assert_eq!(r.code, 1, "{want}: {}", r.stderr);
        assert!(r.stderr.contains(want), "expected {want:?} in {}", r.stderr);
        assert!(
            qemu_pids_for(&uuid).is_empty(),
            "{want}: a QEMU was left running"
        );
    }
}

#[test]
fn require_policy_refuses_open_consoles_and_passwords_go_over_qmp() {
    let (host, client) = bridge_host();
    let dirs = AgentDirs::new();
    dirs.network("public", BRIDGE_PUBLIC);
    let open_uuid = new_uuid();
    let open = dirs.file("open.xml", &domain_xml("open", &open_uuid, VNC_PUBLIC));
    let r = once_start(
        &host,
        "host-a",
        &dirs,
        &open,
        &["--console-auth", "require"],
    );
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stderr.contains("console_auth = \"require\" refuses that"),
        "{}",
        r.stderr
    );
    assert!(qemu_pids_for(&open_uuid).is_empty());

    let uuid = new_uuid();
    let locked = dirs.file(
        "locked.xml",
        &domain_xml(
            "locked",
            &uuid,
            "<graphics type='vnc' passwd='Sw0rdfish,x'><listen type='network' network='public'/></graphics>",
        ),
    );
    let r = once_start(
        &host,
        "host-a",
        &dirs,
        &locked,
        &["--console-auth", "require"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Security type 2 is VNC authentication: the password reached QEMU.
    let types = client
        .run(|| rfb_security_types(ip("198.18.1.1"), 5900))
        .expect("RFB");
    assert_eq!(types, vec![2]);
    let pids = qemu_pids_for(&uuid);
    assert_eq!(pids.len(), 1);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).expect("cmdline");
    assert!(
        !String::from_utf8_lossy(&cmdline).contains("Sw0rdfish"),
        "password leaked into argv"
    );
}

#[test]
fn a_killed_agent_reattaches_to_all_its_vms_and_reuses_no_port() {
    let (host, client) = bridge_host();
    let dirs = AgentDirs::new();
    dirs.network("public", BRIDGE_PUBLIC);
    let mut daemon = AgentDaemon::start(&host, "host-a", &dirs, &[]);
    let mut uuids = Vec::new();
    for name in ["vm1", "vm2", "vm3"] {
        let uuid = new_uuid();
        let f = dirs.file(&format!("{name}.xml"), &domain_xml(name, &uuid, VNC_PUBLIC));
        let r = ctl(
            &host,
            "host-a",
            &dirs,
            &["start", f.to_str().expect("utf8")],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        uuids.push(uuid);
    }
    let pids_before: Vec<Vec<i32>> = uuids.iter().map(|u| qemu_pids_for(u)).collect();
    daemon.kill9();
    for (u, before) in uuids.iter().zip(&pids_before) {
        assert_eq!(
            &qemu_pids_for(u),
            before,
            "killing the agent killed a guest"
        );
    }
    let _daemon = AgentDaemon::start(&host, "host-a", &dirs, &[]);
    let list = ctl(&host, "host-a", &dirs, &["list", "--json"]);
    assert_eq!(list.code, 0, "{}", list.stderr);
    for (name, before) in ["vm1", "vm2", "vm3"].iter().zip(&pids_before) {
        assert!(
            list.stdout.contains(&format!("\"name\": \"{name}\"")),
            "{}",
            list.stdout
        );
        assert!(
            list.stdout.contains(&format!("\"pid\": {}", before[0])),
            "{}",
            list.stdout
        );
    }
    assert_eq!(
        list.stdout.matches("\"state\": \"running\"").count(),
        3,
        "{}",
        list.stdout
    );
    for port in [5900, 5901, 5902] {
        let banner = client
            .run(move || rfb_banner(ip("198.18.1.1"), port))
            .expect("VNC");
        assert!(banner.starts_with("RFB 003.00"), "{port}: {banner:?}");
    }
    // No duplicates, and the next VM gets a port none of the re-attached ones hold.
    for (u, before) in uuids.iter().zip(&pids_before) {
        assert_eq!(&qemu_pids_for(u), before);
    }
    let f = dirs.file("vm4.xml", &domain_xml("vm4", &new_uuid(), VNC_PUBLIC));
    let r = ctl(
        &host,
        "host-a",
        &dirs,
        &["start", f.to_str().expect("utf8")],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("console: vnc://198.18.1.1:5903"),
        "{}",
        r.stdout
    );
    // Starting a running VM again is refused.
    let again = dirs.file("vm1.xml", &domain_xml("vm1", &uuids[0], VNC_PUBLIC));
    let r = ctl(
        &host,
        "host-a",
        &dirs,
        &["start", again.to_str().expect("utf8")],
    );
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("domain 'vm1' is already running on host host-a"),
        "{}",
        r.stderr
    );
}

#[test]
fn shutdown_escalates_to_quit_and_destroy_kills() {
    let (host, _client) = bridge_host();
    let dirs = AgentDirs::new();
    dirs.network("public", BRIDGE_PUBLIC);
    let _daemon = AgentDaemon::start(&host, "host-a", &dirs, &[]);
    let (u1, u2) = (new_uuid(), new_uuid());
    for (name, uuid) in [("vm1", &u1), ("vm2", &u2)] {
        let f = dirs.file(&format!("{name}.xml"), &domain_xml(name, uuid, VNC_PUBLIC));
        let r = ctl(
            &host,
            "host-a",
            &dirs,
            &["start", f.to_str().expect("utf8")],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    // A diskless SeaBIOS guest has no ACPI handler running: power-down is ignored.
    let r = ctl(
        &host,
        "host-a",
        &dirs,
        &["shutdown", "vm1", "--timeout", "1"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("guest ignored ACPI power-down"),
        "{}",
        r.stdout
    );
    assert!(qemu_pids_for(&u1).is_empty());
    let r = ctl(&host, "host-a", &dirs, &["destroy", "vm2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(qemu_pids_for(&u2).is_empty());
    let list = ctl(&host, "host-a", &dirs, &["list", "--json"]);
    assert!(!list.stdout.contains("\"name\""), "{}", list.stdout);
    let r = ctl(&host, "host-a", &dirs, &["destroy", "vm2"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("domain 'vm2' is not running on host host-a"),
        "{}",
        r.stderr
    );
}

#[test]
fn net_list_shows_addresses_and_errors_and_follows_reload() {
    let host = Netns::new("host");
    host.bridge("br0", Some("198.18.1.1/24"));
    let dirs = AgentDirs::new();
    dirs.network("public", BRIDGE_PUBLIC);
    dirs.network(
        "dead",
        "<network><name>dead</name><forward mode='bridge' dev='nope0'/></network>",
    );
    let daemon = AgentDaemon::start(&host, "host-a", &dirs, &[]);
    let r = ctl(&host, "host-a", &dirs, &["net-list"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.lines().any(|l| l.starts_with("public")
            && l.contains("bridge")
            && l.contains("br0")
            && l.ends_with("198.18.1.1")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(
            "error: network 'dead' uses interface 'nope0', which does not exist on host host-a"
        ),
        "{}",
        r.stdout
    );
    // Addresses change: resolution is afresh every time.
    host.ip(&["addr", "flush", "dev", "br0"]);
    host.ip(&["addr", "add", "198.18.1.7/24", "dev", "br0"]);
    dirs.network(
        "lab",
        "<network><name>lab</name><ip address='198.18.9.1' prefix='24'/></network>",
    );
    let r = ctl(&host, "host-a", &dirs, &["reload"]);
    assert!(r.stdout.contains("reloaded 3 network(s)"), "{}", r.stdout);
    let r = ctl(&host, "host-a", &dirs, &["net-list"]);
    assert!(r.stdout.contains("198.18.1.7"), "{}", r.stdout);
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("lab") && l.ends_with("198.18.9.1")),
        "{}",
        r.stdout
    );
    // SIGHUP re-reads the directory too.
    dirs.network(
        "late",
        "<network><name>late</name><ip address='198.18.8.1' prefix='24'/></network>",
    );
    let pid = nix::unistd::Pid::from_raw(daemon.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    assert!(
        flotilla_tests::wait_until(std::time::Duration::from_secs(5), || {
            ctl(&host, "host-a", &dirs, &["net-list"])
                .stdout
                .lines()
                .any(|l| l.starts_with("late"))
        }),
        "SIGHUP did not reload the networks directory"
    );
}

#[test]
fn the_counting_guest_boots_and_counts() {
    use flotilla_tests::guest::{counting_disk_image, parse_xp_word, COUNTER_ADDR};
    let (host, _client) = bridge_host();
    let dirs = AgentDirs::new();
    dirs.network("public", BRIDGE_PUBLIC);
    let image = dirs.root.path().join("count.img");
    std::fs::write(&image, counting_disk_image()).expect("image");
    let disk = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/><readonly/></disk>{VNC_PUBLIC}",
        image.display()
    );
    let xml = domain_xml("counter", &new_uuid(), &disk).replace(
        "<os><type arch='x86_64' machine='pc'>hvm</type></os>",
        "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>",
    );
    let f = dirs.file("counter.xml", &xml);
    let _daemon = AgentDaemon::start(&host, "host-a", &dirs, &[]);
    let r = ctl(
        &host,
        "host-a",
        &dirs,
        &["start", f.to_str().expect("utf8")],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let read = || {
        let r = ctl(
            &host,
            "host-a",
            &dirs,
            &[
                "qemu-monitor-command",
                "counter",
                "--hmp",
                &format!("xp /1wx {COUNTER_ADDR:#x}"),
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        parse_xp_word(&r.stdout).unwrap_or_else(|| panic!("unreadable: {:?}", r.stdout))
    };
    let mut first = 0;
    assert!(
        // SeaBIOS takes a few seconds to reach the boot sector.
        flotilla_tests::wait_until(std::time::Duration::from_secs(30), || {
            first = read();
            first > 0
        }),
        "the guest never started counting"
    );
    let mut later = first;
    assert!(
        flotilla_tests::wait_until(std::time::Duration::from_secs(10), || {
            later = read();
            later > first
        }),
        "counter stuck at {first} (then {later})"
    );
}
