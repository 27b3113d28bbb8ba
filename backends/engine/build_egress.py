"""A build's way out through its proxy: the settings (``build_proxy``, ``build_proxy_allow``,
``build_proxy_max_bytes``, ``build_proxy_url``, ``base_image_aliases``) as the engines read
them, and the session that holds one build's squid
(:mod:`dockyard.backends.engine.build_proxy`) and its firewall grant
(:mod:`dockyard.backends.engine.build_firewall`) for the build's lifetime.

A session starts after the engine made the build's own network and the firewall is
applied (no firewall, no build: ``network_policy_failed``), grants that network its proxy
alone, gives the build the proxy's variables, and when the build ends stops the proxy,
revokes the grant and writes what the build fetched into its log: one line per request,
then the refused hosts and whether the byte cap was reached. The refused hosts are also
data (:attr:`EgressSession.refused`): a failed build carries them (``build_refused``).

With ``build_proxy = "attach"`` there is no squid of dockyard's: the session grants the
build's network the operator's proxy (``build_proxy_url``) alone, and its log line says
that proxy's own record and limits are the ones that hold."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dockyard.backends.engine.build_firewall import BuildFirewall, BuildGrant
from dockyard.backends.engine.build_proxy import (
    PROXY_DIR,
    ProxyRecord,
    SquidProxy,
    refused_hosts,
)
from dockyard.core.build_egress import AllowedHost, parse_allowlist, parse_proxy_url
from dockyard.core.errors import BuildFailed

if TYPE_CHECKING:
    from dockyard.core.config import Settings

log = logging.getLogger(__name__)

#: The variables tools read their proxy from (build args: never in the image's history).
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")


@dataclass(frozen=True)
class BuildNetwork:
    """One build's network: its name, host interface, bridge address and subnet."""

    name: str
    iface: str
    gateway: str
    subnet: str


@dataclass
class BuildEgressConfig:
    """What the operator set for builds' egress."""

    mode: str = "off"
    allow: list[AllowedHost] = field(default_factory=list)
    max_bytes: int = 1024 * 1024 * 1024
    binary: str = "squid"
    aliases: dict[str, str] = field(default_factory=dict)
    #: ``build_proxy = "attach"``: the operator's proxy (``build_proxy_url``).
    url: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> BuildEgressConfig:
        return cls(
            mode=settings.build_proxy,
            allow=parse_allowlist(settings.build_proxy_allow),
            max_bytes=settings.build_proxy_max_bytes,
            binary=settings.build_proxy_binary,
            aliases=dict(settings.base_image_aliases),
            url=settings.build_proxy_url,
        )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass
class EgressSession:
    """One build's proxy as the build sees it: the network it joins, the build args."""

    network: BuildNetwork
    #: The build's own squid; None when it uses the operator's proxy (``attached``).
    proxy: SquidProxy | None
    attached: AllowedHost | None = None
    records: list[ProxyRecord] = field(default_factory=list)
    used_bytes: int | None = None

    @property
    def where(self) -> AllowedHost:
        """The proxy's address and port as the build reaches them."""
        if self.attached is not None:
            return self.attached
        assert self.proxy is not None
        return AllowedHost(self.network.gateway, self.proxy.port)

    @property
    def grant(self) -> BuildGrant:
        """What the build firewall lets this build reach: its proxy, on its network."""
        network, where = self.network, self.where
        return BuildGrant(network.iface, where.host, network.subnet, where.port)

    @property
    def url(self) -> str:
        return f"http://{self.where}"

    @property
    def refused(self) -> list[str]:
        """``host:port`` of every request the proxy refused for its host (read when the
        session closes; empty before, and with the operator's proxy: its log is its own)."""
        return refused_hosts(self.records)

    def build_args(self) -> dict[str, str]:
        """The proxy for every tool, and ``NO_PROXY`` empty (nothing bypasses it)."""
        return {**dict.fromkeys(PROXY_VARIABLES, self.url), "NO_PROXY": ""}


