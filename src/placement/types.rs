//! The values placement works on: peers, the newcomer, the policy, parents and placements.

use std::collections::HashSet;
use std::fmt;

use super::{JoinState, PlacementError};

/// How the origin is spelled in [`Peer::parents`] and in published parent lists.
/// No peer may use it as its host name.
pub const ORIGIN: &str = "origin";

/// Default [`Policy::fanout`], chosen with the boot-storm simulator (bench/README.md,
/// "Which tree shape": 160 nodes at GbE, 1,000 and 10,000 at 10 GbE, the recorded 80 MiB
/// boot and a 424 MB working set, claims serial or free, with and without the busiest
/// relay failing).
///
/// Blocks stream through the tree, so a storm is bound by `k * W / u` (the origin and every
/// relay send `k` copies) plus one join ripple (~0.5 s: a node is ready once its parents
/// are) per level of `log_k N`, not by `k * log_k N` per block. At 160 nodes on GbE `k = 3`
/// is the fastest or tied (the prefetch walking ahead of the VMs; from the profile's end,
/// `k = 2` was 8-13 % faster with 424 MB), a larger `k` wins where the ripple decides (10 GbE:
/// `k = 4` is 4-16 % faster); with claims serialised by the image lock, as joins take them
/// today, every `k` ties from 1,000 nodes up. `k = 3` is never more than 16 % slower than the
/// best fan-out (31 % with a relay failing), against 49 % for 2 and 24 % (71 %) for 4, and
/// keeps trees shallow (64 nodes: depth 4 rather than 6 with 2).
pub const DEFAULT_FANOUT: u32 = 3;

/// Default [`Policy::max_parents`]: one primary and one secondary.
pub const DEFAULT_MAX_PARENTS: u32 = 2;

/// One node of an image's relay tree, as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Unique, non-empty, and not [`ORIGIN`].
    pub host: String,
    /// Only [`JoinState::Ready`] peers are chosen; [`JoinState::Failed`] ones hold no
    /// slots (see the `placement` module docs).
    pub state: JoinState,
    /// Distance from the origin; the origin's children have depth 1, so it is
    /// at least 1.
    pub depth: u32,
    /// Children for which this peer is the primary parent (bounded by
    /// [`Policy::fanout`]).
    pub children: u32,
    /// Children for which this peer is a secondary parent (bounded by
    /// [`Policy::secondary_fanout`]).
    pub secondary_children: u32,
    /// Rack, zone or other failure domain, if known.
    pub failure_domain: Option<String>,
    /// Link speed in bits per second, if known.
    pub link_bps: Option<u64>,
    /// This peer's parents as placed: primary first, [`ORIGIN`] for the
    /// origin (also as the trailing last-resort entry).
    pub parents: Vec<String>,
}

impl Peer {
    /// A peer with no children, no known domain or link speed, and no parents.
    pub fn new(host: impl Into<String>, state: JoinState, depth: u32) -> Self {
        Peer {
            host: host.into(),
            state,
            depth,
            children: 0,
            secondary_children: 0,
            failure_domain: None,
            link_bps: None,
            parents: Vec::new(),
        }
    }
}

/// Tuning knobs of the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Maximum primary children per peer (at least 1).
    pub fanout: u32,
    /// Maximum active parents of a newcomer, primary included (at least 1).
    /// The last-resort origin does not count.
    pub max_parents: u32,
    /// Maximum direct (primary) children of the origin (at least 1).
    pub origin_fanout: u32,
    /// Maximum secondary children per peer (0 disables secondary parents).
    pub secondary_fanout: u32,
}

impl Policy {
    /// A policy with the given fan-out for peers, the origin and secondaries,
    /// and [`DEFAULT_MAX_PARENTS`].
    pub fn with_fanout(fanout: u32) -> Self {
        Policy::new(fanout, DEFAULT_MAX_PARENTS, None, None)
    }

    /// `origin_fanout` and `secondary_fanout` default to `fanout`. Not checked:
    /// see [`Policy::validate`].
    pub fn new(fanout: u32, max_parents: u32, origin_fanout: Option<u32>, secondary_fanout: Option<u32>) -> Self {
        Policy { fanout, max_parents, origin_fanout: origin_fanout.unwrap_or(fanout), secondary_fanout: secondary_fanout.unwrap_or(fanout) }
    }

