//! End-to-end test harness: namespace hosts, agents, and real console clients.
//!
//! A [`Netns`] is a Linux network namespace the test creates and always
//! removes: dropping it kills every process inside (agents and QEMU) and
//! deletes it, even when the test panics. Addresses come from 198.18.0.0/15
//! and exist only inside the test's namespaces. A test that wants to reach a
//! console "from outside" puts a client namespace on the host's bridge or
//! uplink and connects from a thread that has joined that namespace.
//! [`guest`] is a guest whose progress can be observed across a migration.

// A harness for tests: failing loudly on any setup error is the point.
#![allow(clippy::expect_used)]

use std::io::{BufRead, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub mod browser;
pub mod control_plane;
pub mod guest;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace owned by the test.
pub struct Netns {
    /// Its name, unique per process and call.
    pub name: String,
}

impl Netns {
    /// Creates a namespace whose name starts with `label`, with loopback up.
    pub fn new(label: &str) -> Netns {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("flt-{label}-{}-{n}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) {
        let mut v = vec!["-n", &self.name];
        v.extend_from_slice(args);
        ip(&v);
    }

    /// Adds a bridge with `cidr` (e.g. `198.18.1.1/24`), up.
    pub fn bridge(&self, dev: &str, cidr: Option<&str>) {
        self.ip(&["link", "add", dev, "type", "bridge"]);
        if let Some(c) = cidr {
            self.ip(&["addr", "add", c, "dev", dev]);
        }
        self.ip(&["link", "set", dev, "up"]);
    }

    /// Connects `self` to `client` with a veth pair: `dev` here, `peer` there.
    ///
    /// `dev` gets `cidr` if given (an uplink NIC); with `master` it is enslaved
    /// to that bridge instead. The peer gets `peer_cidr`.
    pub fn veth_to(
        &self,
        dev: &str,
        cidr: Option<&str>,
        master: Option<&str>,
        client: &Netns,
        peer: &str,
        peer_cidr: &str,
    ) {
        self.ip(&[
            "link",
            "add",
            dev,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            &client.name,
        ]);
        if let Some(c) = cidr {
            self.ip(&["addr", "add", c, "dev", dev]);
        }
        if let Some(m) = master {
            self.ip(&["link", "set", dev, "master", m]);
        }
        self.ip(&["link", "set", dev, "up"]);
        client.ip(&["addr", "add", peer_cidr, "dev", peer]);
        client.ip(&["link", "set", peer, "up"]);
    }

    /// Runs `f` on a thread that has joined this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    }

    /// Runs `f` on a thread that has joined this namespace, without waiting.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    /// A command that runs inside this namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Pids of processes in this namespace.
    pub fn pids(&self) -> Vec<i32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .expect("ip netns pids");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill everything inside (agents, QEMU), then remove the namespace.
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The directory holding the workspace's built binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // Tests live in target/debug/deps/, binaries beside it in target/debug/.
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a workspace binary, which must have been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; deploy/test.sh does)",
        p.display()
    );
    p
}

/// A scratch directory with a networks dir and a state dir for one agent.
pub struct AgentDirs {
    /// Holds everything; removed on drop.
    pub root: tempfile::TempDir,
}

impl AgentDirs {
    /// New empty directories.
    pub fn new() -> AgentDirs {
        let root = tempfile::Builder::new()
            .permissions(
                <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
            )
            .prefix("flt-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        std::fs::create_dir_all(root.path().join("nets")).expect("nets");
        std::fs::create_dir_all(root.path().join("state")).expect("state");
        AgentDirs { root }
    }

    /// The networks directory.
    pub fn nets(&self) -> PathBuf {
        self.root.path().join("nets")
    }

    /// The state directory.
    pub fn state(&self) -> PathBuf {
        self.root.path().join("state")
    }

    /// Writes network XML `xml` as `nets/NAME.xml`.
    pub fn network(&self, name: &str, xml: &str) {
        std::fs::write(self.nets().join(format!("{name}.xml")), xml).expect("write network");
    }

    /// Writes a file under the root and returns its path.
    pub fn file(&self, name: &str, body: &str) -> PathBuf {
        let p = self.root.path().join(name);
        std::fs::write(&p, body).expect("write file");
        p
    }
}

/// Removes the cgroup the agent made for a VM, as this process sees it
/// (agents and tests share the cgroup namespace root here), once its QEMU
/// has been reaped (a killed agent's QEMU is reaped by init, a moment later).
pub fn remove_vm_cgroup(noted: &str) {
    let Some(name) = Path::new(noted.trim()).file_name() else {
        return;
    };
    for mount in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let dir = Path::new(mount).join(name);
        let _ = wait_until(
            Duration::from_secs(5),
            || !matches!(std::fs::remove_dir(&dir), Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY)),
        );
    }
}

