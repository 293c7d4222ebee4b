//! Local SCSI disks over LIO backstores, through the tcm_loop fabric.
//!
//! Why: a node's own VMs read their template through the very backstore its children read
//! (fileio: the page cache), so a block the VM and a child ask for at once is fetched once.
//! One tcm_loop target per image (`naa.` + a hash of the image), TPG 1, LUN 0, one nexus.
use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use devicemapper::Device;
use log::info;

use super::{mkdir, rmdir, subdirs, unlink, w, Backstore, Lio};
use crate::error::{Error, IoContext, Kind, Result};

/// A local disk's tcm_loop names: target and initiator port WWNs (both `naa.`, 16 hex digits:
/// tcm_loop wants the nexus in the same protocol as the target).
fn wwns(image: &str) -> (String, String) {
    // FNV-1a: stable across processes and versions (std's hasher is not).
    let h = image.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    // NAA type 5 (IEEE registered) with the Linux-IO OUI, as targetcli makes them.
    let id = h & 0x0000_000f_ffff_ffff;
    (format!("naa.5001405{id:09x}"), format!("naa.5001405{:09x}", id ^ 0x8_0000_0000))
}

impl Lio {
    fn loopback_tpg(&self, image: &str) -> PathBuf {
        self.root.join("loopback").join(wwns(image).0).join("tpgt_1")
    }

    /// The local SCSI disk (block device) that reads backstore `backstore` over `dev`, made if
    /// missing; waits (bounded) for the kernel to add the disk. On failure the objects this call
    /// made are removed again.
    pub fn local_disk(&self, image: &str, backstore: &str, kind: Backstore, dev: &str, timeout: Duration) -> Result<LocalDisk> {
        let had_backstore = self.backstore_dir(kind, backstore).exists();
        let had_target = self.loopback_tpg(image).parent().is_some_and(Path::exists);
        let r = self.local_disk_steps(image, backstore, kind, dev, timeout);
        if let Err(e) = &r {
            let mut left = Vec::new();
            if !had_target {
                self.remove_local_disk(image, &mut left);
            }
            if !had_backstore {
                self.remove_backstore(backstore, &mut left);
            }
            if !left.is_empty() {
                return Err(Error::rollback(e.clone(), left));
            }
        }
        r
    }

