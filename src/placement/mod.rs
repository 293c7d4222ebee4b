//! Relay-tree placement: which parent(s) a newcomer attaches to.
//!
//! Every compute node that boots an image attaches the image over iSCSI, caches
//! the blocks it reads and re-exports its cache, so the nodes of one image form
//! a relay tree rooted at the original volume, the *origin* (for example a
//! Cinder volume). This module is the pure decision: given a snapshot of the
//! image's peers and a [`Policy`], [`choose_parents`] returns the newcomer's
//! parents in preference order. It does no I/O and keeps no state, so it is
//! deterministic: the same input always gives the same answer.
//!
//! # Rules
//!
//! * Only [`PeerState::Ready`] peers (export verified) are ever chosen;
//!   `Joining`, `Leaving` and `Failed` peers never are.
//! * The newcomer itself and every peer that descends from it (through any
//!   parent link, as when a node re-joins while its old children still point at
//!   it) are never chosen, so no cycle can form.
//! * **Primary parent**: the shallowest candidate with a free primary slot. The
//!   origin counts as depth 0 with [`Policy::origin_fanout`] slots, so it is the
//!   primary while it has room. Ties at the same depth are broken by, in order:
//!   a failure domain known to differ from the newcomer's, fewer existing
//!   children in the newcomer's domain (spreads one parent's children over
//!   domains), more free slots, a higher known link speed, then the host name.
//! * **Secondary parents** (up to [`Policy::max_parents`] `- 1`): Ready peers
//!   at depth `<= primary depth + 1` with a free secondary slot, ranked by: a
//!   failure domain known to differ from every parent chosen so far, not being
//!   a descendant of a parent chosen so far (an independent path), a domain
//!   differing from the newcomer's, shallower depth, fewer children in the
//!   newcomer's domain, more free secondary slots, higher link speed, host name.
//!   Two parents are returned whenever such a candidate exists.
//! * The newcomer's depth is `1 + depth(primary)` (the origin's children have
//!   depth 1).
//! * The origin is always in the returned list: first when it is the primary,
//!   otherwise appended last as the last-resort path. As a last resort it is
//!   *not* an active parent and takes none of the origin's slots.
//! * Failure domains are compared as "known different" (both `Some` and
//!   unequal), "unknown" (either `None`), or "known same"; unknown ranks between
//!   the two. The origin is treated as being in no peer's domain.
//!
//! # Fan-out accounting (decided by the tests)
//!
//! [`Policy::fanout`] bounds the children for which a peer is the **primary**
//! parent. Secondary children are bounded separately by
//! [`Policy::secondary_fanout`], so a peer serves at most `fanout` children in
//! normal operation and at most `fanout + secondary_fanout` when all of their
//! primaries have failed. [`Policy::origin_fanout`] bounds the origin's direct
//! (primary) children; secondaries are never the origin.
//!
//! The conservative alternative, one budget shared by primary and secondary
//! children, was tried first and rejected: with two parents every newcomer uses
//! two slots, the tree branches like `fanout / 2`, and the required depth bound
//! `ceil(log_k N) + 1` fails. The test
//! `tests::counting_both_roles_in_one_budget_breaks_the_depth_bound` keeps the
//! evidence: 64 sequential joins reach depth 32, 6 and 5 for `k` = 2, 3 and 4,
//! against bounds of 7, 5 and 4; the property test
//! `sequential_joins_keep_all_invariants` shows the bound holds after every
//! join with primary-only counting (and `racing_joiners_with_lock_never_exceed_fanout`
//! shows it for racing batches too).
//!
//! Why the depth bound holds: greedy shallowest-first filling puts at most
//! `origin_fanout * k^(d-1) >= k^(d-1)` nodes at depth `d`, so `N` nodes need
//! depth at most `ceil(log_k N) + 1` for any `origin_fanout >= 1`
//! ([`tree_depth_bound`]).
//!
//! # Children counts
//!
//! A peer's effective child count is the larger of its declared counter
//! ([`Peer::children`], [`Peer::secondary_children`]) and the count derived
//! from the `parents` lists of the other non-`Failed` peers; the origin's count
//! is derived only. Stale counters therefore can only make a peer look fuller,
//! never emptier.
//!
//! # Concurrent joiners: the lock protocol
//!
//! Choosing is cheap, but two newcomers choosing from the same snapshot may
//! take the same last slot. Callers use a per-image lock:
//!
//! 1. Read a snapshot of the peers without the lock and call [`choose_parents`].
//! 2. Take the image's lock and re-read the peers.
//! 3. [`validate_choice`] against the fresh list. On
//!    [`PlacementError::Stale`] call [`choose_parents`] again on the fresh list
//!    (still under the lock). On [`PlacementError::NoFreeParent`] release the
//!    lock, back off and retry later (every free slot belongs to a peer whose
//!    export is not verified yet).
//! 4. [`commit_choice`] (which validates again) registers the newcomer as
//!    `Joining` and takes its slots; release the lock.
//! 5. Once the newcomer's own export is verified, [`mark_ready`] it (under the
//!    lock) so that later newcomers may choose it.
//!
//! The property test `racing_joiners_with_lock_never_exceed_fanout` simulates
//! batches of newcomers that choose from one snapshot and then go through
//! steps 2–5.
//!
//! # JSON
//!
//! All types are serde types, so Python can pass JSON: [`choose_parents_json`],
//! [`validate_choice_json`], [`Placement::to_json`], [`PlacementError::to_json`].
//! A [`ParentRef`] is a plain string, `"origin"` or a host name, the same
//! spelling as [`Peer::parents`], so a placement's `parents` can be stored as
//! the peer's `parents` directly. A [`Policy`] given as JSON may omit fields
//! (defaults apply) but must not contain unknown ones.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};

