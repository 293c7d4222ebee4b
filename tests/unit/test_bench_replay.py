"""The fleet's two VM stand-ins (bench/replay.c and fleet_guest.py's replay) read the same bytes:
same digest as the host computes from the image, same result fields; errors are reported."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from bench import fleet, fleet_guest
from bench.trace import expected_digest, trace_bin

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")

# page-aligned reads, with an overlap (waits for the read in flight) and a re-read
READS = [[0.0, 0, 65536], [0.0, 1 << 20, 4096], [0.01, 8192, 16384], [0.02, 3 << 20, 131072], [0.02, 0, 4096]]
IMAGE = 4 << 20


@pytest.fixture(scope="module")
def replay_bin(tmp_path_factory):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    data = fleet.build_replay()
    assert data, "bench/replay.c does not build"
    path = tmp_path_factory.mktemp("bin") / "replay"
    path.write_bytes(data)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "img"
    p.write_bytes(os.urandom(IMAGE))  # not tmpfs: O_DIRECT
    return str(p)


def run_c(binary, dev, reads, out, depth=2):
    trace = os.path.join(os.path.dirname(out), "trace.json")
    with open(trace[:-5] + ".bin", "wb") as fh:  # the C replay reads the .json's .bin twin
        fh.write(trace_bin(reads))
    argv = fleet_guest.replay_argv(dev, trace, out, depth, False, binary=binary)  # as the fleet starts it
    rc = subprocess.run(argv, capture_output=True, timeout=60).returncode
    return rc, json.load(open(out))


def test_c_and_python_replays_read_the_same_bytes(replay_bin, image, tmp_path):
    want = expected_digest(image, READS)
    rc, c = run_c(replay_bin, image, READS, str(tmp_path / "c.json"))
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"image_bytes": IMAGE, "reads": READS}))
    subprocess.run(
        fleet_guest.replay_argv(image, str(trace), str(tmp_path / "py.json"), 2, False, python=sys.executable),
        check=True,
        timeout=60,
    )
    py = json.load(open(tmp_path / "py.json"))
    assert rc == 0
    assert c["digest"] == py["digest"] == want
    assert c["finished"] and c["done"] == c["reads"] == len(READS) and c["errors"] == []
    assert c["bytes"] == py["bytes"] == sum(r[2] for r in READS)
    assert set(py) <= set(c), "the C replay writes every field the Python one does"
    assert c["end"] >= c["start"]


def test_c_replay_reports_a_failed_read(replay_bin, tmp_path):
    small = tmp_path / "small"
    small.write_bytes(os.urandom(1 << 20))
    rc, c = run_c(replay_bin, str(small), READS, str(tmp_path / "c.json"))
    assert rc == 1 and not c["finished"]
    assert c["errors"] and "short read" in c["errors"][0] and "at 1048576" in c["errors"][0]
