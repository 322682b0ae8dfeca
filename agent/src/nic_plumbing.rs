//! Carries out [`NicPlan`]s on the host: creates taps and macvtaps, opens
//! them, and hands back the fds QEMU inherits. The only module that changes
//! the host's links.
//!
//! libvirt's details, kept here: a tap is created by `TUNSETIFF` on
//! `/dev/net/tun` (`IFF_TAP|IFF_NO_PI`, plus `IFF_VNET_HDR` for virtio where
//! the kernel has it), is not persistent (it goes with QEMU's last fd), gets
//! the guest MAC with a first byte `fe` before it joins the bridge (checked
//! again afterwards, since udev may rewrite it) and the bridge's MTU unless
//! `<mtu>` says otherwise. A macvtap is created over netlink with the guest's
//! MAC and opened by the major:minor its sysfs `tapN/dev` names, through a
//! node in the VM's own directory: `/dev/tapN` is named after an ifindex, and
//! network-namespace hosts share `/dev` while reusing ifindexes. Macvtaps
//! carry the alias `flotilla:VM`, so a restarted agent finds those whose VM
//! is gone.

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::path::Path;

use flotilla_shared::xml::domain::format_mac;
use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage, MacVtapMode as NlMode};
use rtnetlink::{Handle, LinkMacVtap, LinkUnspec};

use crate::nic_plan::{MacvtapMode, NicBackend, NicPlan, ALIAS_PREFIX};

/// A NIC's host side could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PlumbError {
    /// Talking to the kernel's netlink failed.
    #[error("netlink: cannot {action} '{dev}': {source}")]
    Netlink {
        /// What was being done.
        action: &'static str,
        /// The device.
        dev: String,
        /// Why.
        #[source]
        source: rtnetlink::Error,
    },
    /// A device, file or ioctl failed.
    #[error("cannot {action} '{dev}': {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The device or file.
        dev: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A device that should exist does not.
    #[error("no device '{0}' on this host")]
    NoDevice(String),
    /// Something keeps rewriting the tap's MAC.
    #[error("the MAC of '{dev}' is {found}, not {wanted} (something on the host rewrites it)")]
    MacRewritten {
        /// The device.
        dev: String,
        /// What was set.
        wanted: String,
        /// What the kernel reports.
        found: String,
    },
}

/// Open host devices for one QEMU: each fd with the number QEMU expects it on.
#[derive(Debug, Default)]
pub struct OpenedNics {
    /// (our fd, the fd number in QEMU).
    pub fds: Vec<(OwnedFd, i32)>,
    /// Macvtaps created, to delete if the start fails.
    pub macvtaps: Vec<String>,
}

/// Creates and opens every NIC of `vm`; `dir` is its state directory. With
/// `macvtaps_up` false (an incoming migration) macvtaps stay down until
/// [`set_links`]. Nothing is left behind on failure.
pub async fn plumb(
    vm: &str,
    dir: &Path,
    nics: &[NicPlan],
    macvtaps_up: bool,
) -> Result<OpenedNics, PlumbError> {
    if nics.iter().all(|n| n.dev.is_none()) {
        return Ok(OpenedNics::default());
    }
    let handle = connect()?;
    let mut opened = OpenedNics::default();
    for nic in nics {
        if let Err(e) = plumb_one(&handle, vm, dir, nic, macvtaps_up, &mut opened).await {
            delete_links(&opened.macvtaps).await;
            return Err(e);
        }
    }
    Ok(opened)
}

