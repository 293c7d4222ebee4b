//! Unit and property tests of the placement rules.
//!
//! The property tests check every answer against brute-force re-statements of
//! the rules (computed from the peers' `parents` lists, not from the module's
//! own index), so they would catch a wrong index as well as a wrong choice.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::index::domain_relation;
use super::*;

/// Cases per property test (proptest's default is 256; these are kept
/// explicit so the report and the code agree).
const CASES: u32 = 256;

// ---------------------------------------------------------------------------
// Helpers

fn peer(host: &str, depth: u32, domain: Option<&str>, parents: &[&str]) -> Peer {
    Peer {
        failure_domain: domain.map(str::to_owned),
        parents: parents.iter().map(|s| (*s).to_owned()).collect(),
        ..Peer::new(host, JoinState::Ready, depth)
    }
}

fn pref(h: &str) -> ParentRef {
    if h == ORIGIN {
        ParentRef::Origin
    } else {
        ParentRef::Peer(h.to_owned())
    }
}

fn prefs(hs: &[&str]) -> Vec<ParentRef> {
    hs.iter().map(|h| pref(h)).collect()
}

/// Joins `nc` sequentially: choose, validate, commit, mark Ready.
fn join(peers: &mut Vec<Peer>, nc: &Newcomer, policy: &Policy) -> Placement {
    let placement = choose_parents(nc, peers, policy).expect("choose");
    validate_choice(nc, &placement, peers, policy).expect("fresh choice validates");
    commit_choice(peers, nc, &placement, policy).expect("commit");
    assert!(mark_ready(peers, &nc.host));
    placement
}

/// Builds a tree of `n` sequential joins, domains assigned round-robin.
fn build(n: usize, domains: usize, policy: &Policy) -> Vec<Peer> {
    let mut peers = Vec::new();
    for i in 0..n {
        let d = format!("rack{}", i % domains.max(1));
        join(&mut peers, &Newcomer::new(format!("h{i:03}"), Some(&d)), policy);
    }
    peers
}

fn depth_of(peers: &[Peer]) -> u32 {
    peers.iter().map(|p| p.depth).max().unwrap_or(0)
}

/// Hosts that descend from `host` through any parent link (brute force).
fn brute_descendants(peers: &[Peer], host: &str) -> HashSet<String> {
    let mut out: HashSet<String> = HashSet::new();
    loop {
        let before = out.len();
        for p in peers {
            if p.parents.iter().any(|q| q == host || out.contains(q)) {
                out.insert(p.host.clone());
            }
        }
        if out.len() == before {
            return out;
        }
    }
}

/// Effective (primary, secondary) child counts and the origin's count, as the
/// module docs define them.
struct Counts {
    primary: HashMap<String, u32>,
    secondary: HashMap<String, u32>,
    origin: u32,
}

fn counts(peers: &[Peer]) -> Counts {
    let mut c = Counts { primary: HashMap::new(), secondary: HashMap::new(), origin: 0 };
    for p in peers {
        if p.state == JoinState::Failed {
            continue;
        }
        let mut seen = HashSet::new();
        for (i, q) in p.parents.iter().enumerate() {
            if q.is_empty() || !seen.insert(q.as_str()) {
                continue;
            }
            match (i, q.as_str()) {
                (0, ORIGIN) => c.origin += 1,
                (_, ORIGIN) => {}
                (0, h) => *c.primary.entry(h.to_owned()).or_default() += 1,
                (_, h) => *c.secondary.entry(h.to_owned()).or_default() += 1,
            }
        }
    }
    for p in peers {
        let e = c.primary.entry(p.host.clone()).or_default();
        *e = (*e).max(p.children);
        let e = c.secondary.entry(p.host.clone()).or_default();
        *e = (*e).max(p.secondary_children);
    }
    c
}

fn find<'a>(peers: &'a [Peer], host: &str) -> &'a Peer {
    peers.iter().find(|p| p.host == host).expect("peer exists")
}

fn active(pl: &Placement) -> Vec<ParentRef> {
    pl.active_parents().expect("well formed").to_vec()
}

