"""The `vmthunder` command: what an operator of a compute node runs.

Every subcommand reads the node from the kernel (nothing is cached between runs) and takes its
configuration from nova.conf's [vmthunder] group, as nova-compute does, unless a flag says
otherwise. The work is the library's (src/doctor.rs, src/stats.rs, Node.status/reassemble);
this module parses arguments and prints.
"""

import argparse
import json
import logging
import sys
from typing import Any, Dict, List, Optional

DESCRIPTION = """\
Operate vmthunder on this compute node: boot many instances from one multiattach
volume, each node caching it and relaying it to others, each instance on a local
copy-on-write snapshot.

  vmthunder doctor      is this node ready? every precondition, with the fix
  vmthunder status      templates, paths to parents, children, caches, VMs
  vmthunder metrics     the same as Prometheus metrics (node_exporter textfile)
  vmthunder recover     what nova-compute does when it starts, by hand
  vmthunder plan        predict a boot storm with the simulator

Configuration: [vmthunder] of /etc/nova/nova.conf and /etc/nova/nova-compute.conf
(or --config-file), overridden by --cache-device, --state-dir, --host, --registry.
Run as root (it reads device-mapper, configfs and the local device).
"""

EPILOG = """\
examples:
  vmthunder doctor                     # before enabling vmthunder in nova.conf
  vmthunder status --json | jq '.templates[].paths'
  vmthunder metrics --output /var/lib/prometheus/node-exporter/vmthunder.prom   # from cron
  vmthunder plan --nodes 160 --rate 10gbit --trace bench/traces/debian12-boot.json
"""

LOG = logging.getLogger("vmthunder.cli")


