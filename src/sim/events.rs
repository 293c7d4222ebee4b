//! The event queue: earliest time first, and events at the same time in the order they were
//! scheduled, so a run is deterministic.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The head chunk of an edge finished crossing it (stale if `version` moved on).
    EdgeDone { edge: usize, version: u64 },
    /// A chunk is in `node`'s cache.
    Arrive { node: usize, chunk: u32 },
    /// A VM finished reading its current chunk.
    VmStep { vm: usize },
    /// A node's template is built and its parents followed: its VMs and prefetch start.
    Attach { node: usize },
    /// A relay dies.
    Fail { node: usize },
    /// A child of a dead relay moves its reads to its next path.
    Failover { node: usize, dead: usize },
}

#[derive(Debug)]
struct Entry {
    t: f64,
    seq: u64,
    ev: Event,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    // BinaryHeap is a max-heap: reverse, so the smallest (t, seq) pops first.
    fn cmp(&self, o: &Self) -> Ordering {
        o.t.total_cmp(&self.t).then_with(|| o.seq.cmp(&self.seq))
    }
}

#[derive(Debug, Default)]
pub struct Queue {
    heap: BinaryHeap<Entry>,
    seq: u64,
}

impl Queue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Schedules `ev` at `t` (not before `now`: the caller passes times >= now).
    pub fn push(&mut self, t: f64, ev: Event) {
        self.seq += 1;
        self.heap.push(Entry { t, seq: self.seq, ev });
    }

    pub fn pop(&mut self) -> Option<(f64, Event)> {
        self.heap.pop().map(|e| (e.t, e.ev))
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}
