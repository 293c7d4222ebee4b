//! dm-cache (smq) with a metadata and a data slice per image.
use devicemapper::{CacheTargetParams, Sectors};

use super::{slice, Cached};
use crate::{
    dm::{Dm, DmDev, Table, Target},
    error::Result,
    names::{self, Role},
    node::{carve::LocalDevice, zero_head, CacheConfig},
    rollback::Undo,
};

pub(super) fn ensure<'a>(
    cfg: &CacheConfig,
    local: &'a LocalDevice,
    dm: &'a Dm,
    image: &str,
    paths: &DmDev,
    sectors: u64,
    undo: &mut Undo<'a>,
) -> Result<Cached> {
    let block = cfg.cache_block_sectors;
    let data_sectors = cfg.cache_sectors.unwrap_or(sectors).min(sectors).div_ceil(block) * block;
    let nblocks = data_sectors / block;
    // dm-cache needs ~16 bytes per block plus a fixed part; be generous, it is small.
    let meta_sectors = ((8u64 << 20) + nblocks * 64).div_ceil(1 << 20) * 2048;
    let (meta, data) = {
        let mut space = local.space()?;
        let (meta, meta_new) = slice(
            local,
            dm,
            undo,
            &mut space,
            names::template_dm_name(image, Role::CacheMeta),
            meta_sectors,
            &format!("the cache metadata of image {image}"),
        )?;
        let (data, data_new) = slice(
            local,
            dm,
            undo,
            &mut space,
            names::template_dm_name(image, Role::CacheData),
            data_sectors,
            &format!("the cache of image {image}"),
        )?;
        // dm-cache reads nothing of the data slice that its (zeroed) metadata does not map.
        if meta_new {
            zero_head(&meta.path(), 1 << 20)?;
            space.set_ready(&meta.name)?;
        }
        if data_new {
            space.set_ready(&data.name)?;
        }
        (meta, data)
    };
    let table = Table::single(
        sectors,
        Target::Cache(CacheTargetParams::new(
            meta.device,
            data.device,
            paths.device,
            Sectors(block),
            vec!["writethrough".into()],
            "smq".into(),
            vec![],
        )),
    );
    let cache = dm.ensure_with_undo(undo, names::template_dm_name(image, Role::Cache), &table)?;
    Ok(Cached { device: cache.device, path: cache.path() })
}
