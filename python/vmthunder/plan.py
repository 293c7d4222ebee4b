"""How long will a boot storm take, and with which shape? A thin command over the simulator
in the library (`vmthunder.simulate`, src/sim): parse the arguments, run it, print or write
the result.

    python -m vmthunder.plan --nodes 160 --vms 160 --rate 1gbit --trace bench/traces/debian12-boot.json
    python -m vmthunder.plan --nodes 1000 --rate 10gbit --trace T --shape chain --fail auto@5 --json
    python -m vmthunder.plan --nodes 160 --trace T --fail auto@50%   # dies with its children half fed
"""

import argparse
import json
import re
import sys
from typing import Any, Dict, List, Optional

from . import InvalidArgument, simulate

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_rate(text: str) -> float:
    """'1gbit', '100mbit', '25Mbit/s', '1e9' -> bits per second."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?)(?:bit|bps|b)?(?:/s)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"rate {text!r}: expected a number with kbit, mbit or gbit")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_fail(text: str) -> Dict[str, Any]:
    """'cn3@10' or 'auto@10': that relay dies 10 s into the storm; 'auto@50%': once its
    children hold half of what they fetch through it."""
    node, sep, at = text.partition("@")
    try:
        if not (node and sep):
            raise ValueError
        if at.endswith("%"):
            return {"node": node, "children_have": float(at[:-1]) / 100}
        return {"node": node, "at_s": float(at)}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--fail {text!r}: expected RELAY@SECONDS or RELAY@PERCENT (cn3@10, auto@10, auto@50%)"
        ) from None


def params_from_args(a: argparse.Namespace) -> Dict[str, Any]:
    p: Dict[str, Any] = {"nodes": a.nodes, "vms": a.vms or 0, "rate_bps": a.rate, "shape": a.shape}
    if a.fanout is not None:
        p["fanout"] = a.fanout
    if a.trace:
        p["trace"] = a.trace
    for key in ("working_set_bytes", "image_bytes", "origin_rate_bps"):
        if getattr(a, key) is not None:
            p[key] = getattr(a, key)
    if a.fail:
        p["fail"] = a.fail
    if a.no_prefetch:
        p["prefetch"] = False
    for kv in a.set or []:
        key, _, value = kv.partition("=")
        p[key] = json.loads(value)
    return p


def summary(out: Dict[str, Any]) -> str:
    times = sorted(t for t in out["vm_times_s"] if t is not None)
    w = out["working_set_bytes"]
    done = out["completion_s"]
    lines = [
        f"{out['nodes']} nodes, {out['vms']} VMs, {out['rate_bps'] / 1e6:g} Mbit/s, shape {out['shape']}"
        f" (fan-out {out['fanout']}, depth {out['depth']}), W = {w / 2**20:.1f} MiB",
        f"completion: {done:.2f} s ({done / out['link_bound_s']:.2f} x W / rate)"
        if done is not None
        else f"completion: not finished ({out['unfinished_vms']} VMs)",
    ]
    if times:
        lines.append(f"VM min / median / max: {times[0]:.2f} / {times[len(times) // 2]:.2f} / {times[-1]:.2f} s")
    lines.append(f"origin sent {out['origin_bytes'] / w:.2f} x W; busiest edge {out['max_edge_bytes'] / w:.2f} x W")
    f = out.get("failure")
    if f:
        when = f"at {f['at_s']:.2f} s" if f["at_s"] is not None else "never (the storm ended first)"
        done = f["subtree_completion_s"]
        lines.append(
            f"relay {f['node']} failed {when}: {out['failed_vms']} VM(s) lost with it; its "
            f"{f['children']} children owed {f['children_owed_bytes'] / w:.2f} x W; its "
            f"{f['descendants']} descendants done " + (f"at {done:.2f} s" if done is not None else "never")
        )
    lines.append(f"simulated in {out['sim_wall_s']:.2f} s ({out['events']} events)")
    return "\n".join(lines)


def plot(out: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = sorted(t for t in out["vm_times_s"] if t is not None)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(times, [(i + 1) / len(times) for i in range(len(times))], drawstyle="steps-post")
    ax.set_xlabel("seconds from the launch")
    ax.set_ylabel("VMs booted (fraction)")
    ax.set_title(f"{out['nodes']} nodes, {out['rate_bps'] / 1e6:g} Mbit/s, {out['shape']} (fan-out {out['fanout']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vmthunder plan", description="Predict a boot storm with the simulator.")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--vms", type=int, default=0, help="VMs, round-robin over the nodes (default: one per node)")
    ap.add_argument("--rate", type=parse_rate, default=parse_rate("1gbit"), help="each link, each way (default 1gbit)")
    ap.add_argument("--trace", help="boot trace JSON (bench/traces/debian12-boot.json)")
    ap.add_argument("--shape", choices=["tree", "chain", "direct", "striped", "full_copy"], default="tree")
    ap.add_argument("--fanout", type=int, help="children per relay (tree), stripes (striped)")
    ap.add_argument(
        "--fail",
        type=parse_fail,
        metavar="RELAY@WHEN",
        help="a relay dies at SECONDS, or at PERCENT%% of its children's data (auto: the busiest)",
    )
    ap.add_argument("--working-set-bytes", dest="working_set_bytes", type=int, help="scale the trace to this W")
    ap.add_argument("--image-bytes", dest="image_bytes", type=int, help="image size for full_copy")
    ap.add_argument("--origin-rate", dest="origin_rate_bps", type=parse_rate, help="the origin's uplink")
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument("--set", action="append", metavar="KEY=JSON", help="any other simulator parameter")
    ap.add_argument("--json", action="store_true", help="print the whole result as JSON")
    ap.add_argument("--out", help="write the JSON result here")
    ap.add_argument("--png", help="plot VM completion times here")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.fanout is not None and a.shape in ("chain", "direct", "full_copy"):
        ap.error(f"--fanout {a.fanout} does not apply to --shape {a.shape}")
    try:
        out = simulate(params_from_args(a))
    except InvalidArgument as e:
        print(f"vmthunder plan: {e}", file=sys.stderr)
        return 2
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)
    if a.png:
        plot(out, a.png)
    print(json.dumps(out, indent=1) if a.json else summary(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
