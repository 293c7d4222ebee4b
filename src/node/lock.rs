//! Cross-process locks: one per image (never one for the whole node), plus a short one for
//! carving the local device, and a *join mark* per image. `flock` locks go away with the
//! process, so a crash never leaves a stale lock.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Kind, Result};

pub struct Lock {
    _flock: Flock<std::fs::File>,
}

/// The node's locks, in the state dir's `locks/`. Lock order: image -> cache set -> local
/// device.
#[derive(Debug, Clone)]
pub struct Locks {
    dir: PathBuf,
}

impl Locks {
    pub fn new(state_dir: &Path) -> Self {
        Locks { dir: state_dir.join("locks") }
    }

    /// Image `image`'s lock, waiting up to `timeout`.
    pub fn image(&self, image: &str, timeout: Duration) -> Result<Lock> {
        acquire(&self.dir, &format!("image-{image}"), timeout)
    }

    /// The node's shared bcache cache set.
    pub fn cache_set(&self) -> Result<Lock> {
        acquire(&self.dir, "cache-set", Duration::from_secs(120))
    }

    /// The carving lock of the local device.
    pub fn local_device(&self) -> Result<Lock> {
        acquire(&self.dir, "local-device", Duration::from_secs(60))
    }

    /// A shared join mark of `image` (see `Node::joining`).
    pub fn join_mark(&self, image: &str) -> Result<Lock> {
        acquire_shared(&self.dir, &Self::join_mark_name(image), Duration::from_secs(120))
    }

    /// The join mark of `image` held exclusively if no join holds it, else `None`.
    pub fn no_join(&self, image: &str) -> Result<Option<Lock>> {
        try_exclusive(&self.dir, &Self::join_mark_name(image))
    }

    fn join_mark_name(image: &str) -> String {
        format!("join-{image}")
    }
}

/// The exclusive lock `name`, waiting up to `timeout` for whoever holds it.
pub fn acquire(dir: &Path, name: &str, timeout: Duration) -> Result<Lock> {
    take(dir, name, FlockArg::LockExclusiveNonblock, timeout)
}

/// A shared hold on `name`: any number of holders at once, none while someone holds it
/// exclusively (`try_exclusive`).
pub fn acquire_shared(dir: &Path, name: &str, timeout: Duration) -> Result<Lock> {
    take(dir, name, FlockArg::LockSharedNonblock, timeout)
}

/// The exclusive lock `name` if nobody holds it at all, else `None` (no waiting).
pub fn try_exclusive(dir: &Path, name: &str) -> Result<Option<Lock>> {
    match take(dir, name, FlockArg::LockExclusiveNonblock, Duration::ZERO) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind == Kind::Busy => Ok(None),
        Err(e) => Err(e),
    }
}

/// The lock file `dir/name.lock`: created exclusively where it is new (mode 0600), opened
/// without following a symbolic link where it exists, and only ever a regular file. `name` is
/// checked first: it comes from image ids.
fn open_lock_file(dir: &Path, name: &str) -> Result<std::fs::File> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    // The name comes from the caller's ids; everything after is the state dir's own trouble.
    if name.is_empty() || name.contains("..") || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
        return Err(Error::invalid(format!("invalid lock name {name:?}")));
    }
    let io = |what: String, e: std::io::Error| Error::caused_by(Kind::StateDir, what, e);
    let bad = |why: String| Error::new(Kind::StateDir, why);
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(_) => {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| io(format!("state dir {}", dir.display()), e))?
        }
    }
    if !std::fs::symlink_metadata(dir).map_err(|e| io(format!("state dir {}", dir.display()), e))?.is_dir() {
        return Err(bad(format!("lock dir {} is not a directory (a symbolic link?)", dir.display())));
    }
    let path = dir.join(format!("{name}.lock"));
    let nofollow = libc::O_NOFOLLOW | libc::O_CLOEXEC;
    for _ in 0..3 {
        match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(nofollow).open(&path) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(format!("lock {}", path.display()), e)),
        }
        let f = match std::fs::OpenOptions::new().write(true).custom_flags(nofollow | libc::O_NONBLOCK).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // removed meanwhile: create it
            Err(e) => return Err(io(format!("lock {} (not following a symbolic link)", path.display()), e)),
        };
        let meta = f.metadata().map_err(|e| io(format!("lock {}", path.display()), e))?;
        if !meta.is_file() {
            return Err(bad(format!("lock {} is not a regular file", path.display())));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            // made by an older version with the umask's mode
            f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(|e| io(format!("chmod {}", path.display()), e))?;
        }
        return Ok(f);
    }
    Err(bad(format!("lock {}: created and removed again meanwhile, three times", path.display())))
}

fn take(dir: &Path, name: &str, how: FlockArg, timeout: Duration) -> Result<Lock> {
    let path = dir.join(format!("{name}.lock"));
    let start = Instant::now();
    loop {
        let f = open_lock_file(dir, name)?;
        match Flock::lock(f, how) {
            Ok(l) => return Ok(Lock { _flock: l }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(50)),
            Err((_, e)) => return Err(Error::new(Kind::Busy, format!("lock {} held by another process ({e})", path.display()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_holds_keep_the_exclusive_lock_away_until_the_last_goes() {
        let dir = std::env::temp_dir().join(format!("vmthunder-lock-test-{}", std::process::id()));
        let a = acquire_shared(&dir, "join-img", Duration::ZERO).unwrap();
        let b = acquire_shared(&dir, "join-img", Duration::ZERO).unwrap();
        assert!(try_exclusive(&dir, "join-img").unwrap().is_none());
        drop(a);
        assert!(try_exclusive(&dir, "join-img").unwrap().is_none());
        drop(b);
        let x = try_exclusive(&dir, "join-img").unwrap().expect("free once no shared holder is left");
        let e = acquire_shared(&dir, "join-img", Duration::ZERO).err().expect("excluded while held exclusively");
        assert_eq!(e.kind, Kind::Busy);
        drop(x);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lock_files_are_new_0600_regular_files_and_links_are_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("vmthunder-lock-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        drop(acquire(&dir, "image-img", Duration::ZERO).unwrap());
        let mode = std::fs::metadata(dir.join("image-img.lock")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        // A link planted where a lock file will be: not followed, its target not created.
        let target = dir.join("planted-target");
        std::os::unix::fs::symlink(&target, dir.join("image-evil.lock")).unwrap();
        let e = acquire(&dir, "image-evil", Duration::ZERO).err().expect("a symbolic link is refused");
        assert!(e.message.contains("image-evil.lock"), "{}", e.message);
        assert_eq!(e.kind, Kind::StateDir, "the state dir's trouble, not a bad caller value");
        let io = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>()).expect("the io error kept");
        assert_eq!(io.raw_os_error(), Some(libc::ELOOP));
        assert!(!target.exists(), "the link was followed");
        // An older lock file with the umask's mode is tightened.
        std::fs::write(dir.join("image-old.lock"), "").unwrap();
        std::fs::set_permissions(dir.join("image-old.lock"), std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(acquire(&dir, "image-old", Duration::ZERO).unwrap());
        assert_eq!(std::fs::metadata(dir.join("image-old.lock")).unwrap().permissions().mode() & 0o777, 0o600);
        // A file where the lock directory belongs.
        let file = dir.join("image-old.lock");
        assert_eq!(acquire(&file, "x", Duration::ZERO).err().expect("not a directory").kind, Kind::StateDir);
        for bad in ["../x", "a/b", "", "a b"] {
            assert_eq!(acquire(&dir, bad, Duration::ZERO).err().expect(bad).kind, Kind::InvalidArgument, "{bad}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
