//! The README's first command, `deploy/demo.sh`, run end to end as a newcomer
//! would, then torn down with `deploy/demo.sh down`.
//!
//! It uses the debug binaries this suite already built (`FLOTILLA_DEMO_BIN`)
//! rather than a second, release build, and its own namespace prefix and
//! work folder so it can run beside the other tests.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use flotilla_tests::{bin_dir, wait_until};

struct Demo {
    prefix: String,
    dir: tempfile::TempDir,
}

impl Demo {
    /// A demo with namespaces named `{label}{pid}-…` and its work folder
    /// under /tmp (searchable by QEMU's user).
    fn new(label: &str, dir_prefix: &str) -> Demo {
        Demo {
            prefix: format!("{label}{}", std::process::id()),
            dir: tempfile::Builder::new()
                .permissions(
                    <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
                )
                .prefix(dir_prefix)
                .tempdir_in("/tmp")
                .expect("tmp"),
        }
    }

    /// `demo.sh down`, and nothing of the demo is left.
    fn tear_down(&self) {
        let o = self.script(&["down"]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(self.namespaces().is_empty(), "{:?}", self.namespaces());
        assert!(
            wait_until(Duration::from_secs(5), || self.processes().is_empty()),
            "left running: {:?}",
            self.processes()
        );
    }

    fn script(&self, args: &[&str]) -> Output {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        Command::new("timeout")
            .arg("600")
            .arg(root.join("deploy/demo.sh"))
            .args(args)
            .env("FLOTILLA_DEMO_DIR", self.dir.path())
            .env("FLOTILLA_DEMO_PREFIX", &self.prefix)
            .env("FLOTILLA_DEMO_BIN", bin_dir())
            // Kept between runs so the VNC client is installed from PyPI once.
            .env(
                "FLOTILLA_DEMO_VENV",
                Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-venv"),
            )
            .current_dir(&root)
            .output()
            .expect("run deploy/demo.sh")
    }

    fn namespaces(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("{}-", self.prefix)))
            .map(str::to_string)
            .collect()
    }

    /// Processes whose command line names the demo's folder: its coordinator,
    /// agents and QEMUs all do.
    fn processes(&self) -> Vec<String> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            // Zombies have an empty cmdline, so only live processes match; the
            // demo script itself (and its `down`) are the caller's, not leftovers.
            if cmd.contains(&needle) && !cmd.contains("deploy/demo.sh") {
                found.push(cmd);
            }
        }
        found
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // Tear down even when an assertion failed.
        let _ = self.script(&["down"]);
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `(address, host)` from each `domdisplay: vnc://ADDR:PORT (HOST)` line.
fn displays(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| l.strip_prefix("domdisplay: vnc://"))
        .filter_map(|rest| {
            let (addr_port, host) = rest.split_once(" (")?;
            let (addr, _) = addr_port.rsplit_once(':')?;
            Some((addr.to_string(), host.trim_end_matches(')').to_string()))
        })
        .collect()
}

/// `(path, low, high)` from each `screenshot: PATH (guest counter LO to HI during …)` line.
fn screenshots(out: &str) -> Vec<(PathBuf, u64, u64)> {
    out.lines()
        .filter_map(|l| l.strip_prefix("screenshot: "))
        .filter_map(|rest| {
            let (path, tail) = rest.split_once(" (guest counter ")?;
            let (lo, tail) = tail.split_once(" to ")?;
            let (hi, _) = tail.split_once(" during")?;
            Some((PathBuf::from(path), lo.parse().ok()?, hi.parse().ok()?))
        })
        .collect()
}

