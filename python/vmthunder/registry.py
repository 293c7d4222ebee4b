"""Membership of this host in per-image groups, through OpenStack's coordination library tooz.

No daemon of ours: the coordination service is whatever tooz backend the URL names.

    reg = Registry("etcd3+http://198.18.0.1:2379", "cn1", lease_s=10)   # many hosts
    reg = Registry("file:///var/lib/vmthunder/registry", "cn1")          # one host only
    reg.start()
    reg.publish_host({"host": "cn1", "initiator": iqn, "export_ip": "198.18.0.2",
                      "failure_domain": "rack1"})
    with reg.lock(image_id):                     # one joiner of an image at a time, cluster-wide
        peers = reg.peers(image_id)              # [{"host": "cn2", ...their record...}, ...]
        reg.publish(image_id, {"state": "ready", "depth": 2, "parents": ["cn2"]})
    reg.leave(image_id)
    reg.stop()

Layout in the backend: group ``vmthunder-image-<image>`` per image (one member per host, its
record as the member's capabilities), group ``vmthunder-hosts`` (every host's record), and a
tooz lock ``vmthunder-image-<image>`` per image.

Liveness. A member whose process dies disappears from `peers()` after about `lease_s`:

- etcd (``etcd3+http://host:port``, alias ``etcd://host:port``): member keys are attached to one
  etcd lease per Registry (tooz option ``membership_timeout`` = ceil(lease_s) seconds; etcd
  raises a TTL below its minimum, about 2 s with default server settings, to that minimum). This
  process refreshes it every lease_s/3; the lock leases (``lock_timeout``) likewise, so a lock
  held by a dead process is free again after about lease_s.
- file (``file:///abs/dir``): single host only. Member files stay on disk after their process
  dies, but tooz hides members whose file was not touched (heartbeat) for ceil(lease_s) seconds,
  so a dead member also vanishes from `peers()` after about lease_s. Locks are ``fcntl`` locks,
  released by the kernel when the holder dies.

If the lease lapsed anyway (process stopped for longer than lease_s, etcd unreachable for a
while), the heartbeat thread re-publishes every record this Registry published.

TLS (``etcd3+https://host:port?ca_cert=/etc/vmthunder/etcd-ca.pem&cert_cert=/etc/vmthunder/cn1.pem&cert_key=/etc/vmthunder/cn1.key``):
the CA that verifies etcd (only it: REQUESTS_CA_BUNDLE is ignored then) and this host's client
certificate and key, passed to tooz/etcd3gw.

Every call is bounded by `timeout_s` (lock acquisition by its own timeout); failures are
`RegistryError` (a `vmthunder.Error`). `stop()` is best-effort and never raises.
"""

import contextlib
import json
import logging
import math
import os
import random
import re
import threading
import time
import urllib.parse
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from vmthunder._vmthunder import Error, InvalidArgument, validate_host, validate_id

LOG = logging.getLogger("vmthunder.registry")

__all__ = ["Registry", "RegistryError", "wait_for", "HOSTS_GROUP", "image_group"]

HOSTS_GROUP = "vmthunder-hosts"
_IMAGE_PREFIX = "vmthunder-image-"
_SCHEMES = {"file": "file", "etcd": "etcd3+http", "etcd3+http": "etcd3+http", "etcd3+https": "etcd3+https"}
_ETCD_PASS_OPTIONS = ("ca_cert", "cert_key", "cert_cert", "api_version")
_ETCD_OWN_OPTIONS = {"timeout": "timeout_s", "membership_timeout": "lease_s", "lock_timeout": "lease_s"}


class RegistryError(Error):
    """The registry could not do what was asked: bad argument, backend unreachable, timeout."""


