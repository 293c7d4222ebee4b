//! The cache engines: how a template caches what it reads on the node's local device.
//!
//! - `DmCache`: dm-cache (smq) with metadata and data slices per image. Ships in every
//!   distribution kernel (RHEL's included), but smq promotes only after repeated hits.
//! - `Bcache`: one cache set on a slice of the local device shared by every image (the
//!   original "flashcache group"); each image's backing device is a dm-linear of a local 8 KiB
//!   head (bcache's superblock lives there, never on the parent) and the paths device. bcache
//!   allocates on a read miss: cache on read.

mod bcache;
mod dm_cache;

use std::path::PathBuf;

use devicemapper::Device;

use super::{
    carve::{LocalDevice, Space},
    layout::SliceState,
    lock::Locks,
    CacheConfig,
};
use crate::{
    dm::{Dm, DmDev},
    error::{Error, Result},
    names::{self, Role},
    rollback::Undo,
};
pub(in crate::node) use bcache::{ensure_cache_set, release_cache_set_if_unused};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    DmCache,
    Bcache,
}

impl std::str::FromStr for Engine {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dm-cache" => Ok(Engine::DmCache),
            "bcache" => Ok(Engine::Bcache),
            _ => Err(Error::invalid(format!("invalid cache engine {s:?}: expected \"bcache\" or \"dm-cache\""))),
        }
    }
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::DmCache => "dm-cache",
            Engine::Bcache => "bcache",
        }
    }
}

/// The cached device of a template (what snapshots and the snapshot-origin sit on).
pub struct Cached {
    pub device: Device,
    pub path: PathBuf,
}

/// What the cache engines use of the node: their settings, the local device their slices
/// (bcache's cache set included) are carved from, and the node's locks (the cache set's).
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub cfg: &'a CacheConfig,
    pub local: &'a LocalDevice,
    pub locks: &'a Locks,
}

/// Which engine an existing template was built with, from its devices.
pub fn engine_of(dm: &Dm, image: &str) -> Result<Option<Engine>> {
    if dm.info(&names::template_dm_name(image, Role::Bdev))?.is_some() {
        Ok(Some(Engine::Bcache))
    } else if dm.info(&names::template_dm_name(image, Role::Cache))?.is_some() {
        Ok(Some(Engine::DmCache))
    } else {
        Ok(None)
    }
}

pub fn ensure<'a>(ctx: &Ctx<'a>, dm: &'a Dm, image: &str, paths: &DmDev, sectors: u64, undo: &mut Undo<'a>) -> Result<Cached> {
    // A template keeps the engine it was built with: its live devices say which, or after a
    // reboot the slices the layout records for it.
    let recorded = || -> Result<Option<Engine>> {
        let l = ctx.local.layout()?;
        Ok(if l.slices.contains_key(&names::template_dm_name(image, Role::Bdev)) {
            Some(Engine::Bcache)
        } else if l.slices.contains_key(&names::template_dm_name(image, Role::CacheMeta)) {
            Some(Engine::DmCache)
        } else {
            None
        })
    };
    let engine = match engine_of(dm, image)? {
        Some(e) => e,
        None => recorded()?.unwrap_or(ctx.cfg.engine),
    };
    match engine {
        Engine::DmCache => dm_cache::ensure(ctx.cfg, ctx.local, dm, image, paths, sectors, undo),
        Engine::Bcache => bcache::ensure(ctx, dm, image, paths, sectors, undo),
    }
}

/// An image's (or the node's) slice `name` of the local device: the recorded one, or a new one
/// of `want` sectors. Returns the device and whether its contents are fresh (just carved, or
/// carved by a build that died before formatting it): the caller formats it, then
/// `set_ready`s it. The caller holds `space`.
fn slice<'a>(
    local: &'a LocalDevice,
    dm: &'a Dm,
    undo: &mut Undo<'a>,
    space: &mut Space,
    name: String,
    want: u64,
    what: &str,
) -> Result<(DmDev, bool)> {
    let (table, fresh) = match space.slice(&name) {
        Some(s) => (space.table(&name).expect("recorded"), s.state == SliceState::New),
        None => {
            let t = space.allocate(&name, want, what)?;
            local.undo_slice(undo, name.clone());
            (t, true)
        }
    };
    Ok((dm.ensure_with_undo(undo, name, &table)?, fresh))
}

/// Remove an image's cache devices (both engines), top down; the first that cannot go ends
/// it. A bcache device still open (a holder or a process) is `Busy`: stopping it would pull
/// it from under its reader, which bcache does not refuse.
pub fn remove(dm: &Dm, image: &str) -> Result<()> {
    bcache::stop(dm, image)?;
    for role in [Role::Bdev, Role::Cache, Role::CacheData, Role::CacheMeta] {
        dm.remove(&names::template_dm_name(image, role))?;
    }
    Ok(())
}

/// One line about the cache, for `status()`.
pub fn status(dm: &Dm, image: &str) -> Option<String> {
    bcache::status(dm, image).or_else(|| dm.status(&names::template_dm_name(image, Role::Cache)).ok().map(|s| s.join("; ")))
}
