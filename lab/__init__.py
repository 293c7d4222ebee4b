"""vmthunder kernel-test harness: User-Mode-Linux nodes with real device-mapper, LIO and
open-iscsi, on a private bridge inside a network namespace.

    from lab import Fleet, uml_available

    with Fleet(nodes={"a": {"disks": {"ubdb": 512 * 2**20}}, "b": {}}, name="vmt") as fleet:
        rc, out = fleet["a"].run("dmsetup ls", timeout=60)

See _fleet.Fleet and _node.UmlNode for the API, guest_init.sh for the guest side.
Leftovers of a crashed run:  python -m lab cleanup [--workdir DIR]
"""

from ._fleet import IQN_PREFIX, Fleet, cleanup_workdir
from ._net import ALLOWED_NET
from ._node import GUEST_NIC, GUEST_SHARE, GuestProcess, UmlNode
from ._util import CommandTimeout, HarnessError, NodeDead, uml_available

__all__ = [
    "Fleet",
    "UmlNode",
    "GuestProcess",
    "HarnessError",
    "NodeDead",
    "CommandTimeout",
    "uml_available",
    "cleanup_workdir",
    "GUEST_SHARE",
    "GUEST_NIC",
    "IQN_PREFIX",
    "ALLOWED_NET",
]
