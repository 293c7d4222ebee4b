//! The node model and the event loop. A node caches on read and coalesces misses: a chunk
//! is fetched from the parent once, whoever asked (its VMs, its prefetch, its children);
//! later askers wait for that fetch. A chunk reaches the child one hop latency after its last
//! byte left the parent. VMs read their chunks in trace order, a few ahead (their requests in
//! flight), each at the local read rate once present; the prefetch walks the boot profile
//! ahead of the VMs (or from its end: `prefetch_reverse`), as `Node.prefetch` does. A dead
//! relay's children move to their next path after the failover time and ask it again for what
//! the dead relay still owed them.

use std::collections::HashMap;

use super::events::{Event, Queue};
use super::network::Network;
use super::topology::{Topology, ORIGIN};

const ABSENT: u8 = 0;
const IN_FLIGHT: u8 = 1;
const PRESENT: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiter {
    Local,
    Prefetch,
    Child(usize),
}

/// What the engine needs per simulated node, decided by `run.rs`.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub attach_s: f64,
    pub prefetch: bool,
    pub prefetch_reverse: bool,
    /// VMs start only once every chunk is here (a full copy).
    pub wait_for_all: bool,
    /// Bytes/s its requests in flight allow over one hop.
    pub latency_cap: f64,
    /// Bytes on its incoming edges per chunk byte.
    pub amp: f64,
}

struct NodeState {
    have: Vec<u8>,
    missing: usize,
    waiters: HashMap<u32, Vec<Waiter>>,
    /// Per stripe: index into the topology's path list in use.
    path_pos: Vec<usize>,
    failed: bool,
    attached: bool,
    pf_pos: usize,
    pf_out: u32,
    vms: Vec<usize>,
}

pub struct Vm {
    pub node: usize,
    pos: usize,
    busy: bool,
    pub done_s: Option<f64>,
    pub failed: bool,
}

/// When a relay dies (see `Failure`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FailWhen {
    At(f64),
    /// Once its children hold this share of the chunks they fetch through it.
    ChildrenHave(f64),
}

/// A relay whose children's arrivals are counted until it dies.
struct Watch {
    relay: usize,
    /// Per node: the stripes it fetches through the relay (empty: not a child).
    stripes: Vec<Vec<bool>>,
    target: usize,
    got: usize,
}

pub struct Engine<'a> {
    topo: &'a Topology,
    specs: Vec<NodeSpec>,
    nodes: Vec<NodeState>,
    pub vms: Vec<Vm>,
    pub net: Network,
    sizes: Vec<f64>,
    q: Queue,
    now: f64,
    vm_lookahead: usize,
    pf_lookahead: u32,
    hop_s: f64,
    consume_scale: f64,
    local_bps: f64,
    failover_s: f64,
    pub events: u64,
    vms_left: usize,
    watch: Option<Watch>,
    /// When the relay died, and the chunk bytes its children still lacked then.
    pub failed_at: Option<f64>,
    pub owed_bytes: f64,
}

pub struct EngineConfig {
    pub sizes: Vec<f64>,
    pub vm_nodes: Vec<usize>,
    pub vm_lookahead: usize,
    pub pf_lookahead: u32,
    pub hop_s: f64,
    /// Seconds of local reading per chunk byte is `consume_scale / local_bps`.
    pub consume_scale: f64,
    pub local_bps: f64,
    pub failover_s: f64,
}

impl<'a> Engine<'a> {
    pub fn new(topo: &'a Topology, specs: Vec<NodeSpec>, net: Network, cfg: EngineConfig) -> Self {
        let k = cfg.sizes.len();
        let mut nodes: Vec<NodeState> = (0..specs.len())
            .map(|i| NodeState {
                have: vec![if i == ORIGIN { PRESENT } else { ABSENT }; k],
                missing: if i == ORIGIN { 0 } else { k },
                waiters: HashMap::new(),
                path_pos: vec![0; topo.stripes],
                failed: false,
                attached: i == ORIGIN,
                pf_pos: 0,
                pf_out: 0,
                vms: Vec::new(),
            })
            .collect();
        let vms: Vec<Vm> = cfg
            .vm_nodes
            .iter()
            .enumerate()
            .map(|(v, &n)| {
                nodes[n].vms.push(v);
                Vm { node: n, pos: 0, busy: false, done_s: None, failed: false }
            })
            .collect();
        let mut q = Queue::new();
        for (i, s) in specs.iter().enumerate().skip(1) {
            q.push(s.attach_s, Event::Attach { node: i });
        }
        let vms_left = vms.len();
        Engine {
            vms_left,
            topo,
            specs,
            nodes,
            vms,
            net,
            sizes: cfg.sizes,
            q,
            now: 0.0,
            vm_lookahead: cfg.vm_lookahead.max(1),
            pf_lookahead: cfg.pf_lookahead.max(1),
            hop_s: cfg.hop_s,
            consume_scale: cfg.consume_scale,
            local_bps: cfg.local_bps,
            failover_s: cfg.failover_s,
            events: 0,
            watch: None,
            failed_at: None,
            owed_bytes: 0.0,
        }
    }

