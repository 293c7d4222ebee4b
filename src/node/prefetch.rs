//! Prefetch of a recorded boot profile: read the blocks a guest will need through the
//! template, so the cache (which allocates on read) holds them before the guest asks.
//!
//! The plan keeps the profile's first-touch order (a boot reads its blocks in roughly the same
//! order every time), drops re-reads, and merges neighbouring pieces into reads of up to
//! `chunk` bytes. Walked forwards (the default), the prefetch runs ahead of the guest, which
//! then finds its blocks here; through a coalescing template a guest's miss of a block the
//! prefetch is fetching waits for that fetch (one page cache), so the two never fetch a block
//! twice. `reverse` walks the plan from its end, meeting the guest in the middle: what a
//! template without coalescing needs (its cache would send both misses to the parent), and
//! slower in a chain (see `Access::default_depth`).
use std::{
    collections::HashSet,
    fs::File,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Mutex,
    },
    time::Instant,
};

use serde::Serialize;

use crate::error::{Error, Kind, Result};

/// O_DIRECT needs sector (and in practice page) aligned offsets, lengths and buffers.
pub const ALIGN: u64 = 4096;

/// Turn a profile `[(offset, length)]` (bytes, first-read order) into aligned reads of at most
/// `chunk` bytes, each block once. Errors name the first range that does not fit `size`.
pub fn plan(ranges: &[(u64, u64)], size: u64, chunk: u64, reverse: bool) -> Result<Vec<(u64, u64)>> {
    if chunk < ALIGN || chunk % ALIGN != 0 || chunk > 16 << 20 {
        return Err(Error::invalid(format!("invalid prefetch chunk {chunk} bytes: a multiple of 4 KiB, 4 KiB..16 MiB")));
    }
    let mut seen = HashSet::new();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, &(off, len)) in ranges.iter().enumerate() {
        let end = off.checked_add(len).filter(|&e| len > 0 && e <= size).ok_or_else(|| {
            Error::invalid(format!("prefetch range #{i} (offset {off}, length {len}) is empty or beyond the image's {size} bytes"))
        })?;
        let (first, last) = (off / ALIGN, end.div_ceil(ALIGN));
        for block in first..last {
            if !seen.insert(block) {
                continue;
            }
            let (o, l) = (block * ALIGN, ALIGN.min(size - block * ALIGN));
            match out.last_mut() {
                Some((po, pl)) if *po + *pl == o && *pl + l <= chunk => *pl += l,
                _ => out.push((o, l)),
            }
        }
    }
    if reverse {
        out.reverse();
    }
    Ok(out)
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub bytes: u64,
    pub reads: u64,
    pub planned_bytes: u64,
    pub seconds: f64,
    /// False when `stop` ended it early.
    pub complete: bool,
}

/// How the prefetch reads the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Through the device's page cache: the one a coalescing template's fileio backstore reads,
    /// shared by every opener of the block device, so a block the VM or a child is fetching is
    /// fetched once, and no SCSI hop is paid.
    Buffered,
    /// O_DIRECT: the cache below allocates on read and the page cache is not filled twice.
    Direct,
}

impl Access {
    /// Reads in flight unless the caller says otherwise. Direct: 1, because bcache drops the
    /// cache inserts of misses that come faster than its allocator frees buckets (UML, a second
    /// pass re-fetched 7 % at 64 KiB x 1, 23 % at x 2, 53 % at 256 KiB x 1). Buffered: 8, for
    /// a prefetch that walks the profile forwards, ahead of the VM (`Tree`'s default): the page
    /// cache paces the misses (a second pass after drop_caches re-fetched 0-1.1 % at 1, 2 and
    /// 4 in flight), and a relay's requests to its parent most likely wait in the parent's
    /// downlink queue behind the parent's own fetches, so a child needs many in flight to fill
    /// its link. The 8-node chain at 15 Mbit/s (link-bound, 2026-12-05, bench/README.md):
    /// forwards x 8 in 54.5 s, the origin sending 1.007 x W; forwards x 2 68.3 s and 1.12 x W
    /// (the VMs caught up with the prefetch and their misses each add the readahead); from the
    /// end x 2 64.3 s and 1.047, x 4 64.9 s and 1.022, x 8 73.9 s (the VMs' reads queued behind
    /// the prefetch's of blocks they need last).
    pub fn default_depth(self) -> usize {
        match self {
            Access::Buffered => 8,
            Access::Direct => 1,
        }
    }

    /// Whether the prefetch walks the profile from its end unless the caller says otherwise:
    /// forwards through the page cache, where a VM's miss of a block the prefetch is fetching
    /// waits for that fetch; from the end with O_DIRECT, where the cache below would send both
    /// misses to the parent.
    pub fn default_reverse(self) -> bool {
        self == Access::Direct
    }
}

