//! Three etcd members and three coordinators in one namespace, for the
//! control-plane tests and the failover benchmark.
//!
//! The namespace has a bridge `cp0` with 198.18.9.1–3; member and
//! coordinator `i` listen on address `i`, as they would share a machine in
//! a deployment. Host namespaces join the bridge with [`Netns::veth_to`].
//! etcd runs with a 50 ms heartbeat and a 500 ms election timeout, so the
//! coordinators' 1 s leader lease is not raised to etcd's minimum, and with
//! TLS as deploy/README.md sets it up: every member's certificate comes
//! from the fleet's CA (`flotilla certs issue --etcd`), clients and peers
//! must present one, and coordinator `i` dials etcd with member `i`'s.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{bin, flotilla, output, wait_until, Netns};

/// The control plane of one test.
pub struct ControlPlane {
    /// The namespace everything runs in.
    pub ns: Netns,
    /// Data directories, logs and certificates.
    pub dir: tempfile::TempDir,
    /// `flotilla certs` output.
    pub tls: PathBuf,
    etcd: Vec<Option<Child>>,
    coordinators: Vec<Option<Child>>,
    coordinator_args: Vec<String>,
}

/// Member or coordinator `i`'s address.
pub fn address(i: usize) -> String {
    format!("198.18.9.{}", i + 1)
}

impl ControlPlane {
    /// Starts three etcd members, then three coordinators (with `extra`
    /// flags) one after the other, so coordinator 0 leads; returns once it does.
    pub fn start(label: &str, extra: &[&str]) -> ControlPlane {
        let mut cp = ControlPlane::etcd_only(label, extra);
        for i in 0..3 {
            cp.start_coordinator(i);
            if i == 0 {
                assert_eq!(cp.wait_leader(Duration::from_secs(30)), Some(0));
            }
        }
        let all_up = wait_until(Duration::from_secs(30), || cp.cluster().len() == 3);
        assert!(all_up, "not every coordinator announced itself");
        cp
    }

