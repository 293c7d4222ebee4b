//! Who reads from whom: the relay tree built by `placement` exactly as joining nodes build
//! it (one claim at a time under the image's lock: choose, commit, ready), or the other
//! shapes. Index 0 is the origin; compute nodes are 1..=N, named `cn1`..`cnN`.

use std::cell::RefCell;
use std::sync::Arc;

use crate::placement::{self, Newcomer, ParentRef, Peer, Policy};

use super::params::{Params, Shape, SimError};

pub const ORIGIN: usize = 0;

#[derive(Debug, Clone)]
pub struct Topology {
    /// Per node, per stripe: its paths in failover order (primary first, the origin last).
    pub paths: Vec<Vec<Vec<usize>>>,
    /// Per node: depth in its primary tree (stripe 0 for a striped shape); origin 0.
    pub depth: Vec<u32>,
    /// Claim order (compute nodes), the order their joins went through the lock.
    pub order: Vec<usize>,
    pub stripes: usize,
}

pub fn host(i: usize) -> String {
    format!("cn{i}")
}

fn place(err: placement::PlacementError) -> SimError {
    SimError::Placement { message: err.to_string() }
}

fn to_index(p: &ParentRef) -> usize {
    match p {
        ParentRef::Origin => ORIGIN,
        ParentRef::Peer(h) => h[2..].parse().expect("simulated hosts are cnN"),
    }
}

/// Joins `hosts` one after another into `peers`; those in `ready` become parents for later
/// joiners, the others stay `Joining` (they hold their slots but are never chosen).
fn join_all(peers: &mut Vec<Peer>, hosts: &[usize], policy: &Policy, ready: bool, paths: &mut [Vec<usize>]) -> Result<(), SimError> {
    for &h in hosts {
        let nc = Newcomer::new(host(h), None);
        let pl = placement::choose_parents(&nc, peers, policy).map_err(place)?;
        placement::commit_choice(peers, &nc, &pl, policy).map_err(place)?;
        if ready {
            placement::mark_ready(peers, &nc.host);
        }
        paths[h] = pl.parents.iter().map(to_index).collect();
    }
    Ok(())
}

fn depths(paths: &[Vec<usize>]) -> Vec<u32> {
    // Parents join before their children, so one pass in index order does not suffice for
    // arbitrary orders: follow primaries (a tree, so it ends at the origin).
    (0..paths.len())
        .map(|i| {
            let (mut d, mut j) = (0u32, i);
            while j != ORIGIN {
                j = paths[j][0];
                d += 1;
            }
            d
        })
        .collect()
}

/// What a placed topology depends on: nodes, shape, fan-out, parents per node.
type PlaceKey = (usize, Shape, u32, u32);

thread_local! {
    /// The last few placed topologies (per thread). Placing N nodes costs O(N^2) (each join
    /// reads every peer, as a real claim does): 10,000 nodes take 20 s for a tree and 70 s
    /// for 3 stripes on this 2-core host, and a study simulates several storms over one tree.
    static PLACED: RefCell<Vec<(PlaceKey, Arc<Topology>)>> = const { RefCell::new(Vec::new()) };
}
const PLACED_KEPT: usize = 4;

/// [`build`], reusing a topology this thread placed earlier for the same key.
pub fn build_cached(p: &Params) -> Result<Arc<Topology>, SimError> {
    let key = (p.nodes, p.shape, p.fanout, p.max_parents);
    if let Some(t) = PLACED.with_borrow(|v| v.iter().find(|(k, _)| *k == key).map(|(_, t)| t.clone())) {
        return Ok(t);
    }
    let t = Arc::new(build(p)?);
    PLACED.with_borrow_mut(|v| {
        if v.len() >= PLACED_KEPT {
            v.remove(0);
        }
        v.push((key, t.clone()));
    });
    Ok(t)
}