impl Drop for AgentDirs {
    /// An agent that joined a coordinator left a fence keeper running
    /// (it outlives the agent by design): it goes with the host, and so do
    /// the cgroups of VMs killed with it.
    fn drop(&mut self) {
        if let Ok(vms) = std::fs::read_dir(self.state().join("vms")) {
            for vm in vms.flatten() {
                // A VM left running (an agent started it and exited) goes
                // first: its cgroup can only be removed once it is gone.
                if let Ok(pid) = std::fs::read_to_string(vm.path().join("run/qemu.pid")) {
                    // Only while that pid is still this VM's QEMU.
                    let ours =
                        std::fs::read(format!("/proc/{}/cmdline", pid.trim())).is_ok_and(|c| {
                            let dir = vm.path().display().to_string();
                            c.windows(dir.len()).any(|w| w == dir.as_bytes())
                        });
                    if ours {
                        let _ = Command::new("kill")
                            .args(["-9", pid.trim()])
                            .stderr(Stdio::null())
                            .status();
                    }
                }
                if let Ok(noted) = std::fs::read_to_string(vm.path().join("cgroup")) {
                    remove_vm_cgroup(&noted);
                }
            }
        }
        if let Ok(pid) = std::fs::read_to_string(self.state().join("fence-keeper.pid")) {
            let _ = Command::new("kill")
                .args(["-9", pid.trim()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Default for AgentDirs {
    fn default() -> Self {
        Self::new()
    }
}

/// A Debian 12 server as virt-install writes it (the NIC left out): q35,
/// host-passthrough, a qcow2 system disk with discard, a SATA cdrom, the
/// guest-agent channel, an xHCI tablet, virtio video, balloon and RNG, and
/// a pty serial port with its console. `os` is the whole `<os>` element.
pub fn virt_install_domain(name: &str, uuid: &str, disk: &Path, iso: &Path, os: &str) -> String {
    format!(
        "<domain type='kvm'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>
      <libosinfo:os id='http://debian.org/debian/12'/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static'>2</vcpu>
  {os}
  <features><acpi/><apic/><vmport state='off'/></features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'>
    <timer name='rtc' tickpolicy='catchup'/>
    <timer name='pit' tickpolicy='delay'/>
    <timer name='hpet' present='no'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <pm><suspend-to-mem enabled='no'/><suspend-to-disk enabled='no'/></pm>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='{iso}'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <controller type='usb' index='0' model='qemu-xhci' ports='15'/>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='virtio-serial' index='0'/>
    <serial type='pty'><target type='isa-serial' port='0'><model name='isa-serial'/></target></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <input type='tablet' bus='usb'/>
    <input type='mouse' bus='ps2'/>
    <input type='keyboard' bus='ps2'/>
    <graphics type='vnc' port='-1'><listen type='network' network='public'/></graphics>
    <video><model type='virtio' heads='1' primary='yes'/></video>
    <memballoon model='virtio'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
</domain>",
        disk = disk.display(),
        iso = iso.display()
    )
}

/// `ip netns exec` gives the agent a fresh /sys without the cgroup mounts a
/// host's agent sees: the unified hierarchy is mounted there again, so VMs
/// get cgroups of their own in tests as on a host.
const CGROUP2: &str = "mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null || true";

/// `flotilla-agent` arguments for a host in `ns` using `dirs`.
pub fn agent_command(ns: &Netns, host: &str, dirs: &AgentDirs) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name, "sh", "-c"])
        .arg(format!("{CGROUP2}; exec \"$0\" \"$@\""))
        .arg(bin("flotilla-agent"));
    c.arg("--name")
        .arg(host)
        .arg("--networks-dir")
        .arg(dirs.nets())
        .arg("--state-dir")
        .arg(dirs.state());
    c
}

/// Runs `flotilla-agent ctl ARGS` against the agent of `host`: its exit
/// code and its stdout and stderr together.
pub fn agent_ctl(ns: &Netns, host: &str, dirs: &AgentDirs, args: &[&str]) -> (i32, String) {
    let mut c = agent_command(ns, host, dirs);
    c.arg("ctl").args(args);
    let o = output(c);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), text)
}