#[cfg(test)]
mod tests;

/// How the origin is spelled in [`Peer::parents`] and in JSON parent lists.
/// No peer may use it as its host name.
pub const ORIGIN: &str = "origin";

/// Default [`Policy::fanout`], chosen with the boot-storm simulator (bench/README.md,
/// "Which tree shape": 160 nodes at GbE, 1,000 and 10,000 at 10 GbE, the recorded 80 MiB
/// boot and a 424 MB working set, claims serial or free, with and without the busiest
/// relay failing).
///
/// Blocks stream through the tree, so a storm is bound by `k * W / u` (the origin and every
/// relay send `k` copies) plus one join ripple (~0.5 s: a node is ready once its parents
/// are) per level of `log_k N`, not by `k * log_k N` per block. A small `k` wins where
/// `k * W / u` dominates (424 MB at GbE: `k = 2` is 8-13 % faster than 3), a large one where
/// the ripple does (10 GbE: `k = 4` is 4-16 % faster); with claims serialised by the image
/// lock, as joins take them today, every `k` ties from 1,000 nodes up. `k = 3` is never more
/// than 16 % slower than the best fan-out (33 % with a relay failing), against 49 % for 2 and
/// 36 % (68 %) for 4, and keeps trees shallow (64 nodes: depth 4 rather than 6 with 2).
pub const DEFAULT_FANOUT: u32 = 3;

/// Default [`Policy::max_parents`]: one primary and one secondary.
pub const DEFAULT_MAX_PARENTS: u32 = 2;

/// Life cycle of a peer, as recorded by the image's coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// Placed (holds its parents' slots) but its export is not verified yet.
    Joining,
    /// Its export has been verified: it may be chosen as a parent.
    Ready,
    /// Going away: never chosen, still holds its slots.
    Leaving,
    /// Dead: never chosen, and its links are not counted as children.
    Failed,
}

/// One node of an image's relay tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Unique, non-empty, and not [`ORIGIN`].
    pub host: String,
    pub state: PeerState,
    /// Distance from the origin; the origin's children have depth 1, so it is
    /// at least 1.
    pub depth: u32,
    /// Children for which this peer is the primary parent (bounded by
    /// [`Policy::fanout`]).
    #[serde(default)]
    pub children: u32,
    /// Children for which this peer is a secondary parent (bounded by
    /// [`Policy::secondary_fanout`]).
    #[serde(default)]
    pub secondary_children: u32,
    /// Rack, zone or other failure domain, if known.
    #[serde(default)]
    pub failure_domain: Option<String>,
    /// Link speed in bits per second, if known.
    #[serde(default)]
    pub link_bps: Option<u64>,
    /// This peer's parents as placed: primary first, [`ORIGIN`] for the
    /// origin (also as the trailing last-resort entry).
    #[serde(default)]
    pub parents: Vec<String>,
}

