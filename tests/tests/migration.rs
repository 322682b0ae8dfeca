//! Live migration at the agent level: two namespace hosts that define
//! `public` differently, the counting guest on storage both see, and the
//! prepare / perform / finish / quit steps the coordinator will drive.

#![allow(clippy::expect_used)]

use std::net::IpAddr;
use std::time::Duration;

use flotilla_tests::guest::{counting_disk_image, parse_xp_word, COUNTER_ADDR};
use flotilla_tests::{
    agent_ctl, domain_xml, incoming_uri, migration_outcome, new_uuid, public_and_fabric,
    qemu_pids_for, refused, rfb_banner, wait_until, AgentDaemon, AgentDirs, Netns,
};

struct Host {
    ns: Netns,
    dirs: AgentDirs,
    name: &'static str,
    _daemon: AgentDaemon,
}

impl Host {
    fn ctl(&self, args: &[&str]) -> (i32, String) {
        agent_ctl(&self.ns, self.name, &self.dirs, args)
    }

    fn counter(&self, vm: &str) -> u32 {
        let (code, out) = self.ctl(&[
            "qemu-monitor-command",
            vm,
            "--hmp",
            &format!("xp /1wx {COUNTER_ADDR:#x}"),
        ]);
        assert_eq!(code, 0, "{out}");
        parse_xp_word(&out).unwrap_or_else(|| panic!("unreadable counter: {out:?}"))
    }
}

