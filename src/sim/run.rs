//! One simulated storm: the trace cut into chunks, the tree placed, each node's join time
//! and requests in flight worked out, the event loop run, and the result in JSON form.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::engine::{Engine, EngineConfig, FailWhen, NodeSpec};
use super::network::Network;
use super::params::{Params, Shape, SimError};
use super::topology::{self, host, Topology, ORIGIN};
use super::trace::{self, Chunks};

#[derive(Debug, Clone, Serialize)]
pub struct EdgeBytes {
    pub from: String,
    pub to: String,
    pub bytes: u64,
}

/// What a relay's failure did.
#[derive(Debug, Clone, Serialize)]
pub struct FailureReport {
    pub node: String,
    /// When it died (null: the storm ended first).
    pub at_s: Option<f64>,
    pub children: usize,
    pub descendants: usize,
    /// Chunk bytes its children still lacked from it when it died: what failover had to move.
    pub children_owed_bytes: u64,
    /// Its descendants (hosts), and the last of their VMs done.
    pub subtree: Vec<String>,
    pub subtree_completion_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub nodes: usize,
    pub vms: usize,
    pub rate_bps: f64,
    pub shape: Shape,
    pub fanout: u32,
    pub working_set_bytes: u64,
    pub chunks: usize,
    /// Last surviving VM done (seconds from the launch); null if some never finished.
    pub completion_s: Option<f64>,
    /// Per VM (`vm1`..), in order: its finish time, null if it failed or never finished.
    pub vm_times_s: Vec<Option<f64>>,
    pub vm_nodes: Vec<String>,
    pub failed_vms: usize,
    pub unfinished_vms: usize,
    pub attach_s: Vec<f64>,
    pub origin_bytes: u64,
    pub edges: Vec<EdgeBytes>,
    pub max_edge_bytes: u64,
    pub depth: u32,
    pub origin_children: usize,
    /// W / rate: one node's own link.
    pub link_bound_s: f64,
    pub failed_node: Option<String>,
    pub failure: Option<FailureReport>,
    pub events: u64,
    pub sim_wall_s: f64,
}

fn chunks_for(p: &Params) -> Result<Chunks, SimError> {
    let base = match &p.trace {
        Some(path) => trace::load(path, p.chunk_bytes)?,
        None => {
            let ws = p.working_set_bytes.expect("validated: a trace or a working set");
            trace::uniform(ws, p.image_bytes.unwrap_or(ws), p.chunk_bytes)
        }
    };
    let mut c = match p.working_set_bytes {
        Some(ws) if p.trace.is_some() => base.scaled(ws, p.chunk_bytes),
        _ => base,
    };
    if let Some(img) = p.image_bytes {
        c.image_bytes = img.max(c.working_set_bytes);
    }
    Ok(c)
}

/// When each node's VMs can start: claims go one at a time through the image's lock while
/// every node logs in to the origin and builds at once; a node then follows its parents,
/// once they are attached themselves (the lab's ripple of one `reparent_s` per level).
fn attach_times(p: &Params, topo: &Topology, engine_nodes: usize) -> Vec<f64> {
    let mut at = vec![0.0; engine_nodes];
    match p.shape {
        Shape::Direct | Shape::FullCopy => at.iter_mut().skip(1).for_each(|t| *t = p.login_s),
        _ => {
            let build = p.login_s + p.setup_s;
            let claim = p.registry_round_s * p.registry_rounds as f64;
            let mut claimed = vec![0.0; engine_nodes];
            for (i, &n) in topo.order.iter().enumerate() {
                claimed[n] = claim * (i + 1) as f64;
            }
            let own: Vec<f64> = (0..engine_nodes).map(|n| claimed[n].max(build)).collect();
            // Readiness ripples down each stripe's tree (a node is ready in stripe s once its
            // stripe-s parent is); its VMs start once it is ready in every stripe. A striped
            // node's parents may depend on each other across stripes, never within one.
            for s in 0..topo.stripes {
                let depth = topo.depth_in(s);
                let mut by_depth: Vec<usize> = (1..engine_nodes).collect();
                by_depth.sort_by_key(|&n| depth[n]);
                let mut ready = own.clone();
                for n in by_depth {
                    let par = topo.paths[n][s][0];
                    if par != ORIGIN {
                        ready[n] = ready[n].max(ready[par] + p.reparent_s);
                    }
                    at[n] = f64::max(at[n], ready[n]);
                }
            }
        }
    }
    at
}

