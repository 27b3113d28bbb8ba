"""The host firewall that holds agent containers to their network policy (nftables).

Shared by the container runtimes through the engine floor (:mod:`dockyard.backends.engine`).
An engine puts agent containers on bridge networks made for them whose host-side interface
starts with ``dya`` (:data:`IFACE_PREFIX`): one network for egress ``none`` and one per
gateway for egress ``gateway``. The nftables table
``inet dockyard`` matches those interfaces by prefix and:

* accepts packets of connections the host opened (the replies of a published port: the
  router and dockyard's probes reach an agent through ``127.0.0.1:<host port>``);
* lets the containers of a gateway network reach that gateway: a connection to
  ``<bridge address>:<gateway port>`` is DNATed to the operator's gateway and accepted,
  keyed by the network's interface (:class:`AgentNetwork`); a gateway on the host's
  loopback works because the bridge routes 127/8 (``route_localnet``, which engines set
  for their own loopback port publishing and :meth:`AgentFirewall.route_localnet` sets too);
* rejects everything else an agent sends, to the host (``input``: any of its addresses, any
  port, IPv4 and IPv6) and through it (``forward``: the internet, the LAN, other networks),
  and drops what is forwarded *to* an agent network unasked.

The table ``bridge dockyard`` drops IPv4 frames bridged between two containers of the same
agent network (their subnets are in the set ``agent_subnets``), so agents cannot reach each
other either, with or without ``br_netfilter``.

A drop in any nftables base chain is final, so these tables hold whatever the engine's own
rules (netavark's, Docker's) accept. Runtimes call :meth:`AgentFirewall.apply` with every
agent network the engine has before each container start: one atomic ``nft -f``
transaction re-applies the rules and replaces the elements, so a flushed ruleset heals and
the subnets and grants of networks removed meanwhile go (a stale subnet could otherwise
isolate the containers of a network that reuses it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dockyard.core.errors import RuntimeOperationError

#: Prefix of the host-side interface of every agent network.
IFACE_PREFIX = "dya"
TABLE = "dockyard"

#: Runs ``nft`` with the given arguments and stdin; returns (exit code, stdout, stderr).
NftRunner = Callable[[Sequence[str], str | None], tuple[int, str, str]]


@dataclass(frozen=True)
class AgentNetwork:
    """An agent network as the firewall sees it: its host interface, its IPv4 subnet, and
    the gateway ``(IPv4, port)`` its containers may reach (at their bridge address, on the
    same port), if any."""

    iface: str
    subnet: str
    gateway: tuple[str, int] | None = None


def local_nft(nft: str = "nft", timeout_s: float = 20.0) -> NftRunner:
    """Run ``nft`` in this process's network namespace."""

    def run(args: Sequence[str], stdin: str | None) -> tuple[int, str, str]:
        binary = shutil.which(nft)
        if binary is None:
            return 127, "", f"{nft}: not found (install nftables: contrib/ci/setup-podman.sh)"
        proc = subprocess.run(
            [binary, *args], input=stdin, capture_output=True, text=True, timeout=timeout_s
        )
        return proc.returncode, proc.stdout, proc.stderr

    return run


def ruleset(table: str = TABLE, prefix: str = IFACE_PREFIX) -> str:
    """Both tables as one ``nft -f`` transaction that keeps set and map elements."""
    t, b = f"inet {table}", f"bridge {table}"
    agent = f'"{prefix}*"'
    reject = "counter reject with icmpx type admin-prohibited"
    return f"""\
add table {t}
add map {t} gateway_dnat {{ type ifname . inet_service : ipv4_addr . inet_service; }}
add set {t} gateway_allow {{ type ifname . ipv4_addr . inet_service; }}
add chain {t} prerouting {{ type nat hook prerouting priority dstnat - 10; policy accept; }}
add chain {t} input {{ type filter hook input priority filter - 10; policy accept; }}
add chain {t} forward {{ type filter hook forward priority filter - 10; policy accept; }}
flush chain {t} prerouting
flush chain {t} input
flush chain {t} forward
add rule {t} prerouting iifname {agent} fib daddr type local dnat ip to iifname . tcp dport \
map @gateway_dnat
add rule {t} input iifname {agent} ct state established,related accept
add rule {t} input iifname {agent} ct status dnat iifname . ip daddr . tcp dport @gateway_allow \
accept
add rule {t} input iifname {agent} {reject}
add rule {t} forward oifname {agent} ct state established,related accept
add rule {t} forward iifname {agent} ct status dnat iifname . ip daddr . tcp dport \
@gateway_allow accept
add rule {t} forward iifname {agent} {reject}
add rule {t} forward oifname {agent} counter drop
add table {b}
add set {b} agent_subnets {{ type ipv4_addr; flags interval; }}
add chain {b} forward {{ type filter hook forward priority -10; policy accept; }}
flush chain {b} forward
add rule {b} forward ip saddr @agent_subnets ip daddr @agent_subnets counter drop
"""


