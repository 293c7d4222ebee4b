"""Where a bench run leaves its numbers, shared by every bench script.

A result file is named by its scenario (fleet-8n-100mbit.json, fleet-scaling-100mbit.json,
cache-engines-prefetch.json, ...): the latest run of that scenario. It holds its provenance
(`provenance()`: date, commit, host CPU and cores; the scripts add the trace digest). Each run
also appends one summary line to history.jsonl *beside its result file*: a bench run writes
bench/results/history.jsonl, a test that passes a temporary --out writes only there.

Only the standard library: the bench scripts import this as `record`, tests as `bench.record`.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
HISTORY = "history.jsonl"


def host() -> dict:
    """The host's CPU model and core count (the trees in UML are CPU-bound: every time needs it)."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "?")
    except OSError:
        pass
    return {"cpu_model": model, "cores": os.cpu_count()}


def commit(repo: str = REPO) -> str | None:
    """The repository's short commit, with "+changes" when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        return head.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit(),
        "host": host(),
    }


def write_result(path: str, doc: dict) -> None:
    """The JSON result, replaced atomically (a killed run leaves the previous one)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def append_history(result_path: str, summary: dict) -> str:
    """Append one run's summary to the history.jsonl beside RESULT_PATH; returns its path."""
    path = os.path.join(os.path.dirname(os.path.abspath(result_path)), HISTORY)
    line = {"file": os.path.basename(result_path), **summary}
    with open(path, "a") as fh:
        fh.write(json.dumps(line, sort_keys=False) + "\n")
    return path


def read_history(path: str = os.path.join(RESULTS, HISTORY)) -> list:
    with open(path) as fh:
        return [json.loads(ln) for ln in fh if ln.strip()]


def run_fields(prov: dict) -> dict:
    """The provenance fields every history line starts with."""
    return {"date": (prov.get("date") or "")[:10], "commit": prov.get("commit"), "host": prov.get("host")}


def file_sha1(path: str) -> str:
    """The first 12 hex digits of a file's SHA-1 (how results name the trace they replayed)."""
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.sha1(fh.read()).hexdigest()[:12]


# ----------------------------------------------------------------------------- fleet
def rate_tag(rate_bps: float) -> str:
    """100e6 -> "100mbit", 1e9 -> "1gbit"."""
    if rate_bps >= 1e9 and rate_bps % 1e9 == 0:
        return f"{rate_bps / 1e9:g}gbit"
    return f"{rate_bps / 1e6:g}mbit"


def fleet_scenario(nodes: int | None, rate_bps: float, start: str = "attach", synthetic: bool = False) -> str:
    """fleet-8n-100mbit, fleet-scaling-100mbit (nodes None), -sync for the common start, -synthetic
    for a synthetic trace instead of the recorded boot."""
    name = f"fleet-{nodes}n-{rate_tag(rate_bps)}" if nodes else f"fleet-scaling-{rate_tag(rate_bps)}"
    return name + ("-sync" if start == "sync" else "") + ("-synthetic" if synthetic else "")


def _r(x, nd=3):
    return None if x is None else round(x, nd)


def fleet_mode_summary(r: dict, w: int) -> dict:
    """One mode's headline numbers: completion, VM times, origin (NIC and data) and worst edge
    in units of W, slowest join, the fleet's CPU and how busy the host was."""
    if "completion_s" not in r:
        return {"error": str(r.get("error", "no completion"))[:200]}
    cpu, tree = r.get("cpu") or {}, r.get("tree") or {}
    out = {
        "completion_s": _r(r["completion_s"]),
        "vm_min_s": _r(r.get("vm_min_s"), 1),
        "vm_median_s": _r(r.get("vm_median_s"), 1),
        "origin_w": _r(r.get("origin_ratio")),
        "origin_data_w": _r(r["origin_data_bytes"] / w) if "origin_data_bytes" in r else None,
        "max_edge_w": _r(r.get("max_edge_ratio")),
        "slowest_join_s": _r(tree.get("joins_wall_s"), 1),
        "fleet_cpu_s": cpu.get("fleet_cpu_s"),
        "host_busy": cpu.get("host_busy"),
    }
    if not (r.get("all_finished", True) and r.get("data_ok", True)):
        out["failed"] = True
    return {k: v for k, v in out.items() if v is not None}


def fleet_summary(doc: dict, scenario: str) -> dict:
    """The history line of one fleet size: provenance, parameters, each mode's headline numbers."""
    prov = doc.get("provenance") or {}
    h = dict(prov.get("host") or {})
    speed = prov.get("host_speed") or {}
    if not h and speed:
        h = {"cpu_model": speed.get("cpu_model"), "cores": speed.get("cores")}
    if "python_loop_2e6_s" in speed:
        h["python_loop_2e6_s"] = speed["python_loop_2e6_s"]
    w = doc["working_set_bytes"]
    return {
        "date": (prov.get("date") or "")[:10],
        "commit": prov.get("commit") or prov.get("git_commit"),
        "host": h or None,
        "bench": "fleet",
        "scenario": scenario,
        "command": doc.get("command"),
        "nodes": doc["nodes"],
        "vms": doc.get("vms"),
        "rate_bps": doc["rate_bps"],
        "start": doc.get("start"),
        "working_set_bytes": w,
        "link_bound_s": _r(doc.get("link_bound_s"), 2),
        "trace_sha1": prov.get("trace_sha1"),
        "modes": {m: fleet_mode_summary(r, w) for m, r in doc["modes"].items()},
    }


# ----------------------------------------------------------------------------- cache engines
def cache_engines_name(prefetch: bool, readahead_kib, rate, trace: bool, smoke: bool, readers, all_readers) -> str:
    """cache-engines (the defaults), -prefetch, -readaheadN, -<rate> unless 200mbit, -readers-r3,
    -synthetic (no trace), -smoke."""
    name = "cache-engines"
    if prefetch:
        name += "-prefetch"
    if readahead_kib is not None:
        name += f"-readahead{readahead_kib}"
    if rate != "200mbit":
        name += f"-{rate or 'unshaped'}"
    if list(readers) != list(all_readers):
        name += "-readers-" + "-".join(readers)
    if smoke:
        name += "-smoke"
    elif not trace:
        name += "-synthetic"
    return name


def cache_engines_summary(doc: dict, scenario: str) -> dict:
    prov = doc.get("provenance") or {}
    engines = {}
    for k, r in doc["engines"].items():
        if "completion_s" not in r:
            engines[k] = {"error": str(r.get("error", ""))[:200]}
            continue
        engines[k] = {
            "completion_s": _r(r["completion_s"], 2),
            "origin_w": _r(r.get("origin_ratio")),
            "max_edge_w": _r(r.get("max_edge_ratio")),
            "edges_w": {f"{e['parent']}>{e['child']}": _r(e.get("ratio")) for e in r.get("edges", [])},
        }
    return {
        **run_fields(prov),
        "bench": "cache_engines",
        "scenario": scenario,
        "command": doc.get("command"),
        "rate": doc.get("rate"),
        "readers": doc.get("readers"),
        "working_set_bytes": doc.get("working_set_bytes"),
        "trace_sha1": prov.get("trace_sha1"),
        "default": doc.get("default"),
        "engines": engines,
    }
