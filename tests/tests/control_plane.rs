//! The control plane on etcd: three real etcd members and three real
//! coordinators in a namespace (see `flotilla_tests::control_plane`).
//!
//! - The store fences a deposed leader's writes and swaps rows by revision.
//! - A leader stopped past its lease is replaced, and when it resumes it
//!   writes nothing and stops.
//! - Three CLIs define 300 VMs through a leader kill: each exactly once.

#![allow(clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use flotilla_coordinator::etcd_store::{self, EtcdSettings, EtcdStore};
use flotilla_coordinator::leadership::Session;
use flotilla_coordinator::store::{HostRow, NewDefinition, Store, StoreError};
use flotilla_shared::net::pki::Role;
use flotilla_shared::net::{quic, tls};
use flotilla_shared::proto::{ClientMessage, OperatorRequest, ServerMessage};
use flotilla_tests::control_plane::{self, ControlPlane};
use flotilla_tests::wait_until;

fn definition(name: &str, uuid: &str) -> NewDefinition {
    NewDefinition {
        name: name.into(),
        uuid: uuid.into(),
        xml: control_plane::small_domain(name),
    }
}

fn listed(cp: &ControlPlane) -> Vec<serde_json::Value> {
    let out = cp.cli(&["--json", "list", "--all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["Vms"].as_array().cloned().unwrap_or_default()
}

#[test]
fn the_etcd_store_fences_a_deposed_leader_and_swaps_rows_by_revision() {
    let cp = ControlPlane::etcd_only("cpfence", &[]);
    let endpoints: Vec<String> = cp.endpoints().split(',').map(str::to_string).collect();
    let (cert, key) = cp.etcd_cert(0);
    let tls = flotilla_coordinator::etcd_store::EtcdTls {
        ca: cp.tls.join("ca.pem"),
        cert,
        key,
    };
    cp.ns.run(move || {
        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime"),
        );
        let settings = EtcdSettings {
            endpoints,
            prefix: "/fence-test".into(),
            tls: Some(tls),
        };
        let (client, campaign_client, admin) = rt.block_on(async {
            (
                etcd_store::connect(&settings, true).await.expect("connect"),
                etcd_store::connect(&settings, false)
                    .await
                    .expect("connect"),
                etcd_store::connect(&settings, true).await.expect("connect"),
            )
        });
        let ttl = Duration::from_secs(1);
        let lost_a = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (session_a, fence_a) = rt.block_on(async {
            let lost = lost_a.clone();
            let s = Session::open(client.clone(), "/fence-test", "a:7443", ttl, move |_| {
                lost.store(true, std::sync::atomic::Ordering::SeqCst)
            })
            .await
            .expect("session a");
            let f = s.campaign(&campaign_client).await;
            (s, f)
        });
        let deposed_a = Arc::new(tokio::sync::Notify::new());
        let a = EtcdStore::new(
            client.clone(),
            "/fence-test",
            Some(fence_a.clone()),
            rt.clone(),
            deposed_a.clone(),
        )
        .expect("store a");
        let row = a.define(definition("web", "u-web")).expect("define");
        assert_eq!(row.generation, 1);
        assert_eq!(
            a.define(definition("web", "u-web"))
                .expect("again")
                .generation,
            1,
            "the same definition again is not a second write"
        );
        assert!(matches!(
            a.define(definition("web", "u-other")),
            Err(StoreError::NameTaken { .. })
        ));
        let placed = a
            .set_placement("web", Some("host-a".into()), true)
            .expect("place");
        assert_eq!(placed.placement.as_deref(), Some("host-a"));
        a.put_host(
            &HostRow {
                name: "host-a".into(),
                cpus: 4,
                memory_mib: 4096,
                draining: false,
                fence: Default::default(),
            },
            true,
        )
        .expect("host");

        // A write behind the leader's back (etcdctl, say) is not lost: the
        // leader's next change compares the row's revision, fails, reads it
        // again and builds on it.
        rt.block_on(async {
            let key = "/fence-test/definitions/web";
            let mut row: serde_json::Value = serde_json::from_slice(
                admin.kv_client().get(key, None).await.expect("get").kvs()[0].value(),
            )
            .expect("json");
            row["incarnation"] = 7.into();
            admin
                .kv_client()
                .put(key, serde_json::to_vec(&row).expect("json"), None)
                .await
                .expect("put behind the leader");
        });
        let swapped = a
            .set_placement("web", Some("host-b".into()), true)
            .expect("place again");
        assert_eq!(
            (swapped.incarnation, swapped.placement.as_deref()),
            (7, Some("host-b"))
        );
        a.set_placement("web", Some("host-a".into()), true)
            .expect("place back");

        // A follower reads but never writes.
        let follower = EtcdStore::new(
            client.clone(),
            "/fence-test",
            None,
            rt.clone(),
            Arc::new(tokio::sync::Notify::new()),
        )
        .expect("follower store");
        assert_eq!(follower.list().expect("list").len(), 1);
        assert!(matches!(
            follower.define(definition("x", "u-x")),
            Err(StoreError::NotLeader)
        ));

        // A group: its writes are read back at once and reach etcd together
        // at its end.
        a.begin_group();
        a.define(definition("grouped", "u-grouped"))
            .expect("define in a group");
        a.set_placement("grouped", Some("host-a".into()), true)
            .expect("place in a group");
        assert_eq!(
            a.get("grouped").expect("get").and_then(|r| r.placement),
            Some("host-a".into())
        );
        assert_eq!(a.list().expect("list").len(), 2);
        assert!(
            follower.get("grouped").expect("get").is_none(),
            "not in etcd before the group ends"
        );
        a.end_group().expect("end group");
        let stored = follower.get("grouped").expect("get").expect("in etcd");
        assert_eq!(
            (stored.generation, stored.placement.as_deref()),
            (1, Some("host-a"))
        );
        a.undefine("grouped").expect("undefine");
        assert!(follower.get("grouped").expect("get").is_none());

        // A's lease ends as it would while A is paused past its TTL; B is elected.
        rt.block_on(async {
            admin
                .lease_client()
                .revoke(session_a_lease(&admin, &fence_a).await)
                .await
                .expect("revoke");
        });
        let fence_b = rt.block_on(async {
            let s = Session::open(client.clone(), "/fence-test", "b:7443", ttl, |_| {})
                .await
                .expect("session b");
            s.campaign(&campaign_client).await
        });
        assert!(fence_b.revision > fence_a.revision, "a newer epoch");
        let b = EtcdStore::new(
            client.clone(),
            "/fence-test",
            Some(fence_b),
            rt.clone(),
            Arc::new(tokio::sync::Notify::new()),
        )
        .expect("store b");

        // A has not noticed; each of its writes is refused and changes nothing.
        let epoch = fence_a.revision;
        assert!(matches!(
            a.define(definition("late", "u-late")),
            Err(StoreError::Fenced { epoch: e }) if e == epoch
        ));
        assert!(matches!(
            a.set_placement("web", Some("host-z".into()), true),
            Err(StoreError::Fenced { .. })
        ));
        assert!(matches!(a.undefine("web"), Err(StoreError::Fenced { .. })));
        assert!(b.get("late").expect("get").is_none());
        let web = b.get("web").expect("get").expect("web");
        assert_eq!(web.placement.as_deref(), Some("host-a"));
        assert_eq!(web.generation, 1);
        // The store told its process to stop.
        let told = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), deposed_a.notified())
                .await
                .is_ok()
        });
        assert!(told, "a fenced write wakes the demotion");
        assert!(
            wait_until(Duration::from_secs(3), || lost_a
                .load(std::sync::atomic::Ordering::SeqCst)),
            "A's keep-alive learns its lease is gone"
        );
        // B writes.
        b.set_placement("web", None, false).expect("b writes");
        drop(session_a);
    });
}

