"""The host firewall of the build networks: a build reaches its own proxy and nothing else.

Each build runs on a network of its own (host interface ``dyb<build>``, see
:data:`IFACE_PREFIX`). The tables ``inet dockyard_builds`` and ``bridge dockyard_builds``
(apart from the agents' ``dockyard`` tables in :mod:`dockyard.backends.engine.firewall`,
same approach) hold every such interface:

* ``input``: from a build network, only ``<its bridge address>:<its own proxy's port>``
  (the set ``grants``: interface . address . port, one element per build) is accepted,
  with the replies of those connections; anything else to the host (any of its addresses
  and ports, another build's proxy included, IPv4 and IPv6, DNS included) is rejected. The
  proxies listen on every IPv4 address, so a connection to a proxy port (``proxy_ports``)
  from anywhere but a build network (the LAN, other containers, the host's loopback) is
  rejected too;
* ``forward``: nothing from or to a build network is forwarded (no internet, no LAN, no
  other networks' containers, no other build), but for a grant to an operator's proxy on
  another machine (``build_proxy = "attach"``) and its replies;
* ``bridge forward``: frames between two containers of a build network are dropped (the
  set ``build_subnets``, one element per build);
* ``output``: what a proxy sends to a build network counts against that build's quota
  (the map ``port_quota``, keyed by the proxy's port); past it, the proxy's port joins
  ``over_cap`` and its connections are reset, on both sides (the proxy's by ``output``,
  the build's by ``input``).

Applied atomically before each build (``nft -f``: a flushed ruleset heals; the rules name
no build, the elements are kept); a build's grant, port, subnet and quota are added when
its proxy starts and removed when it stops; the grants of build networks that are gone (a
killed dockyard's) are pruned before each build. (The table is not the ``dockyard_build`` of
the single shared build network dockyard used before: both can live on one host.)"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

from dockyard.backends.engine.firewall import NftTables
from dockyard.core.children import start_time
from dockyard.core.errors import RuntimeOperationError

TABLE = "dockyard_builds"
#: What the host-side interface of every build network starts with (``dyb<build>``).
IFACE_PREFIX = "dyb"


def build_ruleset(table: str = TABLE) -> str:
    """Both tables as one transaction that keeps the grants and quotas of running builds."""
    t, b = f"inet {table}", f"bridge {table}"
    reject = "counter reject with icmpx type admin-prohibited"
    ifaces = f'"{IFACE_PREFIX}*"'
    return f"""\
add table {t}
add set {t} grants {{ type ifname . ipv4_addr . inet_service; }}
add set {t} proxy_ports {{ type inet_service; }}
add map {t} port_quota {{ type inet_service : quota; }}
add set {t} over_cap {{ type inet_service; flags dynamic; }}
add chain {t} input {{ type filter hook input priority filter - 10; policy accept; }}
add chain {t} forward {{ type filter hook forward priority filter - 10; policy accept; }}
add chain {t} output {{ type filter hook output priority filter - 10; policy accept; }}
flush chain {t} input
flush chain {t} forward
flush chain {t} output
add rule {t} input iifname {ifaces} tcp dport @over_cap counter reject with tcp reset
add rule {t} input iifname {ifaces} ct state established,related accept
add rule {t} input iifname . ip daddr . tcp dport @grants accept
add rule {t} input iifname {ifaces} {reject}
add rule {t} input tcp dport @proxy_ports counter reject with tcp reset
add rule {t} forward iifname . ip daddr . tcp dport @grants accept
add rule {t} forward oifname {ifaces} ct state established,related accept
add rule {t} forward iifname {ifaces} {reject}
add rule {t} forward oifname {ifaces} counter drop
add rule {t} output oifname {ifaces} quota name tcp sport map @port_quota \
add @over_cap {{ tcp sport }} counter reject with tcp reset
add table {b}
add set {b} build_subnets {{ type ipv4_addr; flags interval; }}
add chain {b} forward {{ type filter hook forward priority -10; policy accept; }}
flush chain {b} forward
add rule {b} forward ip saddr @build_subnets ip daddr @build_subnets counter drop
"""


@dataclass(frozen=True)
class BuildGrant:
    """What one build may reach: its network's interface, bridge address and subnet, and
    its proxy's port."""

    iface: str
    gateway: str
    subnet: str
    port: int

    def __post_init__(self) -> None:
        if not self.iface.startswith(IFACE_PREFIX) or not self.iface[3:].isalnum():
            raise ValueError(
                f"build interfaces are {IFACE_PREFIX}<letters, digits>: {self.iface!r}"
            )


