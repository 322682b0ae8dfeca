//! Copying a guest's disks during a live migration (`--copy-storage-all`,
//! `--copy-storage-inc`), as libvirt's qemu driver does it: the destination
//! serves its (new, empty) images over NBD, the source mirrors each writable
//! disk into them with `blockdev-mirror`, and the switchover waits until
//! every mirror has concluded in sync.
//!
//! Pure: what to ask QEMU and `qemu-img`, and how to read their answers.
//! The names here (jobs, nodes, exports) are the contract between the two
//! agents, so both derive them from the disk's target alone.

use std::path::PathBuf;

use flotilla_shared::proto::{CopyMode, DiskImage, MirrorProgress, StorageCopy};
use serde_json::Value;

use crate::storage_proof::WritableDisk;

/// The mirror job, and its NBD client node, on the source.
pub fn mirror_job(target: &str) -> String {
    format!("flotilla-mirror-{target}")
}

/// The NBD export of a disk on the destination: its target.
pub fn export_name(target: &str) -> String {
    target.to_string()
}

/// The block-export id on the destination.
pub fn export_id(target: &str) -> String {
    format!("flotilla-nbd-{target}")
}

/// `blockdev-mirror`'s `sync`: whole disks, or the top image only.
pub fn sync_mode(mode: CopyMode) -> &'static str {
    match mode {
        CopyMode::All => "full",
        CopyMode::Inc => "top",
    }
}

/// An image the destination creates before its QEMU opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewImage {
    /// Where.
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Guest-visible size, bytes.
    pub size: u64,
    /// Backing file and its format (`--copy-storage-inc`).
    pub backing: Option<(String, String)>,
}

impl NewImage {
    /// `qemu-img`'s arguments that create it.
    pub fn qemu_img_args(&self) -> Vec<String> {
        let mut args = vec!["create".to_string(), "-q".into(), "-f".into()];
        args.push(self.format.clone());
        if let Some((file, format)) = &self.backing {
            args.extend(["-b".into(), file.clone(), "-F".into(), format.clone()]);
        }
        args.push(self.path.display().to_string());
        args.push(self.size.to_string());
        args
    }
}

/// The source's writable disks as its QEMU has them open, from
/// `query-block`: format, size and backing file of each.
pub fn disk_images(disks: &[WritableDisk], query_block: &Value) -> Result<Vec<DiskImage>, String> {
    let entries = query_block.as_array().map(Vec::as_slice).unwrap_or(&[]);
    disks
        .iter()
        .map(|d| {
            let path = d.path.display().to_string();
            let image = entries
                .iter()
                .filter_map(|e| e.get("inserted"))
                .find(|i| i.get("file").and_then(Value::as_str) == Some(path.as_str()))
                .and_then(|i| i.get("image"))
                .ok_or_else(|| format!("disk {} ({path}) is not open in QEMU", d.target))?;
            let text = |k: &str| image.get(k).and_then(Value::as_str).map(str::to_string);
            let backing = text("full-backing-filename").or_else(|| text("backing-filename"));
            let backing_format = image
                .get("backing-image")
                .and_then(|b| b.get("format"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| text("backing-filename-format"));
            Ok(DiskImage {
                target: d.target.clone(),
                path,
                format: text("format").unwrap_or_else(|| "raw".into()),
                virtual_size: image
                    .get("virtual-size")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| {
                        format!("disk {}: query-block gave no virtual-size", d.target)
                    })?,
                backing,
                backing_format,
            })
        })
        .collect()
}

/// The images the destination must create, given which paths (images and
/// backing files) are missing here. An image that exists is used as it is
/// (libvirt does the same: it is overwritten by the mirror). A missing
/// backing file refuses `--copy-storage-inc`, naming it: only the top image
/// travels.
pub fn images_to_create(
    vm: &str,
    host: &str,
    copy: &StorageCopy,
    missing: &[String],
) -> Result<Vec<NewImage>, String> {
    let mut out = Vec::new();
    for d in &copy.disks {
        let backing = match (copy.mode, &d.backing) {
            (CopyMode::Inc, Some(file)) => {
                if missing.contains(file) {
                    return Err(format!(
                        "cannot accept VM '{vm}' on host {host} with --copy-storage-inc: the \
                         backing file {file} of disk {} does not exist here (only the top \
                         image is copied); --copy-storage-all copies the whole disk",
                        d.target
                    ));
                }
                let format = d.backing_format.clone().unwrap_or_else(|| "raw".into());
                Some((file.clone(), format))
            }
            _ => None,
        };
        if !missing.contains(&d.path) {
            continue;
        }
        // A full copy lands in one image: the chain is flattened into it.
        let format = match d.format.as_str() {
            "raw" => "raw",
            _ => "qcow2",
        };
        out.push(NewImage {
            path: PathBuf::from(&d.path),
            format: format.into(),
            size: d.virtual_size,
            backing,
        });
    }
    Ok(out)
}