/// Asks the source agent for `vm`'s migration status until it has
/// completed or failed, and returns that answer; panics after `timeout`.
pub fn migration_outcome(
    ns: &Netns,
    host: &str,
    dirs: &AgentDirs,
    vm: &str,
    timeout: Duration,
) -> String {
    let mut last = String::new();
    assert!(
        wait_until(timeout, || {
            last = agent_ctl(ns, host, dirs, &["migration-status", vm]).1;
            last.contains("status: completed") || last.contains("status: failed")
        }),
        "migration never finished: {last}"
    );
    last
}

/// The `uri: …` line of a `ctl migrate-incoming` answer.
pub fn incoming_uri(answer: &str) -> String {
    answer
        .lines()
        .find_map(|l| l.strip_prefix("uri: "))
        .unwrap_or_else(|| panic!("no uri in {answer:?}"))
        .to_string()
}

/// Runs a command to completion and returns its output.
pub fn output(mut c: Command) -> Output {
    c.stdin(Stdio::null()).output().expect("run command")
}

/// A running agent daemon; killed with SIGKILL on drop.
pub struct AgentDaemon {
    /// The `ip netns exec` child.
    pub child: Child,
}

impl AgentDaemon {
    /// Starts the daemon and waits for its control socket.
    pub fn start(ns: &Netns, host: &str, dirs: &AgentDirs, extra: &[&str]) -> AgentDaemon {
        let mut c = agent_command(ns, host, dirs);
        c.args(extra);
        Self::spawn(c, ns, host, dirs)
    }

