"""The `vmthunder` command on UML nodes with real iSCSI, LIO and device-mapper.

A exports the image volume (Cinder's stand-in); B attaches VM1 from it through a Tree (a join
without a registry) and relays; C attaches VM2 from B's export. Each node's configuration is a
nova.conf with [vmthunder], as nova-compute has it. The command runs as the operator runs it
(the wheel's console script, a new process each time).
"""

import json
import os
import shlex

import pytest

import vmthunder
from lab import Fleet
from tests.kernel._promtext import parse, value
from tests.kernel._vmt import STATE_DIR, file_md5, md5_of, node_ctor, py, random_disk, require_uml

IMAGE = 32 << 20
VOLUME = "img1"
IMAGE_ID = "5d0c7a31-2b6e-4f0a-8c1d-7e9f0a1b2c3d"

# The console script pip installed next to the package (pip --target: <lib>/bin), else the module.
_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(vmthunder.__file__)), "bin", "vmthunder")
VMTHUNDER = _SCRIPT if os.access(_SCRIPT, os.X_OK) else "python3 -m vmthunder"


def nova_conf(node):
    # enabled = false: the nodes' Python has no Nova, and with vmthunder enabled in nova.conf
    # a Nova without the patch is a failure that blocks (doctor says so)
    return (
        f"[DEFAULT]\nhost = {node.name}\nmy_block_storage_ip = {node.ip}\nstate_path = /var/lib/nova\n\n"
        f"[vmthunder]\nenabled = false\ncache_device = /dev/ubdb\nstate_dir = {STATE_DIR}\ncow_size_mib = 32\n"
    )


def vmt(node, args, timeout=120):
    """`vmthunder ARGS --config-file <the node's nova.conf>`: (exit status, output)."""
    return node.run(f"{VMTHUNDER} {args} --config-file /vmt-share/nova.conf", timeout=timeout)


def vmt_json(node, args, want_rc=0):
    rc, out = vmt(node, args + " --json")
    assert rc == want_rc, out
    return json.loads(out[out.index("{") :])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    require_uml()
    origin = tmp_path_factory.mktemp("origin") / "origin.img"
    random_disk(origin, IMAGE)
    nodes = {"a": {"disks": {"ubdb": str(origin)}}, "b": {"disks": {"ubdb": 256 << 20}}, "c": {"disks": {"ubdb": 256 << 20}}}
    with Fleet(nodes=nodes, name=f"cli{os.getpid()}", subnet="198.18.62.0/24") as f:
        a = f["a"]
        py(a, f"out(vmthunder.export_volume({VOLUME!r}, '/dev/ubdb', '{a.ip}:3260'))")
        for n in ("b", "c"):
            f[n].write_file("nova.conf", nova_conf(f[n]).encode())
        f.origin_md5 = file_md5(origin, IMAGE)
        yield f


def test_doctor_names_a_module_that_is_not_loaded_and_passes_once_it_is(fleet):
    c = fleet["c"]
    c.check("modprobe -r tcm_loop", timeout=60)
    try:
        rc, out = vmt(c, "doctor")
        assert rc == 1, out
        assert "FAIL  module tcm_loop" in out and "fix: modprobe tcm_loop" in out, out
        assert "1 problem(s) block attaches: module tcm_loop" in out, out
        checks = vmt_json(c, "doctor", want_rc=1)["checks"]
        bad = [ch for ch in checks if not ch["ok"]]
        assert [ch["name"] for ch in bad] == ["module tcm_loop"], bad
        assert bad[0]["blocking"] and bad[0]["detail"].startswith("not loaded (installed: /lib/modules/"), bad
        assert set(bad[0]) == {"name", "ok", "blocking", "detail", "fix"}
    finally:
        c.check("modprobe tcm_loop", timeout=60)
    rc, out = vmt(c, "doctor")
    assert rc == 0 and "nothing blocks attaches on this node" in out, out


