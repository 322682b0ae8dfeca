//! Proof that a migration's destination sees the source's storage.
//!
//! A disk path that exists on both hosts proves nothing: a host with its own
//! local file at the same path would run the guest on a different disk. So
//! the source writes a token no other migration uses into a marker file
//! beside each writable disk image, and the destination reads every marker
//! back before it accepts the guest. Pure: the markers' contents are inputs.
//!
//! Read-only disks and CD-ROMs are not checked (the guest cannot write them),
//! nor are `<shareable/>` disks (libvirt's rule: a disk several guests write
//! at once is on shared storage by definition), nor block devices (no marker
//! can sit beside `/dev/sdX`).

use std::path::{Path, PathBuf};

use flotilla_shared::xml::Domain;

/// A writable file disk: its target (`vda`) and its image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritableDisk {
    /// The guest's name for it.
    pub target: String,
    /// The image on the host.
    pub path: PathBuf,
}

impl WritableDisk {
    /// The marker file beside the image.
    pub fn marker(&self) -> PathBuf {
        marker_path(&self.path)
    }
}

/// `DIR/.IMAGE.flotilla-migrate` for `DIR/IMAGE`.
pub fn marker_path(image: &Path) -> PathBuf {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    image.with_file_name(format!(".{name}.flotilla-migrate"))
}

/// The disks whose storage a migration must prove shared.
pub fn writable_disks(domain: &Domain) -> Vec<WritableDisk> {
    domain
        .disks()
        .filter(|d| {
            !d.readonly && !d.shareable && d.device.as_deref().is_none_or(|dev| dev == "disk")
        })
        .filter(|d| d.disk_type.as_deref().is_none_or(|t| t == "file"))
        .filter_map(|d| {
            Some(WritableDisk {
                target: d.target_dev.clone().unwrap_or_else(|| "?".into()),
                path: PathBuf::from(d.source_file.as_deref()?),
            })
        })
        .collect()
}

/// What the migration does with the writable disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Runs the guest on them in place: each must be on storage both hosts
    /// share, unless the operator said `--unsafe`.
    InPlace {
        /// `--unsafe`: an unshared disk is accepted (and logged).
        allow_unsafe: bool,
    },
    /// Copies them here (`--copy-storage-*`, named by the flag): none may
    /// be shared, or the copy would write each over itself.
    Copied(&'static str),
}

/// The storage safety rule, after libvirt's `qemuMigrationSrcIsSafe`: each
/// writable disk's marker, as read on the destination, holds `token` exactly
/// when the two hosts share that disk's storage. Read-only disks and
/// CD-ROMs are never checked ([`writable_disks`]). libvirt's cache-mode rule
/// is not needed: QEMU drops the destination's page cache when it takes the
/// disks over (the `drop-cache` of `file` nodes), so any cache mode is safe
/// on shared storage.
pub fn check(
    vm: &str,
    host: &str,
    token: &str,
    disks: &[WritableDisk],
    read: &[(PathBuf, Option<String>)],
    usage: Use,
) -> Result<(), String> {
    for d in disks {
        let marker = d.marker();
        let seen = read
            .iter()
            .find(|(p, _)| *p == marker)
            .and_then(|(_, c)| c.as_deref());
        let shared = seen.map(str::trim) == Some(token);
        match usage {
            Use::InPlace { allow_unsafe } if !shared && !allow_unsafe => {
                return Err(format!(
                    "cannot accept VM '{vm}' on host {host}: disk {} ({}) is not on storage \
                     both hosts share (the marker the source wrote beside it {} here), and a \
                     migration that does not copy it would run the guest on a different disk; \
                     --copy-storage-all copies it, --unsafe migrates anyway",
                    d.target,
                    d.path.display(),
                    if seen.is_some() {
                        "holds another token"
                    } else {
                        "is missing"
                    }
                ));
            }
            Use::Copied(flag) if shared => {
                return Err(format!(
                    "cannot accept VM '{vm}' on host {host} with {flag}: disk {} ({}) is on \
                     storage both hosts share (this host reads the marker the source wrote \
                     beside it), so copying it would write it over itself; migrate without \
                     {flag}",
                    d.target,
                    d.path.display(),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain() -> Domain {
        let xml = "<domain type='kvm'><name>web</name><memory unit='MiB'>64</memory>\
            <os><type>hvm</type></os><devices>\
            <disk type='file' device='disk'><source file='/srv/web.qcow2'/><target dev='vda'/></disk>\
            <disk type='file' device='disk'><source file='/srv/base.img'/><target dev='vdb'/><readonly/></disk>\
            <disk type='file' device='cdrom'><source file='/iso/d.iso'/><target dev='sda' bus='ide'/></disk>\
            <disk type='block' device='disk'><source dev='/dev/sdb'/><target dev='vdc'/></disk>\
            <disk type='file' device='disk'><source file='/srv/quorum.img'/><target dev='vdd'/><shareable/></disk>\
            </devices></domain>";
        Domain::parse("web.xml", xml).expect("domain").model
    }

    #[test]
    fn only_writable_unshared_file_disks_need_a_proof() {
        let disks = writable_disks(&domain());
        assert_eq!(
            disks,
            [WritableDisk {
                target: "vda".into(),
                path: "/srv/web.qcow2".into()
            }]
        );
        assert_eq!(
            disks[0].marker(),
            PathBuf::from("/srv/.web.qcow2.flotilla-migrate")
        );
    }

    #[test]
    fn an_unshared_disk_is_refused_unless_unsafe_and_a_shared_one_is_never_copied() {
        let disks = writable_disks(&domain());
        let marker = disks[0].marker();
        let shared = [(marker.clone(), Some("t1\n".to_string()))];
        let in_place = Use::InPlace {
            allow_unsafe: false,
        };
        assert_eq!(check("web", "b", "t1", &disks, &shared, in_place), Ok(()));
        for (seen, what) in [(None, "is missing"), (Some("t0"), "holds another token")] {
            let read = [(marker.clone(), seen.map(str::to_string))];
            assert_eq!(
                check("web", "b", "t1", &disks, &read, in_place),
                Err(format!(
                    "cannot accept VM 'web' on host b: disk vda (/srv/web.qcow2) is not on \
                     storage both hosts share (the marker the source wrote beside it {what} \
                     here), and a migration that does not copy it would run the guest on a \
                     different disk; --copy-storage-all copies it, --unsafe migrates anyway"
                ))
            );
            let unsafe_ok = Use::InPlace { allow_unsafe: true };
            assert_eq!(check("web", "b", "t1", &disks, &read, unsafe_ok), Ok(()));
            let copied = Use::Copied("--copy-storage-all");
            assert_eq!(check("web", "b", "t1", &disks, &read, copied), Ok(()));
        }
        assert_eq!(
            check(
                "web",
                "b",
                "t1",
                &disks,
                &shared,
                Use::Copied("--copy-storage-inc")
            ),
            Err(
                "cannot accept VM 'web' on host b with --copy-storage-inc: disk vda \
                 (/srv/web.qcow2) is on storage both hosts share (this host reads the marker \
                 the source wrote beside it), so copying it would write it over itself; \
                 migrate without --copy-storage-inc"
                    .into()
            )
        );
    }
}
