"""Cache on read, in UML nodes: A (origin) -> B -> C with each cache engine.

- the data read through every level equals the origin;
- a block a node has read is served locally afterwards: a second VM reading the whole image
  fetches (almost) nothing from the parent while the template lives (bcache; dm-cache's smq
  promotes only after repeated hits, which is why it is not the default);
- teardown frees the cache space on the local device.
"""
import os

import pytest

from tests.kernel._vmt import assert_clean, file_md5, md5_of, node_ctor, py, random_disk, require_uml
from tests.kernel.harness import Fleet

IMAGE = 48 << 20
IMAGE_ID = "img-cache"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    require_uml()
    origin = tmp_path_factory.mktemp("origin") / "origin.img"
    random_disk(origin, IMAGE)
    nodes = {"a": {"disks": {"ubdb": str(origin)}}, "b": {"disks": {"ubdb": 256 << 20}}, "c": {"disks": {"ubdb": 256 << 20}}}
    with Fleet(nodes=nodes, name=f"ca{os.getpid()}", subnet="198.18.8.0/24") as f:
        a = f["a"]
        py(a, f"vmthunder.export_volume('vol', '/dev/ubdb', '{a.ip}:3260')")
        f.origin_md5 = file_md5(origin, IMAGE)
        yield f


def read_all(node, path):
    """Read the whole device once with O_DIRECT (as a VM with cache=none does)."""
    node.check(f"dd if={path} of=/dev/null bs=64k iflag=direct 2>&1 | tail -1", timeout=180)


@pytest.mark.parametrize("engine", ["bcache", "dm-cache"])
def test_cache_on_read_through_the_chain(fleet, engine):
    a, b, c = fleet["a"], fleet["b"], fleet["c"]
    ctor_b = node_ctor(b, export_ip=b.ip, engine=engine)
    ctor_c = node_ctor(c, engine=engine)
    conn_b = py(a, f"out(vmthunder.allow_initiator('vol', {b.initiator_iqn!r}, '{a.ip}:3260'))")
    vm1 = py(b, ctor_b + f"out(node.attach({IMAGE_ID!r}, [{conn_b!r}], 'vm1'))")
    st = py(b, ctor_b + "out(node.status())")
    assert st["templates"][IMAGE_ID]["engine"] == engine
    used_with_template = st["local_device_used_bytes"]
    assert used_with_template > 0

    rx0 = b.rx_bytes()
    read_all(b, vm1)
    first = b.rx_bytes() - rx0
    assert first >= IMAGE, "the first read comes from the parent"

    conn_c = py(b, ctor_b + f"out(node.export_info({IMAGE_ID!r}, {c.initiator_iqn!r}))")
    vm2 = py(c, ctor_c + f"out(node.attach({IMAGE_ID!r}, [{conn_c!r}], 'vm2'))")
    assert md5_of(c, vm2, IMAGE) == fleet.origin_md5, "data read through two levels equals the origin"
    assert md5_of(b, vm1, IMAGE) == fleet.origin_md5

    # The cache survives a detach/re-attach of VMs while the template lives (C keeps it alive).
    py(b, ctor_b + "node.detach('vm1')")
    vm3 = py(b, ctor_b + f"out(node.attach({IMAGE_ID!r}, [], 'vm3'))")
    rx1 = b.rx_bytes()
    read_all(b, vm3)
    again = b.rx_bytes() - rx1
    if engine == "bcache":
        assert again < IMAGE * 0.1, f"a re-read fetched {again} bytes from the parent: not cached on read"
    assert md5_of(b, vm3, IMAGE) == fleet.origin_md5

    py(c, ctor_c + "node.detach('vm2')")
    assert_clean(c)
    py(b, ctor_b + "node.detach('vm3')")
    st = py(b, ctor_b + "out(node.status())")
    assert st["templates"] == {} and st["local_device_used_bytes"] == 0, "teardown frees the cache space"
    assert_clean(b)