class Usage(Exception):
    """A configuration or argument the command cannot use (exit 2)."""


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("configuration (default: nova.conf's [vmthunder], as nova-compute reads it)")
    g.add_argument(
        "--config-file",
        action="append",
        metavar="PATH",
        help="read this file instead of /etc/nova/nova.conf and /etc/nova/nova-compute.conf (repeatable; later files win)",
    )
    g.add_argument("--cache-device", metavar="DEV", help="the local block device ([vmthunder] cache_device)")
    g.add_argument("--state-dir", metavar="DIR", help="vmthunder's state directory ([vmthunder] state_dir)")
    g.add_argument("--host", help="this node's name as Nova knows it ([DEFAULT] host; default: the host name)")
    g.add_argument("--registry", metavar="URL", help="the relay registry ([vmthunder] coordination_url)")
    g.add_argument(
        "--engine",
        choices=("bcache", "dm-cache"),
        default="bcache",
        help="cache engine of new templates (default bcache; an existing template keeps its own)",
    )
    g.add_argument("-v", "--verbose", action="store_true", help="log what the library does (stderr)")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    ap = argparse.ArgumentParser(
        prog="vmthunder", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    raw = argparse.RawDescriptionHelpFormatter
    d = sub.add_parser(
        "doctor",
        parents=[common],
        formatter_class=raw,
        help="check every precondition of an attach",
        description="Check every precondition of an attach on this node: kernel modules, configfs, "
        "open-iscsi (iscsiadm, iscsid, the initiator name), bcache-tools and its udev rule, "
        "the cache device (a block device, large enough, used by nothing else), the state "
        "dir, the registry and the clock skew against it, the Nova patch in the Nova this "
        "Python imports. Each with PASS or FAIL, what was found and the fix.",
        epilog="exit status: 0 nothing blocks attaches (WARN lines may remain), 1 something does, 2 bad configuration",
    )
    d.add_argument("--json", action="store_true", help='print {"checks": [{"name", "ok", "blocking", "detail", "fix"}]}')
    s = sub.add_parser(
        "status",
        parents=[common],
        help="what this node holds, read from the kernel",
        description="Templates (images held here) with their devices, their paths to parents in "
        "failover order (state, bytes read from each), the children reading this node's "
        "export (bytes served to each), the cache's hits and misses, and every VM with "
        "its copy-on-write use. Read from the kernel at each run.",
    )
    s.add_argument("--json", action="store_true", help="print Node.status(counters=True) as JSON")
    m = sub.add_parser(
        "metrics",
        parents=[common],
        help="Prometheus metrics (node_exporter textfile format)",
        description="This node in Prometheus' text format: bytes from each parent and to each child, "
        "cache hits, misses and hit ratio, COW use per VM, path states, attach and join "
        "durations. Names, units and labels: the README's 'Metrics'. For node_exporter's "
        "textfile collector run it from cron or a systemd timer with --output.",
    )
    m.add_argument(
        "--output", metavar="FILE", help="write FILE atomically (e.g. <textfile dir>/vmthunder.prom) instead of printing"
    )
    r = sub.add_parser(
        "recover",
        parents=[common],
        help="what nova-compute runs at start, by hand",
        description="Rebuild every VM disk the cache device records (after a reboot: the same paths, "
        "the caches reused), finish what interrupted attaches and detaches left, then "
        "remove what unfinished joins left (unused templates, prepared exports, idle iSCSI "
        "sessions). Idempotent; says what it rebuilt and removed. nova-compute does this "
        "itself when it starts.",
        epilog="exit status: 0 every recorded disk is back, 1 some could not be rebuilt "
        "(named, their data kept), 2 bad configuration",
    )
    r.add_argument("--json", action="store_true", help="print {reassembled: {...}, recovered: {...}}")
    sub.add_parser("plan", add_help=False, help="predict a boot storm with the simulator (vmthunder plan --help)")
    return ap


def _settings(a: argparse.Namespace):
    from .conf import ConfigError, load

    try:
        return load(
            a.config_file,
            {"cache_device": a.cache_device, "state_dir": a.state_dir, "coordination_url": a.registry, "host": a.host},
        )
    except ConfigError as e:
        raise Usage(str(e)) from None


def _node(a: argparse.Namespace, settings):
    from . import Node, host_name

    v = settings.vmthunder
    if not v.get("cache_device"):
        where = ", ".join(settings.files) or "no nova.conf found"
        raise Usage(f"no cache device: set [vmthunder] cache_device ({where}) or pass --cache-device")
    kw = {"cow_size_mib": v["cow_size_mib"]} if v.get("cow_size_mib") else {}
    return Node(
        host=host_name(settings.host),
        cache_device=v["cache_device"],
        state_dir=v["state_dir"],
        export_ip=settings.export_ip,
        engine=a.engine,
        **kw,
    )


# ------------------------------------------------------------------------------------ output
def size(n: Optional[float]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_status(st: Dict[str, Any]) -> str:
    out = [
        f"node {st['host']}: local device {st['cache_device']}, {size(st['local_device_bytes'])}, "
        f"{size(st['local_device_used_bytes'])} carved (default engine {st['engine']})"
    ]
    if not st["templates"]:
        out.append("no templates")
    for image, t in sorted(st["templates"].items()):
        state = "complete" if t["complete"] else "INCOMPLETE (a build or teardown stopped half-way: vmthunder recover)"
        out.append(f"template {image}: {size(t['size_bytes'])}, {t.get('engine') or '?'}, {state}")
        if t.get("export_iqn"):
            out.append(f"  exported as {t['export_iqn']}")
        out.append("  paths to parents (failover order; the origin volume last):")
        for i, p in enumerate(t["paths"]):
            where = p.get("parent", "?") + (f" {p['portal']}" if p.get("portal") else "")
            out.append(
                f"    {i}  {where:32} {'active' if p['state'] == 'A' else 'FAILED':7} "
                f"read {size(p.get('read_bytes'))}  ({p['device']})"
            )
        if not t["paths"]:
            out.append("    none (no paths device)")
        c = t.get("cache")
        if c:
            total = c["hits"] + c["misses"]
            ratio = f" ({100 * c['hits'] / total:.0f} % hits)" if total else ""
            out.append(f"  cache: {c['hits']} hits, {c['misses']} misses{ratio}")
        if "local_read_bytes" in t:
            out.append(f"  this node's VMs read {size(t['local_read_bytes'])}")
        out.append(f"  VMs: {', '.join(t['vms']) or 'none'}")
        served = t.get("served") or {}
        if served:
            out.append("  children:")
            for ini, v in sorted(served.items()):
                what = f"connected, served {size(v['bytes'])} this session" if v["session"] else "granted, not connected"
                out.append(f"    {ini}  {what}")
    if st["vms"]:
        out.append("VMs:")
        for vm, v in sorted(st["vms"].items()):
            line = f"  {vm}  image {v['image']}  {v['mode']}  {v['state']}"
            cow = v.get("cow") or {}
            if cow.get("state") == "valid":
                used, total = cow["used_sectors"] * 512, cow["size_sectors"] * 512
                line += f"  COW {size(used)} of {size(total)} ({100 * used / max(total, 1):.0f} %)"
            elif cow:
                line += f"  COW {cow['state'].upper()}: its disk returns errors"
            out.append(line)
    return "\n".join(out)


def format_checks(checks: List[Dict[str, Any]]) -> str:
    width = max((len(c["name"]) for c in checks), default=0)
    out = []
    for c in checks:
        word = "PASS" if c["ok"] else ("FAIL" if c["blocking"] else "WARN")
        out.append(f"{word}  {c['name']:{width}}  {c['detail']}")
        if not c["ok"] and c["fix"]:
            out.append(f"      {'':{width}}  fix: {c['fix']}")
    bad = [c["name"] for c in checks if not c["ok"] and c["blocking"]]
    out.append(f"\n{len(bad)} problem(s) block attaches: {', '.join(bad)}" if bad else "\nnothing blocks attaches on this node")
    return "\n".join(out)


def format_recovery(rep: Dict[str, Any], rec: Dict[str, List[str]]) -> str:
    out = []
    for vm, path in sorted(rep["disks"].items()):
        out.append(f"rebuilt  VM {vm}: {path}")
    for vm, why in sorted(rep["failed"].items()):
        out.append(f"FAILED   {why}")
    for image, why in sorted(rep.get("failed_images", {}).items()):
        out.append(f"FAILED   image {image}: {why}")
    for what in rep["removed"]:
        out.append(f"removed  {what} (an interrupted attach or detach)")
    for image, whats in sorted(rec.items()):
        for what in whats:
            out.append(f"removed  {what} (an unfinished join of image {image})")
    return "\n".join(out) or "nothing to rebuild or remove"


# ------------------------------------------------------------------------------------ commands
def cmd_doctor(a, settings) -> int:
    from .doctor import run

    checks = run(settings, engine=a.engine)
    print(json.dumps({"checks": checks}, indent=1) if a.json else format_checks(checks))
    return 1 if any(not c["ok"] and c["blocking"] for c in checks) else 0


def cmd_status(a, settings) -> int:
    st = _node(a, settings).status(counters=True)
    print(json.dumps(st, indent=1, sort_keys=True) if a.json else format_status(st))
    return 0


def cmd_metrics(a, settings) -> int:
    from . import write_textfile

    text = _node(a, settings).metrics()
    if a.output:
        write_textfile(a.output, text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_recover(a, settings) -> int:
    from .nova import _initiator
    from .tree import Tree

    node = _node(a, settings)
    report = node.reassemble()
    tree = Tree(node, None, initiator=_initiator(), export_ip=settings.export_ip, state_dir=settings.vmthunder["state_dir"])
    recovered = tree.recover()
    print(json.dumps({"reassembled": report, "recovered": recovered}, indent=1) if a.json else format_recovery(report, recovered))
    return 1 if report["failed"] or report.get("failed_images") else 0


COMMANDS = {"doctor": cmd_doctor, "status": cmd_status, "metrics": cmd_metrics, "recover": cmd_recover}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        from .plan import main as plan_main

        return plan_main(argv[1:])
    a = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if a.verbose else logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    from . import Error

    try:
        return COMMANDS[a.command](a, _settings(a))
    except Usage as e:
        print(f"vmthunder {a.command}: {e}", file=sys.stderr)
        return 2
    except Error as e:
        print(f"vmthunder {a.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
