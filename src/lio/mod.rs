//! The LIO target side, through configfs only (as rtslib does: configfs is the single source of
//! truth, nothing is cached). One backstore (iblock, or fileio for reads through the page cache),
//! one target IQN with TPG 1 and LUN 0 per exported image; one ACL with CHAP per child
//! initiator; never demo mode (open to all). Every export is read-only for its initiators: the
//! TPG makes each mapped LUN write-protected as it is linked (`prod_mode_write_protect`), and
//! every mapped LUN is checked to be (`write_protect`), so an initiator's WRITE gets CHECK
//! CONDITION, DATA PROTECT / WRITE PROTECTED, and its kernel sees the disk's WP bit.
use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
};

use log::{info, warn};

mod loopback;
pub use loopback::LocalDisk;

use crate::{
    error::{Error, IoContext, Kind, Result},
    iscsi::{Chap, Source, Target},
    names,
};

pub const CONFIGFS: &str = "/sys/kernel/config/target";
/// How LIO reads the exported device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backstore {
    /// iblock: bios straight to the device.
    Block,
    /// fileio: buffered reads, through the device's page cache, so concurrent reads of a
    /// block by several children (and by the node itself) wait for one fetch.
    File,
}

impl Backstore {
    /// The HBA directory backstores of this kind live under.
    fn hba(self) -> &'static str {
        match self {
            Backstore::Block => "iblock_0",
            Backstore::File => "fileio_0",
        }
    }
    const ALL: [Backstore; 2] = [Backstore::Block, Backstore::File];
}

/// An image exported by this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub iqn: String,
    pub backstore: String,
    pub portal: String,
    pub kind: Backstore,
}

pub struct Lio {
    root: PathBuf,
}

fn w(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).io_ctx(Kind::Lio, || format!("write {value:?} to {}", path.display()))
}

/// Logical block size of what a template's fileio backstore shows its readers (the node's VMs
/// through the local disk, children through the export).
pub const READER_BLOCK: u64 = 4096;

/// Give a fileio backstore READER_BLOCK logical blocks (before any LUN links it: LIO refuses
/// while exported). A VM's dm-snapshot over the local disk then inherits them, so every write
/// it gets covers whole 4 KiB chunks and never reads the origin: a smaller first write to a
/// chunk makes dm-snapshot copy the chunk from the origin, and a failed copy (every parent gone
/// past the queueing bound) invalidates the VM's whole snapshot. With 4 KiB blocks qemu (or the
/// page cache) reads-modifies-writes instead, and that read fails as one write error. A device
/// whose size is not a multiple of the block keeps its own (fileio would hide its tail).
fn set_reader_block_size(so: &Path, dev: &str) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let size = fs::File::open(dev).and_then(|mut f| f.seek(SeekFrom::End(0))).io_ctx(Kind::Lio, || format!("size of {dev}"))?;
    let hw: u64 = fs::read_to_string(so.join("attrib/hw_block_size")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(512);
    if hw > READER_BLOCK || size % READER_BLOCK != 0 {
        warn!("backstore {}: keeps {hw}-byte blocks ({dev} is {size} bytes)", so.display());
        return Ok(());
    }
    w(&so.join("attrib/block_size"), &READER_BLOCK.to_string())
}

/// `w` of a secret (a CHAP password): the message names the file, not the value. Nova turns
/// a failed attach into an instance fault its tenant reads.
fn w_secret(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).io_ctx(Kind::Lio, || format!("write the secret to {}", path.display()))
}

fn mkdir(path: &Path) -> Result<bool> {
    match fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::new(Kind::Lio, format!("mkdir {}: {e}", path.display()))),
    }
}

fn rmdir(path: &Path, errs: &mut Vec<String>) {
    match fs::remove_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => errs.push(format!("rmdir {}: {e}", path.display())),
    }
}

fn unlink(path: &Path, errs: &mut Vec<String>) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => errs.push(format!("unlink {}: {e}", path.display())),
    }
}

fn subdirs(path: &Path) -> Vec<PathBuf> {
    fs::read_dir(path).map(|d| d.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).map(|e| e.path()).collect()).unwrap_or_default()
}

