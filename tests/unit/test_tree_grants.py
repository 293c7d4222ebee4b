"""Tree upkeep with a fake node and registry (logic only): grants are computed once per host and
template, not on every upkeep round, and a rebuilt template grants afresh; grants other hosts
publish are used only when they name that host's own export of the image."""

import contextlib
import threading
import time

import pytest

import vmthunder
from vmthunder.registry import RegistryError
from vmthunder.tree import Tree

# The export address each fake peer publishes in the hosts group.
EXPORT_IPS = {"cn0": "198.18.0.10", "cn2": "198.18.0.12", "cn3": "198.18.0.13"}
CN0_IQN = vmthunder.template_iqn("cn0", "img")


def cn1_tree(node, reg, tmp_path, **kw):
    """The Tree of host cn1 (its initiator, export address 198.18.0.1), state in tmp_path."""
    return Tree(node, reg, initiator="iqn.1993-08.org.debian:01:cn1", export_ip="198.18.0.1", state_dir=str(tmp_path), **kw)


def grant(parent, image="img", **data):
    """What `parent`'s Node.export_info returns for us: its export of `image`, with CHAP."""
    d = {
        "target_portal": f"{EXPORT_IPS[parent]}:3260",
        "target_iqn": vmthunder.template_iqn(parent, image),
        "target_lun": 0,
        "auth_method": "CHAP",
        "auth_username": "vmtuser1",
        "auth_password": f"Pw-{parent}-Secret9",
    }
    d.update(data)
    return {"driver_volume_type": "iscsi", "data": d}


def checked(parent, image="img"):
    """The connection dict the tree logs in with for `parent`'s grant."""
    return vmthunder.check_grant(grant(parent, image), parent, image, EXPORT_IPS[parent])


_PEER_DIRS = {}


def peer_dir(host):
    """A peer's state dir: where its key pair for sealed grants lives."""
    import tempfile

    if host not in _PEER_DIRS:
        _PEER_DIRS[host] = tempfile.mkdtemp(prefix=f"vmthunder-peer-{host}-")
    return _PEER_DIRS[host]


def peer_host(host, initiator):
    """A live peer's hosts-group record, as its Tree publishes it."""
    return {"host": host, "initiator": initiator, "grant_key": vmthunder.grant_key(peer_dir(host))}


def opened(host, sealed, image="img"):
    """What `host` reads in the grant cn1 (this test's node, 198.18.0.1) sealed for it."""
    return vmthunder.check_grant(sealed, "cn1", image, "198.18.0.1", peer_dir(host))["data"]


def iqn_of(source):
    return source.get("data", source)["target_iqn"]


class FakeTemplate:
    """What Node.template returns, as far as the tree reads it."""

    def __init__(self, vms, children=(), complete=True, paths=()):
        self.vms, self.children, self.complete, self.paths = list(vms), list(children), complete, list(paths)


class FakeNode:
    host = "cn1"

    def __init__(self):
        self.images = {}  # image -> its VMs
        self.export_calls = []
        self.calls = []  # prepare_export, drop_export, prelogin, logout_unused, in order
        self.durations = []  # (op, seconds) recorded for `vmthunder metrics`

    def record_duration(self, op, seconds):
        self.durations.append((op, seconds))

    def prepare_export(self, image):
        self.calls.append(("prepare_export", image))
        return True

    def drop_export(self, image):
        self.calls.append(("drop_export", image))
        return True

    def prelogin(self, source):
        self.calls.append(("prelogin", iqn_of(source)))
        return 1

    def logout_unused(self, source):
        self.calls.append(("logout_unused", iqn_of(source)))
        return 0

    @contextlib.contextmanager
    def joining(self, image):
        self.calls.append(("joining", image))
        try:
            yield
        finally:
            self.calls.append(("joined", image))

    def templates(self):
        return {i: FakeTemplate(v) for i, v in self.images.items()}

    def template(self, image):
        return self.templates().get(image)

    def image_of(self, vm):
        return next((i for i, vms in self.images.items() if vm in vms), None)

    def attach(self, image, sources, vm, snapshot="dm"):
        self.images.setdefault(image, []).append(vm)
        return f"/dev/mapper/{image}-{vm}"

    def detach(self, vm):
        for image, vms in list(self.images.items()):
            if vm in vms:
                vms.remove(vm)
                if not vms:
                    del self.images[image]

    def export_info(self, image, initiator):
        if not initiator.startswith("iqn.") or " " in initiator:  # as Node checks it
            raise vmthunder.InvalidArgument(f"invalid IQN {initiator!r}")
        self.export_calls.append((image, initiator))
        return {
            "target_portal": "198.18.0.1:3260",
            "target_iqn": vmthunder.template_iqn(self.host, image),
            "target_lun": 0,
            "auth_method": "CHAP",
            "auth_username": "vmtuser1",
            "auth_password": f"secret-{len(self.export_calls)}",
        }

    def revoke_grants(self, image, initiators):
        self.calls.append(("revoke_grants", image, tuple(initiators)))
        return []

    def heal_paths(self):
        self.calls.append(("heal_paths",))
        return []


