"""The agent network policy under rootless Podman: nftables in each agent's own network
namespace, applied before its process runs.

Rootless Podman puts agent containers on bridges inside its own "rootless network
namespace", whose traffic leaves through slirp4netns: the host's firewall
(:mod:`dockyard.backends.engine.firewall`) never sees it, so without more an agent reaches
the internet, the host's non-loopback addresses and other agents. Rules in that rootless
namespace would not hold either: Podman removes it when its last container stops and makes
a new, empty one for the next (verified with Podman 4.3.1), so every start would race
another container's stop. Instead each agent container's *own* network namespace gets the
table, in the order

    create -> init -> ``nft -f`` in the container's network namespace -> start

``init`` (``POST /containers/{id}/init``) makes the namespace, joins the bridge and sets up
the published port while runc holds the agent's process before it runs, so the process
never runs without the rules, and they live exactly as long as the namespace does.

The table ``inet dockyard`` (:func:`agent_ruleset`), IPv4 and IPv6:

* ``output``: loopback, packets of connections made *to* the agent (replies on its
  published port, which rootlessport connects to through the bridge) and, for egress
  ``gateway``, TCP to the gateway's own address and port; everything else is rejected
  (admin-prohibited): the internet, the host's addresses (through slirp4netns), other
  agents, slirp4netns' gateway and DNS;
* ``input``: loopback, those replies and new TCP connections to the container port; the
  rest is dropped.

The agent's processes have no capabilities (``--cap-drop=ALL``), so they cannot change the
table: nftables in a network namespace take CAP_NET_ADMIN in the user namespace that owns
it (Podman's). Who enters the namespace (:class:`AgentNetns`): root with
``nsenter -t <pid> -n``; the engine's own user through ``podman unshare`` (root of Podman's
user namespace), then ``nsenter``. A dockyard running as another unprivileged user cannot,
and then the policy is reported as not enforced (:meth:`AgentNetns.check`).

A gateway is reached at its own address (slirp4netns connects from the host), so it must be
one of the host's non-loopback addresses: Podman starts slirp4netns with
``--disable-host-loopback``, and a gateway on the host's loopback is refused.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dockyard.backends.engine.network import AgentNetworkPlan, unix_path
from dockyard.core.errors import RuntimeOperationError
from dockyard.core.runtime import ContainerSpec

if TYPE_CHECKING:
    from podman import PodmanClient

#: What the policy is under rootless Podman; the reason it cannot hold follows it.
ROOTLESS_EGRESS_NOTE = (
    "The network policy is not enforced by rootless Podman here: agent containers share a "
    "bridge inside rootless Podman's own network namespace, whose traffic leaves through "
    "slirp4netns, so they can reach the internet, the host's non-loopback addresses and "
    "each other."
)
TABLE = "dockyard"


def agent_ruleset(container_port: int, gateway: tuple[str, int] | None) -> str:
    """The table of one agent's network namespace, as one ``nft -f`` transaction."""
    t = f"inet {TABLE}"
    lines = [
        f"add table {t}",
        f"add chain {t} output {{ type filter hook output priority filter - 10; policy accept; }}",
        f"add chain {t} input {{ type filter hook input priority filter - 10; policy accept; }}",
        f"flush chain {t} output",
        f"flush chain {t} input",
        f'add rule {t} output oifname "lo" accept',
        f"add rule {t} output ct state established,related accept",
    ]
    if gateway is not None:
        ip, port = gateway
        lines.append(f"add rule {t} output ip daddr {ip} tcp dport {int(port)} accept")
    lines += [
        f"add rule {t} output counter reject with icmpx type admin-prohibited",
        f'add rule {t} input iifname "lo" accept',
        f"add rule {t} input ct state established,related accept",
        f"add rule {t} input tcp dport {int(container_port)} accept",
        f"add rule {t} input counter drop",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class AgentRules:
    """What one agent's table lets through: its container port and its gateway."""

    container_port: int
    gateway: tuple[str, int] | None = None


class AgentNetns:
    """Runs ``nft`` in an agent container's network namespace (module docstring)."""

    def __init__(
        self,
        podman_path: str = "podman",
        nft_path: str = "nft",
        *,
        timeout_s: float = 20.0,
    ) -> None:
        self.podman_path = podman_path
        self.nft_path = nft_path
        self.timeout_s = timeout_s

    @property
    def as_root(self) -> bool:
        return os.geteuid() == 0

    @staticmethod
    def _binary(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            raise RuntimeOperationError(
                f"{name}: not found (install it: contrib/ci/setup-podman.sh)",
                reason="network_policy_failed",
            )
        return path

    def _prefix(self, tool: str, *args: str) -> list[str]:
        """``tool`` (``nsenter`` or ``unshare``, which switch network namespace) run so that
        it may: as root, or as root of Podman's user namespace (``podman unshare``)."""
        if self.as_root:
            return [self._binary(tool), *args]
        return [self._binary(self.podman_path), "unshare", self._binary(tool), *args]

    def _run(self, argv: list[str], stdin: str, what: str) -> str:
        try:
            proc = subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=self.timeout_s
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeOperationError(f"{what}: {exc}", reason="network_policy_failed") from exc
        if proc.returncode != 0:
            detail = proc.stderr.strip() or f"exit code {proc.returncode}"
            raise RuntimeOperationError(f"{what}: {detail}", reason="network_policy_failed")
        return proc.stdout

    def apply(self, pid: int, rules: AgentRules) -> None:
        """Load the agent's table into the network namespace of process ``pid``."""
        nft = self._binary(self.nft_path)
        argv = [*self._prefix("nsenter", "-t", str(pid), "-n"), nft, "-f", "-"]
        self._run(
            argv,
            agent_ruleset(rules.container_port, rules.gateway),
            "the agent's network policy could not be applied",
        )

    def listing(self, pid: int) -> str:
        """The table in the network namespace of ``pid`` (for tests and the curious)."""
        nft = self._binary(self.nft_path)
        argv = [*self._prefix("nsenter", "-t", str(pid), "-n"), nft, "list", "table"]
        return self._run([*argv, "inet", TABLE], "", "listing the agent's network policy")

    def check(self, engine_url: str | None) -> str:
        """Why the policy cannot hold for the rootless engine at ``engine_url``, or "".

        Loads the table into a throwaway network namespace the way :meth:`apply` would
        (proving ``nft``, the kernel's nftables and, for a user, ``podman unshare``)."""
        path = unix_path(engine_url)
        if path is None:
            return f"the engine at {engine_url} is not on this host"
        try:
            owner = os.stat(path).st_uid
        except OSError as exc:
            return f"cannot read the owner of the engine's socket {path}: {exc.strerror}"
        if not self.as_root and owner != os.geteuid():
            return (
                f"the engine's socket {path} belongs to uid {owner}, and dockyard runs as uid "
                f"{os.geteuid()}: only root or the engine's own user can enter its agents' "
                "network namespaces"
            )
        return self.probe()

    def probe(self) -> str:
        """Load the table into a throwaway network namespace, entered as :meth:`apply`
        enters an agent's: why that fails, or ""."""
        try:
            nft = self._binary(self.nft_path)
            argv = [*self._prefix("unshare", "--net"), nft, "-f", "-"]
            self._run(argv, agent_ruleset(80, ("192.0.2.1", 80)), "nftables do not work")
        except RuntimeOperationError as exc:
            return exc.message
        return ""


class RootlessNetPolicy:
    """The rootless half of :class:`dockyard.backends.podman.PodmanRuntime`'s network
    policy: a mixin over its ``_egress_status`` and ``_created``; its ``_start`` calls
    :meth:`_before_start` first."""

    client: PodmanClient
    _url: str | None
    options: Any
    _rootless_egress: tuple[bool, str] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The rules of containers created and not started yet, by id.
        self._pending_rules: dict[str, AgentRules] = {}

    @property
    def agent_netns(self) -> AgentNetns:
        return AgentNetns(self.options.podman_path, self.options.nft_path)

    def _egress_status(self) -> tuple[bool, str]:
        if not self._rootless:  # type: ignore[attr-defined]
            return super()._egress_status()  # type: ignore[misc]
        why = self.agent_netns.check(self._url)
        status = (not why, f"{ROOTLESS_EGRESS_NOTE} Why: {why}" if why else "")
        self._rootless_egress = status
        return status

    async def _created(
        self, spec: ContainerSpec, plan: AgentNetworkPlan, env: dict[str, str]
    ) -> str:
        container_id: str = await super()._created(spec, plan, env)  # type: ignore[misc]
        if self._rootless:  # type: ignore[attr-defined]
            gateway = None if plan.gateway is None else (plan.gateway[0], plan.gateway[1])
            self._pending_rules[container_id] = AgentRules(spec.container_port, gateway)
        return container_id

    async def _before_start(self, container_id: str) -> None:
        """Hold a rootless agent to its policy before its process runs (the runtime's
        ``_start`` calls this first)."""
        rules = self._pending_rules.pop(container_id, None)
        if rules is None:
            return
        if self._rootless_egress is None:
            await asyncio.to_thread(self._egress_status)
        if self._rootless_egress is not None and self._rootless_egress[0]:
            await self._hold(container_id, rules)

    async def _hold(self, container_id: str, rules: AgentRules) -> None:
        """Initialise the container (its namespace exists, its process does not run yet)
        and load its table there; fail closed."""
        call = self._call  # type: ignore[attr-defined]
        resp = await call(self.client.api.post, f"/containers/{container_id}/init")
        if resp.status_code not in (204, 304):
            self._check(resp, f"initialising container {container_id[:12]}")  # type: ignore[attr-defined]
        attrs = await self._inspect_attrs(container_id) or {}  # type: ignore[attr-defined]
        pid = int((attrs.get("State") or {}).get("Pid") or 0)
        if pid <= 0:
            raise RuntimeOperationError(
                f"container {container_id[:12]} has no process after init: its network "
                "namespace cannot be entered",
                reason="network_policy_failed",
            )
        await asyncio.to_thread(self.agent_netns.apply, pid, rules)


__all__ = [
    "ROOTLESS_EGRESS_NOTE",
    "TABLE",
    "AgentNetns",
    "AgentRules",
    "RootlessNetPolicy",
    "agent_ruleset",
]
