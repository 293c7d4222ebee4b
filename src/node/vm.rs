//! A VM's writable disk over a template: a persistent dm-snapshot whose COW is a slice of the
//! local device, or a qcow2 overlay file (the hypervisor's own snapshot, "VMM mode").
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use log::info;

use super::{carve::LocalDevice, layout::SliceState, template::Template, zero_head, SnapshotMode};
use crate::rollback::Undo;
use crate::{
    cmd,
    dm::{
        self,
        snapshot::{Persistence, SnapshotParams},
        Dm, Table, Target,
    },
    error::{Error, Kind, Result},
    names::{self, VmRole},
};

/// dm-snapshot chunk: 4 KiB, the guest's page size (small chunks copy least on first write).
const CHUNK_SECTORS: u64 = 8;

/// The qcow2 overlays of VMM-mode VMs: `<state dir>/vmm/<image>/<vm>.qcow2`.
pub struct Overlays {
    root: PathBuf,
}

impl Overlays {
    pub fn new(state_dir: &Path) -> Self {
        Overlays { root: state_dir.join("vmm") }
    }

    /// The directory of every image's overlays.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, image: &str) -> PathBuf {
        self.root.join(image)
    }

    pub fn path(&self, image: &str, vm: &str) -> PathBuf {
        self.dir(image).join(format!("{vm}.qcow2"))
    }

    /// The VMs with an overlay over `image`.
    pub fn list(&self, image: &str) -> Vec<String> {
        std::fs::read_dir(self.dir(image))
            .map(|d| d.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str()?.strip_suffix(".qcow2").map(str::to_string)).collect())
            .unwrap_or_default()
    }
}

/// What VM disks are made on: COWs of `cow_sectors` carved from the local device (dm mode),
/// overlays in the state dir (VMM mode).
pub struct Disks<'a> {
    pub local: &'a LocalDevice,
    pub overlays: &'a Overlays,
    pub cow_sectors: u64,
}

/// The VM's disk over template `t`. `attached`: the layout records the VM as attached, so its
/// disk holds the guest's writes and must be found again, never made anew.
pub fn ensure<'a>(
    disks: &Disks<'a>,
    dm: &'a Dm,
    t: &Template,
    vm: &str,
    mode: SnapshotMode,
    attached: bool,
    undo: &mut Undo<'a>,
) -> Result<String> {
    match mode {
        SnapshotMode::Dm => ensure_dm(disks.local, disks.cow_sectors, dm, t, vm, undo),
        SnapshotMode::Vmm => ensure_overlay(disks.overlays, t, vm, attached, undo),
    }
}

fn ensure_dm<'a>(local: &'a LocalDevice, cow_sectors: u64, dm: &'a Dm, t: &Template, vm: &str, undo: &mut Undo<'a>) -> Result<String> {
    let snap_name = names::vm_dm_name(&t.image, vm, VmRole::Snap);
    let cow_name = names::vm_dm_name(&t.image, vm, VmRole::Cow);
    let cow = {
        let mut space = local.space()?;
        // A recorded, formatted COW is this VM's disk: adopted as it is, never zeroed.
        let fresh = space.slice(&cow_name).is_none_or(|s| s.state == SliceState::New);
        if fresh {
            // What an attach that died before formatting the COW left is not trusted.
            dm.remove(&snap_name)?;
            dm.remove(&cow_name)?;
            if space.slice(&cow_name).is_none() {
                space.allocate(&cow_name, cow_sectors, &format!("the COW of VM {vm}"))?;
                local.undo_slice(undo, cow_name.clone());
            }
        }
        let table = space.table(&cow_name).expect("recorded");
        let (cow, created) = dm.ensure(&cow_name, &table)?;
        if created {
            let n = cow_name.clone();
            undo.push(format!("device {n}"), move || dm.remove(&n).map(|_| ()).map_err(|e| e.to_string()));
        }
        if fresh {
            zero_head(&cow.path(), 1 << 20)?;
            space.set_ready(&cow_name)?;
        }
        cow
    };
    let table = Table::single(
        t.sectors,
        Target::Snapshot(SnapshotParams {
            origin: t.read_dev,
            cow: cow.device,
            persistence: Persistence::Persistent,
            chunk_sectors: CHUNK_SECTORS,
        }),
    );
    let (snap, created) = dm.ensure(&snap_name, &table).map_err(|e| Error::new(Kind::Snapshot, e.message))?;
    if created {
        let n = snap_name.clone();
        undo.push(format!("device {n}"), move || dm.remove(&n).map(|_| ()).map_err(|e| e.to_string()));
    }
    Ok(snap.path().display().to_string())
}