/// Decodes the PNG with Pillow (vncdotool's own dependency) and returns its size.
fn decoded_png_size(path: &Path) -> (u32, u32) {
    let python = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-venv/bin/python");
    let out = Command::new(python)
        .args([
            "-c",
            "import sys; from PIL import Image\n\
             im = Image.open(sys.argv[1]); im.load()\n\
             assert im.format == 'PNG', im.format\n\
             print(im.size[0], im.size[1])",
        ])
        .arg(path)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{} is not a PNG: {}",
        path.display(),
        text(&out)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    let mut it = s
        .split_whitespace()
        .map(|n| n.parse::<u32>().expect("size"));
    (it.next().expect("w"), it.next().expect("h"))
}

fn addresses_in(namespace: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", namespace, "-4", "addr", "show"])
        .output()
        .expect("ip addr");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn check_a_demo_run(demo: &Demo, o: &Output) {
    let out = text(o);
    assert!(o.status.success(), "demo.sh failed:\n{out}");

    // The console moved from one host's `public` address to another's
    // (then the HA scene's guest: before the cut and after its restart).
    let shown = displays(&out);
    assert_eq!(shown.len(), 4, "{out}");
    let ((before, host_before), (after, host_after)) = (&shown[0], &shown[1]);
    assert_ne!(before, after, "{out}");
    assert_ne!(host_before, host_after, "{out}");
    for (addr, host) in &shown {
        let ns = format!("{}-{host}", demo.prefix);
        assert!(
            addresses_in(&ns).contains(&format!("inet {addr}/")),
            "{addr} is not an address of {host}"
        );
    }
    assert_eq!(shown[2].1, "host-c", "{out}");
    assert_ne!(shown[3].1, "host-c", "{out}");

    // Two real screenshots, and the guest counted on between them; two
    // more of the HA guest, before the cut and on its new host.
    let shots = screenshots(&out);
    assert_eq!(shots.len(), 4, "{out}");
    for (path, ..) in &shots {
        let (w, h) = decoded_png_size(path);
        assert!(w >= 640 && h >= 400, "{}: {w}x{h}", path.display());
    }
    assert_ne!(
        std::fs::read(&shots[0].0).expect("first"),
        std::fs::read(&shots[1].0).expect("second"),
        "the screen did not change"
    );
    let ((_, lo0, hi0), (_, lo1, hi1)) = (&shots[0], &shots[1]);
    assert!(0 < *lo0 && lo0 <= hi0 && lo1 <= hi1, "{out}");
    // Whatever the first screen showed, the second shows more: the guest
    // kept its memory and kept counting across the move.
    assert!(
        lo1 > hi0,
        "counter went {lo0}..{hi0} -> {lo1}..{hi1}: not a live migration"
    );

    // The browser showed the console before and after, and its page
    // followed the guest to its new host by itself, counting on.
    let browser: Vec<(PathBuf, u64)> = out
        .lines()
        .filter_map(|l| l.strip_prefix("browser screenshot: "))
        .filter_map(|rest| {
            let (path, tail) = rest.split_once(" (counter ")?;
            let (n, _) = tail.split_once(" on screen")?;
            Some((PathBuf::from(path), n.parse().ok()?))
        })
        .collect();
    assert_eq!(browser.len(), 2, "{out}");
    for (path, _) in &browser {
        let (w, h) = decoded_png_size(path);
        assert!(w >= 640 && h >= 400, "{}: {w}x{h}", path.display());
    }
    assert!(browser[1].1 > browser[0].1, "{out}");
    assert!(
        out.contains(&format!("banner: moved to {host_after}")),
        "{out}"
    );
    assert!(
        out.contains(
            "console URL (opens once, within 60 s): https://198.19.0.1:8443/console/demo?ticket="
        ),
        "{out}"
    );
    assert!(out.contains("fleet page: "), "{out}");

    // Both metrics endpoints answered with the named series while the fleet ran.
    for series in [
        "coordinator: flotilla_hosts{state=\"connected\"} 3",
        "coordinator: flotilla_vms{state=\"running\"} 1",
        "coordinator: flotilla_starts_total{outcome=\"ok\"} 1",
        "coordinator: flotilla_migrations_total{outcome=\"completed\"} 1",
        "coordinator: flotilla_migrations_in_progress 0",
        "coordinator: flotilla_scheduling_seconds_count 1",
        "coordinator: flotilla_start_seconds_count 1",
        "host-a: flotilla_agent_starts_total{outcome=\"ok\"} 1",
        "host-a: flotilla_agent_start_seconds_count 1",
    ] {
        assert!(out.contains(series), "missing {series:?} in:\n{out}");
    }
    assert!(out.contains("vm demo migrating from"), "{out}");
    // High availability: host-c fenced, its HA guest restarted elsewhere.
    assert!(out.contains("host host-c fenced: silent for"), "{out}");
    assert!(
        out.contains("vm ha-demo restarted on host-") && out.contains(": host host-c was fenced"),
        "{out}"
    );
    // Back, host-c runs none of it: the last listing has it elsewhere.
    let last = out
        .lines()
        .rev()
        .find(|l| l.starts_with("ha-demo "))
        .unwrap_or_default();
    assert!(
        last.contains(" running ") && !last.contains("host-c"),
        "{out}"
    );
    // The NIC was plumbed on both hosts, each on its own `public`.
    let nics: Vec<&str> = out
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() == 5
                && (f[0].starts_with("vnet") || f[0].starts_with("macvtap"))
                && f[1..4] == ["network", "public", "virtio"]
                && f[4].starts_with("52:54:00:")
        })
        .collect();
    assert_eq!(nics.len(), 2, "{out}");
    assert!(out.contains("export FLOTILLA_COORDINATOR="), "{out}");
    assert!(out.contains("deploy/demo.sh down"), "{out}");
}

