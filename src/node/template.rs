//! A template: one image on this node, shared by all its VMs and children.
//! paths (dm-multipath over the iSCSI sessions to the parents, the origin volume last)
//!   -> cache (cache.rs: dm-cache or bcache over the paths, on the local device)
//!   -> origin (snapshot-origin over the cache)
//!   -> LIO backstore over the origin, exported for children (iSCSI) and, when coalescing,
//!      also read by this node's own VMs through a local tcm_loop disk.
//!
//! Coalescing (the default): the backstore is fileio, so every reader of the template — VMs,
//! children, the prefetch — goes through the origin's page cache, where concurrent reads of a
//! block wait for one fetch from the parent. Neither bcache nor dm-cache merges concurrent
//! misses, and a relay's VM and its children read the same blocks at the same moment.
use std::collections::BTreeMap;

use devicemapper::Device;
use log::{info, warn};

use super::{cache, lock::Locks, paths, ExportConfig, PathPolicy};
use crate::{
    dm::{self, multipath::MultipathParams, snapshot::SnapshotOriginParams, Dm, DmDev, Table, Target},
    error::{Error, Kind, Result},
    iscsi::{self, Source},
    lio::{Backstore, Export, Lio, LocalDisk},
    names::{self, Role},
    rollback::Undo,
    usage,
};

/// The parts of a built template the VM layer needs.
pub struct Template {
    pub image: String,
    /// What the VMs' dm-snapshots read: the local disk (coalescing) or the cached device.
    pub read_dev: Device,
    /// The snapshot-origin device: what is exported and what qcow2 overlays read from.
    pub origin: DmDev,
    pub sectors: u64,
}

/// What a template is built and torn down with: the path policy of its logins, how it is
/// exported, and the cache engines' context.
pub struct Ctx<'a> {
    pub paths: &'a PathPolicy,
    pub export: &'a ExportConfig,
    pub cache: cache::Ctx<'a>,
}

pub fn devices(dm: &Dm, image: &str) -> Result<BTreeMap<Role, DmDev>> {
    let mut m = BTreeMap::new();
    for role in Role::ALL {
        if let Some(d) = dm.info(&names::template_dm_name(image, role))? {
            m.insert(role, d);
        }
    }
    Ok(m)
}

fn backstore_kind(export: &ExportConfig) -> Backstore {
    if export.coalesce {
        Backstore::File
    } else {
        Backstore::Block
    }
}

fn export_of(export: &ExportConfig, image: &str) -> Option<Export> {
    let ip = export.export_ip.as_ref()?;
    Some(Export {
        iqn: names::template_iqn(&export.host, image),
        backstore: names::backstore_name(image),
        portal: format!("{ip}:{}", export.export_port),
        kind: backstore_kind(export),
    })
}

/// The local disk of a coalescing template, if it has one.
pub fn local_disk(image: &str) -> Option<LocalDisk> {
    Lio::new().ok()?.find_local_disk(image)
}

/// Readahead of the origin, as the fileio backstore will see it: the kernel copies it into
/// the backstore's open file, so it is set before the backstore opens the device.
fn set_readahead(dev: Device, kib: u32) -> Result<()> {
    let p = format!("/sys/dev/block/{}:{}/queue/read_ahead_kb", dev.major, dev.minor);
    std::fs::write(&p, kib.to_string()).map_err(|e| Error::new(Kind::DeviceMapper, format!("write {kib} to {p}: {e}")))
}

