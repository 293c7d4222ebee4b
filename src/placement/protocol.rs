//! The join protocol: how a node takes its place in an image's relay tree through the
//! registry, and what every other node reads from the records it publishes.
//!
//! Each node that holds the image publishes one record in the image's registry group
//! ([`ImageRecord`]: its [`JoinState`], depth, parents, failure domain and the grants it made).
//! Python (`vmthunder.tree`) does the registry I/O and runs the threads; every decision about
//! states and parents is made here.
//!
//! # States and transitions
//!
//! A node's own record goes through these states ([`JoinState::may_follow`]):
//!
//! ```text
//!   (none) --claim--> Joining --LUN exists--> Built --parents ready--> Ready --last VM--> Leaving
//!      |                 |                                               ^
//!      |                 +------------- (no export of its own) ----------+
//!      +------------------------- rejoin after a reboot -----------------+
//! ```
//!
//! A re-claim (a parent left before we were ready) keeps the state: Joining or Built. A node
//! that leaves the group has no record; it comes back through a claim or a rejoin. `Failed`
//! is never published by vmthunder: a record saying so (an operator's) counts as gone.
//!
//! # What a record means for choosing parents
//!
//! [`View::peers`] maps the records to placement's peers, from the newcomer's point of view:
//!
//! * Its own record and the parents it gave up on (`exclude`) are left out.
//! * `Ready` with a usable grant for the newcomer: a candidate. Without one it cannot log in
//!   there, so the peer only holds its slots (as `Joining`).
//! * `Joining` / `Built` hold their slots and are never chosen, except *early*: while the
//!   newcomer itself still builds, a peer that has granted it (its target exists) counts as
//!   ready, so the newcomer claims under it and logs in while both build. Of an early
//!   choice only the primary may still be building: a secondary parent is a failover path,
//!   not worth waiting for, so secondaries that are not `Ready` are dropped.
//! * `Leaving` holds its slots and is never chosen; `Failed` holds none.
//!
//! A child waits until its parents have *reached* `Built` (it switches its paths to them) and
//! then `Ready` (it publishes `Ready` itself); a parent whose record is gone, `Leaving` or
//! `Failed` is given up on ([`parents_progress`]), and upkeep re-parents away from it.
//!
//! # Concurrent joiners: the lock protocol
//!
//! Choosing is cheap, but two newcomers choosing from the same snapshot may take the same
//! last slot. A newcomer therefore:
//!
//! 1. Reads the records without the lock and [`choose`]s; on
//!    [`PlacementError::NoFreeParent`] it waits and reads again (every free slot belongs to a
//!    peer that is not ready for it yet).
//! 2. Takes the image's lock and reads the records again.
//! 3. [`choose`]s with the first choice as `previous`: kept if [`validate_choice`] still
//!    passes on the fresh records, chosen afresh otherwise (on `NoFreeParent`: release the
//!    lock, back off, go to 1).
//! 4. Commits: publishes its claim, [`own_record`] in state `Joining`, whose parents take
//!    their slots (placement counts children from the other records' parents). Releases.
//! 5. Publishes `Built` once its LUN exists, `Ready` once its parents are.
//!
//! After its deadline a newcomer skips step 1 and, finding no free parent in step 3, takes
//! the origin alone, beyond the origin's fan-out if need be (`last_resort`).
//!
//! On an in-memory list of peers (the simulator, the property tests) step 4 is
//! [`commit_choice`], which validates again and adds the newcomer as `Joining`, and step 5 is
//! [`mark_ready`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use pyo3::pyclass;
use serde_json::Value;

use super::{choose_parents, validate_choice, Newcomer, ParentRef, Peer, Placement, PlacementError, Policy, ORIGIN};
use crate::records::ImageRecord;

/// Where a node stands in an image's tree, as its registry record says.
#[pyclass(eq, eq_int, frozen, hash, module = "vmthunder")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JoinState {
    /// Placed (holds its parents' slots); its template is being built.
    #[pyo3(name = "JOINING")]
    Joining,
    /// Its LUN exists: children may switch their paths to it, and read once it is Ready.
    #[pyo3(name = "BUILT")]
    Built,
    /// Its parents are ready and so is its export: it may be chosen as a parent.
    #[pyo3(name = "READY")]
    Ready,
    /// Its last VM left while children still read from it: they move away.
    #[pyo3(name = "LEAVING")]
    Leaving,
    /// Dead: never chosen, and its links are not counted as children.
    #[pyo3(name = "FAILED")]
    Failed,
}

