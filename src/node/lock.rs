//! Cross-process locks: one per image (never one for the whole node), plus a short one for
//! carving the local device. `flock` locks go away with the process, so a crash never leaves a
//! stale lock.
use std::{fs::OpenOptions, path::Path, time::{Duration, Instant}};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Kind, Result};

pub struct Lock {
    _flock: Flock<std::fs::File>,
}

pub fn acquire(dir: &Path, name: &str, timeout: Duration) -> Result<Lock> {
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
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
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