class FakeRegistry:
    """Records in memory, handed out as written (the tree checks them)."""

    def __init__(self):
        self.host_records = {h: {"host": h, "export_ip": ip} for h, ip in EXPORT_IPS.items()}
        self.records = {}
        self.on_peers = None  # called before each peers(): lets a test change the others

    def publish_host(self, rec):
        self.host_records.setdefault(rec["host"], {}).update(rec)

    def hosts(self):
        return [dict(self.host_records[h]) for h in sorted(self.host_records)]

    @contextlib.contextmanager
    def lock(self, image, timeout_s):
        yield

    def peers(self, image):
        if self.on_peers:
            self.on_peers()
        return [dict(r, host=h) for h, r in sorted(self.records.get(image, {}).items())]

    def publish(self, image, rec):
        self.records.setdefault(image, {})["cn1"] = dict(rec)

    def leave(self, image):
        self.records.get(image, {}).pop("cn1", None)


def test_upkeep_grants_only_new_hosts_and_a_rebuilt_template_grants_again(tmp_path):
    node, reg = FakeNode(), FakeRegistry()
    reg.publish_host(peer_host("cn2", "iqn.1993-08.org.debian:01:cn2"))
    tree = cn1_tree(node, reg, tmp_path)
    tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1")
    assert node.export_calls == [("img", "iqn.1993-08.org.debian:01:cn2")]
    first = reg.records["img"]["cn1"]["grants"]["cn2"]
    for _ in range(3):
        tree.maintain()
    assert node.export_calls == [("img", "iqn.1993-08.org.debian:01:cn2")], "upkeep re-granted a known host"
    reg.publish_host(peer_host("cn3", "iqn.1993-08.org.debian:01:cn3"))
    reg.publish_host(peer_host("cn2", "iqn.1993-08.org.debian:01:cn2-new"))  # cn2 was reinstalled
    tree.maintain()
    assert sorted(node.export_calls[1:]) == [
        ("img", "iqn.1993-08.org.debian:01:cn2-new"),
        ("img", "iqn.1993-08.org.debian:01:cn3"),
    ]
    grants = reg.records["img"]["cn1"]["grants"]
    assert set(grants) == {"cn2", "cn3"} and grants["cn2"] != first
    tree.detach("vm1")  # template gone: its ACLs with it
    tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm2")
    assert len(node.export_calls) == 5, node.export_calls


def test_a_joiner_builds_from_the_origin_at_once_and_switches_to_its_parent_once_built(tmp_path):
    """Fan-out 1: cn0 holds the origin's slot and still builds (joining) but has granted cn1.
    cn1 claims under cn0 at once, logs in to the origin and to cn0, prepares its own target and
    grants, builds from the origin alone while cn0 builds, publishes `built`, switches its paths
    to [cn0, origin] only once cn0 is built and publishes `ready` only once cn0 is ready."""
    node, reg = FakeNode(), FakeRegistry()
    reg.publish_host(peer_host("cn2", "iqn.1993-08.org.debian:01:cn2"))
    cn0 = {"state": "joining", "depth": 1, "parents": ["origin"], "failure_domain": None, "grants": {"cn1": grant("cn0")}}
    reg.records["img"] = {"cn0": cn0}
    seen, events = [], []

    def parent_progresses():
        mine = reg.records["img"].get("cn1")
        seen.append(dict(mine) if mine else None)
        if mine and mine.get("built") and not cn0.get("built"):
            cn0["built"] = True
            events.append("cn0 built")
        elif cn0.get("built") and cn0["state"] == "joining" and len(seen) > 8:
            cn0["state"] = "ready"
            events.append("cn0 ready")

    reg.on_peers = parent_progresses
    real_attach = node.attach
    node.attach = lambda image, sources, vm, snapshot="dm": (
        events.append(("attach", sources)),
        real_attach(image, sources, vm, snapshot),
    )[1]
    node.reparent = lambda image, sources: events.append(("reparent", sources)) or "table"
    real_publish = reg.publish
    reg.publish = lambda image, rec: (
        events.append(("publish", rec["state"], rec.get("built", False))),
        real_publish(image, rec),
    )[1]
    tree = cn1_tree(node, reg, tmp_path, fanout=1)
    tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1")
    for t in threading.enumerate():  # the unused sessions are dropped on a thread
        if t.name.startswith("vmthunder-logout-"):
            t.join(10)
    claimed = next(r for r in seen if r)
    assert claimed["parents"][0] == "cn0" and claimed["state"] == "joining", seen
    origin, parent = {"target_iqn": "iqn.x:origin"}, checked("cn0")
    order = [
        e
        for e in events
        if e in ("cn0 built", "cn0 ready") or e[0] in ("attach", "reparent") or e[1:] in (("joining", True), ("ready", False))
    ]
    # dedupe repeated "built" publishes: the first one is what children wait for
    firsts = [e for i, e in enumerate(order) if e not in order[:i]]
    assert firsts == [
        ("attach", [origin]),
        ("publish", "joining", True),
        "cn0 built",
        ("reparent", [parent, origin]),
        "cn0 ready",
        ("publish", "ready", False),
    ], events
    assert ("prelogin", CN0_IQN) in node.calls and ("prelogin", "iqn.x:origin") in node.calls
    assert node.calls.index(("prepare_export", "img")) < len(node.calls)
    assert sorted(c for c in node.calls if c[0] == "logout_unused") == [
        ("logout_unused", CN0_IQN),
        ("logout_unused", "iqn.x:origin"),
    ]
    me = reg.records["img"]["cn1"]
    assert me["parents"][0] == "cn0" and me["state"] == "ready" and set(me["grants"]) == {"cn2"}
    assert "built" not in me


