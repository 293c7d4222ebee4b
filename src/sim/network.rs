//! The links: every host has an uplink and a downlink (bytes/s of data, after headers); a
//! flow is one parent -> child edge, which sends the chunks its child asked for, one at a time,
//! as they reach the parent. A sender's uplink is shared max-min fairly between its active
//! edges (`fairshare::waterfill`), each capped by its receiver's downlink divided between the
//! receiver's active incoming edges, and by its requests in flight over the hop's latency.
//! The core network is non-blocking: only the hosts' own links limit.

use std::collections::{HashMap, VecDeque};

use super::events::{Event, Queue};
use super::fairshare::waterfill;

#[derive(Debug, Clone)]
pub struct Edge {
    pub from: usize,
    pub to: usize,
    ready: VecDeque<u32>,
    head: Option<(u32, f64)>,
    rate: f64,
    last_t: f64,
    version: u64,
    /// Data bytes sent so far.
    pub sent: f64,
    pub alive: bool,
    active: bool,
    /// Bytes per second the receiver's requests in flight allow over this hop.
    latency_cap: f64,
    /// Bytes on this edge per byte of chunk.
    amp: f64,
}

#[derive(Debug)]
pub struct Network {
    pub edges: Vec<Edge>,
    index: HashMap<(usize, usize), usize>,
    active_out: Vec<Vec<usize>>,
    active_in: Vec<Vec<usize>>,
    up: Vec<f64>,
    down: Vec<f64>,
    /// Host of each simulated node (several readers may share one host's links).
    host_of: Vec<usize>,
    sizes: Vec<f64>,
}

impl Network {
    /// `up`/`down` per host; `host_of` per node; `sizes` per chunk.
    pub fn new(up: Vec<f64>, down: Vec<f64>, host_of: Vec<usize>, sizes: Vec<f64>) -> Self {
        let hosts = up.len();
        Network {
            edges: Vec::new(),
            index: HashMap::new(),
            active_out: vec![Vec::new(); host_of.len()],
            active_in: vec![Vec::new(); hosts],
            up,
            down,
            host_of,
            sizes,
        }
    }

    /// The edge `from -> to`, created on first use.
    pub fn edge(&mut self, from: usize, to: usize, latency_cap: f64, amp: f64) -> usize {
        if let Some(&e) = self.index.get(&(from, to)) {
            return e;
        }
        let e = self.edges.len();
        self.edges.push(Edge {
            from,
            to,
            ready: VecDeque::new(),
            head: None,
            rate: 0.0,
            last_t: 0.0,
            version: 0,
            sent: 0.0,
            alive: true,
            active: false,
            latency_cap,
            amp,
        });
        self.index.insert((from, to), e);
        e
    }

    /// The parent has `chunk` and the child asked for it: queue it on the edge.
    pub fn enqueue(&mut self, e: usize, chunk: u32, now: f64, q: &mut Queue) {
        if !self.edges[e].alive {
            return;
        }
        if self.edges[e].active {
            self.edges[e].ready.push_back(chunk);
            return;
        }
        let bytes = self.sizes[chunk as usize] * self.edges[e].amp;
        let edge = &mut self.edges[e];
        edge.head = Some((chunk, bytes));
        edge.active = true;
        edge.rate = 0.0;
        edge.last_t = now;
        let (from, host) = (edge.from, self.host_of[edge.to]);
        self.active_out[from].push(e);
        self.active_in[host].push(e);
        self.reshare_around(from, host, now, q);
    }

    /// An `EdgeDone` event: returns `(child, chunk)` if the chunk crossed (not stale).
    pub fn done(&mut self, e: usize, version: u64, now: f64, q: &mut Queue) -> Option<(usize, u32)> {
        let edge = &mut self.edges[e];
        if !edge.alive || !edge.active || edge.version != version {
            return None;
        }
        let dt = now - edge.last_t;
        edge.sent += edge.rate * dt;
        edge.last_t = now;
        let (chunk, _) = edge.head.take().expect("an active edge has a head chunk");
        let to = edge.to;
        match edge.ready.pop_front() {
            Some(next) => {
                let bytes = self.sizes[next as usize] * edge.amp;
                edge.head = Some((next, bytes));
                edge.version += 1;
                if edge.rate > 0.0 {
                    q.push(now + bytes / edge.rate, Event::EdgeDone { edge: e, version: edge.version });
                }
            }
            None => self.deactivate(e, now, q),
        }
        Some((to, chunk))
    }

    fn deactivate(&mut self, e: usize, now: f64, q: &mut Queue) {
        let edge = &mut self.edges[e];
        edge.active = false;
        edge.rate = 0.0;
        edge.head = None;
        edge.ready.clear();
        edge.version += 1;
        let (from, host) = (edge.from, self.host_of[edge.to]);
        self.active_out[from].retain(|&x| x != e);
        self.active_in[host].retain(|&x| x != e);
        self.reshare_around(from, host, now, q);
    }

    /// A dead node's edges, both ways, stop; what they carried is lost.
    pub fn kill(&mut self, node: usize, now: f64, q: &mut Queue) {
        let ids: Vec<usize> =
            (0..self.edges.len()).filter(|&e| self.edges[e].alive && (self.edges[e].from == node || self.edges[e].to == node)).collect();
        for e in ids {
            self.advance(e, now);
            if self.edges[e].active {
                self.deactivate(e, now, q);
            }
            self.edges[e].alive = false;
        }
    }

    fn advance(&mut self, e: usize, now: f64) {
        let edge = &mut self.edges[e];
        if !edge.active {
            return; // an idle edge moves nothing, whatever rate it last had
        }
        let moved = edge.rate * (now - edge.last_t);
        edge.sent += moved;
        if let Some((_, rem)) = edge.head.as_mut() {
            *rem = (*rem - moved).max(0.0);
        }
        edge.last_t = now;
    }

    /// The sender's edges and every sender into `host` get new rates.
    fn reshare_around(&mut self, sender: usize, host: usize, now: f64, q: &mut Queue) {
        self.reshare(sender, now, q);
        let mut others: Vec<usize> = self.active_in[host].iter().map(|&e| self.edges[e].from).collect();
        others.sort_unstable();
        others.dedup();
        for s in others {
            if s != sender {
                self.reshare(s, now, q);
            }
        }
    }

    fn reshare(&mut self, sender: usize, now: f64, q: &mut Queue) {
        let ids = self.active_out[sender].clone();
        if ids.is_empty() {
            return;
        }
        let caps: Vec<f64> = ids
            .iter()
            .map(|&e| {
                self.advance(e, now);
                let h = self.host_of[self.edges[e].to];
                let down = self.down[h] / self.active_in[h].len().max(1) as f64;
                down.min(self.edges[e].latency_cap)
            })
            .collect();
        let rates = waterfill(self.up[self.host_of[sender]], &caps);
        for (&e, r) in ids.iter().zip(rates) {
            let edge = &mut self.edges[e];
            edge.rate = r;
            edge.version += 1;
            let rem = edge.head.map_or(0.0, |(_, b)| b);
            if r > 0.0 {
                q.push(now + rem / r, Event::EdgeDone { edge: e, version: edge.version });
            }
        }
    }

    /// The current rate of edge `from -> to` (0 if idle or absent).
    pub fn rate(&self, from: usize, to: usize) -> f64 {
        self.index.get(&(from, to)).map_or(0.0, |&e| if self.edges[e].active { self.edges[e].rate } else { 0.0 })
    }
}
