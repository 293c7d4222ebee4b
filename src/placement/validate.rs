//! Re-checking a choice against the current peers, as under the image's lock.

use super::index::{validate_newcomer, Index};
use super::{JoinState, Newcomer, ParentRef, Peer, Placement, PlacementError, Policy, Role, StaleReason, ORIGIN};

/// Re-checks a choice against the current peers, as under the image's lock
/// (step 3 of the lock protocol, [`super::protocol`]). It checks safety, not
/// optimality: the placement is well formed, has at most `max_parents` active
/// parents, every active parent is still a Ready peer (or the origin as
/// primary) with a free slot of its role, is not the newcomer nor one of its
/// descendants, and the depth still equals 1 + the primary's depth. Errors with [`PlacementError::Stale`]
/// naming the first parent that fails, or an input error.
pub fn validate_choice(newcomer: &Newcomer, placement: &Placement, peers: &[Peer], policy: &Policy) -> Result<(), PlacementError> {
    policy.validate()?;
    validate_newcomer(newcomer)?;
    let ix = Index::build(peers)?;
    let active = placement.active_parents()?;
    if active.len() > policy.max_parents as usize {
        return Err(PlacementError::MalformedPlacement {
            reason: format!("{} active parents exceed max_parents = {}", active.len(), policy.max_parents),
        });
    }
    let below_newcomer = ix.descendants(&newcomer.host);
    let stale = |parent: &str, reason| Err(PlacementError::Stale { parent: parent.to_owned(), reason });
    let mut expected_depth = 1u32;
    for (pos, parent) in active.iter().enumerate() {
        let host = match parent {
            ParentRef::Origin => {
                // active_parents() guarantees the origin is first here.
                if ix.origin_kids >= policy.origin_fanout {
                    return stale(ORIGIN, StaleReason::Full { role: Role::Primary, children: ix.origin_kids, cap: policy.origin_fanout });
                }
                continue;
            }
            ParentRef::Peer(h) => h.as_str(),
        };
        if host == newcomer.host {
            return stale(host, StaleReason::IsNewcomer);
        }
        let Some(&i) = ix.by_host.get(host) else {
            return stale(host, StaleReason::Missing);
        };
        let p = &peers[i];
        if p.state != JoinState::Ready {
            return stale(host, StaleReason::NotReady { state: p.state });
        }
        if below_newcomer.contains(&i) {
            return stale(host, StaleReason::Descendant);
        }
        let (role, children, cap) = if pos == 0 {
            (Role::Primary, ix.primary_kids[i], policy.fanout)
        } else {
            (Role::Secondary, ix.secondary_kids[i], policy.secondary_fanout)
        };
        if children >= cap {
            return stale(host, StaleReason::Full { role, children, cap });
        }
        if pos == 0 {
            expected_depth = p.depth.checked_add(1).ok_or_else(|| PlacementError::InvalidDepth { host: p.host.clone(), depth: p.depth })?;
        }
    }
    if placement.depth != expected_depth {
        return stale(active[0].as_str(), StaleReason::DepthChanged { placed: placement.depth, expected: expected_depth });
    }
    Ok(())
}
