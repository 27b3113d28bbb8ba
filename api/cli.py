"""The ``dockyard`` command line: ``serve`` runs the API; ``plugins`` lists what loads.

Every failure the user can cause prints one line ``dockyard: error: ...`` and exits 2; no
tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

import msgspec

from dockyard.core.config import Settings, load_settings
from dockyard.core.errors import DockyardError
from dockyard.core.plugins import build_plugin_manager, dockyard_version

log = logging.getLogger("dockyard")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dockyard",
        description="Run other people's code from git, hardened, with blue/green switches.",
    )
    parser.add_argument("--version", action="version", version=f"dockyard {dockyard_version()}")
    parser.add_argument("--config", help="TOML configuration file (also DOCKYARD_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="start the API server")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8800)")
    serve.add_argument("--data-dir", dest="data_dir", help="where state is kept")
    serve.add_argument("--runtime", help="container runtime plugin (default podman)")
    serve.add_argument("--store", help="state store plugin (default sqlite)")
    serve.add_argument("--podman-socket", dest="podman_socket", help="Podman API socket")
    serve.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING, ...")

    sub.add_parser("plugins", help="list the plugins that load, and what they register")
    sub.add_parser("config", help="print the effective configuration as JSON")
    return parser


async def _serve(settings: Settings) -> None:
    import uvicorn

    from dockyard.api.app import create_app
    from dockyard.core.services import Services

    services = await Services.open(settings)
    try:
        info = services.runtime_info
        if info is not None:
            print(
                f"dockyard {dockyard_version()}: runtime {info.name} {info.version} "
                f"({'rootless' if info.rootless else 'rootful'}, cgroup {info.cgroup_version}, "
                f"limits {'enforced' if info.limits_enforced else 'NOT enforced'}), "
                f"store {services.store.name}, data in {settings.data_dir}",
                flush=True,
            )
        print(
            f"API on http://{settings.host}:{settings.port}/v1/healthz, "
            f"docs on http://{settings.host}:{settings.port}/docs",
            flush=True,
        )
        config = uvicorn.Config(
            create_app(settings, services=services),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level.lower(),
            lifespan="on",
        )
        await uvicorn.Server(config).serve()
    finally:
        await services.close()


def _plugins(settings: Settings) -> None:
    pm = build_plugin_manager(settings.disable_plugins)
    regs = pm.registries
    for plugin in pm.describe():
        print(f"{plugin['name']:<16} {plugin['version']:<10} {plugin['module']}")
        for hook in plugin["hooks"]:
            print(f"    {hook}")
    for kind in regs.KINDS:
        names = getattr(regs, kind).names()
        print(f"{kind}: {', '.join(names) or '-'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dockyard`` command."""
    args = _parser().parse_args(argv)
    overrides = {
        k: v for k, v in vars(args).items() if k not in {"command", "config"} and v is not None
    }
    try:
        settings = load_settings(args.config, **overrides)
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        if args.command == "serve":
            asyncio.run(_serve(settings))
        elif args.command == "plugins":
            _plugins(settings)
        elif args.command == "config":
            print(msgspec.json.format(msgspec.json.encode(settings).decode(), indent=2))
    except DockyardError as exc:
        print(f"dockyard: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