def test_a_parent_gone_before_it_built_leaves_the_joiner_on_the_origin(tmp_path):
    """cn0 granted cn1 and left before its LUN existed: cn1, already built from the origin,
    chooses again (the origin's slot is free now) and never switches its paths."""
    node, reg = FakeNode(), FakeRegistry()
    reg.records["img"] = {"cn0": {"state": "joining", "depth": 1, "parents": ["origin"], "grants": {"cn1": grant("cn0")}}}

    def parent_leaves():
        mine = reg.records["img"].get("cn1")
        if mine and mine.get("built"):
            reg.records["img"].pop("cn0", None)

    reg.on_peers = parent_leaves
    reparents = []
    node.reparent = lambda image, sources: reparents.append(sources) or "table"
    tree = cn1_tree(node, reg, tmp_path, fanout=1)
    tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1")
    me = reg.records["img"]["cn1"]
    assert me["parents"] == ["origin"] and me["state"] == "ready" and reparents == []


def test_a_joiner_never_claims_under_its_own_descendant(tmp_path):
    """cn1 re-chooses after its parent left; cn2 (joining, granted cn1) sits below cn1."""
    node, reg = FakeNode(), FakeRegistry()
    reg.records["img"] = {
        "cn2": {"state": "ready", "depth": 2, "parents": ["cn1", "origin"], "grants": {"cn1": grant("cn2")}},
        "cn1": {"state": "joining", "depth": 1, "parents": ["origin"]},
    }
    tree = cn1_tree(node, reg, tmp_path, fanout=1)
    placement, _ = tree._choose("img", tree._records("img"), last_resort=True, early=True)
    assert "cn2" not in placement.parents


def test_a_join_is_marked_in_flight_from_before_its_first_step_until_attach_returns(tmp_path):
    """The mark is what keeps `recover` in another process away from a join that is only
    half-built because it is still going, also when the join fails."""
    node, reg = FakeNode(), FakeRegistry()
    tree = cn1_tree(node, reg, tmp_path)
    tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1")
    steps = [c[0] for c in node.calls if c[1] == "img" or c[0] in ("prelogin", "logout_unused")]
    assert steps[0] == "joining" and steps.count("joined") == 1
    assert steps.index("joined") > max(steps.index("prepare_export"), steps.index("prelogin"))
    assert "img" in node.images  # attached inside the mark: joined comes after it
    assert [op for op, s in node.durations] == ["join"] and node.durations[0][1] > 0  # for the metrics

    def broken_attach(*args, **kw):
        raise vmthunder.CacheDeviceError("the cache device is gone")

    node.attach, node.calls = broken_attach, []
    with pytest.raises(vmthunder.CacheDeviceError):
        tree.attach("img2", {"target_iqn": "iqn.x:origin"}, "vm2")
    assert node.calls[0] == ("joining", "img2") and ("joined", "img2") in node.calls
    assert len(node.durations) == 1  # a failed join is not a join duration


def test_recover_goes_over_every_image_attached_here_and_leaves_joins_in_flight_alone(tmp_path):
    node, reg = FakeNode(), FakeRegistry()
    tree = cn1_tree(node, reg, tmp_path)
    assert tree.recover() == {}  # nothing attached here yet
    origins = {i: {"target_iqn": f"iqn.x:origin-{i}"} for i in ("a", "b", "c", "d")}
    for image, origin in origins.items():
        tree._save_origin(image, origin)  # what attach does first
    asked = []

    def recover(image, sources):
        asked.append((image, sources))
        if image == "b":
            raise vmthunder.Busy("a join of image 'b' is in flight")
        if image == "c":
            raise vmthunder.RollbackError("recovering image 'c' left: session 3")
        return ["prepared export of image a"] if image == "a" else []

    node.recover = recover
    assert tree.recover() == {"a": ["prepared export of image a"]}
    assert asked == [(i, [o]) for i, o in sorted(origins.items())]


def test_a_failed_build_removes_the_prepared_target(tmp_path):
    node, reg = FakeNode(), FakeRegistry()

    def broken_attach(*args, **kw):
        raise vmthunder.CacheDeviceError("the cache device is gone")

    node.attach = broken_attach
    tree = cn1_tree(node, reg, tmp_path)
    with pytest.raises(vmthunder.CacheDeviceError):
        tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1")
    assert ("drop_export", "img") in node.calls and "cn1" not in reg.records.get("img", {})


def test_only_the_primary_parent_may_still_be_building(tmp_path):
    """The origin has room (primary); cn3 is joining and granted us: it must not become a
    secondary parent we would wait for (placement alone would pick it: [origin, cn3])."""
    node, reg = FakeNode(), FakeRegistry()
    reg.records["img"] = {"cn3": {"state": "joining", "depth": 1, "parents": ["origin"], "grants": {"cn1": grant("cn3")}}}
    tree = cn1_tree(node, reg, tmp_path, fanout=3)
    placement, sources = tree._choose("img", tree._records("img"), early=True)
    assert placement.parents == ["origin"] and sources == [None]
    reg.records["img"]["cn3"]["state"] = "ready"
    placement, _ = tree._choose("img", tree._records("img"), early=True)
    assert placement.parents == ["origin", "cn3"]