pub fn ensure<'a>(ctx: &Ctx<'a>, dm: &'a Dm, image: &str, sources: &[Source], undo: &mut Undo<'a>) -> Result<Template> {
    let have = devices(dm, image)?;
    let paths_name = names::template_dm_name(image, Role::Paths);
    let paths = match have.get(&Role::Paths) {
        Some(p) => {
            if !sources.is_empty() {
                info!("image {image}: template exists, sources of this call not needed");
            }
            p.clone()
        }
        None => {
            if sources.is_empty() {
                return Err(Error::invalid(format!("image {image:?} is not on this node yet: at least one source is needed")));
            }
            let table = paths_table(ctx.paths, image, sources, undo)?;
            dm.ensure_with_undo(undo, paths_name, &table)?
        }
    };
    let sectors = dm::size_sectors(paths.device)?;

    let cached = cache::ensure(&ctx.cache, dm, image, &paths, sectors, undo)?;
    let origin_table = Table::single(sectors, Target::SnapshotOrigin(SnapshotOriginParams { origin: cached.device }));
    let origin = dm.ensure_with_undo(undo, names::template_dm_name(image, Role::Origin), &origin_table)?;

    let mut read_dev = cached.device;
    if ctx.export.coalesce {
        let lio = Lio::new()?;
        let backstore = names::backstore_name(image);
        let existed = lio.find_local_disk(image).is_some();
        if !existed {
            set_readahead(origin.device, ctx.export.readahead_kib)?;
        }
        let dev = origin.path().display().to_string();
        let disk = lio.local_disk(image, &backstore, Backstore::File, &dev, ctx.paths.scan_timeout);
        if !existed {
            let image = image.to_string();
            undo.push(format!("local disk of {image}"), move || {
                let mut left = vec![];
                lio.remove_local_disk(&image, &mut left);
                lio.remove_backstore(&backstore, &mut left);
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(left.join("; "))
                }
            });
        }
        let disk = disk?;
        if ctx.paths.queue_timeout_s > 0 {
            // The VMs' reads wait here while the paths queue: no SCSI error handling first.
            paths::set_command_timeout(disk.device, paths::command_timeout(ctx.paths))?;
        }
        read_dev = disk.device;
    }
    if let Some(exp) = export_of(ctx.export, image) {
        let lio = Lio::new()?;
        // A target prepared for early logins has no LUN yet: this call makes the export.
        let existed = lio.has_lun(&exp.iqn);
        lio.export(&exp.iqn, &exp.backstore, exp.kind, &origin.path(), &exp.portal)?;
        if !existed {
            undo.push(format!("export {}", exp.iqn), move || lio.unexport(&exp));
        }
    }
    Ok(Template { image: image.to_string(), read_dev, origin, sectors })
}

/// Log in to every source and make the multipath table over them: failover order = the order
/// of `sources` (parents first, the origin last).
fn paths_table<'a>(policy: &PathPolicy, image: &str, sources: &[Source], undo: &mut Undo<'a>) -> Result<Table> {
    let disks = login_all(policy, sources, undo)?;
    let sectors = dm::size_sectors(disks[0])?;
    for d in &disks[1..] {
        let s = dm::size_sectors(*d)?;
        if s != sectors {
            return Err(Error::invalid(format!("sources of image {image:?} differ in size: {sectors} and {s} sectors")));
        }
    }
    // Bounded queueing when every path is down (see paths.rs); the path disks wait for a
    // parent that is itself queueing.
    let queue = policy.queue_timeout_s > 0;
    if queue {
        paths::bound_queueing(policy.queue_timeout_s)?;
        for d in &disks {
            paths::set_command_timeout(*d, paths::command_timeout(policy))?;
        }
    }
    Ok(Table::single(sectors, Target::Multipath(MultipathParams::failover(&disks, queue))))
}

/// Swap the parents of a live template (see `Node::reparent`).
pub fn reparent(policy: &PathPolicy, dm: &Dm, image: &str, sources: &[Source]) -> Result<String> {
    let name = names::template_dm_name(image, Role::Paths);
    let old = dm.table(&name).map_err(|e| {
        if dm.info(&name).ok().flatten().is_none() {
            Error::new(Kind::NotFound, format!("image {image:?} has no template on this node"))
        } else {
            e
        }
    })?;
    let mut undo = Undo::default();
    let new = match paths_table(policy, image, sources, &mut undo) {
        Ok(t) => t,
        Err(e) => return Err(undo.rollback(e.context(format!("reparent image {image:?}")))),
    };
    if new.length() != old.length() {
        return Err(undo.rollback(Error::invalid(format!(
            "reparent image {image:?}: new sources have {} sectors, the template {}",
            new.length(),
            old.length()
        ))));
    }
    if new != old {
        if let Err(e) = dm.reload(&name, &new) {
            return Err(undo.rollback(e.context(format!("reparent image {image:?}"))));
        }
    }
    undo.commit();
    // Sessions only the old table used can go now.
    let keep: Vec<Device> = multipath_devices(&new);
    let mut left = Vec::new();
    release_devices(multipath_devices(&old).into_iter().filter(|d| !keep.contains(d)), &mut left);
    for l in left {
        warn!("image {image}: after reparent: {l}");
    }
    info!("image {image}: parents now {new}");
    Ok(new.to_string())
}

fn multipath_devices(t: &Table) -> Vec<Device> {
    match t.lines.first().map(|l| &l.target) {
        Some(Target::Multipath(mp)) => mp.devices().collect(),
        _ => vec![],
    }
}

