"""The Podman networks garbage collection may remove (``Runtime.list_networks`` and
``remove_network``, the ``networks`` kind of :mod:`dockyard.core.gc`).

Two kinds of network pile up on a host and nothing else removes them:

* the agent networks for a gateway, ``<agent network>-gw-<hash>`` (label
  ``io.dockyard.network=agents`` with ``io.dockyard.gateway``): made once per distinct
  gateway and kept (removing networks while containers start disturbs netavark 4.3, see
  ``PodmanRuntime._network_sync``), so every gateway a host ever had keeps its bridge;
* the build networks of this data directory, ``dockyard-build-<build>`` (label
  ``io.dockyard.network=build`` and this directory's ``io.dockyard.build.scope``), that a
  killed build left (a build removes its own; the first build of the next dockyard removes
  the others, but only if one runs).

Only this runtime's names are listed (its ``agent_network`` prefix, its build scope, and
``[plugins.podman] gc_network_prefix`` when set: a test's gc sees its own networks only);
the shared ``dockyard-agents`` network (egress ``none``) and other dockyards' build
networks never are. A network counts the containers that joined it (any state). Removal
happens under the runtime's network lock and without ``force``, so Podman refuses it when
a container joined meanwhile. What remains: a container being created for a network that
was found just before its removal fails to start (``core/gc.py`` never removes the
configured gateway's network, so only another dockyard with another gateway can meet
this, and its next deploy makes the network again).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from dockyard.backends.engine.network import LABEL_GATEWAY, LABEL_NETWORK
from dockyard.backends.podman.build_network import BUILD_NETWORK_PREFIX, LABEL_BUILD_SCOPE
from dockyard.core.errors import RuntimeOperationError
from dockyard.core.runtime import LABEL_MANAGED, NetworkInfo


def created_at(text: str | None) -> float:
    """Epoch seconds of libpod's ``created`` (RFC 3339, nanoseconds); 0 when unreadable."""
    if not text:
        return 0.0
    # Python reads at most microseconds: cut the fraction to six digits
    stamp = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return 0.0


class PodmanNetworkGc:
    """The garbage-collection side of :class:`dockyard.backends.podman.PodmanRuntime`'s
    networks."""

    client: Any
    options: Any
    agent_network: str
    build_scope: str
    _network_lock: asyncio.Lock
    _call: Callable[..., Any]
    _check: Callable[..., bool]

    def _collectable(self, network: dict[str, Any]) -> bool:
        name, labels = str(network.get("name") or ""), network.get("labels") or {}
        if labels.get(LABEL_MANAGED) != "true" or not name.startswith(
            self.options.gc_network_prefix
        ):
            return False
        if labels.get(LABEL_NETWORK) == "agents":
            return bool(labels.get(LABEL_GATEWAY)) and name.startswith(f"{self.agent_network}-gw-")
        return (
            labels.get(LABEL_NETWORK) == "build"
            and bool(self.options.state_dir)  # no scope of its own: leave them all alone
            and labels.get(LABEL_BUILD_SCOPE) == self.build_scope
            and name.startswith(BUILD_NETWORK_PREFIX)
        )

    def _joined(self) -> dict[str, int]:
        """How many containers (any state) joined each network."""
        resp = self.client.api.get("/containers/json", params={"all": True})
        self._check(resp, "listing containers")
        counts: dict[str, int] = {}
        for container in resp.json() or []:
            for name in container.get("Networks") or []:
                counts[name] = counts.get(name, 0) + 1
        return counts

    def _list_networks_sync(self) -> list[NetworkInfo]:
        filters = json.dumps({"label": [f"{LABEL_MANAGED}=true"]})
        resp = self.client.api.get("/networks/json", params={"filters": filters})
        self._check(resp, "listing networks")
        found = [n for n in resp.json() or [] if self._collectable(n)]
        joined = self._joined() if found else {}
        return [
            NetworkInfo(
                name=str(n["name"]),
                created=created_at(n.get("created")),
                containers=joined.get(str(n["name"]), 0),
                gateway=(n.get("labels") or {}).get(LABEL_GATEWAY),
                labels=dict(n.get("labels") or {}),
            )
            for n in found
        ]

    async def list_networks(self) -> list[NetworkInfo]:
        """This runtime's gateway networks and this data directory's build networks."""
        return list(await self._call(self._list_networks_sync))

    def _remove_network_sync(self, name: str) -> None:
        if self._joined().get(name):
            raise RuntimeOperationError(f"network {name}: a container joined it meanwhile")
        resp = self.client.api.delete(f"/networks/{name}")  # no force: a joined one stays
        self._check(resp, f"removing the network {name}", ok_missing=True)

    async def remove_network(self, name: str) -> None:
        """Remove ``name`` unless a container joined it (the agent firewall's elements of a
        removed network go with the next start, which applies exactly the networks left)."""
        async with self._network_lock:
            await self._call(self._remove_network_sync, name)


__all__ = ["PodmanNetworkGc", "created_at"]