def test_a_parent_whose_lun_cannot_be_used_is_excluded_and_the_joiner_still_gets_ready(tmp_path):
    """cn0 is built and ready but switching to it fails (say its LUN would not open): cn1 does
    not stay `joining` (its own children would wait for it), it chooses again without cn0."""
    node, reg = FakeNode(), FakeRegistry()
    reg.records["img"] = {"cn0": {"state": "ready", "depth": 1, "parents": ["origin"], "grants": {"cn1": grant("cn0")}}}

    def broken_reparent(image, sources):
        raise vmthunder.DeviceMapperError("load a table into vmthunder-1_img_paths: ENXIO")

    node.reparent = broken_reparent
    tree = cn1_tree(
        node,
        reg,
        tmp_path,
        fanout=1,
        max_parents=1,
        join_wait_s=0.5,
    )
    tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1")
    me = reg.records["img"]["cn1"]
    assert me["state"] == "ready" and me["parents"] == ["origin"], me


def test_the_build_does_not_wait_for_the_claim(tmp_path):
    """In a chain the claims go one lock round per level; the build from the origin must not
    queue behind them. Here the image lock is held by others until our build has begun: the
    attach still completes, claimed under the parent it found, with our grants published."""
    node, reg = FakeNode(), FakeRegistry()
    reg.publish_host(peer_host("cn2", "iqn.1993-08.org.debian:01:cn2"))
    reg.records["img"] = {"cn0": {"state": "ready", "depth": 1, "parents": ["origin"], "grants": {"cn1": grant("cn0")}}}
    building = threading.Event()

    @contextlib.contextmanager
    def lock_held_by_others_until_we_build(image, timeout_s):
        if not building.wait(5):
            raise RegistryError("lock vmthunder-image-img not acquired within 5s (held by another member)")
        yield

    reg.lock = lock_held_by_others_until_we_build
    real_attach = node.attach

    def attach(image, sources, vm, snapshot="dm"):
        building.set()
        assert sources == [{"target_iqn": "iqn.x:origin"}], "the build reads the origin alone"
        return real_attach(image, sources, vm, snapshot)

    node.attach = attach
    node.reparent = lambda image, sources: "table"
    tree = cn1_tree(node, reg, tmp_path, fanout=1)
    assert tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1") == "/dev/mapper/img-vm1"
    me = reg.records["img"]["cn1"]
    assert me["parents"][0] == "cn0" and me["state"] == "ready" and set(me["grants"]) == {"cn2"}


def test_a_claim_that_fails_leaves_the_vm_on_the_origin_and_the_group(tmp_path):
    """The registry refuses the lock: the VM keeps the disk it was built (origin alone) and we
    are out of the group, so that no child waits for us."""
    node, reg = FakeNode(), FakeRegistry()

    @contextlib.contextmanager
    def refused(image, timeout_s):
        raise RegistryError("lock vmthunder-image-img not acquired within 1s (held by another member)")
        yield

    reg.lock = refused
    left = []
    reg.leave = lambda image: left.append(image)
    tree = cn1_tree(node, reg, tmp_path, fanout=1)
    assert tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1") == "/dev/mapper/img-vm1"
    assert left == ["img"] and node.images == {"img": ["vm1"]}


class RelayNode(FakeNode):
    """A relay's templates stay while a child reads them; release() removes an unused one."""

    def __init__(self):
        super().__init__()
        self.children = {}  # image -> [child host]

    def templates(self):
        return {i: FakeTemplate(v, self.children.get(i, [])) for i, v in self.images.items()}

    def detach(self, vm):
        for vms in self.images.values():
            if vm in vms:
                vms.remove(vm)

    def release(self, image):
        if self.images.get(image) or self.children.get(image):
            return False
        return self.images.pop(image, None) is not None


def test_a_relay_kept_for_a_slow_child_is_removed_by_upkeep_once_the_child_leaves(tmp_path):
    node, reg = RelayNode(), FakeRegistry()
    tree = cn1_tree(node, reg, tmp_path, leave_timeout_s=0.1)
    node.images["building"] = []  # another caller's template, its VM not attached yet
    tree.maintain()
    assert "building" in node.images, "upkeep removed a template it had not kept"
    del node.images["building"]
    tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1")
    node.children["img"] = ["cn2"]
    tree.detach("vm1")  # the child did not move within leave_timeout_s
    assert node.images == {"img": []}
    assert reg.records["img"]["cn1"]["state"] == "leaving"
    tree.maintain()  # still read by cn2: kept
    assert "img" in node.images and "cn1" in reg.records["img"]
    node.children["img"] = []
    tree.maintain()
    assert node.images == {}, "upkeep left the unused template behind"
    assert "cn1" not in reg.records["img"], "upkeep removed the template but stayed in the group"


