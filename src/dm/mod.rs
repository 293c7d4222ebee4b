//! Device-mapper through the `devicemapper` crate's ioctls (no dmsetup at run time).
//! `table` holds the typed targets; this module creates, adopts, reloads and removes devices.
pub mod multipath;
pub mod snapshot;
pub mod table;

use std::{
    fs,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use devicemapper::{DevId, Device, DmFlags, DmName, DmOptions, DmUuid, DM};
use log::{debug, info};

pub use table::{Line, Table, Target};

use crate::{
    error::{Error, Kind, Result},
    rollback::Undo,
};

pub(crate) fn parse_err(target: &str, s: &str, why: &str) -> Error {
    Error::new(Kind::DeviceMapper, format!("cannot parse {target} table {s:?}: {why}"))
}

/// A device of ours that exists in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmDev {
    pub name: String,
    pub device: Device,
    pub open_count: i32,
}

impl DmDev {
    /// Stable path: `/dev/mapper/<name>` (made by udev, or by us where there is no udev).
    pub fn path(&self) -> PathBuf {
        mapper_path(&self.name)
    }
}

pub fn mapper_path(name: &str) -> PathBuf {
    Path::new("/dev/mapper").join(name)
}

pub struct Dm {
    dm: DM,
}

/// How a table is loaded. A multipath table is over the parents' exports (the origin volume
/// last), which are write-protected SCSI disks: `sd` refuses to open those for writing (EROFS),
/// and vmthunder never writes to them, so the paths device is read-only. The layers above it
/// (bcache's backing device, dm-cache) still load read-write tables over it.
fn load_options(table: &Table) -> DmOptions {
    if is_multipath(table) {
        DmOptions::default().set_flags(DmFlags::DM_READONLY)
    } else {
        DmOptions::default()
    }
}

fn is_multipath(table: &Table) -> bool {
    table.lines.iter().any(|l| matches!(l.target, Target::Multipath(_)))
}

fn dm_name(name: &str) -> Result<&DmName> {
    DmName::new(name).map_err(|e| Error::invalid(format!("invalid device-mapper name {name:?}: {e}")))
}

impl Dm {
    pub fn open() -> Result<Self> {
        DM::new()
            .map(|dm| Dm { dm })
            .map_err(|e| Error::new(Kind::DeviceMapper, format!("cannot open /dev/mapper/control (is dm-mod loaded?): {e}")))
    }