    /// Like [`AgentDaemon::start`], in a mount namespace of its own where
    /// the shell command `setup` runs first (for example a tmpfs over a
    /// directory): the host's "local" storage, which no other host sees.
    pub fn start_with_private_mounts(
        ns: &Netns,
        host: &str,
        dirs: &AgentDirs,
        extra: &[&str],
        setup: &str,
    ) -> AgentDaemon {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &ns.name,
            "unshare",
            "-m",
            "--propagation",
            "private",
        ])
        .args([
            "sh",
            "-c",
            &format!("{CGROUP2}; {setup} && exec \"$0\" \"$@\""),
        ])
        .arg(bin("flotilla-agent"))
        .arg("--name")
        .arg(host)
        .arg("--networks-dir")
        .arg(dirs.nets())
        .arg("--state-dir")
        .arg(dirs.state())
        .args(extra);
        Self::spawn(c, ns, host, dirs)
    }

    fn spawn(mut c: Command, ns: &Netns, host: &str, dirs: &AgentDirs) -> AgentDaemon {
        let log =
            std::fs::File::create(dirs.root.path().join(format!("agent-{host}.log"))).expect("log");
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let child = c.spawn().expect("spawn agent");
        let daemon = AgentDaemon { child };
        let sock = dirs.state().join("agent.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        // The socket is bound before re-attach finishes; ask until the agent answers.
        while Instant::now() < deadline {
            if sock.exists() {
                let mut ctl = agent_command(ns, host, dirs);
                ctl.args(["ctl", "list"]);
                if output(ctl).status.success() {
                    return daemon;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("agent {host} did not come up");
    }

    /// Kills the daemon with SIGKILL (the `ip netns exec` wrapper execs, so this is the agent).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentDaemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Reads the 12-byte RFB banner from a VNC server.
pub fn rfb_banner(addr: IpAddr, port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::new(addr, port), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut b = [0u8; 12];
    s.read_exact(&mut b)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

/// RFB handshake up to the server's security types (3.8): returns them.
pub fn rfb_security_types(addr: IpAddr, port: u16) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::new(addr, port), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut b = [0u8; 12];
    s.read_exact(&mut b)?;
    s.write_all(b"RFB 003.008\n")?;
    let mut n = [0u8; 1];
    s.read_exact(&mut n)?;
    let mut types = vec![0u8; n[0] as usize];
    s.read_exact(&mut types)?;
    Ok(types)
}

/// SPICE link handshake for the main channel: true when the server answers `REDQ`.
pub fn spice_link(addr: IpAddr, port: u16) -> std::io::Result<bool> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::new(addr, port), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut msg = Vec::new();
    msg.extend_from_slice(b"REDQ");
    msg.extend_from_slice(&2u32.to_le_bytes()); // major
    msg.extend_from_slice(&2u32.to_le_bytes()); // minor
    msg.extend_from_slice(&18u32.to_le_bytes()); // size of SpiceLinkMess
    msg.extend_from_slice(&0u32.to_le_bytes()); // connection_id
    msg.push(1); // channel_type: main
    msg.push(0); // channel_id
    msg.extend_from_slice(&0u32.to_le_bytes()); // num_common_caps
    msg.extend_from_slice(&0u32.to_le_bytes()); // num_channel_caps
    msg.extend_from_slice(&18u32.to_le_bytes()); // caps_offset
    s.write_all(&msg)?;
    let mut hdr = [0u8; 16];
    s.read_exact(&mut hdr)?;
    Ok(&hdr[..4] == b"REDQ")
}

/// True when nothing accepts TCP connections at `addr:port`.
pub fn refused(addr: IpAddr, port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::new(addr, port), Duration::from_secs(1)).is_err()
}

/// Pids of QEMU processes whose command line carries `-uuid UUID`.
pub fn qemu_pids_for(uuid: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args
            .windows(2)
            .any(|w| w[0] == b"-uuid" && w[1] == uuid.as_bytes())
        {
            out.push(pid);
        }
    }
    out
}

/// Whether a QEMU carrying `uuid` runs in namespace `ns`.
pub fn qemu_runs_in(ns: &Netns, uuid: &str) -> bool {
    let here = ns.pids();
    qemu_pids_for(uuid).iter().any(|p| here.contains(p))
}

/// VM `name`'s row in the output of `flotilla list --all --json` (null when
/// absent).
pub fn listed_vm(list_json: &Output, name: &str) -> serde_json::Value {
    let all: serde_json::Value = serde_json::from_slice(&list_json.stdout).unwrap_or_default();
    all["Vms"]
        .as_array()
        .and_then(|vms| vms.iter().find(|v| v["name"] == name).cloned())
        .unwrap_or_default()
}

/// A tcpdump watching one device in a namespace for frames that match a
/// filter; killed on drop.
pub struct Capture {
    child: Child,
    lines: std::sync::mpsc::Receiver<(Instant, String)>,
}

impl Capture {
    /// Starts `tcpdump -i DEV FILTER` in `ns` (printing link-level headers)
    /// and waits until it listens, so no frame sent afterwards is missed.
    pub fn start(ns: &Netns, dev: &str, filter: &str) -> Capture {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns.name, "tcpdump", "-i", dev])
            .args(["-nn", "-e", "-l", "-U", "-p"])
            .arg(filter)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn tcpdump");
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let _ = ready_tx.send(line);
            }
        });
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match ready.recv_timeout(left) {
                Ok(l) if l.contains("listening on") => break,
                Ok(_) => {}
                Err(_) => panic!("tcpdump on {dev} in {} never listened", ns.name),
            }
        }
        Capture { child, lines }
    }

    /// The next captured frame's line, waiting up to `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<String> {
        self.next_at(timeout).map(|(_, l)| l)
    }

    /// The next captured frame's line and when tcpdump printed it.
    pub fn next_at(&self, timeout: Duration) -> Option<(Instant, String)> {
        self.lines.recv_timeout(timeout).ok()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ip -n NS -d -o link show` output: one line per device.
pub fn links_in(ns: &Netns) -> String {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-d", "-o", "link", "show"])
        .output()
        .expect("ip link show");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A diskless test domain with the given `<devices>` content.
pub fn domain_xml(name: &str, uuid: &str, devices: &str) -> String {
    format!(
        "<domain type='kvm'>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n  \
         <memory unit='MiB'>64</memory>\n  <vcpu>1</vcpu>\n  \
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\n  \
         <devices>\n    {devices}\n  </devices>\n</domain>\n"
    )
}

/// A fresh random UUID string for a test VM.
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A coordinator process; killed with SIGKILL on drop.
pub struct CoordinatorProcess {
    /// The `ip netns exec` child.
    pub child: Child,
}

impl CoordinatorProcess {
    /// Starts `flotilla-coordinator` in `ns` and waits until it answers `hosts`.
    pub fn start(
        ns: &Netns,
        listen: &str,
        data: &Path,
        tls: &Path,
        log: &Path,
    ) -> CoordinatorProcess {
        Self::start_with(ns, listen, data, tls, log, &[])
    }

    /// Like [`CoordinatorProcess::start`], with extra flags.
    pub fn start_with(
        ns: &Netns,
        listen: &str,
        data: &Path,
        tls: &Path,
        log: &Path,
        extra: &[&str],
    ) -> CoordinatorProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log");
        let mut c = ns.command(&bin("flotilla-coordinator"));
        c.args([
            "--listen",
            listen,
            "--heartbeat-secs",
            "1",
            "--heartbeat-timeout-secs",
            "6",
        ])
        .arg("--data-dir")
        .arg(data)
        .arg("--tls-dir")
        .arg(tls)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        let child = c.spawn().expect("spawn coordinator");
        let proc = CoordinatorProcess { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if flotilla(ns, listen, tls, &["hosts"]).status.success() {
                return proc;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("coordinator did not come up on {listen}");
    }

    /// Kills it with SIGKILL.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Namespaces `{prefix}a` and `{prefix}b` (with `{prefix}far` at the far end
/// of b's uplink), wired the way the two-host tests and benchmarks expect:
/// a's `public` candidate is bridge br0 at 198.18.1.1, b's is veth uplink0
/// at 198.18.2.1, and a fabric link fab0 (198.18.100.1 and .2) joins them.
pub fn public_and_fabric(prefix: &str) -> (Netns, Netns, Netns) {
    let a = Netns::new(&format!("{prefix}a"));
    let b = Netns::new(&format!("{prefix}b"));
    let far = Netns::new(&format!("{prefix}far"));
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
    (a, b, far)
}

/// Two namespace hosts for the benchmarks: host-a (`public` is bridge br0
/// at 198.18.1.1), host-b (`public` is uplink0 at 198.18.2.1), a fabric link
/// between them that carries migrations (network `migration`), and a
/// coordinator at 198.19.0.1:7443 on the management bridge.
pub struct TwoHosts {
    /// The coordinator's namespace (operators' commands run here).
    pub ctl: Netns,
    /// host-a.
    pub a: Netns,
    /// host-b.
    pub b: Netns,
    /// The far end of host-b's uplink.
    pub far: Netns,
    /// The TLS directory.
    pub tls: PathBuf,
    /// The coordinator.
    pub coordinator: CoordinatorProcess,
    /// host-a's and host-b's agents.
    pub agents: Vec<AgentDaemon>,
    /// Their directories.
    pub dirs: Vec<AgentDirs>,
    /// Work files (images, logs); removed last.
    pub work: tempfile::TempDir,
}

impl TwoHosts {
    /// The coordinator's address.
    pub const COORD: &'static str = "198.19.0.1:7443";

    /// Brings both hosts up and waits until they are connected; the
    /// coordinator gets `coordinator_args` too.
    pub fn start(coordinator_args: &[&str]) -> TwoHosts {
        let work = tempfile::Builder::new()
            .permissions(
                <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
            )
            .prefix("flt-bench-")
            .tempdir_in("/tmp")
            .expect("tmp");
        let tls = work.path().join("tls");
        let mut c = Command::new(bin("flotilla"));
        c.args(["certs", "init", "--dir"]).arg(&tls);
        assert!(output(c).status.success());
        let ctl = Netns::new("bctl");
        ctl.bridge("fleet0", Some("198.19.0.1/24"));
        let (a, b, far) = public_and_fabric("b");
        ctl.veth_to("mg11", None, Some("fleet0"), &a, "mgmt0", "198.19.0.11/24");
        ctl.veth_to("mg12", None, Some("fleet0"), &b, "mgmt0", "198.19.0.12/24");
        let coordinator = CoordinatorProcess::start_with(
            &ctl,
            Self::COORD,
            &work.path().join("data"),
            &tls,
            &work.path().join("coordinator.log"),
            coordinator_args,
        );
        let mut agents = Vec::new();
        let mut dirs_of = Vec::new();
        for (ns, name, public) in [
            (&a, "host-a", PUBLIC_BRIDGE),
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
                    Self::COORD,
                    "--tls-dir",
                    &tls_s,
                    "--migration-network",
                    "migration",
                ],
            ));
            dirs_of.push(dirs);
        }
        assert!(wait_until(Duration::from_secs(20), || {
            String::from_utf8_lossy(&flotilla(&ctl, Self::COORD, &tls, &["hosts"]).stdout)
                .matches(" connected ")
                .count()
                == 2
        }));
        TwoHosts {
            ctl,
            a,
            b,
            far,
            tls,
            coordinator,
            agents,
            dirs: dirs_of,
            work,
        }
    }

    /// Runs `flotilla ARGS` against this coordinator.
    pub fn cli(&self, args: &[&str]) -> Output {
        flotilla(&self.ctl, Self::COORD, &self.tls, args)
    }
}

/// host-a's `public`: its bridge br0.
pub const PUBLIC_BRIDGE: &str =
    "<network><name>public</name><forward mode='bridge'/><bridge name='br0'/></network>";

/// Runs the `flotilla` CLI in `ns` against `coordinator` with the admin certificate in `tls`.
pub fn flotilla(ns: &Netns, coordinator: &str, tls: &Path, args: &[&str]) -> Output {
    let mut c = ns.command(&bin("flotilla"));
    c.arg("--coordinator")
        .arg(coordinator)
        .arg("--tls-dir")
        .arg(tls)
        .args(args);
    output(c)
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The lines a child process writes to a pipe, read on a thread as they
/// arrive, so a test can wait for a line instead of sleeping.
pub struct Lines {
    rx: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Lines {
    /// Starts reading `pipe` on its own thread.
    pub fn read(pipe: impl std::io::Read + Send + 'static) -> Lines {
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
            reader: Some(reader),
        }
    }

    /// Waits until the lines seen so far satisfy `done`; on timeout or end
    /// of the pipe, returns what was seen as the error.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[String]) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(e) => return Err(format!("{e} after:\n{}", self.seen.join("\n"))),
            }
        }
        Ok(())
    }

    /// The lines seen so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// The next line not yet seen, waiting at most `timeout` for it.
    pub fn next_line(&mut self, timeout: Duration) -> Result<String, String> {
        let line = self
            .rx
            .recv_timeout(timeout)
            .map_err(|e| format!("{e} after:\n{}", self.seen.join("\n")))?;
        self.seen.push(line.clone());
        Ok(line)
    }

    /// Every line, once the writer has closed the pipe.
    pub fn finish(mut self) -> String {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.seen.extend(self.rx.try_iter());
        self.seen.join("\n")
    }
}

/// A plain HTTP/1.0 GET of `path` from `addr`; returns the body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(out))
}

/// A private libvirtd in a namespace host (`deploy/libvirt-host.sh`), for
/// benchmarks that compare Flotilla with libvirt on the same host.
pub struct LibvirtDaemon {
    /// The `ip netns exec … unshare -m` child; it execs into libvirtd.
    pub child: Child,
    /// Its run/state/log/config folders.
    pub work: PathBuf,
}

impl LibvirtDaemon {
    /// Starts libvirtd in `ns` with its state under `work` and waits until it answers.
    pub fn start(ns: &Netns, work: &Path) -> LibvirtDaemon {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/libvirt-host.sh");
        std::fs::create_dir_all(work).expect("libvirt work dir");
        let log = std::fs::File::create(work.join("libvirt-host.out")).expect("log");
        let mut c = ns.command(Path::new("unshare"));
        c.arg("-m")
            .arg(&script)
            .arg(work)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = c.spawn().expect("spawn libvirtd");
        let mut daemon = LibvirtDaemon {
            child,
            work: work.to_path_buf(),
        };
        let logs = || {
            let read = |f: &str| std::fs::read_to_string(work.join(f)).unwrap_or_default();
            format!("{}{}", read("libvirt-host.out"), read("log/libvirtd.log"))
        };
        // The first start probes QEMU's capabilities, which takes a while.
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if daemon.virsh(&["version"]).status.success() {
                return daemon;
            }
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("libvirtd exited ({status}) before answering: {}", logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("libvirtd did not come up: {}", logs());
    }

    /// `qemu:///system` on this daemon's socket.
    pub fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.work.join("run/libvirt-sock").display()
        )
    }

    /// Runs `virsh -c URI ARGS`.
    pub fn virsh(&self, args: &[&str]) -> Output {
        let mut c = Command::new("virsh");
        c.args(["-q", "-c", &self.uri()]).args(args);
        output(c)
    }

    /// Runs `virsh` and panics with its stderr when it fails.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        let o = self.virsh(args);
        assert!(
            o.status.success(),
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for LibvirtDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident set size of `pid` in MiB, from /proc.
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// CPU seconds (user + system) `pid` has used, from /proc.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// Median of `samples` (NaN when empty).
pub fn median(samples: &[f64]) -> f64 {
    quantile(samples, 0.5)
}

/// The `q` quantile of `samples`, nearest rank (NaN when empty).
pub fn quantile(samples: &[f64], q: f64) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}