async fn plumb_one(
    handle: &Handle,
    vm: &str,
    dir: &Path,
    nic: &NicPlan,
    up: bool,
    opened: &mut OpenedNics,
) -> Result<(), PlumbError> {
    let Some(dev) = nic.dev.as_deref() else {
        return Ok(());
    };
    let fd = match &nic.backend {
        NicBackend::User => return Ok(()),
        NicBackend::Tap { bridge, mtu } => {
            let fd = tun::open_tap(dev, nic.vnet_hdr).map_err(io("create tap", dev))?;
            let bridge_link = link(handle, bridge).await?;
            let mtu = match mtu {
                Some(m) => *m,
                None => mtu_of(&bridge_link).unwrap_or(1500),
            };
            let tap = link(handle, dev).await?.header.index;
            let mac = nic.host_mac();
            set(handle, dev, "set MAC and MTU of", |b| {
                b.index(tap).address(mac.to_vec()).mtu(mtu)
            })
            .await?;
            set(handle, dev, "attach", |b| {
                b.index(tap).controller(bridge_link.header.index).up()
            })
            .await?;
            // udev may have rewritten the address between creation and now.
            let found = address_of(&link(handle, dev).await?);
            if found.as_deref() != Some(&mac[..]) {
                set(handle, dev, "set MAC of", |b| {
                    b.index(tap).address(mac.to_vec())
                })
                .await?;
                let again = address_of(&link(handle, dev).await?);
                if again.as_deref() != Some(&mac[..]) {
                    return Err(PlumbError::MacRewritten {
                        dev: dev.to_string(),
                        wanted: format_mac(&mac),
                        found: again.map(|a| format_mac(&a)).unwrap_or_default(),
                    });
                }
            }
            fd
        }
        NicBackend::Macvtap { uplink, mode } => {
            let lower = link(handle, uplink).await?.header.index;
            let mut msg =
                LinkMacVtap::new(dev, lower, netlink_mode(*mode)).address(nic.mac.to_vec());
            if up {
                msg = msg.up();
            }
            handle
                .link()
                .add(msg.build())
                .execute()
                .await
                .map_err(netlink("create macvtap", dev))?;
            opened.macvtaps.push(dev.to_string());
            let index = link(handle, dev).await?.header.index;
            set(handle, dev, "name", |b| {
                b.index(index).alias(format!("{ALIAS_PREFIX}{vm}"))
            })
            .await?;
            let fd = open_macvtap(dir, dev, index)?;
            if nic.vnet_hdr {
                tun::enable_vnet_hdr(&fd).map_err(io("set IFF_VNET_HDR on", dev))?;
            }
            fd
        }
    };
    opened.fds.push((fd, nic.fd()));
    if nic.vhost {
        let vhost = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/vhost-net")
            .map_err(io("open", "/dev/vhost-net"))?;
        opened.fds.push((vhost.into(), nic.vhost_fd()));
    }
    Ok(())
}

/// Brings `devs` up (a guest's macvtaps, as its CPUs start here) or down
/// (its CPUs stopped because it now runs elsewhere).
pub async fn set_links(devs: &[String], up: bool) -> Result<(), PlumbError> {
    let handle = connect()?;
    for dev in devs {
        let index = link(&handle, dev).await?.header.index;
        if up {
            set(&handle, dev, "bring up", |b| b.index(index).up()).await?;
        } else {
            set(&handle, dev, "bring down", |b| b.index(index).down()).await?;
        }
    }
    Ok(())
}

/// Deletes `devs`; a device already gone is not an error.
pub async fn delete_links(devs: &[String]) {
    let Ok(handle) = connect() else { return };
    for dev in devs {
        if let Ok(l) = link(&handle, dev).await {
            if let Err(e) = handle.link().del(l.header.index).execute().await {
                tracing::warn!(dev = %dev, error = %e, "cannot delete device");
            }
        }
    }
}

/// Deletes every device carrying Flotilla's alias whose VM is not in `keep`.
pub async fn remove_strays(keep: &[String]) -> Result<Vec<String>, PlumbError> {
    let handle = connect()?;
    let mut links = handle.link().get().execute();
    let mut strays = Vec::new();
    while let Some(l) = links.try_next().await.map_err(netlink("list", "links"))? {
        let alias = l.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfAlias(s) => Some(s.clone()),
            _ => None,
        });
        let owner = alias.as_deref().and_then(|a| a.strip_prefix(ALIAS_PREFIX));
        if let (Some(owner), Some(name)) = (owner, name_of(&l)) {
            if !keep.iter().any(|k| k == owner) {
                strays.push(name);
            }
        }
    }
    for s in &strays {
        tracing::info!(dev = %s, "removing a device whose VM is gone");
    }
    delete_links(&strays).await;
    Ok(strays)
}

fn connect() -> Result<Handle, PlumbError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(io("open", "netlink"))?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn link(handle: &Handle, name: &str) -> Result<LinkMessage, PlumbError> {
    let mut found = handle.link().get().match_name(name.to_string()).execute();
    match found.try_next().await {
        Ok(Some(l)) => Ok(l),
        Ok(None) => Err(PlumbError::NoDevice(name.to_string())),
        // The kernel answers ENODEV for a name it does not know.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => {
            Err(PlumbError::NoDevice(name.to_string()))
        }
        Err(e) => Err(netlink("find", name)(e)),
    }
}

async fn set(
    handle: &Handle,
    dev: &str,
    action: &'static str,
    build: impl FnOnce(
        rtnetlink::LinkMessageBuilder<LinkUnspec>,
    ) -> rtnetlink::LinkMessageBuilder<LinkUnspec>,
) -> Result<(), PlumbError> {
    let msg = build(rtnetlink::LinkMessageBuilder::<LinkUnspec>::default()).build();
    handle
        .link()
        .set(msg)
        .execute()
        .await
        .map_err(netlink(action, dev))
}

