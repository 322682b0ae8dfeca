//! Live-migration benchmark: `flotilla migrate` against a raw QMP migration
//! between two hand-started QEMUs, same guest, same hosts, alternating runs.
//!
//! Run as root after `cargo build --release --workspace --bins`:
//! `target/release/bench-migration [ROUNDS]`. Prints a table of medians and
//! ranges. Creates and removes its own namespaces; touches nothing else.

#![allow(clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_tests::guest::{counting_disk_image, parse_xp_word, COUNTER_ADDR};
use flotilla_tests::{
    agent_command, bin, domain_xml, flotilla, new_uuid, output, wait_until, AgentDaemon, AgentDirs,
    CoordinatorProcess, Netns,
};

const COORD: &str = "198.19.0.1:7443";

#[derive(Default)]
struct Sample {
    wall_ms: Vec<f64>,
    downtime_ms: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn range(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.0}–{max:.0}")
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let work = tempfile::Builder::new()
        .prefix("flt-bench-")
        .tempdir_in("/tmp")
        .expect("tmp");
    let image = work.path().join("count.img");
    std::fs::write(&image, counting_disk_image()).expect("image");
    let tls = work.path().join("tls");
    let mut c = Command::new(bin("flotilla"));
    c.args(["certs", "init", "--dir"]).arg(&tls);
    assert!(output(c).status.success());

    // Topology: coordinator namespace on a management bridge; host-a and
    // host-b with their own `public`, joined by a fabric link for migration.
    let ctl = Netns::new("bctl");
    ctl.bridge("fleet0", Some("198.19.0.1/24"));
    let a = Netns::new("ba");
    let b = Netns::new("bb");
    let far = Netns::new("bfar");
    ctl.veth_to("mg11", None, Some("fleet0"), &a, "mgmt0", "198.19.0.11/24");
    ctl.veth_to("mg12", None, Some("fleet0"), &b, "mgmt0", "198.19.0.12/24");
    a.bridge("br0", Some("198.18.1.1/24"));
    b.veth_to(
        "uplink0",
        Some("198.18.2.1/24"),
        None,
        &far,
        "eth0",
        "198.18.2.100/24",
    );
    a.veth_to(
        "fab0",
        Some("198.18.100.1/24"),
        None,
        &b,
        "fab0",
        "198.18.100.2/24",
    );
    let _coordinator = CoordinatorProcess::start(
        &ctl,
        COORD,
        &work.path().join("data"),
        &tls,
        &work.path().join("coordinator.log"),
    );
    let mut agents = Vec::new();
    let mut dirs_of = Vec::new();
    for (ns, name, public) in [
        (
            &a,
            "host-a",
            "<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>",
        ),
        (
            &b,
            "host-b",
            "<network><name>public</name><forward mode='bridge' dev='uplink0'/></network>",
        ),
    ] {
        let mut c = Command::new(bin("flotilla"));
        c.args(["certs", "issue", "--agent", name, "--dir"])
            .arg(&tls);
        assert!(output(c).status.success());
        let dirs = AgentDirs::new();
        dirs.network("public", public);
        dirs.network(
            "migration",
            "<network><name>migration</name><forward mode='bridge' dev='fab0'/></network>",
        );
        let tls_s = tls.to_str().expect("utf8").to_string();
        agents.push(AgentDaemon::start(
            ns,
            name,
            &dirs,
            &[
                "--coordinator",
                COORD,
                "--tls-dir",
                &tls_s,
                "--migration-network",
                "migration",
            ],
        ));
        dirs_of.push(dirs);
    }
    assert!(wait_until(Duration::from_secs(20), || {
        String::from_utf8_lossy(&flotilla(&ctl, COORD, &tls, &["hosts"]).stdout)
            .matches(" connected ")
            .count()
            == 2
    }));

