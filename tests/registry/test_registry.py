"""vmthunder.registry against real backends: a file:// directory and a real etcd server.

Timings are printed (run with -s to see them) and asserted only with generous bounds.
"""

import math
import multiprocessing
import socket
import threading
import time
import uuid

import pytest
import registry_workers as W
from conftest import Etcd, free_port

import vmthunder
from vmthunder.registry import HOSTS_GROUP, Registry, RegistryError, image_group, wait_for

LEASE = 3.0  # short leases keep the liveness tests quick


def new_image():
    return "img-" + uuid.uuid4().hex[:12]


@pytest.fixture
def regs():
    """Make started registries; all stopped at teardown."""
    made = []

    def make(url, host, **kw):
        kw.setdefault("lease_s", LEASE)
        r = Registry(url, host, **kw)
        r.start()
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


def hosts_of(records):
    return [r["host"] for r in records]


# -- validation (no backend needed) ------------------------------------------------------------
def test_error_is_a_vmthunder_error():
    assert issubclass(RegistryError, vmthunder.Error)


@pytest.mark.parametrize(
    "url,needle",
    [
        ("bogus://x", "bogus://x"),
        ("etcd3+http://", "no host"),
        ("file://relative", "file://relative"),
        ("file://", "absolute path"),
        ("file:///a/../b", "'..'"),
        ("etcd3+http://h:99999", "h:99999"),
        ("etcd3+http://h:2379?membership_timeout=1", "lease_s"),
        ("etcd3+http://h:2379?nosuch=1", "nosuch"),
        ("etcd3+http://u:pw@h:2379", "user information"),
        ("", "non-empty"),
        (None, "None"),
    ],
)
def test_bad_url(url, needle):
    with pytest.raises(RegistryError) as ei:
        Registry(url, "cn1")
    assert needle in str(ei.value)
    if url:
        assert repr(url) in str(ei.value) or url in str(ei.value)


@pytest.mark.parametrize(
    "url",
    [
        "file:///var/lib/vmthunder/registry",
        "etcd3+http://198.18.0.1:2379",
        "etcd://198.18.0.1:2379",
        "etcd://localhost",
        "etcd3+https://[::1]:2379",
        "etcd3+http://h:2379?api_version=v3",
    ],
)
def test_good_urls_accepted(url):
    Registry(url, "cn1")  # nothing contacted before start()


@pytest.mark.parametrize("member", ["CN1", "a_b", "", "x" * 41, "-a", "a/b", "a..b", 7])
def test_bad_member_id(member):
    with pytest.raises(RegistryError, match="member id"):
        Registry("file:///tmp/x", member)


@pytest.mark.parametrize("kw", [{"lease_s": 0}, {"lease_s": -1}, {"timeout_s": "x"}, {"timeout_s": float("inf")}])
def test_bad_durations(kw):
    with pytest.raises(RegistryError, match=next(iter(kw))):
        Registry("file:///tmp/x", "cn1", **kw)


def test_not_started(tmp_path):
    r = Registry(f"file://{tmp_path}", "cn1")
    with pytest.raises(RegistryError, match="not started"):
        r.peers("img1")
    r.stop()  # harmless


def test_bad_image_ids_and_records(tmp_path, regs):
    r = regs(f"file://{tmp_path}", "cn1")
    for bad in ["a_b", "../x", "", "x" * 41, "a/b"]:
        for call in (lambda: r.publish(bad, {}), lambda: r.peers(bad), lambda: r.leave(bad), lambda: r.lock(bad).__enter__()):
            with pytest.raises(RegistryError, match="image id"):
                call()
    with pytest.raises(RegistryError, match="dict"):
        r.publish("img1", ["not", "a", "dict"])
    with pytest.raises(RegistryError, match="JSON"):
        r.publish("img1", {"x": object()})
    with pytest.raises(RegistryError, match="not this member"):
        r.publish("img1", {"host": "cn2"})
    assert r.peers("img1") == []
    assert image_group("img1") == "vmthunder-image-img1"


# -- both backends ------------------------------------------------------------------------------
def test_round_trip(backend_url, regs):
    img = new_image()
    a = regs(backend_url, "cn1")
    assert a.peers(img) == []  # group missing
    rec = {
        "state": "joining",
        "depth": 1,
        "parents": ["origin"],
        "grants": {"cn2": {"lun": 0}},
        "failure_domain": None,
        "t": (1, 2),
    }
    a.publish(img, rec)
    assert a.peers(img) == [
        {
            "host": "cn1",
            "state": "joining",
            "depth": 1,
            "parents": ["origin"],
            "grants": {"cn2": {"lun": 0}},
            "failure_domain": None,
            "t": [1, 2],
        }
    ]
    a.publish(img, {"state": "ready"})  # replaces the record
    assert a.peers(img) == [{"host": "cn1", "state": "ready"}]
    a.leave(img)
    assert a.peers(img) == []
    a.leave(img)  # not a member: nothing
    a.publish(img, {"state": "again"})  # re-join an existing, empty group
    assert hosts_of(a.peers(img)) == ["cn1"]


