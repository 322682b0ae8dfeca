//! Guest NICs on host-independent networks, with real QEMU in namespace
//! hosts. A diskless guest booting from the network runs QEMU's iPXE ROM,
//! which sends DHCP DISCOVER from the guest MAC a few seconds after start:
//! the traffic these tests watch for with tcpdump on the host side. iPXE
//! stalls under this machine's nested KVM, so the agents run with TCG.
//!
//! host-a defines `public` as bridge br0 (a tap per NIC); host-b defines it
//! as a macvtap on `uplink0`, a veth whose peer `eth0` sits in a third
//! namespace (the "switch"), and has a second network `lan` on bridge br1.

#![allow(clippy::expect_used)]

use std::time::{Duration, Instant};

use flotilla_tests::{
    agent_ctl, domain_xml, incoming_uri, links_in, migration_outcome, new_uuid, qemu_pids_for,
    wait_until, AgentDaemon, AgentDirs, Capture, Netns,
};

const MAC: &str = "52:54:00:7e:00:01";
const MAC2: &str = "52:54:00:7e:00:02";

struct Host {
    ns: Netns,
    dirs: AgentDirs,
    name: &'static str,
    daemon: Option<AgentDaemon>,
}

impl Host {
    fn new(ns: Netns, name: &'static str, networks: &[(&str, &str)]) -> Host {
        let dirs = AgentDirs::new();
        for (n, xml) in networks {
            dirs.network(n, xml);
        }
        dirs.network(
            "migration",
            "<network><name>migration</name><forward mode='bridge' dev='fab0'/></network>",
        );
        let mut h = Host {
            ns,
            dirs,
            name,
            daemon: None,
        };
        h.start_agent();
        h
    }

    fn start_agent(&mut self) {
        self.daemon = Some(AgentDaemon::start(
            &self.ns,
            self.name,
            &self.dirs,
            &["--accel", "tcg", "--migration-network", "migration"],
        ));
    }

    fn ctl(&self, args: &[&str]) -> (i32, String) {
        agent_ctl(&self.ns, self.name, &self.dirs, args)
    }

    fn define(&self, name: &str, uuid: &str, nics: &str) -> String {
        let xml = domain_xml(name, uuid, nics).replace(
            "<os><type arch='x86_64' machine='pc'>hvm</type></os>",
            "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='network'/></os>",
        );
        let path = self.dirs.file(&format!("{name}.xml"), &xml);
        path.to_str().expect("utf8").to_string()
    }

    /// The `ip -d link` line of `dev`, if it exists.
    fn link(&self, dev: &str) -> Option<String> {
        links_in(&self.ns)
            .lines()
            .find(|l| {
                l.split(':').nth(1).map(str::trim) == Some(dev) || l.contains(&format!(": {dev}@"))
            })
            .map(str::to_string)
    }

    fn guest_devices(&self) -> Vec<String> {
        links_in(&self.ns)
            .lines()
            .filter_map(|l| {
                l.split(':')
                    .nth(1)
                    .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            })
            .filter(|n| n.starts_with("vnet") || n.starts_with("macvtap"))
            .collect()
    }

    /// Waits until no tap or macvtap is left on this host.
    fn await_no_guest_devices(&self, what: &str) {
        assert!(
            wait_until(Duration::from_secs(10), || self.guest_devices().is_empty()),
            "{what}: {:?}",
            self.guest_devices()
        );
    }

    fn bridge_fdb(&self, dev: &str) -> String {
        let o = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns.name,
                "bridge",
                "fdb",
                "show",
                "dev",
                dev,
            ])
            .output()
            .expect("bridge fdb");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

fn dhcp_from(mac: &str) -> String {
    format!("ether src {mac} and udp dst port 67")
}

const DHCP_WAIT: Duration = Duration::from_secs(60);

struct Fleet {
    a: Host,
    b: Host,
    switch: Netns,
}

fn fleet() -> Fleet {
    let a = Netns::new("nic-a");
    let b = Netns::new("nic-b");
    let switch = Netns::new("nic-sw");
    a.bridge("br0", Some("198.18.11.1/24"));
    // A tap takes its bridge's MTU.
    a.ip(&["link", "set", "br0", "mtu", "1400"]);
    b.bridge("br1", Some("198.18.13.1/24"));
    b.veth_to(
        "uplink0",
        Some("198.18.12.1/24"),
        None,
        &switch,
        "eth0",
        "198.18.12.100/24",
    );
    a.veth_to(
        "fab0",
        Some("198.18.110.1/24"),
        None,
        &b,
        "fab0",
        "198.18.110.2/24",
    );
    let ha = Host::new(
        a,
        "host-a",
        &[
            (
                "public",
                "<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>",
            ),
            (
                "gone",
                "<network><name>gone</name><forward mode='route'/><bridge name='virbr9'/>\
                 <ip address='198.18.19.1' prefix='24'/></network>",
            ),
            (
                "pci",
                "<network><name>pci</name><forward mode='hostdev' managed='yes'>\
                 <pf dev='eth9'/></forward></network>",
            ),
        ],
    );
    let hb = Host::new(
        b,
        "host-b",
        &[
            (
                "public",
                "<network><name>public</name><forward mode='bridge' dev='uplink0'/></network>",
            ),
            (
                "lan",
                "<network><name>lan</name><forward mode='nat'/><bridge name='br1'/>\
                 <ip address='198.18.13.1' prefix='24'/></network>",
            ),
        ],
    );
    Fleet {
        a: ha,
        b: hb,
        switch,
    }
}

