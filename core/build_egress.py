"""What an operator allows a build to fetch, engine-neutral: the build proxy's allowlist
(``build_proxy_allow``: ``host:port`` entries) and the base image aliases
(``base_image_aliases``: the names ``FROM`` lines use, mapped to local images).

The engines enforce both (``backends/engine/build_proxy.py``, ``backends/engine/build.py``);
the settings validate them here so a bad entry is a configuration error naming it."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: A DNS name (labels of letters, digits and hyphens) or an IPv4 address.
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*$")
_DOCKER_HUB = ("docker.io/library/", "docker.io/", "index.docker.io/library/")


@dataclass(frozen=True)
class AllowedHost:
    """One allowlist entry: a host name or IPv4 address, and the one port it may be
    reached on (plain HTTP or HTTPS ``CONNECT`` alike)."""

    host: str
    port: int

    @property
    def is_address(self) -> bool:
        """Whether the entry names an IP address (then private ranges are allowed for it:
        the operator named the address)."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_allowlist(entries: Iterable[str]) -> list[AllowedHost]:
    """``["pypi.example:443", "10.0.0.5:8080"]`` as :class:`AllowedHost` entries.

    :raises ValueError: naming the entry that is not ``host:port``.
    """
    found: list[AllowedHost] = []
    for entry in entries:
        host, sep, port = str(entry).strip().rpartition(":")
        host = host.lower().rstrip(".")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not _HOST.match(host):
            raise ValueError(
                f"build_proxy_allow entry {entry!r} must be host:port (a DNS name or an IPv4 "
                "address, and a port 1-65535)"
            )
        allowed = AllowedHost(host, int(port))
        if allowed not in found:
            found.append(allowed)
    return found


def parse_proxy_url(url: str) -> AllowedHost:
    """``build_proxy_url`` (``http://10.0.0.5:3128``) as the address and port builds may
    reach. An IPv4 address, not a name (builds have no DNS, and the firewall grants an
    address); not loopback or unspecified (a build's network cannot reach the host's
    loopback).

    :raises ValueError: naming ``build_proxy_url`` and what is wrong.
    """
    scheme, sep, rest = url.strip().partition("://")
    host, colon, port = rest.rstrip("/").rpartition(":")
    why = ""
    if scheme != "http" or not sep or not colon or not port.isdigit():
        why = "it must be http://<IPv4 address>:<port>"
    elif not 0 < int(port) < 65536:
        why = "the port must be 1-65535"
    else:
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            why = "the host must be an IPv4 address (builds have no DNS)"
        else:
            if address.is_loopback or address.is_unspecified:
                why = "a build's network cannot reach the host's loopback; use another address"
    if why:
        raise ValueError(f'build_proxy_url {url!r} (build_proxy = "attach"): {why}')
    return AllowedHost(host, int(port))


def normalize_image(ref: str) -> str:
    """An image name as an alias key: Docker Hub's implicit prefixes dropped, ``:latest``
    added when no tag or digest is given (``docker.io/library/python`` -> ``python:latest``)."""
    name = ref.strip()
    for prefix in _DOCKER_HUB:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    last = name.rsplit("/", 1)[-1]
    if "@" not in name and ":" not in last:
        name += ":latest"
    return name


def resolve_alias(ref: str, aliases: Mapping[str, str]) -> str | None:
    """The local image ``ref`` is an alias of, or None when the table does not name it."""
    wanted = normalize_image(ref)
    for name, image in aliases.items():
        if normalize_image(name) == wanted:
            return image
    return None


__all__ = ["AllowedHost", "normalize_image", "parse_allowlist", "parse_proxy_url", "resolve_alias"]