class NftTables:
    """Tables of dockyard's that ``nft`` holds: how they are run and applied. A failed
    ``nft`` is a RuntimeOperationError (``network_policy_failed``) naming :attr:`NAME`."""

    #: What an error calls these tables ("the agent firewall could not ...").
    NAME = "firewall"
    #: The table name when none is given.
    DEFAULT_TABLE = TABLE

    def __init__(self, runner: NftRunner | None = None, *, table: str | None = None) -> None:
        self.run = runner or local_nft()
        self.table = table or self.DEFAULT_TABLE

    def _nft(self, args: Sequence[str], stdin: str | None = None, what: str = "") -> str:
        try:
            code, out, err = self.run(args, stdin)
        except (OSError, subprocess.SubprocessError) as exc:
            code, out, err = 1, "", str(exc)
        if code != 0:
            raise RuntimeOperationError(
                f"the {self.NAME} could not {what}: {err.strip() or f'nft exited {code}'}",
                reason="network_policy_failed",
            )
        return out

    def _load(self, script: str, what: str = "be applied") -> None:
        """Apply an ``nft -f`` script atomically (all of it or nothing)."""
        self._nft(["-f", "-"], script, what)


class AgentFirewall(NftTables):
    """The ``dockyard`` nftables tables, their gateway grants and agent subnets."""

    NAME = "agent firewall"

    def check(self) -> str:
        """Why the firewall cannot work here, or "" when it can (it is applied on the way)."""
        try:
            self.ensure()
        except RuntimeOperationError as exc:
            return exc.message
        return ""

    def ensure(self) -> None:
        """Create or repair the tables (atomically; grants and subnets are kept)."""
        self._load(ruleset(self.table))

    def apply(self, networks: Iterable[AgentNetwork]) -> None:
        """Apply the rules and make the elements exactly ``networks``' (atomically)."""
        t, b = f"inet {self.table}", f"bridge {self.table}"
        lines = [
            ruleset(self.table),
            f"flush set {b} agent_subnets",
            f"flush map {t} gateway_dnat",
            f"flush set {t} gateway_allow",
        ]
        for net in networks:
            if not net.iface.startswith(IFACE_PREFIX):
                raise ValueError(f"agent interfaces start with {IFACE_PREFIX!r}: {net.iface!r}")
            lines.append(f"add element {b} agent_subnets {{ {net.subnet} }}")
            if net.gateway is not None:
                ip, port = net.gateway
                lines.append(
                    f'add element {t} gateway_dnat {{ "{net.iface}" . {port} : {ip} . {port} }}'
                )
                lines.append(f'add element {t} gateway_allow {{ "{net.iface}" . {ip} . {port} }}')
        self._load("\n".join(lines) + "\n")

    @staticmethod
    def route_localnet(iface: str) -> bool:
        """Let ``iface`` route 127/8 (for a gateway on the host's loopback); False when the
        interface does not exist (yet) or this process may not change it."""
        path = Path("/proc/sys/net/ipv4/conf") / iface / "route_localnet"
        try:
            if path.read_text().strip() != "1":
                path.write_text("1\n")
        except OSError:
            return False
        return True

    def elements(self) -> dict[str, list[list[object]]]:
        """Every set and map element by name (for tests and the curious)."""
        found: dict[str, list[list[object]]] = {}
        for family, kind, name in (
            ("inet", "map", "gateway_dnat"),
            ("inet", "set", "gateway_allow"),
            ("bridge", "set", "agent_subnets"),
        ):
            try:
                out = self._nft(["-j", "list", kind, family, self.table, name], None, "list")
            except RuntimeOperationError:
                continue
            for item in json.loads(out or "{}").get("nftables", []):
                for elem in (item.get(kind) or {}).get("elem") or []:
                    found.setdefault(name, []).append(elem if isinstance(elem, list) else [elem])
        return found


__all__ = [
    "IFACE_PREFIX",
    "TABLE",
    "AgentFirewall",
    "AgentNetwork",
    "NftRunner",
    "NftTables",
    "local_nft",
    "ruleset",
]