impl JoinState {
    pub const ALL: [JoinState; 5] = [JoinState::Joining, JoinState::Built, JoinState::Ready, JoinState::Leaving, JoinState::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            JoinState::Joining => "joining",
            JoinState::Built => "built",
            JoinState::Ready => "ready",
            JoinState::Leaving => "leaving",
            JoinState::Failed => "failed",
        }
    }

    /// Whether a node's own record may go from `from` (`None`: it has none) to `to`; see the
    /// module docs.
    pub fn may_follow(from: Option<JoinState>, to: JoinState) -> bool {
        use JoinState::*;
        match from {
            None => matches!(to, Joining | Ready),
            Some(Joining) => matches!(to, Joining | Built | Ready | Leaving),
            Some(Built) => matches!(to, Built | Ready | Leaving),
            Some(Ready) => matches!(to, Ready | Leaving),
            Some(Leaving) => to == Leaving,
            Some(Failed) => false,
        }
    }

    /// `to`, if it may follow `from` ([`JoinState::may_follow`]).
    pub fn transition(from: Option<JoinState>, to: JoinState) -> Result<JoinState, PlacementError> {
        if JoinState::may_follow(from, to) {
            Ok(to)
        } else {
            Err(PlacementError::Transition { from, to })
        }
    }

    /// Its own attach is still placing it (`Joining` or `Built`): upkeep leaves it alone.
    pub fn is_placing(self) -> bool {
        matches!(self, JoinState::Joining | JoinState::Built)
    }

    /// Its children give up on it (`Leaving` or `Failed`).
    pub fn is_gone(self) -> bool {
        matches!(self, JoinState::Leaving | JoinState::Failed)
    }

    /// Whether a parent in this state has got as far as `want` on the way
    /// Joining -> Built -> Ready (a gone parent never has).
    pub fn reached(self, want: JoinState) -> bool {
        let rank = |s: JoinState| match s {
            JoinState::Joining => Some(0),
            JoinState::Built => Some(1),
            JoinState::Ready => Some(2),
            JoinState::Leaving | JoinState::Failed => None,
        };
        match (rank(self), rank(want)) {
            (Some(a), Some(b)) => a >= b,
            _ => self == want,
        }
    }

    /// The state a peer with a record in this state has for a newcomer choosing parents:
    /// `granted`, it has a usable grant for the newcomer; `early`, the newcomer is still
    /// building (see the module docs).
    pub fn as_candidate(self, granted: bool, early: bool) -> JoinState {
        match self {
            JoinState::Ready if !granted => JoinState::Joining,
            JoinState::Joining | JoinState::Built if granted && early => JoinState::Ready,
            s => s,
        }
    }

    /// From a record's `state` field and its `built` flag (`Built` is published as
    /// `"joining"` with `"built": true`, as earlier versions read it).
    pub fn from_wire(state: &str, built: bool) -> Option<JoinState> {
        Some(match state {
            "joining" if built => JoinState::Built,
            "joining" => JoinState::Joining,
            "ready" => JoinState::Ready,
            "leaving" => JoinState::Leaving,
            "failed" => JoinState::Failed,
            _ => return None,
        })
    }

    /// The record's `state` field and `built` flag.
    pub fn to_wire(self) -> (&'static str, bool) {
        match self {
            JoinState::Built => ("joining", true),
            s => (s.as_str(), false),
        }
    }
}

impl fmt::Display for JoinState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a newcomer reads the image's records when it chooses its parents.
#[derive(Debug, Clone)]
pub struct View<'a> {
    /// For messages.
    pub image: &'a str,
    /// The newcomer; its own record is left out.
    pub host: &'a str,
    pub failure_domain: Option<&'a str>,
    /// Peers whose grant for the newcomer passed `records::check_grant`.
    pub granted: &'a HashSet<String>,
    /// Parents the newcomer gave up on (gone, or not there in time): left out.
    pub exclude: &'a HashSet<String>,
    /// The newcomer is still building (see the module docs).
    pub early: bool,
}

