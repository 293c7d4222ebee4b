"""python -m lab cleanup [--workdir DIR] [--force] | check"""

import argparse
import logging
import os
import sys

from ._fleet import cleanup_workdir
from ._util import DEFAULT_WORKROOT, STATE_FILE, uml_available


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cleanup", help="remove leftovers recorded in harness workdirs")
    c.add_argument("--workdir", action="append", help=f"a fleet workdir (default: every fleet under {DEFAULT_WORKROOT})")
    c.add_argument("--force", action="store_true", help="also clean fleets whose owning process is still running")
    sub.add_parser("check", help="can UML nodes run on this host?")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.cmd == "check":
        ok, reason = uml_available()
        print(("OK: " if ok else "NOT AVAILABLE: ") + reason)
        return 0 if ok else 1

    dirs = args.workdir
    if not dirs:
        try:
            dirs = [os.path.join(DEFAULT_WORKROOT, d) for d in sorted(os.listdir(DEFAULT_WORKROOT))]
        except FileNotFoundError:
            dirs = []
        dirs = [d for d in dirs if os.path.exists(os.path.join(d, STATE_FILE)) or os.path.isdir(os.path.join(d, "nodes"))]
    rc = 0
    for d in dirs:
        if cleanup_workdir(os.path.abspath(d), force=args.force):
            print(f"cleaned {d}")
        else:
            print(f"skipped {d}")
            rc = 1
    if not dirs:
        print("nothing to clean")
    return rc


if __name__ == "__main__":
    sys.exit(main())
