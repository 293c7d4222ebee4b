//! Carving the node's one local device into slices (cache metadata, cache data, snapshot COW)
//! for every image and VM. The slices are dm-linear devices, so the kernel's tables are the
//! allocation map: after a restart nothing needs to be remembered, and space comes back as soon
//! as a slice is removed.
use devicemapper::{Device, LinearTargetParams, Sectors};

use crate::{
    dm::{Dm, Table, Target},
    error::{Error, Kind, Result},
    names::DM_PREFIX,
};

/// Slices start on 1 MiB boundaries.
pub const ALIGN_SECTORS: u64 = 2048;

/// First fit of `want` sectors in `[0, total)` avoiding `used` extents `(start, len)`.
pub fn first_fit(total: u64, used: &[(u64, u64)], want: u64, align: u64) -> Option<u64> {
    let mut used = used.to_vec();
    used.sort();
    let mut cursor = 0u64;
    for (start, len) in used.iter().copied().chain(std::iter::once((total, 0))) {
        let aligned = cursor.div_ceil(align) * align;
        if start >= aligned && start - aligned >= want {
            return Some(aligned);
        }
        cursor = cursor.max(start + len);
    }
    None
}

/// Extents of `device` used by our linear slices, from the live tables.
pub fn used_extents(dm: &Dm, device: Device) -> Result<Vec<(u64, u64)>> {
    let mut used = Vec::new();
    for d in dm.list(DM_PREFIX)? {
        let Ok(t) = dm.table(&d.name) else { continue };
        for l in &t.lines {
            if let Target::Linear(p) = &l.target {
                if p.device == device {
                    used.push((*p.start_offset, l.length));
                }
            }
        }
    }
    Ok(used)
}

/// The table of a new slice of `sectors` on `device` (size `total`), or a `CacheDevice` error
/// saying how much is free.
pub fn plan_slice(dm: &Dm, device: Device, total: u64, sectors: u64, what: &str) -> Result<Table> {
    let used = used_extents(dm, device)?;
    let start = first_fit(total, &used, sectors, ALIGN_SECTORS).ok_or_else(|| {
        let free = total.saturating_sub(used.iter().map(|u| u.1).sum());
        Error::new(
            Kind::CacheDevice,
            format!("local device {device} has no room for {what}: needs {} MiB, {} MiB free", sectors / 2048, free / 2048),
        )
    })?;
    Ok(Table::single(sectors, Target::Linear(LinearTargetParams::new(device, Sectors(start)))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_finds_holes_and_respects_alignment() {
        assert_eq!(first_fit(10_000, &[], 100, 1), Some(0));
        assert_eq!(first_fit(10_000, &[(0, 100)], 100, 1), Some(100));
        assert_eq!(first_fit(10_000, &[(0, 100)], 100, 2048), Some(2048));
        assert_eq!(first_fit(10_000, &[(0, 100), (2048, 4000)], 2000, 2048), Some(6144));
        assert_eq!(first_fit(8192, &[(2048, 2048)], 2048, 2048), Some(0));
        assert_eq!(first_fit(8192, &[(0, 2048), (4096, 4096)], 2048, 2048), Some(2048));
        assert_eq!(first_fit(8192, &[(0, 8192)], 1, 1), None);
        assert_eq!(first_fit(4096, &[], 4097, 1), None);
    }

    #[test]
    fn freed_space_is_reused() {
        let used = [(0, 2048), (4096, 2048)];
        assert_eq!(first_fit(6144, &used, 2048, 2048), Some(2048));
        assert_eq!(first_fit(6144, &used[..1], 4096, 2048), Some(2048));
    }
}
