//! Leader failover on etcd: three etcd members and three coordinators in a
//! namespace; three CLIs define 300 VMs, retrying on the coordinator list,
//! and the leader is killed with SIGKILL after the 100th acknowledgement
//! (then, in the second scenario, the leader and its etcd member together).
//!
//! Timed from the kill, from the surviving coordinators' logs: the new
//! leader's election, and the first define it accepted. Each run also
//! checks what the control-plane test asserts: every acknowledged define
//! stored, each once (generation 1).
//!
//! Run as root after `cargo build --release --workspace --bins`:
//!
//! ```text
//! target/release/bench-failover [RUNS]
//! ```

#![allow(clippy::expect_used)]

use flotilla_tests::control_plane::{self, ControlPlane};
use flotilla_tests::median;

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    println!("| leader killed | runs | election after kill, median ms (max) | first write accepted after kill, median ms (max) | acknowledged | stored | stored twice | CLI failures |");
    println!("|---|---|---|---|---|---|---|---|");
    for (label, with_member) in [
        ("coordinator (kill -9)", false),
        ("coordinator and its etcd member (kill -9)", true),
    ] {
        let mut elected = Vec::new();
        let mut first = Vec::new();
        let (mut acked, mut stored, mut twice, mut failures) = (0, 0, 0, 0);
        for run in 0..runs {
            let mut cp = ControlPlane::start("bfail", &[]);
            let r = control_plane::defines_through_a_leader_kill(
                &mut cp,
                &format!("r{run}"),
                100,
                100,
                with_member,
            );
            let out = cp.cli(&["--json", "list", "--all"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let vms = v["Vms"].as_array().cloned().unwrap_or_default();
            let mut names: Vec<&str> = vms.iter().filter_map(|e| e["name"].as_str()).collect();
            names.sort_unstable();
            let listed = names.len();
            names.dedup();
            twice += listed - names.len() + vms.iter().filter(|e| e["generation"] != 1).count();
            stored += r
                .acked
                .iter()
                .filter(|n| names.contains(&n.as_str()))
                .count();
            acked += r.acked.len();
            failures += r.failures.len();
            if let Some(f) = r.failures.first() {
                eprintln!("run {run}: first CLI failure: {f}");
            }
            eprintln!(
                "run {run} ({label}): elected after {:?} s, first write after {:?} s",
                r.elected_after, r.first_write_after
            );
            elected.extend(r.elected_after.map(|s| s * 1000.0));
            first.extend(r.first_write_after.map(|s| s * 1000.0));
        }
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        println!(
            "| {label} | {runs} | {:.0} ({:.0}) | {:.0} ({:.0}) | {acked} | {stored} | {twice} | {failures} |",
            median(&elected),
            max(&elected),
            median(&first),
            max(&first),
        );
    }
}
