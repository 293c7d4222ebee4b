use super::events::{Event, Queue};
use super::fairshare::{max_min, waterfill};
use super::params::{Params, Shape, SimError};
use super::run::simulate;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn waterfill_splits_equally_without_caps() {
    let r = waterfill(90.0, &[f64::INFINITY; 3]);
    assert!(r.iter().all(|&x| close(x, 30.0)), "{r:?}");
}

#[test]
fn waterfill_gives_a_capped_flows_leftover_to_the_others() {
    let r = waterfill(100.0, &[10.0, f64::INFINITY, 50.0]);
    assert!(close(r[0], 10.0) && close(r[1], 45.0) && close(r[2], 45.0), "{r:?}");
    let r = waterfill(100.0, &[10.0, 20.0]);
    assert!(close(r[0], 10.0) && close(r[1], 20.0), "link not full when every flow is capped: {r:?}");
}

#[test]
fn waterfill_equals_progressive_filling_on_a_star() {
    // One uplink (resource 0) and each receiver's downlink (resources 1..): the simulator's
    // per-sender water-filling must be the exact max-min allocation here.
    let caps = [5.0, 12.0, 40.0, 40.0];
    let mut capacity = vec![60.0];
    capacity.extend_from_slice(&caps);
    let flows: Vec<Vec<usize>> = (0..caps.len()).map(|i| vec![0, i + 1]).collect();
    let exact = max_min(&capacity, &flows);
    let ours = waterfill(60.0, &caps);
    for (a, b) in exact.iter().zip(&ours) {
        assert!((a - b).abs() < 1e-6, "exact {exact:?} ours {ours:?}");
    }
    assert!(close(ours.iter().sum::<f64>(), 60.0));
}

#[test]
fn max_min_shares_a_bottleneck_and_gives_the_rest_away() {
    // Flow 0 crosses links A (10) and B (100); flows 1, 2 cross only B.
    let r = max_min(&[10.0, 100.0], &[vec![0, 1], vec![1], vec![1]]);
    assert!(close(r[0], 10.0) && close(r[1], 45.0) && close(r[2], 45.0), "{r:?}");
}

#[test]
fn events_pop_in_time_order_and_same_time_events_in_push_order() {
    let mut q = Queue::new();
    q.push(2.0, Event::VmStep { vm: 2 });
    q.push(1.0, Event::VmStep { vm: 10 });
    q.push(1.0, Event::VmStep { vm: 11 });
    q.push(0.5, Event::Attach { node: 1 });
    q.push(1.0, Event::VmStep { vm: 12 });
    let got: Vec<(f64, Event)> = std::iter::from_fn(|| q.pop()).collect();
    assert_eq!(
        got,
        vec![
            (0.5, Event::Attach { node: 1 }),
            (1.0, Event::VmStep { vm: 10 }),
            (1.0, Event::VmStep { vm: 11 }),
            (1.0, Event::VmStep { vm: 12 }),
            (2.0, Event::VmStep { vm: 2 }),
        ]
    );
    assert!(q.is_empty());
}

fn base(nodes: usize, shape: Shape) -> Params {
    Params { nodes, shape, working_set_bytes: Some(64 << 20), image_bytes: Some(256 << 20), rate_bps: 100e6, ..Params::default() }
}

#[test]
fn direct_boot_is_bound_by_the_origins_link() {
    let p = base(6, Shape::Direct);
    let out = simulate(&p).unwrap();
    let bound = 6.0 * (64u64 << 20) as f64 / (100e6 * p.link_efficiency / 8.0);
    let t = out.completion_s.unwrap();
    assert!(t >= bound, "{t} < {bound}");
    assert!(t < bound * 1.1 + p.login_s + 1.0, "{t} far above {bound}");
}