/// A CHAP secret: 16 characters from the kernel's random pool.
fn random_secret() -> Result<String> {
    let mut buf = [0u8; 16];
    use std::io::Read;
    fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)).io_ctx(Kind::Lio, || "read /dev/urandom".into())?;
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    Ok(buf.iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect())
}

impl Lio {
    pub fn new() -> Result<Self> {
        let root = PathBuf::from(CONFIGFS);
        if !root.join("core").is_dir() {
            return Err(Error::new(Kind::Lio, format!("{CONFIGFS}/core missing: load target_core_mod and mount configfs")));
        }
        // Creating the fabric directory loads iscsi_target_mod on demand.
        mkdir(&root.join("iscsi"))?;
        Ok(Lio { root })
    }

    fn backstore_dir(&self, kind: Backstore, name: &str) -> PathBuf {
        self.root.join("core").join(kind.hba()).join(name)
    }
    fn tpg_dir(&self, iqn: &str) -> PathBuf {
        self.root.join("iscsi").join(iqn).join("tpgt_1")
    }

    /// Export `device` as LUN 0 of `iqn` on `portal`, idempotently. On failure the
    /// objects this call created are removed again.
    pub fn export(&self, iqn: &str, backstore: &str, kind: Backstore, device: &Path, portal: &str) -> Result<Export> {
        names::validate_iqn(iqn)?;
        let dev = device.to_str().ok_or_else(|| Error::invalid(format!("device path {device:?} is not UTF-8")))?;
        names::validate_path("device", dev)?;
        let exp = Export { iqn: iqn.to_string(), backstore: backstore.to_string(), portal: portal.to_string(), kind };
        let existed = self.backstore_dir(kind, backstore).exists() || self.tpg_dir(iqn).exists();
        let r = self.export_steps(&exp, dev);
        if let (Err(e), false) = (&r, existed) {
            let e = e.clone();
            if let Err(left) = self.unexport(&exp) {
                return Err(Error::rollback(e, vec![left]));
            }
            return Err(e);
        }
        r.map(|_| exp)
    }

    /// Make (or adopt) backstore `name` of `kind` over `dev`; its configfs directory.
    fn ensure_backstore(&self, kind: Backstore, name: &str, dev: &str) -> Result<PathBuf> {
        let so = self.backstore_dir(kind, name);
        mkdir(so.parent().unwrap())?;
        if mkdir(&so)? {
            // Not `readonly=1` on the backstore: the node's own VMs read it through the local
            // tcm_loop disk. What children get is read-only per mapped LUN (`map_lun0`).
            let control = match kind {
                Backstore::Block => format!("udev_path={dev}"),
                // A block device brings its own size; nothing writes, so no write cache mode.
                Backstore::File => format!("fd_dev_name={dev}"),
            };
            w(&so.join("control"), &control)?;
            // Also the attribute itself: it is what adoption compares against.
            w(&so.join("udev_path"), dev)?;
            w(&so.join("enable"), "1")?;
            if kind == Backstore::File {
                set_reader_block_size(&so, dev)?;
            }
        } else {
            let cur = fs::read_to_string(so.join("udev_path")).unwrap_or_default();
            if cur.trim() != dev {
                return Err(Error::new(Kind::Lio, format!("backstore {} exists for {:?}, not {dev}", so.display(), cur.trim())));
            }
        }
        Ok(so)
    }

    /// Remove backstore `name` (of either kind) once no LUN links to it; gathers failures.
    pub fn remove_backstore(&self, name: &str, errs: &mut Vec<String>) {
        for kind in Backstore::ALL {
            let so = self.backstore_dir(kind, name);
            rmdir(&so, errs);
            // The HBA goes with its last backstore; busy means someone else still uses it.
            let hba = self.root.join("core").join(kind.hba());
            if hba.is_dir() && subdirs(&hba).is_empty() {
                if let Err(e) = fs::remove_dir(&hba) {
                    warn!("kept {}: {e}", hba.display());
                }
            }
        }
    }

