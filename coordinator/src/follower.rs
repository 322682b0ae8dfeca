//! What a follower coordinator answers, from the rows in etcd alone.
//!
//! A follower runs no fleet core and talks to no agent, so it knows what
//! the leader last stored, not what hosts report now. It answers the
//! read-only verbs from that (`list`, `dumpxml`, `dominfo`, `hosts`), saying
//! in the state word that it is the stored view, and sends every other verb
//! to the leader ([`OperatorError::NotLeader`]). Pure: the server reads the
//! rows and carries the answer back.

use flotilla_shared::proto::{
    DomInfo, HostEntry, OperatorError, OperatorRequest, OperatorResponse, VmListEntry,
};
use flotilla_shared::xml::{Domain, XmlFlavor};

use crate::fleet_core::{footprint, is_ha, not_found, shown_xml};
use crate::store::{HostRow, VmRow};

/// Whether a follower answers `request` itself (from stored rows).
pub fn answers(request: &OperatorRequest) -> bool {
    matches!(
        request,
        OperatorRequest::List { .. }
            | OperatorRequest::DumpXml { live: false, .. }
            | OperatorRequest::DomInfo { .. }
            | OperatorRequest::Hosts
    )
}

/// A VM as the stored row has it: `running` where the leader last placed it.
fn entry(row: &VmRow) -> VmListEntry {
    let running = row.want_running && row.placement.is_some();
    VmListEntry {
        name: row.name.clone(),
        uuid: row.uuid.clone(),
        state: if running { "running" } else { "shut off" }.to_string(),
        host: row.placement.clone().filter(|_| running),
        generation: row.generation,
        ha: is_ha(row),
        incarnation: row.incarnation,
        pending_restart: None,
    }
}

/// The answer to `request` from `vms` and `hosts`, or the redirection to
/// `leader` for a verb a follower does not answer.
pub fn answer(
    request: OperatorRequest,
    vms: &[VmRow],
    hosts: &[HostRow],
    leader: Option<String>,
) -> OperatorResponse {
    let row = |name: &str| vms.iter().find(|r| r.name == name);
    match request {
        OperatorRequest::List { all } => OperatorResponse::Vms(
            vms.iter()
                .map(entry)
                .filter(|e| all || e.state != "shut off")
                .collect(),
        ),
        OperatorRequest::DumpXml {
            name,
            live: false,
            security_info,
        } => match row(&name) {
            Some(r) if security_info => OperatorResponse::Xml(r.xml.clone()),
            Some(r) => shown_xml(&r.xml, XmlFlavor::Inactive),
            None => OperatorResponse::Error(not_found(&name)),
        },
        OperatorRequest::DomInfo { name } => match row(&name) {
            Some(r) => {
                let (vcpus, memory_kib) = Domain::parse(&name, &r.xml)
                    .map_or((0, 0), |d| (d.model.vcpus(), d.model.memory.kib));
                OperatorResponse::DomInfo(DomInfo {
                    entry: entry(r),
                    vcpus,
                    memory_kib,
                })
            }
            None => OperatorResponse::Error(not_found(&name)),
        },
        OperatorRequest::Hosts => OperatorResponse::Hosts(
            hosts
                .iter()
                .map(|h| {
                    let here: Vec<&VmRow> = vms
                        .iter()
                        .filter(|r| r.want_running && r.placement.as_deref() == Some(&h.name))
                        .collect();
                    HostEntry {
                        name: h.name.clone(),
                        // Liveness is the leader's to know.
                        state: if h.draining { "draining" } else { "stored" }.to_string(),
                        cpus: h.cpus,
                        memory_mib: h.memory_mib,
                        vms: here.len() as u32,
                        committed_vcpus: here.iter().map(|r| footprint(r).vcpus).sum(),
                        committed_memory_mib: here.iter().map(|r| footprint(r).memory_mib).sum(),
                        networks: Vec::new(),
                        last_seen_secs: 0,
                    }
                })
                .collect(),
        ),
        _ => OperatorResponse::Error(OperatorError::NotLeader { leader }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, placement: Option<&str>, want_running: bool) -> VmRow {
        VmRow {
            name: name.into(),
            uuid: format!("{name}-uuid"),
            xml: format!(
                "<domain type='kvm'><name>{name}</name><memory unit='MiB'>512</memory>\
                 <vcpu>2</vcpu><os><type>hvm</type></os>\
                 <devices><graphics type='vnc' passwd='secret'/></devices></domain>"
            ),
            generation: 1,
            want_running,
            placement: placement.map(str::to_string),
            migrating_to: None,
            incarnation: 0,
            ha_running: false,
        }
    }

    fn host(name: &str) -> HostRow {
        HostRow {
            name: name.into(),
            cpus: 8,
            memory_mib: 4096,
            draining: false,
            fence: Default::default(),
        }
    }

    #[test]
    fn reads_come_from_the_stored_rows_and_writes_go_to_the_leader() {
        let vms = [row("a", Some("h1"), true), row("b", None, false)];
        let hosts = [host("h1")];
        let leader = Some("198.18.0.1:7443".to_string());
        let OperatorResponse::Vms(listed) =
            answer(OperatorRequest::List { all: true }, &vms, &hosts, None)
        else {
            panic!("no list");
        };
        let states: Vec<_> = listed
            .iter()
            .map(|e| (e.name.as_str(), e.state.as_str()))
            .collect();
        assert_eq!(states, [("a", "running"), ("b", "shut off")]);
        let OperatorResponse::Xml(xml) = answer(
            OperatorRequest::DumpXml {
                name: "a".into(),
                live: false,
                security_info: false,
            },
            &vms,
            &hosts,
            None,
        ) else {
            panic!("no xml");
        };
        assert!(!xml.contains("secret"), "{xml}");
        let OperatorResponse::Hosts(h) = answer(OperatorRequest::Hosts, &vms, &hosts, None) else {
            panic!("no hosts");
        };
        assert_eq!(
            (h[0].vms, h[0].committed_vcpus, h[0].committed_memory_mib),
            (1, 2, 512)
        );
        for write in [
            OperatorRequest::Start {
                name: "b".into(),
                host: None,
            },
            OperatorRequest::Define {
                xml: String::new(),
                source: "x.xml".into(),
            },
            OperatorRequest::DumpXml {
                name: "a".into(),
                live: true,
                security_info: false,
            },
        ] {
            assert!(!answers(&write));
            assert_eq!(
                answer(write, &vms, &hosts, leader.clone()),
                OperatorResponse::Error(OperatorError::NotLeader {
                    leader: leader.clone()
                })
            );
        }
        assert_eq!(
            answer(
                OperatorRequest::DomInfo { name: "zz".into() },
                &vms,
                &hosts,
                None
            ),
            OperatorResponse::Error(OperatorError::NoSuchDomain { name: "zz".into() })
        );
    }
}