def test_two_instances_see_each_other(backend_url, regs):
    img = new_image()
    a, b = regs(backend_url, "cn1"), regs(backend_url, "cn2")
    a.publish(img, {"depth": 1})
    b.publish(img, {"depth": 2, "parents": ["cn1"]})
    for r in (a, b):
        assert r.peers(img) == [{"host": "cn1", "depth": 1}, {"host": "cn2", "depth": 2, "parents": ["cn1"]}]
    a.publish_host(
        {"host": "cn1", "initiator": "iqn.1993-08.org.debian:01:cn1", "export_ip": "198.18.0.2", "failure_domain": "rack1"}
    )
    b.publish_host({"initiator": "iqn.1993-08.org.debian:01:cn2", "export_ip": None, "failure_domain": "rack2"})
    assert {h["host"]: h["failure_domain"] for h in a.hosts()} == {"cn1": "rack1", "cn2": "rack2"}
    assert b.hosts()[0]["initiator"] == "iqn.1993-08.org.debian:01:cn1"
    # other images are separate groups
    assert a.peers(new_image()) == []
    b.stop()  # stop leaves every group
    assert hosts_of(a.peers(img)) == ["cn1"]
    assert hosts_of(a.hosts()) == ["cn1"]


def test_context_manager_and_restart(backend_url):
    img = new_image()
    with Registry(backend_url, "cn1", lease_s=LEASE) as a:
        a.publish(img, {"n": 1})
        with Registry(backend_url, "cn1", lease_s=LEASE) as again:  # same member, second process
            again.publish(img, {"n": 2})  # takes the record over
            assert a.peers(img) == [{"host": "cn1", "n": 2}]
    with Registry(backend_url, "cn9", lease_s=LEASE) as c:
        assert c.peers(img) == []