pub fn build(p: &Params) -> Result<Topology, SimError> {
    let n = p.nodes;
    let order: Vec<usize> = (1..=n).collect();
    let mut paths: Vec<Vec<Vec<usize>>> = vec![Vec::new(); n + 1];
    let stripes;
    match p.shape {
        Shape::Direct | Shape::FullCopy => {
            stripes = 1;
            for i in 1..=n {
                paths[i] = vec![vec![ORIGIN]];
            }
        }
        Shape::Tree | Shape::Chain => {
            stripes = 1;
            let k = if p.shape == Shape::Chain { 1 } else { p.fanout };
            let policy = Policy { fanout: k, max_parents: p.max_parents, origin_fanout: k, secondary_fanout: k };
            let mut one: Vec<Vec<usize>> = vec![Vec::new(); n + 1];
            let mut peers = Vec::with_capacity(n);
            join_all(&mut peers, &order, &policy, true, &mut one)?;
            for i in 1..=n {
                paths[i] = vec![std::mem::take(&mut one[i])];
            }
        }
        Shape::Striped => {
            let k = p.fanout as usize;
            stripes = k;
            // The origin sends each stripe once (to its stripe's root), so W in all.
            let policy = Policy { fanout: p.fanout, max_parents: p.max_parents, origin_fanout: 1, secondary_fanout: p.fanout };
            for i in 1..=n {
                paths[i] = vec![Vec::new(); k];
            }
            for s in 0..k {
                // Interior in stripe s: the nodes i with i % k == s; they join first (ready),
                // then every other node joins as a leaf of stripe s.
                let (interior, leaves): (Vec<usize>, Vec<usize>) = order.iter().partition(|&&i| i % k == s);
                let mut one: Vec<Vec<usize>> = vec![Vec::new(); n + 1];
                let mut peers = Vec::with_capacity(n);
                join_all(&mut peers, &interior, &policy, true, &mut one)?;
                join_all(&mut peers, &leaves, &policy, false, &mut one)?;
                for i in 1..=n {
                    paths[i][s] = std::mem::take(&mut one[i]);
                }
            }
        }
    }
    let primary: Vec<Vec<usize>> = paths.iter().map(|s| s.first().cloned().unwrap_or_default()).collect();
    let mut depth = vec![0u32; n + 1];
    if n > 0 {
        depth = depths(&primary.iter().map(|v| if v.is_empty() { vec![ORIGIN] } else { v.clone() }).collect::<Vec<_>>());
    }
    Ok(Topology { paths, depth, order, stripes })
}

impl Topology {
    /// Every node's depth in stripe `s`'s tree (origin 0).
    pub fn depth_in(&self, s: usize) -> Vec<u32> {
        depths(&self.paths.iter().map(|p| vec![p.get(s).map_or(ORIGIN, |v| v[0])]).collect::<Vec<_>>())
    }

    /// The deepest node's depth over all stripes.
    pub fn max_depth(&self) -> u32 {
        (0..self.stripes).flat_map(|s| self.depth_in(s)).max().unwrap_or(0)
    }

    /// Every node's primary parent per stripe.
    pub fn primaries(&self, node: usize) -> Vec<usize> {
        self.paths[node].iter().map(|p| p[0]).collect()
    }

    /// Children (by primary link, any stripe) of every node.
    pub fn children(&self) -> Vec<Vec<usize>> {
        let mut kids = vec![Vec::new(); self.paths.len()];
        for i in 1..self.paths.len() {
            let mut ps = self.primaries(i);
            ps.dedup();
            for p in ps {
                kids[p].push(i);
            }
        }
        kids
    }

    /// Every node below `node` in any stripe's tree (each stripe's tree followed on its own:
    /// striped nodes may be each other's parents in different stripes).
    pub fn subtree(&self, node: usize) -> Vec<usize> {
        let n = self.paths.len();
        let mut inside = vec![false; n];
        let mut out = Vec::new();
        for s in 0..self.stripes {
            let mut kids = vec![Vec::new(); n];
            for c in 1..n {
                kids[self.paths[c][s][0]].push(c);
            }
            let mut stack = vec![node];
            while let Some(x) = stack.pop() {
                for &c in &kids[x] {
                    stack.push(c);
                    if !inside[c] {
                        inside[c] = true;
                        out.push(c);
                    }
                }
            }
        }
        out
    }

    /// The depth-1 relay with the most descendants (in stripe 0): the worst single failure.
    pub fn busiest_relay(&self) -> Option<usize> {
        let kids = self.children();
        let mut best: Option<(usize, usize)> = None;
        for &top in &kids[ORIGIN] {
            let mut count = 0usize;
            let mut stack = vec![top];
            while let Some(x) = stack.pop() {
                for &c in &kids[x] {
                    if self.paths[c][0][0] == x {
                        count += 1;
                        stack.push(c);
                    }
                }
            }
            if count > 0 && best.map_or(true, |(_, c)| count > c) {
                best = Some((top, count));
            }
        }
        best.map(|(n, _)| n)
    }
}
