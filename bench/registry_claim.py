"""Time one join's claim against a real etcd (native on the host, as the fleet runs it): the
image lock, a read of the peers, a publish, the unlock. Writes results/registry-claim.json (with
its provenance) and appends its summary to history.jsonl beside it; the simulator's
registry_round_s is its mean claim over its rounds.

    python3 -m bench.registry_claim [--claims 50]
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench import record  # provenance, history

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--claims", type=int, default=50)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "registry-claim.json"))
    a = ap.parse_args(argv)
    from vmthunder.registry import Registry

    d = tempfile.mkdtemp(prefix="vmt-etcd-")
    cport, pport = free_port(), free_port()
    curl, purl = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{pport}"
    proc = subprocess.Popen(
        [
            shutil.which("etcd"),
            "--name",
            "t",
            "--data-dir",
            d,
            "--listen-client-urls",
            curl,
            "--advertise-client-urls",
            curl,
            "--listen-peer-urls",
            purl,
            "--initial-advertise-peer-urls",
            purl,
            "--initial-cluster",
            f"t={purl}",
            "--log-level",
            "warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(curl + "/health", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("etcd did not start")
                time.sleep(0.1)
        times = []
        with Registry(f"etcd3+http://127.0.0.1:{cport}", "cn1") as reg:
            for i in range(a.claims):
                t0 = time.monotonic()
                with reg.lock("img"):
                    reg.peers("img")
                    reg.publish("img", {"state": "joining", "depth": 1, "parents": ["origin"], "n": i})
                times.append(time.monotonic() - t0)
        times.sort()
        doc = {
            "provenance": record.provenance(),
            "claims": len(times),
            "rounds_per_claim": 4,
            "claim_s_median": times[len(times) // 2],
            "claim_s_mean": sum(times) / len(times),
            "claim_s_max": times[-1],
            "round_s": sum(times) / len(times) / 4,
            "host_cores": os.cpu_count(),
        }
        record.write_result(a.out, doc)
        record.append_history(
            a.out,
            {
                **record.run_fields(doc["provenance"]),
                "bench": "registry_claim",
                "scenario": "registry-claim",
                "command": " ".join(["python3", "-m", "bench.registry_claim"] + (argv if argv is not None else sys.argv[1:])),
                "claims": doc["claims"],
                "claim_s_median": round(doc["claim_s_median"], 4),
                "claim_s_mean": round(doc["claim_s_mean"], 4),
                "round_s": round(doc["round_s"], 4),
            },
        )
        print(json.dumps(doc))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