def test_lock_excludes_second_holder(backend_url, regs):
    img = new_image()
    a, b = regs(backend_url, "cn1"), regs(backend_url, "cn2")
    with a.lock(img):
        t = time.monotonic()
        with pytest.raises(RegistryError, match=f"vmthunder-image-{img}.*not acquired within 0.5s"):
            with b.lock(img, timeout_s=0.5):
                pytest.fail("second holder got the lock")
        waited = time.monotonic() - t
        print(f"\n[{backend_url.split(':')[0]}] second holder gave up after {waited:.2f}s (timeout 0.5s)")
        assert 0.4 < waited < 4 * 0.5 + 2
        with b.lock(new_image(), timeout_s=1):  # another image's lock is independent
            pass
    with b.lock(img, timeout_s=5):  # released: the other one gets it
        pass
    # threads of one process exclude each other too
    inside, overlap = [], []

    def worker():
        for _ in range(3):
            with a.lock(img, timeout_s=30):
                inside.append(1)
                if len(inside) > 1:
                    overlap.append(1)
                time.sleep(0.02)
                inside.pop()

    ts = [threading.Thread(target=worker) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not overlap


def test_lock_released_on_exception(backend_url, regs):
    img = new_image()
    a, b = regs(backend_url, "cn1"), regs(backend_url, "cn2")
    with pytest.raises(ZeroDivisionError):
        with a.lock(img):
            1 / 0
    with b.lock(img, timeout_s=5):
        pass


def _spawn_member(url, host, img, hold_lock=False):
    W.prewarm()
    ctx = multiprocessing.get_context(W.FORK)
    ready = ctx.Event()
    p = ctx.Process(target=W.member, args=(url, host, img, LEASE, ready, hold_lock), daemon=True)
    p.start()
    if not ready.wait(30):
        W.kill(p)
        pytest.fail(f"child {host} did not publish within 30s")
    return p


def test_killed_member_disappears(backend_url, regs):
    """A member whose process is SIGKILLed (no leave, no heartbeats) drops out of peers() after
    about the lease; a live member stays across several leases (its heartbeat works)."""
    img = new_image()
    me = regs(backend_url, "cn1")
    me.publish(img, {"state": "ready"})
    p = _spawn_member(backend_url, "cn2", img)
    try:
        assert hosts_of(me.peers(img)) == ["cn1", "cn2"]
        time.sleep(0.2)
        W.kill(p)
        t = time.monotonic()
        wait_for(
            lambda: hosts_of(me.peers(img)) == ["cn1"], math.ceil(LEASE) + 8, interval_s=0.1, what="the killed member's expiry"
        )
        gone = time.monotonic() - t
    finally:
        W.kill(p)
    kind = backend_url.split(":")[0]
    print(f"\n[{kind}] killed member gone from peers() {gone:.2f}s after SIGKILL (lease_s={LEASE})")
    assert gone > 0.3 * LEASE, "dropped long before its lease could have expired"
    time.sleep(LEASE)  # the survivor outlives more than 2 leases
    assert hosts_of(me.peers(img)) == ["cn1"]


def test_lock_of_killed_holder_is_freed(backend_url, regs):
    img = new_image()
    me = regs(backend_url, "cn1")
    p = _spawn_member(backend_url, "cn2", img, hold_lock=True)
    try:
        with pytest.raises(RegistryError, match="not acquired"):
            with me.lock(img, timeout_s=0.3):
                pass
        W.kill(p)
        t = time.monotonic()
        with me.lock(img, timeout_s=math.ceil(LEASE) + 8):
            freed = time.monotonic() - t
    finally:
        W.kill(p)
    print(f"\n[{backend_url.split(':')[0]}] lock of a SIGKILLed holder acquired {freed:.2f}s after the kill")


# -- etcd only -----------------------------------------------------------------------------------
def test_etcd_alias_scheme(etcd_url, regs):
    img = new_image()
    a = regs(etcd_url, "cn1")
    b = regs(etcd_url.replace("etcd3+http://", "etcd://"), "cn2")
    a.publish(img, {})
    assert hosts_of(b.peers(img)) == ["cn1"]


def test_etcd_republish_after_lease_lost(etcd_url, regs):
    """If this member's lease lapses behind its back (here: revoked, as after a long pause), the
    heartbeat makes a new one and re-publishes every record."""
    img = new_image()
    a, b = regs(etcd_url, "cn1"), regs(etcd_url, "cn2")
    a.publish(img, {"state": "ready"})
    a.publish_host({"initiator": "iqn.x:cn1"})
    a._coord._membership_lease.revoke()  # white-box: what an expiry does
    assert hosts_of(b.peers(img)) == [] and b.hosts() == []
    t = time.monotonic()
    wait_for(
        lambda: hosts_of(b.peers(img)) == ["cn1"] and hosts_of(b.hosts()) == ["cn1"],
        3 * LEASE + 5,
        interval_s=0.1,
        what="re-publication",
    )
    print(f"\n[etcd] records re-published {time.monotonic() - t:.2f}s after the lease was lost")
    assert b.peers(img) == [{"host": "cn1", "state": "ready"}]


def test_etcd_unreachable_closed_port(regs):
    url = f"etcd3+http://127.0.0.1:{free_port()}"  # nothing listens there
    timeout = 2.0
    t = time.monotonic()
    with pytest.raises(RegistryError) as ei:
        Registry(url, "cn1", timeout_s=timeout).start()
    took = time.monotonic() - t
    print(f"\n[etcd] closed port: {ei.value} ({took:.2f}s)")
    assert f"coordination service at {url} unreachable" in str(ei.value)
    assert took < 4 * timeout + 2


def test_etcd_unreachable_silent_server():
    """A server that accepts connections and never answers: bounded by timeout_s."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    url = f"etcd3+http://127.0.0.1:{srv.getsockname()[1]}"
    try:
        timeout = 1.0
        t = time.monotonic()
        # our bound and the HTTP client's read timeout (both 1 s) race: either may name it
        with pytest.raises(RegistryError, match="unreachable.*(no answer within 1s|timed out)"):
            Registry(url, "cn1", timeout_s=timeout).start()
        took = time.monotonic() - t
        print(f"\n[etcd] silent server: gave up after {took:.2f}s (timeout_s={timeout})")
        assert took < 4 * timeout + 2
    finally:
        srv.close()


def test_etcd_dies_under_us(tmp_path):
    """Calls fail within their bound once etcd is gone, and stop() still returns (tooz's own
    stop() would wait forever on its heartbeat thread)."""
    srv = Etcd(tmp_path / "data", tmp_path / "etcd.log")
    timeout = 1.0
    r = Registry(srv.url, "cn1", lease_s=LEASE, timeout_s=timeout)
    try:
        r.start()
        img = new_image()
        r.publish(img, {})
        srv.stop()
        time.sleep(LEASE / 2)  # let the heartbeat hit the dead server
        for call in (lambda: r.peers(img), lambda: r.publish(img, {"x": 1}), lambda: r.lock(img, 1).__enter__()):
            t = time.monotonic()
            with pytest.raises(RegistryError, match="unreachable"):
                call()
            assert time.monotonic() - t < 4 * timeout + 2
    finally:
        t = time.monotonic()
        r.stop()
        took = time.monotonic() - t
        srv.stop()
    print(f"\n[etcd] stop() with etcd dead took {took:.2f}s")
    assert took < 6 * timeout + 2


def test_etcd_groups_names(etcd_url, regs):
    """The layout in etcd, for operators: tooz/groups/<group>/<member>."""
    img = new_image()
    a = regs(etcd_url, "cn1")
    a.publish(img, {})
    a.publish_host({})
    groups = {g.decode() for g in a._coord.get_groups().get(5)}
    assert {image_group(img), HOSTS_GROUP} <= groups


def test_failed_publish_and_leave_are_retried(backend_url, regs, monkeypatch):
    """White-box: one publish and one leave fail (as when the backend blips); the heartbeat
    thread finishes both once calls succeed again."""
    img = new_image()
    a, b = regs(backend_url, "cn1"), regs(backend_url, "cn2")
    real_join, real_leave = a._join, a._leave_group
    monkeypatch.setattr(a, "_join", lambda *args: (_ for _ in ()).throw(OSError("blip")))
    with pytest.raises(RegistryError, match="blip"):
        a.publish(img, {"state": "ready"})
    monkeypatch.setattr(a, "_join", real_join)
    wait_for(lambda: b.peers(img) == [{"host": "cn1", "state": "ready"}], 3 * LEASE + 5, what="re-publication")
    monkeypatch.setattr(a, "_leave_group", lambda *args: (_ for _ in ()).throw(OSError("blip")))
    with pytest.raises(RegistryError, match="blip"):
        a.leave(img)
    monkeypatch.setattr(a, "_leave_group", real_leave)
    wait_for(lambda: b.peers(img) == [], 3 * LEASE + 5, what="retried leave")
    a.publish(img, {"state": "back"})
    time.sleep(LEASE / 2)
    assert b.peers(img) == [{"host": "cn1", "state": "back"}]


def test_slow_lock_attempt_leaves_no_orphan(backend_url, regs, monkeypatch):
    """White-box: an acquire that answers after timeout_s is undone, not left held."""
    img = new_image()
    a = regs(backend_url, "cn1", timeout_s=0.3)
    b = regs(backend_url, "cn2")
    slow = {"on": True}
    real_get_lock = a._coord.get_lock

    def get_lock(name):
        lk = real_get_lock(name)
        real_acquire = lk.acquire

        def acquire(*args, **kw):
            if slow["on"]:
                time.sleep(0.6)
            return real_acquire(*args, **kw)

        lk.acquire = acquire
        return lk

    monkeypatch.setattr(a._coord, "get_lock", get_lock)
    with pytest.raises(RegistryError, match="no answer within 0.3s"):
        with a.lock(img, timeout_s=5):
            pytest.fail("got a lock whose attempt timed out")
    time.sleep(1.0)  # the late attempt has finished (and undone itself)
    with b.lock(img, timeout_s=2):
        pass


def test_an_unchanged_record_is_not_written_again(backend_url, regs, monkeypatch):
    """Tree upkeep republishes every round: a record equal to the one already published costs
    the backend no write; a changed one is written; after a leave the same record is written."""
    img = new_image()
    a, b = regs(backend_url, "cn1"), regs(backend_url, "cn2")
    writes = []
    real_join = a._join
    monkeypatch.setattr(a, "_join", lambda c, group, rec: (writes.append(group), real_join(c, group, rec))[1])
    rec = {"state": "ready", "depth": 1, "grants": {"cn2": {"lun": 0}}}
    a.publish(img, rec)
    a.publish(img, dict(rec))
    a.publish_host({"initiator": "iqn.x:cn1"})
    a.publish_host({"initiator": "iqn.x:cn1"})
    assert len(writes) == 2, writes
    a.publish(img, dict(rec, depth=2))
    assert len(writes) == 3 and b.peers(img) == [{"host": "cn1", **rec, "depth": 2}]
    a.leave(img)
    a.publish(img, dict(rec, depth=2))
    assert len(writes) == 4 and hosts_of(b.peers(img)) == ["cn1"]
