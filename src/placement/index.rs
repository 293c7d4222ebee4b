//! The peers as choosing and validating read them: checked, with derived child counts and
//! child links (see "Children counts" in the `placement` module docs).

use std::collections::{HashMap, HashSet, VecDeque};

use super::{JoinState, Newcomer, Peer, PlacementError, ORIGIN};

pub(super) fn validate_newcomer(newcomer: &Newcomer) -> Result<(), PlacementError> {
    if newcomer.host.is_empty() {
        return Err(PlacementError::EmptyHost { what: "newcomer.host".into() });
    }
    if newcomer.host == ORIGIN {
        return Err(PlacementError::ReservedHost { host: newcomer.host.clone() });
    }
    Ok(())
}

/// 0: known different, 1: unknown, 2: known same.
pub(super) fn domain_relation(a: Option<&str>, b: Option<&str>) -> u8 {
    match (a, b) {
        (Some(x), Some(y)) if x != y => 0,
        (Some(_), Some(_)) => 2,
        _ => 1,
    }
}

pub(super) fn domain_of(p: &Peer) -> Option<&str> {
    p.failure_domain.as_deref()
}

/// Validated peers with derived child counts and child links.
pub(super) struct Index<'a> {
    pub peers: &'a [Peer],
    pub by_host: HashMap<&'a str, usize>,
    /// Peers listing the key among their parents (any position, any state),
    /// keyed by parent host, which need not be a peer any more.
    pub kids_of: HashMap<&'a str, Vec<usize>>,
    pub primary_kids: Vec<u32>,
    pub secondary_kids: Vec<u32>,
    pub origin_kids: u32,
}

impl<'a> Index<'a> {
    pub fn build(peers: &'a [Peer]) -> Result<Self, PlacementError> {
        let mut by_host = HashMap::with_capacity(peers.len());
        for (i, p) in peers.iter().enumerate() {
            if p.host.is_empty() {
                return Err(PlacementError::EmptyHost { what: format!("peers[{i}].host") });
            }
            if p.host == ORIGIN {
                return Err(PlacementError::ReservedHost { host: p.host.clone() });
            }
            if p.depth == 0 {
                return Err(PlacementError::InvalidDepth { host: p.host.clone(), depth: p.depth });
            }
            if by_host.insert(p.host.as_str(), i).is_some() {
                return Err(PlacementError::DuplicateHost { host: p.host.clone() });
            }
        }

        let mut derived_primary = vec![0u32; peers.len()];
        let mut derived_secondary = vec![0u32; peers.len()];
        let mut origin_kids = 0u32;
        let mut kids_of: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, p) in peers.iter().enumerate() {
            let mut seen: Vec<&str> = Vec::with_capacity(p.parents.len());
            for (pos, parent) in p.parents.iter().enumerate() {
                let parent = parent.as_str();
                if parent.is_empty() || seen.contains(&parent) {
                    continue;
                }
                seen.push(parent);
                let is_origin = parent == ORIGIN;
                if !is_origin {
                    kids_of.entry(parent).or_default().push(i);
                }
                if p.state == JoinState::Failed {
                    continue;
                }
                match (pos == 0, is_origin) {
                    (true, true) => origin_kids = origin_kids.saturating_add(1),
                    (true, false) => {
                        if let Some(&j) = by_host.get(parent) {
                            derived_primary[j] = derived_primary[j].saturating_add(1);
                        }
                    }
                    // The trailing last-resort origin takes no slot.
                    (false, true) => {}
                    (false, false) => {
                        if let Some(&j) = by_host.get(parent) {
                            derived_secondary[j] = derived_secondary[j].saturating_add(1);
                        }
                    }
                }
            }
        }
        let primary_kids = peers.iter().zip(&derived_primary).map(|(p, &d)| p.children.max(d)).collect();
        let secondary_kids = peers.iter().zip(&derived_secondary).map(|(p, &d)| p.secondary_children.max(d)).collect();
        Ok(Index { peers, by_host, kids_of, primary_kids, secondary_kids, origin_kids })
    }

    /// Indices of the peers that descend from `host` through any parent link.
    pub fn descendants(&self, host: &str) -> HashSet<usize> {
        let mut out = HashSet::new();
        let mut queue: VecDeque<&str> = VecDeque::from([host]);
        while let Some(h) = queue.pop_front() {
            for &k in self.kids_of.get(h).map(Vec::as_slice).unwrap_or(&[]) {
                if out.insert(k) {
                    queue.push_back(self.peers[k].host.as_str());
                }
            }
        }
        out
    }

    /// Live children (any role) of peer `i` in failure domain `domain`.
    pub fn kids_in_domain(&self, i: usize, domain: Option<&str>) -> usize {
        let Some(domain) = domain else { return 0 };
        self.kids_of.get(self.peers[i].host.as_str()).map_or(0, |kids| {
            kids.iter()
                .filter(|&&k| {
                    let kid = &self.peers[k];
                    kid.state != JoinState::Failed && kid.failure_domain.as_deref() == Some(domain)
                })
                .count()
        })
    }
}