#[test]
fn a_chain_sends_about_w_from_the_origin_and_every_node_gets_the_working_set() {
    let p = base(8, Shape::Chain);
    let out = simulate(&p).unwrap();
    let w = (64u64 << 20) as f64;
    let ratio = out.origin_bytes as f64 / w;
    assert!((1.0..=p.fetch_amplification + 0.01).contains(&ratio), "origin / W = {ratio}");
    assert_eq!(out.depth, 8);
    assert_eq!(out.edges.len(), 8, "{:?}", out.edges);
    assert!(out.vm_times_s.iter().all(Option::is_some));
}

#[test]
fn a_relay_fetches_each_chunk_once_for_all_its_readers() {
    // Fan-out 3, 4 VMs per node: the origin's 3 children each take W once.
    let mut p = base(3, Shape::Tree);
    p.vms = 12;
    let out = simulate(&p).unwrap();
    let w = (64u64 << 20) as f64 * p.fetch_amplification;
    assert!((out.origin_bytes as f64 - 3.0 * w).abs() < 0.01 * w, "{} vs {}", out.origin_bytes, 3.0 * w);
}

#[test]
fn the_tree_is_placed_as_joining_nodes_place_it() {
    let out = simulate(&base(13, Shape::Tree)).unwrap();
    assert_eq!(out.origin_children, 3);
    assert_eq!(out.depth, crate::placement::tree_depth_bound(13, 3) - 1);
}

#[test]
fn more_bandwidth_is_never_slower() {
    for shape in [Shape::Tree, Shape::Chain, Shape::Direct] {
        let mut last = f64::INFINITY;
        for rate in [25e6, 100e6, 1e9] {
            let mut p = base(7, shape);
            p.rate_bps = rate;
            let t = simulate(&p).unwrap().completion_s.unwrap();
            assert!(t <= last + 1e-9, "{shape:?}: {t} at {rate} after {last}");
            last = t;
        }
    }
}

#[test]
fn a_relay_failure_fails_its_vms_and_its_subtree_still_finishes() {
    let mut p = base(12, Shape::Tree);
    p.fail = Some(super::Failure { node: "auto".into(), at_s: Some(3.0), children_have: None });
    let out = simulate(&p).unwrap();
    assert_eq!(out.failed_vms, 1);
    assert_eq!(out.unfinished_vms, 0);
    assert!(out.completion_s.is_some());
    // Nothing crosses an edge into the dead relay after it died: the origin's edge to it
    // carried at most what the relay fetched before (~W), not an idle edge's stale rate.
    let dead = out.failed_node.clone().unwrap();
    let w = (64u64 << 20) as f64 * p.fetch_amplification;
    let into_dead: u64 = out.edges.iter().filter(|e| e.to == dead).map(|e| e.bytes).sum();
    assert!((into_dead as f64) <= w * 1.001, "{into_dead} bytes into {dead}, W = {w}");
}