    pub fn schedule_failure(&mut self, node: usize, when: FailWhen) {
        match when {
            FailWhen::At(t) => self.q.push(t, Event::Fail { node }),
            FailWhen::ChildrenHave(share) => {
                let n = self.nodes.len();
                let mut stripes = vec![Vec::new(); n];
                let mut total = 0usize;
                for (c, st) in stripes.iter_mut().enumerate().skip(1) {
                    let mask: Vec<bool> = (0..self.topo.stripes).map(|s| self.topo.paths[c][s][0] == node).collect();
                    if mask.iter().any(|&m| m) {
                        total += (0..self.sizes.len()).filter(|&ch| mask[ch % self.topo.stripes]).count();
                        *st = mask;
                    }
                }
                let target = ((share * total as f64).ceil() as usize).max(1);
                if total > 0 {
                    self.watch = Some(Watch { relay: node, stripes, target, got: 0 });
                }
            }
        }
    }

    /// Runs until every VM is done (or failed) or `max_time` passes. Returns the end time.
    pub fn run(&mut self, max_time: f64) -> f64 {
        while let Some((t, ev)) = self.q.pop() {
            if t > max_time {
                break;
            }
            self.now = t;
            self.events += 1;
            match ev {
                Event::EdgeDone { edge, version } => {
                    if let Some((to, chunk)) = self.net.done(edge, version, t, &mut self.q) {
                        self.q.push(t + self.hop_s, Event::Arrive { node: to, chunk });
                    }
                }
                Event::Arrive { node, chunk } => self.arrive(node, chunk),
                Event::VmStep { vm } => self.vm_step(vm),
                Event::Attach { node } => self.attach(node),
                Event::Fail { node } => self.fail(node),
                Event::Failover { node, dead } => self.failover(node, dead),
            }
            if self.vms_left == 0 {
                break;
            }
        }
        self.now
    }

    fn parent_for(&self, node: usize, chunk: u32) -> usize {
        let s = chunk as usize % self.topo.stripes;
        self.topo.paths[node][s][self.nodes[node].path_pos[s]]
    }

    /// `w` at `node` asks for `chunk`: served from the cache, added to the fetch in flight, or
    /// fetched from the parent (which may in turn have to fetch it).
    fn want(&mut self, node: usize, chunk: u32, w: Waiter) {
        let (mut cur, mut w) = (node, w);
        loop {
            let st = &mut self.nodes[cur];
            if st.failed {
                return;
            }
            match st.have[chunk as usize] {
                PRESENT => {
                    if let Waiter::Child(e) = w {
                        self.net.enqueue(e, chunk, self.now, &mut self.q);
                    }
                    return;
                }
                IN_FLIGHT => {
                    st.waiters.entry(chunk).or_default().push(w);
                    return;
                }
                _ => {
                    st.have[chunk as usize] = IN_FLIGHT;
                    st.waiters.entry(chunk).or_default().push(w);
                    let p = self.parent_for(cur, chunk);
                    if self.nodes[p].failed {
                        return; // asked again at failover
                    }
                    let spec = &self.specs[cur];
                    let e = self.net.edge(p, cur, spec.latency_cap, spec.amp);
                    w = Waiter::Child(e);
                    cur = p;
                }
            }
        }
    }

    fn arrive(&mut self, node: usize, chunk: u32) {
        let st = &mut self.nodes[node];
        if st.failed || st.have[chunk as usize] == PRESENT {
            return;
        }
        st.have[chunk as usize] = PRESENT;
        st.missing -= 1;
        if let Some(w) = self.watch.as_mut() {
            if w.stripes[node].get(chunk as usize % self.topo.stripes) == Some(&true) {
                w.got += 1;
                if w.got == w.target {
                    self.q.push(self.now, Event::Fail { node: w.relay });
                }
            }
        }
        let st = &mut self.nodes[node];
        let waiters = st.waiters.remove(&chunk).unwrap_or_default();
        let mut pf = false;
        for w in waiters {
            match w {
                Waiter::Child(e) => self.net.enqueue(e, chunk, self.now, &mut self.q),
                Waiter::Prefetch => {
                    self.nodes[node].pf_out -= 1;
                    pf = true;
                }
                Waiter::Local => {}
            }
        }
        if pf {
            self.pump_prefetch(node);
        }
        let all = self.nodes[node].missing == 0;
        if !self.specs[node].wait_for_all || all {
            for v in self.nodes[node].vms.clone() {
                self.vm_try(v);
            }
        }
    }

