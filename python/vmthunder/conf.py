"""The ``[vmthunder]`` options of nova.conf: defined once here, registered by Nova (the patch's
``nova/conf/__init__.py`` calls ``register_opts``), listed for ``oslo-config-generator
--namespace vmthunder`` (the ``oslo.config.opts`` entry point ``vmthunder = vmthunder.conf:list_opts``)
and read by the ``vmthunder`` command (``load``), which must work where oslo.config is not
installed: the table below is plain data, the oslo.config objects are made from it on demand.
"""

import configparser
import os
import re
import socket
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

GROUP = "vmthunder"
GROUP_HELP = """
Boot many instances from one multiattach volume fast with vmthunder: each
node caches and relays the volume, each instance gets a local snapshot."""

# Where nova-compute reads its configuration (Debian and Ubuntu start it with both).
DEFAULT_CONFIG_FILES = ("/etc/nova/nova.conf", "/etc/nova/nova-compute.conf")
# Nova's [DEFAULT] state_path as the distributions set it (Nova's own default is its source dir).
DEFAULT_STATE_PATH = "/var/lib/nova"


class Option(NamedTuple):
    name: str
    kind: type  # bool, str or int
    default: Any
    help: str
    choices: Tuple[Tuple[str, str], ...] = ()
    min: Optional[int] = None


OPTIONS: Tuple[Option, ...] = (
    Option(
        "enabled",
        bool,
        False,
        """
Serve multiattach root volumes of boot-from-volume instances through
vmthunder: each instance's writes then stay in its snapshot on this host.
Other volumes, and all volumes when off, attach as usual.
""",
    ),
    Option(
        "snapshot_mode",
        str,
        "dm",
        "How each instance gets its copy-on-write snapshot.",
        choices=(("dm", "device-mapper snapshot, a local block device"), ("vmm", "qcow2 overlay file opened by the hypervisor")),
    ),
    Option(
        "cache_device",
        str,
        None,
        "Local block device that caches the image volumes and holds the instances' snapshots (set aside for vmthunder).",
    ),
    Option("state_dir", str, "$state_path/vmthunder", "Directory for vmthunder's locks, state and qcow2 overlays."),
    Option(
        "coordination_url",
        str,
        None,
        "URL (tooz) of the registry of relay nodes, e.g. "
        "etcd3+https://ctl:2379?ca_cert=...&cert_cert=...&cert_key=... Unset: every node reads "
        "the volume itself.",
    ),
    Option("fanout", int, None, "Nodes one node relays an image to at most. Unset: vmthunder's default (3).", min=1),
    Option(
        "cow_size_mib",
        int,
        None,
        "MiB of cache_device each instance gets for the blocks it "
        "writes (its snapshot); its disk fails once they are used up. Unset: vmthunder's "
        "default (1024).",
        min=16,
    ),
    Option(
        "queue_timeout_s",
        int,
        None,
        "Seconds an image's reads wait while none of its parents "
        "nor the volume answers (a network outage) before they fail; 0 fails them at once. "
        "Sets dm_multipath's queue_if_no_path_timeout_secs, which bounds every multipath "
        "device of the host. Unset: vmthunder's default (60).",
        min=0,
    ),
)


def _oslo_opts() -> List[Any]:
    from oslo_config import cfg  # only where Nova (or the generator) runs

    out = []
    for o in OPTIONS:
        kw: Dict[str, Any] = {"default": o.default, "help": " ".join(o.help.split())}
        if o.kind is bool:
            out.append(cfg.BoolOpt(o.name, **kw))
        elif o.kind is int:
            out.append(cfg.IntOpt(o.name, min=o.min, **kw))
        else:
            out.append(cfg.StrOpt(o.name, choices=list(o.choices) or None, **kw))
    return out


def _group() -> Any:
    from oslo_config import cfg

    return cfg.OptGroup(GROUP, help=" ".join(GROUP_HELP.split()))


def register_opts(conf: Any) -> None:
    """Register ``[vmthunder]`` on an oslo.config ``ConfigOpts`` (Nova's ``CONF``)."""
    group = _group()
    conf.register_group(group)
    conf.register_opts(_oslo_opts(), group=group)