/// The lease behind a fence's election key.
async fn session_a_lease(
    client: &etcd_client::Client,
    fence: &flotilla_coordinator::etcd_store::Fence,
) -> i64 {
    let r = client
        .kv_client()
        .get(fence.key.clone(), None)
        .await
        .expect("get election key");
    r.kvs().first().expect("election key").lease()
}

#[test]
fn a_paused_leader_is_replaced_and_writes_nothing_when_it_resumes() {
    let mut cp = ControlPlane::start("cppause", &[]);
    let epoch = cp.epoch();
    let pid = cp.coordinator_pid(0).expect("leader runs") as i32;
    // An operator connection to the leader, opened before it stops.
    let (to_client, commands) = std::sync::mpsc::channel::<()>();
    let (answers, from_client) = std::sync::mpsc::channel::<String>();
    let tls_dir = cp.tls.clone();
    let client = cp.ns.spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let config = tls::client_config(&tls_dir, Role::Operator, "admin").expect("tls");
            let addr = format!("{}:7443", control_plane::address(0))
                .parse()
                .expect("addr");
            let conn = quic::connect(addr, config).await.expect("connect");
            answers.send("connected".into()).expect("send");
            commands.recv().expect("go");
            let request = ClientMessage::Operator(OperatorRequest::Define {
                xml: control_plane::small_domain("sent-to-the-paused-leader"),
                source: "paused.xml".into(),
            });
            let reply: Result<ServerMessage, _> =
                quic::call(&conn, &request, Duration::from_secs(20)).await;
            answers.send(format!("{reply:?}")).expect("send");
        })
    });
    assert_eq!(from_client.recv().expect("connected"), "connected");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP");
    // The define waits in the stopped leader's socket.
    to_client.send(()).expect("go");
    let mut new_leader = None;
    let replaced = wait_until(Duration::from_secs(20), || {
        new_leader = cp
            .wait_leader(Duration::from_millis(10))
            .filter(|&i| i != 0);
        new_leader.is_some()
    });
    assert!(replaced, "no new leader while the old one is stopped");
    assert!(cp.epoch() > epoch, "the new leader has a newer epoch");
    std::fs::write(
        cp.dir.path().join("after.xml"),
        control_plane::small_domain("defined-by-the-new-leader"),
    )
    .expect("write");
    let after = cp.dir.path().join("after.xml");
    let out = cp.cli(&["define", after.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("SIGCONT");
    // It stops itself (exit 3) rather than act as a leader.
    assert_eq!(cp.wait_exit(0, Duration::from_secs(10)), Some(3));
    let reply = from_client
        .recv_timeout(Duration::from_secs(30))
        .expect("reply");
    assert!(
        reply.contains("no longer the leader") || reply.starts_with("Err("),
        "the paused leader's define was refused or never answered: {reply}"
    );
    let names: Vec<String> = listed(&cp)
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        names,
        ["defined-by-the-new-leader"],
        "nothing written by the deposed leader"
    );
    let log = cp.log("coordinator-0");
    assert!(
        log.contains("lease lost") || log.contains("no longer the leader"),
        "{log}"
    );
    client.join().expect("client thread");
}