def test_doctor_passes_on_a_prepared_node(fleet):
    b = fleet["b"]
    checks = vmt_json(b, "doctor")["checks"]
    names = [ch["name"] for ch in checks]
    for want in (
        "module dm-snapshot",
        "module dm-multipath",
        "module bcache",
        "module target_core_mod",
        "module target_core_file",
        "module iscsi_tcp",
        "module tcm_loop",
        "configfs",
        "iscsid",
        "initiator name",
        "make-bcache",
        "bcache udev rule",
        "cache device",
        "state dir",
        "registry",
        "nova patch",
    ):
        assert want in names, names
    assert all(ch["ok"] for ch in checks), [ch for ch in checks if not ch["ok"]]
    dev = checks[names.index("cache device")]
    assert dev["detail"].startswith("/dev/ubdb: block device, 256 MiB, not used by anything else"), dev
    assert checks[names.index("initiator name")]["detail"].startswith(b.initiator_iqn)


def attach_b_and_c(fleet):
    """VM1 on B through a Tree (no registry: a join from the origin), B relays to C's VM2."""
    a, b, c = fleet["a"], fleet["b"], fleet["c"]
    conn_b = py(a, f"out(vmthunder.allow_initiator({VOLUME!r}, {b.initiator_iqn!r}, '{a.ip}:3260'))")
    vm1 = py(
        b,
        node_ctor(b, export_ip=b.ip)
        + f"""
from vmthunder.tree import Tree
tree = Tree(node, None, initiator={b.initiator_iqn!r}, export_ip={b.ip!r}, state_dir={STATE_DIR!r})
out(tree.attach({IMAGE_ID!r}, {conn_b!r}, 'vm1'))""",
    )
    conn_c = py(b, node_ctor(b, export_ip=b.ip) + f"out(node.export_info({IMAGE_ID!r}, {c.initiator_iqn!r}))")
    vm2 = py(c, node_ctor(c) + f"out(node.attach({IMAGE_ID!r}, [{conn_c!r}], 'vm2'))")
    # every block read once on each node: B fetches the image from A, C from B
    assert md5_of(b, vm1, IMAGE) == fleet.origin_md5
    assert md5_of(c, vm2, IMAGE) == fleet.origin_md5
    return vm1, vm2


@pytest.fixture(scope="module")
def attached(fleet):
    return attach_b_and_c(fleet)


def test_status_shows_what_attach_built(fleet, attached):
    a, b, c = fleet["a"], fleet["b"], fleet["c"]
    vm1, vm2 = attached
    st = vmt_json(b, "status")
    built = py(b, node_ctor(b, export_ip=b.ip) + "out(node.status())")
    assert sorted(st["templates"]) == sorted(built["templates"]) == [IMAGE_ID]
    t = st["templates"][IMAGE_ID]
    assert t["vms"] == ["vm1"] and t["complete"] and t["export_iqn"] == f"iqn.2026-11.org.vmthunder:b:{IMAGE_ID}"
    assert t["devices"] == built["templates"][IMAGE_ID]["devices"]
    [path] = t["paths"]
    assert path["parent"] == "origin" and path["portal"] == f"{a.ip}:3260" and path["state"] == "A", path
    assert path["target"] == f"iqn.2026-11.org.vmthunder.volume:{VOLUME}"
    assert path["read_bytes"] >= IMAGE, path  # B read all of it from A
    assert t["served"][c.initiator_iqn]["session"] is True
    assert t["served"][c.initiator_iqn]["bytes"] >= IMAGE, t["served"]  # ... and sent all of it to C
    assert set(t["cache"]) == {"hits", "misses"}
    assert t["local_read_bytes"] >= IMAGE
    assert st["vms"]["vm1"]["image"] == IMAGE_ID and st["vms"]["vm1"]["state"] == "attached"
    assert st["vms"]["vm1"]["cow"]["state"] == "valid"
    # C's path goes to B
    [cp] = vmt_json(c, "status")["templates"][IMAGE_ID]["paths"]
    assert cp["parent"] == "b" and cp["portal"] == f"{b.ip}:3260" and cp["read_bytes"] >= IMAGE, cp
    # the human form says the same
    rc, out = vmt(b, "status")
    assert rc == 0, out
    assert f"template {IMAGE_ID}: 32.0 MiB, bcache, complete" in out, out
    assert f"origin {a.ip}:3260" in out and "active" in out and f"{c.initiator_iqn}  connected, served" in out, out
    assert "vm1  image" in out and "COW" in out, out


