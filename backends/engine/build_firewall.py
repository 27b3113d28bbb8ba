"""The host firewall of the build network: a build reaches its proxy and nothing else.

The tables ``inet dockyard_build`` and ``bridge dockyard_build`` (apart from the agents'
``dockyard`` tables in :mod:`dockyard.backends.engine.firewall`, same approach) hold the
containers of the engine's build network (host interface :data:`BUILD_IFACE`):

* ``input``: from the build network, only ``<bridge address>:<a running proxy's port>``
  (the set ``proxy_ports``) is accepted, with the replies of those connections; anything
  else to the host (any of its addresses and ports, IPv4 and IPv6, DNS included) is
  rejected. The proxies listen on every IPv4 address, so a connection to a proxy port from
  anywhere but the build network (the LAN, other containers, the host's loopback) is
  rejected too;
* ``forward``: nothing from or to the build network is forwarded (no internet, no LAN, no
  other networks' containers);
* ``bridge forward``: frames between two containers of the build network are dropped
  (concurrent builds cannot reach each other);
* ``output``: what a proxy sends to the build network counts against that build's quota
  (the map ``port_quota``, keyed by the proxy's port); past it, the proxy's port joins
  ``over_cap`` and its connections are reset, on both sides (the proxy's by ``output``,
  the build's by ``input``).

Applied atomically before each build (``nft -f``: a flushed ruleset heals); a build's port
and quota are added when its proxy starts and removed when it stops."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence

from dockyard.backends.engine.firewall import NftRunner, local_nft
from dockyard.core.errors import RuntimeOperationError

TABLE = "dockyard_build"
#: The host-side interface of the engine's build network.
BUILD_IFACE = "dyb0"


def build_ruleset(iface: str, gateway: str, subnet: str, table: str = TABLE) -> str:
    """Both tables as one transaction that keeps the ports and quotas of running builds."""
    t, b = f"inet {table}", f"bridge {table}"
    reject = "counter reject with icmpx type admin-prohibited"
    return f"""\
add table {t}
add set {t} proxy_ports {{ type inet_service; }}
add map {t} port_quota {{ type inet_service : quota; }}
add set {t} over_cap {{ type inet_service; flags dynamic; }}
add chain {t} input {{ type filter hook input priority filter - 10; policy accept; }}
add chain {t} forward {{ type filter hook forward priority filter - 10; policy accept; }}
add chain {t} output {{ type filter hook output priority filter - 10; policy accept; }}
flush chain {t} input
flush chain {t} forward
flush chain {t} output
add rule {t} input iifname "{iface}" tcp dport @over_cap counter reject with tcp reset
add rule {t} input iifname "{iface}" ct state established,related accept
add rule {t} input iifname "{iface}" ip daddr {gateway} tcp dport @proxy_ports accept
add rule {t} input iifname "{iface}" {reject}
add rule {t} input tcp dport @proxy_ports counter reject with tcp reset
add rule {t} forward iifname "{iface}" {reject}
add rule {t} forward oifname "{iface}" counter drop
add rule {t} output oifname "{iface}" quota name tcp sport map @port_quota \
add @over_cap {{ tcp sport }} counter reject with tcp reset
add table {b}
add set {b} build_subnets {{ type ipv4_addr; flags interval; }}
add chain {b} forward {{ type filter hook forward priority -10; policy accept; }}
flush chain {b} forward
flush set {b} build_subnets
add element {b} build_subnets {{ {subnet} }}
add rule {b} forward ip saddr @build_subnets ip daddr @build_subnets counter drop
"""


class BuildFirewall:
    """The ``dockyard_build`` tables, the proxies' ports and their byte quotas."""

    def __init__(self, runner: NftRunner | None = None, *, table: str = TABLE) -> None:
        self.run = runner or local_nft()
        self.table = table

    def _nft(self, args: Sequence[str], stdin: str | None = None, what: str = "") -> str:
        try:
            code, out, err = self.run(args, stdin)
        except (OSError, subprocess.SubprocessError) as exc:
            code, out, err = 1, "", str(exc)
        if code != 0:
            raise RuntimeOperationError(
                f"the build firewall could not {what}: {err.strip() or f'nft exited {code}'}",
                reason="network_policy_failed",
            )
        return out

    def apply(self, iface: str, gateway: str, subnet: str) -> None:
        """Create or repair the tables for the build network (elements kept)."""
        self._nft(["-f", "-"], build_ruleset(iface, gateway, subnet, self.table), "be applied")

    def grant(self, port: int, max_bytes: int) -> None:
        """Admit the proxy on ``port`` and give it a quota of ``max_bytes`` (atomically)."""
        t = f"inet {self.table}"
        lines = [
            f"add quota {t} q_{port} {{ over {max_bytes} bytes }}",
            f'add element {t} port_quota {{ {port} : "q_{port}" }}',
            f"add element {t} proxy_ports {{ {port} }}",
        ]
        self._nft(["-f", "-"], "\n".join(lines) + "\n", f"admit the proxy on port {port}")

    def used(self, port: int) -> int | None:
        """Bytes the proxy on ``port`` sent to the build network so far (None: unknown)."""
        try:
            out = self._nft(["-j", "list", "quota", "inet", self.table, f"q_{port}"], None, "")
        except RuntimeOperationError:
            return None
        for item in json.loads(out or "{}").get("nftables", []):
            quota = item.get("quota")
            if isinstance(quota, dict):
                return int(quota.get("used", 0))
        return None

    def revoke(self, port: int) -> None:
        """Remove the proxy's port and quota (never raises: the port may be gone already)."""
        t = f"inet {self.table}"
        for command in (
            f"delete element {t} over_cap {{ {port} }}",
            f"delete element {t} proxy_ports {{ {port} }}",
            f"delete element {t} port_quota {{ {port} }}",
            f"delete quota {t} q_{port}",
        ):
            try:
                self._nft(["-f", "-"], command + "\n", "revoke")
            except RuntimeOperationError:
                continue


__all__ = ["BUILD_IFACE", "TABLE", "BuildFirewall", "build_ruleset"]
