"""Host side of the fleet network: one netns, a bridge, one tap (+ optional ifb) per node.

Everything lives inside the fleet's own network namespace, so interface names can be short
and fixed (br0, tap0, ifb0 ...) and nothing on the host network changes.

Link shaping (optional, per node) is done entirely on the host, so the guest cannot undo it:
  * traffic TO the guest   = egress of tapN           -> tbf on tapN
  * traffic FROM the guest = ingress of tapN          -> u32 match-all + mirred redirect to ifbN,
                                                         tbf on ifbN's egress
(The host kernel has tbf, ingress, u32, mirred and ifb, but no police action, matchall or netem.)
"""

from __future__ import annotations

import ipaddress

from ._util import HarnessError, log, netns_exists, parse_rate, sh

ALLOWED_NET = ipaddress.ip_network("198.18.0.0/15")
BRIDGE = "br0"


def validate_subnet(subnet: str, count: int) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except ValueError as e:
        raise HarnessError(f"bad subnet {subnet!r}: {e}") from e
    if net.version != 4 or not net.subnet_of(ALLOWED_NET):
        raise HarnessError(f"subnet {subnet} is not inside {ALLOWED_NET} (benchmark range only)")
    if net.num_addresses - 2 < count:
        raise HarnessError(f"subnet {subnet} too small for {count} nodes")
    return net


class FleetNetwork:
    def __init__(self, netns: str):
        self.netns = netns

    def _ip(self, *args, check=True):
        return sh(["ip", "-n", self.netns, *args], timeout=30, check=check)

    def _tc(self, *args, check=True):
        return sh(["ip", "netns", "exec", self.netns, "tc", *args], timeout=30, check=check)

    def create(self) -> None:
        if netns_exists(self.netns):
            raise HarnessError(
                f"network namespace {self.netns} already exists (another fleet with the same name?  run: python -m lab cleanup)"
            )
        log.debug("creating netns %s", self.netns)
        sh(["ip", "netns", "add", self.netns], timeout=30)
        self._ip("link", "set", "lo", "up")
        self._ip("link", "add", BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        self._ip("link", "set", BRIDGE, "up")
        self._bridge_without_netfilter()

    def _bridge_without_netfilter(self) -> None:
        """With br_netfilter loaded on the host, every frame the bridge forwards also walks the
        iptables hooks (on by default in each new netns). The fleet's bridge stands for a
        storage switch: no firewall, and on a 2-core host that walk is CPU the nodes need."""
        for family in ("iptables", "ip6tables", "arptables"):
            key = f"/proc/sys/net/bridge/bridge-nf-call-{family}"
            rc, out = sh(
                ["ip", "netns", "exec", self.netns, "sh", "-c", f"[ ! -e {key} ] || echo 0 > {key}"], timeout=15, check=False
            )
            if rc != 0:
                log.warning("%s: could not turn off %s: %s", self.netns, key, out.strip())

    def add_address(self, cidr: str) -> None:
        """Give the bridge (the host side of the fleet's network) an address."""
        self._ip("addr", "add", cidr, "dev", BRIDGE)

    def add_tap(self, tap: str) -> None:
        self._ip("tuntap", "add", "dev", tap, "mode", "tap")
        self._ip("link", "set", tap, "master", BRIDGE, "up")

    def shape(self, index: int, rate) -> None:
        """Limit tap<index> to RATE in each direction (None removes the limit)."""
        tap, ifb = f"tap{index}", f"ifb{index}"
        # remove any previous shaping (ignore "nothing to delete")
        self._tc("qdisc", "del", "dev", tap, "root", check=False)
        self._tc("qdisc", "del", "dev", tap, "ingress", check=False)
        self._ip("link", "del", ifb, check=False)
        if rate is None:
            return
        bits = parse_rate(rate)
        # GSO super-frames (up to 64 KiB) travel through the tap: burst must exceed them.
        burst = max(256 * 1024, bits // 8 // 50)
        tbf = ["tbf", "rate", f"{bits}bit", "burst", str(burst), "latency", "100ms"]
        self._tc("qdisc", "add", "dev", tap, "root", *tbf)
        self._ip("link", "add", ifb, "type", "ifb")
        self._ip("link", "set", ifb, "up")
        self._tc("qdisc", "add", "dev", ifb, "root", *tbf)
        self._tc("qdisc", "add", "dev", tap, "handle", "ffff:", "ingress")
        self._tc(
            "filter",
            "add",
            "dev",
            tap,
            "parent",
            "ffff:",
            "protocol",
            "all",
            "u32",
            "match",
            "u32",
            "0",
            "0",
            "action",
            "mirred",
            "egress",
            "redirect",
            "dev",
            ifb,
        )
        log.debug("%s: %s shaped to %s bit/s both ways (burst %d)", self.netns, tap, bits, burst)

    def tap_stats(self, index: int) -> dict:
        """Host view of tap<index> counters (tap rx = guest tx)."""
        _, out = sh(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "cat",
                f"/sys/class/net/tap{index}/statistics/rx_bytes",
                f"/sys/class/net/tap{index}/statistics/tx_bytes",
            ],
            timeout=15,
        )
        rx, tx = (int(x) for x in out.split())
        return {"guest_tx_bytes": rx, "guest_rx_bytes": tx}

    def destroy(self) -> None:
        if netns_exists(self.netns):
            log.debug("deleting netns %s", self.netns)
            rc, out = sh(["ip", "netns", "del", self.netns], timeout=30, check=False)
            if rc != 0:
                log.warning("ip netns del %s failed: %s", self.netns, out.strip())