#[test]
fn the_demo_runs_end_to_end_twice_and_tears_down_completely() {
    let demo = Demo::new("fltd", "flt-demo-");
    let first = demo.script(&[]);
    check_a_demo_run(&demo, &first);

    // A second run while the fleet is up replaces it cleanly.
    let second = demo.script(&[]);
    check_a_demo_run(&demo, &second);
    assert_eq!(demo.namespaces().len(), 5, "{:?}", demo.namespaces());

    demo.tear_down();
    let screenshots = demo.dir.path().join("screenshots");
    assert!(
        screenshots.join("after-migration.png").exists(),
        "down keeps the screenshots"
    );
}

#[test]
fn the_ha_control_plane_demo_survives_a_leader_kill_and_tears_down_completely() {
    let demo = Demo::new("flth", "flt-hademo-");
    let o = demo.script(&["--ha-control-plane"]);
    let out = text(&o);
    assert!(
        o.status.success(),
        "demo.sh --ha-control-plane failed:\n{out}"
    );
    // Three coordinators, then a new leader after the kill, and the guest
    // kept its QEMU and kept counting.
    assert!(out.contains("store: etcd (answered by 198.19.0."), "{out}");
    assert!(out.matches(" leader ").count() >= 2, "{out}");
    let took_over = out
        .lines()
        .find(|l| l.contains(" leads ") && l.ends_with(" s after the kill"))
        .unwrap_or_else(|| panic!("no takeover line:\n{out}"));
    let secs: f64 = took_over
        .split_whitespace()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{took_over}"));
    assert!(secs > 0.0, "{took_over}");
    let guest = out
        .lines()
        .find(|l| l.starts_with("the guest's QEMU: pid "))
        .unwrap_or_else(|| panic!("{out}"));
    let words: Vec<&str> = guest.split_whitespace().collect();
    assert_eq!(
        words[4], words[6],
        "the same QEMU before and after: {guest}"
    );
    let shown = displays(&out);
    assert_eq!(shown.len(), 2, "{out}");
    assert_ne!(
        shown[0].1, shown[1].1,
        "the guest migrated under the new leader: {out}"
    );
    assert!(out.contains("completed in"), "{out}");

    demo.tear_down();
}