    /// All devices whose name starts with `prefix`.
    pub fn list(&self, prefix: &str) -> Result<Vec<DmDev>> {
        let mut out = Vec::new();
        for (name, device, _) in self.dm.list_devices()? {
            let name = name.to_string();
            if name.starts_with(prefix) {
                let open_count = self.info(&name)?.map_or(0, |d| d.open_count);
                out.push(DmDev { name, device, open_count });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn info(&self, name: &str) -> Result<Option<DmDev>> {
        match self.dm.device_info(&DevId::Name(dm_name(name)?)) {
            Ok(i) => Ok(Some(DmDev { name: name.to_string(), device: i.device(), open_count: i.open_count() })),
            Err(e) if is_enxio(&e) => Ok(None),
            Err(e) => Err(Error::from(e).context(format!("device-mapper info {name}"))),
        }
    }

    /// The active table, typed.
    pub fn table(&self, name: &str) -> Result<Table> {
        let (_, lines) = self
            .dm
            .table_status(&DevId::Name(dm_name(name)?), DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE))
            .map_err(|e| Error::from(e).context(format!("read table of {name}")))?;
        Table::from_kernel(&lines)
    }

    /// The target status line(s) (`dmsetup status`).
    pub fn status(&self, name: &str) -> Result<Vec<String>> {
        let (_, lines) = self
            .dm
            .table_status(&DevId::Name(dm_name(name)?), DmOptions::default())
            .map_err(|e| Error::from(e).context(format!("read status of {name}")))?;
        Ok(lines.into_iter().map(|(_, _, t, p)| format!("{t} {p}")).collect())
    }

    /// `ensure`, registering the removal of a device this call created with `undo` (an
    /// adopted device is not ours to remove if the set-up fails).
    pub fn ensure_with_undo<'a>(&'a self, undo: &mut Undo<'a>, name: String, table: &Table) -> Result<DmDev> {
        let (dev, created) = self.ensure(&name, table)?;
        if created {
            undo.push(format!("device {name}"), move || self.remove(&name).map(|_| ()).map_err(|e| e.to_string()));
        }
        Ok(dev)
    }

    /// Create `name` with `table`, or adopt it if it exists with the same table (idempotent).
    /// Returns the device and whether this call created it.
    pub fn ensure(&self, name: &str, table: &Table) -> Result<(DmDev, bool)> {
        if let Some(dev) = self.info(name)? {
            let current = self.table(name)?;
            if &current != table {
                return Err(Error::new(
                    Kind::DeviceMapper,
                    format!("{name} exists with table {current} but {table} was expected; refusing to adopt"),
                ));
            }
            debug!("adopted {name} ({})", dev.device);
            ensure_node(&dev)?;
            return Ok((dev, false));
        }
        let dmn = dm_name(name)?;
        let uuid = format!("VMTHUNDER-{name}");
        let uuid = DmUuid::new(&uuid).map_err(|e| Error::invalid(format!("invalid dm uuid {uuid:?}: {e}")))?;
        self.dm.device_create(dmn, Some(uuid), DmOptions::default()).map_err(|e| Error::from(e).context(format!("create {name}")))?;
        let id = DevId::Name(dmn);
        let loaded = self
            .dm
            .table_load(&id, &table.to_kernel(), load_options(table))
            .and_then(|_| self.dm.device_suspend(&id, DmOptions::default()));
        if let Err(e) = loaded {
            // Leave nothing half-built: the empty device goes again.
            let _ = self.dm.device_remove(&id, DmOptions::default());
            return Err(Error::from(e).context(format!("load table {table} into {name}")));
        }
        let dev = self.info(name)?.ok_or_else(|| Error::new(Kind::DeviceMapper, format!("{name} vanished after creation")))?;
        ensure_node(&dev)?;
        info!("created {name} ({}): {table}", dev.device);
        Ok((dev, true))
    }

    /// Replace the table of a live device (suspend, load, resume): used to change paths.
    pub fn reload(&self, name: &str, table: &Table) -> Result<()> {
        let id = DevId::Name(dm_name(name)?);
        let ctx = |what: &str| format!("{what} {name} (reload with {table})");
        self.dm.table_load(&id, &table.to_kernel(), load_options(table)).map_err(|e| Error::from(e).context(ctx("load a table into")))?;
        // A multipath device is suspended without flushing (as multipathd does): I/O queued
        // while every path is down stays queued through the swap instead of failing.
        let flags = if is_multipath(table) { DmFlags::DM_SUSPEND | DmFlags::DM_NOFLUSH } else { DmFlags::DM_SUSPEND };
        self.dm.device_suspend(&id, DmOptions::default().set_flags(flags)).map_err(|e| Error::from(e).context(ctx("suspend")))?;
        self.dm.device_suspend(&id, DmOptions::default()).map_err(|e| Error::from(e).context(ctx("resume")))?;
        info!("reloaded {name}: {table}");
        Ok(())
    }

    pub fn message(&self, name: &str, msg: &str) -> Result<Option<String>> {
        let id = DevId::Name(dm_name(name)?);
        Ok(self.dm.target_msg(&id, None, msg).map_err(|e| Error::from(e).context(format!("message {msg:?} to {name}")))?.1)
    }

    /// Remove a device if it exists. A device still open is `Busy`.
    pub fn remove(&self, name: &str) -> Result<bool> {
        let Some(dev) = self.info(name)? else { return Ok(false) };
        if dev.open_count > 0 {
            return Err(Error::new(Kind::Busy, format!("{name} is open {} time(s)", dev.open_count)));
        }
        self.dm
            .device_remove(&DevId::Name(dm_name(name)?), DmOptions::default())
            .map_err(|e| Error::from(e).context(format!("remove {name}")))?;
        remove_node(&dev);
        info!("removed {name}");
        Ok(true)
    }
}

fn is_enxio(e: &devicemapper::DmError) -> bool {
    use devicemapper::{errors::Error as CoreErr, DmError};
    matches!(e, DmError::Core(CoreErr::Ioctl(_, _, _, errno)) if **errno == nix::errno::Errno::ENXIO)
}

/// Without udev (containers, our UML test nodes) nobody makes `/dev/mapper/<name>`: do what
/// libdevmapper does with DM_DISABLE_UDEV and make the node ourselves.
fn ensure_node(dev: &DmDev) -> Result<()> {
    let path = dev.path();
    let want = libc::makedev(dev.device.major, dev.device.minor);
    if let Ok(md) = fs::metadata(&path) {
        if md.file_type().is_block_device() && md.rdev() == want {
            return Ok(());
        }
        let _ = fs::remove_file(&path);
    }
    let _ = fs::create_dir_all("/dev/mapper");
    match nix::sys::stat::mknod(&path, nix::sys::stat::SFlag::S_IFBLK, nix::sys::stat::Mode::from_bits_truncate(0o600), want) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(Error::new(Kind::DeviceMapper, format!("mknod {}: {e}", path.display()))),
    }
}

fn remove_node(dev: &DmDev) {
    let path = dev.path();
    if let Ok(md) = fs::metadata(&path) {
        if md.file_type().is_block_device() && md.rdev() == libc::makedev(dev.device.major, dev.device.minor) {
            let _ = fs::remove_file(&path);
        }
    }
}

/// `major:minor` of a block device node.
pub fn device_of(path: &Path) -> Result<Device> {
    let md = fs::metadata(path).map_err(|e| Error::new(Kind::NotFound, format!("{}: {e}", path.display())))?;
    if !md.file_type().is_block_device() {
        return Err(Error::invalid(format!("{} is not a block device", path.display())));
    }
    let rdev = md.rdev();
    Ok(Device { major: libc::major(rdev), minor: libc::minor(rdev) })
}

/// Size in 512-byte sectors of a block device, from sysfs.
pub fn size_sectors(dev: Device) -> Result<u64> {
    let p = format!("/sys/dev/block/{}:{}/size", dev.major, dev.minor);
    let s = fs::read_to_string(&p).map_err(|e| Error::new(Kind::NotFound, format!("{p}: {e}")))?;
    s.trim().parse().map_err(|_| Error::new(Kind::DeviceMapper, format!("{p}: bad size {s:?}")))
}

/// Devices that hold `dev` open through the block layer (dm devices stacked on it).
pub fn holders(dev: Device) -> Vec<String> {
    let p = format!("/sys/dev/block/{}:{}/holders", dev.major, dev.minor);
    fs::read_dir(p).map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_paths_table_is_loaded_read_only() {
        let ro = |s: &str| load_options(&s.parse().unwrap()).flags().contains(DmFlags::DM_READONLY);
        assert!(ro("0 1048576 multipath 0 0 1 1 round-robin 0 2 1 8:0 1 8:16 1"));
        assert!(!ro("0 16 linear 254:9 0\n16 1048576 linear 254:1 0"));
        assert!(!ro("0 1048576 cache 254:1 254:2 254:0 512 1 writethrough smq 0"));
        assert!(!ro("0 1048576 snapshot-origin 254:3"));
    }
}