impl View<'_> {
    pub fn newcomer(&self) -> Newcomer {
        Newcomer::new(self.host, self.failure_domain)
    }

    /// The records as placement's peers (see the module docs).
    pub fn peers(&self, records: &[ImageRecord]) -> Vec<Peer> {
        records
            .iter()
            .filter(|r| r.host != self.host && !self.exclude.contains(&r.host))
            .map(|r| Peer {
                failure_domain: r.failure_domain.clone(),
                parents: r.parents.clone(),
                ..Peer::new(r.host.clone(), r.state.as_candidate(self.granted.contains(&r.host), self.early), r.depth)
            })
            .collect()
    }
}

/// Steps 1 and 3 of the lock protocol: the newcomer's parents among `records`. `previous`
/// (a choice made on an older read) is kept if it still holds. `last_resort`: when no parent
/// is free, the origin alone (logged) instead of [`PlacementError::NoFreeParent`].
pub fn choose(
    view: &View<'_>,
    records: &[ImageRecord],
    policy: &Policy,
    previous: Option<&Placement>,
    last_resort: bool,
) -> Result<Placement, PlacementError> {
    let peers = view.peers(records);
    let newcomer = view.newcomer();
    let placement = match previous {
        Some(p) if validate_choice(&newcomer, p, &peers, policy).is_ok() => p.clone(),
        _ => match choose_parents(&newcomer, &peers, policy) {
            Err(PlacementError::NoFreeParent { .. }) if last_resort => {
                log::warn!("image {}: no parent ready in time; using the origin alone", view.image);
                Placement::origin_only()
            }
            other => other?,
        },
    };
    if !view.early {
        return Ok(placement);
    }
    let ready: HashSet<&str> = records.iter().filter(|r| r.state == JoinState::Ready).map(|r| r.host.as_str()).collect();
    let parents = placement
        .parents
        .into_iter()
        .enumerate()
        .filter(|(i, p)| *i == 0 || p.is_origin() || ready.contains(p.as_str()))
        .map(|(_, p)| p)
        .collect();
    Ok(Placement { parents, depth: placement.depth })
}

/// Of `parents` (the origin is skipped): those given up on (no record any more, or `Leaving`
/// or `Failed`), and those still short of `want` (see [`JoinState::reached`]).
pub fn parents_progress(parents: &[String], records: &[ImageRecord], want: JoinState) -> (Vec<String>, Vec<String>) {
    let by_host: HashMap<&str, &ImageRecord> = records.iter().map(|r| (r.host.as_str(), r)).collect();
    let (mut gone, mut waiting) = (Vec::new(), Vec::new());
    for p in parents.iter().filter(|p| p.as_str() != ORIGIN) {
        match by_host.get(p.as_str()) {
            None => gone.push(p.clone()),
            Some(r) if r.state.is_gone() => gone.push(p.clone()),
            Some(r) if !r.state.reached(want) => waiting.push(p.clone()),
            Some(_) => {}
        }
    }
    (gone, waiting)
}