fn nic(network: &str, mac: &str) -> String {
    format!(
        "<interface type='network'><mac address='{mac}'/><source network='{network}'/>\
         <model type='virtio'/></interface>"
    )
}

#[test]
fn a_bridge_host_plumbs_a_tap_that_survives_an_agent_restart() {
    let mut f = fleet();
    let a = &mut f.a;
    let uuid = new_uuid();
    let def = a.define("tapped", &uuid, &nic("public", MAC));
    let capture = Capture::start(&a.ns, "br0", &dhcp_from(MAC));
    let (code, out) = a.ctl(&["start", &def]);
    assert_eq!(code, 0, "{out}");
    // QEMU runs under seccomp filters (libvirt's -sandbox set).
    let pid = qemu_pids_for(&uuid)[0];
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{status}");

    // The guest's DHCP DISCOVER reaches the bridge through its tap.
    let frame = capture.next(DHCP_WAIT).expect("no DHCP DISCOVER on br0");
    assert!(frame.contains(MAC), "{frame}");
    let tap = a.link("vnet0").expect("no vnet0");
    assert!(tap.contains("link/ether fe:54:00:7e:00:01"), "{tap}");
    assert!(tap.contains("master br0"), "{tap}");
    // Not persistent (it goes with QEMU), a virtio header, br0's MTU.
    assert!(
        tap.contains("tun type tap pi off vnet_hdr on persist off"),
        "{tap}"
    );
    assert!(tap.contains(" mtu 1400 "), "{tap}");
    assert!(
        a.bridge_fdb("vnet0").contains(MAC),
        "{}",
        a.bridge_fdb("vnet0")
    );
    let (_, live) = a.ctl(&["dumpxml", "tapped"]);
    assert!(
        live.contains("<target dev=\"vnet0\"/>") || live.contains("<target dev='vnet0'/>"),
        "{live}"
    );
    assert!(
        live.contains("bridge=\"br0\"") || live.contains("bridge='br0'"),
        "{live}"
    );

    // kill -9 and restart: the same tap, still attached, and no new device.
    let index = tap.split(':').next().expect("ifindex").to_string();
    a.daemon.take().expect("daemon").kill9();
    a.start_agent();
    let (_, list) = a.ctl(&["list"]);
    assert!(
        list.contains("tapped") && list.contains("running"),
        "{list}"
    );
    let again = a.link("vnet0").expect("vnet0 gone after restart");
    assert_eq!(again.split(':').next(), Some(index.as_str()), "{again}");
    assert!(again.contains("master br0"), "{again}");
    assert_eq!(a.guest_devices(), ["vnet0"]);

    // Destroy takes the tap with it.
    let (code, out) = a.ctl(&["destroy", "tapped"]);
    assert_eq!(code, 0, "{out}");
    a.await_no_guest_devices("devices left");
    assert!(qemu_pids_for(&uuid).is_empty());
}