/// Requests in flight below each node (its VMs, its prefetch, its subtree's), capped by
/// the session's depth: what a fetch over one hop can keep moving per round trip.
fn windows(p: &Params, topo: &Topology, vms_on: &[usize]) -> Vec<f64> {
    let n = topo.paths.len();
    let pf = if p.prefetch && p.shape != Shape::Direct { (p.prefetch_depth as u64 * p.prefetch_request_bytes) as f64 } else { 0.0 };
    let mut w: Vec<f64> = (0..n).map(|i| vms_on[i] as f64 * (p.vm_depth as u64 * p.request_bytes) as f64 + pf).collect();
    if p.shape == Shape::FullCopy {
        w.iter_mut().for_each(|x| *x = (p.session_depth as u64 * p.request_bytes) as f64);
    }
    let mut by_depth: Vec<usize> = (1..n).collect();
    by_depth.sort_by_key(|&i| std::cmp::Reverse(topo.depth[i]));
    for i in by_depth {
        let par = topo.paths[i][0][0];
        if par != ORIGIN {
            w[par] += w[i];
        }
    }
    let cap = (p.session_depth as u64 * p.request_bytes) as f64;
    w.iter().map(|x| x.min(cap)).collect()
}

fn resolve_failure(p: &Params, topo: &Topology) -> Result<Option<(usize, FailWhen)>, SimError> {
    let Some(f) = &p.fail else { return Ok(None) };
    let bad = |reason| SimError::InvalidParameter { field: "fail.node", value: f.node.clone(), reason };
    let node = if f.node == "auto" {
        topo.busiest_relay().ok_or_else(|| bad("no relay has children to lose in this tree"))?
    } else {
        let i: usize = f.node.strip_prefix("cn").and_then(|s| s.parse().ok()).ok_or_else(|| bad("must be cnN or auto"))?;
        if i == 0 || i > p.nodes {
            return Err(bad("no such node (cn1 .. cnN)"));
        }
        i
    };
    let when = match (f.at_s, f.children_have) {
        (Some(t), _) => FailWhen::At(t),
        (None, Some(share)) => FailWhen::ChildrenHave(share),
        (None, None) => unreachable!("validated: at_s or children_have"),
    };
    Ok(Some((node, when)))
}