# -- validation --------------------------------------------------------------------------------
def _validate_id(what: str, value: Any, host: bool = False) -> str:
    """An image id, or (`host`) a host name, as every vmthunder call checks it (src/names.rs)."""
    if not isinstance(value, str):
        raise RegistryError(f"invalid {what} {value!r}: must be a string")
    try:
        return (validate_host if host else validate_id)(what, value)
    except InvalidArgument as e:
        raise RegistryError(str(e)) from None


def image_group(image_id: str) -> str:
    """The tooz group (and lock) name of an image."""
    return _IMAGE_PREFIX + _validate_id("image id", image_id)


def _parse_url(url: Any) -> Tuple[str, str]:
    """-> (kind "file" | "etcd", the URL handed to tooz). Raises RegistryError naming the URL."""
    if not isinstance(url, str) or not url:
        raise RegistryError(f"invalid registry url {url!r}: must be a non-empty string")

    def bad(why: str) -> RegistryError:
        return RegistryError(f"invalid registry url {url!r}: {why}")

    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
    except ValueError as e:
        raise bad(str(e)) from None
    scheme = _SCHEMES.get(u.scheme.lower())
    if scheme is None:
        raise bad(f"unknown scheme {u.scheme!r} (known: file, etcd, etcd3+http, etcd3+https)")
    if u.fragment:
        raise bad("no fragment allowed")
    if "@" in u.netloc:
        raise bad("user information is not supported")
    if scheme == "file":
        if u.netloc:
            raise bad(f"file URLs need an absolute path: file:///dir ({u.netloc!r} is not a path)")
        if u.query:
            raise bad("no query options for file URLs (use lease_s)")
        path = urllib.parse.unquote(u.path)
        if not path.startswith("/"):
            raise bad("file URLs need an absolute path: file:///dir")
        if ".." in path.split("/"):
            raise bad("'..' not allowed in the path")
        return "file", "file://" + os.path.normpath(path)
    if not u.hostname:
        raise bad("no host (etcd3+http://HOST:PORT)")
    if u.path not in ("", "/"):
        raise bad(f"unexpected path {u.path!r}")
    try:
        query = urllib.parse.parse_qsl(u.query, keep_blank_values=True, strict_parsing=bool(u.query))
    except ValueError as e:
        raise bad(f"query: {e}") from None
    for k, _v in query:
        if k in _ETCD_OWN_OPTIONS:
            raise bad(f"option {k!r} is set from Registry({_ETCD_OWN_OPTIONS[k]}=...)")
        if k not in _ETCD_PASS_OPTIONS:
            raise bad(f"unknown option {k!r} (known: {', '.join(_ETCD_PASS_OPTIONS)})")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    netloc = f"{host}:{port if port is not None else 2379}"
    return "etcd", urllib.parse.urlunsplit((scheme, netloc, "", u.query, ""))


