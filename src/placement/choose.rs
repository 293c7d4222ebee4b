//! The choice itself: the newcomer's parents, in preference order (the rules are in the
//! `placement` module docs).

use std::cmp::Reverse;
use std::collections::HashSet;

use super::index::{domain_of, domain_relation, validate_newcomer, Index};
use super::{JoinState, Newcomer, ParentRef, Peer, Placement, PlacementError, Policy};

/// Chooses the newcomer's parents; see the `placement` module docs for the rules.
///
/// Errors: bad input ([`PlacementError::InvalidPolicy`],
/// [`PlacementError::EmptyHost`], [`PlacementError::ReservedHost`],
/// [`PlacementError::DuplicateHost`], [`PlacementError::InvalidDepth`]), or
/// [`PlacementError::NoFreeParent`] when every free slot belongs to a peer
/// that is not Ready (retry later).
pub fn choose_parents(newcomer: &Newcomer, peers: &[Peer], policy: &Policy) -> Result<Placement, PlacementError> {
    policy.validate()?;
    validate_newcomer(newcomer)?;
    let ix = Index::build(peers)?;
    let below_newcomer = ix.descendants(&newcomer.host);
    let nc_domain = newcomer.failure_domain.as_deref();
    let eligible = |i: usize| {
        let p = &peers[i];
        p.state == JoinState::Ready && p.host != newcomer.host && !below_newcomer.contains(&i)
    };

    // Primary.
    let primary: Option<usize> = if ix.origin_kids < policy.origin_fanout {
        None
    } else {
        let best = (0..peers.len()).filter(|&i| eligible(i) && ix.primary_kids[i] < policy.fanout).min_by_key(|&i| {
            let p = &peers[i];
            (
                p.depth,
                domain_relation(domain_of(p), nc_domain),
                ix.kids_in_domain(i, nc_domain),
                Reverse(policy.fanout - ix.primary_kids[i]),
                Reverse(p.link_bps),
                p.host.as_str(),
            )
        });
        match best {
            Some(i) => Some(i),
            None => {
                let joining = peers.iter().filter(|p| p.state.is_placing() && p.host != newcomer.host).count();
                // No eligible peer has a free primary slot, so all are full.
                let ready_full = (0..peers.len()).filter(|&i| eligible(i)).count();
                return Err(PlacementError::NoFreeParent { ready_full, joining });
            }
        }
    };
    let primary_depth = primary.map_or(0, |i| peers[i].depth);
    let depth = primary_depth.checked_add(1).ok_or_else(|| PlacementError::InvalidDepth {
        host: primary.map_or_else(String::new, |i| peers[i].host.clone()),
        depth: primary_depth,
    })?;

    // Secondaries.
    let mut chosen: Vec<usize> = primary.into_iter().collect();
    let mut below_chosen: HashSet<usize> = match primary {
        Some(i) => ix.descendants(&peers[i].host),
        None => HashSet::new(),
    };
    let max_secondaries = policy.max_parents.saturating_sub(1) as usize;
    for _ in 0..max_secondaries {
        let best = (0..peers.len())
            .filter(|&i| eligible(i) && !chosen.contains(&i) && ix.secondary_kids[i] < policy.secondary_fanout && peers[i].depth <= depth)
            .min_by_key(|&i| {
                let p = &peers[i];
                let vs_chosen = chosen.iter().map(|&c| domain_relation(domain_of(p), domain_of(&peers[c]))).max().unwrap_or(0);
                (
                    vs_chosen,
                    below_chosen.contains(&i),
                    domain_relation(domain_of(p), nc_domain),
                    p.depth,
                    ix.kids_in_domain(i, nc_domain),
                    Reverse(policy.secondary_fanout - ix.secondary_kids[i]),
                    Reverse(p.link_bps),
                    p.host.as_str(),
                )
            });
        let Some(i) = best else { break };
        chosen.push(i);
        below_chosen.extend(ix.descendants(&peers[i].host));
    }

    let mut parents = Vec::with_capacity(chosen.len() + 1);
    if primary.is_none() {
        parents.push(ParentRef::Origin);
    }
    parents.extend(chosen.iter().map(|&i| ParentRef::Peer(peers[i].host.clone())));
    if primary.is_some() {
        parents.push(ParentRef::Origin);
    }
    Ok(Placement { parents, depth })
}

/// `ceil(log_k n) + 1`: the depth that `n` sequential joins never exceed with
/// fan-out `k` (see the `placement` module docs). `n = 0` gives 0; for `k <= 1` (a chain)
/// it gives `n`, saturating at `u32::MAX`.
pub fn tree_depth_bound(n: usize, k: u32) -> u32 {
    if n == 0 {
        return 0;
    }
    if k <= 1 {
        return u32::try_from(n).unwrap_or(u32::MAX);
    }
    let n = n as u128;
    let mut exponent = 0u32;
    let mut power: u128 = 1;
    while power < n {
        power = power.saturating_mul(u128::from(k));
        exponent += 1;
    }
    exponent + 1
}
