"""The agent network policy every engine applies (``ContainerSpec.egress``), and the sync of
the agent firewall (:mod:`dockyard.backends.engine.firewall`) with the engine's networks.

Containers join shared agent networks, made once and kept: one for egress ``none`` and one
per gateway (``<agent network>-gw-<hash>``). Where the engine runs rootful on this host,
the firewall is applied for every agent network before each start, and when it cannot be,
no container starts (``network_policy_failed``: fail closed). A rootless engine's bridges
are out of the firewall's reach: rootless Podman holds each agent in its own network
namespace instead (``backends/podman/rootless_net.py``), other engines report
``ROOTLESS_EGRESS_NOTE``; a gateway on the host's loopback is refused there. A container
with a gateway gets the gateway's URL at its bridge address (rootless: at the gateway's own
address) in ``OPENAI_BASE_URL`` and the spec's named variables."""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from urllib.parse import urlparse

from dockyard.backends.engine.firewall import IFACE_PREFIX, AgentFirewall, AgentNetwork
from dockyard.core.errors import RuntimeOperationError
from dockyard.core.policy import parse_gateway
from dockyard.core.runtime import LABEL_MANAGED, ContainerSpec, gateway_variables

log = logging.getLogger(__name__)

#: Labels of the agent networks: what they are, and the gateway a network's containers reach.
LABEL_NETWORK = "io.dockyard.network"
LABEL_GATEWAY = "io.dockyard.gateway"

Gateway = tuple[str, int, str]


def unix_path(url: str | None) -> str | None:
    """The socket path of a ``unix://`` URL (the engine on this host), else None."""
    parsed = urlparse(url or "")
    if parsed.scheme in ("unix", "http+unix"):
        return parsed.path
    return None


def gateway_digest(gateway: Gateway) -> str:
    """Eight hex digits naming a gateway's network and interface."""
    return hashlib.sha256(f"{gateway[0]}:{gateway[1]}".encode()).hexdigest()[:8]


@dataclass(frozen=True)
class AgentNetworkPlan:
    """The agent network a container joins: its name, its host interface, its gateway."""

    name: str
    iface: str
    gateway: Gateway | None = None

    @property
    def gateway_label(self) -> str | None:
        return None if self.gateway is None else f"{self.gateway[0]}:{self.gateway[1]}"

    @property
    def labels(self) -> dict[str, str]:
        """The labels the network is made with."""
        labels = {LABEL_MANAGED: "true", LABEL_NETWORK: "agents"}
        if self.gateway_label is not None:
            labels[LABEL_GATEWAY] = self.gateway_label
        return labels


@dataclass(frozen=True)
class EngineNetwork:
    """An agent network as the engine reports it (the parts the policy reads)."""

    name: str
    iface: str
    subnet: str
    bridge_ip: str
    labels: dict[str, str] = field(default_factory=dict)


def firewall_networks(found: list[EngineNetwork]) -> list[AgentNetwork]:
    """The engine's agent networks as the firewall sees them; foreign ones are skipped."""
    networks = []
    for network in found:
        if not network.iface.startswith(IFACE_PREFIX) or not network.subnet:
            log.warning("agent network %s is not one of ours; skipped", network.name)
            continue
        gateway = None
        label = network.labels.get(LABEL_GATEWAY) or ""
        if label:
            host, port, _ = parse_gateway(label)
            gateway = (host, port)
        networks.append(AgentNetwork(iface=network.iface, subnet=network.subnet, gateway=gateway))
    return networks