def evidence(session: EgressSession, max_bytes: int) -> list[str]:
    """The build log's lines about its proxy: each request, then the summary."""
    if session.attached is not None:
        return [
            f"build proxy: through the operator's proxy {session.url} (build_proxy = "
            '"attach"): its own log and limits hold, dockyard keeps no record or cap'
        ]
    lines = [record.line() for record in session.records]
    total = sum(record.bytes for record in session.records)
    lines.append(
        f"build proxy: {len(session.records)} requests, {total} bytes through {session.url}"
    )
    capped = session.used_bytes is not None and session.used_bytes >= max_bytes
    if capped or any(record.too_large for record in session.records):
        lines.append(
            f"build proxy: download cap reached: more than {max_bytes} bytes "
            "(build_proxy_max_bytes): the download was stopped"
        )
    refused = session.refused
    if refused:
        lines.append("build proxy refused: " + ", ".join(refused) + " (not in build_proxy_allow)")
    return lines


@contextlib.asynccontextmanager
async def egress_session(
    config: BuildEgressConfig,
    firewall: BuildFirewall,
    network: BuildNetwork,
    state_dir: str | None,
    build_id: str,
    emit: Callable[[str], None],
    cleanup: Callable[[Coroutine[Any, Any, None]], Awaitable[None]] | None = None,
) -> AsyncIterator[EgressSession]:
    """Apply the build firewall, start the build's proxy, grant it; on the way out stop it,
    revoke the grant, and ``emit`` the evidence lines (also after a failure, also when
    cancelled: ``cleanup`` runs that to its end; default :func:`asyncio.shield`)."""
    root = Path(state_dir or "/tmp") / PROXY_DIR
    attached = parse_proxy_url(config.url or "") if config.mode == "attach" else None
    proxy = None
    if attached is None:
        proxy = SquidProxy(config.binary, root / f"{build_id}.pid", config.allow, config.max_bytes)
    session = EgressSession(network, proxy, attached)
    own = proxy is not None
    try:
        grant = session.grant
        await asyncio.to_thread(firewall.apply)
        await asyncio.to_thread(firewall.prune)
        await asyncio.to_thread(functools.partial(firewall.revoke, grant.port, grant, own=own))
        await asyncio.to_thread(firewall.grant, grant, config.max_bytes if own else None)
    except BuildFailed:
        if proxy is not None:
            proxy.remove()  # never started: only its directory to remove
        raise
    except Exception as exc:
        if proxy is not None:
            proxy.remove()
        message = getattr(exc, "message", None) or str(exc)
        raise BuildFailed(
            f"the build proxy cannot be enforced, so the build was not started: {message}",
            reason="network_policy_failed",
            log_tail=[message],
        ) from exc
    try:
        try:
            if proxy is not None:
                await asyncio.to_thread(proxy.start)
        except RuntimeError as exc:
            raise BuildFailed(
                f"the build proxy did not start, so the build was not started: {exc}",
                reason="build_proxy_failed",
                log_tail=[str(exc)],
            ) from exc
        yield session
    finally:
        closing = _close(session, firewall, config.max_bytes, emit)
        await (cleanup(closing) if cleanup is not None else asyncio.shield(closing))


async def _close(
    session: EgressSession, firewall: BuildFirewall, max_bytes: int, emit: Callable[[str], None]
) -> None:
    proxy = session.proxy
    if proxy is None:  # the operator's proxy: only the grant to revoke
        revoke = functools.partial(firewall.revoke, session.where.port, session.grant, own=False)
        await asyncio.to_thread(revoke)
    else:
        await asyncio.to_thread(proxy.stop)
        session.used_bytes = await asyncio.to_thread(firewall.used, proxy.port)
        await asyncio.to_thread(firewall.revoke, proxy.port, session.grant)
        session.records = await asyncio.to_thread(proxy.records)
        await asyncio.to_thread(proxy.remove)
    for line in evidence(session, max_bytes):
        emit(line)


__all__ = [
    "PROXY_VARIABLES",
    "BuildEgressConfig",
    "BuildNetwork",
    "EgressSession",
    "egress_session",
    "evidence",
]
