"""`vmthunder doctor`: the library's checks of the kernel and the host (``vmthunder.node_checks``,
src/doctor.rs) plus the ones that need the network or Nova: the registry answers, the clock
agrees with it, the Nova this Python imports carries the patch.

Each check is ``{"name", "ok", "blocking", "detail", "fix"}``; ``blocking``: attaches fail
while it fails (the command then exits 1).
"""

import email.utils
import importlib.util
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from importlib import metadata
from typing import Any, Dict, List, Optional

from ._vmthunder import node_checks

SKEW_LIMIT_S = 3.0  # the Date header has a resolution of 1 s


def check(name: str, ok: bool, detail: str, fix: str = "", blocking: bool = False) -> Dict[str, Any]:
    return {"name": name, "ok": ok, "blocking": blocking, "detail": detail, "fix": "" if ok else fix}


def _etcd_request(url: str) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"User-Agent": "vmthunder-doctor"})


def registry_checks(url: Optional[str], timeout: float = 5.0, now=time.time) -> List[Dict[str, Any]]:
    """The registry answers (etcd: GET /version, with the URL's TLS files), and this host's clock
    is within SKEW_LIMIT_S of the registry's (its HTTP Date header). Neither blocks an attach:
    without the registry every node reads the origin volume."""
    name = "registry"
    if not url:
        return [check(name, True, "no coordination_url: every node reads the image volume itself (no relaying)")]
    parsed = urllib.parse.urlsplit(url)
    shown = urllib.parse.urlunsplit((parsed.scheme, parsed.hostname or "", "", "", "")) + (
        f":{parsed.port}" if parsed.port else ""
    )
    fix = f"check that the registry at {shown} runs and that this host reaches it (firewall, TLS files in the URL)"
    if parsed.scheme == "file":
        path = parsed.path
        ok = os.path.isdir(path) and os.access(path, os.W_OK)
        return [
            check(
                name,
                ok,
                f"file registry {path}: {'a writable directory' if ok else 'missing or not writable'}",
                f"mkdir -p {path} (a directory every node of one host can write)",
            )
        ]
    if not parsed.scheme.startswith("etcd3+http"):
        return [check(name, True, f"{parsed.scheme} registry: not checked (only etcd3+http(s) and file:// are)")]
    scheme = "https" if parsed.scheme == "etcd3+https" else "http"
    q = dict(urllib.parse.parse_qsl(parsed.query))
    ctx = None
    if scheme == "https":
        try:
            ctx = ssl.create_default_context(cafile=q.get("ca_cert"))
            if q.get("cert_cert"):
                ctx.load_cert_chain(q["cert_cert"], q.get("cert_key"))
        except (OSError, ssl.SSLError) as e:
            return [
                check(
                    name,
                    False,
                    f"{shown}: the TLS files in coordination_url cannot be loaded: {e}",
                    "fix ca_cert, cert_cert and cert_key in coordination_url",
                )
            ]
    target = f"{scheme}://{parsed.hostname}:{parsed.port or 2379}/version"
    t0 = now()
    try:
        with urllib.request.urlopen(_etcd_request(target), timeout=timeout, context=ctx) as r:
            body = r.read(4096).decode("utf-8", "replace")
            date = r.headers.get("Date")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return [
            check(name, False, f"{shown} does not answer: {reason} (attaches read the origin volume meanwhile)", fix),
            check("clock skew", True, "not measured (the registry does not answer)"),
        ]
    t1 = now()
    out = [check(name, True, f"{shown} answered in {1000 * (t1 - t0):.0f} ms: {body.strip()[:120]}")]
    if not date:
        out.append(check("clock skew", True, "not measured (the registry sent no Date header)"))
        return out
    skew = email.utils.parsedate_to_datetime(date).timestamp() - (t0 + t1) / 2
    ok = abs(skew) <= SKEW_LIMIT_S
    out.append(
        check(
            "clock skew",
            ok,
            f"this host's clock is {-skew:+.1f} s off the registry's (within ±1 s: the Date header's resolution)",
            "run time synchronisation (chrony or systemd-timesyncd) on this host and the registry's: "
            "certificates and lease times are compared across hosts",
        )
    )
    return out


def nova_check(required: bool, markers: Dict[str, str], version: str) -> Dict[str, Any]:
    """The Nova this Python imports is `version` and carries the patch (each file's marker).
    `required`: nova.conf turns vmthunder on, so a Nova without the patch ignores it."""
    name = "nova patch"
    spec = importlib.util.find_spec("nova")
    if spec is None or not spec.submodule_search_locations:
        if required:
            return check(
                name,
                False,
                "[vmthunder] enabled = true, but this Python has no Nova",
                "run vmthunder doctor with nova-compute's Python (its venv's bin/vmthunder)",
                blocking=True,
            )
        return check(name, True, "not checked: this Python has no Nova (vmthunder used without Nova)")
    root = os.path.dirname(list(spec.submodule_search_locations)[0])
    try:
        have = metadata.version("nova")
    except metadata.PackageNotFoundError:
        have = "unknown"
    fix = f"nova_patch/apply.sh --python <nova-compute's python> (Nova {version} only), then restart nova-compute"
    if have != version:
        return check(name, False, f"Nova {have} in {root}: the patch is for Nova {version}", fix, blocking=required)
    missing = []
    for rel, marker in markers.items():
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                if marker not in f.read():
                    missing.append(rel)
        except OSError as e:
            missing.append(f"{rel} ({e.strerror})")
    if missing:
        return check(name, False, f"Nova {have} in {root} lacks the patch in {', '.join(missing)}", fix, blocking=required)
    return check(name, True, f"Nova {have} in {root} carries the vmthunder patch", blocking=required)


def run(settings, engine: str = "bcache", coalesce: bool = True) -> List[Dict[str, Any]]:
    """Every check for a node configured as ``settings`` (``vmthunder.conf.Settings``)."""
    from .nova import NOVA_VERSION, PATCH_MARKERS

    v = settings.vmthunder
    checks = node_checks(
        cache_device=v.get("cache_device"),
        state_dir=v.get("state_dir"),
        engine=engine,
        coalesce=coalesce,
        relay=True,
        snapshot_mode=v.get("snapshot_mode") or "dm",
    )
    checks += registry_checks(v.get("coordination_url"))
    checks.append(nova_check(bool(v.get("enabled")), PATCH_MARKERS, NOVA_VERSION))
    return checks
