"""Podman's build networks for the build proxy (``build_proxy = "squid"``): one bridge
network per build, ``dockyard-build-<build>`` on host interface ``dyb<build>``, without
DNS (nothing answers on the bridge but the proxy), that the build's ``RUN`` steps join
through the build endpoint's ``nsoptions`` (a network *name* as the network namespace's
path: Podman 4.3 verified), removed when the build ends. The build firewall
(:mod:`dockyard.backends.engine.build_firewall`) holds each to its own build's proxy, so
concurrent builds never reach each other's proxies (another log, another byte cap).

Each network is labelled with this data directory's scope; the first build of a dockyard
removes the build networks a killed one left (its own scope only: other dockyards on the
host keep theirs).

Refused, with the reason, where that cannot hold: rootless Podman (its bridges live in
its own network namespace, out of the host firewall's reach) and an engine on another
host."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any, Self

from dockyard.backends.engine.build_egress import BuildEgressConfig, BuildNetwork
from dockyard.backends.engine.build_firewall import IFACE_PREFIX
from dockyard.backends.engine.build_proxy import reap_leftovers
from dockyard.backends.engine.network import LABEL_NETWORK, unix_path
from dockyard.core.errors import BuildFailed
from dockyard.core.runtime import LABEL_MANAGED

if TYPE_CHECKING:
    from collections.abc import Callable

    from dockyard.core.config import Settings

log = logging.getLogger(__name__)

#: What every build network's name starts with (then the build's id).
BUILD_NETWORK_PREFIX = "dockyard-build-"
#: The label naming the data directory (hashed) whose dockyard made a build network.
LABEL_BUILD_SCOPE = "io.dockyard.build.scope"


def build_network_name(build_id: str) -> str:
    return f"{BUILD_NETWORK_PREFIX}{build_id[:12]}"


def build_iface(build_id: str) -> str:
    """``dyb`` and 11 hex digits of the build id: within Linux's 15 characters."""
    return f"{IFACE_PREFIX}{build_id[:11]}"


class PodmanBuildNetwork:
    """The build network primitives of :class:`dockyard.backends.podman.PodmanRuntime`."""

    client: Any
    options: Any
    _url: str | None
    _call: Callable[..., Any]
    _check: Callable[..., bool]
    build_egress: BuildEgressConfig
    _build_networks_reaped: asyncio.Lock | None = None

    def with_build_proxy(self, settings: Settings) -> Self:
        """Take the build proxy and base image settings; stop the proxies a killed
        dockyard left in this data directory. Returns the runtime."""
        self.build_egress = BuildEgressConfig.from_settings(settings)
        if self.build_egress.enabled:
            stopped = reap_leftovers(self.options.state_dir)
            if stopped:
                log.warning("stopped %d build proxies a previous dockyard left", stopped)
        return self

    @property
    def build_scope(self) -> str:
        """This data directory, hashed: the scope label of the build networks it makes."""
        return hashlib.sha256(str(self.options.state_dir or "").encode()).hexdigest()[:12]

    def _create_build_network_sync(self, build_id: str) -> dict[str, Any]:
        # raw: podman-py's networks.create() has no network_interface.
        name = build_network_name(build_id)
        created = self.client.api.post(
            "/networks/create",
            data=_network_body(name, build_iface(build_id), self.build_scope),
            headers={"Content-Type": "application/json"},
        )
        self._check(created, f"creating the build network {name}")
        resp = self.client.api.get(f"/networks/{name}/json")
        self._check(resp, f"inspecting the build network {name}")
        return dict(resp.json())

    def _remove_build_network_sync(self, name: str) -> None:
        # force: a RUN step a killed build left attached goes with it (it is the build's).
        resp = self.client.api.delete(f"/networks/{name}", params={"force": True})
        if resp.status_code not in (200, 204, 404):
            log.warning("removing the build network %s: HTTP %s", name, resp.status_code)

    def _reap_build_networks_sync(self) -> int:
        """Remove the build networks of this data directory that a killed dockyard left
        (called before this dockyard makes its first)."""
        if not self.options.state_dir:
            return 0  # no scope of its own: leave every network alone
        labels = [f"{LABEL_NETWORK}=build", f"{LABEL_BUILD_SCOPE}={self.build_scope}"]
        resp = self.client.api.get(
            "/networks/json", params={"filters": json.dumps({"label": labels})}
        )
        self._check(resp, "listing build networks")
        names = [str(n.get("name")) for n in resp.json() or []]
        names = [name for name in names if name.startswith(BUILD_NETWORK_PREFIX)]
        for name in names:
            self._remove_build_network_sync(name)
        return len(names)

    async def _reap_build_networks(self) -> None:
        if self._build_networks_reaped is None:
            self._build_networks_reaped = asyncio.Lock()
            async with self._build_networks_reaped:
                try:
                    removed = await self._call(self._reap_build_networks_sync)
                except Exception as exc:  # not this build's concern: it makes its own
                    log.warning("removing leftover build networks failed: %s", exc)
                    return
                if removed:
                    log.warning("removed %d build networks a previous dockyard left", removed)
        else:
            async with self._build_networks_reaped:
                pass

    async def _build_network(self, build_id: str) -> BuildNetwork:
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
        await self._reap_build_networks()
        name = build_network_name(build_id)
        found = await self._call(self._create_build_network_sync, build_id)
        subnet = (found.get("subnets") or [{}])[0]
        network = BuildNetwork(
            name=name,
            iface=str(found.get("network_interface") or ""),
            gateway=str(subnet.get("gateway") or ""),
            subnet=str(subnet.get("subnet") or ""),
        )
        if network.iface != build_iface(build_id) or not network.gateway or not network.subnet:
            await self._drop_build_network(network)
            raise BuildFailed(
                f"network {name} was made without interface {build_iface(build_id)} or an "
                "IPv4 subnet with a gateway, so the build firewall cannot hold it",
                reason="network_policy_failed",
            )
        return network

    async def _drop_build_network(self, network: BuildNetwork) -> None:
        try:
            await self._call(self._remove_build_network_sync, network.name)
        except Exception as exc:  # the next dockyard's first build removes it
            log.warning("removing the build network %s failed: %s", network.name, exc)


def _network_body(name: str, iface: str, scope: str) -> str:
    return json.dumps(
        {
            "name": name,
            "driver": "bridge",
            "network_interface": iface,
            "dns_enabled": False,
            "ipv6_enabled": False,
            "labels": {
                LABEL_MANAGED: "true",
                LABEL_NETWORK: "build",
                LABEL_BUILD_SCOPE: scope,
            },
        }
    )


__all__ = [
    "BUILD_NETWORK_PREFIX",
    "LABEL_BUILD_SCOPE",
    "PodmanBuildNetwork",
    "build_iface",
    "build_network_name",
]