/// Checks one answer of `choose_parents` against the rules, on the peers it
/// was chosen from. `domains_known`: every peer and the newcomer have a
/// failure domain (the spread property is stated for known domains).
fn check_choice(nc: &Newcomer, peers: &[Peer], policy: &Policy, pl: &Placement, domains_known: bool) -> Result<(), TestCaseError> {
    let act = pl.active_parents().map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(pl.parents.contains(&ParentRef::Origin), "origin missing: {pl:?}");
    prop_assert!(!act.is_empty() && act.len() <= policy.max_parents as usize);
    let c = counts(peers);
    let below = brute_descendants(peers, &nc.host);
    let eligible = |p: &Peer| p.state == JoinState::Ready && p.host != nc.host && !below.contains(&p.host);
    let primary_free = |p: &Peer| c.primary[&p.host] < policy.fanout;
    let secondary_free = |p: &Peer| c.secondary[&p.host] < policy.secondary_fanout;

    // Every active peer parent: Ready, not the newcomer nor below it, a free slot.
    for (pos, r) in act.iter().enumerate() {
        if let ParentRef::Peer(h) = r {
            let p = find(peers, h);
            prop_assert!(eligible(p), "ineligible parent {h}: {p:?}");
            if pos == 0 {
                prop_assert!(primary_free(p), "primary {h} full");
            } else {
                prop_assert!(secondary_free(p), "secondary {h} full");
            }
        } else {
            prop_assert_eq!(pos, 0, "origin as a secondary");
        }
    }

    // Primary: the origin iff it has room; otherwise the shallowest free peer.
    let origin_free = c.origin < policy.origin_fanout;
    prop_assert_eq!(act[0].is_origin(), origin_free);
    let primary_depth = match &act[0] {
        ParentRef::Origin => 0,
        ParentRef::Peer(h) => find(peers, h).depth,
    };
    prop_assert_eq!(pl.depth, primary_depth + 1);
    let d_star = peers.iter().filter(|p| eligible(p) && primary_free(p)).map(|p| p.depth).min();
    if !origin_free {
        prop_assert_eq!(Some(primary_depth), d_star);
    }

    // Two parents where the tree allows.
    let secondary_candidates: Vec<&Peer> = peers
        .iter()
        .filter(|p| eligible(p) && secondary_free(p) && p.depth <= primary_depth + 1 && !act.contains(&ParentRef::Peer(p.host.clone())))
        .collect();
    if act.len() < policy.max_parents as usize {
        prop_assert!(
            secondary_candidates.is_empty(),
            "only {} parents but {:?} were free",
            act.len(),
            secondary_candidates.iter().map(|p| &p.host).collect::<Vec<_>>()
        );
    }

    if origin_free {
        return Ok(());
    }
    let d_star = primary_depth;
    let at_min: Vec<&Peer> = peers.iter().filter(|p| eligible(p) && primary_free(p) && p.depth == d_star).collect();

    // Failure domains: if the free parents at the minimal depth (free in both
    // roles) span two domains, the first two parents are in different ones.
    if domains_known && policy.max_parents >= 2 {
        let domains: HashSet<&str> = at_min.iter().filter(|p| secondary_free(p)).filter_map(|p| p.failure_domain.as_deref()).collect();
        if domains.len() >= 2 {
            prop_assert!(act.len() >= 2);
            let d0 = find(peers, act[0].as_str()).failure_domain.clone();
            let d1 = find(peers, act[1].as_str()).failure_domain.clone();
            prop_assert!(d0.is_some() && d1.is_some() && d0 != d1, "same domain {d0:?}");
        }
    }

    // Children of one parent are spread: among the best-domain candidates at
    // the minimal depth, one with no child in the newcomer's domain wins over
    // those with such children.
    let nd = nc.failure_domain.as_deref();
    if nd.is_some() {
        let mut in_nd: HashMap<&str, usize> = HashMap::new();
        for p in peers.iter().filter(|p| p.state != JoinState::Failed && p.failure_domain.as_deref() == nd) {
            let mut seen = HashSet::new();
            for q in p.parents.iter().filter(|q| seen.insert(q.as_str())) {
                *in_nd.entry(q.as_str()).or_default() += 1;
            }
        }
        let kids_in = |h: &str| in_nd.get(h).copied().unwrap_or(0);
        let rel = |p: &Peer| domain_relation(p.failure_domain.as_deref(), nd);
        let best_rel = at_min.iter().map(|p| rel(p)).min().expect("primary exists");
        let spread_possible = at_min.iter().any(|p| rel(p) == best_rel && kids_in(&p.host) == 0);
        let chosen = find(peers, act[0].as_str());
        prop_assert_eq!(rel(chosen), best_rel);
        if spread_possible {
            prop_assert_eq!(kids_in(&chosen.host), 0);
        }
    }
    Ok(())
}

/// Whole-tree invariants after commits.
fn check_tree(peers: &[Peer], policy: &Policy) -> Result<(), TestCaseError> {
    let by_host: HashMap<&str, &Peer> = peers.iter().map(|p| (p.host.as_str(), p)).collect();
    prop_assert_eq!(by_host.len(), peers.len(), "duplicate hosts");
    let c = counts(peers);
    prop_assert!(c.origin <= policy.origin_fanout, "origin fan-out {} > {}", c.origin, policy.origin_fanout);
    for p in peers {
        prop_assert!(c.primary[&p.host] <= policy.fanout, "{} has {} primary children", p.host, c.primary[&p.host]);
        prop_assert!(c.secondary[&p.host] <= policy.secondary_fanout);
        // Counters are kept in sync by commit_choice.
        prop_assert_eq!(p.children, c.primary[&p.host]);
        prop_assert_eq!(p.secondary_children, c.secondary[&p.host]);
        prop_assert_eq!(p.parents.iter().filter(|q| *q == ORIGIN).count(), 1);
        prop_assert!(p.parents.len() <= policy.max_parents as usize + 1);
        let expected = match p.parents[0].as_str() {
            ORIGIN => 1,
            h => by_host[h].depth + 1,
        };
        prop_assert_eq!(p.depth, expected, "depth of {}", p.host);
        // Following primaries reaches the origin.
        let mut cur = p;
        let mut steps = 0;
        while cur.parents[0] != ORIGIN {
            cur = by_host[cur.parents[0].as_str()];
            steps += 1;
            prop_assert!(steps <= peers.len(), "primary chain of {} loops", p.host);
        }
    }
    check_acyclic(peers)
}

/// No cycle through any parent link: Kahn's algorithm consumes every node.
fn check_acyclic(peers: &[Peer]) -> Result<(), TestCaseError> {
    let mut pending: HashMap<&str, usize> =
        peers.iter().map(|p| (p.host.as_str(), p.parents.iter().filter(|q| *q != ORIGIN).count())).collect();
    let mut ready: Vec<&str> = pending.iter().filter(|(_, &n)| n == 0).map(|(h, _)| *h).collect();
    let mut kids: HashMap<&str, Vec<&str>> = HashMap::new();
    for p in peers {
        for q in p.parents.iter().filter(|q| *q != ORIGIN) {
            kids.entry(q.as_str()).or_default().push(p.host.as_str());
        }
    }
    let mut done = 0;
    while let Some(h) = ready.pop() {
        done += 1;
        for &k in kids.get(h).map(Vec::as_slice).unwrap_or(&[]) {
            let n = pending.get_mut(k).expect("known");
            *n -= 1;
            if *n == 0 {
                ready.push(k);
            }
        }
    }
    prop_assert_eq!(done, peers.len(), "a cycle through parent links");
    Ok(())
}

fn policy_strategy() -> impl Strategy<Value = Policy> {
    (1u32..=5, 1u32..=3, 1u32..=6, 0u32..=5).prop_map(|(fanout, max_parents, origin_fanout, secondary_fanout)| Policy {
        fanout,
        max_parents,
        origin_fanout,
        secondary_fanout,
    })
}

