"""The boot-storm simulator (vmthunder.simulate, src/sim) against the lab, and beyond it.

    python3 -m bench.simulate --validate          # lab runs vs predictions -> results/simulator-validation.json
    python3 -m bench.simulate --validate --quick --out /tmp/v.json   # the small cases only (CI)
    python3 -m bench.simulate --paper             # 160 nodes at GbE, 1,000 / 10,000 at 10 GbE -> results/simulator-paper.json
    python3 -m bench.simulate --shapes            # fastest shape, with and without a relay failing -> results/simulator-shapes.json

Every measured value is read from the lab run named in its case: a line of
bench/results/history.jsonl (scenario, commit, nodes), where every fleet run's summary is kept.
Each result holds its provenance, and each run appends its summary to history.jsonl beside it.
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from bench import record  # provenance, history

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
TRACE = os.path.join(HERE, "traces", "debian12-boot.json")
CPU_BOUND = 0.70  # host busy above this: the lab measured its CPU, not its links

HISTORY = os.path.join(RESULTS, record.HISTORY)

# The boot-profile prefetch a run had (the library's, of its day): from the profile's end with
# two reads in flight until 2026-12-05, then forwards with eight. Each case is predicted with its own.
END_X2 = {"prefetch_reverse": True, "prefetch_depth": 2}
FORWARD_X8 = {"prefetch_reverse": False, "prefetch_depth": 8}

# (scenario, commit of the run, nodes, mode, shape, fanout, prefetch): one fleet run in history.jsonl
CASES = [
    ("fleet-scaling-100mbit", "3f6a64f", 2, "tree-f1", "chain", 1, END_X2),
    ("fleet-scaling-100mbit", "3f6a64f", 4, "tree-f1", "chain", 1, END_X2),
    ("fleet-scaling-100mbit", "3f6a64f", 8, "tree-f1", "chain", 1, END_X2),
    ("fleet-scaling-100mbit", "3f6a64f", 2, "direct", "direct", None, END_X2),
    ("fleet-scaling-100mbit", "3f6a64f", 4, "direct", "direct", None, END_X2),
    ("fleet-scaling-100mbit", "3f6a64f", 8, "direct", "direct", None, END_X2),
    ("fleet-scaling-100mbit", "3f76a2b", 2, "tree", "tree", 3, END_X2),
    ("fleet-scaling-100mbit", "3f76a2b", 4, "tree", "tree", 3, END_X2),
    ("fleet-scaling-100mbit", "3f76a2b", 8, "tree", "tree", 3, END_X2),
    ("fleet-8n-100mbit", "7c5fe9e", 8, "tree", "tree", 3, END_X2),
    ("fleet-8n-100mbit", "7c5fe9e", 8, "tree-f2", "tree", 2, END_X2),
    ("fleet-8n-100mbit", "7c5fe9e", 8, "tree-f1", "chain", 1, END_X2),
    ("fleet-8n-25mbit", "67c5095", 8, "tree-f1", "chain", 1, END_X2),
    ("fleet-8n-25mbit", "67c5095", 8, "direct", "direct", None, END_X2),
    ("fleet-8n-25mbit", "3698a8d", 8, "tree", "tree", 3, END_X2),
    ("fleet-scaling-100mbit", "7c5fe9e", 16, "tree-f1", "chain", 1, END_X2),
    ("fleet-scaling-100mbit", "7c5fe9e", 16, "direct", "direct", None, END_X2),
    ("fleet-8n-15mbit", "5e2f7e9", 8, "tree-f1", "chain", 1, END_X2),
    ("fleet-8n-15mbit", "5e2f7e9", 8, "direct", "direct", None, END_X2),
    ("fleet-8n-15mbit", "10a95d3", 8, "tree-f1", "chain", 1, FORWARD_X8),
    ("fleet-8n-15mbit", "10a95d3", 8, "direct", "direct", None, FORWARD_X8),
    # The faithful rates and the next ones up, 2026-12-05 ("+changes": result files or bench/
    # code the run did not use were uncommitted)
    ("fleet-2n-100mbit", "199b3c9+changes", 2, "tree-f1", "chain", 1, FORWARD_X8),
    ("fleet-2n-100mbit", "199b3c9+changes", 2, "direct", "direct", None, FORWARD_X8),
    ("fleet-4n-50mbit", "9e03939+changes", 4, "tree-f1", "chain", 1, FORWARD_X8),
    ("fleet-4n-100mbit", "9e03939+changes", 4, "tree-f1", "chain", 1, FORWARD_X8),
    ("fleet-8n-25mbit", "199b3c9+changes", 8, "tree-f1", "chain", 1, FORWARD_X8),
    ("fleet-8n-25mbit", "199b3c9+changes", 8, "direct", "direct", None, FORWARD_X8),
    ("fleet-16n-10mbit", "199b3c9+changes", 16, "tree-f1", "chain", 1, FORWARD_X8),
    ("fleet-16n-15mbit", "9e03939+changes", 16, "tree-f1", "chain", 1, FORWARD_X8),
]
QUICK = {0, 3, 6}  # 2-node cases: a second or less of simulation each


def lab_run(scenario, commit, nodes, mode, history=None):
    """The history line of that fleet run and its mode's summary."""
    runs = [
        h
        for h in (history if history is not None else record.read_history(HISTORY))
        if h.get("bench") == "fleet" and h.get("scenario") == scenario and h.get("commit") == commit and h.get("nodes") == nodes
    ]
    if len(runs) != 1:
        raise SystemExit(f"{HISTORY}: {len(runs)} runs of {scenario} at {commit} with {nodes} nodes, want one")
    return runs[0], runs[0]["modes"][mode]