impl Peer {
    /// A peer with no children, no known domain or link speed, and no parents.
    pub fn new(host: impl Into<String>, state: PeerState, depth: u32) -> Self {
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
///
/// Deserializing fills omitted fields with defaults: `fanout` 3,
/// `max_parents` 2, and `origin_fanout` and `secondary_fanout` equal to
/// `fanout`. Unknown fields are rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "PolicyRepr")]
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
        Policy {
            fanout,
            max_parents: DEFAULT_MAX_PARENTS,
            origin_fanout: fanout,
            secondary_fanout: fanout,
        }
    }

    /// Checks the knobs, naming the first bad one.
    pub fn validate(&self) -> Result<(), PlacementError> {
        let check = |field: &'static str, value: u32| {
            if value == 0 {
                Err(PlacementError::InvalidPolicy {
                    field,
                    value,
                    reason: "must be at least 1",
                })
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyRepr {
    fanout: Option<u32>,
    max_parents: Option<u32>,
    origin_fanout: Option<u32>,
    secondary_fanout: Option<u32>,
}

impl From<PolicyRepr> for Policy {
    fn from(r: PolicyRepr) -> Self {
        let fanout = r.fanout.unwrap_or(DEFAULT_FANOUT);
        Policy {
            fanout,
            max_parents: r.max_parents.unwrap_or(DEFAULT_MAX_PARENTS),
            origin_fanout: r.origin_fanout.unwrap_or(fanout),
            secondary_fanout: r.secondary_fanout.unwrap_or(fanout),
        }
    }
}

/// The node that wants to join the image's tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Newcomer {
    pub host: String,
    #[serde(default)]
    pub failure_domain: Option<String>,
    /// Recorded by [`commit_choice`]; not used for choosing.
    #[serde(default)]
    pub link_bps: Option<u64>,
}

impl Newcomer {
    pub fn new(host: impl Into<String>, failure_domain: Option<&str>) -> Self {
        Newcomer {
            host: host.into(),
            failure_domain: failure_domain.map(str::to_owned),
            link_bps: None,
        }
    }
}

/// A parent: the origin volume or a peer. In JSON a plain string: `"origin"`
/// or the peer's host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
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

/// The answer of [`choose_parents`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// In preference order: the primary first, then secondaries, then the
    /// origin as last resort (unless the origin is the primary).
    pub parents: Vec<ParentRef>,
    /// The newcomer's depth: 1 + the primary's depth.
    pub depth: u32,
}

impl Placement {
    /// The primary parent.
    pub fn primary(&self) -> Option<&ParentRef> {
        self.parents.first()
    }

    /// The parents that take a slot: everything but the trailing last-resort
    /// origin. Errors if the list is not shaped as [`choose_parents`] shapes it
    /// (non-empty, the origin exactly once and first or last, no duplicates, no
    /// empty or reserved peer name).
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

    /// `{"parents":["h1","h2","origin"],"depth":2}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a Placement always serializes")
    }

    pub fn from_json(json: &str) -> Result<Self, PlacementError> {
        from_json("placement", json)
    }
}

/// Which slot a parent gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Primary,
    Secondary,
}

/// Why a previously made choice no longer holds (see [`validate_choice`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StaleReason {
    /// The parent is not among the peers any more.
    Missing,
    /// The parent is not Ready.
    NotReady { state: PeerState },
    /// The parent has no free slot of that role.
    Full { role: Role, children: u32, cap: u32 },
    /// The parent descends from the newcomer (would form a cycle).
    Descendant,
    /// The parent is the newcomer itself.
    IsNewcomer,
    /// The primary's depth changed: the placement's depth is wrong.
    DepthChanged { placed: u32, expected: u32 },
}

