"""The relay tree in UML nodes with a real etcd: 1 origin + 5 relays join concurrently and form
a valid tree; a leaf keeps reading while its parent's node is killed; the registry being down
falls back to the origin.

The failover's figures go to failover.json in the test's temporary directory, or in
$VMT_BENCH_RESULTS when set (`VMT_BENCH_RESULTS=bench/results pytest ... -k leaf_survives`
renews bench/results/failover.json and appends its line to history.jsonl there).

Each relay runs tests/kernel/tree_member.py, a stand-in for nova-compute: it holds the registry
membership (heartbeats) and runs the tree upkeep on a thread, as the Nova process would.
"""

import hashlib
import json
import math
import os
import time

import pytest

from bench import record
from lab import Fleet
from tests.kernel._vmt import file_md5, md5_of, py, random_disk, require_uml, start_etcd, wait_json

IMAGE = 32 << 20
IMAGE_ID = "img-tree"
RELAYS = ["r1", "r2", "r3", "r4", "r5"]
DOMAINS = {"r1": "rack1", "r2": "rack2", "r3": "rack1", "r4": "rack2", "r5": "rack1"}
FANOUT = 2
MEMBER = os.path.join(os.path.dirname(__file__), "tree_member.py")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    require_uml()
    origin = tmp_path_factory.mktemp("origin") / "origin.img"
    random_disk(origin, IMAGE)
    nodes = {"o": {"disks": {"ubdb": str(origin)}}}
    # ubdc: a second local device, for the registry-down test (dm-cache: bcache's set is the host's one, on ubdb)
    nodes.update({r: {"disks": {"ubdb": 160 << 20, "ubdc": 160 << 20}} for r in RELAYS})
    with Fleet(nodes=nodes, name=f"tr{os.getpid()}", subnet="198.18.10.0/24", mem="320M") as f:
        o = f["o"]
        f.registry = start_etcd(o)
        py(o, f"vmthunder.export_volume('tree', '/dev/ubdb', '{o.ip}:3260')")
        f.origin_md5 = file_md5(origin, IMAGE)
        with open(origin, "rb") as fh:
            f.chunks = [hashlib.md5(fh.read(64 << 10)).hexdigest() for _ in range(IMAGE // (64 << 10))]
        yield f


def peers(fleet):
    o = fleet["o"]
    return py(
        o,
        f"""
from vmthunder.registry import Registry
r = Registry({fleet.registry!r}, "probe-{int(time.time())}")
r.start()
out(r.peers({IMAGE_ID!r}))
r.stop()
""",
    )


def check_tree(records, n):
    by = {r["host"]: r for r in records}
    assert sorted(by) == sorted(RELAYS[:n]), by.keys()
    primaries = [r["parents"][0] for r in records]
    for p in set(primaries):
        assert primaries.count(p) <= FANOUT, f"fan-out of {p} exceeded: {primaries}"
    for r in records:
        assert r["parents"][0] == "origin" or r["parents"][-1] == "origin", "the origin is always a path (primary or last)"
        seen, cur = set(), r["host"]
        while cur != "origin":
            assert cur not in seen, f"cycle through {cur}"
            seen.add(cur)
            cur = by[cur]["parents"][0]
        assert len(seen) <= math.ceil(math.log(n, FANOUT)) + 1, f"{r['host']} too deep: {seen}"
    return by


def test_concurrent_joins_form_a_tree_and_a_leaf_survives_its_parent(fleet, tmp_path):
    o = fleet["o"]
    member = open(MEMBER, "rb").read()
    for r in RELAYS:
        node = fleet[r]
        conn = py(o, f"out(vmthunder.allow_initiator('tree', {node.initiator_iqn!r}, '{o.ip}:3260'))")
        node.write_file("origin.json", json.dumps(conn).encode())
        node.write_file("expect.json", json.dumps(fleet.chunks).encode())
        node.write_file("tree_member.py", member)
    # All five join at once.
    for r in RELAYS:
        node = fleet[r]
        node.spawn(
            f"python3 /vmt-share/tree_member.py --registry {fleet.registry} --host {r} --image {IMAGE_ID} "
            f"--origin /vmt-share/origin.json --vm vm-{r} --export-ip {node.ip} --domain {DOMAINS[r]} "
            f"--fanout {FANOUT} --workdir /vmt-share/member --max-seconds 1500"
        )
    for r in RELAYS:
        att = wait_json(fleet[r], "/vmt-share/member/attached.json", 240)
        assert "error" not in att, att
        assert md5_of(fleet[r], att["path"], IMAGE) == fleet.origin_md5
    by = check_tree(peers(fleet), len(RELAYS))
    print("tree:", {h: r["parents"] for h, r in by.items()})

    # Let the upkeep publish grants for every host, then pick a leaf under a relay.
    time.sleep(4)
    by = check_tree(peers(fleet), len(RELAYS))
    leaf = next((h for h, r in sorted(by.items()) if r["parents"][0] != "origin"), None)
    assert leaf, f"no relay has a relay parent: {by}"
    parent = by[leaf]["parents"][0]
    ln = fleet[leaf]
    path = wait_json(ln, "/vmt-share/member/attached.json", 10)["path"]
    ln.spawn(
        f"python3 /vmt-share/tree_member.py --reader-only {path} --read-expect /vmt-share/expect.json "
        f"--workdir /vmt-share/reader --max-seconds 120"
    )
    wait_json(ln, "/vmt-share/reader/reader.json", 60)
    fleet[parent].kill()
    killed_at = time.monotonic()
    # The leaf must end up under a live parent.
    new_parents = None
    while time.monotonic() - killed_at < 90:
        recs = {r["host"]: r for r in peers(fleet)}
        if parent not in recs and leaf in recs and parent not in recs[leaf]["parents"]:
            new_parents = recs[leaf]["parents"]
            break
        time.sleep(2)
    assert new_parents is not None, f"{leaf} did not re-parent away from {parent}"
    reparent_s = time.monotonic() - killed_at
    time.sleep(5)  # keep reading from the new parent for a while
    ln.write_file("reader/stop", b"")
    res = wait_json(ln, "/vmt-share/reader/reader.json", 60)
    deadline = time.monotonic() + 60
    while not res.get("done") and time.monotonic() < deadline:
        time.sleep(1)
        res = wait_json(ln, "/vmt-share/reader/reader.json", 10)
    print(f"failover: leaf {leaf} lost parent {parent}; re-parented to {new_parents} after {reparent_s:.1f}s; reader: {res}")
    assert res["errors"] == 0 and res["mismatches"] == 0, res
    assert res["reads"] > len(fleet.chunks), "the reader kept reading through the failover"
    status = wait_json(ln, "/vmt-share/member/status.json", 10)
    states = status["templates"][IMAGE_ID]["paths"]
    assert states and all(p["state"] == "A" for p in states), f"leaf paths after re-parenting: {states}"
    write_failover(
        os.environ.get("VMT_BENCH_RESULTS") or str(tmp_path),
        {
            "leaf": leaf,
            "dead_parent": parent,
            "new_parents": new_parents,
            "reparent_s": round(reparent_s, 1),
            "worst_read_stall_s": round(res["worst_stall_s"], 2),
            "read_errors": res["errors"],
            "mismatches": res["mismatches"],
            "reads": res["reads"],
        },
    )


def write_failover(out_dir, figures):
    prov = {**record.provenance(), "command": "python3 -m pytest tests/kernel/test_relay_tree.py -k leaf_survives"}
    path = os.path.join(out_dir, "failover.json")
    record.write_result(path, {"provenance": prov, **figures})
    record.append_history(
        path,
        {
            **record.run_fields(prov),
            "bench": "relay_tree_failover",
            "scenario": "failover",
            "command": prov["command"],
            **{k: figures[k] for k in ("reparent_s", "worst_read_stall_s", "reads", "read_errors", "mismatches")},
        },
    )


def test_registry_down_falls_back_to_the_origin(fleet):
    # The failover test killed one relay (whichever was a leaf's parent): use a live one.
    o = fleet["o"]
    n = next(fleet[r] for r in reversed(RELAYS) if fleet[r].alive())
    conn = py(o, f"out(vmthunder.allow_initiator('tree', {n.initiator_iqn!r}, '{o.ip}:3260'))")
    out = py(
        n,
        f"""
import io
from vmthunder.registry import Registry, RegistryError
from vmthunder.tree import Tree
buf = io.StringIO(); h = logging.StreamHandler(buf); logging.getLogger("vmthunder").addHandler(h)
try:
    Registry("etcd3+http://{o.ip}:2999", {n.name!r}, timeout_s=2.0).start()
    started = True
except RegistryError as e:
    started = str(e)
node = vmthunder.Node(host={n.name!r}, cache_device="/dev/ubdc", state_dir="/var/lib/vmthunder-down", cow_size_mib=16,
                      engine="dm-cache")   # a second cache device: bcache's set is the host's one, on ubdb
tree = Tree(node, Registry("etcd3+http://{o.ip}:2999", {n.name!r}, timeout_s=2.0), initiator={n.initiator_iqn!r},
            state_dir="/var/lib/vmthunder-down")
path = tree.attach("img-down", {conn!r}, "vm-down")
st = node.status()
tree.detach("vm-down")
out({{"started": started, "path": path, "log": buf.getvalue(), "paths": st["templates"]["img-down"]["paths"]}})
""",
    )
    assert out["started"] is not True and "2999" in out["started"], out
    assert "registry unavailable" in out["log"] and "origin alone" in out["log"], out["log"]
    assert len(out["paths"]) == 1


def test_a_relay_leaving_cleanly_moves_its_children_first(fleet):
    """Runs after the failover test: the surviving tree. A relay with children detaches its
    last VM: it announces 'leaving', its children re-parent, then its template goes."""
    recs = {r["host"]: r for r in peers(fleet)}
    parents = [p for r in recs.values() for p in r["parents"] if p != "origin"]
    relay = next((p for p in sorted(set(parents)) if p in recs), None)
    if relay is None:
        pytest.skip(f"no relay with children in {recs}")
    children = [h for h, r in recs.items() if relay in r["parents"]]
    node = fleet[relay]
    node.write_file("member/detach", b"")
    node.write_file("member/stop", b"")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        recs = {r["host"]: r for r in peers(fleet)}
        st = node.run("cat /vmt-share/member/status.json", timeout=20)[1]
        if relay not in recs and all(relay not in recs[c]["parents"] for c in children) and IMAGE_ID not in st:
            break
        time.sleep(2)
    else:
        raise AssertionError(f"{relay} did not leave cleanly: {recs}")
    for c in children:
        att = wait_json(fleet[c], "/vmt-share/member/attached.json", 10)
        assert md5_of(fleet[c], att["path"], IMAGE) == fleet.origin_md5, f"{c} reads the image after moving"
    assert node.check("ls /sys/class/iscsi_session | wc -l").strip() == "0"