def params(nodes, rate, shape, fanout=None, **extra):
    p = {"nodes": nodes, "rate_bps": rate, "shape": shape, "trace": TRACE}
    if fanout is not None and shape in ("tree", "striped"):
        p["fanout"] = fanout
    p.update(extra)
    return p


def run_sim(p):
    from vmthunder import simulate

    t0, c0 = time.monotonic(), time.process_time()
    out = simulate({k: v for k, v in p.items() if not k.startswith("_")})
    out["wall_s"] = time.monotonic() - t0
    out["cpu_s"] = time.process_time() - c0  # the simulator's own: wall grows with the host's load
    out.pop("edges", None)
    return p, out


def validate(quick):
    cases, scale = [], []
    history = record.read_history(HISTORY)
    for i, (scenario, commit, nodes, mode, shape, k, prefetch) in enumerate(CASES):
        if quick and i not in QUICK:
            continue
        run, m = lab_run(scenario, commit, nodes, mode, history)
        n, rate = run["nodes"], run["rate_bps"]
        _, out = run_sim(params(n, rate, shape, k, **prefetch))
        busy = m.get("host_busy")
        pred, meas = out["completion_s"], m["completion_s"]
        cases.append(
            {
                "nodes": n,
                "rate_bps": rate,
                "shape": shape if shape != "tree" else f"tree-f{k}",
                "measured_s": meas,
                "predicted_s": round(pred, 2),
                "error": round(abs(pred - meas) / meas, 3),
                "cpu_bound": bool(busy is not None and busy > CPU_BOUND),
                "host_busy": busy,
                "measured_origin_w": m["origin_data_w"],
                "predicted_origin_w": round(out["origin_bytes"] / out["working_set_bytes"], 3),
                "source": f"bench/results/history.jsonl: {scenario} of {run['date']} (commit {commit}), "
                f"{nodes} nodes, mode {mode}",
            }
        )
    sizes = [(160, 1e9)] if quick else [(160, 1e9), (1000, 10e9), (10000, 10e9)]
    for n, rate in sizes:
        _, out = run_sim(params(n, rate, "tree", 3))
        scale.append(
            {
                "nodes": n,
                "rate_bps": rate,
                "shape": "tree-f3",
                "predicted_s": round(out["completion_s"], 2),
                "sim_wall_s": round(out["wall_s"], 2),
            }
        )
    return {"cases": cases, "scale": scale}


