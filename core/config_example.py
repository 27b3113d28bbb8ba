"""``contrib/dockyard.toml.example``, generated from the configuration model.

Every field of :class:`dockyard.core.config.Settings` gets one line of meaning
(:data:`MEANINGS`) and its default, as TOML that loads back to exactly the defaults; a
setting whose default is unset or depends on the host is shown commented out, with an
example. Deprecated aliases (fields whose default is ``UNSET``, such as the old ``eval_*``
names) are left out. A plugin's own table (``[plugins.<name>]``) is listed, commented out,
when the plugin module exposes its options model as ``OPTIONS`` and one line per option
as ``OPTION_MEANINGS`` (the evaluation plugin does). ``dockyard config example`` prints
it; ``tests/test_config_example.py`` fails when the file and the model drift apart, or
when a new setting has no line here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import msgspec

from dockyard.core.config import Settings

#: One line per setting: what it means (a new setting fails the test until it has one).
MEANINGS: dict[str, str] = {
    "host": "The address the API binds.",
    "port": "The port the API binds.",
    "data_dir": (
        "Where state lives (default: /var/lib/dockyard as root, else "
        "$XDG_DATA_HOME/dockyard or ~/.local/share/dockyard)."
    ),
    "runtime": "The container runtime plugin: podman or docker.",
    "store": "The state store plugin (sqlite: <data_dir>/dockyard.db).",
    "router": "The reverse proxy dockyard runs: traefik, caddy or none.",
    "strategy": "The deploy strategy plugin.",
    "port_range_start": "First host port leased to containers (above the ephemeral range).",
    "port_range_end": "Last host port leased to containers.",
    "podman_socket": "The Podman API socket (unset: discovered, or a private service is started).",
    "require_limits": "Refuse to start when resource limits cannot be enforced on this host.",
    "require_egress": "Refuse to start when the agents' network policy cannot be enforced here.",
    "api_tokens": "Tokens as [[api_tokens]] tables: id, name, scopes, sha256 of the secret.",
    "allowed_clients": "Client addresses or networks allowed to call the API (empty: all).",
    "trusted_proxies": "Proxies whose X-Forwarded-For names the real client.",
    "rate_limit_per_ip": "Requests per window from one client address (0: no limit).",
    "rate_limit_per_token": "Requests per window with one token (0: no limit).",
    "rate_limit_window": "The rate limits' window: second, minute or hour.",
    "monitor_interval_s": "Seconds between health probes of promoted slots (0: no monitor).",
    "router_watch_interval_s": "Seconds between checks of what the router serves (0: never).",
    "allow_build_network": "Whether a deployment may ask for network access while building.",
    "build_proxy": (
        '"squid": builds reach the allowlist through one squid each; "attach": through the '
        'proxy at build_proxy_url; "off": no network.'
    ),
    "build_proxy_allow": "host:port entries builds may reach through the proxy (empty: none).",
    "build_proxy_url": 'The operator\'s proxy builds use when build_proxy is "attach": '
    "http://<IPv4>:<port>.",
    "build_proxy_max_bytes": "Bytes one build may download through the proxy.",
    "build_proxy_binary": "The squid executable the build proxy runs.",
    "base_image_aliases": "FROM names mapped to local images (a name mapping to none fails).",
    "build_timeout_s": "Seconds a build may take.",
    "build_memory_mb": "Memory of a build, in MiB.",
    "build_cpus": "CPUs of a build.",
    "max_memory_mb": "Memory cap of any container, in MiB (a deployment can only lower it).",
    "max_cpus": "CPU cap of any container.",
    "max_pids": "Process cap of any container.",
    "max_tmpfs_mb": "Cap of a container's scratch tmpfs, in MiB.",
    "max_container_lifetime_s": "Seconds any container may run (unset: no cap).",
    "allowed_base_images": "Images build_mode image may name (empty: any local image).",
    "allowed_git_hosts": "Git hosts sources may come from.",
    "insecure_sources": "Also accept loopback http:// and git:// sources and local paths (tests).",
    "local_repos": "Local git repositories trusted as sources.",
    "fetch_timeout_s": "Seconds a source fetch may take.",
    "fetch_max_bytes": "Bytes a source fetch may receive.",
    "fetch_max_files": "Files a fetched checkout may hold.",
    "agent_gateway": "The LLM gateway agents may reach: IPv4 host:port or http://host:port/path.",
    "disable_plugins": "Plugins not to load, by name.",
    "log_level": "DEBUG, INFO, WARNING or ERROR.",
    "log_format": "text for people, json for one JSON object per line.",
    "gc_interval_s": "Seconds between the server's garbage collection passes (0: never).",
    "gc_events_max_age_days": "Days the journal keeps a gone deployment's events (0: no limit).",
    "gc_events_max_mb": "MiB of finished deployments' journal entries kept (0: no limit).",
    "gc_build_logs_max_age_days": "Days a deleted deployment's build logs are kept (0: no limit).",
    "gc_build_logs_max_mb": "MiB of deleted deployments' build logs kept (0: no limit).",
    "gc_sources_max_age_days": "Days an unused checkout is kept after its last use (0: no limit).",
    "gc_sources_max_mb": "MiB of cached checkouts and source views kept (0: no limit).",
    "gc_images_max_age_days": "Days an unused built image is kept after its build (0: no limit).",
    "gc_images_max_mb": "MiB of unused built images kept (0: no limit).",
    "plugins": "Options of one plugin, as a [plugins.<name>] table (see each plugin).",
}

#: Example values of the settings whose default is unset or depends on the host.
EXAMPLES: dict[str, Any] = {
    "data_dir": "/var/lib/dockyard",
    "podman_socket": "/run/podman/podman.sock",
    "max_container_lifetime_s": 86400.0,
    "agent_gateway": "127.0.0.1:8090",
    "build_proxy_url": "http://10.0.0.5:3128",
}

HEADER = """\
# dockyard's configuration: every setting, its default and what it means.
#
# Generated from the configuration model (core/config.py) by `dockyard config example`;
# tests/test_config_example.py fails when this file and the model differ. Use it with
# `dockyard serve --config FILE` (or DOCKYARD_CONFIG=FILE); keep only what you change.
# Precedence, lowest first: defaults, this file, DOCKYARD_<NAME> variables, flags.
"""

PLUGINS_BLOCK = """\
# {meaning}
# [plugins.sqlite]
# busy_timeout_s = 15.0
"""

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_value(value: Any) -> str:
    """A default as TOML (strings, numbers, booleans, lists and flat tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        pairs = (
            f"{k if _BARE_KEY.match(k) else json.dumps(k)} = {toml_value(v)}"
            for k, v in value.items()
        )
        return "{ " + ", ".join(pairs) + " }" if value else "{}"
    raise TypeError(f"no TOML for {value!r}")


def defaults() -> dict[str, Any]:
    """Each setting's default as plain data; None when unset or host-dependent. Deprecated
    aliases (default ``UNSET``) are left out."""
    host_dependent = {"data_dir"}
    out: dict[str, Any] = {}
    for field in msgspec.structs.fields(Settings):
        if field.default is msgspec.UNSET:
            continue
        if field.name in host_dependent:
            out[field.name] = None
        elif field.default is not msgspec.NODEFAULT:
            out[field.name] = msgspec.to_builtins(field.default)
        else:
            out[field.name] = msgspec.to_builtins(field.default_factory())
    return out


class PluginTable(msgspec.Struct, frozen=True):
    """A plugin's ``[plugins.<name>]`` table: its options model and a line per option."""

    name: str
    options: type[msgspec.Struct]
    meanings: dict[str, str]


def plugin_tables(plugins: Iterable[tuple[str, object]]) -> list[PluginTable]:
    """The tables of the plugins (``(name, module)`` pairs) that expose ``OPTIONS`` and
    ``OPTION_MEANINGS``, by name."""
    tables = [
        PluginTable(name, plugin.OPTIONS, dict(plugin.OPTION_MEANINGS))  # type: ignore[attr-defined]
        for name, plugin in plugins
        if hasattr(plugin, "OPTIONS") and hasattr(plugin, "OPTION_MEANINGS")
    ]
    return sorted(tables, key=lambda table: table.name)


def table_toml(table: PluginTable) -> str:
    """A plugin's table, commented out, each option with its meaning and default."""
    lines = [f"\n# [plugins.{table.name}]"]
    for field in msgspec.structs.fields(table.options):
        if field.name not in table.meanings:
            raise KeyError(f"[plugins.{table.name}] option without a meaning: {field.name}")
        default = field.default if field.default is not msgspec.NODEFAULT else None
        if default is None and field.default_factory is not msgspec.NODEFAULT:
            default = field.default_factory()
        value = msgspec.to_builtins(default)
        shown = toml_value(value) if value is not None else '""'
        lines.append(f"# {table.meanings[field.name]}\n# {field.name} = {shown}")
    return "\n".join(lines) + "\n"


def example_toml(tables: Iterable[PluginTable] = ()) -> str:
    """The whole example file, with the given plugins' tables last."""
    missing = [name for name in defaults() if name not in MEANINGS]
    if missing:
        raise KeyError(f"settings without a line in MEANINGS: {', '.join(missing)}")
    parts = [HEADER]
    for name, value in defaults().items():
        if name == "plugins":
            continue  # tables come last
        if value is None:
            line = f"# {name} = {toml_value(EXAMPLES[name])}"
        else:
            line = f"{name} = {toml_value(value)}"
        parts.append(f"\n# {MEANINGS[name]}\n{line}\n")
    parts.append("\n" + PLUGINS_BLOCK.format(meaning=MEANINGS["plugins"]))
    parts.extend(table_toml(table) for table in tables)
    return "".join(parts)