#[test]
fn bad_parameters_name_the_field() {
    let mut p = base(4, Shape::Tree);
    p.rate_bps = -1.0;
    match simulate(&p) {
        Err(SimError::InvalidParameter { field, .. }) => assert_eq!(field, "rate_bps"),
        other => panic!("{other:?}"),
    }
    let e = super::simulate_json(r#"{"nodes": 4, "working_set_bytes": 1048576, "fanuot": 2}"#).unwrap_err();
    assert!(e.to_string().contains("fanuot"), "{e}");
    let mut p = base(4, Shape::Tree);
    p.fail = Some(super::Failure { node: "cn9".into(), at_s: Some(1.0), children_have: None });
    assert!(matches!(simulate(&p), Err(SimError::InvalidParameter { field: "fail.node", .. })));
}

#[test]
fn every_shape_pays_one_reparent_per_level_of_join_ripple() {
    // A node's VMs start once its parents are ready, and a parent is ready once its own
    // parents are: with claims free, the deepest node starts (depth - 1) reparents after its
    // build, whichever the shape. Striped trees ripple down each stripe's tree as a single
    // tree does; charging them one level only made them look 1.4x faster at 1,000 nodes.
    for (shape, k) in [(Shape::Tree, 2), (Shape::Striped, 2), (Shape::Striped, 3)] {
        let mut p = base(40, shape);
        p.fanout = k;
        p.working_set_bytes = Some(1 << 20);
        p.registry_round_s = 0.0;
        let out = simulate(&p).unwrap();
        let last = out.attach_s.iter().copied().fold(0.0, f64::max);
        let want = p.login_s + p.setup_s + (out.depth - 1) as f64 * p.reparent_s;
        assert!(out.depth >= 4, "{shape:?} k={k}: depth {}", out.depth);
        assert!(close(last, want), "{shape:?} k={k}: last start {last} s, depth {} wants {want} s", out.depth);
    }
}

#[test]
fn a_relay_dying_while_its_children_fetch_costs_them_the_failover() {
    // The relay with the most descendants dies once its children hold half of what they
    // fetch through it: they owe ~half of W each, stall for the failover, then fetch the rest
    // from their secondary parents, which serve their own children too.
    let p = base(13, Shape::Tree);
    let healthy = simulate(&p).unwrap();
    let mut f = p.clone();
    f.fail = Some(super::Failure { node: "auto".into(), at_s: None, children_have: Some(0.5) });
    let out = simulate(&f).unwrap();
    let rep = out.failure.clone().expect("a failure report");
    assert_eq!((rep.node.as_str(), rep.children, rep.descendants), ("cn1", 3, 4), "{rep:?}");
    let at = rep.at_s.expect("it died during the storm");
    let w = (64u64 << 20) as f64;
    let owed = rep.children_owed_bytes as f64 / (3.0 * w);
    assert!((0.45..=0.55).contains(&owed), "children owed {owed} x W each");
    assert_eq!((out.failed_vms, out.unfinished_vms), (1, 0));
    // The same subtree without the failure.
    let idx: Vec<usize> = rep.subtree.iter().map(|h| h[2..].parse::<usize>().unwrap() - 1).collect();
    let before = idx.iter().map(|&i| healthy.vm_times_s[i].unwrap()).fold(0.0, f64::max);
    let after = rep.subtree_completion_s.unwrap();
    assert!(at < before, "died at {at} s, after its subtree was done at {before} s");
    assert!(after >= before + f.failover_s, "subtree done {after} s with the failure, {before} s without");
}

#[test]
fn a_placed_tree_is_reused_for_the_same_nodes_shape_and_fanout_only() {
    use super::topology::build_cached;
    use std::sync::Arc;
    let mut p = base(37, Shape::Tree);
    let first = build_cached(&p).unwrap();
    p.rate_bps = 1e9; // not part of the tree
    assert!(Arc::ptr_eq(&first, &build_cached(&p).unwrap()));
    p.fanout = 2;
    let other = build_cached(&p).unwrap();
    assert!(!Arc::ptr_eq(&first, &other));
    assert_eq!(other.paths, super::topology::build(&p).unwrap().paths);
}

#[test]
fn a_striped_relays_failure_reports_its_subtree_in_each_stripe_once() {
    // Striped nodes are parents of each other in different stripes: following every child
    // link at once loops (it ran out of memory before).
    let mut p = base(40, Shape::Striped);
    p.fanout = 4;
    p.working_set_bytes = Some(4 << 20);
    p.fail = Some(super::Failure { node: "auto".into(), at_s: None, children_have: Some(0.5) });
    let out = simulate(&p).unwrap();
    let rep = out.failure.unwrap();
    let mut names = rep.subtree.clone();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), rep.subtree.len(), "{:?}", rep.subtree);
    assert!(rep.descendants >= rep.children && rep.children >= 1 && rep.descendants < 40, "{rep:?}");
    assert!(!rep.subtree.contains(&rep.node));
    assert_eq!(out.unfinished_vms, 0);
}
