//! The QEMU guest agent (`qemu-ga`) over the VM's `org.qemu.guest_agent.0`
//! channel: where the socket is, one command at a time, and what the
//! answers mean.
//!
//! The agent protocol is QMP-like JSON lines with no greeting. A client
//! that connects may find a half-read answer meant for an earlier client,
//! so every exchange starts with `guest-sync` and a fresh id, and lines
//! before the echoed id are dropped, as libvirt does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_shared::hardware::{self, CharBackend, Hw};
use flotilla_shared::proto::GuestInterface;
use flotilla_shared::xml::Domain;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Most a guest may send in one exchange: the guest is not trusted.
const MAX_ANSWER: u64 = 1 << 20;

/// The guest agent's well-known port name.
pub const GUEST_AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// The host socket of the VM's guest agent channel, if it has one: a
/// relative path is a file in the VM's state directory `dir`.
pub fn socket_of(live: &Domain, dir: &Path) -> Option<PathBuf> {
    let hw = hardware::plan(live).ok()?;
    hw.devices.iter().find_map(|d| match d {
        Hw::Channel {
            name: Some(name),
            chardev: CharBackend::Unix { path, .. },
            ..
        } if name == GUEST_AGENT_PORT => Some(if path.starts_with('/') {
            PathBuf::from(path)
        } else {
            dir.join(path)
        }),
        _ => None,
    })
}

/// `guest-network-get-interfaces`' answer as `domifaddr` lists it.
pub fn interfaces(answer: &Value) -> Vec<GuestInterface> {
    answer
        .as_array()
        .map(|list| {
            list.iter()
                .map(|i| GuestInterface {
                    name: i["name"].as_str().unwrap_or_default().to_string(),
                    mac: i["hardware-address"].as_str().map(str::to_string),
                    addresses: i["ip-addresses"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|ip| {
                                    Some(format!(
                                        "{}/{}",
                                        ip["ip-address"].as_str()?,
                                        ip["prefix"].as_u64()?
                                    ))
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `command` on the guest agent at `socket`: its `return` value.
pub async fn run(
    socket: &Path,
    command: &str,
    timeout: Duration,
    sync_id: u64,
) -> Result<Value, String> {
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
            format!(
                "cannot connect to the guest agent channel {}: {e}",
                socket.display()
            )
        })?;
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r.take(MAX_ANSWER)).lines();
        let sync = json!({"execute": "guest-sync", "arguments": {"id": sync_id}});
        w.write_all(format!("{sync}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        loop {
            let line = lines
                .next_line()
                .await
                .map_err(|e| e.to_string())?
                .ok_or("the guest agent channel closed (or sent more than 1 MiB)")?;
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if v["return"].as_u64() == Some(sync_id) {
                break;
            }
        }
        w.write_all(format!("{}\n", json!({"execute": command})).as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let line = lines
            .next_line()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the guest agent channel closed")?;
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| format!("the guest agent answered something that is not JSON: {e}"))?;
        match (v.get("return"), v.get("error")) {
            (Some(r), _) => Ok(r.clone()),
            (None, Some(e)) => Err(format!(
                "the guest agent refused {command}: {}",
                e["desc"].as_str().unwrap_or("no reason given")
            )),
            _ => Err(format!("the guest agent answered {command} with {v}")),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the guest agent did not answer within {} s (is qemu-guest-agent running in the guest?)",
                timeout.as_secs()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_channel_socket_is_in_the_vm_dir_unless_given() {
        let d = |channel: &str| {
            Domain::parse(
                "d.xml",
                &format!(
                    "<domain type='kvm'><name>d</name><memory>65536</memory><os><type>hvm</type></os>\
                     <devices>{channel}</devices></domain>"
                ),
            )
            .expect("parses")
            .model
        };
        let dir = Path::new("/run/flt/vms/d");
        let auto = d(
            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
        );
        assert_eq!(
            socket_of(&auto, dir),
            Some(dir.join("org.qemu.guest_agent.0"))
        );
        let given = d(
            "<channel type='unix'><source mode='bind' path='/srv/ga.sock'/>\
                       <target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
        );
        assert_eq!(socket_of(&given, dir), Some(PathBuf::from("/srv/ga.sock")));
        let other =
            d("<channel type='unix'><target type='virtio' name='org.example.0'/></channel>");
        assert_eq!(socket_of(&other, dir), None);
    }

    #[test]
    fn interfaces_read_names_macs_and_addresses_with_prefixes() {
        let answer = json!([
            {"name": "lo", "ip-addresses": [
                {"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]},
            {"name": "enp1s0", "hardware-address": "52:54:00:aa:bb:01", "ip-addresses": [
                {"ip-address-type": "ipv4", "ip-address": "198.18.1.10", "prefix": 24},
                {"ip-address-type": "ipv6", "ip-address": "fe80::1", "prefix": 64}]},
            {"name": "enp2s0", "hardware-address": "52:54:00:aa:bb:02"}
        ]);
        assert_eq!(
            interfaces(&answer),
            vec![
                GuestInterface {
                    name: "lo".into(),
                    mac: None,
                    addresses: vec!["127.0.0.1/8".into()]
                },
                GuestInterface {
                    name: "enp1s0".into(),
                    mac: Some("52:54:00:aa:bb:01".into()),
                    addresses: vec!["198.18.1.10/24".into(), "fe80::1/64".into()],
                },
                GuestInterface {
                    name: "enp2s0".into(),
                    mac: Some("52:54:00:aa:bb:02".into()),
                    addresses: vec![]
                },
            ]
        );
    }

    /// A stand-in guest agent: one stale line first, then answers sync and
    /// the command as qemu-ga does.
    #[tokio::test]
    async fn an_exchange_syncs_past_stale_lines_and_returns_the_answer() {
        let dir = tempfile::tempdir().expect("dir");
        let socket = dir.path().join("ga.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let guest = tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"{\"return\": \"stale\"}\n")
                .await
                .expect("stale");
            let sync: Value =
                serde_json::from_str(&lines.next_line().await.expect("read").expect("sync"))
                    .expect("json");
            let id = sync["arguments"]["id"].clone();
            w.write_all(format!("{}\n", json!({"return": id})).as_bytes())
                .await
                .expect("sync answer");
            let cmd: Value =
                serde_json::from_str(&lines.next_line().await.expect("read").expect("cmd"))
                    .expect("json");
            assert_eq!(cmd["execute"], "guest-network-get-interfaces");
            w.write_all(b"{\"return\": [{\"name\": \"eth0\"}]}\n")
                .await
                .expect("answer");
        });
        let v = run(
            &socket,
            "guest-network-get-interfaces",
            Duration::from_secs(5),
            77,
        )
        .await
        .expect("answer");
        assert_eq!(v, json!([{"name": "eth0"}]));
        guest.await.expect("guest");
        // Nobody listening: a clear error naming the channel.
        let e = run(
            &dir.path().join("none.sock"),
            "guest-info",
            Duration::from_secs(1),
            1,
        )
        .await
        .expect_err("no agent");
        assert!(
            e.starts_with("cannot connect to the guest agent channel"),
            "{e}"
        );
    }
}