    println!("| guest | path | runs | wall ms median (range) | downtime ms median (range) |");
    println!("|---|---|---|---|---|");
    for mib in [64u64, 512] {
        let mut ours = Sample::default();
        let mut raw = Sample::default();
        let name = format!("bench{mib}");
        let xml = domain_xml(
            &name,
            &new_uuid(),
            &format!(
                "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/><readonly/></disk>\
             <graphics type='vnc'><listen type='network' network='public'/></graphics>",
                image.display()
            ),
        )
        .replace(
            "<memory unit='MiB'>64</memory>",
            &format!("<memory unit='MiB'>{mib}</memory>"),
        )
        .replace(
            "<os><type arch='x86_64' machine='pc'>hvm</type></os>",
            "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>",
        );
        let file = work.path().join(format!("{name}.xml"));
        std::fs::write(&file, xml).expect("xml");
        assert!(
            flotilla(&ctl, COORD, &tls, &["define", file.to_str().expect("utf8")])
                .status
                .success()
        );
        assert!(
            flotilla(&ctl, COORD, &tls, &["start", &name, "--host", "host-a"])
                .status
                .success()
        );
        let booted = |idx: usize| {
            let (ns, host) = if idx == 0 {
                (&a, "host-a")
            } else {
                (&b, "host-b")
            };
            let mut c = agent_command(ns, host, &dirs_of[idx]);
            c.args(["ctl", "qemu-monitor-command", &name, "--hmp"])
                .arg(format!("xp /1wx {COUNTER_ADDR:#x}"));
            parse_xp_word(&String::from_utf8_lossy(&output(c).stdout)).is_some_and(|c| c > 0)
        };
        assert!(
            wait_until(Duration::from_secs(30), || booted(0)),
            "guest did not boot"
        );
        let mut on_a = true;
        for _ in 0..rounds {
            // Flotilla: CLI invocation to CLI return, through coordinator and agents.
            let to = if on_a { "host-b" } else { "host-a" };
            let t = Instant::now();
            let o = flotilla(
                &ctl,
                COORD,
                &tls,
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
            if let Some(d) = text
                .split("downtime ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
            {
                ours.downtime_ms.push(d.parse().unwrap_or(f64::NAN));
            }
            on_a = !on_a;
            // Raw QMP between two QEMUs started by hand: the floor.
            let (w, d) = raw_qmp(&a, &b, &image, mib, work.path());
            raw.wall_ms.push(w);
            raw.downtime_ms.push(d);
        }
        let _ = flotilla(&ctl, COORD, &tls, &["destroy", &name]);
        for (label, s) in [("flotilla migrate", &ours), ("raw QMP migrate", &raw)] {
            println!(
                "| {mib} MiB | {label} | {} | {:.0} ({}) | {:.0} ({}) |",
                s.wall_ms.len(),
                median(&s.wall_ms),
                range(&s.wall_ms),
                median(&s.downtime_ms),
                range(&s.downtime_ms)
            );
        }
    }
    drop(agents);
}

/// Migrates a freshly booted guest from a QEMU in `a` to one in `b` by QMP.
/// Returns (ms from `migrate` to `completed` seen, QEMU's downtime ms).
fn raw_qmp(a: &Netns, b: &Netns, image: &Path, mib: u64, dir: &Path) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let src_sock = dir.join(format!("raw-src-{mib}.sock"));
    let dst_sock = dir.join(format!("raw-dst-{mib}.sock"));
    let qemu = |ns: &Netns, sock: &Path, extra: &[&str]| {
        let mut c = ns.command(Path::new("qemu-system-x86_64"));
        c.args([
            "-machine",
            "pc",
            "-accel",
            "kvm",
            "-m",
            &mib.to_string(),
            "-nodefaults",
        ])
        .args(["-display", "none", "-device", "VGA", "-boot", "order=c"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=d0,readonly=on",
            image.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        c.spawn().expect("qemu")
    };
    let mut src = qemu(a, &src_sock, &["-vnc", "198.18.1.1:1"]);
    let mut dst = qemu(
        b,
        &dst_sock,
        &[
            "-vnc",
            "198.18.2.1:1",
            "-incoming",
            "tcp:198.18.100.2:49200",
        ],
    );
    let result = rt.block_on(async {
        use flotilla_agent::qmp::QmpClient;
        let connect = |p: std::path::PathBuf| async move {
            for _ in 0..500 {
                let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
                if let Ok(q) = QmpClient::connect(&p, Duration::from_secs(2), tx).await {
                    return q;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("no QMP at {}", p.display());
        };
        let s = connect(src_sock.clone()).await;
        let _d = connect(dst_sock.clone()).await;
        let t = Duration::from_secs(5);
        // Same starting point as the Flotilla run: the guest is counting.
        for _ in 0..600 {
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
        let start = Instant::now();
        s.execute(
            "migrate",
            serde_json::json!({"uri": "tcp:198.18.100.2:49200"}),
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
                    return (
                        start.elapsed().as_secs_f64() * 1000.0,
                        v["downtime"].as_f64().unwrap_or(f64::NAN),
                    )
                }
                Some("failed") | Some("cancelled") => panic!("raw migration failed: {v}"),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
    let _ = src.kill();
    let _ = dst.kill();
    let _ = src.wait();
    let _ = dst.wait();
    result
}
