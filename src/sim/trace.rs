//! A boot trace as the simulator replays it: the working set in first-read order, cut into
//! chunks. Re-reads hit the reader's cache, so only first reads move data through a relay;
//! a VM reading the origin directly (no cache) also re-reads, which `direct_amplification`
//! carries (every read widened to 4 KiB, re-reads included, over the working set).

use std::collections::HashSet;

use serde_json::Value;

use super::params::SimError;

const PAGE: u64 = 4096;

#[derive(Debug, Clone, PartialEq)]
pub struct Chunks {
    /// Bytes of each chunk, in first-read order.
    pub sizes: Vec<u64>,
    pub working_set_bytes: u64,
    pub image_bytes: u64,
    /// Bytes a VM without cache reads per working-set byte.
    pub direct_amplification: f64,
}

/// Reads `[[t, offset, length], ...]` (the `reads` of a trace file, as
/// bench/traces/record_boot_trace.sh writes it) into chunks of about `chunk_bytes`.
pub fn chunk_reads(reads: &[(u64, u64)], image_bytes: u64, chunk_bytes: u64) -> Chunks {
    let mut seen: HashSet<u64> = HashSet::new();
    let mut sizes = Vec::new();
    let mut acc = 0u64;
    let mut widened = 0u64;
    for &(off, len) in reads {
        if len == 0 {
            continue;
        }
        let first = off / PAGE;
        let last = (off + len).div_ceil(PAGE);
        widened += (last - first) * PAGE;
        for page in first..last {
            if seen.insert(page) {
                acc += PAGE;
                if acc >= chunk_bytes {
                    sizes.push(acc);
                    acc = 0;
                }
            }
        }
    }
    if acc > 0 {
        sizes.push(acc);
    }
    let ws: u64 = sizes.iter().sum();
    Chunks {
        sizes,
        working_set_bytes: ws,
        image_bytes: image_bytes.max(ws),
        direct_amplification: if ws > 0 { widened as f64 / ws as f64 } else { 1.0 },
    }
}

/// A working set of `ws` bytes read once, in order (no trace given).
pub fn uniform(ws: u64, image_bytes: u64, chunk_bytes: u64) -> Chunks {
    let mut sizes = vec![chunk_bytes; (ws / chunk_bytes) as usize];
    if ws % chunk_bytes > 0 {
        sizes.push(ws % chunk_bytes);
    }
    Chunks { sizes, working_set_bytes: ws, image_bytes: image_bytes.max(ws), direct_amplification: 1.0 }
}

impl Chunks {
    /// The same access pattern over a working set of `ws` bytes.
    pub fn scaled(&self, ws: u64, chunk_bytes: u64) -> Chunks {
        let factor = ws as f64 / self.working_set_bytes.max(1) as f64;
        if (factor - 1.0).abs() < 1e-9 {
            return self.clone();
        }
        // Scaling each chunk keeps the order; re-cut so chunks stay about chunk_bytes.
        let total = (self.working_set_bytes as f64 * factor).round() as u64;
        let image = ((self.image_bytes as f64) * factor.max(1.0)) as u64;
        let mut out = uniform(total, image, chunk_bytes);
        out.direct_amplification = self.direct_amplification;
        out
    }

    /// The image cut into chunks: what a full copy moves.
    pub fn image_chunks(&self, chunk_bytes: u64) -> Vec<u64> {
        uniform(self.image_bytes, self.image_bytes, chunk_bytes).sizes
    }
}

/// Loads a trace file: `{"image_bytes": n, "reads": [[t, offset, length], ...]}`.
pub fn load(path: &str, chunk_bytes: u64) -> Result<Chunks, SimError> {
    let err = |message: String| SimError::Trace { path: path.to_owned(), message };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let doc: Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let image_bytes = doc.get("image_bytes").and_then(Value::as_u64).ok_or_else(|| err("no image_bytes".into()))?;
    let reads = doc.get("reads").and_then(Value::as_array).ok_or_else(|| err("no reads list".into()))?;
    let mut out = Vec::with_capacity(reads.len());
    for (i, r) in reads.iter().enumerate() {
        let pair = r.as_array().and_then(|a| Some((a.get(1)?.as_u64()?, a.get(2)?.as_u64()?)));
        out.push(pair.ok_or_else(|| err(format!("reads[{i}] is not [t, offset, length]: {r}")))?);
    }
    let chunks = chunk_reads(&out, image_bytes, chunk_bytes);
    if chunks.sizes.is_empty() {
        return Err(err("the trace reads nothing".into()));
    }
    Ok(chunks)
}