    fn export_steps(&self, exp: &Export, dev: &str) -> Result<()> {
        let so = self.ensure_backstore(exp.kind, &exp.backstore, dev)?;
        self.target_steps(&exp.iqn, &exp.portal)?;
        let tpg = self.tpg_dir(&exp.iqn);
        let lun = tpg.join("lun/lun_0");
        if mkdir(&lun)? {
            symlink(&so, lun.join("vmthunder")).io_ctx(Kind::Lio, || format!("link LUN 0 of {}", exp.iqn))?;
        }
        // Initiators allowed while the target had no LUN (see `prepare`) see it now.
        for acl in subdirs(&tpg.join("acls")) {
            Self::map_lun0(&tpg, &acl)?;
        }
        info!("exported {dev} as {} on {}", exp.iqn, exp.portal);
        Ok(())
    }

    /// The target, its TPG and portal, CHAP required: everything an initiator logs in to,
    /// without a LUN. Idempotent.
    fn target_steps(&self, iqn: &str, portal: &str) -> Result<()> {
        let tpg = self.tpg_dir(iqn);
        fs::create_dir_all(&tpg).io_ctx(Kind::Lio, || format!("mkdir {}", tpg.display()))?;
        mkdir(&tpg.join("np").join(portal))?;
        // Only initiators with an ACL and the right CHAP secret get in.
        w(&tpg.join("attrib/generate_node_acls"), "0")?;
        w(&tpg.join("attrib/demo_mode_write_protect"), "1")?;
        // A LUN mapped into an ACL is write-protected from the moment it is linked: no window in
        // which a logged-in child could write (`map_lun0` then checks each one).
        w(&tpg.join("attrib/prod_mode_write_protect"), "1")?;
        w(&tpg.join("attrib/authentication"), "1")?;
        w(&tpg.join("enable"), "1")?;
        Ok(())
    }

    /// Make `iqn` reachable on `portal` before there is anything to export: children can log in
    /// (and `allow` grant them) while this node still builds what LUN 0 will be; `export` adds
    /// the LUN and maps it for every ACL made meanwhile. Returns whether the target is new. A
    /// target that fails half-way is removed again.
    pub fn prepare(&self, iqn: &str, portal: &str) -> Result<bool> {
        names::validate_iqn(iqn)?;
        if self.tpg_dir(iqn).is_dir() {
            return Ok(false);
        }
        if let Err(e) = self.target_steps(iqn, portal) {
            let mut left = Vec::new();
            self.remove_target(iqn, &mut left);
            return Err(if left.is_empty() { e } else { Error::rollback(e, left) });
        }
        info!("prepared {iqn} on {portal} (no LUN yet)");
        Ok(true)
    }

    /// Whether `iqn` has its LUN 0 (a prepared target has none until `export`).
    pub fn has_lun(&self, iqn: &str) -> bool {
        self.tpg_dir(iqn).join("lun/lun_0").is_dir()
    }

    /// Map the TPG's LUN 0 into `acl`, write-protected, if the TPG has one; a mapping that
    /// exists already (an older export, made before exports were read-only) is made
    /// write-protected too.
    fn map_lun0(tpg: &Path, acl: &Path) -> Result<()> {
        let lun = tpg.join("lun/lun_0");
        if !lun.is_dir() {
            return Ok(());
        }
        let mlun = acl.join("lun_0");
        mkdir(&mlun)?;
        let link = mlun.join("vmthunder");
        if link.symlink_metadata().is_err() {
            // A target prepared before `prod_mode_write_protect` was set maps read-write: set it
            // here too, so the link below is read-only at once.
            w(&tpg.join("attrib/prod_mode_write_protect"), "1")?;
            symlink(&lun, &link).io_ctx(Kind::Lio, || format!("map LUN 0 for {}", acl.display()))?;
        }
        // The attribute is the mapping's (it reads empty before the link).
        let wp = mlun.join("write_protect");
        if fs::read_to_string(&wp).unwrap_or_default().trim() != "1" {
            w(&wp, "1")?;
            let now = fs::read_to_string(&wp).unwrap_or_default();
            if now.trim() != "1" {
                return Err(Error::new(Kind::Lio, format!("{} reads {:?} after writing 1", wp.display(), now.trim())));
            }
        }
        Ok(())
    }

    /// Allow `initiator` to log in with CHAP; returns its credentials. Calling it
    /// again returns the credentials already in configfs.
    pub fn allow(&self, iqn: &str, initiator: &str) -> Result<Chap> {
        self.allow_with(iqn, initiator, || Ok(Chap { username: format!("vmt{}", &random_secret()?[..8]), password: random_secret()? }))
    }

