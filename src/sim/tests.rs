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
    Params {
        nodes,
        shape,
        working_set_bytes: Some(64 << 20),
        image_bytes: Some(256 << 20),
        rate_bps: 100e6,
        ..Params::default()
    }
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
    p.fail = Some(super::Failure { node: "auto".into(), at_s: 3.0 });
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
    p.fail = Some(super::Failure { node: "cn9".into(), at_s: 1.0 });
    assert!(matches!(simulate(&p), Err(SimError::InvalidParameter { field: "fail.node", .. })));
}
