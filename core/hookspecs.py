"""dockyard's hook specifications: every way a plugin can extend dockyard.

A plugin is a module or object with functions marked ``@dockyard.core.hookimpl`` and named
after a hook below. Built-in runtimes, stores and flows are ordinary plugins that use these
same hooks. Third-party plugins ship as packages exposing an entry point in the group
``dockyard`` (see the README's "Writing a plugin").

Hooks may return awaitables; dockyard awaits them (pluggy itself is synchronous). Every hook
is called through pluggy (``pm.hook.<name>``), so ``@hookimpl(tryfirst=True)``,
``trylast=True`` and hook wrappers (``wrapper=True``) are honoured; an implementation's
failure is reported naming its plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

    from dockyard.api.auth import TokenScope
    from dockyard.api.cli_events import EventFormat
    from dockyard.api.cli_plugins import CliRegistrar
    from dockyard.api.plugins import ApiRegistrar
    from dockyard.core.event_tags import TaggerFactory
    from dockyard.core.models import DeploymentSpec, Event
    from dockyard.core.plugins import Registrar
    from dockyard.core.router import RouterFactory
    from dockyard.core.runtime import RuntimeFactory
    from dockyard.core.store import StoreFactory

PROJECT = "dockyard"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ----------------------------------------------------------------------------------------
# A plugin's own hooks: called as each plugin is registered.
# ----------------------------------------------------------------------------------------


@hookspec(historic=True)
def dockyard_add_hookspecs(add: Callable[[object], None]) -> None:
    """Add a plugin's own hook specifications, so other plugins can implement them.

    :param add: call ``add(module_or_class)`` with functions marked by
        ``@hookspec`` (``dockyard.core.hookspecs.hookspec``); the plugin manager's
        ``add_hookspecs``. Implementations of a hook defined this way that may be loaded
        without the plugin defining it mark themselves ``@hookimpl(optionalhook=True)``.

    A third-party plugin implements this hook to let others extend it (the evaluation
    plugin adds its agent-protocols registrar this way); a ``dockyard_register_<kind>``
    hookspec added so is collected as ``pm.registries.<kind>``.
    """


# ----------------------------------------------------------------------------------------
# Registrars: called once when the plugin manager is built. Each receives a registrar
# object; call ``register(name, factory)``. A name registered twice is an error.
# ----------------------------------------------------------------------------------------


@hookspec
def dockyard_register_runtimes(register: Registrar[RuntimeFactory]) -> None:
    """Register container runtimes (Podman, Docker, ...).

    :param register: call ``register(name, factory)``; ``factory(settings)`` returns a
        :class:`dockyard.core.runtime.Runtime`, and ``settings.runtime`` selects one by name.

    A third-party plugin implements this hook to ship a new container engine; its runtime
    must pass ``dockyard.testing.runtime_contract`` (``pytest --dockyard-runtime=NAME``).
    """


@hookspec
def dockyard_register_routers(register: Registrar[RouterFactory]) -> None:
    """Register reverse-proxy routers (Traefik, Caddy, none).

    :param register: call ``register(name, factory)``; ``factory(settings)`` returns a router,
        and ``settings.router`` selects one by name.

    A third-party plugin implements this hook to put deployments behind another proxy.
    """


@hookspec
def dockyard_register_stores(register: Registrar[StoreFactory]) -> None:
    """Register state stores (SQLite, ...).

    :param register: call ``register(name, factory)``; ``factory(settings)`` returns a
        :class:`dockyard.core.store.StateStore`, and ``settings.store`` selects one by name.

    A third-party plugin implements this hook to keep state elsewhere; its store must pass
    ``dockyard.testing.store_contract`` (``pytest --dockyard-store=NAME``).
    """


@hookspec
def dockyard_register_strategies(register: Registrar[Callable[..., Any]]) -> None:
    """Register deploy strategies (blue/green, ...).

    :param register: call ``register(name, factory)``; ``settings.strategy`` selects one.

    A third-party plugin implements this hook to roll out revisions another way.
    """


@hookspec
def dockyard_register_sources(register: Registrar[Callable[..., Any]]) -> None:
    """Register source fetchers (git, ...).

    :param register: call ``register(name, factory)``; a deployment's repository URL is
        fetched by the source that accepts it.

    A third-party plugin implements this hook to fetch code from somewhere other than git.
    """


@hookspec
def dockyard_register_gc_kinds(register: Registrar[Callable[..., Any]]) -> None:
    """Register kinds of stored things garbage collection prunes (``core/gc.py``).

    :param register: call ``register(name, factory)``; ``factory(context: GcContext)``
        returns a :class:`dockyard.core.gc.Kind` named ``name``: how to list its items
        (marking those in use), remove one, and (``mark_used``) what its active things use.
        Its retention is ``gc_<name>_max_age_days``/``gc_<name>_max_mb`` when the settings
        have them, else ``gc_max_age_days``/``gc_max_mb`` in ``[plugins.<name>]``.

    The evaluation plugin registers ``evaluations`` (finished evaluations' records).
    A third-party plugin implements this hook so what it stores (its records, files under
    the data directory) is pruned by ``dockyard gc`` and the server's periodic pass, and its
    disk use shows in ``/v1/healthz``.
    """


@hookspec
def dockyard_register_status_filters(register: Registrar[str]) -> None:
    """Register filters of the deployments list, each naming the label it tests.

    :param register: call ``register(name, label)``: ``GET /v1/status?<name>=true`` lists
        only the deployments whose spec has ``label``, ``<name>=false`` only those without
        it. The API reads the name from the query (and lists it in the OpenAPI document);
        a name no loaded plugin registers is refused (400 naming it) when asked for.

    The evaluation plugin registers ``evaluation`` (its agents' ``dockyard_evaluation``
    label). A third-party plugin implements this hook so the deployments it makes can be
    told apart from the operator's without dockyard's API knowing its label.
    """


@hookspec
def dockyard_register_event_tags(register: Registrar[TaggerFactory]) -> None:
    """Register event tags: a name an event journal entry can carry, and who decides it.

    :param register: call ``register(name, factory)``; ``factory()`` returns a tagger (one
        per event hub, so it may keep state), called as ``tagger(event, context)`` for every
        event journaled, with ``context`` the current log context
        (``dockyard.core.logs.current()``); it returns the tag's value (an id:
        ``[A-Za-z0-9._-]{1,80}``) or None. ``name`` matches ``[a-z][a-z0-9_]{0,39}``.
        ``GET /v1/events?<name>=ID`` and the streams follow only the events tagged so; each
        event's JSON has ``tags`` (and, deprecated for one release, ``<name>_id``).

    The evaluation plugin registers ``evaluation`` (which evaluation an event belongs to).
    A third-party plugin implements this hook so the journal can be read per unit of its
    work without dockyard's API knowing what that unit is.
    """


@hookspec
def dockyard_register_token_scopes(register: Registrar[TokenScope]) -> None:
    """Register API token scopes beside the core ``read``, ``deploy`` and ``admin``.

    :param register: call ``register(name, scope)`` with a
        :class:`dockyard.api.auth.TokenScope` (its description, and the scopes holding it
        also grants); ``admin`` grants every scope. A route declaring a scope no loaded
        plugin registers fails the app's start naming the plugin that mounted it.

    The evaluation plugin registers ``evaluate``. A third-party plugin implements this hook
    so its routes can be granted to tokens apart from the core scopes.
    """


@hookspec
def dockyard_register_event_formats(register: Registrar[EventFormat]) -> None:
    """Register how ``dockyard events`` (and ``--wait``) prints an event kind.

    :param register: call ``register(kind, format)``; ``format(event)`` gets the event as
        its JSON object (a dict) and returns the line's text (after time, deployment and
        colour).

    The evaluation plugin registers ``evaluation``. A third-party plugin implements this
    hook so the events it emits read well on the command line.
    """


# ----------------------------------------------------------------------------------------
# Observers and policy: called while deployments run.
# ----------------------------------------------------------------------------------------


@hookspec
def dockyard_event(event: Event) -> Any:
    """Observe every event (slot transitions, builds, probes, switches) as it is stored.

    :param event: the stored :class:`dockyard.core.models.Event`, with its sequence number;
        also the evaluation service's ``kind="evaluation"`` events (state, queue position,
        progress, task outcomes in ``data``), which the store does not keep (``seq`` None).
    :return: nothing, or an awaitable that dockyard awaits. Exceptions are logged, never
        propagated: an observer cannot break a deployment.

    A third-party plugin implements this hook for metrics, audit trails or webhooks.
    """


@hookspec
def dockyard_check_spec(spec: DeploymentSpec) -> Any:
    """Vet a deployment spec before anything is fetched or built.

    :param spec: the validated :class:`dockyard.core.models.DeploymentSpec`.
    :return: nothing, or an awaitable. To refuse the deployment, raise
        :class:`dockyard.core.errors.PolicyRefused` with a message the caller will see.

    A third-party plugin implements this hook to enforce an operator's policy (allowed
    owners, forbidden build args, ...).
    """


# ----------------------------------------------------------------------------------------
# API: called once when the Litestar app is built.
# ----------------------------------------------------------------------------------------


@hookspec
def dockyard_api_handlers(register: Registrar[Any]) -> None:
    """Add HTTP routes to dockyard's API.

    :param register: call ``register(name, handler)`` with a Litestar route handler,
        controller or router; it is mounted as-is on the app. Every handler must declare
        the token scope it needs, ``opt={"scope": "read"|"deploy"|"admin"}`` or one a plugin
        registers (``dockyard_register_token_scopes``);
        one that declares none is refused to everybody (403).

    A third-party plugin implements this hook to expose its own endpoints; to bring a
    lifespan, dependencies or app state with them, implement ``dockyard_api_plugins``.
    """


@hookspec
def dockyard_api_plugins(register: ApiRegistrar) -> None:
    """Bring a plugin's part of the API: routes, dependencies and a lifespan, together.

    :param register: a :class:`dockyard.api.plugins.ApiRegistrar`, called once per app
        built: ``register.route(handler)`` mounts a Litestar route handler, controller or
        router (declare its scope as for ``dockyard_api_handlers``);
        ``register.dependency(name, provide)`` adds a Litestar dependency;
        ``register.lifespan(factory)`` adds ``factory(context)``, an async context manager
        entered after the deployment controller has started and exited before it stops
        (``context`` holds the app, settings, services, controller, and the ``store`` and
        ``pm`` a plugin's service is handed); ``register.scrape(refresh)`` calls
        ``refresh(app.state)`` at every ``GET /metrics`` (the plugin's scrape-time gauges).
        ``register.settings`` is the app's settings (``settings.plugin_options(name)`` for
        the plugin's options).

    A third-party plugin implements this hook to run a service beside the controller and
    serve it (the evaluation plugin's routes and evaluation service come this way).
    """


# ----------------------------------------------------------------------------------------
# Command line: called once when the ``dockyard`` command builds its parser.
# ----------------------------------------------------------------------------------------


@hookspec
def dockyard_cli_commands(register: CliRegistrar) -> None:
    """Add subcommands to the ``dockyard`` command line.

    :param register: a :class:`dockyard.api.cli_plugins.CliRegistrar`:
        ``register.api_command(name, run, help=...)`` adds a command that talks to a running
        dockyard (it gets ``--url``/``--token``; ``run(args)`` runs it);
        ``register.local_command(name, run, help=...)`` adds one that works on this host
        (``run(args, settings)``). Both return the command's ``argparse`` parser, to add
        arguments to; ``run`` returns the exit code, or an awaitable of it. A name taken by
        dockyard or another plugin is an error; a :class:`dockyard.core.errors.DockyardError`
        the handler raises is printed as one line, ``dockyard: error: ...``.

    The evaluation plugin adds ``dockyard evaluate`` and ``dockyard sandbox-image`` this way.
    A third-party plugin implements this hook to give its feature a command of its own.
    """
