"""The boot-storm simulator (vmthunder.simulate, src/sim) against the lab, and beyond it.

    python bench/simulate.py --validate          # lab runs vs predictions -> results/simulator-validation.json
    python bench/simulate.py --validate --quick --out /tmp/v.json   # the small cases only (CI)
    python bench/simulate.py --paper             # 160 nodes at GbE, 1,000 / 10,000 at 10 GbE -> results/simulator-paper.json
    python bench/simulate.py --shapes            # fastest shape, with and without a relay failing -> results/simulator-shapes.json

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

import record  # noqa: E402  (bench/record.py: provenance, history)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
TRACE = os.path.join(HERE, "traces", "debian12-boot.json")
CPU_BOUND = 0.70    # host busy above this: the lab measured its CPU, not its links

HISTORY = os.path.join(RESULTS, record.HISTORY)

# (scenario, commit of the run, nodes, mode, shape, fanout): one fleet run in history.jsonl
CASES = [
    ("fleet-scaling-100mbit", "3f6a64f", 2, "tree-f1", "chain", 1),
    ("fleet-scaling-100mbit", "3f6a64f", 4, "tree-f1", "chain", 1),
    ("fleet-scaling-100mbit", "3f6a64f", 8, "tree-f1", "chain", 1),
    ("fleet-scaling-100mbit", "3f6a64f", 2, "direct", "direct", None),
    ("fleet-scaling-100mbit", "3f6a64f", 4, "direct", "direct", None),
    ("fleet-scaling-100mbit", "3f6a64f", 8, "direct", "direct", None),
    ("fleet-scaling-100mbit", "3f76a2b", 2, "tree", "tree", 3),
    ("fleet-scaling-100mbit", "3f76a2b", 4, "tree", "tree", 3),
    ("fleet-scaling-100mbit", "3f76a2b", 8, "tree", "tree", 3),
    ("fleet-8n-100mbit", "7c5fe9e", 8, "tree", "tree", 3),
    ("fleet-8n-100mbit", "7c5fe9e", 8, "tree-f2", "tree", 2),
    ("fleet-8n-100mbit", "7c5fe9e", 8, "tree-f1", "chain", 1),
    ("fleet-8n-25mbit", "67c5095", 8, "tree-f1", "chain", 1),
    ("fleet-8n-25mbit", "67c5095", 8, "direct", "direct", None),
    ("fleet-8n-25mbit", "3698a8d", 8, "tree", "tree", 3),
    ("fleet-scaling-100mbit", "7c5fe9e", 16, "tree-f1", "chain", 1),
    ("fleet-scaling-100mbit", "7c5fe9e", 16, "direct", "direct", None),
]
QUICK = {0, 3, 6}   # 2-node cases: a second or less of simulation each


def lab_run(scenario, commit, nodes, mode, history=None):
    """The history line of that fleet run and its mode's summary."""
    runs = [h for h in (history if history is not None else record.read_history(HISTORY))
            if h.get("bench") == "fleet" and h.get("scenario") == scenario and h.get("commit") == commit
            and h.get("nodes") == nodes]
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
    t0 = time.monotonic()
    out = simulate(p)
    out["wall_s"] = time.monotonic() - t0
    out.pop("edges", None)
    out.pop("vm_nodes", None)
    return p, out