/// Let go of the LUNs whose disks are `devices`: each disk goes unless something uses it (then
/// it is kept), and its session ends when it carries no other LUN. Returns what went, e.g.
/// `"LUN 1 of <iqn> at <portal> (sdc)"`, `"session to <iqn> at <portal>"`.
pub(super) fn release_devices(devices: impl Iterator<Item = Device>, left: &mut Vec<String>) -> Vec<String> {
    let mut gone = Vec::new();
    let devices: Vec<Device> = devices.collect();
    for s in iscsi::sessions() {
        for l in iscsi::session_luns(&s) {
            let Some(disk) = &l.disk else { continue };
            if !dm::device_of(&std::path::Path::new("/dev").join(disk)).is_ok_and(|d| devices.contains(&d)) {
                continue;
            }
            let t = iscsi::Target { portal: s.portal.clone(), iqn: s.iqn.clone(), lun: l.lun };
            match iscsi::release_unless_used(&t) {
                // Another template reads the same LUN (same volume): kept.
                Ok(None) => {}
                Ok(Some(r)) => gone.extend(released(&t, &r)),
                Err(e) => left.push(e.to_string()),
            }
        }
    }
    gone
}

/// What `iscsi::release` let go of, as `recover` reports it.
pub(super) fn released(t: &iscsi::Target, r: &iscsi::Released) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(d) = &r.disk {
        v.push(format!("LUN {} of {} at {} ({d})", t.lun, t.iqn, t.portal));
    }
    if r.session {
        v.push(format!("session to {} at {}", t.iqn, t.portal));
    }
    v
}

/// The multipath status of a template's paths: device and "A"/"F" per path, in table order.
pub fn path_states(dm: &Dm, image: &str) -> Vec<serde_json::Value> {
    let name = names::template_dm_name(image, Role::Paths);
    let Ok(status) = dm.status(&name) else { return vec![] };
    paths::path_states(&status.join(" "))
        .into_iter()
        .map(|(d, active)| serde_json::json!({"device": d.to_string(), "state": if active { "A" } else { "F" }}))
        .collect()
}

/// Whether the template's paths device queues I/O when every path is down right now (off
/// after the bound expired in an outage, until upkeep re-arms it).
pub fn queueing(dm: &Dm, image: &str) -> Option<bool> {
    match dm.table(&names::template_dm_name(image, Role::Paths)).ok()?.lines.into_iter().next()?.target {
        Target::Multipath(mp) => Some(mp.features.iter().any(|f| f == "queue_if_no_path")),
        _ => None,
    }
}

