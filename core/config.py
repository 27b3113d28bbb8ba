"""Operator configuration: defaults, an optional TOML file, then ``DOCKYARD_*`` variables.

Precedence, lowest first: built-in defaults, the file named by ``--config`` or
``DOCKYARD_CONFIG``, environment variables (``DOCKYARD_PORT=9000``), command-line flags.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tomllib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from dockyard.core.errors import ConfigError
from dockyard.core.models import Model

log = logging.getLogger(__name__)

_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
#: Deprecated top-level prefixes of plugin options, read for one release: a setting
#: ``<prefix><option>`` becomes option ``<option>`` of ``[plugins.<plugin>]``.
LEGACY_OPTION_PREFIXES = {"eval_": "evaluation"}
#: Deprecated top-level settings that became a plugin's option under another name, read
#: for one release the same way: setting -> (plugin, option).
LEGACY_OPTION_NAMES = {
    "gc_evaluations_max_age_days": ("evaluation", "gc_max_age_days"),
    "gc_evaluations_max_mb": ("evaluation", "gc_max_mb"),
}
_warned_legacy: set[str] = set()


def default_data_dir() -> str:
    """Where state lives when nothing says otherwise."""
    if os.geteuid() == 0:
        return "/var/lib/dockyard"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "dockyard")


class Settings(Model):
    """Everything an operator can set. Per-plugin options live under ``plugins.<name>``."""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 8800
    data_dir: str = msgspec.field(default_factory=default_data_dir)
    runtime: str = "podman"
    store: str = "sqlite"
    router: str = "none"
    strategy: str = "bluegreen"
    # Above Linux's default ephemeral range (32768-60999), where the kernel picks the local
    # ports of outgoing connections: a lease there can find its port taken.
    port_range_start: Annotated[int, Meta(ge=1024, le=65535)] = 61000
    port_range_end: Annotated[int, Meta(ge=1024, le=65535)] = 61999
    podman_socket: str | None = None
    require_limits: bool = False
    # Refuse to run when the engine cannot hold agents to their network policy.
    require_egress: bool = False
    api_tokens: list[dict[str, Any]] = []
    allowed_clients: list[str] = []
    trusted_proxies: list[str] = []
    rate_limit_per_ip: Annotated[int, Meta(ge=0)] = 600
    rate_limit_per_token: Annotated[int, Meta(ge=0)] = 300
    rate_limit_window: Literal["second", "minute", "hour"] = "minute"
    monitor_interval_s: Annotated[float, Meta(ge=0, le=3600)] = 5.0
    router_watch_interval_s: Annotated[float, Meta(ge=0, le=3600)] = 2.0
    allow_build_network: bool = False
    # The build egress proxy (backends/engine/build_proxy.py): "squid" gives builds network
    # through one squid per build that reaches only ``build_proxy_allow`` (host:port
    # entries, empty by default), at most ``build_proxy_max_bytes`` per build; "attach"
    # gives them the operator's own proxy at ``build_proxy_url`` (http://<IPv4>:<port>)
    # and nothing else (no per-build log or byte cap: that proxy's own policy holds).
    build_proxy: Literal["off", "squid", "attach"] = "off"
    build_proxy_url: str | None = None
    build_proxy_allow: list[str] = []
    build_proxy_max_bytes: Annotated[int, Meta(ge=1024)] = 1024 * 1024 * 1024
    build_proxy_binary: str = "squid"
    # ``FROM`` names mapped to local images (``python:3.11-slim`` -> ``localhost/base:x``).
    base_image_aliases: dict[
        Annotated[str, Meta(min_length=1, max_length=255)],
        Annotated[str, Meta(min_length=1, max_length=255)],
    ] = {}
    build_timeout_s: Annotated[float, Meta(gt=0, le=7200)] = 900.0
    build_memory_mb: Annotated[int, Meta(ge=64)] = 2048
    build_cpus: Annotated[float, Meta(gt=0)] = 2.0
    # Caps on what a container may use; a deployment's resources can only lower them.
    max_memory_mb: Annotated[int, Meta(ge=16, le=65536)] = 2048
    max_cpus: Annotated[float, Meta(gt=0, le=64)] = 2.0
    max_pids: Annotated[int, Meta(ge=16, le=32768)] = 768
    max_tmpfs_mb: Annotated[int, Meta(ge=1, le=4096)] = 256
    # Seconds any container may run (a deployment's max_lifetime_s can only lower it).
    max_container_lifetime_s: Annotated[float, Meta(gt=0)] | None = None
    allowed_base_images: list[str] = []
    allowed_git_hosts: list[str] = msgspec.field(default_factory=lambda: ["github.com"])
    insecure_sources: bool = False
    local_repos: list[str] = []
    fetch_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 120.0
    fetch_max_bytes: Annotated[int, Meta(ge=1024)] = 50 * 1024 * 1024
    fetch_max_files: Annotated[int, Meta(ge=1)] = 2000
    # The LLM gateway agents may reach (the only address besides their own), passed to
    # evaluated agents as env ``eval_gateway_env``; provider keys are never passed.
    agent_gateway: str | None = None
    # Deprecated (one release): the evaluation plugin's options, now ``[plugins.evaluation]``
    # without the ``eval_`` prefix. Set, they are moved there (see ``_move_legacy_options``).
    eval_max_builds: Annotated[int, Meta(ge=1, le=64)] | UnsetType = UNSET
    eval_max_agents: Annotated[int, Meta(ge=1, le=256)] | UnsetType = UNSET
    eval_request_timeout_s: Annotated[float, Meta(gt=0, le=600)] | UnsetType = UNSET
    eval_task_timeout_s: Annotated[float, Meta(gt=0, le=3600)] | UnsetType = UNSET
    eval_tasks_per_agent: Annotated[int, Meta(ge=1, le=64)] | UnsetType = UNSET
    eval_max_steps: Annotated[int, Meta(ge=1, le=100)] | UnsetType = UNSET
    eval_health_deadline_s: Annotated[float, Meta(gt=0, le=1800)] | UnsetType = UNSET
    eval_session_ttl_s: Annotated[float, Meta(gt=0, le=86400)] | UnsetType = UNSET
    eval_max_lifetime_s: Annotated[float, Meta(gt=0, le=86400)] | UnsetType = UNSET
    eval_keep_images: bool | UnsetType = UNSET
    eval_gateway_env: Annotated[str, Meta(pattern=_ENV_NAME)] | UnsetType = UNSET
    eval_gateway_vars: (
        dict[
            Annotated[str, Meta(pattern=_ENV_NAME)],
            Annotated[str, Meta(pattern=r"^(/[A-Za-z0-9._~/-]{0,255})?$")],
        ]
        | UnsetType
    ) = UNSET
    eval_sandbox_image: Annotated[str, Meta(max_length=255)] | UnsetType | None = UNSET
    disable_plugins: list[str] = []
    log_level: str = "INFO"
    #: ``text`` for people, ``json`` for one JSON object per line (``core/logs.py``).
    log_format: Literal["text", "json"] = "text"
    # Garbage collection (core/gc.py): the server's pass every gc_interval_s (0: never;
    # ``dockyard gc`` still runs one). Per kind, entries older than gc_<kind>_max_age_days
    # go, then the oldest until the kind fits gc_<kind>_max_mb; 0: no such limit. What an
    # existing deployment or a running evaluation uses is never removed. A plugin's kind
    # reads gc_max_age_days and gc_max_mb from its [plugins.<name>] table.
    gc_interval_s: Annotated[float, Meta(ge=0)] = 3600.0
    # Deprecated (one release): now [plugins.evaluation] gc_max_age_days and gc_max_mb.
    gc_evaluations_max_age_days: Annotated[float, Meta(ge=0)] | UnsetType = UNSET
    gc_evaluations_max_mb: Annotated[float, Meta(ge=0)] | UnsetType = UNSET
    gc_events_max_age_days: Annotated[float, Meta(ge=0)] = 30.0
    gc_events_max_mb: Annotated[float, Meta(ge=0)] = 0.0
    gc_build_logs_max_age_days: Annotated[float, Meta(ge=0)] = 30.0
    gc_build_logs_max_mb: Annotated[float, Meta(ge=0)] = 0.0
    gc_sources_max_age_days: Annotated[float, Meta(ge=0)] = 14.0
    gc_sources_max_mb: Annotated[float, Meta(ge=0)] = 4096.0
    gc_images_max_age_days: Annotated[float, Meta(ge=0)] = 14.0
    gc_images_max_mb: Annotated[float, Meta(ge=0)] = 0.0
    plugins: dict[str, dict[str, Any]] = {}

    def __post_init__(self) -> None:
        if self.port_range_end < self.port_range_start:
            raise ValueError("port_range_end must not be below port_range_start")
        if self.agent_gateway:
            from dockyard.core.policy import parse_gateway

            parse_gateway(self.agent_gateway)
        from dockyard.core.build_egress import parse_allowlist

        parse_allowlist(self.build_proxy_allow)
        if self.build_proxy == "attach" or self.build_proxy_url:
            from dockyard.core.build_egress import parse_proxy_url

            parse_proxy_url(self.build_proxy_url or "")
        _move_legacy_options(self)

    def plugin_options(self, name: str) -> dict[str, Any]:
        """The ``[plugins.<name>]`` table, empty when absent."""
        return dict(self.plugins.get(name, {}))

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def instance_id(self) -> str:
        """Names this dockyard among others on the host: a hash of its data directory."""
        real = os.path.realpath(self.data_path)
        return hashlib.sha256(real.encode()).hexdigest()[:12]


def _move_legacy_options(settings: Settings) -> None:
    """Move deprecated settings (``eval_*``, :data:`LEGACY_OPTION_NAMES`) into their
    plugin's table (an option set there wins), warning once per process which names to
    change."""
    for name in _LEGACY_FIELDS:
        value = getattr(settings, name)
        if value is UNSET:
            continue
        plugin, option = _legacy_option(name)
        options = {option: value, **settings.plugins.get(plugin, {})}
        settings.plugins = {**settings.plugins, plugin: options}  # the caller's dicts stay
        if name not in _warned_legacy:
            _warned_legacy.add(name)
            message = (
                f"setting {name!r} is deprecated and goes in the next release: "
                f"set {option!r} under [plugins.{plugin}] instead"
            )
            log.warning("DeprecationWarning: %s", message)
            warnings.warn(message, DeprecationWarning, stacklevel=2)


def _legacy_option(name: str) -> tuple[str, str]:
    """The plugin and option a deprecated setting ``name`` became."""
    if name in LEGACY_OPTION_NAMES:
        return LEGACY_OPTION_NAMES[name]
    prefix = next(p for p in LEGACY_OPTION_PREFIXES if name.startswith(p))
    return LEGACY_OPTION_PREFIXES[prefix], name.removeprefix(prefix)


#: Where Linux says which local ports it picks for outgoing connections.
IPV4_SYSCTL = Path("/proc/sys/net/ipv4")


def _port_set(text: str) -> set[int]:
    """``ip_local_reserved_ports`` (``8080,9000-9009``) as a set of ports."""
    ports: set[int] = set()
    for part in text.replace("\n", ",").split(","):
        low, _, high = part.strip().partition("-")
        if low.isdigit():
            ports.update(range(int(low), int(high if high.isdigit() else low) + 1))
    return ports


def ephemeral_overlap(start: int, end: int, sysctl: Path = IPV4_SYSCTL) -> str | None:
    """Why the lease range ``start``-``end`` can meet "address already in use", or None.

    The kernel gives outgoing connections local ports from ``ip_local_port_range``
    (except ``ip_local_reserved_ports``); a leased port in there may be taken by any
    connection at the moment a container is published on it.
    """
    try:
        low, high = (int(x) for x in (sysctl / "ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return None
    overlap = range(max(start, low), min(end, high) + 1)
    if not overlap:
        return None
    try:
        reserved = _port_set((sysctl / "ip_local_reserved_ports").read_text())
    except OSError:
        reserved = set()
    if all(port in reserved for port in overlap):
        return None
    return (
        f"port_range {start}-{end} overlaps the kernel's ephemeral port range {low}-{high} "
        f"(net.ipv4.ip_local_port_range): a deploy can fail with 'address already in use'; "
        f"choose a range outside it, or reserve {overlap.start}-{overlap.stop - 1} in "
        f"net.ipv4.ip_local_reserved_ports"
    )


_FIELDS = {f.name: f for f in msgspec.structs.fields(Settings)}
_LEGACY_FIELDS = tuple(
    n for n in _FIELDS if n.startswith(tuple(LEGACY_OPTION_PREFIXES)) or n in LEGACY_OPTION_NAMES
)


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in _FIELDS:
        if name == "plugins":
            continue
        raw = environ.get(f"DOCKYARD_{name.upper()}")
        if raw is None:
            continue
        if name == "api_tokens":
            continue  # tables: only in the TOML file
        if name in (
            "disable_plugins",
            "allowed_git_hosts",
            "local_repos",
            "allowed_base_images",
            "allowed_clients",
            "trusted_proxies",
            "build_proxy_allow",
        ):
            values[name] = [p.strip() for p in raw.split(",") if p.strip()]
        elif name == "base_image_aliases":  # python:3.11-slim=localhost/base:x,...
            pairs = (p.strip().partition("=") for p in raw.split(",") if p.strip())
            values[name] = {key.strip(): image.strip() for key, _, image in pairs}
        elif name == "eval_gateway_vars":  # NAME=suffix,NAME2=/openai/v1
            pairs = (p.strip().partition("=") for p in raw.split(",") if p.strip())
            values[name] = {key.strip(): suffix.strip() for key, _, suffix in pairs}
        else:
            values[name] = raw
    return values


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build Settings from a TOML file, the environment and explicit overrides.

    Raises ConfigError with a message naming the bad field or file.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    path = config_file or environ.get("DOCKYARD_CONFIG")
    if path:
        try:
            merged.update(tomllib.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    merged.update(_from_env(environ))
    merged.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