def validate(quick):
    cases, scale = [], []
    history = record.read_history(HISTORY)
    for i, (scenario, commit, nodes, mode, shape, k) in enumerate(CASES):
        if quick and i not in QUICK:
            continue
        run, m = lab_run(scenario, commit, nodes, mode, history)
        n, rate = run["nodes"], run["rate_bps"]
        _, out = run_sim(params(n, rate, shape, k))
        busy = m.get("host_busy")
        pred, meas = out["completion_s"], m["completion_s"]
        cases.append({
            "nodes": n, "rate_bps": rate, "shape": shape if shape != "tree" else f"tree-f{k}",
            "measured_s": meas, "predicted_s": round(pred, 2), "error": round(abs(pred - meas) / meas, 3),
            "cpu_bound": bool(busy is not None and busy > CPU_BOUND), "host_busy": busy,
            "measured_origin_w": m["origin_data_w"],
            "predicted_origin_w": round(out["origin_bytes"] / out["working_set_bytes"], 3),
            "source": f"bench/results/history.jsonl: {scenario} of {run['date']} (commit {commit}), "
                      f"{nodes} nodes, mode {mode}",
        })
    sizes = [(160, 1e9)] if quick else [(160, 1e9), (1000, 10e9), (10000, 10e9)]
    for n, rate in sizes:
        _, out = run_sim(params(n, rate, "tree", 3))
        scale.append({"nodes": n, "rate_bps": rate, "shape": "tree-f3", "predicted_s": round(out["completion_s"], 2),
                      "sim_wall_s": round(out["wall_s"], 2)})
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
            rows.append({"nodes": p["nodes"], "rate_bps": p["rate_bps"], "shape": p["shape"],
                         "working_set_bytes": out["working_set_bytes"], "completion_s": out["completion_s"],
                         "vm_median_s": sorted(out["vm_times_s"])[len(out["vm_times_s"]) // 2],
                         "origin_w": out["origin_bytes"] / out["working_set_bytes"], "sim_wall_s": out["wall_s"]})
    return {"rows": rows, "paper": "VMThunder (TPDS 2014): 160 VMs on 160 nodes, GbE, under a minute, ~20 s mean"}


SHAPES = [("tree", 2), ("tree", 3), ("tree", 4), ("chain", None), ("direct", None), ("striped", 2), ("striped", 3), ("striped", 4)]


def shapes(sizes):
    # At 10,000 nodes each placement is O(N^2): striped trees only with 3 stripes there.
    base_jobs = [params(n, rate, s, k) for n, rate in sizes for s, k in SHAPES
                 if n < 10000 or s != "striped" or k == 3]
    with ProcessPoolExecutor(2) as ex:
        base = list(ex.map(run_sim, base_jobs))
        fail_jobs = [dict(p, fail={"node": "auto", "at_s": round(out["completion_s"] / 2, 2)})
                     for p, out in base if p["shape"] != "direct"]
        failed = list(ex.map(run_sim, fail_jobs))
    rows = []
    for p, out in base + failed:
        rows.append({"nodes": p["nodes"], "rate_bps": p["rate_bps"], "shape": p["shape"], "fanout": out["fanout"],
                     "fail": p.get("fail"), "failed_node": out["failed_node"], "completion_s": out["completion_s"],
                     "origin_w": out["origin_bytes"] / out["working_set_bytes"], "depth": out["depth"],
                     "sim_wall_s": out["wall_s"]})
    return {"rows": rows}


def summary(what: str, doc: dict) -> dict:
    """The history line's numbers: the validation's worst errors, the predicted completions."""
    if what == "validation":
        cases = doc["cases"]
        err = lambda bound: max((c["error"] for c in cases if c["cpu_bound"] == bound), default=None)  # noqa: E731
        return {"cases": len(cases), "max_error_link_bound": err(False), "max_error_cpu_bound": err(True),
                "scale_predicted_s": {str(s["nodes"]): s["predicted_s"] for s in doc["scale"]}}
    rows = [r for r in doc["rows"] if not r.get("fail")]
    first_ws = rows[0].get("working_set_bytes") if rows else None
    return {"completion_s": {f"{r['nodes']}n-{r['rate_bps'] / 1e9:g}gbit-{r['shape']}"
                             + (f"-k{r['fanout']}" if r.get("fanout") and r["shape"] in ("tree", "striped") else ""):
                             round(r["completion_s"], 1)
                             for r in rows if r.get("working_set_bytes", first_ws) == first_ws}}


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
    for flag, what, fn in [(a.validate, "validation", lambda: validate(a.quick)), (a.paper, "paper", lambda: paper(sizes)),
                           (a.shapes, "shapes", lambda: shapes(sizes))]:
        if not flag:
            continue
        prov = record.provenance()
        doc = {"provenance": prov, **fn()}
        out = a.out or os.path.join(RESULTS, f"simulator-{what}.json")
        record.write_result(out, doc)
        record.append_history(out, {**record.run_fields(prov), "bench": "simulate", "scenario": f"simulator-{what}",
                                    "command": " ".join(["python", "bench/simulate.py"] + (argv if argv is not None else sys.argv[1:])),
                                    **summary(what, doc)})
        print(f"wrote {out}")
        for row in doc.get("cases", []) + doc.get("scale", []) + doc.get("rows", []):
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