/// Everything that can go wrong. Each variant names the bad value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PlacementError {
    /// A policy knob is out of range.
    InvalidPolicy {
        field: &'static str,
        value: u32,
        reason: &'static str,
    },
    /// A host name is empty; `what` says which one (`newcomer.host`,
    /// `peers[3].host`).
    EmptyHost { what: String },
    /// A host uses the reserved name [`ORIGIN`].
    ReservedHost { host: String },
    /// Two peers have the same host.
    DuplicateHost { host: String },
    /// A peer's depth is invalid (0 is the origin's).
    InvalidDepth { host: String, depth: u32 },
    /// No Ready parent has a free slot: the origin and `ready_full` Ready
    /// peers are full, and `joining` peers are not verified yet. Retry later.
    NoFreeParent { ready_full: usize, joining: usize },
    /// A choice made on an older snapshot no longer holds; choose again.
    Stale { parent: String, reason: StaleReason },
    /// A placement is not shaped as [`choose_parents`] shapes it.
    MalformedPlacement { reason: String },
    /// JSON input could not be parsed; `what` says which argument.
    Json { what: &'static str, message: String },
}

impl PlacementError {
    /// True for outcomes that a later retry may resolve (the tree changes),
    /// false for bad input.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            PlacementError::NoFreeParent { .. } | PlacementError::Stale { .. }
        )
    }

    /// `{"kind":"invalid_policy","field":"fanout","value":0,...}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a PlacementError always serializes")
    }
}

impl fmt::Display for PlacementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlacementError::InvalidPolicy {
                field,
                value,
                reason,
            } => write!(f, "invalid policy: {field} = {value}: {reason}"),
            PlacementError::EmptyHost { what } => write!(f, "{what} is empty"),
            PlacementError::ReservedHost { host } => {
                write!(f, "host name {host:?} is reserved for the origin")
            }
            PlacementError::DuplicateHost { host } => {
                write!(f, "host {host:?} appears more than once among the peers")
            }
            PlacementError::InvalidDepth { host, depth } => write!(
                f,
                "peer {host:?} has invalid depth {depth} (the origin's children have depth 1)"
            ),
            PlacementError::NoFreeParent {
                ready_full,
                joining,
            } => write!(
                f,
                "no Ready parent has a free slot (origin full, {ready_full} Ready peers full, \
                 {joining} peers still joining); retry later"
            ),
            PlacementError::Stale { parent, reason } => {
                write!(f, "choice of parent {parent:?} is stale: ")?;
                match reason {
                    StaleReason::Missing => write!(f, "it is no longer a peer"),
                    StaleReason::NotReady { state } => write!(f, "it is {state:?}, not Ready"),
                    StaleReason::Full {
                        role,
                        children,
                        cap,
                    } => write!(f, "its {role:?} slots are full ({children}/{cap})"),
                    StaleReason::Descendant => write!(f, "it descends from the newcomer"),
                    StaleReason::IsNewcomer => write!(f, "it is the newcomer itself"),
                    StaleReason::DepthChanged { placed, expected } => write!(
                        f,
                        "the placement says depth {placed} but the primary now gives {expected}"
                    ),
                }
            }
            PlacementError::MalformedPlacement { reason } => {
                write!(f, "malformed placement: {reason}")
            }
            PlacementError::Json { what, message } => {
                write!(f, "invalid JSON for {what}: {message}")
            }
        }
    }
}

impl std::error::Error for PlacementError {}

/// `ceil(log_k n) + 1`: the depth that `n` sequential joins never exceed with
/// fan-out `k` (see the module docs). `n = 0` gives 0; for `k <= 1` (a chain)
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

// ---------------------------------------------------------------------------
// Internals

fn validate_newcomer(newcomer: &Newcomer) -> Result<(), PlacementError> {
    if newcomer.host.is_empty() {
        return Err(PlacementError::EmptyHost {
            what: "newcomer.host".into(),
        });
    }
    if newcomer.host == ORIGIN {
        return Err(PlacementError::ReservedHost {
            host: newcomer.host.clone(),
        });
    }
    Ok(())
}