    fn local_disk_steps(&self, image: &str, backstore: &str, kind: Backstore, dev: &str, timeout: Duration) -> Result<LocalDisk> {
        let so = self.ensure_backstore(kind, backstore, dev)?;
        let tpg = self.loopback_tpg(image);
        fs::create_dir_all(&tpg).io_ctx(Kind::Lio, || format!("mkdir {} (is tcm_loop loaded?)", tpg.display()))?;
        let nexus = fs::read_to_string(tpg.join("nexus")).unwrap_or_default();
        if nexus.trim().is_empty() {
            w(&tpg.join("nexus"), &wwns(image).1)?;
        }
        let lun = tpg.join("lun/lun_0");
        if mkdir(&lun)? {
            symlink(&so, lun.join("vmthunder")).io_ctx(Kind::Lio, || format!("link LUN 0 of local disk {}", tpg.display()))?;
        } else {
            let cur = lun_link(&lun).unwrap_or_default();
            if !same_backstore(&cur, &so) {
                return Err(Error::new(Kind::Lio, format!("local disk {} reads {}, not {}", tpg.display(), cur.display(), so.display())));
            }
        }
        // "host:0:tpgt": the SCSI address of LUN 0 is that plus ":0".
        let addr = fs::read_to_string(tpg.join("address")).io_ctx(Kind::Lio, || format!("read {}/address", tpg.display()))?;
        let scsi = format!("{}:0", addr.trim());
        let start = Instant::now();
        loop {
            if let Some(d) = disk_of(&scsi).filter(|d| ready(&scsi, d)) {
                info!("image {image}: local disk {} (SCSI {scsi}) reads {dev} through {}", d.path.display(), so.display());
                return Ok(d);
            }
            if start.elapsed() > timeout {
                return Err(Error::new(
                    Kind::Lio,
                    format!("local disk SCSI {scsi} of image {image:?} did not appear within {}s", timeout.as_secs()),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The local disk of `image`, if there is one.
    pub fn find_local_disk(&self, image: &str) -> Option<LocalDisk> {
        let addr = fs::read_to_string(self.loopback_tpg(image).join("address")).ok()?;
        disk_of(&format!("{}:0", addr.trim()))
    }

    /// Remove the local disk of `image` (LUN, nexus, TPG, target); not the backstore.
    pub fn remove_local_disk(&self, image: &str, errs: &mut Vec<String>) {
        let tpg = self.loopback_tpg(image);
        let target = tpg.parent().unwrap().to_path_buf();
        if !tpg.is_dir() {
            rmdir(&target, errs);
            return;
        }
        let lun = tpg.join("lun/lun_0");
        for link in symlinks_in(&lun) {
            unlink(&link, errs);
        }
        rmdir(&lun, errs);
        if !fs::read_to_string(tpg.join("nexus")).unwrap_or_default().trim().is_empty() {
            if let Err(e) = fs::write(tpg.join("nexus"), "NULL") {
                errs.push(format!("drop nexus of {}: {e}", tpg.display()));
            }
        }
        rmdir(&tpg, errs);
        rmdir(&target, errs);
        info!("image {image}: local disk removed");
    }

    /// Whether a local disk's LUN still links to backstore directory `so`.
    pub(super) fn backstore_linked(&self, so: &Path) -> bool {
        subdirs(&self.root.join("loopback"))
            .into_iter()
            .flat_map(|t| subdirs(&t))
            .any(|tpg| subdirs(&tpg.join("lun")).iter().any(|lun| lun_link(lun).is_some_and(|l| same_backstore(&l, so))))
    }
}

/// The symlinks in a directory: a LUN's link to its backstore, whatever it is called.
fn symlinks_in(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).filter(|e| e.file_type().is_ok_and(|t| t.is_symlink())).map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Where a LUN directory's link to its backstore points.
fn lun_link(lun: &Path) -> Option<PathBuf> {
    symlinks_in(lun).first().and_then(|l| fs::read_link(l).ok())
}

/// configfs shows a LUN's link relative ("../../../../../../target/core/fileio_0/NAME"):
/// the same backstore when HBA and name match.
fn same_backstore(link: &Path, so: &Path) -> bool {
    let tail = |p: &Path| p.components().rev().take(2).map(|c| c.as_os_str().to_owned()).collect::<Vec<_>>();
    tail(link) == tail(so)
}

/// A local disk: its device number and `/dev` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDisk {
    pub device: Device,
    pub path: PathBuf,
}

/// The block device of SCSI device `h:c:t:l`, once it has a size.
fn disk_of(scsi: &str) -> Option<LocalDisk> {
    let blocks = fs::read_dir(format!("/sys/class/scsi_device/{scsi}/device/block")).ok()?;
    let b = blocks.filter_map(|e| e.ok()).next()?;
    let device: Device = fs::read_to_string(b.path().join("dev")).ok()?.trim().parse().ok()?;
    let size: u64 = fs::read_to_string(b.path().join("size")).ok()?.trim().parse().ok()?;
    (size > 0).then(|| LocalDisk { device, path: Path::new("/dev").join(b.file_name()) })
}

/// Whether a disk that sd has added is ready for a dm table over it: its SCSI device runs and
/// it opens (it refuses opens with ENXIO while not yet online or in error handling).
fn ready(scsi: &str, disk: &LocalDisk) -> bool {
    let running = fs::read_to_string(format!("/sys/class/scsi_device/{scsi}/device/state")).is_ok_and(|s| s.trim() == "running");
    running && (!disk.path.exists() || fs::File::open(&disk.path).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backstore_links_compare_by_hba_and_name() {
        let so = Path::new("/sys/kernel/config/target/core/fileio_0/vmthunder-1_img");
        assert!(same_backstore(Path::new("../../../../../../target/core/fileio_0/vmthunder-1_img"), so));
        assert!(!same_backstore(Path::new("../../../../../../target/core/iblock_0/vmthunder-1_img"), so));
        assert!(!same_backstore(Path::new("../../../../../../target/core/fileio_0/vmthunder-1_img2"), so));
    }

    #[test]
    fn wwns_are_stable_distinct_and_valid() {
        let (t, i) = wwns("img-1");
        assert_eq!(wwns("img-1"), (t.clone(), i.clone()));
        assert_ne!(t, i);
        assert_ne!(wwns("img-2").0, t);
        for w in [&t, &i] {
            assert!(w.starts_with("naa.5001405") && w.len() == 20, "{w}");
            assert!(w[4..].chars().all(|c| c.is_ascii_hexdigit()), "{w}");
        }
    }
}