def list_opts() -> List[Tuple[Any, List[Any]]]:
    """For oslo-config-generator (``--namespace vmthunder``)."""
    return [(_group(), _oslo_opts())]


# ---------------------------------------------------------------------------- the command's view
class ConfigError(ValueError):
    """A configuration file or value the command cannot use (the message names it)."""


_BOOL = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_VAR = re.compile(r"\$(\$|\{(\w+)\}|(\w+))")


class Settings(NamedTuple):
    """What the command needs of nova.conf: ``[vmthunder]`` plus Nova's host and addresses."""

    vmthunder: Dict[str, Any]
    host: str
    export_ip: Optional[str]
    files: Tuple[str, ...]  # the files read, in order


def _value(opt: Option, raw: str, where: str) -> Any:
    text = raw.strip()
    if opt.kind is bool:
        if text.lower() not in _BOOL:
            raise ConfigError(f"{where}: {text!r} is not a boolean (true or false)")
        return _BOOL[text.lower()]
    if opt.kind is int:
        try:
            v = int(text)
        except ValueError:
            raise ConfigError(f"{where}: {text!r} is not an integer") from None
        if opt.min is not None and v < opt.min:
            raise ConfigError(f"{where}: {v} is below the minimum {opt.min}")
        return v
    if opt.choices and text not in [c for c, _ in opt.choices]:
        raise ConfigError(f"{where}: {text!r} is not one of {', '.join(c for c, _ in opt.choices)}")
    return text or None


def load(files: Optional[Sequence[str]] = None, overrides: Optional[Dict[str, Any]] = None) -> Settings:
    """``[vmthunder]`` as nova-compute sees it, from ``files`` (default: those of
    ``DEFAULT_CONFIG_FILES`` that exist; later files win, as in oslo.config), with ``$name``
    substitution from the same section or ``[DEFAULT]``, then ``overrides`` (option -> value,
    None: not overridden; also ``host`` and ``export_ip``). Raises ``ConfigError``."""
    if files is None:
        files = [f for f in DEFAULT_CONFIG_FILES if os.path.exists(f)]
    parser = configparser.RawConfigParser(
        strict=False, interpolation=None, inline_comment_prefixes=None, default_section="\x00none"
    )
    parser.optionxform = str  # option names are case-sensitive in oslo.config
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                parser.read_file(fh, source=f)
        except OSError as e:
            raise ConfigError(f"configuration file {f}: {e.strerror or e}") from None
        except configparser.Error as e:
            raise ConfigError(f"configuration file {f}: {e}") from None

    def raw(section: str, name: str) -> Optional[str]:
        return parser.get(section, name) if parser.has_section(section) and parser.has_option(section, name) else None

    def subst(text: str, section: str, depth: int = 0) -> str:
        def one(m: "re.Match[str]") -> str:
            if m.group(1) == "$":
                return "$"
            name = m.group(2) or m.group(3)
            v = raw(section, name)
            v = v if v is not None else raw("DEFAULT", name)
            if v is None and name == "state_path":
                v = DEFAULT_STATE_PATH
            if v is None or depth > 8:
                raise ConfigError(f"[{section}] refers to ${name}, which is not set")
            return subst(v, "DEFAULT" if raw(section, name) is None else section, depth + 1)

        return _VAR.sub(one, text)

    vm: Dict[str, Any] = {}
    for opt in OPTIONS:
        r = raw(GROUP, opt.name)
        if r is None:
            vm[opt.name] = subst(opt.default, GROUP) if isinstance(opt.default, str) else opt.default
        else:
            vm[opt.name] = _value(opt, subst(r, GROUP), f"[{GROUP}] {opt.name}")
    host = raw("DEFAULT", "host")
    host = subst(host, "DEFAULT").strip() if host else socket.gethostname()
    ip = raw("DEFAULT", "my_block_storage_ip") or raw("DEFAULT", "my_ip")
    export_ip = subst(ip, "DEFAULT").strip() if ip else None
    settings = Settings(vm, host, export_ip or None, tuple(files))
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k == "host":
            settings = settings._replace(host=v)
        elif k == "export_ip":
            settings = settings._replace(export_ip=v)
        elif k in vm:
            vm[k] = v
        else:
            raise ConfigError(f"no option {k!r} in [{GROUP}]")
    return settings