#[test]
fn three_clis_define_300_vms_through_a_leader_kill_and_each_is_stored_once() {
    let mut cp = ControlPlane::start("cpkill", &[]);
    let run = control_plane::defines_through_a_leader_kill(&mut cp, "d", 100, 100, false);
    assert!(run.failures.is_empty(), "CLIs failed: {:?}", run.failures);
    assert_eq!(run.acked.len(), 300);
    let vms = listed(&cp);
    let mut names: Vec<&str> = vms.iter().filter_map(|v| v["name"].as_str()).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!((before, names.len()), (300, 300), "each define stored once");
    for v in &vms {
        assert_eq!(v["generation"], 1, "applied once: {v}");
    }
    let mut acked = run.acked.clone();
    acked.sort_unstable();
    assert_eq!(acked, names, "every acknowledged define is there");
    eprintln!(
        "leader {} killed: elected after {:?} s, first write after {:?} s",
        run.killed, run.elected_after, run.first_write_after
    );
    assert!(
        run.first_write_after.is_some(),
        "the new leader wrote: {}\n{}",
        cp.log("coordinator-1"),
        cp.log("coordinator-2")
    );
    // The new leader's fleet answers, and the killed one rejoins as a follower.
    cp.start_coordinator(run.killed);
    assert!(
        wait_until(Duration::from_secs(20), || cp.cluster().len() == 3),
        "{:?}\n{}",
        cp.cluster(),
        cp.log(&format!("coordinator-{}", run.killed))
    );
    let leaders = cp.cluster().iter().filter(|c| c["leader"] == true).count();
    assert_eq!(leaders, 1);
}