    /// Starts three etcd members and no coordinator.
    pub fn etcd_only(label: &str, extra: &[&str]) -> ControlPlane {
        let ns = Netns::new(label);
        ns.bridge("cp0", Some("198.18.9.1/24"));
        ns.ip(&["addr", "add", "198.18.9.2/24", "dev", "cp0"]);
        ns.ip(&["addr", "add", "198.18.9.3/24", "dev", "cp0"]);
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = dir.path().join("tls");
        let mut c = Command::new(bin("flotilla"));
        c.args(["certs", "init", "--dir"]).arg(&tls);
        assert!(output(c).status.success(), "certs init");
        for i in 0..3 {
            // Every member's certificate names all three addresses: etcd
            // checks a peer's certificate against the address it dials
            // from, and in one namespace the kernel picks 198.18.9.1 as
            // the source for all three (on separate machines, each
            // member's own address is enough).
            let mut c = Command::new(bin("flotilla"));
            c.args(["certs", "issue", "--etcd", &format!("e{i}")]);
            for j in 0..3 {
                c.args(["--san", &address(j)]);
            }
            c.arg("--dir").arg(&tls);
            assert!(output(c).status.success(), "certs issue --etcd");
        }
        let mut cp = ControlPlane {
            ns,
            dir,
            tls,
            etcd: vec![None, None, None],
            coordinators: vec![None, None, None],
            coordinator_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        for i in 0..3 {
            cp.start_etcd(i);
        }
        let endpoints = cp.endpoints();
        let healthy = wait_until(Duration::from_secs(30), || {
            let mut c = cp.ns.command(Path::new("etcdctl"));
            c.args(["--endpoints", &endpoints, "endpoint", "health"])
                .args(cp.etcdctl_tls(0));
            output(c).status.success()
        });
        assert!(healthy, "etcd did not come up: {}", cp.log("etcd-0"));
        cp
    }

    /// etcd's client URLs.
    pub fn endpoints(&self) -> String {
        (0..3)
            .map(|i| format!("https://{}:2379", address(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Member `i`'s certificate and key (coordinator `i` dials etcd with them).
    pub fn etcd_cert(&self, i: usize) -> (PathBuf, PathBuf) {
        (
            self.tls.join(format!("etcd-e{i}.pem")),
            self.tls.join(format!("etcd-e{i}-key.pem")),
        )
    }

    /// etcdctl's TLS flags, as member `i`.
    pub fn etcdctl_tls(&self, i: usize) -> Vec<String> {
        let (cert, key) = self.etcd_cert(i);
        vec![
            format!("--cacert={}", self.tls.join("ca.pem").display()),
            format!("--cert={}", cert.display()),
            format!("--key={}", key.display()),
        ]
    }

    /// The coordinators' addresses, as agents and operators list them.
    pub fn coordinators(&self) -> String {
        (0..3)
            .map(|i| format!("{}:7443", address(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// A process's log so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    fn log_file(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .expect("log")
    }

    /// Starts etcd member `i` (again, after a kill, with its data).
    pub fn start_etcd(&mut self, i: usize) {
        let cluster = (0..3)
            .map(|j| format!("e{j}=https://{}:2380", address(j)))
            .collect::<Vec<_>>()
            .join(",");
        let a = address(i);
        let (cert, key) = self.etcd_cert(i);
        let ca = self.tls.join("ca.pem");
        let mut c = self.ns.command(Path::new("etcd"));
        c.args(["--name", &format!("e{i}")])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("etcd-{i}")))
            .arg(format!("--cert-file={}", cert.display()))
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--trusted-ca-file={}", ca.display()))
            .arg("--client-cert-auth")
            .arg(format!("--peer-cert-file={}", cert.display()))
            .arg(format!("--peer-key-file={}", key.display()))
            .arg(format!("--peer-trusted-ca-file={}", ca.display()))
            .arg("--peer-client-cert-auth")
            .args([
                "--listen-client-urls",
                &format!("https://{a}:2379"),
                "--advertise-client-urls",
                &format!("https://{a}:2379"),
                "--listen-peer-urls",
                &format!("https://{a}:2380"),
                "--initial-advertise-peer-urls",
                &format!("https://{a}:2380"),
                "--initial-cluster",
                &cluster,
                "--initial-cluster-state",
                "new",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log_file(&format!("etcd-{i}")));
        self.etcd[i] = Some(c.spawn().expect("spawn etcd"));
    }

    /// Kills etcd member `i` with SIGKILL.
    pub fn kill_etcd(&mut self, i: usize) {
        if let Some(mut c) = self.etcd[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts coordinator `i` (again, after a kill: as its supervisor would).
    pub fn start_coordinator(&mut self, i: usize) {
        let a = address(i);
        let (cert, key) = self.etcd_cert(i);
        let mut c = self.ns.command(&bin("flotilla-coordinator"));
        c.args([
            "--listen",
            &format!("{a}:7443"),
            "--store",
            "etcd",
            "--etcd-endpoints",
            &self.endpoints(),
            "--heartbeat-secs",
            "1",
            "--heartbeat-timeout-secs",
            "6",
        ])
        .arg("--tls-dir")
        .arg(&self.tls)
        .arg("--etcd-ca")
        .arg(self.tls.join("ca.pem"))
        .arg("--etcd-cert")
        .arg(cert)
        .arg("--etcd-key")
        .arg(key)
        .arg("--data-dir")
        .arg(self.dir.path().join(format!("unused-{i}")))
        .args(&self.coordinator_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(self.log_file(&format!("coordinator-{i}")));
        self.coordinators[i] = Some(c.spawn().expect("spawn coordinator"));
    }

    /// Coordinator `i`'s process id, while it runs.
    pub fn coordinator_pid(&self, i: usize) -> Option<u32> {
        self.coordinators[i].as_ref().map(Child::id)
    }

    /// Kills coordinator `i` with SIGKILL; returns when it is gone.
    pub fn kill_coordinator(&mut self, i: usize) {
        if let Some(mut c) = self.coordinators[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for coordinator `i` to exit on its own; its exit code.
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> Option<i32> {
        let mut code = None;
        let exited = wait_until(timeout, || {
            match self.coordinators[i].as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => {
                    code = status.code();
                    true
                }
                _ => false,
            }
        });
        if exited {
            self.coordinators[i] = None;
        }
        code
    }

    /// `flotilla` with every coordinator listed.
    pub fn cli(&self, args: &[&str]) -> Output {
        flotilla(&self.ns, &self.coordinators(), &self.tls, args)
    }

    /// `flotilla cluster --json`, or nothing when no coordinator answers.
    pub fn cluster(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["--json", "--retry-secs", "0", "cluster"]);
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// The index of the leader that `cluster` names and that runs, once there is one.
    pub fn wait_leader(&self, timeout: Duration) -> Option<usize> {
        let mut found = None;
        wait_until(timeout, || {
            found = self
                .cluster()
                .iter()
                .find(|c| c["leader"] == true)
                .and_then(|c| c["address"].as_str().map(str::to_string))
                .and_then(|a| (0..3).find(|&i| a == format!("{}:7443", address(i))))
                .filter(|&i| self.coordinators[i].is_some());
            found.is_some()
        });
        found
    }

    /// The leader's epoch as `cluster` shows it.
    pub fn epoch(&self) -> u64 {
        self.cluster()
            .iter()
            .find(|c| c["leader"] == true)
            .and_then(|c| c["epoch"].as_u64())
            .unwrap_or(0)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill_coordinator(i);
            self.kill_etcd(i);
        }
    }
}

/// A domain with nothing host-specific, for defines.
pub fn small_domain(name: &str) -> String {
    format!(
        "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os></domain>"
    )
}

/// What [`defines_through_a_leader_kill`] saw.
#[derive(Debug)]
pub struct FailoverRun {
    /// Names whose define was acknowledged.
    pub acked: Vec<String>,
    /// CLI failures, with their message.
    pub failures: Vec<String>,
    /// Seconds from the kill to the new leader's election (its log line).
    pub elected_after: Option<f64>,
    /// Seconds from the kill to the first define the new leader accepted.
    pub first_write_after: Option<f64>,
    /// The coordinator that was killed.
    pub killed: usize,
}

/// Seconds since midnight UTC of a log line's RFC 3339 timestamp.
fn log_seconds(line: &str) -> Option<f64> {
    let t = line.get(11..26)?;
    let h: f64 = t.get(0..2)?.parse().ok()?;
    let m: f64 = t.get(3..5)?.parse().ok()?;
    let s: f64 = t.get(6..)?.trim_end_matches('Z').parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn seconds_of_day(t: SystemTime) -> f64 {
    let since = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    since % 86400.0
}

/// Seconds from `from` (of day) to `to`, across midnight.
fn after(from: f64, to: f64) -> f64 {
    (to - from).rem_euclid(86400.0)
}

/// Three CLIs define `per_cli` VMs each (names `{tag}-{cli}-{n}`), retrying
/// on the coordinator list; once `kill_after` are acknowledged the leader
/// is killed with SIGKILL (and its etcd member too, with `with_member`).
pub fn defines_through_a_leader_kill(
    cp: &mut ControlPlane,
    tag: &str,
    per_cli: usize,
    kill_after: usize,
    with_member: bool,
) -> FailoverRun {
    let leader = cp.wait_leader(Duration::from_secs(30)).expect("a leader");
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut clis = Vec::new();
    for k in 0..3 {
        let (ns, list, tls) = (cp.ns.name.clone(), cp.coordinators(), cp.tls.clone());
        let files = cp.dir.path().join(format!("{tag}-{k}"));
        std::fs::create_dir_all(&files).expect("dir");
        let (acked, failures) = (acked.clone(), failures.clone());
        let tag = tag.to_string();
        clis.push(std::thread::spawn(move || {
            for n in 0..per_cli {
                let name = format!("{tag}-{k}-{n}");
                let file = files.join(format!("{name}.xml"));
                std::fs::write(&file, small_domain(&name)).expect("write");
                let out = Command::new("ip")
                    .args(["netns", "exec", &ns])
                    .arg(bin("flotilla"))
                    .args(["--coordinator", &list, "--tls-dir"])
                    .arg(&tls)
                    .arg("define")
                    .arg(&file)
                    .output()
                    .expect("run flotilla");
                if out.status.success() {
                    acked.lock().expect("lock").push(name);
                } else {
                    failures.lock().expect("lock").push(format!(
                        "{name}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            }
        }));
    }
    let reached = wait_until(Duration::from_secs(120), || {
        acked.lock().expect("lock").len() >= kill_after
    });
    assert!(reached, "defines did not get going: {:?}", failures.lock());
    cp.kill_coordinator(leader);
    if with_member {
        cp.kill_etcd(leader);
    }
    let killed_at = seconds_of_day(SystemTime::now());
    for c in clis {
        c.join().expect("cli thread");
    }
    let mut elected_after = None;
    let mut first_write_after = None;
    for i in (0..3).filter(|&i| i != leader) {
        let log = cp.log(&format!("coordinator-{i}"));
        let mut elected = false;
        for line in log.lines() {
            let Some(at) = log_seconds(line) else {
                continue;
            };
            // Only lines after the kill (a log restarted earlier may hold older ones).
            if after(killed_at, at) > 3600.0 {
                continue;
            }
            if line.contains("elected leader") {
                elected = true;
                elected_after = Some(after(killed_at, at));
            } else if elected && line.contains(" defined ") {
                first_write_after = Some(after(killed_at, at));
                break;
            }
        }
    }
    let acked = std::mem::take(&mut *acked.lock().expect("lock"));
    let failures = std::mem::take(&mut *failures.lock().expect("lock"));
    FailoverRun {
        acked,
        failures,
        elected_after,
        first_write_after,
        killed: leader,
    }
}
