#!/usr/bin/env python3
"""Draw a fleet result's timeline PNG from its JSON (the PNGs are not kept in git).

    python3 -m bench.plot bench/results/fleet-8n-100mbit.json            # -> /tmp/fleet-8n-100mbit-timeline.png
    python3 -m bench.plot bench/results/fleet-8n-100mbit.json -o t.png

Per mode: each VM's boot reads over time, and each node's link upload (bench/fleet_report.py plot,
the one a run draws). Needs matplotlib; scaling results keep no timeline.
"""

import argparse
import json
import os
import sys
import tempfile

from bench import fleet_report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", help="a fleet result JSON (bench/results/fleet-*.json)")
    ap.add_argument("-o", "--out", help="the PNG (default: <tmp>/<result>-timeline.png)")
    a = ap.parse_args(argv)
    with open(a.result) as fh:
        doc = json.load(fh)
    if not any("timeline" in r for r in (doc.get("modes") or {}).values()):
        print(f"{a.result}: no mode with a timeline (a scaling result, or not a fleet result)", file=sys.stderr)
        return 2
    stem = os.path.splitext(os.path.basename(a.result))[0]
    out = a.out or os.path.join(tempfile.gettempdir(), f"{stem}-timeline.png")
    if not fleet_report.plot(doc, out):
        print("no PNG drawn (matplotlib missing?)", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