// ---------------------------------------------------------------------------
// Property tests

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// N sequential joins: every choice obeys the rules and, after every
    /// join, fan-out (origin included) holds, depth <= ceil(log_k N) + 1, no
    /// cycles, every primary chain reaches the origin.
    #[test]
    fn sequential_joins_keep_all_invariants(
        policy in policy_strategy(),
        nodes in prop::collection::vec((0u8..4, prop::option::of(0u64..4)), 1..120),
    ) {
        let mut peers: Vec<Peer> = Vec::new();
        for (i, (dom, link)) in nodes.iter().enumerate() {
            let mut nc = Newcomer::new(format!("h{i:03}"), Some(&format!("rack{dom}")));
            nc.link_bps = link.map(|l| (l + 1) * 10_000_000_000);
            let pl = choose_parents(&nc, &peers, &policy).map_err(|e| TestCaseError::fail(e.to_string()))?;
            check_choice(&nc, &peers, &policy, &pl, true)?;
            prop_assert_eq!(validate_choice(&nc, &pl, &peers, &policy), Ok(()));
            commit_choice(&mut peers, &nc, &pl, &policy).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(mark_ready(&mut peers, &nc.host));
            check_tree(&peers, &policy)?;
            let bound = tree_depth_bound(peers.len(), policy.fanout);
            prop_assert!(depth_of(&peers) <= bound,
                "depth {} > bound {} after {} joins", depth_of(&peers), bound, peers.len());
        }
    }

    /// Arbitrary peer lists (any states, stale counters, unknown domains,
    /// re-joining newcomers): Joining/Leaving/Failed peers, the newcomer and
    /// its descendants are never chosen, slots are respected, the origin is
    /// always in the list; NoFreeParent only when nothing is free.
    #[test]
    fn arbitrary_snapshots_never_choose_unready_or_full(
        policy in policy_strategy(),
        raw in prop::collection::vec(
            (0u8..5, 1u32..6, 0u32..5, 0u32..5, prop::option::of(0u8..3),
             prop::option::of(0u64..3), any::<prop::sample::Index>(), any::<prop::sample::Index>()),
            0..30),
        newcomer_pick in any::<prop::sample::Index>(),
        newcomer_is_peer in any::<bool>(),
        newcomer_domain in prop::option::of(0u8..3),
    ) {
        let states = JoinState::ALL;
        let mut peers: Vec<Peer> = Vec::new();
        for (i, (st, depth, kids, skids, dom, link, prim, sec)) in raw.iter().enumerate() {
            // Parents among earlier peers or the origin, so some links exist.
            let earlier = |ix: &prop::sample::Index| -> String {
                let k = ix.index(i + 1);
                if k == i { ORIGIN.to_owned() } else { format!("p{k}") }
            };
            let mut parents = vec![earlier(prim)];
            let s = earlier(sec);
            if !parents.contains(&s) && s != ORIGIN { parents.push(s); }
            if parents[0] != ORIGIN { parents.push(ORIGIN.to_owned()); }
            peers.push(Peer {
                host: format!("p{i}"),
                state: states[*st as usize],
                depth: *depth,
                children: *kids,
                secondary_children: *skids,
                failure_domain: dom.map(|d| format!("z{d}")),
                link_bps: *link,
                parents,
            });
        }
        let host = if newcomer_is_peer && !peers.is_empty() {
            peers[newcomer_pick.index(peers.len())].host.clone()
        } else {
            "new".to_owned()
        };
        let nc = Newcomer::new(host, newcomer_domain.map(|d| format!("z{d}")).as_deref());
        match choose_parents(&nc, &peers, &policy) {
            Ok(pl) => {
                check_choice(&nc, &peers, &policy, &pl, false)?;
                prop_assert_eq!(validate_choice(&nc, &pl, &peers, &policy), Ok(()));
            }
            Err(PlacementError::NoFreeParent { .. }) => {
                let c = counts(&peers);
                let below = brute_descendants(&peers, &nc.host);
                prop_assert!(c.origin >= policy.origin_fanout);
                prop_assert!(!peers.iter().any(|p| p.state == JoinState::Ready
                    && p.host != nc.host && !below.contains(&p.host)
                    && c.primary[&p.host] < policy.fanout));
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    /// A node re-joins while its old subtree still points at it: it never
    /// picks itself or a descendant, and the tree stays acyclic.
    #[test]
    fn rejoining_node_never_creates_a_cycle(
        policy in policy_strategy(),
        n in 2usize..60,
        domains in 1usize..4,
        pick in any::<prop::sample::Index>(),
        as_failed in any::<bool>(),
    ) {
        let mut peers = build(n, domains, &policy);
        let host = peers[pick.index(n)].host.clone();
        let below = brute_descendants(&peers, &host);
        // Its old record is either still there (marked Joining or Failed) or gone.
        let old = peers.iter_mut().find(|p| p.host == host).expect("exists");
        old.state = if as_failed { JoinState::Failed } else { JoinState::Joining };
        let nc = Newcomer::new(host.clone(), Some("rack0"));
        match choose_parents(&nc, &peers, &policy) {
            Ok(pl) => {
                for r in active(&pl) {
                    prop_assert!(r.as_str() != host && !below.contains(r.as_str()), "{r} is below {host}");
                }
                check_choice(&nc, &peers, &policy, &pl, false)?;
                commit_choice(&mut peers, &nc, &pl, &policy).map_err(|e| TestCaseError::fail(e.to_string()))?;
                // Only acyclicity and fan-out: the old subtree's depths are stale by design.
                let c = counts(&peers);
                prop_assert!(c.origin <= policy.origin_fanout);
                for p in &peers {
                    prop_assert!(c.primary[&p.host] <= policy.fanout);
                    prop_assert!(c.secondary[&p.host] <= policy.secondary_fanout);
                }
                check_acyclic(&peers)?;
            }
            Err(PlacementError::NoFreeParent { .. }) => {
                // Everything outside its subtree was full.
                let c = counts(&peers);
                prop_assert!(c.origin >= policy.origin_fanout);
                prop_assert!(peers.iter().filter(|p| p.host != host && !below.contains(&p.host))
                    .all(|p| c.primary[&p.host] >= policy.fanout));
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    /// Racing joiners: each batch chooses from ONE snapshot, then commits one
    /// by one under the image lock with validate_choice, re-choosing on a stale
    /// choice. Fan-out is never exceeded (checked after every commit), nothing
    /// Joining is ever chosen, and the depth bound still holds.
    #[test]
    fn racing_joiners_with_lock_never_exceed_fanout(
        policy in policy_strategy(),
        n in 1usize..100,
        batch_sizes in prop::collection::vec(1usize..10, 1..40),
        domains in 1usize..4,
    ) {
        let mut peers: Vec<Peer> = Vec::new();
        let mut waiting: Vec<Newcomer> = (0..n)
            .map(|i| Newcomer::new(format!("h{i:03}"), Some(&format!("rack{}", i % domains))))
            .collect();
        waiting.reverse();
        let mut rounds = 0usize;
        while !waiting.is_empty() {
            rounds += 1;
            prop_assert!(rounds <= 10 * n + 10, "no progress");
            let size = batch_sizes[rounds % batch_sizes.len()];
            let batch: Vec<Newcomer> = (0..size).filter_map(|_| waiting.pop()).collect();
            let snapshot = peers.clone();
            let choices: Vec<_> = batch.iter().map(|nc| choose_parents(nc, &snapshot, &policy)).collect();
            let mut deferred = Vec::new();
            for (nc, choice) in batch.into_iter().zip(choices) {
                // --- under the image lock ---
                let mut pl = match choice {
                    Ok(pl) => pl,
                    Err(PlacementError::NoFreeParent { .. }) => { deferred.push(nc); continue; }
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                };
                match validate_choice(&nc, &pl, &peers, &policy) {
                    Ok(()) => {}
                    Err(e @ PlacementError::Stale { .. }) => {
                        prop_assert!(e.is_retryable());
                        match choose_parents(&nc, &peers, &policy) {
                            Ok(fresh) => pl = fresh,
                            Err(PlacementError::NoFreeParent { .. }) => { deferred.push(nc); continue; }
                            Err(e) => return Err(TestCaseError::fail(e.to_string())),
                        }
                    }
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
                for r in active(&pl) {
                    if let ParentRef::Peer(h) = r {
                        prop_assert_eq!(find(&peers, &h).state, JoinState::Ready);
                    }
                }
                commit_choice(&mut peers, &nc, &pl, &policy).map_err(|e| TestCaseError::fail(e.to_string()))?;
                check_tree(&peers, &policy)?;
                let bound = tree_depth_bound(peers.len(), policy.fanout);
                prop_assert!(depth_of(&peers) <= bound, "depth {} > bound {}", depth_of(&peers), bound);
            }
            // Exports verified at the end of the round.
            let joined: Vec<String> = peers.iter().filter(|p| p.state == JoinState::Joining).map(|p| p.host.clone()).collect();
            for h in joined { mark_ready(&mut peers, &h); }
            for nc in deferred.into_iter().rev() { waiting.push(nc); }
        }
        prop_assert_eq!(peers.len(), n);
    }
}

// ---------------------------------------------------------------------------
// The fan-out accounting decision

/// Counting secondary children against the same `fanout` budget (emulated by
/// keeping both counters equal to the total, with `secondary_fanout ==
/// fanout`) breaks the depth bound, which is why `fanout` counts primary
/// children only (see the module docs).
#[test]
fn counting_both_roles_in_one_budget_breaks_the_depth_bound() {
    fn depth_counting_both(n: usize, k: u32) -> u32 {
        let policy = Policy::with_fanout(k);
        let mut peers: Vec<Peer> = Vec::new();
        for i in 0..n {
            let nc = Newcomer::new(format!("h{i:03}"), Some(["a", "b"][i % 2]));
            let pl = choose_parents(&nc, &peers, &policy).expect("choose");
            commit_choice(&mut peers, &nc, &pl, &policy).expect("commit");
            mark_ready(&mut peers, &nc.host);
            let mut total: HashMap<String, u32> = HashMap::new();
            for p in &peers {
                for q in p.parents.iter().filter(|q| *q != ORIGIN) {
                    *total.entry(q.clone()).or_default() += 1;
                }
            }
            for p in &mut peers {
                let t = total.get(&p.host).copied().unwrap_or(0);
                p.children = t;
                p.secondary_children = t;
            }
        }
        depth_of(&peers)
    }
    // Recorded in the module docs: 64 joins reach depth 32 / 6 / 5 for
    // k = 2 / 3 / 4 against bounds 7 / 5 / 4.
    for (k, depth) in [(2, 32), (3, 6), (4, 5)] {
        assert_eq!(depth_counting_both(64, k), depth, "k = {k}");
        assert!(depth > tree_depth_bound(64, k));
    }
    // Primary-only counting, same joins: within the bound.
    for k in 2..=4 {
        assert!(depth_of(&build(64, 2, &Policy::with_fanout(k))) <= tree_depth_bound(64, k));
    }
}

// ---------------------------------------------------------------------------
// Unit tests

#[test]
fn empty_peers_gives_origin_only() {
    let pl = choose_parents(&Newcomer::new("a", Some("r1")), &[], &Policy::default()).unwrap();
    assert_eq!(pl.parents, vec![ParentRef::Origin]);
    assert_eq!(pl.depth, 1);
    assert_eq!(pl, Placement::origin_only());
}

#[test]
fn second_node_gets_origin_primary_and_first_node_secondary() {
    let policy = Policy::default();
    let mut peers = Vec::new();
    join(&mut peers, &Newcomer::new("a", Some("r1")), &policy);
    let pl = choose_parents(&Newcomer::new("b", Some("r2")), &peers, &policy).unwrap();
    assert_eq!(pl.parents, prefs(&[ORIGIN, "a"]));
    assert_eq!(pl.depth, 1);
}

#[test]
fn all_full_goes_deeper() {
    let policy = Policy::with_fanout(2);
    let peers = build(6, 2, &policy); // 2 at depth 1, 4 at depth 2: all of depth <= 1 full
    assert_eq!(peers.iter().filter(|p| p.depth == 1).count(), 2);
    assert_eq!(peers.iter().filter(|p| p.depth == 2).count(), 4);
    let pl = choose_parents(&Newcomer::new("x", Some("rack0")), &peers, &policy).unwrap();
    assert_eq!(pl.depth, 3);
    assert_eq!(pl.parents.len(), 3);
    assert_eq!(pl.parents.last(), Some(&ParentRef::Origin));
}

#[test]
fn single_domain_still_gets_two_parents() {
    let policy = Policy::with_fanout(2);
    let peers = build(5, 1, &policy);
    let pl = choose_parents(&Newcomer::new("x", Some("rack0")), &peers, &policy).unwrap();
    assert_eq!(active(&pl).len(), 2);
    assert!(pl.parents.contains(&ParentRef::Origin));
}

#[test]
fn unknown_domains_still_get_two_parents() {
    let policy = Policy::with_fanout(2);
    let peers = vec![
        Peer { children: 2, parents: vec![ORIGIN.into()], ..peer("a", 1, None, &[]) },
        Peer { children: 2, parents: vec![ORIGIN.into()], ..peer("b", 1, None, &[]) },
        peer("c", 2, None, &["a", "origin"]),
        peer("d", 2, None, &["a", "origin"]),
    ];
    // c is the primary (shallowest free); a, full only for primaries and
    // shallower than d, is the secondary.
    let pl = choose_parents(&Newcomer::new("x", None), &peers, &policy).unwrap();
    assert_eq!(pl.parents, prefs(&["c", "a", ORIGIN]));
    assert_eq!(pl.depth, 3);
}

#[test]
fn only_ready_peers_are_chosen() {
    let policy = Policy::with_fanout(1);
    let mut peers = vec![peer("full", 1, None, &["origin"])];
    peers[0].children = 1;
    for (h, st) in [("j", JoinState::Joining), ("l", JoinState::Leaving), ("f", JoinState::Failed)] {
        peers.push(Peer { state: st, ..peer(h, 1, None, &[]) });
    }
    peers.push(peer("ok", 5, None, &[]));
    let pl = choose_parents(&Newcomer::new("x", None), &peers, &policy).unwrap();
    // "full" has no primary slot left but a free secondary one.
    assert_eq!(pl.parents, prefs(&["ok", "full", ORIGIN]));
    assert_eq!(pl.depth, 6);
}

#[test]
fn only_joining_peers_free_gives_no_free_parent() {
    let policy = Policy::with_fanout(1);
    let peers = vec![peer("a", 1, None, &["origin"]), Peer { state: JoinState::Joining, ..peer("b", 2, None, &["a", "origin"]) }];
    let err = choose_parents(&Newcomer::new("x", None), &peers, &policy).unwrap_err();
    assert_eq!(err, PlacementError::NoFreeParent { ready_full: 1, joining: 1 });
    assert!(err.is_retryable());
    assert!(err.to_string().contains("retry later"), "{err}");
}

#[test]
fn failed_children_free_their_slot_but_declared_counters_win() {
    let policy = Policy::with_fanout(1);
    // a's only child failed: its slot is free again (declared counter 0).
    let peers = vec![peer("a", 1, None, &["origin"]), Peer { state: JoinState::Failed, ..peer("b", 2, None, &["a", "origin"]) }];
    let pl = choose_parents(&Newcomer::new("x", None), &peers, &policy).unwrap();
    assert_eq!(pl.parents[0], pref("a"));
    // A stale declared counter makes it look full.
    let mut peers = peers;
    peers[0].children = 1;
    assert!(choose_parents(&Newcomer::new("x", None), &peers, &policy).is_err());
}

#[test]
fn newcomer_and_its_descendants_are_never_chosen() {
    let policy = Policy::with_fanout(2);
    // x re-joins; y and z still hang below it, w is elsewhere.
    let peers = vec![
        Peer { children: 2, ..peer("w", 1, None, &["origin"]) },
        Peer { state: JoinState::Failed, ..peer("x", 1, None, &["origin"]) },
        peer("y", 2, None, &["x", "origin"]),
        peer("z", 3, None, &["y", "origin"]),
        peer("v", 2, None, &["w", "origin"]),
        peer("u", 2, None, &["w", "y", "origin"]),
    ];
    // Origin has room (x failed): origin primary; secondary must avoid y and z
    // and also u (u lists y as a parent).
    let pl = choose_parents(&Newcomer::new("x", None), &peers, &policy).unwrap();
    assert_eq!(pl.parents, prefs(&[ORIGIN, "w"]));
    // Fill the origin: now the primary must come from outside x's subtree.
    let mut peers = peers;
    peers.push(Peer { children: 2, ..peer("t", 1, None, &["origin"]) });
    // t (depth 1, secondary slots free) is the secondary; u is below x.
    let pl = choose_parents(&Newcomer::new("x", None), &peers, &policy).unwrap();
    assert_eq!(pl.parents, prefs(&["v", "t", ORIGIN]));
}

#[test]
fn primary_tie_breaks() {
    let policy = Policy::with_fanout(4);
    let full_origin = |extra: Vec<Peer>| {
        let mut v: Vec<Peer> = (0..4).map(|i| Peer { children: 4, ..peer(&format!("o{i}"), 1, Some("zz"), &["origin"]) }).collect();
        v.extend(extra);
        v
    };
    let p1 = |h: &str, d: Option<&str>, kids: u32, link: Option<u64>| Peer {
        children: kids,
        link_bps: link,
        ..peer(h, 2, d, &["o0", "origin"])
    };
    let one = Policy { max_parents: 1, ..policy };
    let nc = Newcomer::new("x", Some("r1"));
    let pick = |peers: Vec<Peer>| choose_parents(&nc, &full_origin(peers), &one).unwrap().parents[0].clone();
    // Shallower beats everything.
    assert_eq!(pick(vec![p1("a", Some("r1"), 3, None), Peer { depth: 3, ..p1("b", Some("r2"), 0, Some(9)) }]), pref("a"));
    // Different domain beats more free slots.
    assert_eq!(pick(vec![p1("a", Some("r1"), 0, None), p1("b", Some("r2"), 3, None)]), pref("b"));
    // Unknown domain ranks between different and same.
    assert_eq!(pick(vec![p1("a", Some("r1"), 0, None), p1("b", None, 3, None)]), pref("b"));
    assert_eq!(pick(vec![p1("a", None, 0, None), p1("b", Some("r2"), 3, None)]), pref("b"));
    // More free slots.
    assert_eq!(pick(vec![p1("a", Some("r2"), 2, None), p1("b", Some("r3"), 1, None)]), pref("b"));
    // Higher link speed; known beats unknown.
    assert_eq!(pick(vec![p1("a", Some("r2"), 1, Some(1)), p1("b", Some("r3"), 1, Some(2))]), pref("b"));
    assert_eq!(pick(vec![p1("a", Some("r2"), 1, None), p1("b", Some("r3"), 1, Some(0))]), pref("b"));
    // Host name last.
    assert_eq!(pick(vec![p1("b", Some("r2"), 1, None), p1("a", Some("r3"), 1, None)]), pref("a"));
}

#[test]
fn primary_spreads_one_parents_children_over_domains() {
    let policy = Policy { max_parents: 1, ..Policy::with_fanout(3) };
    let peers = vec![
        Peer { children: 3, ..peer("o", 1, Some("r9"), &["origin"]) },
        Peer { children: 3, ..peer("o2", 1, Some("r9"), &["origin"]) },
        Peer { children: 3, ..peer("o3", 1, Some("r9"), &["origin"]) },
        // a has more free slots but already a child in r1.
        Peer { children: 1, ..peer("a", 2, Some("r2"), &["o", "origin"]) },
        Peer { children: 2, ..peer("b", 2, Some("r3"), &["o", "origin"]) },
        peer("c1", 3, Some("r1"), &["a", "origin"]),
        peer("c2", 3, Some("r2"), &["b", "origin"]),
        peer("c3", 3, Some("r2"), &["b", "origin"]),
    ];
    let pl = choose_parents(&Newcomer::new("x", Some("r1")), &peers, &policy).unwrap();
    assert_eq!(pl.parents[0], pref("b"));
}

#[test]
fn secondary_prefers_other_domain_at_next_depth_and_independent_paths() {
    let policy = Policy::with_fanout(2);
    let base = || {
        vec![
            Peer { children: 2, ..peer("a", 1, Some("r1"), &["origin"]) },
            Peer { children: 1, ..peer("b", 1, Some("r1"), &["origin"]) },
            peer("c", 2, Some("r2"), &["a", "origin"]),
            peer("d", 2, Some("r1"), &["a", "origin"]),
            peer("e", 2, Some("r1"), &["b", "origin"]),
        ]
    };
    // Primary b (depth 1, the only free slot there); a is same-domain and full
    // only for primaries, c is at the next depth in another domain: c wins.
    let pl = choose_parents(&Newcomer::new("x", Some("r3")), &base(), &policy).unwrap();
    assert_eq!(pl.parents, prefs(&["b", "c", ORIGIN]));
    assert_eq!(pl.depth, 2);
    // Without c: same-domain candidates only; a (same depth, not below b)
    // beats e (below b) and d.
    let mut peers = base();
    peers.retain(|p| p.host != "c");
    let pl = choose_parents(&Newcomer::new("x", Some("r3")), &peers, &policy).unwrap();
    assert_eq!(pl.parents, prefs(&["b", "a", ORIGIN]));
    // Nothing deeper than primary depth + 1 is a secondary, even in another
    // domain: primary a (depth 1), b and c have no secondary slot left, g
    // (depth 3) is too deep.
    let peers = vec![
        peer("a", 1, Some("r1"), &["origin"]),
        Peer { secondary_children: 2, ..peer("b", 1, Some("r1"), &["origin"]) },
        Peer { secondary_children: 2, ..peer("c", 2, Some("r1"), &["b", "origin"]) },
        peer("g", 3, Some("r2"), &["c", "origin"]),
    ];
    let pl = choose_parents(&Newcomer::new("x", Some("r3")), &peers, &policy).unwrap();
    assert_eq!(pl.parents, prefs(&["a", ORIGIN]));
    assert_eq!(pl.depth, 2);
}

#[test]
fn max_parents_one_and_three() {
    let peers = build(10, 3, &Policy::with_fanout(3));
    let one = Policy { max_parents: 1, ..Policy::with_fanout(3) };
    let pl = choose_parents(&Newcomer::new("x", Some("rack0")), &peers, &one).unwrap();
    assert_eq!(pl.parents.len(), 2);
    assert_eq!(pl.parents[1], ParentRef::Origin);
    let three = Policy { max_parents: 3, ..Policy::with_fanout(3) };
    let pl = choose_parents(&Newcomer::new("x", Some("rack0")), &peers, &three).unwrap();
    assert_eq!(active(&pl).len(), 3);
    let domains: HashSet<_> = active(&pl).iter().map(|r| find(&peers, r.as_str()).failure_domain.clone()).collect();
    assert_eq!(domains.len(), 3, "{pl:?}");
    // secondary_fanout 0 disables secondaries.
    let none = Policy { secondary_fanout: 0, ..Policy::with_fanout(3) };
    let pl = choose_parents(&Newcomer::new("x", Some("rack0")), &peers, &none).unwrap();
    assert_eq!(active(&pl).len(), 1);
}

#[test]
fn origin_fanout_is_independent() {
    let policy = Policy { origin_fanout: 1, ..Policy::with_fanout(2) };
    let peers = build(3, 2, &policy);
    assert_eq!(peers.iter().filter(|p| p.depth == 1).count(), 1);
    let wide = Policy { origin_fanout: 5, ..Policy::with_fanout(2) };
    let peers = build(5, 2, &wide);
    assert!(peers.iter().all(|p| p.depth == 1));
}

#[test]
fn input_errors_name_the_bad_value() {
    let nc = Newcomer::new("x", None);
    let e = choose_parents(&nc, &[], &Policy { fanout: 0, ..Policy::default() }).unwrap_err();
    assert_eq!(e, PlacementError::InvalidPolicy { field: "fanout", value: 0, reason: "must be at least 1" });
    assert_eq!(e.to_string(), "invalid policy: fanout = 0: must be at least 1");
    assert!(!e.is_retryable());
    let e = choose_parents(&nc, &[], &Policy { max_parents: 0, ..Policy::default() }).unwrap_err();
    assert!(matches!(e, PlacementError::InvalidPolicy { field: "max_parents", .. }));
    let e = choose_parents(&nc, &[], &Policy { origin_fanout: 0, ..Policy::default() }).unwrap_err();
    assert!(matches!(e, PlacementError::InvalidPolicy { field: "origin_fanout", .. }));

    let e = choose_parents(&Newcomer::new("", None), &[], &Policy::default()).unwrap_err();
    assert_eq!(e, PlacementError::EmptyHost { what: "newcomer.host".into() });
    let e = choose_parents(&Newcomer::new("origin", None), &[], &Policy::default()).unwrap_err();
    assert_eq!(e, PlacementError::ReservedHost { host: "origin".into() });

    let peers = vec![peer("a", 1, None, &["origin"]), peer("", 1, None, &["origin"])];
    let e = choose_parents(&nc, &peers, &Policy::default()).unwrap_err();
    assert_eq!(e, PlacementError::EmptyHost { what: "peers[1].host".into() });
    assert_eq!(e.to_string(), "peers[1].host is empty");
    let peers = vec![peer("a", 1, None, &["origin"]), peer("a", 2, None, &["origin"])];
    let e = choose_parents(&nc, &peers, &Policy::default()).unwrap_err();
    assert_eq!(e, PlacementError::DuplicateHost { host: "a".into() });
    assert!(e.to_string().contains("\"a\""));
    let peers = vec![peer("origin", 1, None, &["origin"])];
    assert!(matches!(choose_parents(&nc, &peers, &Policy::default()), Err(PlacementError::ReservedHost { .. })));
    let peers = vec![peer("a", 0, None, &["origin"])];
    assert_eq!(choose_parents(&nc, &peers, &Policy::default()).unwrap_err(), PlacementError::InvalidDepth { host: "a".into(), depth: 0 });
    // Depth overflow of the primary is reported, not wrapped.
    let peers = vec![
        Peer { children: 3, ..peer("a", 1, None, &["origin"]) },
        Peer { children: 3, ..peer("b", 1, None, &["origin"]) },
        Peer { children: 3, ..peer("c", 1, None, &["origin"]) },
        peer("deep", u32::MAX, None, &["a", "origin"]),
    ];
    assert!(matches!(choose_parents(&nc, &peers, &Policy::default()), Err(PlacementError::InvalidDepth { .. })));
}

#[test]
fn validate_choice_detects_races_and_changes() {
    let policy = Policy::with_fanout(2);
    let peers = build(4, 2, &policy);
    let nc = Newcomer::new("x", Some("rack0"));
    let pl = choose_parents(&nc, &peers, &policy).unwrap();
    assert_eq!(validate_choice(&nc, &pl, &peers, &policy), Ok(()));
    let primary = pl.parents[0].as_str().to_owned();

    // Someone else took the primary's last slots meanwhile.
    let mut raced = peers.clone();
    for h in ["y1", "y2"] {
        let other = Newcomer::new(h, Some("rack1"));
        let p = Placement { parents: prefs(&[&primary, ORIGIN]), depth: pl.depth };
        if commit_choice(&mut raced, &other, &p, &policy).is_err() {
            break;
        }
    }
    let e = validate_choice(&nc, &pl, &raced, &policy).unwrap_err();
    assert!(
        matches!(&e, PlacementError::Stale { parent, reason: StaleReason::Full { role: Role::Primary, .. } } if *parent == primary),
        "{e:?}"
    );

    // The primary failed / left / vanished.
    for st in [JoinState::Failed, JoinState::Leaving, JoinState::Joining] {
        let mut changed = peers.clone();
        changed.iter_mut().find(|p| p.host == primary).unwrap().state = st;
        let e = validate_choice(&nc, &pl, &changed, &policy).unwrap_err();
        assert_eq!(e, PlacementError::Stale { parent: primary.clone(), reason: StaleReason::NotReady { state: st } });
    }
    let mut gone = peers.clone();
    gone.retain(|p| p.host != primary);
    assert_eq!(
        validate_choice(&nc, &pl, &gone, &policy).unwrap_err(),
        PlacementError::Stale { parent: primary.clone(), reason: StaleReason::Missing }
    );
    // The primary moved.
    let mut moved = peers.clone();
    moved.iter_mut().find(|p| p.host == primary).unwrap().depth += 1;
    assert!(matches!(
        validate_choice(&nc, &pl, &moved, &policy),
        Err(PlacementError::Stale { reason: StaleReason::DepthChanged { .. }, .. })
    ));
    // The secondary is full.
    let sec = pl.parents[1].as_str().to_owned();
    let mut full = peers.clone();
    full.iter_mut().find(|p| p.host == sec).unwrap().secondary_children = 2;
    assert!(matches!(
        validate_choice(&nc, &pl, &full, &policy),
        Err(PlacementError::Stale { reason: StaleReason::Full { role: Role::Secondary, .. }, .. })
    ));
    // The newcomer itself or a descendant of it.
    let me = Placement { parents: prefs(&["x", ORIGIN]), depth: 2 };
    let mut with_me = peers.clone();
    with_me.push(peer("x", 1, None, &["origin"]));
    assert!(matches!(validate_choice(&nc, &me, &with_me, &policy), Err(PlacementError::Stale { reason: StaleReason::IsNewcomer, .. })));
    with_me.push(peer("kid", 2, None, &["x", "origin"]));
    let below = Placement { parents: prefs(&["kid", ORIGIN]), depth: 3 };
    assert!(matches!(validate_choice(&nc, &below, &with_me, &policy), Err(PlacementError::Stale { reason: StaleReason::Descendant, .. })));
}

#[test]
fn validate_choice_rejects_malformed_placements() {
    let policy = Policy::with_fanout(2);
    let peers = build(4, 2, &policy);
    let nc = Newcomer::new("x", None);
    let bad = |parents: &[&str], depth| {
        let pl = Placement { parents: prefs(parents), depth };
        matches!(validate_choice(&nc, &pl, &peers, &policy), Err(PlacementError::MalformedPlacement { .. }))
    };
    assert!(bad(&[], 1));
    assert!(bad(&["h002"], 2)); // no origin
    assert!(bad(&["h002", ORIGIN, "h003"], 2)); // origin in the middle
    assert!(bad(&[ORIGIN, ORIGIN], 1));
    assert!(bad(&["h002", "h002", ORIGIN], 2));
    assert!(bad(&["h002", "h003", "h000", ORIGIN], 2)); // 3 > max_parents
    let reserved = Placement { parents: vec![ParentRef::Peer("origin".into()), ParentRef::Origin], depth: 1 };
    assert!(validate_choice(&nc, &reserved, &peers, &policy).is_err());
}

#[test]
fn racing_without_the_lock_would_overflow() {
    let policy = Policy::with_fanout(2);
    let mut peers = Vec::new();
    join(&mut peers, &Newcomer::new("a", None), &policy);
    // Three newcomers see one free origin slot in the same snapshot.
    let snapshot = peers.clone();
    let ncs: Vec<_> = ["x", "y", "z"].iter().map(|h| Newcomer::new(*h, None)).collect();
    let choices: Vec<_> = ncs.iter().map(|nc| choose_parents(nc, &snapshot, &policy).unwrap()).collect();
    assert!(choices.iter().all(|pl| pl.parents[0] == ParentRef::Origin));
    // Under the lock only the first one passes.
    assert_eq!(commit_choice(&mut peers, &ncs[0], &choices[0], &policy), Ok(()));
    let e = commit_choice(&mut peers, &ncs[1], &choices[1], &policy).unwrap_err();
    assert!(matches!(e, PlacementError::Stale { ref parent, .. } if parent == ORIGIN));
    // Re-choosing under the lock: a is Ready, x is still Joining.
    let again = choose_parents(&ncs[1], &peers, &policy).unwrap();
    assert_eq!(again.parents, prefs(&["a", ORIGIN]));
}

#[test]
fn commit_and_remove_keep_counters() {
    let policy = Policy::with_fanout(2);
    let mut peers = build(4, 2, &policy);
    let c = counts(&peers);
    assert_eq!(c.origin, 2);
    let pl = choose_parents(&Newcomer::new("x", Some("rack1")), &peers, &policy).unwrap();
    commit_choice(&mut peers, &Newcomer::new("x", Some("rack1")), &pl, &policy).unwrap();
    let x = find(&peers, "x").clone();
    assert_eq!(x.state, JoinState::Joining);
    assert_eq!(x.parents, pl.parent_hosts());
    assert_eq!(find(&peers, pl.parents[0].as_str()).children, counts(&peers).primary[pl.parents[0].as_str()]);
    let removed = remove_peer(&mut peers, "x").unwrap();
    assert_eq!(removed.host, "x");
    for p in &peers {
        assert_eq!(p.children, counts(&peers).primary[&p.host]);
        assert_eq!(p.secondary_children, counts(&peers).secondary[&p.host]);
    }
    assert!(remove_peer(&mut peers, "nobody").is_none());
    assert!(!mark_ready(&mut peers, "nobody"));
}

#[test]
fn rejoin_replaces_the_old_record() {
    let policy = Policy::with_fanout(2);
    let mut peers = build(7, 2, &policy);
    // h001 (depth 1, has children) fails and re-joins.
    peers.iter_mut().find(|p| p.host == "h001").unwrap().state = JoinState::Failed;
    let nc = Newcomer::new("h001", Some("rack1"));
    let pl = choose_parents(&nc, &peers, &policy).unwrap();
    let below = brute_descendants(&peers, "h001");
    assert!(active(&pl).iter().all(|r| !below.contains(r.as_str())));
    let kids_before = find(&peers, "h001").children;
    commit_choice(&mut peers, &nc, &pl, &policy).unwrap();
    assert_eq!(peers.iter().filter(|p| p.host == "h001").count(), 1);
    let me = find(&peers, "h001");
    assert_eq!(me.state, JoinState::Joining);
    assert_eq!(me.children, kids_before);
    assert_eq!(me.depth, pl.depth);
}

#[test]
fn tree_depth_bound_values() {
    assert_eq!(tree_depth_bound(0, 2), 0);
    assert_eq!(tree_depth_bound(1, 2), 1);
    assert_eq!(tree_depth_bound(2, 2), 2);
    assert_eq!(tree_depth_bound(3, 2), 3);
    assert_eq!(tree_depth_bound(4, 2), 3);
    assert_eq!(tree_depth_bound(5, 2), 4);
    assert_eq!(tree_depth_bound(64, 2), 7);
    assert_eq!(tree_depth_bound(64, 3), 5);
    assert_eq!(tree_depth_bound(81, 3), 5);
    assert_eq!(tree_depth_bound(82, 3), 6);
    assert_eq!(tree_depth_bound(1000, 10), 4);
    assert_eq!(tree_depth_bound(7, 1), 7);
    assert_eq!(tree_depth_bound(7, 0), 7);
    assert_eq!(tree_depth_bound(usize::MAX, u32::MAX), 4);
}

#[test]
fn policy_defaults_and_messages() {
    assert_eq!(Policy::default().fanout, DEFAULT_FANOUT);
    assert_eq!(Policy::new(5, 2, None, None), Policy::with_fanout(5));
    let p = Policy::new(5, 2, Some(2), None);
    assert_eq!((p.fanout, p.origin_fanout, p.secondary_fanout, p.max_parents), (5, 2, 5, 2));
    assert_eq!(Policy::new(0, 2, None, None).validate().unwrap_err().to_string(), "invalid policy: fanout = 0: must be at least 1");
    let stale = PlacementError::Stale { parent: "a".into(), reason: StaleReason::NotReady { state: JoinState::Built } };
    assert_eq!(stale.to_string(), r#"choice of parent "a" is stale: it is built, not ready"#);
    assert!(stale.is_retryable());
}

#[test]
fn deterministic() {
    let policy = Policy::with_fanout(3);
    let a = build(40, 3, &policy);
    let b = build(40, 3, &policy);
    assert_eq!(a, b);
    let mut shuffled = a.clone();
    shuffled.reverse();
    let nc = Newcomer::new("x", Some("rack2"));
    assert_eq!(choose_parents(&nc, &a, &policy), choose_parents(&nc, &shuffled, &policy));
}