def paper(sizes):
    """160 nodes / 160 VMs at GbE for three working sets, then 1,000 and 10,000 at 10 GbE."""
    rows = []
    jobs = []
    for n, rate in sizes:
        sets = [None, 87_000_000, 424_000_000] if n == 160 else [None]
        for ws in sets:
            extra = {"working_set_bytes": ws} if ws else {}
            for shape, k in [("tree", 3), ("chain", None), ("direct", None), ("full_copy", None)]:
                if n == 10000 and shape == "full_copy":
                    continue
                jobs.append(params(n, rate, shape, k, **extra))
    with ProcessPoolExecutor(2) as ex:
        for p, out in ex.map(run_sim, jobs):
            rows.append(
                {
                    "nodes": p["nodes"],
                    "rate_bps": p["rate_bps"],
                    "shape": p["shape"],
                    "working_set_bytes": out["working_set_bytes"],
                    "completion_s": out["completion_s"],
                    "vm_median_s": sorted(out["vm_times_s"])[len(out["vm_times_s"]) // 2],
                    "origin_w": out["origin_bytes"] / out["working_set_bytes"],
                    "sim_wall_s": out["wall_s"],
                }
            )
    return {"rows": rows, "paper": "VMThunder (TPDS 2014): 160 VMs on 160 nodes, GbE, under a minute, ~20 s mean"}


SHAPES = [
    ("tree", 2),
    ("tree", 3),
    ("tree", 4),
    ("chain", None),
    ("striped", 2),
    ("striped", 3),
    ("striped", 4),
    ("direct", None),
]
# The working sets: the recorded boot's, and the paper's large image (bandwidth-bound at GbE).
WORKING_SETS = [("trace", None), ("424MB", 424_000_000)]
# Joins: claims one at a time through the image lock at the lab's 40 ms each, as the library
# does them; and free (0 ms), which leaves the data plane and the join ripple to decide.
CLAIMS = [("serial", None), ("free", 0.0)]
FAIL_SHARE = 0.5  # the relay dies once its children hold half of what they fetch through it


def run_group(jobs):
    """One tree's storms in one process, so that it is placed once (src/sim/topology.rs)."""
    return [run_sim(p) for p in jobs]


def shape_jobs(sizes):
    groups = []
    for n, rate in sizes:
        for shape, k in SHAPES:
            jobs = []
            for wname, ws in WORKING_SETS:
                for cname, rr in CLAIMS:
                    # Direct boot has no joins to claim; a chain's join ripple (0.5 s a level)
                    # dwarfs its claims; 10,000 direct readers of 424 MB: an hour of origin time.
                    if shape in ("direct", "chain") and cname == "free":
                        continue
                    if shape == "direct" and n >= 10000 and ws:
                        continue
                    extra = {"working_set_bytes": ws} if ws else {}
                    if rr is not None:
                        extra["registry_round_s"] = rr
                    p = params(n, rate, shape, k, **extra)
                    p["_case"] = {"working_set": wname, "claims": cname}
                    jobs.append(p)
                    if shape != "direct":
                        jobs.append(dict(p, fail={"node": "auto", "children_have": FAIL_SHARE}))
            groups.append(jobs)
    # The costliest first (10,000-node striped trees place 2-4 trees of 10,000 joins).
    groups.sort(key=lambda g: -(g[0]["nodes"] ** 2 * (g[0].get("fanout", 1) if g[0]["shape"] == "striped" else 1)))
    return groups


def shape_row(p, out):
    case = p["_case"]
    row = {
        "nodes": p["nodes"],
        "rate_bps": p["rate_bps"],
        "working_set": case["working_set"],
        "working_set_bytes": out["working_set_bytes"],
        "claims": case["claims"],
        "shape": p["shape"],
        "fanout": out["fanout"] if p["shape"] in ("tree", "striped") else None,
        "depth": out["depth"],
        "fail": p.get("fail"),
        "completion_s": out["completion_s"],
        "vm_median_s": sorted(t for t in out["vm_times_s"] if t is not None)[len(out["vm_times_s"]) // 2],
        "origin_w": out["origin_bytes"] / out["working_set_bytes"],
        "events": out["events"],
        "sim_wall_s": out["wall_s"],
        "sim_cpu_s": out["cpu_s"],
    }
    f = out.get("failure")
    if f:
        row.update(
            {
                "failed_node": f["node"],
                "failed_at_s": f["at_s"],
                "failed_children": f["children"],
                "failed_descendants": f["descendants"],
                "children_owed_w": f["children_owed_bytes"] / out["working_set_bytes"],
                "subtree_completion_s": f["subtree_completion_s"],
                "_subtree": f["subtree"],
            }
        )
    return row


def bounds(n, rate, w_bytes):
    """The figures the shapes are bound by, for the summary: seconds."""
    u = rate * 0.95 / 8  # link_efficiency 0.95: data bytes per second
    w = w_bytes * 1.06  # fetch_amplification 1.06: bytes on a relay's link
    return {
        "W_bytes": w_bytes,
        "W_over_u_s": w / u,
        "k_W_over_u_s": {k: k * w / u for k in (2, 3, 4)},
        "W_over_local_read_s": w_bytes / (40 * 2**20),
        "serial_claims_s": 0.04 * n,
        "build_s": 1.1,
        "reparent_per_level_s": 0.5,
    }


def shapes(sizes):
    groups = shape_jobs(sizes)
    load = {"load_avg_at_start": os.getloadavg()}  # the sim's wall times depend on it
    with ProcessPoolExecutor(2) as ex:
        done = [r for g in ex.map(run_group, groups) for r in g]
    rows = [shape_row(p, out) for p, out in done]
    # Each failed run beside the same storm without the failure: the storm's completion and
    # its dead relay's subtree's (the failover's cost).
    healthy = {
        (r["nodes"], r["working_set"], r["claims"], r["shape"], r["fanout"]): (r, out)
        for r, (p, out) in zip(rows, done)
        if r["fail"] is None
    }
    for r in rows:
        if r["fail"] is None:
            continue
        h, hout = healthy[(r["nodes"], r["working_set"], r["claims"], r["shape"], r["fanout"])]
        sub = set(r.pop("_subtree"))
        times = [t for t, host in zip(hout["vm_times_s"], hout["vm_nodes"]) if host in sub]
        r["healthy_completion_s"] = h["completion_s"]
        r["healthy_subtree_completion_s"] = max(times) if times else None
        if r["subtree_completion_s"] is not None and times:
            r["failover_cost_s"] = r["subtree_completion_s"] - max(times)
    summary = []
    for n, rate in sizes:
        for wname, _ in WORKING_SETS:
            for cname, _ in CLAIMS:
                ok = [r for r in rows if (r["nodes"], r["working_set"], r["claims"], r["fail"]) == (n, wname, cname, None)]
                if not ok:
                    continue
                # chain and direct have no claims to free: their serial rows stand for both
                if cname == "free":
                    ok += [
                        r
                        for r in rows
                        if (r["nodes"], r["working_set"], r["claims"], r["fail"]) == (n, wname, "serial", None)
                        and r["shape"] in ("chain", "direct")
                    ]
                label = lambda r: r["shape"] + (f"-{r['fanout']}" if r["fanout"] else "")  # noqa: E731
                best = min(ok, key=lambda r: r["completion_s"])
                trees = [r for r in ok if r["shape"] == "tree"]
                best_tree = min(trees, key=lambda r: r["completion_s"])
                best_striped = min((r for r in ok if r["shape"] == "striped"), key=lambda r: r["completion_s"])
                summary.append(
                    {
                        "nodes": n,
                        "rate_bps": rate,
                        "working_set": wname,
                        "claims": cname,
                        "best": label(best),
                        "best_s": best["completion_s"],
                        "best_tree": label(best_tree),
                        "tree_vs_best_tree": {label(r): r["completion_s"] / best_tree["completion_s"] for r in trees},
                        "striped_speedup_over_best_tree": best_tree["completion_s"] / best_striped["completion_s"],
                        "bounds": bounds(n, rate, best["working_set_bytes"]),
                    }
                )
    load["load_avg_at_end"] = os.getloadavg()
    return {
        "host_load": load,
        "fail_when": f"auto relay (most descendants), once its children hold {FAIL_SHARE:.0%} of what they fetch through it",
        "summary": summary,
        "rows": rows,
    }


def summary(what: str, doc: dict) -> dict:
    """The history line's numbers: the validation's worst errors, the predicted completions."""
    if what == "validation":
        cases = doc["cases"]
        err = lambda bound: max((c["error"] for c in cases if c["cpu_bound"] == bound), default=None)  # noqa: E731
        return {
            "cases": len(cases),
            "max_error_link_bound": err(False),
            "max_error_cpu_bound": err(True),
            "scale_predicted_s": {str(s["nodes"]): s["predicted_s"] for s in doc["scale"]},
        }
    rows = [r for r in doc["rows"] if not r.get("fail")]
    first_ws = rows[0].get("working_set_bytes") if rows else None
    return {
        "completion_s": {
            f"{r['nodes']}n-{r['rate_bps'] / 1e9:g}gbit-{r['shape']}"
            + (f"-k{r['fanout']}" if r.get("fanout") and r["shape"] in ("tree", "striped") else ""): round(r["completion_s"], 1)
            for r in rows
            if r.get("working_set_bytes", first_ws) == first_ws
        }
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description="the boot-storm simulator against the lab and at scale")
    ap.add_argument("--validate", action="store_true")
    ap.add_argument("--quick", action="store_true", help="with --validate: 2-node cases and 160 nodes only")
    ap.add_argument("--paper", action="store_true")
    ap.add_argument("--shapes", action="store_true")
    ap.add_argument("--sizes", default="160:1e9,1000:10e9,10000:10e9", help="with --shapes, --paper: nodes:rate,...")
    ap.add_argument("--out", help="output file (default: results/simulator-<what>.json)")
    a = ap.parse_args(argv)
    if not (a.validate or a.paper or a.shapes):
        ap.error("give --validate, --paper or --shapes")
    sizes = [(int(n), float(r)) for n, r in (x.split(":") for x in a.sizes.split(","))]
    for flag, what, fn in [
        (a.validate, "validation", lambda: validate(a.quick)),
        (a.paper, "paper", lambda: paper(sizes)),
        (a.shapes, "shapes", lambda: shapes(sizes)),
    ]:
        if not flag:
            continue
        prov = record.provenance()
        doc = {"provenance": prov, **fn()}
        out = a.out or os.path.join(RESULTS, f"simulator-{what}.json")
        record.write_result(out, doc)
        record.append_history(
            out,
            {
                **record.run_fields(prov),
                "bench": "simulate",
                "scenario": f"simulator-{what}",
                "command": " ".join(["python3", "-m", "bench.simulate"] + (argv if argv is not None else sys.argv[1:])),
                **summary(what, doc),
            },
        )
        print(f"wrote {out}")
        for row in doc.get("cases", []) + doc.get("scale", []) + doc.get("rows", []):
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