pub fn simulate(p: &Params) -> Result<Outcome, SimError> {
    p.validate()?;
    let started = Instant::now();
    let chunks = chunks_for(p)?;
    let vm_count = p.vm_count();
    let vm_hosts: Vec<usize> = (0..vm_count).map(|v| v % p.nodes + 1).collect();
    // Direct boot: each VM is its own reader (no cache shared by a node's VMs).
    let topo = if p.shape == Shape::Direct {
        Arc::new(Topology {
            paths: vec![vec![vec![ORIGIN]]; vm_count + 1],
            depth: (0..=vm_count).map(|i| (i > 0) as u32).collect(),
            order: (1..=vm_count).collect(),
            stripes: 1,
        })
    } else {
        topology::build_cached(p)?
    };
    let engine_nodes = topo.paths.len();
    let host_of: Vec<usize> = if p.shape == Shape::Direct {
        std::iter::once(ORIGIN).chain(vm_hosts.iter().copied()).collect()
    } else {
        (0..engine_nodes).collect()
    };
    let vm_nodes: Vec<usize> = if p.shape == Shape::Direct { (1..=vm_count).collect() } else { vm_hosts.clone() };
    let mut vms_on = vec![0usize; engine_nodes];
    vm_nodes.iter().for_each(|&n| vms_on[n] += 1);
    let failure = resolve_failure(p, &topo)?;

    let full = p.shape == Shape::FullCopy;
    let sizes: Vec<f64> =
        if full { chunks.image_chunks(p.chunk_bytes) } else { chunks.sizes.clone() }.into_iter().map(|b| b as f64).collect();
    let hop_s = p.rtt_s + p.service_s;
    let amp = match p.shape {
        Shape::Direct => chunks.direct_amplification,
        Shape::FullCopy => 1.0,
        _ => p.fetch_amplification,
    };
    let attach = attach_times(p, &topo, engine_nodes);
    let win = windows(p, &topo, &vms_on);
    let specs: Vec<NodeSpec> = (0..engine_nodes)
        .map(|i| NodeSpec {
            attach_s: attach[i],
            prefetch: (p.prefetch && !matches!(p.shape, Shape::Direct)) || full,
            prefetch_reverse: p.prefetch_reverse && !full,
            wait_for_all: full,
            latency_cap: win[i] / hop_s,
            amp,
        })
        .collect();
    let byte_rate = |bps: f64| bps * p.link_efficiency / 8.0;
    let mut up = vec![byte_rate(p.rate_bps); p.nodes + 1];
    up[ORIGIN] = byte_rate(p.origin_rate());
    let down = up.clone();
    let net = Network::new(up, down, host_of, sizes.clone());
    let pf_window = if full { p.session_depth as u64 * p.request_bytes } else { p.prefetch_depth as u64 * p.prefetch_request_bytes };
    let cfg = EngineConfig {
        sizes,
        vm_nodes: vm_nodes.clone(),
        vm_lookahead: ((p.vm_depth as u64 * p.request_bytes).div_ceil(p.chunk_bytes) + 1) as usize,
        pf_lookahead: pf_window.div_ceil(p.chunk_bytes) as u32,
        hop_s,
        consume_scale: if full { chunks.working_set_bytes as f64 / chunks.image_bytes as f64 } else { 1.0 },
        local_bps: p.local_read_bps,
        failover_s: p.failover_s,
    };
    let mut eng = Engine::new(&topo, specs, net, cfg);
    if let Some((node, when)) = failure {
        eng.schedule_failure(node, when);
    }
    eng.run(p.max_time_s);

    let name = |i: usize| {
        if i == ORIGIN {
            "origin".to_string()
        } else if p.shape == Shape::Direct {
            format!("vm{i}")
        } else {
            host(i)
        }
    };
    let mut edges: Vec<EdgeBytes> =
        eng.net.edges.iter().map(|e| EdgeBytes { from: name(e.from), to: name(e.to), bytes: e.sent.round() as u64 }).collect();
    edges.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.to.cmp(&b.to)));
    let origin_bytes = eng.net.edges.iter().filter(|e| e.from == ORIGIN).map(|e| e.sent).sum::<f64>().round() as u64;
    let vm_times: Vec<Option<f64>> = eng.vms.iter().map(|v| v.done_s).collect();
    let failed = eng.vms.iter().filter(|v| v.failed).count();
    let unfinished = eng.vms.iter().filter(|v| !v.failed && v.done_s.is_none()).count();
    let completion = if unfinished > 0 { None } else { vm_times.iter().flatten().copied().reduce(f64::max) };
    let failure_report = failure.map(|(node, _)| {
        let kids = topo.children();
        let subtree = topo.subtree(node);
        let mut inside = vec![false; engine_nodes];
        subtree.iter().for_each(|&c| inside[c] = true);
        let times: Vec<Option<f64>> = eng.vms.iter().filter(|v| inside[v.node]).map(|v| v.done_s).collect();
        FailureReport {
            node: host(node),
            at_s: eng.failed_at,
            children: kids[node].len(),
            descendants: subtree.len(),
            children_owed_bytes: eng.owed_bytes.round() as u64,
            subtree: subtree.iter().map(|&c| host(c)).collect(),
            subtree_completion_s: if times.iter().any(Option::is_none) { None } else { times.into_iter().flatten().reduce(f64::max) },
        }
    });
    Ok(Outcome {
        nodes: p.nodes,
        vms: vm_count,
        rate_bps: p.rate_bps,
        shape: p.shape,
        fanout: if p.shape == Shape::Chain { 1 } else { p.fanout },
        working_set_bytes: chunks.working_set_bytes,
        chunks: chunks.sizes.len(),
        completion_s: completion,
        vm_times_s: vm_times,
        vm_nodes: vm_hosts.iter().map(|&h| host(h)).collect(),
        failed_vms: failed,
        unfinished_vms: unfinished,
        attach_s: if p.shape == Shape::Direct { attach.clone() } else { attach[1..].to_vec() },
        origin_bytes,
        max_edge_bytes: edges.first().map_or(0, |e| e.bytes),
        edges,
        depth: topo.max_depth(),
        origin_children: topo.paths.iter().skip(1).filter(|s| s[0][0] == ORIGIN).count(),
        link_bound_s: chunks.working_set_bytes as f64 * 8.0 / p.rate_bps,
        failed_node: failure.map(|(n, _)| host(n)),
        failure: failure_report,
        events: eng.events,
        sim_wall_s: started.elapsed().as_secs_f64(),
    })
}