/// Log in to every path of every source, all at once (a login is several round trips and
/// process starts: in sequence they add up to most of a join); the block devices in source order.
fn login_all<'a>(policy: &PathPolicy, sources: &[Source], undo: &mut Undo<'a>) -> Result<Vec<Device>> {
    let paths: Vec<_> = sources.iter().flat_map(|src| src.targets.iter().map(move |t| (t, src.chap.as_ref()))).collect();
    let logins: Vec<Result<(iscsi::Session, bool)>> = std::thread::scope(|s| {
        let handles: Vec<_> = paths.iter().map(|(t, chap)| s.spawn(move || iscsi::login(t, *chap, policy.path_timeout_s))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(Error::new(Kind::Iscsi, "iSCSI login thread panicked")))).collect()
    });
    // Every session this call created is undone on failure, also when another login failed.
    let mut first_err = None;
    let mut sessions = Vec::new();
    for ((t, _), login) in paths.iter().zip(logins) {
        match login {
            Ok((session, created)) => {
                if created {
                    let t = (*t).clone();
                    undo.push(format!("iSCSI session to {} at {}", t.iqn, t.portal), move || {
                        iscsi::release(&t).map(|_| ()).map_err(|e| e.to_string())
                    });
                }
                sessions.push((session, t.lun));
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let mut disks = Vec::new();
    for (session, lun) in sessions {
        let disk = iscsi::scan_lun(&session, lun, policy.scan_timeout)?;
        disks.push(dm::device_of(&disk)?);
    }
    Ok(disks)
}

/// Remove this node's export of `image`, found by its IQN (also one made under an earlier
/// export_ip, or prepared without a LUN). Returns whether there was one.
pub fn unexport_image(export: &ExportConfig, lio: &Lio, image: &str) -> std::result::Result<bool, String> {
    let iqn = names::template_iqn(&export.host, image);
    if !lio.exports().contains(&iqn) {
        return Ok(false);
    }
    let exp = export_of(export, image).unwrap_or(Export {
        iqn,
        backstore: names::backstore_name(image),
        portal: String::new(),
        kind: backstore_kind(export),
    });
    lio.unexport(&exp).map(|()| true)
}

/// Tear the template down if no VM (`vms`: those using it) and no child session uses it.
/// Returns whether it went.
///
/// Top down, and it stops at the first layer it cannot remove: a layer still open (a process
/// reading the local disk or the origin, a qemu whose overlay went) keeps itself and every
/// layer under it, so nothing is pulled from under a reader (bcache would stop its device
/// under an open origin; an iSCSI logout would fail its disk). The template is then kept
/// (`Ok(false)`, the layer named in the log) and a later release finishes it. A layer whose
/// removal fails is an error that names it, and nothing below it is touched either.
pub fn release_if_unused(ctx: &Ctx<'_>, dm: &Dm, image: &str, vms: &[String]) -> Result<bool> {
    if !vms.is_empty() {
        info!("image {image}: kept, used by VMs {vms:?}");
        return Ok(false);
    }
    let lio = Lio::new().ok();
    let export = export_of(ctx.export, image);
    if let (Some(l), Some(exp)) = (&lio, &export) {
        let children = l.active_sessions(&exp.iqn);
        if !children.is_empty() {
            info!("image {image}: kept, children {children:?} are logged in");
            return Ok(false);
        }
    }
    match teardown(ctx.export, ctx.cache.locks, dm, lio.as_ref(), image) {
        Ok(()) => {}
        Err(e) if e.kind == Kind::Busy => {
            warn!("image {image}: template kept: {e}");
            return Ok(false);
        }
        Err(e) => {
            warn!("image {image}: teardown stopped: {e}");
            return Err(Error::new(Kind::Rollback, format!("teardown of image {image:?} stopped: {e}")));
        }
    }
    // Its slices and record go only once its devices are gone; the cache set's slice
    // once no image's cache is recorded in it (its cache survives a reboot until then).
    let cset_live = dm.info(names::CACHE_SET_DM_NAME)?.is_some();
    ctx.cache.local.space()?.update(|l| {
        l.templates.remove(image);
        l.slices.retain(|n, _| !matches!(names::parse_dm_name(n), Some(names::Parsed::Template { image: i, .. }) if i == image));
        let bcache_used =
            l.slices.keys().any(|n| matches!(names::parse_dm_name(n), Some(names::Parsed::Template { role: Role::Bdev, .. })));
        if !bcache_used && !cset_live {
            l.slices.remove(names::CACHE_SET_DM_NAME);
        }
    })?;
    info!("image {image}: template torn down");
    Ok(true)
}

/// The layers of `image`'s template, top down, each only once nothing uses it; the first that
/// cannot go ends the teardown (`Busy` when it is in use).
fn teardown(export: &ExportConfig, locks: &Locks, dm: &Dm, lio: Option<&Lio>, image: &str) -> Result<()> {
    let lio_err = |what: &str, left: Vec<String>| {
        if left.is_empty() {
            Ok(())
        } else {
            Err(Error::new(Kind::Lio, format!("{what} of image {image:?}: {}", left.join("; "))))
        }
    };
    if let Some(l) = lio {
        // The node's own readers: a process with the local disk open (a VM's snapshot on it
        // counts as a VM and was checked above).
        if let Some(disk) = l.find_local_disk(image) {
            if let Some(why) = usage::block_in_use(disk.device) {
                return Err(Error::new(Kind::Busy, format!("its local disk {} is {why}", disk.path.display())));
            }
        }
        unexport_image(export, l, image).map_err(|e| Error::new(Kind::Lio, format!("remove the export of image {image:?}: {e}")))?;
        // The VMs' local disk, then the backstore it kept (also after a crash left them).
        let mut left = Vec::new();
        l.remove_local_disk(image, &mut left);
        lio_err("remove the local disk", std::mem::take(&mut left))?;
        l.remove_backstore(&names::backstore_name(image), &mut left);
        lio_err("remove the backstore", left)?;
    }
    let paths_table = dm.table(&names::template_dm_name(image, Role::Paths)).ok();
    // dm refuses to remove an open device (Busy): a process reading the origin keeps it.
    dm.remove(&names::template_dm_name(image, Role::Origin))?;
    cache::remove(dm, image)?;
    dm.remove(&names::template_dm_name(image, Role::Paths))?;
    let mut left = Vec::new();
    cache::release_cache_set_if_unused(locks, dm, &mut left);
    // Our LUNs of the sessions that carried the paths, and those sessions if nothing else is in them.
    if let Some(t) = paths_table {
        release_devices(multipath_devices(&t).into_iter(), &mut left);
    }
    if left.is_empty() {
        Ok(())
    } else {
        Err(Error::new(Kind::Rollback, left.join("; ")))
    }
}