/// 0: known different, 1: unknown, 2: known same.
fn domain_relation(a: Option<&str>, b: Option<&str>) -> u8 {
    match (a, b) {
        (Some(x), Some(y)) if x != y => 0,
        (Some(_), Some(_)) => 2,
        _ => 1,
    }
}

/// Validated peers with derived child counts and child links.
struct Index<'a> {
    peers: &'a [Peer],
    by_host: HashMap<&'a str, usize>,
    /// Peers listing the key among their parents (any position, any state),
    /// keyed by parent host, which need not be a peer any more.
    kids_of: HashMap<&'a str, Vec<usize>>,
    primary_kids: Vec<u32>,
    secondary_kids: Vec<u32>,
    origin_kids: u32,
}

impl<'a> Index<'a> {
    fn build(peers: &'a [Peer]) -> Result<Self, PlacementError> {
        let mut by_host = HashMap::with_capacity(peers.len());
        for (i, p) in peers.iter().enumerate() {
            if p.host.is_empty() {
                return Err(PlacementError::EmptyHost {
                    what: format!("peers[{i}].host"),
                });
            }
            if p.host == ORIGIN {
                return Err(PlacementError::ReservedHost {
                    host: p.host.clone(),
                });
            }
            if p.depth == 0 {
                return Err(PlacementError::InvalidDepth {
                    host: p.host.clone(),
                    depth: p.depth,
                });
            }
            if by_host.insert(p.host.as_str(), i).is_some() {
                return Err(PlacementError::DuplicateHost {
                    host: p.host.clone(),
                });
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
                if p.state == PeerState::Failed {
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
        let primary_kids = peers
            .iter()
            .zip(&derived_primary)
            .map(|(p, &d)| p.children.max(d))
            .collect();
        let secondary_kids = peers
            .iter()
            .zip(&derived_secondary)
            .map(|(p, &d)| p.secondary_children.max(d))
            .collect();
        Ok(Index {
            peers,
            by_host,
            kids_of,
            primary_kids,
            secondary_kids,
            origin_kids,
        })
    }

    /// Indices of the peers that descend from `host` through any parent link.
    fn descendants(&self, host: &str) -> HashSet<usize> {
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
    fn kids_in_domain(&self, i: usize, domain: Option<&str>) -> usize {
        let Some(domain) = domain else { return 0 };
        self.kids_of
            .get(self.peers[i].host.as_str())
            .map_or(0, |kids| {
                kids.iter()
                    .filter(|&&k| {
                        let kid = &self.peers[k];
                        kid.state != PeerState::Failed
                            && kid.failure_domain.as_deref() == Some(domain)
                    })
                    .count()
            })
    }
}

fn domain_of(p: &Peer) -> Option<&str> {
    p.failure_domain.as_deref()
}

/// Chooses the newcomer's parents; see the module docs for the rules.
///
/// Errors: bad input ([`PlacementError::InvalidPolicy`],
/// [`PlacementError::EmptyHost`], [`PlacementError::ReservedHost`],
/// [`PlacementError::DuplicateHost`], [`PlacementError::InvalidDepth`]), or
/// [`PlacementError::NoFreeParent`] when every free slot belongs to a peer
/// that is not Ready (retry later).
pub fn choose_parents(
    newcomer: &Newcomer,
    peers: &[Peer],
    policy: &Policy,
) -> Result<Placement, PlacementError> {
    policy.validate()?;
    validate_newcomer(newcomer)?;
    let ix = Index::build(peers)?;
    let below_newcomer = ix.descendants(&newcomer.host);
    let nc_domain = newcomer.failure_domain.as_deref();
    let eligible = |i: usize| {
        let p = &peers[i];
        p.state == PeerState::Ready && p.host != newcomer.host && !below_newcomer.contains(&i)
    };

    // Primary.
    let primary: Option<usize> = if ix.origin_kids < policy.origin_fanout {
        None
    } else {
        let best = (0..peers.len())
            .filter(|&i| eligible(i) && ix.primary_kids[i] < policy.fanout)
            .min_by_key(|&i| {
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
                let joining = peers
                    .iter()
                    .filter(|p| p.state == PeerState::Joining && p.host != newcomer.host)
                    .count();
                // No eligible peer has a free primary slot, so all are full.
                let ready_full = (0..peers.len()).filter(|&i| eligible(i)).count();
                return Err(PlacementError::NoFreeParent {
                    ready_full,
                    joining,
                });
            }
        }
    };
    let primary_depth = primary.map_or(0, |i| peers[i].depth);
    let depth = primary_depth
        .checked_add(1)
        .ok_or_else(|| PlacementError::InvalidDepth {
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
            .filter(|&i| {
                eligible(i)
                    && !chosen.contains(&i)
                    && ix.secondary_kids[i] < policy.secondary_fanout
                    && peers[i].depth <= depth
            })
            .min_by_key(|&i| {
                let p = &peers[i];
                let vs_chosen = chosen
                    .iter()
                    .map(|&c| domain_relation(domain_of(p), domain_of(&peers[c])))
                    .max()
                    .unwrap_or(0);
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
    parents.extend(
        chosen
            .iter()
            .map(|&i| ParentRef::Peer(peers[i].host.clone())),
    );
    if primary.is_some() {
        parents.push(ParentRef::Origin);
    }
    Ok(Placement { parents, depth })
}

/// Re-checks a choice against the current peers, as under the image's lock
/// (see the module docs). It checks safety, not optimality: the placement is
/// well formed, has at most `max_parents` active parents, every active parent
/// is still a Ready peer (or the origin as primary) with a free slot of its
/// role, is not the newcomer nor one of its descendants, and the depth still
/// equals 1 + the primary's depth. Errors with [`PlacementError::Stale`]
/// naming the first parent that fails, or an input error.
pub fn validate_choice(
    newcomer: &Newcomer,
    placement: &Placement,
    peers: &[Peer],
    policy: &Policy,
) -> Result<(), PlacementError> {
    policy.validate()?;
    validate_newcomer(newcomer)?;
    let ix = Index::build(peers)?;
    let active = placement.active_parents()?;
    if active.len() > policy.max_parents as usize {
        return Err(PlacementError::MalformedPlacement {
            reason: format!(
                "{} active parents exceed max_parents = {}",
                active.len(),
                policy.max_parents
            ),
        });
    }
    let below_newcomer = ix.descendants(&newcomer.host);
    let stale = |parent: &str, reason| {
        Err(PlacementError::Stale {
            parent: parent.to_owned(),
            reason,
        })
    };
    let mut expected_depth = 1u32;
    for (pos, parent) in active.iter().enumerate() {
        let host = match parent {
            ParentRef::Origin => {
                // active_parents() guarantees the origin is first here.
                if ix.origin_kids >= policy.origin_fanout {
                    return stale(
                        ORIGIN,
                        StaleReason::Full {
                            role: Role::Primary,
                            children: ix.origin_kids,
                            cap: policy.origin_fanout,
                        },
                    );
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
        if p.state != PeerState::Ready {
            return stale(host, StaleReason::NotReady { state: p.state });
        }
        if below_newcomer.contains(&i) {
            return stale(host, StaleReason::Descendant);
        }
        let (role, children, cap) = if pos == 0 {
            (Role::Primary, ix.primary_kids[i], policy.fanout)
        } else {
            (
                Role::Secondary,
                ix.secondary_kids[i],
                policy.secondary_fanout,
            )
        };
        if children >= cap {
            return stale(
                host,
                StaleReason::Full {
                    role,
                    children,
                    cap,
                },
            );
        }
        if pos == 0 {
            expected_depth =
                p.depth
                    .checked_add(1)
                    .ok_or_else(|| PlacementError::InvalidDepth {
                        host: p.host.clone(),
                        depth: p.depth,
                    })?;
        }
    }
    if placement.depth != expected_depth {
        return stale(
            active[0].as_str(),
            StaleReason::DepthChanged {
                placed: placement.depth,
                expected: expected_depth,
            },
        );
    }
    Ok(())
}

/// Removes `host`'s record and releases the slots it held at its parents
/// (decrementing their declared counters). Peers whose parents list `host`
/// keep pointing at it: the caller re-places them. Returns the record.
pub fn remove_peer(peers: &mut Vec<Peer>, host: &str) -> Option<Peer> {
    let pos = peers.iter().position(|p| p.host == host)?;
    let old = peers.remove(pos);
    let mut seen: Vec<&str> = Vec::new();
    for (i, parent) in old.parents.iter().enumerate() {
        if parent == ORIGIN || seen.contains(&parent.as_str()) {
            continue;
        }
        seen.push(parent);
        if let Some(p) = peers.iter_mut().find(|p| &p.host == parent) {
            if i == 0 {
                p.children = p.children.saturating_sub(1);
            } else {
                p.secondary_children = p.secondary_children.saturating_sub(1);
            }
        }
    }
    Some(old)
}

/// Validates `placement` against `peers` ([`validate_choice`]) and, if it
/// holds, records it: the newcomer is added as [`PeerState::Joining`] with the
/// placement's depth and parents, and its parents' counters are incremented.
/// A re-joining newcomer's old record is replaced (its old slots released, its
/// child counters kept, since its children still point at it). Call under the
/// image's lock.
pub fn commit_choice(
    peers: &mut Vec<Peer>,
    newcomer: &Newcomer,
    placement: &Placement,
    policy: &Policy,
) -> Result<(), PlacementError> {
    validate_choice(newcomer, placement, peers, policy)?;
    let old = remove_peer(peers, &newcomer.host);
    let active = placement.active_parents()?;
    for (pos, parent) in active.iter().enumerate() {
        if let ParentRef::Peer(h) = parent {
            if let Some(p) = peers.iter_mut().find(|p| &p.host == h) {
                if pos == 0 {
                    p.children = p.children.saturating_add(1);
                } else {
                    p.secondary_children = p.secondary_children.saturating_add(1);
                }
            }
        }
    }
    let (children, secondary_children, old_link) = old
        .map(|o| (o.children, o.secondary_children, o.link_bps))
        .unwrap_or((0, 0, None));
    peers.push(Peer {
        host: newcomer.host.clone(),
        state: PeerState::Joining,
        depth: placement.depth,
        children,
        secondary_children,
        failure_domain: newcomer.failure_domain.clone(),
        link_bps: newcomer.link_bps.or(old_link),
        parents: placement.parent_hosts(),
    });
    Ok(())
}

/// Marks `host` Ready once its export has been verified, so that later
/// newcomers may choose it. Returns false if it is not a peer.
pub fn mark_ready(peers: &mut [Peer], host: &str) -> bool {
    match peers.iter_mut().find(|p| p.host == host) {
        Some(p) => {
            p.state = PeerState::Ready;
            true
        }
        None => false,
    }
}

fn from_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    json: &str,
) -> Result<T, PlacementError> {
    serde_json::from_str(json).map_err(|e| PlacementError::Json {
        what,
        message: e.to_string(),
    })
}

/// [`choose_parents`] on JSON arguments (a newcomer object, an array of
/// peers, a policy object), returning the placement as JSON.
pub fn choose_parents_json(
    newcomer_json: &str,
    peers_json: &str,
    policy_json: &str,
) -> Result<String, PlacementError> {
    let newcomer: Newcomer = from_json("newcomer", newcomer_json)?;
    let peers: Vec<Peer> = from_json("peers", peers_json)?;
    let policy: Policy = from_json("policy", policy_json)?;
    choose_parents(&newcomer, &peers, &policy).map(|p| p.to_json())
}

/// [`validate_choice`] on JSON arguments.
pub fn validate_choice_json(
    newcomer_json: &str,
    placement_json: &str,
    peers_json: &str,
    policy_json: &str,
) -> Result<(), PlacementError> {
    let newcomer: Newcomer = from_json("newcomer", newcomer_json)?;
    let placement: Placement = from_json("placement", placement_json)?;
    let peers: Vec<Peer> = from_json("peers", peers_json)?;
    let policy: Policy = from_json("policy", policy_json)?;
    validate_choice(&newcomer, &placement, &peers, &policy)
}