/// Opens the macvtap's character device through a node in `dir`, by the
/// numbers sysfs gives for this namespace's device.
fn open_macvtap(dir: &Path, dev: &str, index: u32) -> Result<OwnedFd, PlumbError> {
    let sys = format!("/sys/class/net/{dev}/macvtap/tap{index}/dev");
    let numbers = std::fs::read_to_string(&sys).map_err(io("read", &sys))?;
    let (major, minor) = numbers
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        .ok_or_else(|| PlumbError::Io {
            action: "parse",
            dev: sys.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                numbers.trim().to_string(),
            ),
        })?;
    std::fs::create_dir_all(dir).map_err(io("create", &dir.display().to_string()))?;
    let node = dir.join(format!("{dev}.chr"));
    let _ = std::fs::remove_file(&node);
    nix::sys::stat::mknod(
        &node,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(major, minor),
    )
    .map_err(|e| PlumbError::Io {
        action: "mknod",
        dev: node.display().to_string(),
        source: e.into(),
    })?;
    let opened = OpenOptions::new().read(true).write(true).open(&node);
    let _ = std::fs::remove_file(&node);
    Ok(opened
        .map_err(io("open", &node.display().to_string()))?
        .into())
}

fn netlink_mode(m: MacvtapMode) -> NlMode {
    match m {
        MacvtapMode::Bridge => NlMode::Bridge,
        MacvtapMode::Private => NlMode::Private,
        MacvtapMode::Vepa => NlMode::Vepa,
        MacvtapMode::Passthrough => NlMode::Passthrough,
    }
}

fn mtu_of(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

fn address_of(l: &LinkMessage) -> Option<Vec<u8>> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.clone()),
        _ => None,
    })
}

fn name_of(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn io(action: &'static str, dev: &str) -> impl FnOnce(std::io::Error) -> PlumbError {
    let dev = dev.to_string();
    move |source| PlumbError::Io {
        action,
        dev,
        source,
    }
}

fn netlink(action: &'static str, dev: &str) -> impl FnOnce(rtnetlink::Error) -> PlumbError {
    let dev = dev.to_string();
    move |source| PlumbError::Netlink {
        action,
        dev,
        source,
    }
}

/// The tun driver's ioctls: the only unsafe code in Flotilla, two calls on
/// a struct laid out as the kernel's `struct ifreq`.
#[allow(unsafe_code)]
mod tun {
    use std::fs::OpenOptions;
    use std::os::fd::{AsRawFd, OwnedFd};

    const IFF_TAP: i16 = 0x0002;
    const IFF_NO_PI: i16 = 0x1000;
    const IFF_VNET_HDR: i16 = 0x4000;

    /// `struct ifreq` with the `ifr_flags` member of its union.
    #[repr(C)]
    pub struct IfReq {
        name: [u8; 16],
        flags: i16,
        _pad: [u8; 22],
    }

    // _IOW('T', 202, int), _IOR('T', 207, unsigned int), _IOR('T', 210, unsigned int).
    nix::ioctl_write_ptr_bad!(tunsetiff, 0x4004_54ca, IfReq);
    nix::ioctl_read_bad!(tungetfeatures, 0x8004_54cf, u32);
    nix::ioctl_read_bad!(tungetiff, 0x8004_54d2, IfReq);

    fn features(fd: &OwnedFd) -> u32 {
        let mut f = 0u32;
        // SAFETY: the fd is open; the kernel writes one u32 into `f`.
        match unsafe { tungetfeatures(fd.as_raw_fd(), &mut f) } {
            Ok(_) => f,
            Err(_) => 0,
        }
    }

    /// Creates the non-persistent tap `name` and returns its fd.
    pub fn open_tap(name: &str, vnet_hdr: bool) -> std::io::Result<OwnedFd> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let fd: OwnedFd = file.into();
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        let bytes = name.as_bytes();
        if bytes.len() >= req.name.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "device name longer than 15 bytes",
            ));
        }
        req.name[..bytes.len()].copy_from_slice(bytes);
        if vnet_hdr && features(&fd) & IFF_VNET_HDR as u32 != 0 {
            req.flags |= IFF_VNET_HDR;
        }
        // SAFETY: the fd is open on /dev/net/tun and `req` is a valid ifreq
        // that outlives the call.
        unsafe { tunsetiff(fd.as_raw_fd(), &req) }.map_err(std::io::Error::from)?;
        Ok(fd)
    }

    /// Turns on `IFF_VNET_HDR` on an open macvtap, where supported.
    pub fn enable_vnet_hdr(fd: &OwnedFd) -> std::io::Result<()> {
        if features(fd) & IFF_VNET_HDR as u32 == 0 {
            return Ok(());
        }
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: the fd is an open macvtap; the kernel fills `req`.
        unsafe { tungetiff(fd.as_raw_fd(), &mut req) }.map_err(std::io::Error::from)?;
        req.flags |= IFF_VNET_HDR;
        // SAFETY: as above; `req` is the ifreq the kernel just filled.
        unsafe { tunsetiff(fd.as_raw_fd(), &req) }.map_err(std::io::Error::from)?;
        Ok(())
    }
}