fn ensure_overlay(overlays: &Overlays, t: &Template, vm: &str, attached: bool, undo: &mut Undo<'_>) -> Result<String> {
    let path = overlays.path(&t.image, vm);
    let shown = path.display().to_string();
    if path.exists() {
        return Ok(shown);
    }
    if attached {
        return Err(Error::new(
            Kind::Snapshot,
            format!(
                "VM {vm:?} of image {:?}: its qcow2 overlay {shown} is gone (was the state dir lost?); not replaced by an empty one",
                t.image
            ),
        ));
    }
    std::fs::create_dir_all(overlays.dir(&t.image)).map_err(|e| Error::new(Kind::Snapshot, format!("mkdir for {shown}: {e}")))?;
    let backing = t.origin.path().display().to_string();
    let tmp = format!("{shown}.part");
    // Made under a temporary name and renamed: a crash never leaves a half-written overlay
    // that would count as an attached VM. The file is ours before qemu-img writes it: new,
    // 0600 from the start, not a link someone planted (qemu-img keeps an existing file's mode).
    let _ = std::fs::remove_file(&tmp);
    let r = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map(drop)
            .map_err(|e| Error::new(Kind::Snapshot, format!("create {tmp}: {e}")))
    };
    let r = r
        .and_then(|_| {
            cmd::check(
                Kind::Snapshot,
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &backing, &tmp],
                &[],
                Duration::from_secs(60),
            )
        })
        .and_then(|_| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::new(Kind::Snapshot, format!("chmod {tmp}: {e}")))
        })
        .and_then(|_| std::fs::rename(&tmp, &path).map_err(|e| Error::new(Kind::Snapshot, format!("rename {tmp}: {e}"))));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let p = path.clone();
    undo.push(format!("overlay {shown}"), move || std::fs::remove_file(&p).map_err(|e| e.to_string()));
    info!("created qcow2 overlay {shown} over {backing}");
    Ok(shown)
}

pub fn remove(overlays: &Overlays, dm: &Dm, image: &str, vm: &str, mode: SnapshotMode) -> Result<()> {
    match mode {
        SnapshotMode::Dm => {
            let snap = names::vm_dm_name(image, vm, VmRole::Snap);
            dm.remove(&snap).map_err(|e| {
                if e.kind == Kind::Busy {
                    Error::new(Kind::Busy, format!("VM {vm:?}: snapshot still open ({})", e.message))
                } else {
                    e
                }
            })?;
            let cow = names::vm_dm_name(image, vm, VmRole::Cow);
            // Discarded: the guest's data does not outlive its VM on the device.
            if dm.info(&cow)?.is_some() {
                zero_head(&dm::mapper_path(&cow), 1 << 20)?;
            }
            dm.remove(&cow)?;
        }
        SnapshotMode::Vmm => {
            let p = overlays.path(image, vm);
            // Unlinking an open file succeeds, and the guest would go on writing to a file
            // nobody can find; and the template under it would lose its last known user.
            if let Some(why) = crate::usage::file_in_use(&p) {
                return Err(Error::new(Kind::Busy, format!("VM {vm:?}: its overlay {} is {why}", p.display())));
            }
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::new(Kind::Snapshot, format!("remove {}: {e}", p.display()))),
            }
            let _ = std::fs::remove_dir(overlays.dir(image));
        }
    }
    Ok(())
}

/// How full a dm-snapshot's COW is, from its status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum CowUse {
    /// `used` of `size` sectors hold the VM's chunks (`metadata` of them the exception store).
    Valid {
        used_sectors: u64,
        size_sectors: u64,
        metadata_sectors: u64,
    },
    /// The COW filled up: the kernel invalidated the snapshot, the VM's disk returns errors.
    Invalid,
    /// A write did not fit (kernels with overflow reporting); the disk returns errors.
    Overflow,
    Unknown,
}

impl CowUse {
    pub fn sectors(self) -> Option<(u64, u64)> {
        match self {
            CowUse::Valid { used_sectors, size_sectors, .. } => Some((used_sectors, size_sectors)),
            _ => None,
        }
    }
}

/// Parse `snapshot` status: "<used>/<size> <metadata>", "Invalid" or "Overflow"
/// (Documentation/admin-guide/device-mapper/snapshot.rst); our `Dm::status` prefixes the
/// target name.
pub fn cow_use(status: &str) -> CowUse {
    let words: Vec<&str> = status.split_whitespace().filter(|w| *w != "snapshot").collect();
    match words.as_slice() {
        ["Invalid", ..] => CowUse::Invalid,
        ["Overflow", ..] => CowUse::Overflow,
        [frac, meta, ..] => match (frac.split_once('/'), meta.parse()) {
            (Some((u, s)), Ok(metadata_sectors)) => match (u.parse(), s.parse()) {
                (Ok(used_sectors), Ok(size_sectors)) => CowUse::Valid { used_sectors, size_sectors, metadata_sectors },
                _ => CowUse::Unknown,
            },
            _ => CowUse::Unknown,
        },
        _ => CowUse::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cow_use_reads_the_snapshot_status() {
        assert_eq!(cow_use("snapshot 16/65536 16"), CowUse::Valid { used_sectors: 16, size_sectors: 65536, metadata_sectors: 16 });
        assert_eq!(cow_use("16/65536 16"), CowUse::Valid { used_sectors: 16, size_sectors: 65536, metadata_sectors: 16 });
        assert_eq!(cow_use("snapshot Invalid"), CowUse::Invalid);
        assert_eq!(cow_use("Overflow"), CowUse::Overflow);
        assert_eq!(cow_use("snapshot x/y z"), CowUse::Unknown);
        assert_eq!(cow_use(""), CowUse::Unknown);
    }
}
