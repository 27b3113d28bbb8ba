"""The ``dockyard`` command line: ``serve`` runs the API; ``deploy``, ``redeploy``,
``switch``, ``delete``, ``status`` and ``logs`` talk to a running one; ``plugins`` lists
what loads.

Every failure the user can cause prints one line ``dockyard: error: ...`` and exits 2; no
tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any

import aiohttp
import msgspec

from dockyard.api import cli_admin, cli_install
from dockyard.api.auth import ScopeTable, TokenBook
from dockyard.api.cli_events import follow_operation, parse_tags, print_events, use_event_formats
from dockyard.api.cli_plugins import PLUGIN_COMMAND, CliCommand, collect_cli_commands
from dockyard.client import DEFAULT_URL, ApiError, DockyardClient
from dockyard.client.events import last_event_id
from dockyard.core.config import Settings, load_settings
from dockyard.core.errors import DockyardError
from dockyard.core.logs import configure_logging
from dockyard.core.plugins import DockyardPluginManager, build_plugin_manager, dockyard_version

log = logging.getLogger("dockyard")
API_COMMANDS = {"deploy", "redeploy", "switch", "delete", "status", "logs", "token", "events"}


def _parser(pm: DockyardPluginManager | None = None) -> argparse.ArgumentParser:
    """The command line's parser, with the commands plugins add (``dockyard_cli_commands``:
    their parsers carry the :class:`CliCommand` that runs them as ``args.plugin_command``)."""
    parser = argparse.ArgumentParser(
        prog="dockyard",
        description="Run other people's code from git, hardened, with blue/green switches.",
    )
    pm = pm or build_plugin_manager()
    scope_names = ScopeTable.from_plugins(pm).names
    parser.add_argument("--version", action="version", version=f"dockyard {dockyard_version()}")
    parser.add_argument("--config", help="TOML configuration file (also DOCKYARD_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="start the API server")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8800)")
    serve.add_argument("--data-dir", dest="data_dir", help="where state is kept")
    serve.add_argument("--runtime", help="container runtime plugin (default podman)")
    serve.add_argument("--store", help="state store plugin (default sqlite)")
    serve.add_argument(
        "--router", help="reverse proxy: traefik or caddy (run by dockyard), none (default)"
    )
    serve.add_argument("--podman-socket", dest="podman_socket", help="Podman API socket")
    serve.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING, ...")
    serve.add_argument(
        "--log-format", dest="log_format", choices=["text", "json"], help="log lines (text)"
    )
    serve.add_argument(
        "--allow-local-repo",
        dest="local_repos",
        action="append",
        metavar="PATH",
        help="trust this local git repository as a source",
    )

    sub.add_parser("plugins", help="list the plugins that load, and what they register")
    config = sub.add_parser("config", help="print the effective configuration as JSON")
    config.add_argument(
        "what", nargs="?", choices=["example"], help="example: every setting as commented TOML"
    )

    api = argparse.ArgumentParser(add_help=False)
    api.add_argument(
        "--url",
        default=os.environ.get("DOCKYARD_URL", DEFAULT_URL),
        help=f"dockyard's API (default $DOCKYARD_URL or {DEFAULT_URL})",
    )
    api.add_argument(
        "--token",
        default=os.environ.get("DOCKYARD_TOKEN"),
        help="bearer token (default $DOCKYARD_TOKEN)",
    )
    wait = argparse.ArgumentParser(add_help=False)
    wait.add_argument(
        "--wait", action="store_true", help="follow the operation, showing progress, until it ends"
    )
    wait.add_argument("--timeout", type=float, default=900.0, help="seconds to follow at most")

    deploy = sub.add_parser("deploy", parents=[api, wait], help="deploy a git repository")
    deploy.add_argument("repo", help="repository URL, e.g. https://github.com/owner/agent")
    deploy.add_argument("--id", help="deployment id (default: from the repository name)")
    _spec_flags(deploy)

    redeploy = sub.add_parser(
        "redeploy", parents=[api, wait], help="deploy a new ref and/or arguments into the idle slot"
    )
    redeploy.add_argument("id")
    _spec_flags(redeploy)

    for name, text in [
        ("switch", "promote the other slot (rollback)"),
        ("delete", "remove a deployment and everything it owns"),
    ]:
        cmd = sub.add_parser(name, parents=[api, wait] if name == "switch" else [api], help=text)
        cmd.add_argument("id")
    status = sub.add_parser("status", parents=[api], help="deployments, slots and health")
    status.add_argument("id", nargs="?")
    logs = sub.add_parser("logs", parents=[api], help="container (or build) logs")
    logs.add_argument("id")
    logs.add_argument("--slot", choices=["blue", "green"])
    logs.add_argument("--tail", type=int, default=200)
    logs.add_argument("--build", action="store_true", help="the build log instead")
    logs.add_argument("--raw", action="store_true", help="keep ANSI colour codes")
    events = sub.add_parser(
        "events", parents=[api], help="a deployment's events, or those of a plugin's tag"
    )
    events.add_argument("id", nargs="?", help="deployment id (default: all)")
    events.add_argument(
        "--tag",
        dest="tags",
        action="append",
        default=[],
        metavar="NAME=ID",
        help="only events a plugin tagged so (repeatable), e.g. an event tag's id",
    )
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    token = sub.add_parser("token", help="create, list and revoke API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    for name, text in [
        ("create", "create a scoped token (printed once)"),
        ("list", "list tokens (never their secrets)"),
        ("revoke", "revoke a token"),
    ]:
        cmd = token_sub.add_parser(name, parents=[api], help=text)
        cmd.add_argument(
            "--local",
            action="store_true",
            help="edit the token file in --data-dir directly (no server needed)",
        )
        cmd.add_argument("--data-dir", dest="data_dir", help="with --local: the data directory")
        if name == "create":
            cmd.add_argument("name")
            cmd.add_argument(
                "--scope",
                dest="scopes",
                action="append",
                required=True,
                metavar="SCOPE",
                help=f"a scope to grant (repeatable): {', '.join(scope_names)}",
            )
        if name == "revoke":
            cmd.add_argument("id")
    cli_install.add_commands(sub)
    cli_admin.add_commands(sub)
    collect_cli_commands(pm, sub, api)

    return parser


def _spec_flags(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--ref", help="branch, tag or full commit")
    cmd.add_argument("--subdir", help="subdirectory holding the app")
    cmd.add_argument("--dockerfile", help="Dockerfile path, relative to the subdirectory")
    cmd.add_argument("--mode", dest="build_mode", choices=["dockerfile", "image"])
    cmd.add_argument("--image", help="base image for --mode image")
    cmd.add_argument("--port", dest="container_port", type=int, help="port the app listens on")
    cmd.add_argument("--health-path", help="health check path (default /health)")
    cmd.add_argument("--grace", dest="grace_period_s", type=float, help="drain seconds")
    cmd.add_argument("--no-promote", dest="auto_promote", action="store_false", default=None)
    cmd.add_argument("--build-arg", action="append", default=[], metavar="K=V")
    cmd.add_argument("--env", action="append", default=[], metavar="K=V")


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise DockyardError(f"{flag} wants KEY=VALUE, got {value!r}")
        out[key] = val
    return out


def _spec_changes(args: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for name in (
        "ref",
        "subdir",
        "dockerfile",
        "build_mode",
        "image",
        "container_port",
        "grace_period_s",
        "auto_promote",
    ):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if args.health_path:
        changes["health"] = {"path": args.health_path}
    if args.build_arg:
        changes["build_args"] = _pairs(args.build_arg, "--build-arg")
    if args.env:
        changes["env"] = _pairs(args.env, "--env")
    return changes


def _default_id(repo: str) -> str:
    name = repo.rstrip("/").removesuffix(".git").rsplit("/", 1)[-1].lower()
    slug = re.sub(r"[^a-z0-9-]+", "-", name).strip("-")[:40].strip("-")
    return slug or "app"


def _show_event(event: dict[str, Any]) -> None:
    at = time.strftime("%H:%M:%S", time.localtime(event.get("at", 0)))
    color = event.get("color") or "-"
    if event["kind"] == "slot_transition":
        text = f"{event.get('from_state')} -> {event.get('to_state')}"
    else:
        text = event["kind"].replace("_", " ")
    extra = event.get("message") or event.get("reason") or ""
    print(f"  {at} {color:<5} {text}{'  ' + extra if extra else ''}", flush=True)


def _show(view: dict[str, Any]) -> None:
    promoted = view.get("promoted") or "none"
    print(f"{view['id']}: promoted={promoted} url={view.get('url') or '-'}")
    for slot in view["slots"]:
        commit = (slot.get("commit") or "")[:12] or "-"
        port = slot.get("host_port") or "-"
        health = slot["health"]["status"]
        line = f"  {slot['color']:<5} {slot['state']:<9} commit={commit} port={port} {health}"
        if slot.get("reason"):
            line += f"  [{slot['reason']}] {slot.get('message') or ''}"
        print(line)
    op = view.get("operation")
    if op:
        state = "running" if op["running"] else "done"
        err = f": {op['error']['reason']}: {op['error']['message']}" if op.get("error") else ""
        print(f"  operation {op['kind']} {state}{err}")


async def _api(args: argparse.Namespace) -> int:
    async with DockyardClient(args.url, token=args.token) as client:
        follow = getattr(args, "wait", False)
        if args.command in ("deploy", "redeploy", "switch"):
            target = args.id or _default_id(args.repo)
            # Where the event stream resumes: after everything this deployment already had.
            journal_after = await last_event_id(client, target) if follow else 0
            if args.command == "deploy":
                spec = {"id": target, "repo": args.repo, **_spec_changes(args)}
                view = await client.deploy(spec)
            elif args.command == "redeploy":
                view = await client.redeploy(args.id, _spec_changes(args))
            else:
                view = await client.switch(args.id)
            if follow:
                print(f"{view['id']}: {args.command} started", flush=True)
                view = await follow_operation(
                    client, view["id"], after=journal_after, timeout_s=args.timeout
                )
            _show(view)
            op = view.get("operation") or {}
            return 1 if follow and op.get("error") else 0
        if args.command == "status":
            views = [await client.get(args.id)] if args.id else await client.status_all()
            for view in views:
                _show(view)
            if not views:
                print("no deployments")
            return 0
        if args.command == "logs":
            body = await client.logs(
                args.id, slot=args.slot, tail=args.tail, strip_ansi=not args.raw, build=args.build
            )
            for line in body["lines"]:
                print(line)
            return 0
        if args.command == "delete":
            await client.delete(args.id)
            print(f"{args.id}: deleted")
            return 0
        if args.command == "token":
            return await _tokens(args, client)
        if args.command == "events":
            return await print_events(
                client, args.id, follow=args.follow, as_json=args.json, tags=parse_tags(args.tags)
            )
    raise AssertionError(args.command)


async def _tokens(args: argparse.Namespace, client: DockyardClient) -> int:
    """``dockyard token ...`` through the API, or on the local token file with --local."""
    if args.local:
        overrides = {"data_dir": args.data_dir} if args.data_dir else {}
        settings = load_settings(args.config, **overrides)
        scopes = ScopeTable.from_plugins(build_plugin_manager(settings.disable_plugins))
        book = TokenBook.from_settings(settings, scopes)
        if args.token_command == "create":
            record, secret = book.create(args.name, args.scopes)
            rows = [{**msgspec.to_builtins(record), "token": secret}]
        elif args.token_command == "list":
            rows = [msgspec.to_builtins(r) for r in book.records()]
        else:
            rows = [msgspec.to_builtins(book.revoke(args.id))]
    elif args.token_command == "create":
        rows = [
            await client.request(
                "POST", "/v1/tokens", json={"name": args.name, "scopes": args.scopes}
            )
        ]
    elif args.token_command == "list":
        rows = await client.request("GET", "/v1/tokens")
    else:
        rows = [await client.request("DELETE", f"/v1/tokens/{args.id}")]
    for row in rows:
        state = "revoked" if row.get("revoked_at") else "active"
        print(f"{row['id']}  {row['name']:<20} {','.join(row['scopes']):<24} {state}")
        if row.get("token"):
            print(f"  token (shown once): {row['token']}")
    return 0


#: Signals that stop ``dockyard serve`` cleanly (systemd sends SIGTERM, a terminal SIGINT).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Seconds open HTTP requests (e.g. ``?wait=true``) get to finish once a stop begins.
GRACEFUL_HTTP_S = 5.0


def _uvicorn_server(config: Any) -> Any:
    """uvicorn's server, keeping the stop signal instead of re-raising it.

    uvicorn re-raises the SIGTERM/SIGINT it caught once it has served, which would kill
    dockyard before it closes its services (proxies, the private Podman service). Here the
    signal only asks the server to stop; its handler stays installed (a second signal
    cannot cut the close short) until ``_serve`` has closed everything.
    """
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is threading.main_thread():
                for sig in STOP_SIGNALS:
                    signal.signal(sig, self.handle_exit)
            yield

    return Server(config)


async def _serve(settings: Settings) -> None:
    """Run the API until SIGTERM or SIGINT, then stop cleanly: stop accepting requests,
    give open ones ``GRACEFUL_HTTP_S``, cancel running operations (their slots end FAILED
    with ``controller_stopped``), stop the proxy and the private Podman service, exit 0."""
    import uvicorn

    from dockyard.api.app import create_app
    from dockyard.core.services import Services

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for sig in STOP_SIGNALS:  # a stop while starting cancels the start (which cleans up)
        loop.add_signal_handler(sig, main.cancel)
    try:
        services = await Services.open(settings)
    except asyncio.CancelledError:
        log.info("stopped while starting")
        return
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    try:
        first = TokenBook.from_settings(settings).ensure_admin()
        if first:
            print(
                "No API token existed, so an admin token was created. It is shown ONCE and "
                f"stored only hashed:\n\n    export DOCKYARD_TOKEN={first}\n",
                flush=True,
            )
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
            # dockyard works out the client address itself (trusted_proxies): uvicorn must
            # not rewrite it from X-Forwarded-For (by default it trusts 127.0.0.1).
            proxy_headers=False,
            server_header=False,
            log_config=None,  # uvicorn's lines (access log too) go through configure_logging
            timeout_graceful_shutdown=GRACEFUL_HTTP_S,  # open streams must not hold a stop
        )
        await _uvicorn_server(config).serve()
    finally:
        await services.close()
        log.info("dockyard stopped")


def _plugins(settings: Settings) -> None:
    pm = build_plugin_manager(settings.disable_plugins)
    regs = pm.registries
    for plugin in pm.describe():
        print(f"{plugin['name']:<16} {plugin['version']:<10} {plugin['module']}")
        for hook in plugin["hooks"]:
            print(f"    {hook}")
    for kind in regs.kinds():
        names = getattr(regs, kind).names()
        print(f"{kind}: {', '.join(names) or '-'}")


def _disabled_by_config(argv: Sequence[str] | None) -> list[str]:
    """The configuration's ``disable_plugins`` (``--config`` or ``DOCKYARD_CONFIG``), so a
    plugin disabled there adds no commands; a configuration that does not load disables
    nothing here (the commands that read it report it)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated settings warn once, when used
            return list(load_settings(known.config).disable_plugins)
    except DockyardError:
        return []