    fn attach(&mut self, node: usize) {
        if self.nodes[node].failed {
            return;
        }
        self.nodes[node].attached = true;
        if self.specs[node].prefetch {
            self.pump_prefetch(node);
        }
        for v in self.nodes[node].vms.clone() {
            self.vm_try(v);
        }
    }

    fn pump_prefetch(&mut self, node: usize) {
        let k = self.sizes.len();
        while self.nodes[node].pf_out < self.pf_lookahead && self.nodes[node].pf_pos < k {
            let st = &mut self.nodes[node];
            let i = st.pf_pos;
            st.pf_pos += 1;
            let c = if self.specs[node].prefetch_reverse { k - 1 - i } else { i } as u32;
            if st.have[c as usize] == ABSENT {
                st.pf_out += 1;
                self.want(node, c, Waiter::Prefetch);
            }
        }
    }

    fn vm_try(&mut self, v: usize) {
        let vm = &self.vms[v];
        let node = vm.node;
        if vm.busy || vm.failed || vm.done_s.is_some() || !self.nodes[node].attached {
            return;
        }
        if self.specs[node].wait_for_all && self.nodes[node].missing > 0 {
            return;
        }
        let pos = vm.pos;
        let end = (pos + self.vm_lookahead).min(self.sizes.len());
        for c in pos..end {
            if self.nodes[node].have[c] == ABSENT {
                self.want(node, c as u32, Waiter::Local);
            }
        }
        if self.nodes[node].have[pos] == PRESENT {
            self.vms[v].busy = true;
            let dt = self.sizes[pos] * self.consume_scale / self.local_bps;
            self.q.push(self.now + dt, Event::VmStep { vm: v });
        }
    }

    fn vm_step(&mut self, v: usize) {
        let vm = &mut self.vms[v];
        if vm.failed {
            return;
        }
        vm.busy = false;
        vm.pos += 1;
        if vm.pos == self.sizes.len() {
            vm.done_s = Some(self.now);
            self.vms_left -= 1;
        } else {
            self.vm_try(v);
        }
    }

    fn fail(&mut self, node: usize) {
        if node == ORIGIN || self.nodes[node].failed {
            return;
        }
        self.failed_at = Some(self.now);
        let st = &mut self.nodes[node];
        st.failed = true;
        st.waiters.clear();
        for v in st.vms.clone() {
            if self.vms[v].done_s.is_none() {
                self.vms[v].failed = true;
                self.vms_left -= 1;
            }
        }
        self.net.kill(node, self.now, &mut self.q);
        for c in 1..self.nodes.len() {
            if self.nodes[c].failed {
                continue;
            }
            let through: Vec<bool> = (0..self.topo.stripes).map(|s| self.topo.paths[c][s][self.nodes[c].path_pos[s]] == node).collect();
            if through.iter().any(|&t| t) {
                let have = &self.nodes[c].have;
                self.owed_bytes += (0..self.sizes.len())
                    .filter(|&ch| through[ch % self.topo.stripes] && have[ch] != PRESENT)
                    .map(|ch| self.sizes[ch])
                    .sum::<f64>();
                self.q.push(self.now + self.failover_s, Event::Failover { node: c, dead: node });
            }
        }
    }

    fn failover(&mut self, node: usize, dead: usize) {
        if self.nodes[node].failed {
            return;
        }
        let mut moved = vec![false; self.topo.stripes];
        for (s, m) in moved.iter_mut().enumerate() {
            let paths = &self.topo.paths[node][s];
            let mut pos = self.nodes[node].path_pos[s];
            if paths[pos] != dead {
                continue;
            }
            // The origin is always the last path and never fails.
            while pos + 1 < paths.len() && self.nodes[paths[pos]].failed {
                pos += 1;
            }
            self.nodes[node].path_pos[s] = pos;
            *m = true;
        }
        // Everything still owed on the dead path is asked of the new one.
        let owed: Vec<u32> = (0..self.sizes.len() as u32)
            .filter(|&c| self.nodes[node].have[c as usize] == IN_FLIGHT && moved[c as usize % self.topo.stripes])
            .collect();
        for c in owed {
            let p = self.parent_for(node, c);
            let spec = &self.specs[node];
            let e = self.net.edge(p, node, spec.latency_cap, spec.amp);
            self.want(p, c, Waiter::Child(e));
        }
    }

    pub fn now(&self) -> f64 {
        self.now
    }
}