def _positive(what: str, v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise RegistryError(f"invalid {what} {v!r}: must be a number") from None
    if not (f > 0 and math.isfinite(f)):
        raise RegistryError(f"invalid {what} {v!r}: must be positive")
    return f


def _clean_record(record: Any, member_id: str) -> Dict[str, Any]:
    """A JSON-round-tripped copy (so every backend returns the same types), "host" = member."""
    # Messages never show the record: its grants carry CHAP secrets.
    if not isinstance(record, dict):
        raise RegistryError(f"invalid record of {member_id!r}: must be a dict, got {type(record).__name__}")
    try:
        rec = json.loads(json.dumps(record))
    except (TypeError, ValueError) as e:
        raise RegistryError(f"invalid record of {member_id!r}: not JSON-serializable: {e}") from None
    if rec.get("host", member_id) != member_id:
        raise RegistryError(f"invalid record: host {rec['host']!r} is not this member {member_id!r}")
    rec["host"] = member_id
    return rec


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _describe(e: BaseException) -> str:
    """The most telling message of an exception chain (etcd3gw's own are often empty)."""
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    for x in seen:
        m = re.search(r"\[Errno -?\d+\][^'\")]*", str(x))
        if m:
            return m.group(0).strip()
    for x in seen:
        if str(x):
            return f"{type(x).__name__}: {x}"
    return type(seen[0]).__name__


def wait_for(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.2, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy (returned), at most `timeout_s`;
    RegistryError naming `what` after that. Errors of the predicate propagate."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = predicate()
        if v:
            return v
        left = deadline - time.monotonic()
        if left <= 0:
            raise RegistryError(f"{what} not reached within {timeout_s:g}s")
        time.sleep(min(interval_s, left))


# -- the registry ------------------------------------------------------------------------------
class Registry:
    """Membership of this host in per-image groups, through tooz."""

    def __init__(self, url: str, member_id: str, *, lease_s: float = 10.0, timeout_s: float = 5.0):
        self._kind, self._tooz_url = _parse_url(url)
        self.url = url
        self.member_id = _validate_id("member id", member_id, host=True)
        self.lease_s = _positive("lease_s", lease_s)
        self.timeout_s = _positive("timeout_s", timeout_s)
        self._ttl = max(1, math.ceil(self.lease_s))  # tooz options are whole seconds
        self._http_timeout = max(1, math.ceil(self.timeout_s))
        self._coord: Any = None
        self._mu = threading.RLock()
        self._records: Dict[str, Dict[str, Any]] = {}  # group -> record we published
        self._pending: set = set()  # groups whose last publish/leave may not have happened
        self._stop_ev = threading.Event()
        self._heart: Optional[threading.Thread] = None

    def __repr__(self) -> str:
        return f"Registry({self.url!r}, {self.member_id!r}, lease_s={self.lease_s:g})"

    def __enter__(self) -> "Registry":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def started(self) -> bool:
        return self._coord is not None

    # -- plumbing ------------------------------------------------------------------------------
    def _unreachable(self, detail: str) -> RegistryError:
        return RegistryError(f"coordination service at {self.url} unreachable: {detail}")

    def _translate(self, what: str, e: BaseException, connecting: bool = False) -> RegistryError:
        if isinstance(e, RegistryError):
            return e
        names = {c.__name__ for c in type(e).__mro__}
        if connecting or names & {
            "ToozConnectionError",
            "OperationTimedOut",
            "ConnectionFailedError",
            "ConnectionTimeoutError",
            "ConnectionError",
            "Timeout",
            "TimeoutError",
        }:
            return self._unreachable(f"{what}: {_describe(e)}")
        return RegistryError(f"registry {self.url}: {what} failed: {_describe(e)}")

    def _bounded(self, what: str, fn: Callable[[], Any], timeout_s: Optional[float] = None, connecting: bool = False) -> Any:
        """Run fn on a daemon thread, wait at most timeout_s. A call that overruns keeps running
        in the background (an HTTP request is itself bounded by the client timeout)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        box: Dict[str, Any] = {}

        def run() -> None:
            try:
                box["r"] = fn()
            except BaseException as e:  # noqa: B902 - handed to the caller
                box["e"] = e

        t = threading.Thread(target=run, name=f"vmthunder-registry-{what.split()[0]}", daemon=True)
        t.start()
        t.join(timeout_s)
        if t.is_alive():
            raise self._unreachable(f"{what}: no answer within {timeout_s:g}s")
        if "e" in box:
            raise self._translate(what, box["e"], connecting) from box["e"]
        return box.get("r")

    def _c(self) -> Any:
        c = self._coord
        if c is None:
            raise RegistryError(f"registry {self.url}: not started (call start())")
        return c

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Connect (creating the file:// directory), start the heartbeat thread."""
        with self._mu:
            if self._coord is not None:
                return
            try:
                from tooz import coordination
            except ImportError as e:
                raise RegistryError(f"the registry needs tooz (pip install tooz etcd3gw): {e}") from None
            # Calls run on our own bounded threads: no need for tooz's one-worker pool (whose
            # shutdown alone takes a second).
            options = {"executor": "synchronous"}
            if self._kind == "file":
                # file driver: 'timeout' is how long a member file counts as alive untouched
                options["timeout"] = str(self._ttl)
            else:
                options.update(timeout=str(self._http_timeout), membership_timeout=str(self._ttl), lock_timeout=str(self._ttl))

            try:  # loads the driver (imports, ~0.5 s the first time); no I/O yet
                c = coordination.get_coordinator(self._tooz_url, self.member_id.encode(), **options)
            except Exception as e:
                raise RegistryError(f"registry {self.url}: no tooz driver: {_describe(e)}") from e
            session = getattr(getattr(c, "client", None), "session", None)
            if session is not None and "ca_cert=" in self._tooz_url:
                # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace the session's CA:
                # the CA the URL names is the one that verifies etcd.
                session.trust_env = False
            # our own heart below: tooz's cannot be stopped while the backend is down
            self._bounded("start", lambda: c.start(start_heart=False), connecting=True)
            self._coord = c
            self._stop_ev.clear()
            self._heart = threading.Thread(target=self._beat_loop, name="vmthunder-registry-heart", daemon=True)
            self._heart.start()
            LOG.info("registry %s: started as %s (lease %ds)", self.url, self.member_id, self._ttl)

    def stop(self) -> None:
        """Leave every group this Registry joined, stop the heartbeat, disconnect. Best-effort,
        bounded by a few timeout_s, never raises: a member not removed expires with its lease."""
        with self._mu:
            c, self._coord = self._coord, None
            records, self._records = self._records, {}
            records.update({g: {} for g in self._pending})
            self._pending = set()
        if c is None:
            return
        self._stop_ev.set()
        if self._heart is not None:
            self._heart.join(self.timeout_s)
            self._heart = None
        for group in records:
            try:
                self._bounded(f"leave {group}", lambda g=group: self._leave_group(c, g))
            except RegistryError as e:
                LOG.warning("registry: stop: %s", e)
                break  # backend gone: the lease does the rest
        lease = getattr(c, "_membership_lease", None)  # etcd: drop anything left at once
        if lease is not None:
            try:
                self._bounded("revoke lease", lease.revoke)
            except RegistryError as e:
                LOG.debug("registry: stop: %s", e)
        try:
            self._bounded("stop", c.stop)
        except RegistryError as e:
            LOG.warning("registry: stop: %s", e)
        LOG.info("registry %s: stopped (%s)", self.url, self.member_id)

    def _lease_id(self) -> Any:
        lease = getattr(self._coord, "_membership_lease", None)
        return getattr(lease, "id", None)

    def _beat_loop(self) -> None:
        interval = max(0.2, self.lease_s / 3.0)
        lease = self._lease_id()
        failing = False
        while not self._stop_ev.wait(interval):
            c = self._coord
            if c is None:
                return
            try:
                self._bounded("heartbeat", c.heartbeat)
            except RegistryError as e:
                if not failing:
                    LOG.warning("registry: %s", e)
                failing = True
                continue
            new_lease = self._lease_id()
            if failing or new_lease != lease or self._pending:
                if failing or new_lease != lease:
                    LOG.warning(
                        "registry %s: heartbeat %s; re-publishing records",
                        self.url,
                        "recovered" if failing else "lease was renewed (the old one expired)",
                    )
                try:
                    self._heal(rejoin_all=new_lease != lease)
                except RegistryError as e:
                    LOG.warning("registry: re-publishing failed: %s", e)
                    continue
            failing = False
            lease = new_lease

    def _heal(self, rejoin_all: bool) -> None:
        """Make the backend match what was last asked: groups whose publish/leave failed, then
        (all, or those missing us) the groups we published."""
        c = self._c()
        with self._mu:
            pending = set(self._pending)
        for group in pending:
            with self._mu:  # held across the call: a publish()/leave() meanwhile acts after it
                if group in self._pending:
                    rec = self._records.get(group)
                    if rec is None:
                        self._bounded(f"leave {group}", lambda g=group: self._leave_group(c, g))
                    else:
                        self._bounded(f"publish {group}", lambda g=group, r=rec: self._join(c, g, r))
                    self._pending.discard(group)
        with self._mu:
            records = {g: r for g, r in self._records.items() if g not in pending}
        for group, rec in records.items():
            if not rejoin_all:
                members = self._bounded(f"members of {group}", lambda g=group: self._members(c, g))
                if self.member_id in members:
                    continue
            self._bounded(f"publish {group}", lambda g=group, r=rec: self._join(c, g, r))

    # -- tooz operations (run inside _bounded) -------------------------------------------------
    def _join(self, c: Any, group: str, rec: Dict[str, Any]) -> None:
        import tooz
        from tooz import coordination as co

        g = group.encode()
        t = self.timeout_s

        def update() -> None:
            try:
                c.update_capabilities(g, rec).get(t)
            except tooz.NotImplemented:  # the file driver: leave and join again
                try:
                    c.leave_group(g).get(t)
                except (co.MemberNotJoined, co.GroupNotCreated):
                    pass
                c.join_group(g, rec).get(t)

        try:
            c.join_group(g, rec).get(t)
        except co.MemberAlreadyExist:
            update()
        except co.GroupNotCreated:
            try:
                c.create_group(g).get(t)
            except co.GroupAlreadyExist:
                pass
            try:
                c.join_group(g, rec).get(t)
            except co.MemberAlreadyExist:
                update()

    def _leave_group(self, c: Any, group: str) -> None:
        from tooz import coordination as co

        try:
            c.leave_group(group.encode()).get(self.timeout_s)
        except (co.MemberNotJoined, co.GroupNotCreated):
            pass

    def _members(self, c: Any, group: str) -> Dict[str, Dict[str, Any]]:
        from tooz import coordination as co

        try:
            raw = c.get_members_with_capabilities(group.encode()).get(self.timeout_s)
        except co.GroupNotCreated:
            return {}
        out = {}
        for mid, caps in raw.items():
            host = _text(mid)
            rec = dict(caps) if isinstance(caps, dict) else {}
            rec["host"] = host
            out[host] = rec
        return out

    # -- API -----------------------------------------------------------------------------------
    def _publish(self, group: str, record: Dict[str, Any]) -> None:
        rec = _clean_record(record, self.member_id)
        c = self._c()
        with self._mu:
            if self._records.get(group) == rec and group not in self._pending:
                # Already there: the heartbeat and peers() re-publish it if the lease lapses.
                # Upkeep republishes every round; each write would cost the backend a commit.
                return
            self._records[group] = rec  # kept even if this attempt fails: the heart retries
            self._pending.add(group)
        self._bounded(f"publish {group}", lambda: self._join(c, group, rec))
        with self._mu:
            if self._records.get(group) is rec:
                self._pending.discard(group)
        LOG.debug("registry: %s published in %s", self.member_id, group)

    def _peers(self, group: str) -> List[Dict[str, Any]]:
        c = self._c()
        members = self._bounded(f"members of {group}", lambda: self._members(c, group))
        with self._mu:
            mine = self._records.get(group)
        if mine is not None and self.member_id not in members:
            # our lease lapsed (or the file went stale) behind our back: be visible again
            LOG.warning("registry: %s missing from %s; re-publishing", self.member_id, group)
            self._bounded(f"publish {group}", lambda: self._join(c, group, mine))
            members[self.member_id] = dict(mine)
        return [members[h] for h in sorted(members)]

    def publish(self, image_id: str, record: Dict[str, Any]) -> None:
        """Join the image's group (created if needed) with `record` (a JSON-serializable dict;
        "host" is set to this member), or replace the record if already joined. The record is
        kept even when this raises: the heartbeat publishes it once the backend answers again
        (leave() drops it)."""
        self._publish(image_group(image_id), record)

    def peers(self, image_id: str) -> List[Dict[str, Any]]:
        """Live members' records of the image's group (this host included if it published),
        each with "host" = member id, sorted by host; [] if nobody ever published. As the
        members wrote them: the reader checks them (`vmthunder.parse_image_record`)."""
        return self._peers(image_group(image_id))

    def leave(self, image_id: str) -> None:
        """Leave the image's group (nothing if not a member). If this raises, the heartbeat
        retries. The group itself stays (deleting it could race with a joiner)."""
        group = image_group(image_id)
        c = self._c()
        with self._mu:
            self._records.pop(group, None)
            self._pending.add(group)
        self._bounded(f"leave {group}", lambda: self._leave_group(c, group))
        with self._mu:
            if group not in self._records:
                self._pending.discard(group)

    def publish_host(self, record: Dict[str, Any]) -> None:
        """This host's record in the hosts group: {host, initiator, export_ip, failure_domain}."""
        self._publish(HOSTS_GROUP, record)

    def hosts(self) -> List[Dict[str, Any]]:
        """Every live host's record (see publish_host), sorted by host; unchecked, like
        peers() (`vmthunder.parse_host_record`)."""
        return self._peers(HOSTS_GROUP)

    def _try_lock(self, name: str, lk: Any) -> bool:
        """One non-blocking attempt, bounded. An attempt that overruns and succeeds later
        releases what it got, so no lock is left held (and heartbeated) with no owner."""
        mu = threading.Lock()
        state = {"abandoned": False, "got": False}

        def attempt() -> bool:
            got = lk.acquire(blocking=False)
            with mu:
                if state["abandoned"]:
                    if got:
                        lk.release()
                    return False
                state["got"] = got
            return got

        try:
            return bool(self._bounded(f"lock {name}", attempt))
        except RegistryError:
            with mu:
                state["abandoned"] = True
                if state["got"]:  # it did succeed, just too late for _bounded
                    return True
            raise

    @contextlib.contextmanager
    def lock(self, image_id: str, timeout_s: float = 30.0) -> Iterator[None]:
        """Hold the image's cluster-wide lock ("vmthunder-image-<id>") for the block.
        RegistryError if not acquired within timeout_s. A holder that dies frees it after about
        lease_s (etcd) or at once (file: fcntl). If the lock turns out lost at release (its lease
        expired meanwhile, so someone else may have held it) that is a RegistryError too."""
        name = image_group(image_id)
        timeout_s = _positive("lock timeout_s", timeout_s)
        c = self._c()
        lk = self._bounded(f"lock {name}", lambda: c.get_lock(name.encode()))
        start = time.monotonic()
        deadline = start + timeout_s
        delay = 0.02
        # Non-blocking attempts with our own backoff: tooz's blocking etcd acquire waits up to
        # 1 s between tries and its `timeout` argument is the lease TTL, not a wait bound.
        while not self._try_lock(name, lk):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RegistryError(f"lock {name} not acquired within {timeout_s:g}s (held by another member)")
            time.sleep(min(left, delay * random.uniform(0.5, 1.5)))
            delay = min(delay * 2, 0.5)
        LOG.debug("registry: %s holds lock %s (waited %.2fs)", self.member_id, name, time.monotonic() - start)
        ok = False
        try:
            yield
            ok = True
        finally:
            try:
                released = self._bounded(f"unlock {name}", lk.release)
            except RegistryError as e:
                # tooz keeps refreshing the lease of a lock it believes held: forget it so the
                # lease lapses (after about lease_s) instead of living as long as this process.
                held = getattr(c, "_acquired_locks", None)
                if isinstance(held, set):
                    held.discard(lk)
                LOG.error("registry: releasing lock %s failed: %s", name, e)
                if ok:
                    raise
            else:
                if not released:
                    LOG.error("registry: lock %s was lost before release (lease expired?)", name)
                    if ok:
                        raise RegistryError(f"lock {name} was lost while held (its lease expired)")