#[test]
fn a_macvtap_host_sends_through_its_uplink_and_two_nics_reach_two_networks() {
    let mut f = fleet();
    let b = &mut f.b;
    let uuid = new_uuid();
    let nics = format!("{}{}", nic("public", MAC), nic("lan", MAC2));
    let def = b.define("twonics", &uuid, &nics);
    let uplink = Capture::start(&f.switch, "eth0", &dhcp_from(MAC));
    let lan = Capture::start(&b.ns, "br1", &format!("ether src {MAC2}"));
    let (code, out) = b.ctl(&["start", &def]);
    assert_eq!(code, 0, "{out}");

    let frame = uplink
        .next(DHCP_WAIT)
        .expect("no DHCP DISCOVER past the uplink");
    assert!(frame.contains(MAC), "{frame}");
    let macvtap = b.link("macvtap0").expect("no macvtap0");
    assert!(macvtap.contains("macvtap mode bridge"), "{macvtap}");
    assert!(macvtap.contains("@uplink0"), "{macvtap}");
    assert!(macvtap.contains(&format!("link/ether {MAC}")), "{macvtap}");
    assert!(macvtap.contains("alias flotilla:twonics"), "{macvtap}");
    // iPXE keeps to the first NIC while it waits for an offer; QEMU's
    // announcement goes out of every NIC, so the second shows its frames.
    let (code, out) = b.ctl(&["qemu-monitor-command", "twonics", "--hmp", "announce_self"]);
    assert_eq!(code, 0, "{out}");
    let frame = lan
        .next(Duration::from_secs(20))
        .expect("no frame from the second NIC on br1");
    assert!(frame.contains(MAC2), "{frame}");
    let tap = b.link("vnet0").expect("no vnet0");
    assert!(tap.contains("master br1"), "{tap}");

    // The agent dies, then the guest: the restarted agent removes the
    // macvtap, which would outlive QEMU otherwise (the tap went with it).
    b.daemon.take().expect("daemon").kill9();
    for pid in qemu_pids_for(&uuid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(wait_until(Duration::from_secs(10), || qemu_pids_for(&uuid).is_empty()));
    assert!(b.link("macvtap0").is_some(), "{}", links_in(&b.ns));
    b.start_agent();
    b.await_no_guest_devices("devices left");
}

#[test]
fn a_guest_migrates_from_a_bridge_host_to_a_macvtap_host_and_announces_itself() {
    let f = fleet();
    let (a, b) = (&f.a, &f.b);
    let uuid = new_uuid();
    let def = a.define("roamer", &uuid, &nic("public", MAC));
    let dhcp = Capture::start(&a.ns, "br0", &dhcp_from(MAC));
    let (code, out) = a.ctl(&["start", &def]);
    assert_eq!(code, 0, "{out}");
    dhcp.next(DHCP_WAIT).expect("guest not on the network yet");

    // Prepare: host-b plumbs its own macvtap, down while the source runs.
    let (code, out) = b.ctl(&["migrate-incoming", &def]);
    assert_eq!(code, 0, "{out}");
    let uri = incoming_uri(&out);
    let waiting = b.link("macvtap0").expect("no macvtap0 at prepare");
    assert!(!waiting.contains(",UP"), "{waiting}");

    let rarp = Capture::start(
        &f.switch,
        "eth0",
        &format!("ether src {MAC} and ether proto 0x8035"),
    );
    let (code, out) = a.ctl(&["migrate-out", "roamer", "--uri", &uri]);
    assert_eq!(code, 0, "{out}");
    let last = migration_outcome(&a.ns, a.name, &a.dirs, "roamer", Duration::from_secs(90));
    assert!(last.contains("status: completed"), "{last}");
    let finish = Instant::now();
    let (code, out) = b.ctl(&["migrate-finish", "roamer"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = a.ctl(&["destroy", "roamer"]);
    assert_eq!(code, 0, "{out}");

    // The switch hears the guest's RARP from its new port.
    let (heard, frame) = rarp
        .next_at(Duration::from_secs(20))
        .expect("no RARP from the guest MAC on host-b's uplink");
    assert!(frame.contains(MAC), "{frame}");
    // A measurement for the record, not a target (see BENCHMARKS.md).
    eprintln!(
        "first RARP on the destination's uplink {:.0} ms after migrate-finish was sent",
        heard.duration_since(finish).as_secs_f64() * 1000.0
    );
    a.await_no_guest_devices("the source's tap is still there");
    let (_, live) = b.ctl(&["dumpxml", "roamer"]);
    assert!(
        live.contains("macvtap0") && live.contains("uplink0"),
        "{live}"
    );
    assert!(b.link("macvtap0").is_some_and(|l| l.contains(",UP")));
    let (code, out) = b.ctl(&["destroy", "roamer"]);
    assert_eq!(code, 0, "{out}");
    b.await_no_guest_devices("devices left");
}

#[test]
fn refusals_name_the_network_and_leave_nothing_behind() {
    let f = fleet();
    let a = &f.a;
    let cases = [
        (
            nic("gone", MAC),
            "network 'gone' uses bridge 'virbr9', which does not exist on host host-a",
        ),
        (
            nic("pci", MAC),
            "network 'pci' has forward mode='hostdev' (PCI passthrough)",
        ),
        (
            nic("public", "fe:54:00:7e:00:01"),
            "unable to use MAC address starting with reserved value 0xFE",
        ),
    ];
    for (i, (nics, message)) in cases.iter().enumerate() {
        let uuid = new_uuid();
        let def = a.define(&format!("refused{i}"), &uuid, nics);
        let (code, out) = a.ctl(&["start", &def]);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains(message), "{out}");
        assert!(qemu_pids_for(&uuid).is_empty());
        assert!(a.guest_devices().is_empty(), "{:?}", a.guest_devices());
    }
}