/// Two hosts on the control plane's bridge, their agents listing all three
/// coordinators.
struct Hosts {
    nss: Vec<flotilla_tests::Netns>,
    _far: flotilla_tests::Netns,
    dirs: Vec<flotilla_tests::AgentDirs>,
    _agents: Vec<flotilla_tests::AgentDaemon>,
}

fn hosts_on(cp: &ControlPlane) -> Hosts {
    let (a, b, far) = flotilla_tests::public_and_fabric("cg");
    cp.ns
        .veth_to("mg11", None, Some("cp0"), &a, "mgmt0", "198.18.9.11/24");
    cp.ns
        .veth_to("mg12", None, Some("cp0"), &b, "mgmt0", "198.18.9.12/24");
    let tls = cp.tls.to_str().expect("utf-8").to_string();
    let list = cp.coordinators();
    let mut dirs_of = Vec::new();
    let mut agents = Vec::new();
    for (ns, name, public) in [
        (&a, "host-a", flotilla_tests::PUBLIC_BRIDGE),
        (
            &b,
            "host-b",
            "<network><name>public</name><forward mode='bridge' dev='uplink0'/></network>",
        ),
    ] {
        let mut c = std::process::Command::new(flotilla_tests::bin("flotilla"));
        c.args(["certs", "issue", "--agent", name, "--dir"])
            .arg(&cp.tls);
        assert!(flotilla_tests::output(c).status.success());
        let dirs = flotilla_tests::AgentDirs::new();
        dirs.network("public", public);
        dirs.network(
            "migration",
            "<network><name>migration</name><forward mode='bridge' dev='fab0'/></network>",
        );
        agents.push(flotilla_tests::AgentDaemon::start(
            ns,
            name,
            &dirs,
            &[
                "--coordinator",
                &list,
                "--tls-dir",
                &tls,
                "--migration-network",
                "migration",
            ],
        ));
        dirs_of.push(dirs);
    }
    let hosts = Hosts {
        nss: vec![a, b],
        _far: far,
        dirs: dirs_of,
        _agents: agents,
    };
    assert!(
        wait_until(Duration::from_secs(30), || connected(cp) == 2),
        "hosts did not register with the leader"
    );
    hosts
}

/// Hosts the leader counts as connected (a follower's `hosts` says "stored").
fn connected(cp: &ControlPlane) -> usize {
    let Some(leader) = cp.wait_leader(Duration::from_secs(5)) else {
        return 0;
    };
    let addr = format!("{}:7443", control_plane::address(leader));
    let o = flotilla_tests::flotilla(&cp.ns, &addr, &cp.tls, &["--retry-secs", "0", "hosts"]);
    String::from_utf8_lossy(&o.stdout)
        .matches(" connected ")
        .count()
}

fn counter(hosts: &Hosts, idx: usize, name: &str) -> Option<u32> {
    let mut c =
        flotilla_tests::agent_command(&hosts.nss[idx], ["host-a", "host-b"][idx], &hosts.dirs[idx]);
    c.args(["ctl", "qemu-monitor-command", name, "--hmp"])
        .arg(format!(
            "xp /1wx {:#x}",
            flotilla_tests::guest::COUNTER_ADDR
        ));
    let o = flotilla_tests::output(c);
    flotilla_tests::guest::parse_xp_word(&String::from_utf8_lossy(&o.stdout))
}

/// Whether the guest counts on host `idx` (its counter moves).
fn counts_on(hosts: &Hosts, idx: usize, name: &str) -> bool {
    let Some(before) = counter(hosts, idx, name) else {
        return false;
    };
    wait_until(Duration::from_secs(5), || {
        counter(hosts, idx, name).is_some_and(|c| c > before)
    })
}

/// Kills the leader, waits for another, restarts the killed one as its
/// supervisor would; the new leader's index.
fn kill_the_leader(cp: &mut ControlPlane) -> usize {
    let old = cp.wait_leader(Duration::from_secs(20)).expect("a leader");
    cp.kill_coordinator(old);
    let new = cp
        .wait_leader(Duration::from_secs(20))
        .expect("a new leader");
    assert_ne!(new, old);
    cp.start_coordinator(old);
    new
}