class NetworkPolicy(abc.ABC):
    """The network policy of :class:`dockyard.backends.engine.EngineRuntime`."""

    name: str
    #: The engine's name in messages (``Podman``), its CLI (``podman``), its agent network.
    title: str = ""
    agent_network: str = ""
    rootless_egress_note: str = ""
    _url: str | None
    _firewall: AgentFirewall
    _network_lock: asyncio.Lock

    @property
    @abc.abstractmethod
    def _rootless(self) -> bool: ...

    # ---------------------------------------------------------------- primitives
    @abc.abstractmethod
    def _agent_iface(self, digest: str | None) -> str:
        """The host interface of the agent network for a gateway's digest (or none)."""

    @abc.abstractmethod
    async def _get_or_create_network(self, plan: AgentNetworkPlan) -> EngineNetwork:
        """Get the network ``plan.name``, creating it from ``plan`` when missing."""

    @abc.abstractmethod
    async def _agent_networks(self) -> list[EngineNetwork]:
        """Every agent network the engine has (label ``io.dockyard.network=agents``)."""

    # ------------------------------------------------------------------ template
    def _egress_status(self) -> tuple[bool, str]:
        """Whether the agent firewall holds here (applying it), and why not."""
        if self._rootless:
            return False, self.rootless_egress_note
        if unix_path(self._url) is None:
            return False, (
                f"the {self.title} engine at {self._url} is not on this host: dockyard's agent "
                "firewall acts on this host's kernel only"
            )
        note = self._firewall.check()
        return not note, note

    def _plan(self, spec: ContainerSpec) -> AgentNetworkPlan:
        """The network ``spec`` joins, or the refusal of its policy."""
        if spec.network:
            raise RuntimeOperationError(
                f"container {spec.name!r}: the {self.name} runtime puts containers on its agent "
                "networks under their egress policy; joining a named network is not supported",
                name=spec.name,
            )
        gateway = None
        if spec.egress == "gateway":
            if not spec.gateway:
                raise RuntimeOperationError(
                    f"container {spec.name!r}: egress 'gateway' needs a gateway", name=spec.name
                )
            gateway = parse_gateway(spec.gateway)
        if not self._rootless and unix_path(self._url) is None:
            raise RuntimeOperationError(
                f"container {spec.name!r} not started: the network policy cannot be enforced: "
                f"{self._egress_status()[1]}",
                reason="network_policy_failed",
                name=spec.name,
            )
        if gateway is not None and self._rootless and gateway[0].startswith("127."):
            raise RuntimeOperationError(
                f"container {spec.name!r}: rootless {self.title} cannot reach a gateway on the "
                f"host's loopback ({gateway[0]}:{gateway[1]}); give the gateway a non-loopback "
                "address",
                reason="network_policy_failed",
                name=spec.name,
            )
        if gateway is None:
            return AgentNetworkPlan(self.agent_network, self._agent_iface(None))
        digest = gateway_digest(gateway)
        return AgentNetworkPlan(
            f"{self.agent_network}-gw-{digest}", self._agent_iface(digest), gateway
        )

    def _checked(self, plan: AgentNetworkPlan, network: EngineNetwork) -> str:
        """The bridge address of ``network``, once it is the one ``plan`` makes."""
        if (
            network.iface != plan.iface
            or network.labels.get(LABEL_GATEWAY) != plan.gateway_label
            or network.labels.get(LABEL_NETWORK) != "agents"
        ):
            raise RuntimeOperationError(
                f"network {plan.name} exists but is not the agent network dockyard makes "
                f"(interface {plan.iface}, gateway {plan.gateway_label}): remove it "
                f"({self.title.lower()} network rm {plan.name}) and dockyard makes it again",
                reason="network_policy_failed",
            )
        if not network.subnet or not network.bridge_ip:
            raise RuntimeOperationError(f"network {plan.name} has no IPv4 subnet with a gateway")
        return network.bridge_ip

    async def _sync_firewall(self) -> None:
        """Apply the agent firewall for every agent network the engine has now."""
        networks = firewall_networks(await self._agent_networks())
        await asyncio.to_thread(self._firewall.apply, networks)

    async def _agent_network(self, spec: ContainerSpec) -> tuple[AgentNetworkPlan, dict[str, str]]:
        """The network ``spec`` joins under its egress policy, and the env it gets (the
        gateway's URL); rootful, the agent firewall is applied first (fail closed)."""
        plan = self._plan(spec)
        async with self._network_lock:
            bridge_ip = self._checked(plan, await self._get_or_create_network(plan))
            if not self._rootless:
                try:
                    await self._sync_firewall()
                except RuntimeOperationError as exc:
                    raise RuntimeOperationError(
                        f"container {spec.name!r} not started: the network policy cannot be "
                        f"enforced: {exc.message}",
                        reason="network_policy_failed",
                        name=spec.name,
                    ) from exc
        env: dict[str, str] = {}
        if plan.gateway is not None:
            host, port, path = plan.gateway
            address = f"{host}:{port}" if self._rootless else f"{bridge_ip}:{port}"
            env.update(gateway_variables(spec, f"http://{address}{path}"))
        return plan, env

    async def _route_gateway(self, plan: AgentNetworkPlan) -> None:
        """Let the bridge of a gateway network route 127/8 (a gateway on the host's
        loopback); the bridge may appear only with its first container, so after start."""
        if plan.gateway is None or self._rootless:
            return
        routed = await asyncio.to_thread(self._firewall.route_localnet, plan.iface)
        if not routed and plan.gateway[0].startswith("127."):
            log.warning("route_localnet not set on %s: the gateway may not answer", plan.iface)


__all__ = [
    "LABEL_GATEWAY",
    "LABEL_NETWORK",
    "AgentNetworkPlan",
    "EngineNetwork",
    "NetworkPolicy",
    "firewall_networks",
    "gateway_digest",
    "unix_path",
]