    /// `allow`, with `new_chap` making the credentials of a new ACL.
    fn allow_with(&self, iqn: &str, initiator: &str, new_chap: impl FnOnce() -> Result<Chap>) -> Result<Chap> {
        names::validate_iqn(initiator)?;
        let tpg = self.tpg_dir(iqn);
        if !tpg.is_dir() {
            return Err(Error::new(Kind::NotFound, format!("{iqn} is not exported on this node")));
        }
        let acl = tpg.join("acls").join(initiator);
        let created = mkdir(&acl)?;
        let r = (|| {
            let user = fs::read_to_string(acl.join("auth/userid")).unwrap_or_default().trim().to_string();
            let pass = fs::read_to_string(acl.join("auth/password")).unwrap_or_default().trim().to_string();
            let chap = if user.is_empty() || pass.is_empty() {
                let c = new_chap()?;
                w(&acl.join("auth/userid"), &c.username)?;
                w_secret(&acl.join("auth/password"), &c.password)?;
                c
            } else {
                Chap { username: user, password: pass }
            };
            Self::map_lun0(&tpg, &acl)?;
            Ok(chap)
        })();
        if r.is_err() && created {
            let mut errs = vec![];
            self.remove_acl(&acl, &mut errs);
        }
        if r.is_ok() && created {
            info!("allowed {initiator} to read {iqn}");
        }
        r
    }

    /// What a child logs in with.
    pub fn source_for(&self, exp_iqn: &str, portal: &str, chap: Chap) -> Source {
        Source { targets: vec![Target { portal: portal.to_string(), iqn: exp_iqn.to_string(), lun: 0 }], chap: Some(chap) }
    }

    /// Initiators with a live session on `iqn`.
    pub fn active_sessions(&self, iqn: &str) -> Vec<String> {
        subdirs(&self.tpg_dir(iqn).join("acls"))
            .into_iter()
            .filter(|acl| fs::read_to_string(acl.join("info")).is_ok_and(|s| s.contains("LIO Session ID")))
            .filter_map(|acl| acl.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect()
    }

    /// Remove the ACLs (and so the CHAP credentials) of `iqn` whose initiator is not in `keep`
    /// and has no live session: hosts that left. One still reading keeps its ACL until its
    /// session ends (removing it would cut the child's path mid-read). Returns the initiators
    /// revoked; a removal that fails is an error naming what was left.
    pub fn revoke_except(&self, iqn: &str, keep: &[String]) -> Result<Vec<String>> {
        let live = self.active_sessions(iqn);
        let mut revoked = Vec::new();
        let mut errs = Vec::new();
        for acl in subdirs(&self.tpg_dir(iqn).join("acls")) {
            let Some(name) = acl.file_name().map(|n| n.to_string_lossy().into_owned()) else { continue };
            if keep.contains(&name) || live.contains(&name) {
                continue;
            }
            let before = errs.len();
            self.remove_acl(&acl, &mut errs);
            if errs.len() == before {
                info!("revoked {name}'s access to {iqn}");
                revoked.push(name);
            }
        }
        if errs.is_empty() {
            Ok(revoked)
        } else {
            Err(Error::new(Kind::Lio, format!("revoking ACLs of {iqn} left: {}", errs.join("; "))))
        }
    }

    pub fn acls(&self, iqn: &str) -> Vec<String> {
        subdirs(&self.tpg_dir(iqn).join("acls")).iter().filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).collect()
    }

    /// Our targets in configfs: `(iqn, backstore device)`.
    pub fn exports(&self) -> Vec<String> {
        let prefix = format!("{}:", names::IQN_AUTHORITY);
        subdirs(&self.root.join("iscsi"))
            .into_iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .filter(|n| n.starts_with(&prefix))
            .collect()
    }

