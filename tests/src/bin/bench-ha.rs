//! HA failover benchmark: from cutting a host off until its HA guest runs
//! on the other host with its console answering, with the coordinator's
//! default lease (8 s), margin (2 s) and heartbeat (2 s).
//!
//! Two namespace hosts and a coordinator ([`TwoHosts`]); one HA guest
//! (diskless, VNC on `public`). Each round cuts the management link of the
//! host that runs the guest (`ip link set mgmt0 down` inside it) and polls
//! every 50 ms for two moments: the guest's QEMU gone from that host (its
//! agent's lease), and the guest running on the other host with an RFB
//! banner at its new console address. Then the link comes back, the host
//! re-registers, and the next round cuts the other host.
//!
//! Run as root after `cargo build --release --workspace --bins`:
//! `target/release/bench-ha [ROUNDS]`.

#![allow(clippy::expect_used)]

use std::time::{Duration, Instant};

use flotilla_tests::qemu_runs_in as runs_in;
use flotilla_tests::{
    domain_xml, listed_vm, median, new_uuid, qemu_pids_for, rfb_banner, wait_until, Netns, TwoHosts,
};

fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.1} ({min:.1}–{max:.1})", median(v))
}

fn listed(f: &TwoHosts, name: &str) -> serde_json::Value {
    listed_vm(&f.cli(&["list", "--all", "--json"]), name)
}

/// The console answers at the address `domdisplay` gives, seen from `ns`.
fn console_answers(f: &TwoHosts, ns: &Netns, name: &str) -> bool {
    let o = f.cli(&["domdisplay", name]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let Some(addr) = text
        .split_whitespace()
        .next()
        .and_then(|u| u.strip_prefix("vnc://"))
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
    else {
        return false;
    };
    ns.run(move || rfb_banner(addr.ip(), addr.port()))
        .is_ok_and(|b| b.starts_with("RFB "))
}

fn connected(f: &TwoHosts) -> bool {
    String::from_utf8_lossy(&f.cli(&["hosts"]).stdout)
        .matches(" connected ")
        .count()
        == 2
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let f = TwoHosts::start(&[]);
    let uuid = new_uuid();
    let xml = domain_xml(
        "ha-bench",
        &uuid,
        "<graphics type='vnc'><listen type='network' network='public'/></graphics>",
    )
    .replace(
        "<memory",
        "<metadata><flotilla:ha xmlns:flotilla='urn:flotilla:domain:1' restart='on'/></metadata><memory",
    );
    let file = f.work.path().join("ha-bench.xml");
    std::fs::write(&file, xml).expect("xml");
    assert!(f
        .cli(&["define", file.to_str().expect("utf8")])
        .status
        .success());
    let o = f.cli(&["start", "ha-bench", "--host", "host-a"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let (mut dead, mut back, mut twice) = (Vec::new(), Vec::new(), 0usize);
    for round in 0..rounds {
        let (from, to, to_name) = match round % 2 {
            0 => (&f.a, &f.b, "host-b"),
            _ => (&f.b, &f.a, "host-a"),
        };
        assert!(
            wait_until(Duration::from_secs(60), || connected(&f)),
            "round {round}: hosts not both connected"
        );
        assert!(
            runs_in(from, &uuid),
            "round {round}: guest not where expected"
        );
        let cut = Instant::now();
        from.ip(&["link", "set", "mgmt0", "down"]);
        let mut gone_at = None;
        let deadline = cut + Duration::from_secs(60);
        loop {
            if qemu_pids_for(&uuid).len() > 1 {
                twice += 1;
            }
            if gone_at.is_none() && !runs_in(from, &uuid) {
                gone_at = Some(cut.elapsed());
            }
            let v = listed(&f, "ha-bench");
            if v["host"] == to_name
                && v["state"] == "running"
                && console_answers(&f, to, "ha-bench")
            {
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: no failover: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
        back.push(cut.elapsed().as_secs_f64());
        dead.push(gone_at.unwrap_or_else(|| cut.elapsed()).as_secs_f64());
        from.ip(&["link", "set", "mgmt0", "up"]);
        eprintln!(
            "round {round}: dead on the cut host after {:.1}s, running with its console on {to_name} after {:.1}s",
            dead[round], back[round]
        );
    }
    println!(
        "Coordinator defaults: lease L = 8 s, ρ = 0.001, margin 2 s, heartbeat every 2 s; \
         fence: the agent's own lease and its fence keeper (no watchdog in a namespace). \
         The cut is `ip link set mgmt0 down` on the host running the guest.\n"
    );
    println!("| figure | runs | s median (min–max) |");
    println!("|---|---|---|");
    println!(
        "| cut → the guest's QEMU gone from the cut host | {} | {} |",
        dead.len(),
        spread(&dead)
    );
    println!(
        "| **cut → running on the other host, console answering** | {} | {} |",
        back.len(),
        spread(&back)
    );
    println!("\nSamples with two QEMUs of the guest at once: {twice}.\n");
    println!("| system | failover after a host is cut off | fencing |");
    println!("|---|---|---|");
    println!(
        "| **Flotilla, namespace hosts (measured)** | {:.1} s median, {:.1} s max | lease + fence keeper |",
        median(&back),
        back.iter().copied().fold(0.0, f64::max)
    );
    println!(
        "| Flotilla, real host with a 10 s watchdog (on paper) | last heard + 8.008 + 10 + 2 = 20.0 s: 18–20 s after the cut (heartbeats every 2 s), plus the start | lease + keeper + softdog |"
    );
    println!("| Nomad | 20–30 s to mark the node down | none: may run twice |");
    println!("| Proxmox VE HA | 120–180 s (60 s fence delay, 120 s lock timeout) | watchdog |");
    println!("| oVirt | ≥ 140 s (sanlock: 8 × 10 s I/O timeout + 60 s watchdog) | sanlock, power management |");
    println!("| KubeVirt | ≥ 300 s; stays Terminating without fencing | none built in |");
}