/// The mirrors among `query-block-jobs`' answer, for the disks in `targets`.
pub fn mirror_progress(targets: &[String], jobs: &Value) -> Vec<MirrorProgress> {
    let jobs = jobs.as_array().map(Vec::as_slice).unwrap_or(&[]);
    targets
        .iter()
        .map(|t| {
            let id = mirror_job(t);
            match jobs
                .iter()
                .find(|j| j.get("device").and_then(Value::as_str) == Some(id.as_str()))
            {
                Some(j) => MirrorProgress {
                    target: t.clone(),
                    status: j
                        .get("status")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_string(),
                    len: j.get("len").and_then(Value::as_u64).unwrap_or(0),
                    offset: j.get("offset").and_then(Value::as_u64).unwrap_or(0),
                    ready: j.get("ready").and_then(Value::as_bool).unwrap_or(false),
                    error: j.get("error").and_then(Value::as_str).map(str::to_string),
                },
                // Jobs stay until dismissed: one that is gone was never made.
                None => MirrorProgress {
                    target: t.clone(),
                    status: "absent".into(),
                    error: Some("no such mirror job".into()),
                    ..MirrorProgress::default()
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn image(mode: CopyMode, backing: Option<&str>) -> StorageCopy {
        StorageCopy {
            mode,
            disks: vec![DiskImage {
                target: "vda".into(),
                path: "/local/web.qcow2".into(),
                format: "qcow2".into(),
                virtual_size: 1 << 30,
                backing: backing.map(str::to_string),
                backing_format: backing.map(|_| "qcow2".into()),
            }],
        }
    }

    #[test]
    fn query_block_gives_each_writable_disks_image() {
        let disks = [WritableDisk {
            target: "vda".into(),
            path: "/local/web.qcow2".into(),
        }];
        let answer = json!([
            {"device": "", "qdev": "disk0", "inserted": {
                "file": "/local/web.qcow2", "node-name": "flotilla-disk0-format",
                "image": {"filename": "/local/web.qcow2", "format": "qcow2",
                          "virtual-size": 1073741824u64,
                          "backing-filename": "base.qcow2",
                          "full-backing-filename": "/local/base.qcow2",
                          "backing-image": {"format": "qcow2"}}}}
        ]);
        assert_eq!(
            disk_images(&disks, &answer),
            Ok(image(CopyMode::Inc, Some("/local/base.qcow2")).disks)
        );
        assert_eq!(
            disk_images(&disks, &json!([])),
            Err("disk vda (/local/web.qcow2) is not open in QEMU".into())
        );
    }

    #[test]
    fn missing_images_are_created_and_inc_needs_the_backing_file_here() {
        let all = image(CopyMode::All, Some("/local/base.qcow2"));
        let missing = vec!["/local/web.qcow2".to_string()];
        let made = images_to_create("web", "b", &all, &missing).expect("plan");
        assert_eq!(
            made[0].qemu_img_args(),
            [
                "create",
                "-q",
                "-f",
                "qcow2",
                "/local/web.qcow2",
                "1073741824"
            ]
        );
        assert_eq!(images_to_create("web", "b", &all, &[]), Ok(Vec::new()));

        let inc = image(CopyMode::Inc, Some("/local/base.qcow2"));
        let made = images_to_create("web", "b", &inc, &missing).expect("plan");
        assert_eq!(
            made[0].qemu_img_args(),
            [
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "/local/base.qcow2",
                "-F",
                "qcow2",
                "/local/web.qcow2",
                "1073741824"
            ]
        );
        let no_base = vec!["/local/web.qcow2".into(), "/local/base.qcow2".into()];
        assert_eq!(
            images_to_create("web", "b", &inc, &no_base),
            Err(
                "cannot accept VM 'web' on host b with --copy-storage-inc: the backing file \
                 /local/base.qcow2 of disk vda does not exist here (only the top image is \
                 copied); --copy-storage-all copies the whole disk"
                    .into()
            )
        );
    }

    #[test]
    fn mirror_jobs_are_read_by_target_and_a_vanished_one_is_an_error() {
        let jobs = json!([{"device": "flotilla-mirror-vda", "type": "mirror",
            "len": 100, "offset": 40, "ready": false, "status": "running"}]);
        let targets = ["vda".to_string(), "vdb".to_string()];
        let got = mirror_progress(&targets, &jobs);
        assert_eq!(
            got[0],
            MirrorProgress {
                target: "vda".into(),
                status: "running".into(),
                len: 100,
                offset: 40,
                ready: false,
                error: None
            }
        );
        assert_eq!(got[1].error.as_deref(), Some("no such mirror job"));
    }
}