/// host-a: `public` = bridge br0 at 198.18.1.1; host-b: `public` = uplink
/// veth at 198.18.2.1. Both share a fabric link (198.18.100.0/24) that each
/// defines as network `migration`.
fn two_hosts() -> (Host, Host, Netns) {
    let (a, b, far) = public_and_fabric("mig-");
    let make = |ns: Netns, name: &'static str, public: &str| {
        let dirs = AgentDirs::new();
        dirs.network("public", public);
        dirs.network(
            "migration",
            "<network><name>migration</name><forward mode='bridge' dev='fab0'/></network>",
        );
        let daemon = AgentDaemon::start(&ns, name, &dirs, &["--migration-network", "migration"]);
        Host {
            ns,
            dirs,
            name,
            _daemon: daemon,
        }
    };
    let ha = make(
        a,
        "host-a",
        "<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>",
    );
    let hb = make(
        b,
        "host-b",
        "<network><name>public</name><forward mode='bridge' dev='uplink0'/></network>",
    );
    (ha, hb, far)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn a_running_guest_moves_and_its_console_follows() {
    let (a, b, _far) = two_hosts();
    let image = a.dirs.root.path().join("count.img");
    std::fs::write(&image, counting_disk_image()).expect("image");
    let uuid = new_uuid();
    let devices = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/><readonly/></disk>\
         <graphics type='vnc'><listen type='network' network='public'/></graphics>",
        image.display()
    );
    let xml = domain_xml("mover", &uuid, &devices).replace(
        "<os><type arch='x86_64' machine='pc'>hvm</type></os>",
        "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>",
    );
    let def = a.dirs.file("mover.xml", &xml);
    let def = def.to_str().expect("utf8");

    let (code, out) = a.ctl(&["start", def]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("console: vnc://198.18.1.1:5900"), "{out}");
    assert!(
        wait_until(Duration::from_secs(30), || a.counter("mover") > 0),
        "guest never counted on host-a"
    );

    // Prepare: the destination resolves `public` itself and waits paused.
    let (code, out) = b.ctl(&["migrate-incoming", def]);
    assert_eq!(code, 0, "{out}");
    let uri = incoming_uri(&out);
    assert!(uri.starts_with("tcp:198.18.100.2:"), "{uri}");
    assert_eq!(
        qemu_pids_for(&uuid).len(),
        2,
        "source runs, destination waits"
    );

    // Perform.
    let before = a.counter("mover");
    let (code, out) = a.ctl(&[
        "migrate-out",
        "mover",
        "--uri",
        &uri,
        "--max-downtime",
        "300",
    ]);
    assert_eq!(code, 0, "{out}");
    let last = migration_outcome(&a.ns, a.name, &a.dirs, "mover", Duration::from_secs(60));
    assert!(last.contains("status: completed"), "{last}");
    assert!(last.contains("downtime_ms:"), "{last}");

    // Finish on the destination, then quit the source.
    let (code, out) = b.ctl(&["migrate-finish", "mover"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = a.ctl(&["destroy", "mover"]);
    assert_eq!(code, 0, "{out}");

    // The guest carried on counting: a cold restart would begin at zero.
    let after = b.counter("mover");
    assert!(
        after > before,
        "counter went from {before} to {after}: not a live migration"
    );
    assert!(
        wait_until(Duration::from_secs(10), || b.counter("mover") > after),
        "guest is not running on host-b"
    );
    let (_, list) = b.ctl(&["list", "--json"]);
    assert!(list.contains("\"state\": \"running\""), "{list}");

    // The console moved with it: host-b's own `public` address, not host-a's.
    let (_, display) = b.ctl(&["domdisplay", "mover"]);
    assert!(display.contains("vnc://198.18.2.1:5900"), "{display}");
    let banner =
        b.ns.run(|| rfb_banner(ip("198.18.2.1"), 5900))
            .expect("VNC on host-b");
    assert!(banner.starts_with("RFB 003.00"), "{banner:?}");
    assert!(
        a.ns.run(|| refused(ip("198.18.1.1"), 5900)),
        "host-a still serves the console"
    );
    assert_eq!(qemu_pids_for(&uuid).len(), 1, "exactly one QEMU remains");
}

#[test]
fn a_destination_without_the_disk_refuses_at_prepare() {
    let (a, b, _far) = two_hosts();
    let uuid = new_uuid();
    let devices = "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='/nonexistent/flotilla/disk.img'/><target dev='vda' bus='virtio'/></disk>";
    let def = b.dirs.file("x.xml", &domain_xml("x", &uuid, devices));
    let (code, out) = b.ctl(&["migrate-incoming", def.to_str().expect("utf8")]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("cannot accept VM 'x' on host host-b: disk source /nonexistent/flotilla/disk.img does not exist here"),
        "{out}"
    );
    assert!(qemu_pids_for(&uuid).is_empty());
    let _ = a;
}

#[test]
fn a_destination_with_its_own_file_at_the_same_path_refuses_at_prepare() {
    // host-a and host-c share their storage; host-b has a "local" disk
    // directory of its own (a tmpfs in its private mount namespace) holding a
    // different file at the same path.
    let a = Netns::new("proof-a");
    let b = Netns::new("proof-b");
    let c = Netns::new("proof-c");
    for (ns, ip) in [
        (&a, "198.18.71.1/24"),
        (&b, "198.18.72.1/24"),
        (&c, "198.18.73.1/24"),
    ] {
        ns.bridge("br0", Some(ip));
    }
    let storage = tempfile::Builder::new()
        .permissions(<std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755))
        .prefix("flt-proof-")
        .tempdir_in("/tmp")
        .expect("storage");
    let disk = storage.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let public =
        "<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>";
    let host = |ns: Netns, name: &'static str, setup: Option<String>| {
        let dirs = AgentDirs::new();
        dirs.network("public", public);
        let daemon = match &setup {
            Some(s) => AgentDaemon::start_with_private_mounts(&ns, name, &dirs, &[], s),
            None => AgentDaemon::start(&ns, name, &dirs, &[]),
        };
        Host {
            ns,
            dirs,
            name,
            _daemon: daemon,
        }
    };
    let ha = host(a, "host-a", None);
    let own = storage.path().display().to_string();
    let hb = host(
        b,
        "host-b",
        Some(format!(
            "mount -t tmpfs tmpfs {own} && head -c 1048576 /dev/zero > {own}/disk.img"
        )),
    );
    let hc = host(c, "host-c", None);

    let uuid = new_uuid();
    let devices = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>",
        disk.display()
    );
    let def = ha.dirs.file("w.xml", &domain_xml("w", &uuid, &devices));
    let def = def.to_str().expect("utf8");
    let (code, out) = ha.ctl(&["start", def]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = ha.ctl(&["mark-storage", "w", "--token", "tok-1"]);
    assert_eq!((code, out.trim()), (0, "1 disk(s) marked"));

    // host-b sees a disk.img too, but not the source's.
    let (code, out) = hb.ctl(&["migrate-incoming", def, "--storage-token", "tok-1"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "cannot accept VM 'w' on host host-b: disk vda ({}) is not on storage both hosts \
             share (the marker the source wrote beside it is missing here), and a migration \
             that does not copy it would run the guest on a different disk; \
             --copy-storage-all copies it, --unsafe migrates anyway",
            disk.display()
        )),
        "{out}"
    );
    assert_eq!(qemu_pids_for(&uuid).len(), 1, "nothing started on host-b");
    // `--unsafe` takes the operator's word (as virsh migrate --unsafe does).
    let (code, out) = hb.ctl(&[
        "migrate-incoming",
        def,
        "--storage-token",
        "tok-1",
        "--unsafe",
    ]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = hb.ctl(&["destroy", "w"]);
    assert_eq!(code, 0, "{out}");

    // host-c shares the storage: it reads the token back and waits for the stream.
    let (code, out) = hc.ctl(&["migrate-incoming", def, "--storage-token", "tok-1"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("uri: "), "{out}");
    assert!(
        wait_until(Duration::from_secs(5), || !storage
            .path()
            .join(".disk.img.flotilla-migrate")
            .exists()),
        "the proven marker is removed"
    );
    for h in [&ha, &hc] {
        let (code, out) = h.ctl(&["destroy", "w"]);
        assert_eq!(code, 0, "{out}");
    }
}