def test_upkeep_heals_the_paths_with_or_without_a_registry_and_goes_on_when_healing_fails(tmp_path, caplog):
    node = FakeNode()
    Tree(node, None, initiator="iqn.1993-08.org.debian:01:cn1", state_dir=str(tmp_path)).maintain()
    assert node.calls == [("heal_paths",)], "an outage that took the registry down too must still heal the paths"

    def broken():
        raise vmthunder.DeviceMapperError("cannot open /dev/mapper/control")

    node.heal_paths = broken
    reg = FakeRegistry()
    tree = cn1_tree(node, reg, tmp_path)
    tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1")
    reg.publish_host(peer_host("cn3", "iqn.1993-08.org.debian:01:cn3"))
    tree.maintain()
    assert "could not heal the parent paths: cannot open /dev/mapper/control" in caplog.text
    assert node.export_calls == [("img", "iqn.1993-08.org.debian:01:cn3")], "the rest of the round did not run"


def test_early_logins_log_out_what_they_started_and_start_nothing_once_closed():
    from vmthunder.tree import _EarlyLogins

    node = FakeNode()
    logins = _EarlyLogins(node, "img")
    logins.start("origin", {"target_iqn": "iqn.x:origin"})
    logins.start("origin", {"target_iqn": "iqn.x:origin"})  # once per join
    logins.start_parents(vmthunder.Placement(["cn2", "origin"], 2), [{"target_iqn": "iqn.1993-08.org.debian:01:cn2"}, None])
    logins.wait("cn2")
    logins.close()
    logins.start("cn3", {"target_iqn": "iqn.1993-08.org.debian:01:cn3"})  # a claim thread that outlived its join
    deadline = time.monotonic() + 10
    while len([c for c in node.calls if c[0] == "logout_unused"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(c for c in node.calls if c[0] == "prelogin") == [
        ("prelogin", "iqn.1993-08.org.debian:01:cn2"),
        ("prelogin", "iqn.x:origin"),
    ]
    assert sorted(c for c in node.calls if c[0] == "logout_unused") == [
        ("logout_unused", "iqn.1993-08.org.debian:01:cn2"),
        ("logout_unused", "iqn.x:origin"),
    ]


@pytest.mark.parametrize("reverse", [True, False, None])
def test_the_join_prefetches_the_profile_in_the_order_the_tree_was_given(tmp_path, reverse):
    """None (the default) leaves the order to the node: its default for the template's access."""
    node, reg = FakeNode(), FakeRegistry()
    asked = []
    node.prefetch = lambda image, ranges, depth=None, reverse=None, stop=None: (
        asked.append((image, ranges, reverse)) or {"bytes": 0, "complete": True}
    )
    kwargs = {} if reverse is None else {"prefetch_reverse": reverse}
    tree = cn1_tree(node, reg, tmp_path, **kwargs)
    tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1", profile=[[0, 4096], [8192, 4096]])
    assert tree.prefetch_report("img", wait_s=10) == {"bytes": 0, "complete": True}
    assert asked == [("img", [[0, 4096], [8192, 4096]], reverse)]


def test_rejoin_offers_a_rebuilt_template_from_the_origin_with_fresh_grants(tmp_path):
    """After a reboot the node's record has expired: rejoin reads from the origin alone and
    publishes the template ready at depth 1 with new grants; an image still recorded (a restart
    within the lease) or never joined through this tree is left alone."""
    node, reg = FakeNode(), FakeRegistry()
    reg.publish_host(peer_host("cn2", "iqn.1993-08.org.debian:01:cn2"))
    tree = cn1_tree(node, reg, tmp_path)
    tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1")
    tree.attach("other", {"target_iqn": "iqn.x:origin2"}, "vm2")
    reparented = []
    node.reparent = lambda image, sources: reparented.append((image, sources)) or "table"
    paths = {"img": [("8:0", "F"), ("8:16", "A")], "other": [("8:32", "A")], "stranger": [("8:48", "A")]}
    node.images["stranger"] = ["vm3"]
    node.templates = lambda: {i: FakeTemplate(v, paths=paths[i]) for i, v in node.images.items()}
    reg.records["img"].pop("cn1")  # the lease expired while the node was down
    calls_before = len(node.export_calls)
    assert tree.rejoin() == ["img"]
    rec = reg.records["img"]["cn1"]
    assert (rec["state"], rec["depth"], rec["parents"]) == ("ready", 1, ["origin"])
    assert opened("cn2", rec["grants"]["cn2"])["auth_password"] != "secret-1", "fresh ACLs"
    assert len(node.export_calls) == calls_before + 1
    assert reparented == [("img", [{"target_iqn": "iqn.x:origin"}])], "reads from the origin alone first"
    assert tree.rejoin() == [], "idempotent: recorded now"


def test_an_image_is_forgotten_when_its_last_template_goes(tmp_path):
    """`recover` walks the saved origins: an image leaves them when it has no template here any
    more (after its last VM's detach, or a recover that found nothing of it), so a node that
    attached many images over time does not walk them all at every start."""
    node, reg = FakeNode(), FakeRegistry()
    tree = Tree(node, reg, initiator="iqn.x:cn1", export_ip="198.18.0.1", state_dir=str(tmp_path))
    for image in ("a", "b"):
        tree.attach(image, {"target_iqn": f"iqn.x:origin-{image}"}, f"vm-{image}")
    tree.attach("a", {"target_iqn": "iqn.x:origin-a"}, "vm-a2")
    tree._save_origin("crashed", {"target_iqn": "iqn.x:origin-crashed"})  # a join that died
    tree._save_origin("busy", {"target_iqn": "iqn.x:origin-busy"})  # one still in flight
    tree.detach("vm-b")  # b's last VM: its template goes
    tree.detach("vm-a")  # a keeps a VM
    asked = []

    def recover(image, sources):
        asked.append(image)
        if image == "busy":
            raise vmthunder.Busy("a join of image 'busy' is in flight")
        return []

    node.recover = recover
    tree.recover()
    assert asked == ["a", "busy", "crashed"]
    asked.clear()
    tree.recover()
    assert asked == ["a", "busy"]  # "crashed" had nothing left: forgotten
    assert tree._load_origin("a") == {"target_iqn": "iqn.x:origin-a"}


# -- grants and records from other hosts are untrusted --------------------------------------
def _all_log_text(caplog):
    return "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records)


@pytest.mark.parametrize(
    "forged, why",
    [
        (grant("cn0", image="other"), "target"),  # another image's export
        (grant("cn0", target_iqn="iqn.2010-10.org.openstack:volume-1"), "target"),  # any target
        (grant("cn0", target_iqn=vmthunder.template_iqn("cn3", "img")), "target"),  # another host's
        (grant("cn0", target_portal="198.18.0.99:3260"), "portal"),  # not cn0's address
        (grant("cn0", target_lun=3), "LUN 3"),
        (
            grant("cn0", target_portals=["198.18.0.10:3260"] * 4, target_iqns=[CN0_IQN] * 4, target_luns=[0] * 4),
            "4 targets",
        ),  # one login thread each
        ({"target_iqn": CN0_IQN}, "missing target_portal"),
    ],
)
def test_a_forged_grant_gets_no_login_and_one_warning_naming_the_host(tmp_path, caplog, forged, why):
    """cn0 holds the origin's only slot and publishes a grant for us that is not its own
    export of the image: it counts as not having granted us, so we never log in to what it
    names; after the deadline we read from the origin alone."""
    caplog.set_level("DEBUG")
    node, reg = FakeNode(), FakeRegistry()
    reg.records["img"] = {"cn0": {"state": "ready", "depth": 1, "parents": ["origin"], "grants": {"cn1": forged}}}
    node.reparent = lambda image, sources: "table"
    tree = cn1_tree(
        node,
        reg,
        tmp_path,
        fanout=1,
        max_parents=1,
        join_wait_s=0.5,
    )
    tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1")
    logins = [c[1] for c in node.calls if c[0] == "prelogin"]
    assert logins == ["iqn.x:origin"], logins
    assert reg.records["img"]["cn1"]["parents"] == ["origin"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "grant of" in r.getMessage()]
    assert len(warned) == 1 and "cn0" in warned[0] and why in warned[0], warned
    assert "Pw-cn0-Secret9" not in _all_log_text(caplog)


def test_a_grant_that_becomes_valid_is_used_and_a_refusal_is_logged_once(tmp_path, caplog):
    node, reg = FakeNode(), FakeRegistry()
    reg.records["img"] = {
        "cn0": {
            "state": "ready",
            "depth": 1,
            "parents": ["origin"],
            "grants": {"cn1": grant("cn0", target_portal="198.18.0.99:3260")},
        }
    }
    tree = cn1_tree(node, reg, tmp_path, fanout=1)
    for _ in range(3):
        placement, sources = tree._choose("img", tree._records("img"), last_resort=True)
        assert placement.parents == ["origin"] and sources == [None]
    assert len([r for r in caplog.records if "grant of" in r.getMessage()]) == 1, "logged once, not every round"
    reg.records["img"]["cn0"]["grants"]["cn1"] = grant("cn0")
    placement, sources = tree._choose("img", tree._records("img"))
    assert placement.parents[0] == "cn0" and sources[0] == checked("cn0")


def test_a_grant_of_a_host_that_published_no_export_address_is_not_used(tmp_path):
    node, reg = FakeNode(), FakeRegistry()
    del reg.host_records["cn0"]
    reg.records["img"] = {"cn0": {"state": "ready", "depth": 1, "parents": ["origin"], "grants": {"cn1": grant("cn0")}}}
    tree = cn1_tree(node, reg, tmp_path, fanout=1)
    placement, _ = tree._choose("img", tree._records("img"), last_resort=True)
    assert placement.parents == ["origin"]


def test_bad_records_are_skipped_with_one_line_naming_host_and_field(tmp_path, caplog):
    """Checked where the tree reads them: a bad initiator, a non-integer depth, grants of the
    wrong type each skip that record only, with one warning naming the host and the field;
    the join goes on with the good records."""
    caplog.set_level("DEBUG")
    node, reg = FakeNode(), FakeRegistry()
    reg.publish_host(peer_host("cn2", "iqn.1993-08.org.debian:01:cn2"))
    reg.publish_host(peer_host("cn6", "not an iqn; rm -rf /"))
    reg.publish_host({"host": "cn7", "initiator": "iqn.1993-08.org.debian:01:cn7", "export_ip": "198.18.0.7:3260"})
    reg.records["img"] = {
        "cn0": {"state": "ready", "depth": 1, "parents": ["origin"], "grants": {"cn1": grant("cn0")}},
        "cn6": {"state": "ready", "depth": "2", "parents": ["origin"]},
        "cn7": {"state": "ready", "depth": 2.5, "parents": ["origin"]},
        "cn8": {"state": "ready", "depth": 1, "parents": ["origin"], "grants": ["cn1"]},
        "cn9": {"state": "ready", "depth": 1, "parents": ["origin"], "grants": {"cn1": "Pw-cn9-Secret9"}},
    }
    node.reparent = lambda image, sources: "table"
    tree = cn1_tree(
        node,
        reg,
        tmp_path,
        fanout=1,
        max_parents=1,
    )
    tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1")
    for _ in range(3):
        tree.maintain()
    assert reg.records["img"]["cn1"]["parents"][0] == "cn0"
    assert set(reg.records["img"]["cn1"]["grants"]) == {"cn2"}, "cn6's bad initiator got no ACL"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    skipped = [w for w in warnings if "skipping the record" in w]
    assert len(skipped) == 6, skipped  # once each, not on every upkeep round
    for host, field in [
        ("cn6", "field depth"),
        ("cn7", "field depth"),
        ("cn8", "field grants"),
        ("cn9", "field grants"),
        ("cn6", "field initiator"),
        ("cn7", "field export_ip"),
    ]:
        assert any(host in w and field in w for w in skipped), (host, field, skipped)
    assert "Pw-cn9-Secret9" not in _all_log_text(caplog) and "Pw-cn0-Secret9" not in _all_log_text(caplog)


def test_publishing_a_bad_record_does_not_put_its_secrets_in_the_error():
    from vmthunder.registry import _clean_record

    with pytest.raises(RegistryError) as e:
        _clean_record({"grants": {"cn2": {"auth_password": "Pw-cn2-Secret9"}}, "bad": object()}, "cn1")
    assert "Pw-cn2-Secret9" not in str(e.value)


def test_random_records_never_raise_anything_but_a_typed_error(tmp_path):
    """Seeded fuzzing of what peers publish, through the record parser and the tree's
    placement: only InvalidArgument from the parser (the registry skips the record), only
    Busy from placement; never TypeError, KeyError, ValueError..."""
    import random

    rnd = random.Random(20261121)
    atoms = [
        None,
        True,
        0,
        1,
        -1,
        2**70,
        2.5,
        "",
        "ready",
        "joining",
        "leaving",
        "origin",
        "cn0",
        "cn1",
        "CN 2",
        "198.18.0.10",
        "iqn.1993-08.org.debian:01:cn1",
        CN0_IQN,
        [],
        {},
        ["origin"],
        {"cn1": grant("cn0")},
        {"cn1": "x"},
    ]
    keys = ["host", "state", "depth", "parents", "grants", "built", "failure_domain", "initiator", "export_ip", "x"]

    def value(depth=0):
        r = rnd.random()
        if depth < 2 and r < 0.15:
            return [value(depth + 1) for _ in range(rnd.randrange(3))]
        if depth < 2 and r < 0.3:
            return {rnd.choice(keys + ["cn1", "cn0"]): value(depth + 1) for _ in range(rnd.randrange(4))}
        return rnd.choice(atoms)

    node, reg = FakeNode(), FakeRegistry()
    tree = cn1_tree(node, reg, tmp_path, fanout=2)
    accepted = 0
    for i in range(3000):
        # near-misses of a valid record: one to three fields replaced or dropped
        rec = {
            "host": rnd.choice(["cn0", "cn2", "cn3"]),
            "state": "ready",
            "depth": 1,
            "parents": ["origin"],
            "grants": {"cn1": grant("cn0")},
            "export_ip": "198.18.0.10",
        }
        for k in rnd.sample(keys, rnd.randrange(4)):
            if rnd.random() < 0.2:
                rec.pop(k, None)
            else:
                rec[k] = value()
        if not isinstance(rec.get("host"), str) or rnd.random() < 0.5:
            rec["host"] = rnd.choice(["cn0", "cn2", "cn3"])
        for parse in (vmthunder.parse_image_record, vmthunder.parse_host_record):
            try:
                parse(rec)
            except vmthunder.InvalidArgument:
                pass
        try:
            vmthunder.check_grant(value(), "cn0", "img", rnd.choice([None, "198.18.0.10", "x"]))
        except vmthunder.InvalidArgument:
            pass
        reg.records["img"] = {rec["host"]: {k: v for k, v in rec.items() if k != "host"}}
        if tree._records("img"):
            accepted += 1
        try:
            tree._choose("img", tree._records("img"))
        except vmthunder.Busy:
            pass
    assert accepted > 0, "the fuzzing never produced a valid record: it tests nothing"


def test_saved_origins_are_new_0600_files_never_through_a_link_and_only_for_valid_ids(tmp_path):
    """The saved origin holds the origin's CHAP secret: 0600, written to a new file (a link
    planted at its temporary name is replaced, not followed) and read without following one."""
    import os
    import stat

    node = FakeNode()
    asked = []
    node.recover = lambda image, sources: asked.append(image) or []
    tree = Tree(node, FakeRegistry(), initiator="iqn.1993-08.org.debian:01:cn1", state_dir=str(tmp_path))
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    os.makedirs(tmp_path / "tree", mode=0o700)
    os.symlink(victim, tmp_path / "tree" / "img.json.tmp")
    tree._save_origin("img", {"auth_password": "Pw-origin-Secret9"})
    assert victim.read_text() == "untouched", "followed a planted link"
    assert stat.S_IMODE(os.stat(tmp_path / "tree" / "img.json").st_mode) == 0o600
    assert tree._load_origin("img") == {"auth_password": "Pw-origin-Secret9"}
    os.symlink(victim, tmp_path / "tree" / "lnk.json")
    with pytest.raises(vmthunder.StateDirError):  # the state dir's trouble, not the caller's
        tree._load_origin("lnk")
    for bad in ("../escape", "a/b", "", "x..y"):
        with pytest.raises(vmthunder.InvalidArgument):
            tree._save_origin(bad, {})
    assert not (tmp_path / "escape.json").exists()
    assert sorted(os.listdir(tmp_path / "tree")) == ["img.json", "lnk.json"]
    assert tree.recover() == {} and asked == ["img"], "the link is skipped, not followed"


def test_grants_go_out_sealed_each_readable_by_its_recipient_only(tmp_path):
    """No CHAP secret in the record every member reads: cn2's grant opens with cn2's key only,
    and a host that publishes no key gets no grant at all."""
    node, reg = FakeNode(), FakeRegistry()
    reg.publish_host(peer_host("cn2", "iqn.1993-08.org.debian:01:cn2"))
    reg.publish_host(peer_host("cn3", "iqn.1993-08.org.debian:01:cn3"))
    reg.publish_host({"host": "cn4", "initiator": "iqn.1993-08.org.debian:01:cn4"})  # an older vmthunder
    tree = cn1_tree(node, reg, tmp_path)
    tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1")
    rec = reg.records["img"]["cn1"]
    assert set(rec["grants"]) == {"cn2", "cn3"}
    assert "secret-" not in repr(rec) and "auth_password" not in repr(rec)
    assert opened("cn2", rec["grants"]["cn2"])["auth_password"] != opened("cn3", rec["grants"]["cn3"])["auth_password"]
    with pytest.raises(vmthunder.InvalidArgument, match="another host"):
        opened("cn3", rec["grants"]["cn2"])
    assert reg.host_records["cn1"]["grant_key"] == vmthunder.grant_key(str(tmp_path)), "we publish our key"


def test_a_grant_sealed_for_us_is_opened_checked_and_used(tmp_path):
    node, reg = FakeNode(), FakeRegistry()
    mine = vmthunder.grant_key(str(tmp_path))
    reg.records["img"] = {
        "cn0": {"state": "ready", "depth": 1, "parents": ["origin"], "grants": {"cn1": vmthunder.seal_grant(grant("cn0"), mine)}}
    }
    tree = cn1_tree(node, reg, tmp_path, fanout=1)
    placement, sources = tree._choose("img", tree._records("img"))
    assert placement.parents[0] == "cn0" and sources[0] == checked("cn0")
    # sealed for us but forged inside: refused like a plain forgery
    reg.records["img"]["cn0"]["grants"]["cn1"] = vmthunder.seal_grant(grant("cn0", target_lun=7), mine)
    placement, _ = tree._choose("img", tree._records("img"), last_resort=True)
    assert placement.parents == ["origin"]


def test_upkeep_revokes_the_grants_of_hosts_that_left(tmp_path):
    node, reg = FakeNode(), FakeRegistry()
    reg.publish_host(peer_host("cn2", "iqn.1993-08.org.debian:01:cn2"))
    reg.publish_host(peer_host("cn3", "iqn.1993-08.org.debian:01:cn3"))
    tree = cn1_tree(node, reg, tmp_path)
    tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1")
    tree.maintain()
    assert not [c for c in node.calls if c[0] == "revoke_grants"], "nobody left"
    del reg.host_records["cn3"]  # cn3's lease expired: it left
    tree.maintain()
    assert [c for c in node.calls if c[0] == "revoke_grants"] == [("revoke_grants", "img", ("iqn.1993-08.org.debian:01:cn2",))]
    assert set(reg.records["img"]["cn1"]["grants"]) == {"cn2"}
    # a restarted process does not know whom it granted: its first round revokes all but the live
    node.calls = []
    fresh = cn1_tree(node, reg, tmp_path)
    fresh.maintain()
    assert [c for c in node.calls if c[0] == "revoke_grants"] == [("revoke_grants", "img", ("iqn.1993-08.org.debian:01:cn2",))]


def test_register_publishes_the_grant_key_before_any_join_and_needs_a_registry(tmp_path):
    """A host registered before the storm is granted by the first template built elsewhere."""
    node, reg = FakeNode(), FakeRegistry()
    tree = cn1_tree(node, reg, tmp_path)
    tree.register()
    rec = reg.host_records["cn1"]
    assert rec["grant_key"] == vmthunder.grant_key(str(tmp_path))
    assert rec["initiator"] == "iqn.1993-08.org.debian:01:cn1" and rec["export_ip"] == "198.18.0.1"
    assert node.calls == [], "registering touches no storage"
    with pytest.raises(vmthunder.InvalidArgument, match="registry"):
        cn1_tree(node, None, tmp_path).register()

    class DownRegistry(FakeRegistry):
        def publish_host(self, rec):
            raise RegistryError("etcd at 198.18.0.2:2379: connection refused")

    with pytest.raises(RegistryError):
        cn1_tree(node, DownRegistry(), tmp_path).register()
