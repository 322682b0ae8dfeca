//! Web console benchmark: how long after a live migration completes the
//! browser shows the guest's screen again, from its new host.
//!
//! A counting guest with a VNC password runs on host-a; Debian's chromium
//! (headless, driven by `tests/web/browser.mjs`) has its console page open
//! through the coordinator's web endpoint. Each round live-migrates the
//! guest to the other host with `flotilla migrate` and measures, from the
//! moment the command returns (the migration is complete), until the page
//! shows a counter higher than the one on screen at that moment, read off
//! the canvas. The page's own timestamps split that into: the coordinator's
//! "moved" notice, noVNC's reconnection, and the first frame.
//!
//! Run as root after `cargo build --release --workspace --bins` and
//! `deploy/lib/web.sh`: `target/release/bench-webconsole [ROUNDS]`.

#![allow(clippy::expect_used)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla_tests::browser::{novnc_dir, Browser};
use flotilla_tests::guest::{counting_disk_image, parse_xp_word, COUNTER_ADDR};
use flotilla_tests::{agent_command, domain_xml, median, new_uuid, output, wait_until, TwoHosts};
use serde_json::json;

fn epoch_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.0} ({min:.0}–{max:.0})", median(v))
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let novnc = novnc_dir();
    let fleet = TwoHosts::start(&[
        "--web-listen",
        "198.19.0.1:8443",
        "--novnc-dir",
        novnc.to_str().expect("utf8"),
    ]);
    let image = fleet.work.path().join("count.img");
    std::fs::write(&image, counting_disk_image()).expect("image");
    let devices = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/><readonly/></disk>\
         <graphics type='vnc' passwd='bench-pw'><listen type='network' network='public'/></graphics>",
        image.display()
    );
    let xml = domain_xml("watched", &new_uuid(), &devices).replace(
        "<os><type arch='x86_64' machine='pc'>hvm</type></os>",
        "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>",
    );
    let file = fleet.work.path().join("watched.xml");
    std::fs::write(&file, xml).expect("xml");
    assert!(fleet
        .cli(&["define", file.to_str().expect("utf8")])
        .status
        .success());
    assert!(fleet
        .cli(&["start", "watched", "--host", "host-a"])
        .status
        .success());
    let counting = || {
        let mut c = agent_command(&fleet.a, "host-a", &fleet.dirs[0]);
        c.args(["ctl", "qemu-monitor-command", "watched", "--hmp"])
            .arg(format!("xp /1wx {COUNTER_ADDR:#x}"));
        parse_xp_word(&String::from_utf8_lossy(&output(c).stdout)).is_some_and(|n| n > 0)
    };
    assert!(
        wait_until(Duration::from_secs(30), counting),
        "guest never counted"
    );

    let o = fleet.cli(&["webconsole", "watched"]);
    assert!(o.status.success());
    let url = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let mut browser = Browser::launch(&fleet.ctl, &fleet.tls.join("coordinator.pem"));
    browser.ask(json!({"cmd": "open", "page": "console", "url": url}));
    browser.ask(json!({"cmd": "wait_counter", "page": "console", "connects": 1}));

    let (mut total, mut to_close, mut to_connect, mut to_frame, mut migrate_ms) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let to = if round % 2 == 0 { "host-b" } else { "host-a" };
        let began = Instant::now();
        let o = fleet.cli(&["migrate", "watched", "--to", to]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let done = Instant::now();
        let done_ms = epoch_ms();
        migrate_ms.push(done.duration_since(began).as_secs_f64() * 1000.0);
        let shown = browser.ask(json!({"cmd": "counter", "page": "console"}));
        let back = browser.ask(json!({
            "cmd": "wait_counter", "page": "console",
            "above": shown["counter"].as_u64().unwrap_or(0),
            "connects": round + 2, "timeout_ms": 30000,
        }));
        total.push(done.elapsed().as_secs_f64() * 1000.0);
        let closed = back["moves"]
            .as_array()
            .and_then(|c| c.last())
            .and_then(|c| c["at"].as_f64())
            .unwrap_or(f64::NAN);
        let connected = back["connectedAt"]
            .as_array()
            .and_then(|c| c.last())
            .and_then(|c| c.as_f64())
            .unwrap_or(f64::NAN);
        let seen = back["now"].as_f64().unwrap_or(f64::NAN);
        to_close.push(closed - done_ms);
        to_connect.push(connected - closed);
        to_frame.push(seen - connected);
        assert_eq!(back["movedTo"], to, "{back}");
    }
    println!(
        "Chromium {} over the coordinator's web endpoint; the guest's VNC console has a password the coordinator answers.\n",
        browser.version
    );
    println!("| figure | runs | ms median (min–max) |");
    println!("|---|---|---|");
    let rows: [(&str, &[f64]); 5] = [
        ("`flotilla migrate` (request to completion)", &migrate_ms),
        (
            "**migration complete → screen back in the browser**",
            &total,
        ),
        ("… complete → page told it moved", &to_close),
        ("… told → noVNC reconnected to the new host", &to_connect),
        ("… reconnected → new frame on screen", &to_frame),
    ];
    for (name, v) in rows {
        println!("| {name} | {} | {} |", v.len(), spread(v));
    }
}
