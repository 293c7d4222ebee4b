//! A VM's writable disk over a template: a persistent dm-snapshot whose COW is a slice of the
//! local device, or a qcow2 overlay file (the hypervisor's own snapshot, "VMM mode").
use std::{path::PathBuf, time::Duration};

use log::info;

use super::{carve, rollback::Undo, template::Template, zero_head, Node, SnapshotMode};
use crate::{
    cmd,
    dm::{snapshot::{Persistence, SnapshotParams}, Dm, Table, Target},
    error::{Error, Kind, Result},
    names::{self, VmRole},
};

/// dm-snapshot chunk: 4 KiB, the guest's page size (small chunks copy least on first write).
const CHUNK_SECTORS: u64 = 8;

pub fn overlay_path(node: &Node, image: &str, vm: &str) -> PathBuf {
    node.vmm_dir(image).join(format!("{vm}.qcow2"))
}

pub fn overlays(node: &Node, image: &str) -> Vec<String> {
    std::fs::read_dir(node.vmm_dir(image))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.strip_suffix(".qcow2").map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub fn ensure<'a>(node: &'a Node, dm: &'a Dm, t: &Template, vm: &str, mode: SnapshotMode, undo: &mut Undo<'a>) -> Result<String> {
    match mode {
        SnapshotMode::Dm => ensure_dm(node, dm, t, vm, undo),
        SnapshotMode::Vmm => ensure_overlay(node, t, vm, undo),
    }
}

fn ensure_dm<'a>(node: &'a Node, dm: &'a Dm, t: &Template, vm: &str, undo: &mut Undo<'a>) -> Result<String> {
    let snap_name = names::vm_dm_name(&t.image, vm, VmRole::Snap);
    let cow_name = names::vm_dm_name(&t.image, vm, VmRole::Cow);
    let cow = {
        let _space = node.lock_space()?;
        let (table, fresh) = match dm.info(&cow_name)? {
            Some(_) => (dm.table(&cow_name)?, false),
            None => (carve::plan_slice(dm, node.cache_dev, node.cache_total, node.cfg.cow_sectors, &format!("the COW of VM {vm}"))?, true),
        };
        let (cow, created) = dm.ensure(&cow_name, &table)?;
        if created {
            let n = cow_name.clone();
            undo.push(format!("device {n}"), move || dm.remove(&n).map(|_| ()).map_err(|e| e.to_string()));
        }
        if fresh {
            zero_head(&cow.path(), 1 << 20)?;
        }
        cow
    };
    let table = Table::single(
        t.sectors,
        Target::Snapshot(SnapshotParams { origin: t.read_dev, cow: cow.device, persistence: Persistence::Persistent, chunk_sectors: CHUNK_SECTORS }),
    );
    let (snap, created) = dm.ensure(&snap_name, &table).map_err(|e| Error::new(Kind::Snapshot, e.message))?;
    if created {
        let n = snap_name.clone();
        undo.push(format!("device {n}"), move || dm.remove(&n).map(|_| ()).map_err(|e| e.to_string()));
    }
    Ok(snap.path().display().to_string())
}

fn ensure_overlay<'a>(node: &'a Node, t: &Template, vm: &str, undo: &mut Undo<'a>) -> Result<String> {
    let path = overlay_path(node, &t.image, vm);
    let shown = path.display().to_string();
    if path.exists() {
        return Ok(shown);
    }
    std::fs::create_dir_all(node.vmm_dir(&t.image)).map_err(|e| Error::new(Kind::Snapshot, format!("mkdir for {shown}: {e}")))?;
    let backing = t.origin.path().display().to_string();
    let tmp = format!("{shown}.part");
    // Made under a temporary name and renamed: a crash never leaves a half-written overlay
    // that would count as an attached VM.
    let r = cmd::check(Kind::Snapshot, "qemu-img", &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &backing, &tmp], &[], Duration::from_secs(60))
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

pub fn remove(node: &Node, dm: &Dm, image: &str, vm: &str, mode: SnapshotMode) -> Result<()> {
    match mode {
        SnapshotMode::Dm => {
            let snap = names::vm_dm_name(image, vm, VmRole::Snap);
            dm.remove(&snap).map_err(|e| if e.kind == Kind::Busy { Error::new(Kind::Busy, format!("VM {vm:?}: snapshot still open ({})", e.message)) } else { e })?;
            dm.remove(&names::vm_dm_name(image, vm, VmRole::Cow))?;
        }
        SnapshotMode::Vmm => {
            let p = overlay_path(node, image, vm);
            std::fs::remove_file(&p).map_err(|e| Error::new(Kind::Snapshot, format!("remove {}: {e}", p.display())))?;
            let _ = std::fs::remove_dir(node.vmm_dir(image));
        }
    }
    Ok(())
}