    fn remove_acl(&self, acl: &Path, errs: &mut Vec<String>) {
        for mlun in subdirs(acl).into_iter().filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("lun_"))) {
            unlink(&mlun.join("vmthunder"), errs);
            rmdir(&mlun, errs);
        }
        rmdir(acl, errs);
    }

    /// Remove the export completely (ACLs, LUN, portal, TPG, target, backstore). Every step is
    /// tried; the failures are gathered into one error naming what was left.
    pub fn unexport(&self, exp: &Export) -> std::result::Result<(), String> {
        let mut errs = Vec::new();
        self.remove_target(&exp.iqn, &mut errs);
        // Under either HBA: an export made with the other read path goes too. Still linked
        // (a local disk of the node's own VMs): kept, its owner removes it.
        let so = self.backstore_dir(exp.kind, &exp.backstore);
        if !self.backstore_linked(&so) {
            self.remove_backstore(&exp.backstore, &mut errs);
        }
        if errs.is_empty() {
            info!("unexported {}", exp.iqn);
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }

    /// Remove target `iqn` (ACLs, LUN, portals, TPG); gathers failures. Not the backstore.
    fn remove_target(&self, iqn: &str, errs: &mut Vec<String>) {
        let tpg = self.tpg_dir(iqn);
        if tpg.is_dir() {
            let _ = fs::write(tpg.join("enable"), "0");
            for acl in subdirs(&tpg.join("acls")) {
                self.remove_acl(&acl, errs);
            }
            let lun = tpg.join("lun/lun_0");
            unlink(&lun.join("vmthunder"), errs);
            rmdir(&lun, errs);
            for np in subdirs(&tpg.join("np")) {
                rmdir(&np, errs);
            }
            rmdir(&tpg, errs);
        }
        rmdir(&self.root.join("iscsi").join(iqn), errs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configfs tree in a temporary directory: `iqn`'s TPG exists and the ACL of
    /// `initiator` has an `auth/password` that cannot be written (a directory).
    fn fake_root(iqn: &str, initiator: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("vmthunder-lio-test-{}-{}", std::process::id(), line!()));
        let _ = fs::remove_dir_all(&root);
        let auth = root.join("iscsi").join(iqn).join("tpgt_1/acls").join(initiator).join("auth");
        fs::create_dir_all(auth.join("password")).unwrap();
        fs::write(auth.join("userid"), "").unwrap();
        root
    }

    #[test]
    fn a_failed_write_of_a_chap_password_names_the_file_not_the_password() {
        let iqn = names::template_iqn("cn1", "img");
        let initiator = "iqn.1993-08.org.debian:01:cn2";
        let root = fake_root(&iqn, initiator);
        let lio = Lio { root: root.clone() };
        let secret = "Pw9TopSecretChap";
        let cap = crate::testlog::capture();
        let e = lio
            .allow_with(&iqn, initiator, || Ok(Chap { username: "vmtuser01".into(), password: secret.into() }))
            .expect_err("auth/password is a directory");
        assert_eq!(e.kind, Kind::Lio);
        assert!(e.message.contains("auth/password"), "names the file: {}", e.message);
        assert!(!e.message.contains(secret), "{}", e.message);
        assert!(!format!("{e:?}").contains(secret));
        cap.assert_absent(secret);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn revoke_removes_departed_initiators_but_not_a_live_session_or_a_kept_one() {
        let iqn = names::template_iqn("cn1", "img");
        let root = std::env::temp_dir().join(format!("vmthunder-lio-revoke-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let acls = root.join("iscsi").join(&iqn).join("tpgt_1/acls");
        for i in ["iqn.1993-08.org.debian:01:gone", "iqn.1993-08.org.debian:01:live", "iqn.1993-08.org.debian:01:kept"] {
            fs::create_dir_all(acls.join(i)).unwrap();
        }
        fs::write(acls.join("iqn.1993-08.org.debian:01:live/info"), "LIO Session ID: 3  ISID: 0x00023d000001").unwrap();
        let lio = Lio { root: root.clone() };
        let revoked = lio.revoke_except(&iqn, &["iqn.1993-08.org.debian:01:kept".to_string()]).unwrap();
        assert_eq!(revoked, ["iqn.1993-08.org.debian:01:gone"]);
        let mut left = lio.acls(&iqn);
        left.sort();
        assert_eq!(left, ["iqn.1993-08.org.debian:01:kept", "iqn.1993-08.org.debian:01:live"]);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn chap_debug_does_not_show_the_password() {
        let c = Chap { username: "vmtuser01".into(), password: "Pw9TopSecretChap".into() };
        let shown = format!("{c:?} {:?}", Source { targets: vec![], chap: Some(c.clone()) });
        assert!(shown.contains("vmtuser01") && !shown.contains("Pw9TopSecretChap"), "{shown}");
    }
}
