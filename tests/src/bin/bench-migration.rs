//! Live-migration benchmark: `flotilla migrate`, libvirt's `virsh migrate
//! --live` between two libvirtds, and a raw QMP migration between two
//! hand-started QEMUs (the floor): same guest, same hosts, alternating runs.
//! Guests: 64 and 512 MiB, idle (no boot device) and dirtying (the counting
//! guest, which rewrites 512 KiB continuously). While one path is timed, the
//! other paths' copies of the guest are paused, so no path shares the two
//! cores with another path's busy vCPU.
//!
//! Run as root after `cargo build --release --workspace --bins`:
//! `target/release/bench-migration [ROUNDS]`. Prints a table of medians and
//! ranges. Creates and removes its own namespaces; touches nothing else.
//!
//! `bench-migration ROUNDS copy-storage` instead moves a guest whose 1 GiB
//! qcow2 disk (256 MiB written) is on each host's own storage (a tmpfs in
//! each agent's and each libvirtd's mount namespace): `flotilla migrate
//! --copy-storage-all` against `virsh migrate --live --copy-storage-all`.

#![allow(clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_tests::guest::{counting_disk_image, parse_xp_word, COUNTER_ADDR};
use flotilla_tests::{
    agent_command, domain_xml, flotilla, median, new_uuid, output, wait_until, LibvirtDaemon,
    Netns, TwoHosts, PUBLIC_BRIDGE,
};

/// The coordinator's listen address, on the management bridge.
const COORD: &str = "198.19.0.1:7443";

/// One path's figures over the rounds.
#[derive(Default)]
struct Sample {
    /// Command to return (or the raw span), per round.
    wall_ms: Vec<f64>,
    /// Guest downtime as the path reports it; NaN when it reports none.
    downtime_ms: Vec<f64>,
    /// Bytes on the migration stream, in MiB; NaN when unreported.
    sent_mib: Vec<f64>,
}

/// Only the figures a path reported (NaN marks a missing one).
fn known(v: &[f64]) -> Vec<f64> {
    v.iter().copied().filter(|x| !x.is_nan()).collect()
}

/// `median (min–max)` of the known figures, `n/a` when there are none.
fn summary(v: &[f64]) -> String {
    let v = known(v);
    if v.is_empty() {
        return "n/a".into();
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.0} ({min:.0}–{max:.0})", median(&v))
}

