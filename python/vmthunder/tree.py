"""The relay tree of each image across compute nodes: membership through the registry (tooz),
failover and re-parenting. The join protocol (the records' states and their transitions, what
a record means for choosing parents, the choice itself) is Rust's: src/placement/protocol.rs;
this module does its I/O and runs its threads.

No daemon: `Tree` lives in the caller's process (nova-compute). `maintain()` is one round of
upkeep (reinstate parent paths whose sessions are back, re-grant new hosts, re-parent away from
dead or leaving parents); `start_watch()` runs it on a thread of that process. Paths are healed
with or without a registry: an outage that took the registry down too must not leave them failed.

Boot profiles: when the caller gives one (the recorded boot reads of the image, `load_profile`),
the node that builds a template reads those blocks through it on a thread, in the profile's
order with eight reads in flight (`Node.prefetch`'s defaults for a coalescing template): it runs ahead of the VMs,
whose reads then find the blocks at their node, and every relay down a chain streams the image
as fast as its link allows instead of each VM pulling its next block through every hop.

A relay cannot be asked for credentials at attach time (there is no daemon to answer), so every
relay *grants* each known host ahead of time: it creates that host's ACL + CHAP with
`Node.export_info` and publishes the resulting connection dict in its registry record
(`grants[host]`). A peer that has not granted the newcomer yet is not eligible as its parent.

Grants are sealed for their recipient (`vmthunder.seal_grant`): each host publishes a public
key (`grant_key`, its key pair in state_dir) in the hosts group, and only it can open what a
relay granted it; a host that publishes none gets no grant (it reads from the origin).

Other hosts' records are not trusted (anyone who can write the registry writes them): the
tree uses only records the Rust parser accepts, and a grant is used only if
`vmthunder.check_grant` finds it names that parent's own export of the image (one target, LUN
0, the IQN vmthunder derives, on the export address the parent published in the hosts group);
a peer whose grant fails counts as not having granted us, with one warning.
"""

import json
import logging
import os
import threading
import time
from typing import Any, Dict, List, Optional

from vmthunder._vmthunder import (
    Busy,
    Error,
    HostRecord,
    ImageRecord,
    InvalidArgument,
    JoinState,
    Node,
    Placement,
    Policy,
    StateDirError,
    check_grant,
    choose_parents,
    grant_key,
    own_record,
    parents_progress,
    parse_host_record,
    parse_image_record,
    seal_grant,
    validate_id,
)

LOG = logging.getLogger("vmthunder.tree")


class _EarlyLogins:
    """One join's early logins: to the origin and to the parents a claim names, each on a
    thread while the join waits for those parents to build (attach and reparent then reuse the
    session): a login behind loaded links takes seconds, and in a chain it would otherwise wait
    for the level above. Best effort: a failed one leaves the login to attach. `close()` logs
    out of the sessions the join did not take over; after it no new login starts, so a claim
    thread that outlives its join cannot leave a session nobody logs out of."""

    LOGIN_WAIT_S = 120.0  # iscsiadm's own timeouts bound a login

    def __init__(self, node: Node, image_id: str):
        self._node = node
        self._image = image_id
        self._lock = threading.Lock()
        self._logins: Dict[str, Any] = {}  # name -> (connection dict, login thread)
        self._closed = False

    def start(self, name: str, source: Dict[str, Any]) -> None:
        with self._lock:
            if self._closed or name in self._logins:
                return
            t = threading.Thread(target=self._login, args=(name, source), name=f"vmthunder-prelogin-{name}", daemon=True)
            self._logins[name] = (source, t)
            t.start()

    def start_parents(self, placement: Placement, sources) -> None:
        for p, src in zip(placement.parents, sources):
            if src is not None:
                self.start(p, src)

    def _login(self, name: str, source: Dict[str, Any]) -> None:
        try:
            n = self._node.prelogin(source)
            LOG.info("image %s: logged in to %s ahead of the join (%d new session(s))", self._image, name, n)
        except Error as e:
            LOG.info("image %s: early login to %s failed, attach will retry: %s", self._image, name, e)

    def wait(self, name: str) -> None:
        """Until the early login to `name` (if one started) has finished."""
        with self._lock:
            entry = self._logins.get(name)
        if entry is not None:
            entry[1].join(self.LOGIN_WAIT_S)

    def close(self) -> None:
        """No more logins; log out, on a thread, of the sessions nothing took over (parents
        someone else got): after `ready` is published, not before it."""
        with self._lock:
            self._closed = True
            entries = list(self._logins.values())
        if not entries:
            return

        def run():
            for source, t in entries:
                t.join(self.LOGIN_WAIT_S)
                try:
                    self._node.logout_unused(source)
                except Error as e:
                    LOG.warning("image %s: could not log out of an unused early session: %s", self._image, e)

        threading.Thread(target=run, name=f"vmthunder-logout-{self._image}", daemon=True).start()