    /// Checks the knobs, naming the first bad one.
    pub fn validate(&self) -> Result<(), PlacementError> {
        let check = |field: &'static str, value: u32| {
            if value == 0 {
                Err(PlacementError::InvalidPolicy { field, value, reason: "must be at least 1" })
            } else {
                Ok(())
            }
        };
        check("fanout", self.fanout)?;
        check("max_parents", self.max_parents)?;
        check("origin_fanout", self.origin_fanout)?;
        Ok(())
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::with_fanout(DEFAULT_FANOUT)
    }
}

/// The node that wants to join the image's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Newcomer {
    pub host: String,
    pub failure_domain: Option<String>,
    /// Recorded by [`super::commit_choice`]; not used for choosing.
    pub link_bps: Option<u64>,
}

impl Newcomer {
    pub fn new(host: impl Into<String>, failure_domain: Option<&str>) -> Self {
        Newcomer { host: host.into(), failure_domain: failure_domain.map(str::to_owned), link_bps: None }
    }
}

/// A parent: the origin volume or a peer. Spelled as in [`Peer::parents`]:
/// `"origin"` or the peer's host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParentRef {
    Origin,
    Peer(String),
}

impl ParentRef {
    pub fn as_str(&self) -> &str {
        match self {
            ParentRef::Origin => ORIGIN,
            ParentRef::Peer(h) => h,
        }
    }

    pub fn is_origin(&self) -> bool {
        matches!(self, ParentRef::Origin)
    }
}

impl From<String> for ParentRef {
    fn from(s: String) -> Self {
        if s == ORIGIN {
            ParentRef::Origin
        } else {
            ParentRef::Peer(s)
        }
    }
}

impl From<ParentRef> for String {
    fn from(p: ParentRef) -> Self {
        match p {
            ParentRef::Origin => ORIGIN.to_owned(),
            ParentRef::Peer(h) => h,
        }
    }
}

impl fmt::Display for ParentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer of [`super::choose_parents`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// In preference order: the primary first, then secondaries, then the
    /// origin as last resort (unless the origin is the primary).
    pub parents: Vec<ParentRef>,
    /// The newcomer's depth: 1 + the primary's depth.
    pub depth: u32,
}

impl Placement {
    /// The origin alone, as the primary: what a newcomer reads from when no
    /// peer will do.
    pub fn origin_only() -> Self {
        Placement { parents: vec![ParentRef::Origin], depth: 1 }
    }

    /// The primary parent.
    pub fn primary(&self) -> Option<&ParentRef> {
        self.parents.first()
    }

    /// The parents that take a slot: everything but the trailing last-resort
    /// origin. Errors if the list is not shaped as [`super::choose_parents`]
    /// shapes it (non-empty, the origin exactly once and first or last, no
    /// duplicates, no empty or reserved peer name).
    pub fn active_parents(&self) -> Result<&[ParentRef], PlacementError> {
        let malformed = |reason: String| Err(PlacementError::MalformedPlacement { reason });
        if self.parents.is_empty() {
            return malformed("no parents".into());
        }
        let origins = self.parents.iter().filter(|p| p.is_origin()).count();
        if origins == 0 {
            return malformed("the origin (last-resort path) is missing".into());
        }
        if origins > 1 {
            return malformed("the origin is listed more than once".into());
        }
        let mut seen = HashSet::new();
        for p in &self.parents {
            if let ParentRef::Peer(h) = p {
                if h.is_empty() || h == ORIGIN {
                    return malformed(format!("invalid peer parent name {h:?}"));
                }
                if !seen.insert(h.as_str()) {
                    return malformed(format!("parent {h:?} is listed more than once"));
                }
            }
        }
        if self.parents[0].is_origin() {
            Ok(&self.parents)
        } else if self.parents[self.parents.len() - 1].is_origin() {
            Ok(&self.parents[..self.parents.len() - 1])
        } else {
            malformed("the origin must be the primary or the last entry".into())
        }
    }

    /// The parents as strings, in the spelling of [`Peer::parents`].
    pub fn parent_hosts(&self) -> Vec<String> {
        self.parents.iter().map(|p| p.as_str().to_owned()).collect()
    }
}
