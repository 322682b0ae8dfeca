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
            tls: None,
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
    assert!(run.first_write_after.is_some(), "the new leader wrote");
    // The new leader's fleet answers, and the killed one rejoins as a follower.
    cp.start_coordinator(run.killed);
    assert!(wait_until(Duration::from_secs(20), || cp.cluster().len() == 3));
    let leaders = cp.cluster().iter().filter(|c| c["leader"] == true).count();
    assert_eq!(leaders, 1);
}
