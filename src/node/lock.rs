//! Cross-process locks: one per image (never one for the whole node), plus a short one for
//! carving the local device, and a *join mark* per image. `flock` locks go away with the
//! process, so a crash never leaves a stale lock.
use std::{fs::OpenOptions, path::Path, time::{Duration, Instant}};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Kind, Result};

pub struct Lock {
    _flock: Flock<std::fs::File>,
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

fn take(dir: &Path, name: &str, how: FlockArg, timeout: Duration) -> Result<Lock> {
    std::fs::create_dir_all(dir).map_err(|e| Error::new(Kind::InvalidArgument, format!("state dir {}: {e}", dir.display())))?;
    let path = dir.join(format!("{name}.lock"));
    let start = Instant::now();
    loop {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::new(Kind::InvalidArgument, format!("lock {}: {e}", path.display())))?;
        match Flock::lock(f, how) {
            Ok(l) => return Ok(Lock { _flock: l }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if start.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err((_, e)) => {
                return Err(Error::new(Kind::Busy, format!("lock {} held by another process ({e})", path.display())))
            }
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
}
