//! Carving the node's one local device into slices (cache set, cache metadata and data, VM
//! COWs) for every image and VM. The slices are dm-linear devices; where each lies is recorded
//! on the device itself (`layout.rs`), so a rebooted host finds every slice again.
use std::path::{Path, PathBuf};

use devicemapper::{Device, LinearTargetParams, Sectors};

use super::{
    layout::{Label, Layout, Slice, SliceState, Store},
    lock::{Lock, Locks},
};
use crate::{
    dm::{Table, Target},
    error::{Error, Kind, Result},
    rollback::Undo,
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

/// The node's local device, what the cache engines and the VMs' COWs are carved from.
pub struct LocalDevice {
    path: PathBuf,
    device: Device,
    total: u64,
    locks: Locks,
}

impl LocalDevice {
    /// `total`: its size in sectors; `locks`: where its carving lock lives.
    pub fn new(path: &Path, device: Device, total: u64, locks: Locks) -> Self {
        LocalDevice { path: path.to_path_buf(), device, total, locks }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its size in sectors.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The layout under the carving lock (lock order: image -> cache set -> local device).
    pub fn space(&self) -> Result<Space> {
        Space::open(self.locks.local_device()?, &self.path, self.device, self.total)
    }

    /// The recorded label, read without the lock: a write in progress leaves the previous
    /// generation readable, so this is a consistent, perhaps just superseded, layout.
    pub fn label(&self) -> Result<Label> {
        Store::new(&self.path, self.total).read()
    }

    /// The recorded layout, read without the lock (see `label`).
    pub fn layout(&self) -> Result<Layout> {
        Ok(self.label()?.layout)
    }

    /// Free the slice `name` if the call that carved it fails.
    pub fn undo_slice<'a>(&'a self, undo: &mut Undo<'a>, name: String) {
        undo.push(format!("slice {name} of the local device"), move || {
            self.space().and_then(|mut s| s.free(&[name])).map_err(|e| e.to_string())
        });
    }
}

/// The local device's layout held under the carving lock: read once, every change written
/// to the device at once (`layout.rs`), so what is carved and what is recorded never differ.
pub struct Space {
    store: Store,
    label: Label,
    device: Device,
    total: u64,
    _lock: Lock,
}

impl Space {
    pub fn open(lock: Lock, path: &Path, device: Device, total: u64) -> Result<Self> {
        let store = Store::new(path, total);
        let label = store.read()?;
        Ok(Space { store, label, device, total, _lock: lock })
    }

    pub fn layout(&self) -> &Layout {
        &self.label.layout
    }

    pub fn generation(&self) -> u64 {
        self.label.generation
    }

    /// Apply `f` to the layout and record the result (nothing is written when it is unchanged).
    pub fn update<T>(&mut self, f: impl FnOnce(&mut Layout) -> T) -> Result<T> {
        let mut l = self.label.layout.clone();
        let out = f(&mut l);
        if l != self.label.layout {
            self.store.write(&mut self.label, l)?;
        }
        Ok(out)
    }

    pub fn slice(&self, name: &str) -> Option<&Slice> {
        self.label.layout.slices.get(name)
    }

    /// The dm-linear table of a recorded slice.
    pub fn table(&self, name: &str) -> Option<Table> {
        self.slice(name).map(|s| Table::single(s.sectors, Target::Linear(LinearTargetParams::new(self.device, Sectors(s.start)))))
    }

    /// Carve a new slice of `sectors` for `name` and record it `New` (its contents are not
    /// trusted until `set_ready`); a `CacheDevice` error says how much is free.
    pub fn allocate(&mut self, name: &str, sectors: u64, what: &str) -> Result<Table> {
        let used = self.label.layout.used();
        let start = first_fit(self.total, &used, sectors, ALIGN_SECTORS).ok_or_else(|| {
            let free = self.total.saturating_sub(used.iter().map(|u| u.1).sum());
            Error::new(
                Kind::CacheDevice,
                format!("local device {} has no room for {what}: needs {} MiB, {} MiB free", self.device, sectors / 2048, free / 2048),
            )
        })?;
        self.update(|l| l.slices.insert(name.to_string(), Slice { start, sectors, state: SliceState::New }))?;
        Ok(self.table(name).expect("just recorded"))
    }

    /// The slice's head is zeroed and formatted: from now on its contents are its owner's.
    pub fn set_ready(&mut self, name: &str) -> Result<()> {
        self.update(|l| {
            if let Some(s) = l.slices.get_mut(name) {
                s.state = SliceState::Ready;
            }
        })
    }

    pub fn free(&mut self, names: &[String]) -> Result<()> {
        self.update(|l| {
            names.iter().for_each(|n| {
                l.slices.remove(n);
            })
        })
    }
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