def test_metrics_are_prometheus_text_with_the_expected_series(fleet, attached):
    a, b, c = fleet["a"], fleet["b"], fleet["c"]
    rc, out = vmt(b, "metrics")
    assert rc == 0, out
    fam = parse(out)
    img = {"image": IMAGE_ID}
    assert value(fam, "vmthunder_path_up", parent="origin", position=0, portal=f"{a.ip}:3260", **img) == 1
    assert value(fam, "vmthunder_parent_read_bytes_total", parent="origin", **img) >= IMAGE
    assert value(fam, "vmthunder_child_served_bytes_total", initiator=c.initiator_iqn, **img) >= IMAGE
    assert value(fam, "vmthunder_child_connected", initiator=c.initiator_iqn, **img) == 1
    assert value(fam, "vmthunder_template_vms", **img) == 1
    assert value(fam, "vmthunder_vm_cow_size_bytes", vm="vm1") == 32 << 20
    assert 0 < value(fam, "vmthunder_vm_cow_used_bytes", vm="vm1") < 32 << 20
    assert value(fam, "vmthunder_vm_cow_valid", vm="vm1") == 1
    assert value(fam, "vmthunder_cache_hits_total", engine="bcache", **img) >= 0
    assert value(fam, "vmthunder_join_duration_seconds_count") == 1  # the Tree's join
    assert value(fam, "vmthunder_attach_duration_seconds_count") >= 1
    assert value(fam, "vmthunder_join_duration_seconds_sum") > 0
    for name in ("vmthunder_parent_read_bytes_total", "vmthunder_child_served_bytes_total", "vmthunder_cache_misses_total"):
        assert fam[name]["type"] == "counter" and fam[name]["help"], name
    assert fam["vmthunder_attach_duration_seconds"]["type"] == "summary"
    # for node_exporter's textfile collector: written whole, then renamed into place
    rc, out = vmt(b, "metrics --output /tmp/textfile/vmthunder.prom")
    assert rc != 0 and "/tmp/textfile/vmthunder.prom" in out, out  # no such directory: said so
    b.check("mkdir -p /tmp/textfile")
    rc, out = vmt(b, "metrics --output /tmp/textfile/vmthunder.prom")
    assert rc == 0 and out.strip() == "", out
    written = parse(b.check("cat /tmp/textfile/vmthunder.prom"))
    assert value(written, "vmthunder_template_vms", **img) == 1
    assert b.check("ls -A /tmp/textfile").split() == ["vmthunder.prom"]  # no temporary file left


def test_recover_rebuilds_a_lost_disk_at_its_path(fleet, attached):
    b = fleet["b"]
    vm1, _ = attached
    rep = vmt_json(b, "recover")  # nothing lost: the disk is adopted where it is
    assert rep["reassembled"]["disks"] == {"vm1": vm1} and rep["reassembled"]["failed"] == {}, rep
    b.check(f"printf vmthunder-cli-write | dd of={vm1} bs=4096 seek=256 conv=sync,fsync oflag=direct 2>&1")
    written = b.check(f"dd if={vm1} bs=4096 skip=256 count=1 iflag=direct 2>/dev/null | md5sum").split()[0]
    # the VM's snapshot device goes (as the host's device-mapper state does in a reboot) ...
    b.check(f"dmsetup remove {shlex.quote(os.path.basename(vm1))}")
    assert b.run(f"test -e {vm1}")[0] != 0
    rc, out = vmt(b, "recover")
    assert rc == 0 and f"rebuilt  VM vm1: {vm1}" in out, out
    # ... and comes back at its path with the VM's write, the rest still the image
    assert b.check(f"dd if={vm1} bs=4096 skip=256 count=1 iflag=direct 2>/dev/null | md5sum").split()[0] == written
    assert md5_of(b, vm1, 1 << 20) == py(
        fleet["a"], "import hashlib; out(hashlib.md5(open('/dev/ubdb','rb').read(1 << 20)).hexdigest())"
    )
