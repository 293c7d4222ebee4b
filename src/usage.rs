//! Who still uses a block device or a file: what a teardown checks before it removes a layer.
//!
//! A sysfs holder is only a stacked driver (dm, md, bcache); a process that opened the device
//! (qemu on `/dev/sdX`, a reader with `dd`) is not one, nor is it in dm's open count of a
//! disk. So processes are found by their open file descriptors (`/proc/<pid>/fd`, compared by
//! device number or by inode, so a path seen through another mount namespace still matches),
//! and files also by their OFD locks (qemu locks every image it opens; a lock is visible even
//! when the process is not, e.g. in another PID namespace).
use std::{
    fs,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::Path,
};

use devicemapper::Device;

fn block_dev_dir(dev: Device) -> String {
    format!("/sys/dev/block/{}:{}", dev.major, dev.minor)
}

/// Kernel devices stacked on `dev` (its sysfs `holders`).
pub fn holders(dev: Device) -> Vec<String> {
    fs::read_dir(format!("{}/holders", block_dev_dir(dev)))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Process ids with an open descriptor whose target satisfies `hit` (its metadata).
fn openers(hit: impl Fn(&fs::Metadata) -> bool) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else { return pids };
    for p in procs.filter_map(|e| e.ok()) {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        // A process that exits meanwhile, or one we may not look into, is skipped.
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else { continue };
        if fds.filter_map(|e| e.ok()).any(|fd| fs::metadata(fd.path()).is_ok_and(|m| hit(&m))) {
            pids.push(pid);
        }
    }
    pids
}

fn describe(pids: &[u32]) -> String {
    let named: Vec<String> = pids
        .iter()
        .map(|p| {
            let comm = fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            format!("{} (pid {p})", comm.trim())
        })
        .collect();
    named.join(", ")
}

/// Why block device `dev` must not be removed, if something uses it: a stacked device or a
/// process that has it open.
pub fn block_in_use(dev: Device) -> Option<String> {
    let h = holders(dev);
    if !h.is_empty() {
        return Some(format!("held by {}", h.join(", ")));
    }
    let rdev = libc::makedev(dev.major, dev.minor);
    let pids = openers(|m| m.file_type().is_block_device() && m.rdev() == rdev);
    (!pids.is_empty()).then(|| format!("open by {}", describe(&pids)))
}

/// Why file `path` must not be removed, if a process has it open or holds a lock on it.
/// A missing file is not in use.
pub fn file_in_use(path: &Path) -> Option<String> {
    let md = fs::metadata(path).ok()?;
    let (dev, ino) = (md.dev(), md.ino());
    let pids = openers(|m| m.dev() == dev && m.ino() == ino);
    if !pids.is_empty() {
        return Some(format!("open by {}", describe(&pids)));
    }
    locked(path).then(|| "locked (an OFD or POSIX lock: qemu locks the images it opens)".to_string())
}

/// Whether any process holds a lock on part of `path` (qemu takes OFD locks at fixed offsets).
fn locked(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = fs::File::open(path) else { return false };
    // SAFETY: a zeroed flock is valid; F_OFD_GETLK fills it in for the open descriptor.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as _;
    fl.l_whence = libc::SEEK_SET as _;
    fl.l_start = 0;
    fl.l_len = 0; // to the end of the file and beyond
                  // Asking for a write lock over everything reports any lock held by another description.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    r == 0 && fl.l_type != libc::F_UNLCK as libc::c_short
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_open_in_this_process_is_in_use_and_a_closed_one_is_not() {
        let dir = std::env::temp_dir().join(format!("vmt-usage-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("overlay.qcow2");
        fs::File::create(&p).unwrap().write_all(b"x").unwrap();
        assert_eq!(file_in_use(&p), None);
        let f = fs::File::open(&p).unwrap();
        let why = file_in_use(&p).expect("open by this process");
        assert!(why.contains(&format!("pid {}", std::process::id())), "{why}");
        drop(f);
        assert_eq!(file_in_use(&p), None);
        assert_eq!(file_in_use(&dir.join("missing")), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_ofd_lock_of_another_description_is_seen() {
        use std::os::fd::AsRawFd;
        let dir = std::env::temp_dir().join(format!("vmt-usage-lock-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("img");
        fs::File::create(&p).unwrap().write_all(&[0u8; 512]).unwrap();
        assert!(!locked(&p));
        let holder = fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_RDLCK as _;
        fl.l_whence = libc::SEEK_SET as _;
        fl.l_start = 100; // where qemu locks its permission bytes
        fl.l_len = 1;
        assert_eq!(unsafe { libc::fcntl(holder.as_raw_fd(), libc::F_OFD_SETLK, &fl) }, 0);
        assert!(locked(&p));
        drop(holder);
        assert!(!locked(&p));
        fs::remove_dir_all(&dir).unwrap();
    }
}
