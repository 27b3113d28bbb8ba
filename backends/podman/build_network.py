"""Podman's build network for the build proxy (``build_proxy = "squid"``): one bridge
network, ``dockyard-build`` on host interface ``dyb0``, made once and kept (as the agent
networks are), without DNS (nothing answers on the bridge but the proxy), that ``RUN``
steps join through the build endpoint's ``nsoptions`` (a network *name* as the network
namespace's path: Podman 4.3 verified). The build firewall
(:mod:`dockyard.backends.engine.build_firewall`) holds it to the build's proxy.

Refused, with the reason, where that cannot hold: rootless Podman (its bridges live in
its own network namespace, out of the host firewall's reach) and an engine on another
host."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Self

from dockyard.backends.engine.build_egress import BuildEgressConfig, BuildNetwork
from dockyard.backends.engine.build_firewall import BUILD_IFACE
from dockyard.backends.engine.build_proxy import reap_leftovers
from dockyard.backends.engine.network import LABEL_NETWORK, unix_path
from dockyard.core.errors import BuildFailed
from dockyard.core.runtime import LABEL_MANAGED

if TYPE_CHECKING:
    from collections.abc import Callable

    from dockyard.core.config import Settings

log = logging.getLogger(__name__)

BUILD_NETWORK = "dockyard-build"


class PodmanBuildNetwork:
    """The build network primitives of :class:`dockyard.backends.podman.PodmanRuntime`."""

    client: Any
    options: Any
    _url: str | None
    _call: Callable[..., Any]
    _check: Callable[..., bool]
    build_egress: BuildEgressConfig

    def with_build_proxy(self, settings: Settings) -> Self:
        """Take the build proxy and base image settings; stop the proxies a killed
        dockyard left in this data directory. Returns the runtime."""
        self.build_egress = BuildEgressConfig.from_settings(settings)
        if self.build_egress.enabled:
            stopped = reap_leftovers(self.options.state_dir)
            if stopped:
                log.warning("stopped %d build proxies a previous dockyard left", stopped)
        return self

    def _build_network_sync(self) -> dict[str, Any]:
        # raw: podman-py's networks.create() has no network_interface.
        resp = self.client.api.get(f"/networks/{BUILD_NETWORK}/json")
        if resp.status_code == 404:
            created = self.client.api.post(
                "/networks/create",
                data=_network_body(),
                headers={"Content-Type": "application/json"},
            )
            if created.status_code not in (200, 201, 409):
                self._check(created, f"creating the build network {BUILD_NETWORK}")
            resp = self.client.api.get(f"/networks/{BUILD_NETWORK}/json")
        self._check(resp, f"preparing the build network {BUILD_NETWORK}")
        return dict(resp.json())

    async def _build_network(self) -> BuildNetwork:
        if self._rootless:
            raise BuildFailed(
                "build_proxy is set but rootless Podman's build network is out of the host "
                "firewall's reach, so builds are refused (run Podman rootful)",
                reason="network_policy_failed",
            )
        if unix_path(self._url) is None:
            raise BuildFailed(
                f"build_proxy is set but the Podman engine at {self._url} is not on this "
                "host: the build firewall acts on this host's kernel only, so builds are "
                "refused",
                reason="network_policy_failed",
            )
        found = await self._call(self._build_network_sync)
        subnet = (found.get("subnets") or [{}])[0]
        network = BuildNetwork(
            name=BUILD_NETWORK,
            iface=str(found.get("network_interface") or ""),
            gateway=str(subnet.get("gateway") or ""),
            subnet=str(subnet.get("subnet") or ""),
        )
        labels = found.get("labels") or {}
        if network.iface != BUILD_IFACE or labels.get(LABEL_NETWORK) != "build":
            raise BuildFailed(
                f"network {BUILD_NETWORK} exists but is not the build network dockyard makes "
                f"(interface {BUILD_IFACE}): remove it (podman network rm {BUILD_NETWORK}) "
                "and dockyard makes it again",
                reason="network_policy_failed",
            )
        if not network.gateway or not network.subnet:
            raise BuildFailed(
                f"network {BUILD_NETWORK} has no IPv4 subnet with a gateway",
                reason="network_policy_failed",
            )
        return network


def _network_body() -> str:
    import json

    return json.dumps(
        {
            "name": BUILD_NETWORK,
            "driver": "bridge",
            "network_interface": BUILD_IFACE,
            "dns_enabled": False,
            "ipv6_enabled": False,
            "labels": {LABEL_MANAGED: "true", LABEL_NETWORK: "build"},
        }
    )


__all__ = ["BUILD_NETWORK", "PodmanBuildNetwork"]
