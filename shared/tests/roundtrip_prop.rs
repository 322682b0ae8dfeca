//! Property: for any domain model the parser can produce, writing it and
//! parsing it back returns the same model, in every XML flavor that keeps it.

use flotilla_shared::xml::domain::{BootDevice, Disk, Interface, Memory, Os, Vcpu};
use flotilla_shared::xml::{
    Device, Domain, Extra, Graphics, GraphicsProtocol, Listen, ListenKind, SharePolicy, XmlFlavor,
};
use proptest::prelude::*;
use uuid::Uuid;

/// Text as an operator might write it, markup characters included, already trimmed.
fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9<>&'\"_.:/ -]{0,24}"
        .prop_map(|s| s.trim().to_string())
        .prop_filter("non-empty", |s| !s.is_empty())
}

fn word() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_.-]{0,15}"
}

fn listen(first_is_socket_ok: bool) -> impl Strategy<Value = Listen> {
    let kind = prop_oneof![
        proptest::option::of("(1?[0-9]{1,2}\\.){3}[0-9]{1,2}")
            .prop_map(|address| ListenKind::Address { address }),
        (
            word(),
            proptest::option::of("198\\.18\\.[0-9]{1,2}\\.[0-9]{1,2}")
        )
            .prop_map(|(network, address)| ListenKind::Network { network, address }),
        Just(ListenKind::None),
        proptest::option::of("/run/[a-z]{1,8}\\.sock")
            .prop_map(|socket| ListenKind::Socket { socket }),
    ];
    (kind, any::<bool>(), any::<bool>())
        .prop_map(|(kind, from_config, auto_generated)| {
            let from_config =
                from_config && matches!(kind, ListenKind::Address { address: Some(_) });
            Listen {
                kind,
                from_config,
                auto_generated,
                extra: Extra::default(),
            }
        })
        .prop_filter("socket first only where allowed", move |l| {
            first_is_socket_ok || !matches!(l.kind, ListenKind::Socket { .. })
        })
}

fn graphics() -> impl Strategy<Value = Graphics> {
    (
        prop_oneof![Just(GraphicsProtocol::Vnc), Just(GraphicsProtocol::Spice)],
        proptest::option::of(5900..=65535i32),
        any::<bool>(),
        proptest::option::of(5700..=65535i32),
        proptest::option::of(text()),
        proptest::option::of(prop_oneof![
            Just(SharePolicy::AllowExclusive),
            Just(SharePolicy::ForceShared),
            Just(SharePolicy::Ignore)
        ]),
        proptest::option::of(word()),
        proptest::collection::vec(listen(true), 0..3),
    )
        .prop_map(
            |(protocol, port, autoport, extra_port, passwd, share, keymap, listens)| {
                let vnc = protocol == GraphicsProtocol::Vnc;
                let socket_first = vnc
                    && matches!(
                        listens.first().map(|l| &l.kind),
                        Some(ListenKind::Socket { .. })
                    );
                let mut g = Graphics::new(protocol);
                // A VNC socket display has no ports at all; the parser makes it automatic.
                if !socket_first {
                    g.port = port;
                    g.autoport = autoport;
                    if vnc {
                        g.websocket = extra_port;
                    } else {
                        g.tls_port = extra_port;
                    }
                }
                g.passwd = passwd;
                g.share_policy = share.filter(|_| vnc);
                g.keymap = keymap;
                g.listens = listens;
                g
            },
        )
}

fn disk() -> impl Strategy<Value = Disk> {
    (
        proptest::option::of("/var/lib/flotilla/[a-z]{1,8}\\.qcow2"),
        proptest::option::of("vd[a-z]"),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(file, dev, readonly, shareable)| Disk {
            disk_type: Some("file".into()),
            device: Some("disk".into()),
            driver_name: Some("qemu".into()),
            driver_type: Some("qcow2".into()),
            driver_extra: Extra::default(),
            source_extra: file.as_ref().map(|_| Extra::default()),
            source_file: file,
            source_dev: None,
            target_bus: dev.as_ref().map(|_| "virtio".to_string()),
            target_dev: dev,
            target_extra: Extra::default(),
            readonly,
            shareable,
            extra: Extra::default(),
        })
}

fn interface() -> impl Strategy<Value = Interface> {
    (
        word(),
        proptest::option::of("52:54:00:[0-9a-f]{2}:[0-9a-f]{2}:[0-9a-f]{2}"),
    )
        .prop_map(|(network, mac)| Interface {
            if_type: "network".into(),
            mac,
            mac_extra: Extra::default(),
            source_network: Some(network),
            source_bridge: None,
            source_dev: None,
            source_mode: None,
            source_extra: Extra::default(),
            model: Some("virtio".into()),
            model_extra: Extra::default(),
            target_dev: None,
            extra: Extra::default(),
        })
}

prop_compose! {
    fn domain()(
        name in "[a-zA-Z][a-zA-Z0-9_.-]{0,20}",
        uuid in any::<u128>(),
        title in proptest::option::of(text()),
        description in proptest::option::of(text()),
        kib in 1u64..(1 << 40),
        vcpus in 1u32..64,
        machine in proptest::option::of(prop_oneof![Just("pc".to_string()), Just("q35".to_string())]),
        boot in proptest::collection::vec(prop_oneof![
            Just(BootDevice::Hd), Just(BootDevice::Cdrom), Just(BootDevice::Network)], 0..3),
        on_crash in proptest::option::of(prop_oneof![Just("destroy".to_string()), Just("restart".to_string())]),
        graphics in proptest::collection::vec(graphics(), 0..3),
        disks in proptest::collection::vec(disk(), 0..3),
        nics in proptest::collection::vec(interface(), 0..3),
    ) -> Domain {
        let mut devices = vec![Device::Emulator("/usr/bin/qemu-system-x86_64".into())];
        devices.extend(disks.into_iter().map(Device::Disk));
        devices.extend(nics.into_iter().map(Device::Interface));
        devices.extend(graphics.into_iter().map(Device::Graphics));
        Domain {
            domain_type: "kvm".into(),
            name,
            uuid: Uuid::from_u128(uuid),
            title,
            description,
            memory: Memory::kib(kib),
            current_memory: None,
            vcpu: Some(Vcpu { count: vcpus, current: None, extra: Extra::default() }),
            os: Os { os_type: "hvm".into(), arch: Some("x86_64".into()), machine, boot, extra: Extra::default() },
            features: None,
            cpu: None,
            clock: None,
            on_poweroff: None,
            on_reboot: None,
            on_crash,
            devices,
            extra: Extra::default(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn live_xml_round_trips(d in domain()) {
        let xml = d.to_xml(XmlFlavor::Live);
        let again = Domain::parse("prop.xml", &xml).map_err(|e| TestCaseError::fail(format!("{e}\n{xml}")))?;
        prop_assert_eq!(again.model, d);
    }

    #[test]
    fn inactive_xml_is_the_definition_without_runtime_state(d in domain()) {
        let definition = d.without_runtime_state();
        let xml = d.to_xml(XmlFlavor::Inactive);
        let again = Domain::parse("prop.xml", &xml).map_err(|e| TestCaseError::fail(format!("{e}\n{xml}")))?;
        prop_assert_eq!(again.model.without_runtime_state(), definition.clone());
        // Writing the definition itself gives the same document.
        prop_assert_eq!(definition.to_xml(XmlFlavor::Inactive), xml);
    }
}
