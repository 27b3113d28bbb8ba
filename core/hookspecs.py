"""dockyard's hook specifications: every way a plugin can extend dockyard.

A plugin is a module or object with functions marked ``@dockyard.core.hookimpl`` and named
after a hook below. Built-in runtimes, stores and flows are ordinary plugins that use these
same hooks. Third-party plugins ship as packages exposing an entry point in the group
``dockyard`` (see the README's "Writing a plugin").

Hooks may return awaitables; dockyard awaits them (pluggy itself is synchronous).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from dockyard.core.models import DeploymentSpec, Event
    from dockyard.core.plugins import Registrar

PROJECT = "dockyard"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ----------------------------------------------------------------------------------------
# Registrars: called once when the plugin manager is built. Each receives a registrar
# object; call ``register(name, factory)``. A name registered twice is an error.
# ----------------------------------------------------------------------------------------


@hookspec
def dockyard_register_runtimes(register: Registrar) -> None:
    """Register container runtimes (Podman, Docker, ...).

    :param register: call ``register(name, factory)``; ``factory(settings)`` returns a
        :class:`dockyard.core.runtime.Runtime`, and ``settings.runtime`` selects one by name.

    A third-party plugin implements this hook to ship a new container engine; its runtime
    must pass ``dockyard.testing.runtime_contract`` (``pytest --dockyard-runtime=NAME``).
    """


@hookspec
def dockyard_register_routers(register: Registrar) -> None:
    """Register reverse-proxy routers (Traefik, Caddy, none).

    :param register: call ``register(name, factory)``; ``factory(settings)`` returns a router,
        and ``settings.router`` selects one by name.

    A third-party plugin implements this hook to put deployments behind another proxy.
    """


@hookspec
def dockyard_register_stores(register: Registrar) -> None:
    """Register state stores (SQLite, ...).

    :param register: call ``register(name, factory)``; ``factory(settings)`` returns a
        :class:`dockyard.core.store.StateStore`, and ``settings.store`` selects one by name.

    A third-party plugin implements this hook to keep state elsewhere; its store must pass
    ``dockyard.testing.store_contract`` (``pytest --dockyard-store=NAME``).
    """


@hookspec
def dockyard_register_strategies(register: Registrar) -> None:
    """Register deploy strategies (blue/green, ...).

    :param register: call ``register(name, factory)``; ``settings.strategy`` selects one.

    A third-party plugin implements this hook to roll out revisions another way.
    """


@hookspec
def dockyard_register_protocols(register: Registrar) -> None:
    """Register agent protocols (Autoppia's ``step`` and ``solve_task``, ...).

    :param register: call ``register(name, factory)``; ``factory(settings)`` returns a
        :class:`dockyard.plugins.protocols.AgentProtocol` whose ``solve(agent, task)`` relays
        one task and returns a normalized ``TaskAnswer``; an evaluation names its protocol
        (built in: ``solve_task``, ``step``, ``act``).

    A third-party plugin implements this hook to relay tasks in another agent protocol.
    """


@hookspec
def dockyard_register_sources(register: Registrar) -> None:
    """Register source fetchers (git, ...).

    :param register: call ``register(name, factory)``; a deployment's repository URL is
        fetched by the source that accepts it.

    A third-party plugin implements this hook to fetch code from somewhere other than git.
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
def dockyard_api_handlers(register: Registrar) -> None:
    """Add HTTP routes to dockyard's API.

    :param register: call ``register(name, handler)`` with a Litestar route handler,
        controller or router; it is mounted as-is on the app. Every handler must declare
        the token scope it needs, ``opt={"scope": "read"|"deploy"|"evaluate"|"admin"}``;
        one that declares none is refused to everybody (403).

    A third-party plugin implements this hook to expose its own endpoints.
    """