class Tree:
    def __init__(
        self,
        node: Node,
        registry=None,
        *,
        initiator: str,
        export_ip: Optional[str] = None,
        failure_domain: Optional[str] = None,
        fanout: int = 3,
        max_parents: int = 2,
        state_dir: str = "/var/lib/vmthunder",
        leave_timeout_s: float = 60.0,
        lock_timeout_s: float = 120.0,
        join_wait_s: float = 60.0,
        prefetch_depth: Optional[int] = None,
        prefetch_reverse: Optional[bool] = None,
    ):
        self.node = node
        self.registry = registry
        self.host = node.host
        self.initiator = initiator
        self.export_ip = export_ip
        self.failure_domain = failure_domain
        self.policy = Policy(fanout=fanout, max_parents=max_parents)
        self.leave_timeout_s = leave_timeout_s
        self.lock_timeout_s = lock_timeout_s
        self.join_wait_s = join_wait_s
        self.state_dir = state_dir
        self._dir = os.path.join(state_dir, "tree")
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()  # one upkeep round at a time in this process
        self.prefetch_depth = prefetch_depth
        # None: the node's default for the template (forwards through a coalescing template: the
        # 8-node chain at 15 Mbit/s took 54.5 s against 64.3 s from the end, the origin sending
        # 1.007 x W against 1.047, bench/README.md, 2026-12-05; from the end with O_DIRECT).
        self.prefetch_reverse = prefetch_reverse
        self._prefetches: Dict[str, Any] = {}  # image -> (thread, stop event, report dict)
        self._grants: Dict[str, Dict[str, Any]] = {}  # image -> host -> (initiator, its key, sealed grant)
        self._kept: set = set()  # images whose last VM left here while children still read them
        self._export_ips: Dict[str, Optional[str]] = {}  # host -> export_ip it published
        self._export_ips_at = -1e9
        self._bad_grants: Dict[tuple, str] = {}  # (image, host) -> why its grant is refused
        self._bad_records: Dict[tuple, str] = {}  # (group, host) -> why its record is skipped
        self._key: Optional[str] = None  # our public key for sealed grants
        self._keyless: set = set()  # (image, host) told it gets no grant
        self._states: Dict[str, JoinState] = {}  # image -> state of the record we last published

    # -- registry access that degrades to "origin only" ------------------------------------
    def register(self) -> None:
        """Publish this host's record (initiator, export address, grant key) in the hosts group,
        so that peers grant it access from their first join on: a host that is known only from
        its own first join gets no grant from the templates built before it (until their next
        upkeep round), and in a boot storm its claim waits for that. Idempotent; RegistryError
        if the registry does not answer."""
        if self.registry is None:
            raise InvalidArgument("Tree.register needs a registry")
        if self._key is None:
            self._key = grant_key(self.state_dir)
        self.registry.publish_host(
            {
                "host": self.host,
                "initiator": self.initiator,
                "export_ip": self.export_ip,
                "failure_domain": self.failure_domain,
                "grant_key": self._key,
            }
        )

    def _registry_ok(self, what: str) -> bool:
        if self.registry is None:
            return False
        try:
            self.register()
            return True
        except Error as e:
            LOG.warning("registry unavailable (%s): %s from the origin alone", e, what)
            return False

    def _origin_file(self, image_id: str) -> str:
        return os.path.join(self._dir, f"{validate_id('image id', image_id)}.json")

    def _save_origin(self, image_id: str, origin: Dict[str, Any]) -> None:
        """A cache of what the caller passed (the origin's CHAP secret too), needed to
        re-parent later; the kernel decides state. The id is checked before it names a file;
        the file is new (never a link someone planted: not followed), 0600, renamed in place."""
        path = self._origin_file(image_id)
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        if not os.path.isdir(self._dir) or os.path.islink(self._dir):
            raise StateDirError(f"{self._dir} is not a directory (a symbolic link?)")
        tmp = path + ".tmp"
        try:
            os.unlink(tmp)  # a leftover of a crash (or a planted link: unlink does not follow)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as f:
            json.dump(origin, f)
        os.replace(tmp, path)

    def _forget_origin(self, image_id: str) -> None:
        """Drop the saved origin of an image that has no template here any more: `recover`
        goes over the saved origins, so it walks only the images this node has (or had when a
        join died), not every image ever attached."""
        if self.node.template(image_id) is not None:
            return
        try:
            os.unlink(self._origin_file(image_id))
        except FileNotFoundError:
            pass

    def _load_origin(self, image_id: str) -> Optional[Dict[str, Any]]:
        path = self._origin_file(image_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:  # ELOOP: a symbolic link, not followed
            raise StateDirError(f"{path}: {e.strerror} (links are not followed)") from e
        with open(fd) as f:
            return json.load(f)

    # -- other hosts' records and grants: checked before use -------------------------------
    def _checked(self, what: str, parse, records: List[Dict[str, Any]]) -> list:
        """Every record as the Rust parser checked it (typed fields, unknown ones dropped); one
        that fails is skipped with one warning naming the host and the field (repeated only
        when what is wrong changes). Anyone who can write the registry writes these."""
        out = []
        for rec in records:
            host = rec.get("host") if isinstance(rec, dict) else None
            try:
                out.append(parse(rec))
            except InvalidArgument as e:
                why = str(e)
                (LOG.warning if self._bad_records.get((what, host)) != why else LOG.debug)(
                    "%s: skipping the record of %s: %s", what, host, why
                )
                self._bad_records[(what, host)] = why
                continue
            self._bad_records.pop((what, host), None)
        return out

    def _records(self, image_id: str) -> List[ImageRecord]:
        """The image group's records, checked: every read of them goes through here."""
        return self._checked(f"image {image_id}", parse_image_record, self.registry.peers(image_id))

    def _hosts(self) -> List[HostRecord]:
        """The hosts group's records, checked."""
        return self._checked("hosts", parse_host_record, self.registry.hosts())

    def _export_ip_of(self, hosts: List[str]) -> Dict[str, Optional[str]]:
        """The export address each of `hosts` published in the hosts group. Read again when
        older than a few seconds, or (at most once a second) when one of them is unknown."""
        now = time.monotonic()
        age = now - self._export_ips_at
        if age > 5.0 or (age > 1.0 and any(h not in self._export_ips for h in hosts)):
            self._note_hosts(self._hosts())
        return {h: self._export_ips.get(h) for h in hosts}

    def _note_hosts(self, hosts: List[HostRecord]) -> None:
        self._export_ips = {h.host: h.export_ip for h in hosts}
        self._export_ips_at = time.monotonic()

    def _grants_for_us(self, image_id: str, records: List[ImageRecord]) -> Dict[str, Dict[str, Any]]:
        """host -> the connection dict to log in to that parent with, for the peers whose grant
        for us passes `check_grant`. A refused grant is logged once (again when the reason
        changes) and the peer counts as not having granted us."""
        offered = {r.host: g for r in records if r.host != self.host and (g := r.grant_for(self.host)) is not None}
        if not offered:
            return {}
        ips = self._export_ip_of(sorted(offered))
        out = {}
        for host, grant in offered.items():
            try:
                out[host] = check_grant(grant, host, image_id, ips.get(host), self.state_dir)
            except InvalidArgument as e:
                why = str(e)
                if self._bad_grants.get((image_id, host)) != why:
                    LOG.warning("image %s: not using the grant of %s: %s", image_id, host, why)
                self._bad_grants[(image_id, host)] = why
                continue
            self._bad_grants.pop((image_id, host), None)
        return out

    # -- placement: the join protocol's steps are Rust's (src/placement/protocol.rs) -------------
    def _choose(
        self,
        image_id: str,
        records: List[ImageRecord],
        exclude=(),
        last_resort=False,
        early=False,
        previous: Optional[Placement] = None,
    ):
        """Placement over the registry records, counting as ready only the peers whose grant for
        us passes `check_grant`. Raises Busy while every free slot belongs to a peer that is not
        ready for us yet, unless `last_resort`: then the origin alone. `previous`: a choice made
        on an older read, kept if it still holds. Returns (placement, the connection dict of each
        parent, None for the origin), in failover order."""
        grants = self._grants_for_us(image_id, records)
        placement = choose_parents(
            image_id,
            self.host,
            records,
            self.policy,
            failure_domain=self.failure_domain,
            granted=grants,
            exclude=exclude,
            early=early,
            last_resort=last_resort,
            previous=previous,
        )
        return placement, [None if p == "origin" else grants[p] for p in placement.parents]

    @staticmethod
    def _with_origin(sources, origin):
        return [origin if s is None else s for s in sources]

    def _publish(self, image_id: str, placement: Placement, state: JoinState = JoinState.READY, fresh: bool = False) -> None:
        """Publish our record with a grant for every known host. Grants are remembered per
        template (host -> initiator, grant): upkeep calls this every round and only a new host
        or initiator costs an export_info. `fresh`: the template was just built (new ACLs)."""
        self._update_grants(image_id, fresh)
        self._put(image_id, self._record(image_id, placement, state))

    def _update_grants(self, image_id: str, fresh: bool) -> None:
        """Grant every live host that publishes an initiator and a key: its ACL + CHAP
        (`export_info`), sealed for it. A host without a key (an older vmthunder) gets none:
        no secret goes out that every member can read. The ACLs of hosts that left are revoked
        (their grants were in records anyone could keep): on the first round in this process
        for the image, and whenever a granted host's initiator is gone."""
        known = {} if fresh else self._grants.get(image_id, {})
        first = fresh or image_id not in self._grants
        now = {}
        if self.export_ip:
            hosts = self._hosts()
            self._note_hosts(hosts)
            for h in hosts:
                if h.host == self.host or not h.initiator:
                    continue
                if not h.grant_key:
                    if (image_id, h.host) not in self._keyless:
                        LOG.info("image %s: no grant for %s: it publishes no grant_key", image_id, h.host)
                        self._keyless.add((image_id, h.host))
                    continue
                got = known.get(h.host)
                if got is None or got[:2] != (h.initiator, h.grant_key):
                    got = (h.initiator, h.grant_key, seal_grant(self.node.export_info(image_id, h.initiator), h.grant_key))
                now[h.host] = got
            gone = {g[0] for g in known.values()} - {g[0] for g in now.values()}
            if (first and not fresh) or gone:
                revoked = self.node.revoke_grants(image_id, sorted({g[0] for g in now.values()}))
                if revoked:
                    LOG.info("image %s: revoked the grants of hosts that left: %s", image_id, revoked)
        self._grants[image_id] = now

    def _record(self, image_id: str, placement: Placement, state: JoinState, grants: bool = True) -> ImageRecord:
        """Our registry record in `state` (InvalidArgument if the protocol does not let it follow
        the one we published last); grants as last computed."""
        made = self._grants.get(image_id) if grants else None
        return own_record(
            self.host,
            placement,
            state,
            was=self._states.get(image_id),
            failure_domain=self.failure_domain,
            grants=None if made is None else {host: g[-1] for host, g in made.items()},
        )

    def _put(self, image_id: str, rec: ImageRecord) -> None:
        """Publish our record (the registry keeps it, and retries, even if this raises)."""
        self._states[image_id] = rec.state
        self.registry.publish(image_id, rec.to_dict())

    def _leave(self, image_id: str) -> None:
        self._states.pop(image_id, None)
        self.registry.leave(image_id)

    # -- the API Nova calls ------------------------------------------------------------------
    def attach(
        self, image_id: str, origin: Dict[str, Any], vm_id: str, snapshot: str = "dm", profile: Optional[List[List[int]]] = None
    ) -> str:
        """Attach a VM, joining the image's relay tree: parents chosen by placement, the origin
        volume always kept as the last path. `profile` ([[offset, length], ...], first-read
        order): prefetch those blocks in the background when this call builds the template."""
        self._save_origin(image_id, origin)
        if self.node.template(image_id) is not None:
            path = self.node.attach(image_id, [], vm_id, snapshot)
        else:
            # Marked in flight until we return: `recover` in a restarted process leaves it
            # alone, and what a crash of this one leaves half-built is recovered then.
            started = time.monotonic()
            with self.node.joining(image_id):
                path = self._join(image_id, origin, vm_id, snapshot, profile)
            try:  # for `vmthunder metrics`
                self.node.record_duration("join", time.monotonic() - started)
            except Error as e:
                LOG.warning("join duration not recorded: %s", e)
        # The detach of the image's last VM in another thread may have forgotten the origin
        # between our save and our template: saved again now that the template exists.
        self._save_origin(image_id, origin)
        return path

    def _join(self, image_id: str, origin: Dict[str, Any], vm_id: str, snapshot: str, profile: Optional[List[List[int]]]) -> str:
        if not self._registry_ok(f"attaching image {image_id}"):
            path = self.node.attach(image_id, [origin], vm_id, snapshot)
            self._start_prefetch(image_id, profile)
            return path
        # Build at once from the origin alone while we claim our slot under the image lock
        # (others then count us as a child of our parents): nothing reads the template until we
        # publish `ready` (our VM starts when we return, our children wait for it), so building
        # before the parents have costs the origin only the partition scan's few blocks, and the
        # claims, one lock round per level of a chain, no longer delay the builds. Then we
        # switch our paths to the parents as soon as their LUNs exist (`built`) and are ready
        # once they are: what still ripples down a chain is one registry notice per level.
        deadline = time.monotonic() + self.join_wait_s
        logins = _EarlyLogins(self.node, image_id)
        try:
            claim: Dict[str, Any] = {}
            try:
                logins.start("origin", origin)
                if self.export_ip:
                    # Our target (no LUN yet) and grants go out with the claim: children claim
                    # under us and log in while we build.
                    self.node.prepare_export(image_id)
                    self._update_grants(image_id, fresh=True)
                claimer = threading.Thread(
                    target=self._claim_for_join,
                    args=(image_id, deadline, claim, logins),
                    name=f"vmthunder-claim-{image_id}",
                    daemon=True,
                )
                claimer.start()
                try:
                    logins.wait("origin")
                    path = self.node.attach(image_id, [origin], vm_id, snapshot)
                finally:
                    # bounded: after the deadline a claim takes the origin alone, a lock wait
                    # ends after lock_timeout_s
                    claimer.join(self.join_wait_s + self.lock_timeout_s + 30)
            except Error:
                self._abandon_join(image_id)
                raise
            try:
                if "placement" not in claim:
                    if "error" in claim:
                        raise claim["error"]
                    from vmthunder.registry import RegistryError  # only here: tree.py needs no registry

                    raise RegistryError(f"image {image_id}: the claim did not finish")
                placement = self._follow_parents(image_id, origin, claim["placement"], claim["sources"], deadline, logins)
                self._publish(image_id, placement)  # ready: our children's reads may come
            except Error as e:
                # The VM has its disk; it reads through whatever paths the template has now. Out
                # of the group, so that no child waits for us to become ready.
                LOG.warning(
                    "image %s: could not finish joining the tree (%s); the VM reads through the template's current paths",
                    image_id,
                    e,
                )
                try:
                    self._leave(image_id)
                except Error as e2:
                    LOG.warning("image %s: could not leave the registry group: %s", image_id, e2)
            self._start_prefetch(image_id, profile)
            return path
        finally:
            logins.close()

    def _claim_for_join(self, image_id: str, deadline: float, out: Dict[str, Any], logins: _EarlyLogins) -> None:
        """attach's claim, on a thread beside the build: the placement and sources into `out`
        (or the error), and early logins to the parents it got."""
        try:
            out["placement"], out["sources"] = self._claim(image_id, deadline, set(), grants=True)
            logins.start_parents(out["placement"], out["sources"])
        except Error as e:
            out["error"] = e

    def _follow_parents(
        self, image_id: str, origin, placement: Placement, sources, deadline: float, logins: _EarlyLogins
    ) -> Placement:
        """After our build: switch the template's paths to the parents once their LUNs exist,
        and return once they are ready. A parent that leaves, fails, or is not there by the
        deadline is excluded and we choose again (after the deadline: ready parents only,
        else the origin alone). Returns the placement we ended with."""
        exclude: set = set()
        current = [None]  # the template's sources: the origin alone, as built
        while True:
            if self.export_ip:
                self._publish(image_id, placement, state=JoinState.BUILT)  # children may switch to us
            gone = self._wait_for_parents(image_id, placement, deadline, JoinState.BUILT)
            if not gone:
                for p in placement.parents:  # reparent must not log in beside a running early login
                    logins.wait(p)
                if sources != current:
                    try:
                        self.node.reparent(image_id, self._with_origin(sources, origin))
                        current = sources
                    except Error as e:  # e.g. the parent's LUN would not scan: another parent
                        LOG.warning("image %s: could not switch to parents %s: %s", image_id, placement.parents, e)
                        gone = {p for p in placement.parents if p != "origin"}
                if not gone:
                    gone = self._wait_for_parents(image_id, placement, deadline, JoinState.READY)
                if not gone:
                    return placement
            LOG.warning("image %s: parents %s gone or not ready in time; choosing again", image_id, sorted(gone))
            exclude |= gone
            placement, sources = self._claim(image_id, deadline, exclude, built=True)
            logins.start_parents(placement, sources)

    def _claim(self, image_id: str, deadline: float, exclude, built: bool = False, grants: bool = False) -> tuple:
        """The lock protocol (src/placement/protocol.rs): choose outside the lock (a lock round
        is a backend write) until placement finds us a slot, then under the lock keep that
        choice if it still holds on a fresh read (else choose again) and publish the claim.
        After the deadline: ready parents only, else the origin alone. `built`: our template
        exists (a re-claim keeps our grants and stays built); `grants`: the grants were just
        made for the template being built (they go out too)."""
        while True:
            late = time.monotonic() > deadline
            choice = None
            if not late:
                try:
                    choice, _ = self._choose(image_id, self._records(image_id), exclude, early=True)
                except Busy:
                    time.sleep(0.25)
                    continue
            with self.registry.lock(image_id, timeout_s=self.lock_timeout_s):
                try:
                    placement, sources = self._choose(
                        image_id, self._records(image_id), exclude, last_resort=late, early=not late, previous=choice
                    )
                except Busy:
                    placement = None
                else:
                    # A first claim carries grants only if they were made for this build: those
                    # of an older template are never valid.
                    state = JoinState.BUILT if built else JoinState.JOINING
                    self._put(image_id, self._record(image_id, placement, state, grants=built or grants))
            if placement is not None:
                LOG.info("image %s: parents %s (depth %s)", image_id, placement.parents, placement.depth)
                return placement, sources
            time.sleep(0.25)  # someone took the slot: choose again

    def _wait_for_parents(self, image_id: str, placement: Placement, deadline: float, until: JoinState) -> set:
        """Wait until every parent we claimed under is `until` (BUILT: its LUN exists; READY).
        Returns the parents that left, failed or still fall short at the deadline (empty: all
        there)."""
        if placement.parents == ["origin"]:
            return set()
        while True:
            gone, waiting = parents_progress(placement.parents, self._records(image_id), until)
            if gone:
                return set(gone)
            if not waiting:
                return set()
            if time.monotonic() > deadline:
                return set(waiting)
            time.sleep(0.2)

    def _abandon_join(self, image_id: str) -> None:
        """A failed join: out of the registry group, our prepared target removed."""
        undos = [("leave the registry group", lambda: self._leave(image_id))]
        if self.export_ip:
            undos.append(("remove the prepared target", lambda: self.node.drop_export(image_id)))
        for what, undo in undos:
            try:
                undo()
            except Error as e:
                LOG.warning("image %s: after a failed join, could not %s: %s", image_id, what, e)

    def recover(self) -> Dict[str, List[str]]:
        """After a restart: remove what joins of an earlier process left half-built on this node
        (it died between its first login and its VM's attach: an unused template, a prepared
        export, sessions nothing uses), for every image attached here through a Tree with this
        state_dir. Images whose join is in flight in some process are left alone. Call it before
        this process's first attach (`vmthunder.nova` does, at nova-compute start). An image
        left without a template here is forgotten (its saved origin goes), so later calls do not
        walk it again. Returns {image_id: [what went]} for the images where something went."""
        try:
            images = sorted(f[: -len(".json")] for f in os.listdir(self._dir) if f.endswith(".json"))
        except FileNotFoundError:
            return {}
        out: Dict[str, List[str]] = {}
        for image_id in images:
            try:
                origin = self._load_origin(image_id)
            except (Error, ValueError) as e:  # not an image id, a link, not JSON
                LOG.warning("%s: skipping %s.json: %s", self._dir, image_id, e)
                continue
            try:
                removed = self.node.recover(image_id, [origin] if origin else [])
            except Busy:
                LOG.info("image %s: a join is in flight; not recovered", image_id)
                continue
            except Error as e:
                LOG.warning("image %s: could not recover what an unfinished join left: %s", image_id, e)
                continue
            if removed:
                out[image_id] = removed
            self._forget_origin(image_id)
        return out

    # -- boot-profile prefetch -----------------------------------------------------------------
    def _start_prefetch(self, image_id: str, profile) -> None:
        if not profile:
            return
        stop, report = threading.Event(), {}

        def run():
            try:
                report.update(
                    self.node.prefetch(image_id, profile, depth=self.prefetch_depth, reverse=self.prefetch_reverse, stop=stop)
                )
            except Error as e:  # the VM still boots, reading on demand
                report["error"] = str(e)
                LOG.warning("image %s: prefetch failed: %s", image_id, e)

        t = threading.Thread(target=run, name=f"vmthunder-prefetch-{image_id}", daemon=True)
        self._prefetches[image_id] = (t, stop, report)
        t.start()

    def prefetch_report(self, image_id: str, wait_s: float = 0.0) -> Optional[Dict[str, Any]]:
        """The prefetch's report ({"bytes", "seconds", "complete", ...} or {"error"}) once it
        has ended (waiting up to `wait_s`), else None (running, or none was started)."""
        entry = self._prefetches.get(image_id)
        if entry is None:
            return None
        entry[0].join(timeout=wait_s)
        return None if entry[0].is_alive() else dict(entry[2])

    def _stop_prefetch(self, image_id: str) -> None:
        entry = self._prefetches.pop(image_id, None)
        if entry is not None:
            entry[1].set()
            entry[0].join(timeout=30)  # ends after the reads in flight

    def detach(self, vm_id: str) -> None:
        """Detach a VM; when it was the image's last VM here and children still read from this
        node, announce 'leaving' and give them time to move first."""
        image_id = self.node.image_of(vm_id)
        t = self.node.template(image_id) if image_id is not None else None
        last = t is not None and t.vms == [vm_id]
        if last:
            self._stop_prefetch(image_id)  # it holds the template's device open
        if last and t.children and self._registry_ok(f"leaving image {image_id}"):
            me = next((r for r in self._records(image_id) if r.host == self.host), None)
            if me and JoinState.may_follow(me.state, JoinState.LEAVING):
                self._put(image_id, me.with_state(JoinState.LEAVING))
            deadline = time.monotonic() + self.leave_timeout_s
            while (t := self.node.template(image_id)) is not None and t.children and time.monotonic() < deadline:
                time.sleep(0.5)
        self.node.detach(vm_id)
        kept = self.node.template(image_id) if last else None
        if kept is not None:
            self._kept.add(image_id)
            # Children still reading, or a layer still open (the node logged which).
            LOG.warning(
                "image %s: the template stays until nothing uses it (children %s after %.0fs); upkeep removes it",
                image_id,
                kept.children,
                self.leave_timeout_s,
            )
        elif last:
            self._forget(image_id)

    def _forget(self, image_id: str) -> None:
        """The template is gone from this node: its grants and its saved origin with it, and
        out of the image's group."""
        self._grants.pop(image_id, None)
        self._forget_origin(image_id)
        if self.registry is not None:
            try:
                self._leave(image_id)
            except Error as e:
                LOG.warning("image %s: could not leave the registry group: %s", image_id, e)

    def maintain(self) -> List[str]:
        """One upkeep round over the images this node holds: reinstate parent paths whose
        iSCSI sessions are back (`Node.heal_paths`), tear down the templates nothing uses any
        more, grant new hosts, and re-parent away from parents that died (left the registry)
        or are leaving. Returns re-parented ids."""
        moved = []
        with self._lock:
            try:
                self.node.heal_paths()  # logs what it reinstated
            except Error as e:
                LOG.warning("upkeep could not heal the parent paths: %s", e)
            self._sweep_unused()
            if not self._registry_ok("upkeep"):
                return moved
            for image_id in self.node.templates():
                try:
                    if self._maintain_image(image_id):
                        moved.append(image_id)
                except Error as e:
                    LOG.warning("image %s: upkeep failed: %s", image_id, e)
        return moved

    def _sweep_unused(self) -> None:
        """A relay whose last VM left while children still read from it keeps its template
        (detach gives them leave_timeout_s to move): once the last child has gone too, remove
        it and leave the image's group. Only the templates detach kept, one by one: a template
        another caller is building has no VM yet either."""
        if not self._kept:
            return
        templates = self.node.templates()
        for image_id in sorted(self._kept):
            t = templates.get(image_id)
            if t is None or t.vms:  # gone, or in use again
                self._kept.discard(image_id)
            elif not t.children:
                try:
                    removed = self.node.release(image_id)
                except Error as e:
                    LOG.warning("image %s: upkeep could not remove the unused template: %s", image_id, e)
                    continue
                if removed:
                    LOG.info("image %s: no VM and no child uses it any more; template removed", image_id)
                    self._kept.discard(image_id)
                    self._forget(image_id)

    def _maintain_image(self, image_id: str) -> bool:
        origin = self._load_origin(image_id)
        if origin is None:
            return False
        records = self._records(image_id)
        me = next((r for r in records if r.host == self.host), None)
        if me is None or me.state.is_placing:  # attach is still placing it
            return False
        self._states[image_id] = me.state  # ours as the registry holds it: what follows it
        bad, _ = parents_progress(me.parents, records, JoinState.READY)
        if not bad:
            if me.state == JoinState.READY:
                self._publish(image_id, me.placement)  # grants for hosts that joined since
            return False
        with self.registry.lock(image_id, timeout_s=self.lock_timeout_s):
            records = self._records(image_id)
            # never choose a dead/leaving parent, nor a node below us
            placement, sources = self._choose(image_id, records, exclude=bad, last_resort=True)
            LOG.warning("image %s: parents %s gone or leaving; re-parenting to %s", image_id, bad, placement.parents)
            self.node.reparent(image_id, self._with_origin(sources, origin))
            self._publish(image_id, placement, state=me.state)
        return True

    def rejoin(self) -> List[str]:
        """After `Node.reassemble` rebuilt this node's templates (nova-compute start after a
        reboot), offer them to the tree again: each complete template of an image this node
        joined before (its origin saved) and that has no record of ours in the registry any more
        reads from the origin alone and is published `ready` at depth 1, with fresh grants (a
        rebooted relay lost its ACLs), so newcomers and re-parenting children read from it again.
        Only the origin: a record must name the parents the template really reads from, or
        placement could make a parent read from its own child. Returns the image ids."""
        rejoined: List[str] = []
        if not self._registry_ok("rejoining the tree"):
            return rejoined
        for image_id, t in sorted(self.node.templates().items()):
            origin = self._load_origin(image_id)
            if not t.complete or origin is None:
                continue
            try:
                if any(r.host == self.host for r in self._records(image_id)):
                    continue  # still a member (a restart within the lease): upkeep keeps it
                if len(t.paths) > 1:
                    self.node.reparent(image_id, [origin])
                self._states.pop(image_id, None)  # no record of ours any more
                self._publish(image_id, Placement.origin_only(), fresh=True)
                rejoined.append(image_id)
                LOG.info("image %s: rebuilt template offered to the tree again (from the origin)", image_id)
            except Error as e:
                LOG.warning("image %s: could not rejoin the tree: %s", image_id, e)
        return rejoined

    def start_watch(self, interval_s: float = 2.0) -> None:
        """Run maintain() every interval on a thread of this process."""

        def loop():
            while not self._stop.wait(interval_s):
                try:
                    self.maintain()
                except Exception:  # keep the watcher alive; the next round retries
                    LOG.exception("tree upkeep failed")

        self._thread = threading.Thread(target=loop, name="vmthunder-tree", daemon=True)
        self._thread.start()

    def stop_watch(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)


def load_profile(path: str) -> List[List[int]]:
    """A boot profile from a recorded trace ({"reads": [[t, offset, length], ...]}, as
    bench/traces/record_boot_trace.sh writes it) or a plain [[offset, length], ...] list.
    Raises ValueError naming the file when it is neither."""
    with open(path) as f:
        data = json.load(f)
    reads = data.get("reads") if isinstance(data, dict) else data
    if not isinstance(reads, list) or not all(isinstance(r, list) and len(r) in (2, 3) for r in reads):
        raise ValueError(f'{path}: expected {{"reads": [[t, offset, length], ...]}} or [[offset, length], ...]')
    return [r[-2:] for r in reads]