/// Read `plan` from `device`, `depth` reads in flight. `stop()` is asked before each read;
/// when it says yes the prefetch ends early (a detach wants the device).
pub fn run(device: &Path, plan: &[(u64, u64)], depth: usize, access: Access, stop: &(dyn Fn() -> bool + Sync)) -> Result<Report> {
    if !(1..=64).contains(&depth) {
        return Err(Error::invalid(format!("invalid prefetch depth {depth}: 1..64")));
    }
    let flags = if access == Access::Direct { libc::O_DIRECT } else { 0 };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(device)
        .map_err(|e| Error::new(Kind::NotFound, format!("prefetch: open {}: {e}", device.display())))?;
    let started = Instant::now();
    let (next, bytes, reads) = (AtomicUsize::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let stopped = AtomicBool::new(false);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let largest = plan.iter().map(|r| r.1).max().unwrap_or(ALIGN) as usize;
    std::thread::scope(|s| {
        for _ in 0..depth.min(plan.len().max(1)) {
            s.spawn(|| {
                let mut buf = AlignedBuf::new(largest);
                loop {
                    if stopped.load(Ordering::Relaxed) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(off, len)) = plan.get(i) else { return };
                    if stop() {
                        stopped.store(true, Ordering::Relaxed);
                        return;
                    }
                    if let Err(e) = read_exact_at(&file, &mut buf.as_mut()[..len as usize], off) {
                        stopped.store(true, Ordering::Relaxed);
                        failure.lock().unwrap().get_or_insert(Error::new(
                            Kind::DeviceMapper,
                            format!("prefetch: read {len} bytes at {off} of {}: {e}", device.display()),
                        ));
                        return;
                    }
                    bytes.fetch_add(len, Ordering::Relaxed);
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap() {
        return Err(e);
    }
    Ok(Report {
        bytes: bytes.into_inner(),
        reads: reads.into_inner(),
        planned_bytes: plan.iter().map(|r| r.1).sum(),
        seconds: started.elapsed().as_secs_f64(),
        complete: !stopped.into_inner(),
    })
}

fn read_exact_at(f: &File, mut buf: &mut [u8], mut off: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match f.read_at(buf, off)? {
            0 => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "end of device")),
            n => {
                buf = &mut buf[n..];
                off += n as u64;
            }
        }
    }
    Ok(())
}

/// A page-aligned buffer (O_DIRECT needs one).
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(ALIGN as usize), ALIGN as usize).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn through_the_page_cache_the_prefetch_runs_ahead_with_eight_reads_direct_from_the_end_with_one() {
        assert_eq!((Access::Buffered.default_reverse(), Access::Buffered.default_depth()), (false, 8));
        assert_eq!((Access::Direct.default_reverse(), Access::Direct.default_depth()), (true, 1));
    }

    #[test]
    fn plan_aligns_dedups_and_merges_in_first_touch_order() {
        // 100..5000 touches blocks 0 and 1; the re-read of block 0 is dropped; 8192.. is adjacent.
        let p = plan(&[(100, 4900), (0, 512), (8192, 4096), (40960, 1)], 1 << 20, 1 << 20, false).unwrap();
        assert_eq!(p, vec![(0, 12288), (40960, 4096)]);
    }

    #[test]
    fn plan_keeps_order_of_first_touch_not_of_offsets() {
        let p = plan(&[(65536, 4096), (0, 4096)], 1 << 20, 1 << 20, false).unwrap();
        assert_eq!(p, vec![(65536, 4096), (0, 4096)]);
        let r = plan(&[(65536, 4096), (0, 4096)], 1 << 20, 1 << 20, true).unwrap();
        assert_eq!(r, vec![(0, 4096), (65536, 4096)]);
    }

    #[test]
    fn plan_splits_at_chunk_size() {
        let p = plan(&[(0, 40960)], 1 << 20, 16384, false).unwrap();
        assert_eq!(p, vec![(0, 16384), (16384, 16384), (32768, 8192)]);
        assert_eq!(p.iter().map(|r| r.1).sum::<u64>(), 40960);
    }

    #[test]
    fn plan_clips_the_last_block_to_the_image() {
        // 10240 bytes: the last 4 KiB block has 2 KiB (images are whole sectors).
        let p = plan(&[(8000, 1000)], 10240, 4096, false).unwrap();
        assert_eq!(p, vec![(4096, 4096), (8192, 2048)]);
        let p = plan(&[(8000, 1000)], 10240, 8192, false).unwrap();
        assert_eq!(p, vec![(4096, 6144)]);
    }

    #[test]
    fn plan_names_the_bad_range() {
        let e = plan(&[(0, 4096), (9000, 2000)], 10000, 4096, false).unwrap_err();
        assert_eq!(e.kind, Kind::InvalidArgument);
        assert!(e.message.contains("#1") && e.message.contains("offset 9000"), "{}", e.message);
        assert!(plan(&[(0, 0)], 10000, 4096, false).is_err());
        assert!(plan(&[(u64::MAX, 2)], 10000, 4096, false).is_err());
        assert!(plan(&[], 10000, 1000, false).unwrap_err().message.contains("chunk"));
    }

    #[test]
    fn run_reads_every_planned_byte_and_stops_when_asked() {
        // target/, not /tmp: tmpfs refuses O_DIRECT.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join(format!("prefetch-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("img");
        std::fs::write(&f, vec![7u8; 1 << 20]).unwrap();
        let p = plan(&[(0, 1 << 20)], 1 << 20, 65536, true).unwrap();
        for access in [Access::Direct, Access::Buffered] {
            let r = run(&f, &p, 4, access, &|| false).unwrap();
            assert_eq!((r.bytes, r.reads, r.planned_bytes, r.complete), (1 << 20, 16, 1 << 20, true), "{access:?}");
        }
        let r = run(&f, &p, 2, Access::Direct, &|| true).unwrap();
        assert_eq!((r.bytes, r.complete), (0, false));
        let e = run(&dir.join("missing"), &p, 2, Access::Buffered, &|| false).unwrap_err();
        assert!(e.message.contains("missing"), "{}", e.message);
        assert!(run(&f, &p, 0, Access::Direct, &|| false).unwrap_err().message.contains("depth"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