/// Sets up the fleet and both libvirtds, runs every guest and path, prints the table.
fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let copy_storage = std::env::args().nth(2).as_deref() == Some("copy-storage");
    let mut fleet = TwoHosts::start(&[]);
    let (ctl, a, b, tls, work) = (&fleet.ctl, &fleet.a, &fleet.b, &fleet.tls, &fleet.work);
    let (agents, dirs_of) = (&fleet.agents, &fleet.dirs);
    let image = work.path().join("count.img");
    std::fs::write(&image, counting_disk_image()).expect("image");

    // libvirt: one private libvirtd per host, each defining `public` its own
    // way, exactly as the agents do.
    let lv_a = LibvirtDaemon::start(a, &work.path().join("libvirt-a"));
    let lv_b = LibvirtDaemon::start(b, &work.path().join("libvirt-b"));
    for (lv, public) in [
        (&lv_a, PUBLIC_BRIDGE),
        (
            &lv_b,
            "<network><name>public</name><forward mode='bridge' dev='uplink0'/></network>",
        ),
    ] {
        let f = lv.work.join("public.xml");
        std::fs::write(&f, public).expect("net xml");
        lv.virsh_ok(&["net-define", f.to_str().expect("utf8")]);
        lv.virsh_ok(&["net-start", "public"]);
    }

    if copy_storage {
        let hmp = |on_a: bool, line: &str| {
            let (ns, host, dirs) = if on_a {
                (&a, "host-a", &dirs_of[0])
            } else {
                (&b, "host-b", &dirs_of[1])
            };
            let mut c = agent_command(ns, host, dirs);
            c.args(["ctl", "qemu-monitor-command", "bench-copy", "--hmp", line]);
            String::from_utf8_lossy(&output(c).stdout).into_owned()
        };
        let hosts = Hosts {
            ctl,
            tls,
            agents: [agents[0].child.id(), agents[1].child.id()],
            libvirtds: [&lv_a, &lv_b],
            work: work.path(),
            hmp: &hmp,
        };
        copy_storage_table(&hosts, rounds);
        // The agents go before the libvirtds and namespaces do.
        fleet.agents.clear();
        return;
    }
    println!("| guest | path | runs | wall ms median (range) | downtime ms median (range) | MiB sent median |");
    println!("|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for (workload, mib) in [
        ("idle", 64u64),
        ("idle", 512),
        ("dirtying", 64),
        ("dirtying", 512),
    ] {
        let mut ours = Sample::default();
        let mut raw = Sample::default();
        let mut raw_launch = Sample::default();
        let mut lv = Sample::default();
        let name = format!("bench-{workload}-{mib}");
        let dirtying = workload == "dirtying";
        let disk = if dirtying {
            format!(
                "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
                 <source file='{}'/><target dev='vda' bus='virtio'/><readonly/></disk>",
                image.display()
            )
        } else {
            String::new()
        };
        let mut xml = domain_xml(
            &name,
            &new_uuid(),
            &format!(
                "{disk}<graphics type='vnc'><listen type='network' network='public'/></graphics>"
            ),
        )
        .replace(
            "<memory unit='MiB'>64</memory>",
            &format!("<memory unit='MiB'>{mib}</memory>"),
        );
        if dirtying {
            xml = xml.replace(
                "<os><type arch='x86_64' machine='pc'>hvm</type></os>",
                "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>",
            );
        }
        let file = work.path().join(format!("{name}.xml"));
        std::fs::write(&file, &xml).expect("xml");
        let file_s = file.to_str().expect("utf8");
        assert!(flotilla(ctl, COORD, tls, &["define", file_s])
            .status
            .success());
        assert!(
            flotilla(ctl, COORD, tls, &["start", &name, "--host", "host-a"])
                .status
                .success()
        );
        // The same definition under libvirt, on host-a too.
        lv_a.virsh_ok(&["define", file_s]);
        lv_a.virsh_ok(&["start", &name]);
        // An HMP command to Flotilla's copy on host-a (true) or host-b.
        let hmp = |on_a: bool, line: &str| {
            let (ns, host, dirs) = if on_a {
                (&a, "host-a", &dirs_of[0])
            } else {
                (&b, "host-b", &dirs_of[1])
            };
            let mut c = agent_command(ns, host, dirs);
            c.args(["ctl", "qemu-monitor-command", &name, "--hmp", line]);
            let o = output(c);
            assert!(
                o.status.success(),
                "hmp {line}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        if dirtying {
            assert!(
                wait_until(Duration::from_secs(30), || {
                    parse_xp_word(&hmp(true, &format!("xp /1wx {COUNTER_ADDR:#x}")))
                        .is_some_and(|c| c > 0)
                }),
                "guest did not boot"
            );
        }
        let mut on_a = true;
        for _ in 0..rounds {
            let (to, from_lv, to_lv, dest_ip) = if on_a {
                ("host-b", &lv_a, &lv_b, "198.18.100.2")
            } else {
                ("host-a", &lv_b, &lv_a, "198.18.100.1")
            };
            // A counting guest keeps a vCPU busy, and this machine has two
            // cores: while one path is timed the other paths' copies are
            // paused (untimed), so every path competes with its own guest only.
            from_lv.virsh_ok(&["suspend", &name]);
            // Flotilla: CLI invocation to CLI return, through coordinator and agents.
            let t = Instant::now();
            let o = flotilla(
                ctl,
                COORD,
                tls,
                &["migrate", &name, "--to", to, "--max-downtime", "300"],
            );
            let wall = t.elapsed().as_secs_f64() * 1000.0;
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            assert!(
                o.status.success(),
                "{text}{}",
                String::from_utf8_lossy(&o.stderr)
            );
            ours.wall_ms.push(wall);
            ours.downtime_ms.push(flotilla_downtime_ms(&text));
            ours.sent_mib.push(
                text.split(" transferred")
                    .next()
                    .and_then(|h| h.rsplit(", ").next())
                    .map_or(f64::NAN, parse_size_mib),
            );

            from_lv.virsh_ok(&["resume", &name]);
            // Flotilla's copy now runs on the destination host; reconciliation
            // leaves a `paused` VM alone.
            hmp(!on_a, "stop");
            let status = hmp(!on_a, "info status");
            assert!(status.contains("paused"), "not paused: {status}");

            // libvirt: virsh migrate --live between the two libvirtds, over the fabric.
            // No --unsafe: libvirt's safety check (qemuMigrationSrcIsSafe)
            // refuses writable disks on a local filesystem such as /tmp, or
            // with a cache mode other than none/directsync, but skips
            // read-only disks, and this one is <readonly/>.
            let t = Instant::now();
            let o = {
                let mut c = Command::new("virsh");
                c.args([
                    "-q",
                    "-c",
                    &from_lv.uri(),
                    "migrate",
                    "--live",
                    &name,
                    &to_lv.uri(),
                ])
                .arg("--migrateuri")
                .arg(format!("tcp://{dest_ip}:49300"));
                output(c)
            };
            let wall = t.elapsed().as_secs_f64() * 1000.0;
            assert!(
                o.status.success(),
                "virsh migrate: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            lv.wall_ms.push(wall);
            // The source has no domain left to ask once the command returns;
            // the destination keeps the completed job's statistics.
            let info = to_lv.virsh_ok(&["domjobinfo", &name, "--completed"]);
            lv.downtime_ms.push(libvirt_downtime_ms(&info));
            lv.sent_mib.push(
                jobinfo_field(&info, "Memory processed").map_or(f64::NAN, |v| parse_size_mib(&v)),
            );

            // Raw QMP between two QEMUs started by hand: the floor.
            to_lv.virsh_ok(&["suspend", &name]);
            let r = raw_qmp(a, b, &image, mib, dirtying, work.path());
            to_lv.virsh_ok(&["resume", &name]);
            hmp(!on_a, "cont");
            on_a = !on_a;
            raw.wall_ms.push(r.migrate_ms);
            raw_launch.wall_ms.push(r.with_launch_ms);
            for s in [&mut raw, &mut raw_launch] {
                s.downtime_ms.push(r.downtime_ms);
                s.sent_mib.push(r.sent_mib);
            }
        }
        let _ = flotilla(ctl, COORD, tls, &["destroy", &name]);
        for l in [&lv_a, &lv_b] {
            let _ = l.virsh(&["destroy", &name]);
            let _ = l.virsh(&["undefine", &name]);
        }
        for (label, s) in [
            ("`flotilla migrate`", &ours),
            ("`virsh migrate --live`", &lv),
            ("raw QMP, destination launch included", &raw_launch),
            ("raw QMP, `migrate` to completed only", &raw),
        ] {
            let sent = known(&s.sent_mib);
            println!(
                "| {workload} {mib} MiB | {label} | {} | {} | {} | {} |",
                s.wall_ms.len(),
                summary(&s.wall_ms),
                summary(&s.downtime_ms),
                if sent.is_empty() {
                    "n/a".into()
                } else {
                    format!("{:.1}", median(&sent))
                }
            );
        }
        ratios.push(format!(
            "{workload} {mib} MiB: flotilla/libvirt {:.2}, flotilla/raw-incl-launch {:.2}, \
             flotilla − raw-incl-launch {:.0} ms",
            median(&ours.wall_ms) / median(&lv.wall_ms),
            median(&ours.wall_ms) / median(&raw_launch.wall_ms),
            median(&ours.wall_ms) - median(&raw_launch.wall_ms)
        ));
    }
    println!();
    for r in ratios {
        println!("- {r}");
    }
    fleet.agents.clear();
}

/// What the storage-copy table needs of the set-up.
struct Hosts<'a> {
    ctl: &'a Netns,
    tls: &'a Path,
    /// Each agent's pid: its mount namespace (and its QEMUs') is the host's.
    agents: [u32; 2],
    libvirtds: [&'a LibvirtDaemon; 2],
    work: &'a Path,
    /// An HMP command to Flotilla's copy of the guest on host-a (true) or host-b.
    hmp: &'a dyn Fn(bool, &str) -> String,
}

/// Runs `script` in the mount namespace of `pid`.
fn in_mounts(pid: u32, script: &str) {
    let mut c = Command::new("nsenter");
    c.arg("-t")
        .arg(pid.to_string())
        .args(["-m", "sh", "-c", script]);
    let o = output(c);
    assert!(
        o.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `flotilla migrate --copy-storage-all` and `virsh migrate --live
/// --copy-storage-all` of a guest on a 1 GiB qcow2 with 256 MiB written,
/// each host's copy on storage only it sees, alternating directions.
fn copy_storage_table(h: &Hosts, rounds: usize) {
    let local = h.work.join("local");
    std::fs::create_dir_all(&local).expect("local dir");
    let raw = h.work.join("copy-boot.raw");
    std::fs::write(&raw, counting_disk_image()).expect("image");
    let image = local.join("copy.qcow2");
    let make = format!(
        "qemu-img convert -f raw -O qcow2 {raw} {img} && qemu-img resize -q {img} 1G && \
         qemu-io -f qcow2 -c 'write -P 0xa5 8M 256M' {img} >/dev/null",
        raw = raw.display(),
        img = image.display()
    );
    let lv_pids = [h.libvirtds[0].child.id(), h.libvirtds[1].child.id()];
    // Each agent and each libvirtd gets its own `local`; host-a's two hold
    // the disk, host-b's start empty.
    for pid in h.agents.iter().chain(lv_pids.iter()) {
        in_mounts(*pid, &format!("mount -t tmpfs tmpfs {}", local.display()));
    }
    in_mounts(h.agents[0], &make);
    in_mounts(lv_pids[0], &make);
    let name = "bench-copy";
    let xml = domain_xml(
        name,
        &new_uuid(),
        &format!(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk>",
            image.display()
        ),
    )
    .replace(
        "<os><type arch='x86_64' machine='pc'>hvm</type></os>",
        "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>",
    );
    let file = h.work.join("bench-copy.xml");
    std::fs::write(&file, &xml).expect("xml");
    let file_s = file.to_str().expect("utf8");
    let cli = |args: &[&str]| {
        let o = flotilla(h.ctl, COORD, h.tls, args);
        assert!(
            o.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    cli(&["define", file_s]);
    cli(&["start", name, "--host", "host-a"]);
    h.libvirtds[0].virsh_ok(&["define", file_s]);
    h.libvirtds[0].virsh_ok(&["start", name]);
    let mut ours = Sample::default();
    let mut lv = Sample::default();
    let counting = || {
        parse_xp_word(&(h.hmp)(true, &format!("xp /1wx {COUNTER_ADDR:#x}"))).is_some_and(|c| c > 0)
    };
    assert!(
        wait_until(Duration::from_secs(30), counting),
        "guest did not boot"
    );
    let mut on_a = true;
    for _ in 0..rounds {
        let (from, to, dest_ip) = if on_a {
            (0, 1, "198.18.100.2")
        } else {
            (1, 0, "198.18.100.1")
        };
        // Two cores: the other path's guest is paused while one is timed.
        h.libvirtds[from].virsh_ok(&["suspend", name]);
        let t = Instant::now();
        let text = cli(&[
            "migrate",
            name,
            "--to",
            ["host-a", "host-b"][to],
            "--copy-storage-all",
            "--max-downtime",
            "300",
        ]);
        ours.wall_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        ours.downtime_ms.push(flotilla_downtime_ms(&text));
        h.libvirtds[from].virsh_ok(&["resume", name]);
        (h.hmp)(to == 0, "stop");
        // libvirt creates destination images only inside storage pools:
        // this one is made beforehand, untimed.
        in_mounts(
            lv_pids[to],
            &format!(
                "test -e {img} || qemu-img create -q -f qcow2 {img} 1G",
                img = image.display()
            ),
        );
        let t = Instant::now();
        let o = {
            let mut c = Command::new("virsh");
            c.args([
                "-q",
                "-c",
                &h.libvirtds[from].uri(),
                "migrate",
                "--live",
                "--copy-storage-all",
                name,
                &h.libvirtds[to].uri(),
            ])
            .arg("--migrateuri")
            .arg(format!("tcp://{dest_ip}:49300"));
            output(c)
        };
        let wall = t.elapsed().as_secs_f64() * 1000.0;
        assert!(
            o.status.success(),
            "virsh migrate --copy-storage-all: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        lv.wall_ms.push(wall);
        let info = h.libvirtds[to].virsh_ok(&["domjobinfo", name, "--completed"]);
        lv.downtime_ms.push(libvirt_downtime_ms(&info));
        (h.hmp)(to == 0, "cont");
        on_a = !on_a;
    }
    let _ = flotilla(h.ctl, COORD, h.tls, &["destroy", name]);
    for l in h.libvirtds {
        let _ = l.virsh(&["destroy", name]);
        let _ = l.virsh(&["undefine", name]);
    }
    println!("| disk | path | runs | wall ms median (range) | downtime ms median (range) |");
    println!("|---|---|---|---|---|");
    for (label, s) in [
        ("`flotilla migrate --copy-storage-all`", &ours),
        ("`virsh migrate --live --copy-storage-all`", &lv),
    ] {
        println!(
            "| qcow2 1 GiB, 256 MiB written, local to each host | {label} | {} | {} | {} |",
            s.wall_ms.len(),
            summary(&s.wall_ms),
            summary(&s.downtime_ms)
        );
    }
    println!();
    println!(
        "- flotilla/libvirt wall time {:.2}",
        median(&ours.wall_ms) / median(&lv.wall_ms)
    );
}

/// The downtime `flotilla migrate` reports ("…, downtime 4 ms, 1.76 MiB
/// transferred"); NaN when it reports none.
fn flotilla_downtime_ms(text: &str) -> f64 {
    text.split("downtime ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.trim_end_matches(',').parse().ok())
        .unwrap_or(f64::NAN)
}

/// A field of `virsh domjobinfo`, trimmed.
fn jobinfo_field(info: &str, key: &str) -> Option<String> {
    info.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// `Total downtime: 23 ms` of `virsh domjobinfo --completed`; NaN without it.
fn libvirt_downtime_ms(info: &str) -> f64 {
    jobinfo_field(info, "Total downtime")
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// `1.76 MiB`, `512.000 KiB`, `3 GiB`, `1234 B` → MiB.
fn parse_size_mib(text: &str) -> f64 {
    let mut it = text.split_whitespace();
    let n: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    match it.next() {
        Some("B") | Some("bytes") => n / 1048576.0,
        Some("KiB") => n / 1024.0,
        Some("MiB") => n,
        Some("GiB") => n * 1024.0,
        _ => f64::NAN,
    }
}

/// One raw QMP migration's figures.
struct RawRun {
    /// From spawning the destination QEMU to `completed`.
    with_launch_ms: f64,
    /// From `migrate` to `completed`.
    migrate_ms: f64,
    /// QEMU's own `downtime` from `query-migrate`.
    downtime_ms: f64,
    /// `ram.transferred`, in MiB.
    sent_mib: f64,
}

/// Migrates a freshly booted guest from a QEMU in `a` to one in `b` by QMP.
fn raw_qmp(a: &Netns, b: &Netns, image: &Path, mib: u64, dirtying: bool, dir: &Path) -> RawRun {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let src_sock = dir.join(format!("raw-src-{mib}.sock"));
    let dst_sock = dir.join(format!("raw-dst-{mib}.sock"));
    for s in [&src_sock, &dst_sock] {
        let _ = std::fs::remove_file(s);
    }
    // The same accelerator the agent and libvirt pick on this machine.
    let accel = if flotilla_agent::qemu_process::kvm_usable() {
        "kvm"
    } else {
        "tcg"
    };
    let qemu = |ns: &Netns, sock: &Path, extra: &[&str]| {
        let mut c = ns.command(Path::new("qemu-system-x86_64"));
        c.args([
            "-machine",
            "pc",
            "-accel",
            accel,
            "-m",
            &mib.to_string(),
            "-nodefaults",
        ])
        .args(["-display", "none", "-device", "VGA"]);
        if dirtying {
            c.args(["-boot", "order=c", "-drive"])
                .arg(format!(
                    "file={},format=raw,if=none,id=d0,readonly=on",
                    image.display()
                ))
                .args(["-device", "virtio-blk-pci,drive=d0"]);
        }
        c.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c.spawn().expect("qemu")
    };
    // Display :50, clear of the ports the other paths' VMs hold.
    let mut src = qemu(a, &src_sock, &["-vnc", "198.18.1.1:50"]);
    let mut dst = None;
    let result = rt.block_on(async {
        use flotilla_agent::qmp::QmpClient;
        let connect = |p: std::path::PathBuf| async move {
            for _ in 0..5000 {
                let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
                if p.exists() {
                    if let Ok(q) = QmpClient::connect(&p, Duration::from_secs(2), tx).await {
                        return q;
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            panic!("no QMP at {}", p.display());
        };
        let s = connect(src_sock.clone()).await;
        let t = Duration::from_secs(5);
        // Same starting point as the other paths: the guest is counting.
        for _ in 0..600 {
            if !dirtying {
                break;
            }
            let v = s
                .execute(
                    "human-monitor-command",
                    serde_json::json!({"command-line": format!("xp /1wx {COUNTER_ADDR:#x}")}),
                    t,
                )
                .await
                .expect("xp");
            if parse_xp_word(v.as_str().unwrap_or("")).is_some_and(|c| c > 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s.execute(
            "migrate-set-parameters",
            serde_json::json!({"downtime-limit": 300}),
            t,
        )
        .await
        .expect("params");
        // What the orchestrated paths also do: start the destination, paused
        // and listening, then migrate.
        let launched = Instant::now();
        dst = Some(qemu(
            b,
            &dst_sock,
            &[
                "-vnc",
                "198.18.2.1:50",
                "-incoming",
                "tcp:198.18.100.2:49400",
            ],
        ));
        let _d = connect(dst_sock.clone()).await;
        let start = Instant::now();
        s.execute(
            "migrate",
            serde_json::json!({"uri": "tcp:198.18.100.2:49400"}),
            t,
        )
        .await
        .expect("migrate");
        loop {
            let v = s
                .execute("query-migrate", serde_json::Value::Null, t)
                .await
                .expect("query");
            match v["status"].as_str() {
                Some("completed") => {
                    return RawRun {
                        with_launch_ms: launched.elapsed().as_secs_f64() * 1000.0,
                        migrate_ms: start.elapsed().as_secs_f64() * 1000.0,
                        downtime_ms: v["downtime"].as_f64().unwrap_or(f64::NAN),
                        sent_mib: v["ram"]["transferred"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
                    }
                }
                Some("failed") | Some("cancelled") => panic!("raw migration failed: {v}"),
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    });
    let _ = src.kill();
    let _ = src.wait();
    if let Some(mut d) = dst {
        let _ = d.kill();
        let _ = d.wait();
    }
    result
}