/// A node's own record in state `to`, its last one having been in `from` (`None`: it has
/// none); an error if the protocol does not allow that ([`JoinState::may_follow`]).
pub fn own_record(
    host: &str,
    from: Option<JoinState>,
    to: JoinState,
    placement: &Placement,
    failure_domain: Option<String>,
    grants: BTreeMap<String, Value>,
) -> Result<ImageRecord, PlacementError> {
    placement.active_parents()?;
    Ok(ImageRecord {
        host: host.to_owned(),
        state: JoinState::transition(from, to)?,
        depth: placement.depth,
        parents: placement.parent_hosts(),
        failure_domain,
        grants,
    })
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

/// Step 4 on an in-memory list: validates `placement` against `peers`
/// ([`validate_choice`]) and, if it holds, records it: the newcomer is added as
/// [`JoinState::Joining`] with the placement's depth and parents, and its
/// parents' counters are incremented. A re-joining newcomer's old record is
/// replaced (its old slots released, its child counters kept, since its
/// children still point at it).
pub fn commit_choice(peers: &mut Vec<Peer>, newcomer: &Newcomer, placement: &Placement, policy: &Policy) -> Result<(), PlacementError> {
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
    let (children, secondary_children, old_link) = old.map(|o| (o.children, o.secondary_children, o.link_bps)).unwrap_or((0, 0, None));
    peers.push(Peer {
        host: newcomer.host.clone(),
        state: JoinState::Joining,
        depth: placement.depth,
        children,
        secondary_children,
        failure_domain: newcomer.failure_domain.clone(),
        link_bps: newcomer.link_bps.or(old_link),
        parents: placement.parent_hosts(),
    });
    Ok(())
}

/// Step 5 on an in-memory list: `host` becomes Ready, so that later newcomers
/// may choose it. False if it is not a peer, or its state may not become Ready
/// (it is leaving or failed).
pub fn mark_ready(peers: &mut [Peer], host: &str) -> bool {
    match peers.iter_mut().find(|p| p.host == host) {
        Some(p) if JoinState::may_follow(Some(p.state), JoinState::Ready) => {
            p.state = JoinState::Ready;
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::parse_image_record;
    use serde_json::json;

    fn rec(host: &str, state: &str, built: bool, depth: u32, parents: &[&str]) -> ImageRecord {
        parse_image_record(&json!({"host": host, "state": state, "built": built, "depth": depth, "parents": parents})).unwrap()
    }

    fn set(hosts: &[&str]) -> HashSet<String> {
        hosts.iter().map(|h| h.to_string()).collect()
    }

    #[test]
    fn the_protocol_lets_a_record_follow_only_the_documented_paths() {
        use JoinState::*;
        let allowed: Vec<(Option<JoinState>, JoinState)> = [None]
            .into_iter()
            .chain(JoinState::ALL.map(Some))
            .flat_map(|from| JoinState::ALL.map(move |to| (from, to)))
            .filter(|&(from, to)| JoinState::may_follow(from, to))
            .collect();
        let want = [
            (None, Joining),
            (None, Ready),
            (Some(Joining), Joining),
            (Some(Joining), Built),
            (Some(Joining), Ready),
            (Some(Joining), Leaving),
            (Some(Built), Built),
            (Some(Built), Ready),
            (Some(Built), Leaving),
            (Some(Ready), Ready),
            (Some(Ready), Leaving),
            (Some(Leaving), Leaving),
        ];
        assert_eq!(allowed, want);
        let e = JoinState::transition(Some(Ready), Joining).unwrap_err();
        assert_eq!(e.to_string(), "a record that is ready may not become joining");
        assert!(!e.is_retryable());
    }

    #[test]
    fn states_round_trip_through_the_wire_form_earlier_versions_read() {
        for s in JoinState::ALL {
            let (state, built) = s.to_wire();
            assert_eq!(JoinState::from_wire(state, built), Some(s));
        }
        assert_eq!(JoinState::Built.to_wire(), ("joining", true));
        assert_eq!(JoinState::from_wire("ready", true), Some(JoinState::Ready));
        assert_eq!(JoinState::from_wire("built", false), None);
    }

    #[test]
    fn records_become_peers_as_the_newcomer_sees_them() {
        let records = [
            rec("me", "joining", false, 1, &["origin"]),
            rec("a", "ready", false, 1, &["origin"]),
            rec("b", "ready", false, 1, &["origin"]),
            rec("c", "joining", true, 2, &["a", "origin"]),
            rec("d", "joining", false, 2, &["a", "origin"]),
            rec("e", "leaving", false, 1, &["origin"]),
            rec("f", "ready", false, 2, &["b", "origin"]),
        ];
        let (granted, exclude) = (set(&["a", "c", "d"]), set(&["f"]));
        let view = |early| View { image: "img", host: "me", failure_domain: None, granted: &granted, exclude: &exclude, early };
        let states = |early| view(early).peers(&records).into_iter().map(|p| (p.host, p.state)).collect::<Vec<_>>();
        use JoinState::*;
        let s = |h: &str, st| (h.to_string(), st);
        // Not granted: it only holds its slots. Early: granted builders are candidates.
        assert_eq!(states(false), [s("a", Ready), s("b", Joining), s("c", Built), s("d", Joining), s("e", Leaving)]);
        assert_eq!(states(true), [s("a", Ready), s("b", Joining), s("c", Ready), s("d", Ready), s("e", Leaving)]);
        let peers = view(false).peers(&records);
        assert_eq!(peers[2].parents, ["a", "origin"]);
    }

    #[test]
    fn an_early_choice_keeps_only_ready_secondaries_and_a_late_one_falls_back_to_the_origin() {
        let records = [rec("a", "ready", false, 1, &["origin"]), rec("b", "joining", false, 1, &["origin"])];
        let (only_b, none) = (set(&["b"]), HashSet::new());
        let view = View { image: "img", host: "me", failure_domain: None, granted: &only_b, exclude: &none, early: true };
        // The origin has room: placement alone would add b, still building, as a secondary.
        let roomy = Policy::with_fanout(3);
        assert_eq!(choose_parents(&view.newcomer(), &view.peers(&records), &roomy).unwrap().parent_hosts(), ["origin", "b"]);
        assert_eq!(choose(&view, &records, &roomy, None, false).unwrap(), Placement::origin_only());
        // As the primary, a parent that still builds is kept.
        let full = Policy::new(1, 2, Some(1), None);
        assert_eq!(choose(&view, &records, &full, None, false).unwrap().parent_hosts(), ["b", "origin"]);
        // Not early, b only holds its slot, as a (which has not granted us) does.
        let late = View { early: false, ..view.clone() };
        assert!(matches!(choose(&late, &records, &full, None, false), Err(PlacementError::NoFreeParent { .. })));
        assert_eq!(choose(&late, &records, &full, None, true).unwrap(), Placement::origin_only());
    }

    #[test]
    fn a_previous_choice_is_kept_while_it_holds_and_replaced_once_stale() {
        let mut records = vec![rec("a", "ready", false, 1, &["origin"]), rec("b", "ready", false, 1, &["origin"])];
        let granted = set(&["a", "b"]);
        let none = HashSet::new();
        let view = View { image: "img", host: "me", failure_domain: None, granted: &granted, exclude: &none, early: false };
        let policy = Policy::new(1, 1, Some(2), None);
        let under_b = Placement { parents: vec![ParentRef::Peer("b".into()), ParentRef::Origin], depth: 2 };
        // Both a and b have a slot: the earlier choice (b) is kept, not re-chosen (a).
        assert_eq!(choose(&view, &records, &policy, None, false).unwrap().parent_hosts(), ["a", "origin"]);
        assert_eq!(choose(&view, &records, &policy, Some(&under_b), false).unwrap(), under_b);
        // Someone took b's slot meanwhile: chosen afresh.
        records.push(rec("x", "joining", false, 2, &["b", "origin"]));
        assert_eq!(choose(&view, &records, &policy, Some(&under_b), false).unwrap().parent_hosts(), ["a", "origin"]);
    }

    #[test]
    fn parents_are_waited_for_until_they_reach_a_state_or_given_up_when_gone() {
        let records = [
            rec("a", "joining", false, 1, &["origin"]),
            rec("b", "joining", true, 1, &["origin"]),
            rec("c", "ready", false, 1, &["origin"]),
            rec("d", "leaving", false, 1, &["origin"]),
        ];
        let parents = |hs: &[&str]| hs.iter().map(|h| h.to_string()).collect::<Vec<_>>();
        let all = parents(&["a", "b", "c", "origin"]);
        assert_eq!(parents_progress(&all, &records, JoinState::Built), (vec![], parents(&["a"])));
        assert_eq!(parents_progress(&all, &records, JoinState::Ready), (vec![], parents(&["a", "b"])));
        assert_eq!(parents_progress(&parents(&["d", "e", "c"]), &records, JoinState::Ready), (parents(&["d", "e"]), vec![]));
    }

    #[test]
    fn own_records_follow_the_protocol_and_read_back_as_published() {
        let pl = Placement { parents: vec![ParentRef::Peer("a".into()), ParentRef::Origin], depth: 2 };
        let mut grants = BTreeMap::new();
        grants.insert("cn3".to_string(), json!({"sealed": "00"}));
        let r = own_record("cn1", Some(JoinState::Joining), JoinState::Built, &pl, Some("r1".into()), grants).unwrap();
        let wire = r.to_wire();
        assert_eq!((wire["state"].as_str(), wire["built"].as_bool()), (Some("joining"), Some(true)));
        assert_eq!(parse_image_record(&wire).unwrap(), r);
        assert_eq!(r.placement(), pl);
        assert!(r.with_state(JoinState::Joining).is_err());
        assert_eq!(r.with_state(JoinState::Leaving).unwrap().state, JoinState::Leaving);
        assert!(matches!(
            own_record("cn1", None, JoinState::Leaving, &pl, None, BTreeMap::new()),
            Err(PlacementError::Transition { from: None, to: JoinState::Leaving })
        ));
        let no_origin = Placement { parents: vec![ParentRef::Peer("a".into())], depth: 2 };
        assert!(own_record("cn1", None, JoinState::Joining, &no_origin, None, BTreeMap::new()).is_err());
    }
}