def _run_handler(result: int | Awaitable[int]) -> int:
    """A plugin command's exit code: its handler's answer, awaited when it is awaitable."""
    if inspect.isawaitable(result):

        async def wait() -> int:
            return await result

        return asyncio.run(wait())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dockyard`` command."""
    try:
        pm = build_plugin_manager(_disabled_by_config(argv))
        parser = _parser(pm)
        use_event_formats(pm)
    except DockyardError as exc:  # a plugin that fails to load or to add its commands
        print(f"dockyard: error: {exc.message}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    plugin_command: CliCommand | None = getattr(args, PLUGIN_COMMAND, None)
    if args.command in cli_install.COMMANDS:
        try:
            return cli_install.main_install(args)
        except DockyardError as exc:
            print(f"dockyard: error: {exc.message}", file=sys.stderr)
            return 2
    if args.command in API_COMMANDS or (plugin_command and plugin_command.api):
        try:
            if plugin_command is not None and plugin_command.api is not None:
                return _run_handler(plugin_command.api(args))
            return asyncio.run(_api(args))
        except ApiError as exc:
            print(f"dockyard: error: {exc.message} ({exc.reason})", file=sys.stderr)
            return 1
        except DockyardError as exc:
            print(f"dockyard: error: {exc.message}", file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"dockyard: error: {exc}", file=sys.stderr)
            return 2
        except (aiohttp.ClientError, OSError) as exc:
            print(f"dockyard: error: cannot reach dockyard at {args.url}: {exc}", file=sys.stderr)
            return 1
    if args.command in cli_admin.COMMANDS:
        try:
            return cli_admin.main(args)
        except DockyardError as exc:
            print(f"dockyard: error: {exc.message}", file=sys.stderr)
            return 2
    serve_fields = {
        "host",
        "port",
        "data_dir",
        "runtime",
        "store",
        "router",
        "podman_socket",
        "log_level",
        "log_format",
        "local_repos",
    }
    overrides = {k: v for k, v in vars(args).items() if k in serve_fields and v is not None}
    try:
        settings = load_settings(args.config, **overrides)
        configure_logging(settings.log_level, settings.log_format)
        if args.command == "serve":
            asyncio.run(_serve(settings))
        elif args.command == "plugins":
            _plugins(settings)
        elif args.command == "config" and args.what == "example":
            from dockyard.core.config_example import example_toml, plugin_tables

            pm = build_plugin_manager(settings.disable_plugins)
            print(example_toml(plugin_tables(pm.list_name_plugin())), end="")
        elif args.command == "config":
            print(msgspec.json.format(msgspec.json.encode(settings).decode(), indent=2))
        elif plugin_command is not None and plugin_command.local is not None:
            return _run_handler(plugin_command.local(args, settings))
    except DockyardError as exc:
        print(f"dockyard: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # A SIGINT before ``serve`` installed its handlers.
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