class BuildFirewall(NftTables):
    """The ``dockyard_builds`` tables: the builds' grants, their proxies' ports and byte
    quotas."""

    NAME = "build firewall"
    DEFAULT_TABLE = TABLE

    def apply(self) -> None:
        """Create or repair the tables (the elements of running builds kept)."""
        self._load(build_ruleset(self.table))

    def grant(self, grant: BuildGrant, max_bytes: int | None) -> None:
        """Admit the build's network to its proxy alone, and give the proxy a quota of
        ``max_bytes`` (atomically; None: the operator's proxy, neither quota nor port
        guard: its port is not dockyard's)."""
        t, port = f"inet {self.table}", grant.port
        lines = (
            []
            if max_bytes is None
            else [
                f"add quota {t} q_{port} {{ over {max_bytes} bytes }}",
                f'add element {t} port_quota {{ {port} : "q_{port}" }}',
                f"add element {t} proxy_ports {{ {port} }}",
            ]
        )
        lines += [
            # The subnet and this process ride along as the element's comment, for prune().
            f'add element {t} grants {{ "{grant.iface}" . {grant.gateway} . {port} '
            f'comment "{grant.subnet} {_owner()}{" attached" if max_bytes is None else ""}" }}',
            f"add element bridge {self.table} build_subnets {{ {grant.subnet} }}",
        ]
        self._load("\n".join(lines) + "\n", f"admit the proxy on port {port}")

    def used(self, port: int) -> int | None:
        """Bytes the proxy on ``port`` sent to its build network so far (None: unknown)."""
        try:
            out = self._nft(["-j", "list", "quota", "inet", self.table, f"q_{port}"], None, "")
        except RuntimeOperationError:
            return None
        for item in json.loads(out or "{}").get("nftables", []):
            quota = item.get("quota")
            if isinstance(quota, dict):
                return int(quota.get("used", 0))
        return None

    def grants(self) -> list[tuple[BuildGrant, str, bool]]:
        """The grants in the table (any dockyard's on this host), each with its owner
        (``<pid>:<start time>`` of the dockyard that made it) and whether its proxy is
        dockyard's own squid (else the operator's, ``build_proxy = "attach"``)."""
        out = self._nft(["-j", "list", "set", "inet", self.table, "grants"], None, "be read")
        found = []
        for item in json.loads(out or "{}").get("nftables", []):
            for elem in (item.get("set") or {}).get("elem", []):
                body = elem.get("elem", {}) if isinstance(elem, dict) else {}
                parts = (body.get("val") or {}).get("concat") or []
                subnet, _, owner = str(body.get("comment") or "").partition(" ")
                owner, _, kind = owner.partition(" ")
                if len(parts) == 3 and subnet:
                    iface, gateway, port = parts
                    with contextlib.suppress(ValueError):
                        grant = BuildGrant(str(iface), str(gateway), subnet, int(port))
                        found.append((grant, owner, kind != "attached"))
        return found

    def prune(self) -> int:
        """Revoke the grants whose dockyard is gone (killed mid-build: its subnet may be
        handed to another network, its port to another proxy). How many."""
        stale = [(grant, own) for grant, owner, own in self.grants() if not _alive(owner)]
        for grant, own in stale:
            self.revoke(grant.port, grant, own=own)
        return len(stale)

    def revoke(self, port: int, grant: BuildGrant | None = None, *, own: bool = True) -> None:
        """Remove the proxy's port and quota (``own``: dockyard's squid, not the
        operator's proxy), and the build's grant and subnet when given (never raises:
        they may be gone already)."""
        t = f"inet {self.table}"
        commands = (
            []
            if not own
            else [
                f"delete element {t} over_cap {{ {port} }}",
                f"delete element {t} proxy_ports {{ {port} }}",
                f"delete element {t} port_quota {{ {port} }}",
                f"delete quota {t} q_{port}",
            ]
        )
        if grant is not None:
            commands += [
                f'delete element {t} grants {{ "{grant.iface}" . {grant.gateway} . {port} }}',
                f"delete element bridge {self.table} build_subnets {{ {grant.subnet} }}",
            ]
        for command in commands:
            try:
                self._load(command + "\n", "revoke")
            except RuntimeOperationError:
                continue


def _owner() -> str:
    """This process as a grant's owner: ``<pid>:<start time>`` (a reused pid differs)."""
    pid = os.getpid()
    return f"{pid}:{start_time(pid)}"


def _alive(owner: str) -> bool:
    pid, _, started = owner.partition(":")
    if not pid.isdigit():
        return True  # not ours to judge
    now = start_time(int(pid))
    return now is not None and started in (str(now), "None")


__all__ = ["IFACE_PREFIX", "TABLE", "BuildFirewall", "BuildGrant", "build_ruleset"]