#[test]
fn a_guest_runs_untouched_through_ten_leader_kills_and_a_migration_cut_by_one_ends_with_one_copy() {
    let mut cp = ControlPlane::start("cpguest", &[]);
    let hosts = hosts_on(&cp);
    let raw = cp.dir.path().join("counter.raw");
    std::fs::write(&raw, flotilla_tests::guest::counting_disk_image()).expect("image");
    let uuid = flotilla_tests::new_uuid();
    let devices = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <graphics type='vnc'><listen type='network' network='public'/></graphics>",
        raw.display()
    );
    let xml = flotilla_tests::domain_xml("keeper", &uuid, &devices).replace(
        "<os><type arch='x86_64' machine='pc'>hvm</type></os>",
        "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>",
    );
    let file = cp.dir.path().join("keeper.xml");
    std::fs::write(&file, xml).expect("write");
    let o = cp.cli(&["define", file.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = cp.cli(&["start", "keeper", "--host", "host-a"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(counts_on(&hosts, 0, "keeper") || counts_on(&hosts, 0, "keeper"));
    let qemu = flotilla_tests::qemu_pids_for(&uuid);
    assert_eq!(qemu.len(), 1);
    let vnc = || {
        hosts.nss[0].run(|| {
            flotilla_tests::rfb_banner("198.18.1.1".parse().expect("ip"), 5900)
                .is_ok_and(|b| b.starts_with("RFB 003.00"))
        })
    };
    assert!(vnc(), "console answers");
    let mut epochs = vec![cp.epoch()];
    for kill in 0..10 {
        kill_the_leader(&mut cp);
        assert!(
            wait_until(Duration::from_secs(20), || connected(&cp) == 2),
            "kill {kill}: the hosts did not move to the new leader"
        );
        epochs.push(cp.epoch());
        assert_eq!(
            flotilla_tests::qemu_pids_for(&uuid),
            qemu,
            "kill {kill}: the guest's QEMU changed"
        );
        assert!(
            counts_on(&hosts, 0, "keeper"),
            "kill {kill}: the guest stopped counting"
        );
        assert!(vnc(), "kill {kill}: the console stopped answering");
    }
    assert!(
        epochs.windows(2).all(|w| w[1] > w[0]),
        "every leader has a newer epoch: {epochs:?}"
    );

    // A migration the leader's death cuts short ends with exactly one copy.
    let mut migrate = cp.ns.command(&flotilla_tests::bin("flotilla"));
    migrate
        .args(["--coordinator", &cp.coordinators(), "--tls-dir"])
        .arg(&cp.tls)
        .args(["migrate", "keeper", "--to", "host-b", "--bandwidth", "4"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = migrate.spawn().expect("migrate");
    let mut lines = flotilla_tests::Lines::read(child.stderr.take().expect("stderr"));
    lines
        .wait_for(Duration::from_secs(20), |seen| {
            seen.iter().any(|l| l.contains("progress"))
        })
        .expect("the migration is under way");
    kill_the_leader(&mut cp);
    let _ = child.wait();
    let settled = wait_until(Duration::from_secs(60), || {
        let list = cp.cli(&["--json", "list"]);
        let running_on: Option<String> = serde_json::from_slice::<serde_json::Value>(&list.stdout)
            .ok()
            .and_then(|v| {
                v["Vms"]
                    .as_array()?
                    .iter()
                    .find(|e| e["name"] == "keeper")
                    .and_then(|e| {
                        (e["state"] == "running").then(|| e["host"].as_str().map(str::to_string))?
                    })
            });
        flotilla_tests::qemu_pids_for(&uuid).len() == 1 && running_on.is_some()
    });
    assert!(settled, "the migration did not settle to one running copy");
    let on_b = flotilla_tests::qemu_runs_in(&hosts.nss[1], &uuid);
    let idx = usize::from(on_b);
    assert!(counts_on(&hosts, idx, "keeper"), "the one copy runs");
    eprintln!(
        "migration cut by a leader kill ended on host-{}",
        if on_b { "b" } else { "a" }
    );
}
