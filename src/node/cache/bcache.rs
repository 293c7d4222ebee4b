//! bcache: one cache set on a slice of the local device shared by every image; each image's
//! backing device is a dm-linear of a local head (its superblock) and the paths device.
use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use devicemapper::{Device, LinearTargetParams, Sectors};
use log::info;

use super::{slice, Cached, Ctx};
use crate::{
    cmd,
    dm::{self, Dm, DmDev, Line, Table, Target},
    error::{Error, Kind, Result},
    names::{self, Role},
    node::{carve, layout::SliceState, lock::Locks, zero_head},
    rollback::Undo,
};

/// bcache's default data offset: the backing device's superblock sits at 4 KiB, data at 8 KiB.
const BDEV_HEAD_SECTORS: u64 = 16;
const SYSFS_WAIT: Duration = Duration::from_secs(15);
const MIN_CACHE_SET_SECTORS: u64 = 64 * 2048;

fn sysfs_dev(d: Device) -> PathBuf {
    PathBuf::from(format!("/sys/dev/block/{}:{}", d.major, d.minor))
}

fn write_sysfs(p: &Path, v: &str) -> Result<()> {
    fs::write(p, v).map_err(|e| Error::new(Kind::CacheDevice, format!("write {v:?} to {}: {e}", p.display())))
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > SYSFS_WAIT {
            return Err(Error::new(Kind::CacheDevice, format!("timed out after {}s waiting for {what}", SYSFS_WAIT.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// bcache lets go of a device a moment after its sysfs directory is gone: wait (bounded)
/// until nothing holds the dm device open.
fn wait_released(dm: &Dm, name: &str) -> Result<()> {
    wait_for(&format!("bcache to release {name}"), || dm.info(name).ok().flatten().map_or(true, |d| d.open_count == 0))
}

/// Drop a block device's cached pages (BLKFLSBUF), as `blockdev --flushbufs` does.
fn flush_buffers(dev: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    const BLKFLSBUF: libc::c_ulong = 0x1261; // _IO(0x12, 97)
    let f = fs::File::open(dev).map_err(|e| Error::new(Kind::CacheDevice, format!("open {}: {e}", dev.display())))?;
    // SAFETY: BLKFLSBUF takes no argument; the fd is open for the call's duration.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKFLSBUF as _, 0) } != 0 {
        return Err(Error::new(Kind::CacheDevice, format!("flush the buffers of {}: {}", dev.display(), std::io::Error::last_os_error())));
    }
    Ok(())
}

fn register(dev: &Path) -> Result<()> {
    // EEXIST-like errors when already registered are checked by the caller through sysfs.
    let _ = fs::write("/sys/fs/bcache/register", dev.as_os_str().as_encoded_bytes());
    Ok(())
}

/// The node's cache set: its dm slice and its UUID, made on first use (or by
/// `Node::prepare_cache`), and whether this call made it. The caller holds the cache-set lock.
pub(in crate::node) fn ensure_cache_set<'a>(ctx: &Ctx<'a>, dm: &'a Dm, undo: &mut Undo<'a>) -> Result<(String, bool)> {
    if !Path::new("/sys/fs/bcache/register").exists() {
        let _ = cmd::run(Kind::CacheDevice, "modprobe", &["bcache"], &[], Duration::from_secs(10));
    }
    if !Path::new("/sys/fs/bcache/register").exists() {
        return Err(Error::new(Kind::CacheDevice, "the bcache kernel module is not available: load it, or use engine=\"dm-cache\""));
    }
    let want = ctx.cfg.cache_sectors.unwrap_or(ctx.local.total() / 2);
    // bcache refuses a set of fewer than 1024 buckets, and buckets are at least 64 KiB.
    if want < MIN_CACHE_SET_SECTORS && dm.info(names::CACHE_SET_DM_NAME)?.is_none() {
        return Err(Error::new(
            Kind::CacheDevice,
            format!("bcache cache set of {} MiB is too small: at least {} MiB", want / 2048, MIN_CACHE_SET_SECTORS / 2048),
        ));
    }
    let mut space = ctx.local.space()?;
    if space.slice(names::CACHE_SET_DM_NAME).is_none() {
        if let Some(live) = dm.info(names::CACHE_SET_DM_NAME)? {
            // bcache's set is the host's one: it cannot also live on this device.
            return Err(Error::new(
                Kind::CacheDevice,
                format!(
                    "the host's bcache cache set ({}) lies on another device than {}: one cache device per host with bcache; \
                 use that device, or engine=\"dm-cache\" for this one",
                    live.device,
                    ctx.local.path().display()
                ),
            ));
        }
    }
    let (cset, created) = slice(ctx.local, dm, undo, &mut space, names::CACHE_SET_DM_NAME.to_string(), want, "the bcache cache set")?;
    let set_link = sysfs_dev(cset.device).join("bcache/set");
    if created {
        if set_link.exists() {
            // Registered (by udev's bcache rule) before a crash let us record it formatted.
            unregister_set(dm, &set_link).map_err(|e| Error::new(Kind::CacheDevice, e))?;
        }
        zero_head(&cset.path(), 1 << 20)?;
        // Keep >= 1024 buckets (bcache refuses small sets), buckets of 64 KiB..1 MiB.
        let bytes = dm::size_sectors(cset.device)? * 512;
        let bucket_kib = (bytes / 1024 / 1024).next_power_of_two().clamp(64, 1024);
        let path = cset.path().display().to_string();
        cmd::check(
            Kind::CacheDevice,
            "make-bcache",
            &["-C", "--block", "4k", "--bucket", &format!("{bucket_kib}k"), &path],
            &[],
            Duration::from_secs(60),
        )?;
        space.set_ready(names::CACHE_SET_DM_NAME)?;
    }
    drop(space);
    if !set_link.exists() {
        register(&cset.path())?;
        wait_for("the cache set to register", || set_link.exists())?;
        {
            // Undone before the slice's own removal: bcache must let go of it first.
            let link = set_link.clone();
            undo.push("bcache cache set registration", move || unregister_set(dm, &link));
        }
    }
    let uuid = fs::read_link(&set_link)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .ok_or_else(|| Error::new(Kind::CacheDevice, format!("{} is not a link to a cache set", set_link.display())))?;
    let cs = PathBuf::from("/sys/fs/bcache").join(&uuid);
    // Never bypass the cache because the local disk looks busy.
    let _ = fs::write(cs.join("congested_read_threshold_us"), "0");
    let _ = fs::write(cs.join("congested_write_threshold_us"), "0");
    if created {
        info!("made bcache cache set {uuid} on {}", cset.path().display());
    }
    Ok((uuid, created))
}

/// Unregister the cache set behind `link` and wait until bcache has let go of its device.
fn unregister_set(dm: &Dm, link: &Path) -> std::result::Result<(), String> {
    if let Ok(set) = fs::canonicalize(link) {
        let _ = fs::write(set.join("unregister"), "1");
    }
    wait_for("the cache set to unregister", || !link.exists())
        .and_then(|_| wait_released(dm, names::CACHE_SET_DM_NAME))
        .map_err(|e| e.to_string())
}

pub(super) fn ensure<'a>(ctx: &Ctx<'a>, dm: &'a Dm, image: &str, paths: &DmDev, sectors: u64, undo: &mut Undo<'a>) -> Result<Cached> {
    // The cache set is shared by every image: hold it until our backing device is attached,
    // or a teardown of another image's last use could release it under us.
    let _set = ctx.locks.cache_set()?;
    let (uuid, _) = ensure_cache_set(ctx, dm, undo)?;
    let name = names::template_dm_name(image, Role::Bdev);
    let (bdev, created) = {
        let mut space = ctx.local.space()?;
        let fresh = space.slice(&name).is_none_or(|s| s.state == SliceState::New);
        if fresh {
            if let Some(old) = dm.info(&name)? {
                // A head a build that died half-way formatted: made again, from zeroes.
                stop_backing(&old, true).and_then(|_| wait_released(dm, &name))?;
                dm.remove(&name)?;
            }
            if space.slice(&name).is_none() {
                space.allocate(&name, carve::ALIGN_SECTORS, &format!("the bcache head of image {image}"))?;
                ctx.local.undo_slice(undo, name.clone());
            }
        }
        let mut head_line = space.table(&name).expect("recorded").lines[0].clone();
        head_line.length = BDEV_HEAD_SECTORS;
        let over = |target| Table { lines: vec![head_line.clone(), Line { start: BDEV_HEAD_SECTORS, length: sectors, target }] };
        let with_paths = over(Target::Linear(LinearTargetParams::new(paths.device, Sectors(0))));
        let dev = if fresh {
            // make-bcache probes the whole device for other signatures (libblkid: its head,
            // tail and superblock offsets, ~1.1 MB of a 2 GiB image): formatted over zeros, that costs the
            // parent nothing. The real table goes in before bcache ever opens the device.
            let dev = dm.ensure_with_undo(undo, name.clone(), &over(Target::Zero))?;
            zero_head(&dev.path(), (BDEV_HEAD_SECTORS * 512) as usize)?;
            let path = dev.path().display().to_string();
            cmd::check(Kind::CacheDevice, "make-bcache", &["-B", "--block", "4k", &path], &[], Duration::from_secs(60))?;
            dm.reload(&name, &with_paths)?;
            flush_buffers(&dev.path())?; // the probe's zero pages must not be read again
            space.set_ready(&name)?;
            dev
        } else {
            // Recorded and formatted: its superblock names the cache set, whose blocks of this
            // image are still valid (a rebooted host's cache stays warm).
            dm.ensure_with_undo(undo, name.clone(), &with_paths)?
        };
        (dev, fresh)
    };
    let sys = sysfs_dev(bdev.device).join("bcache");
    if !sys.exists() {
        register(&bdev.path())?;
        wait_for(&format!("bcache to register {name}"), || sys.join("dev").exists())?;
        // From here on the bcache device exists: stop it again if a later step fails. A
        // device made by this call drops its blocks from the set; a recorded one keeps them.
        let bdev2 = bdev.clone();
        // bcache lets go of the dm device a moment after it stops: wait, or the removal of
        // the device below (the next undo step) finds it still open.
        undo.push(format!("bcache device over {name}"), move || {
            stop_backing(&bdev2, created).and_then(|_| wait_released(dm, &bdev2.name)).map_err(|e| e.to_string())
        });
    }
    let state = fs::read_to_string(sys.join("state")).unwrap_or_default();
    if state.trim() == "no cache" {
        write_sysfs(&sys.join("attach"), &uuid)?;
    }
    // Cache every read: no sequential bypass, no readahead inflation.
    write_sysfs(&sys.join("sequential_cutoff"), "0")?;
    let _ = fs::write(sys.join("readahead"), "0");
    write_sysfs(&sys.join("cache_mode"), "writethrough")?;
    // A path error that outlives the paths' queueing bound reaches the reader, but must not
    // stop the backing device (bcache does after io_error_limit errors, 64 by default, and the
    // template is then dead): the template reads again once its paths heal.
    write_sysfs(&sys.join("io_error_limit"), &i32::MAX.to_string())?;
    let bc =
        fs::read_to_string(sys.join("dev/dev")).map_err(|e| Error::new(Kind::CacheDevice, format!("{}/dev/dev: {e}", sys.display())))?;
    let device: Device = bc.trim().parse().map_err(|_| Error::new(Kind::CacheDevice, format!("bad bcache dev {bc:?}")))?;
    let bname =
        fs::read_link(sys.join("dev")).ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_default();
    Ok(Cached { device, path: PathBuf::from("/dev").join(bname) })
}

/// Stop a backing device; with `detach`, first drop its cached blocks from the set (their
/// space returns), which a device whose cache is to survive skips.
fn stop_backing(bdev: &DmDev, detach: bool) -> Result<()> {
    let sys = sysfs_dev(bdev.device).join("bcache");
    if !sys.exists() {
        return Ok(());
    }
    if detach && fs::read_to_string(sys.join("state")).is_ok_and(|s| s.trim() != "no cache") {
        let _ = fs::write(sys.join("detach"), "1");
        let _ = wait_for("bcache detach", || fs::read_to_string(sys.join("state")).map_or(true, |s| s.trim() == "no cache"));
    }
    write_sysfs(&sys.join("stop"), "1")?;
    wait_for(&format!("bcache to release {}", bdev.name), || !sys.exists())
}

/// Unregister and free the node's cache set once no image uses bcache.
pub(in crate::node) fn release_cache_set_if_unused(locks: &Locks, dm: &Dm, left: &mut Vec<String>) {
    // Same lock as ensure_bcache: an attach of another image between our check and the
    // teardown would otherwise lose the set it just found.
    let _set = match locks.cache_set() {
        Ok(l) => l,
        Err(e) => return left.push(e.to_string()),
    };
    let Ok(Some(cset)) = dm.info(names::CACHE_SET_DM_NAME) else { return };
    let in_use = dm.list(names::DM_PREFIX).map_or(true, |l| {
        l.iter().any(|d| matches!(names::parse_dm_name(&d.name), Some(names::Parsed::Template { role: Role::Bdev, .. })))
    });
    if in_use {
        return;
    }
    let sys = sysfs_dev(cset.device).join("bcache/set");
    if let Ok(set) = fs::canonicalize(&sys) {
        let _ = fs::write(set.join("unregister"), "1");
        if let Err(e) = wait_for("the cache set to unregister", || !sys.exists()) {
            left.push(e.to_string());
            return;
        }
    }
    if let Err(e) = wait_released(dm, names::CACHE_SET_DM_NAME) {
        left.push(e.to_string());
        return;
    }
    if let Err(e) = dm.remove(names::CACHE_SET_DM_NAME) {
        left.push(e.to_string());
    } else {
        info!("released the bcache cache set");
    }
}

/// Stop `image`'s bcache device, if it has one, dropping its cached blocks from the set. A
/// device still open (a holder or a process) is `Busy`: stopping it would pull it from under
/// its reader, which bcache does not refuse.
pub(super) fn stop(dm: &Dm, image: &str) -> Result<()> {
    let bdev_name = names::template_dm_name(image, Role::Bdev);
    if let Some(bdev) = dm.info(&bdev_name)? {
        let sys = sysfs_dev(bdev.device).join("bcache");
        let top = fs::read_to_string(sys.join("dev/dev")).ok().and_then(|d| d.trim().parse::<Device>().ok());
        if let Some(why) = top.and_then(crate::usage::block_in_use) {
            return Err(Error::new(Kind::Busy, format!("the bcache device over {bdev_name} is {why}")));
        }
        stop_backing(&bdev, true).and_then(|_| wait_released(dm, &bdev_name))?;
    }
    Ok(())
}

/// One line about `image`'s bcache device (state, hits, misses, errors), if it has one.
pub(super) fn status(dm: &Dm, image: &str) -> Option<String> {
    let b = dm.info(&names::template_dm_name(image, Role::Bdev)).ok()??;
    let sys = sysfs_dev(b.device).join("bcache");
    let rd = |f: &str| fs::read_to_string(sys.join(f)).map(|s| s.trim().to_string()).unwrap_or_default();
    Some(format!(
        "bcache state={} hits={} misses={} bypassed={} io_errors={}",
        rd("state"),
        rd("stats_total/cache_hits"),
        rd("stats_total/cache_misses"),
        rd("stats_total/bypassed"),
        rd("io_errors")
    ))
}
