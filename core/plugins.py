"""The plugin manager: built-ins and third-party plugins load the same way.

``build_plugin_manager()`` makes a fresh manager (no import-time globals): it registers the
built-in plugins listed in :data:`DEFAULT_PLUGINS`, then every entry point in the group
``dockyard``, skipping names blocked by ``DOCKYARD_DISABLE_PLUGINS`` (comma-separated), and
fails loudly on an implementation that matches no hookspec (a plugin may add its own
hookspecs through ``dockyard_add_hookspecs`` as it registers). Registrar hooks are then
called once to fill the registries of runtimes, routers, stores, strategies and sources, and
of any ``dockyard_register_<kind>`` hook a plugin added (``registries.<kind>``).

Every hook is called through pluggy (``pm.hook.<name>``), so ``tryfirst``/``trylast`` and
hook wrappers are honoured; each implementation is wrapped as its plugin registers
(:func:`_attributed`) so what it registers and what it raises carry the plugin's name.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator
from importlib import metadata
from typing import Any, Generic, TypeVar

import pluggy

from dockyard.core import hookspecs
from dockyard.core.errors import DockyardError, PluginError, UnknownPluginError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dockyard"
DISABLE_ENV = "DOCKYARD_DISABLE_PLUGINS"

#: Built-in plugins, registered by name exactly like third-party ones. The first registered
#: under a kind is not special: ``Settings`` names the one in use.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("podman", "dockyard.backends.podman"),
    ("docker", "dockyard.backends.docker"),  # aiodocker loads when the runtime is built
    ("sqlite", "dockyard.plugins.sqlite_store"),
    ("git", "dockyard.plugins.git_source"),
    ("bluegreen", "dockyard.plugins.bluegreen"),
    ("protocols", "dockyard.plugins.protocols"),
    ("evaluation", "dockyard.plugins.evaluation"),
    ("telemetry", "dockyard.plugins.telemetry"),
    ("none-router", "dockyard.routers.none"),
    ("traefik-router", "dockyard.routers.traefik"),
    ("caddy-router", "dockyard.routers.caddy"),
)

T = TypeVar("T")


#: The plugin whose hook implementation is running (set by :func:`_attributed`), so a
#: registrar knows who registered what and an error names the plugin that raised it.
_current_plugin: contextvars.ContextVar[str] = contextvars.ContextVar(
    "dockyard_current_plugin", default="?"
)

#: Hooks whose implementations only observe: a failure is logged, never propagated, and
#: the other observers still run.
OBSERVER_HOOKS = frozenset({"dockyard_event"})


def current_plugin() -> str:
    """The name of the plugin whose hook implementation is running ("?" outside one)."""
    return _current_plugin.get()


class Registrar(Generic[T]):
    """What a ``dockyard_register_*`` hook receives: call it as ``register(name, factory)``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._owners: dict[str, str] = {}

    def __call__(self, name: str, factory: T) -> None:
        plugin = _current_plugin.get()
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {self.kind} with an empty name")
        if name in self._items:
            raise PluginError(
                f"{self.kind} {name!r} registered twice (by {self._owners[name]!r} and {plugin!r})"
            )
        self._items[name] = factory
        self._owners[name] = plugin

    def get(self, name: str) -> T:
        """The factory registered under ``name``; UnknownPluginError lists the known ones."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise UnknownPluginError(
                f"unknown {self.kind} {name!r}; available: {known}", kind=self.kind, name=name
            ) from None

    def owner(self, name: str) -> str:
        return self._owners[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._items.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)


class Registries:
    """Everything the registrar hooks registered, by kind.

    The core kinds are filled when first read; a plugin that adds its own registrar hookspec
    ``dockyard_register_<kind>`` (see ``dockyard_add_hookspecs``) is read the same way, as
    ``registries.<kind>`` (the evaluation plugin's ``protocols``).
    """

    KINDS = ("runtimes", "routers", "stores", "strategies", "sources")

    def __init__(self, pm: DockyardPluginManager) -> None:
        self._pm = pm
        self.runtimes: Registrar[Callable[..., Any]] = collect(pm, "runtimes", "runtime")
        self.routers: Registrar[Callable[..., Any]] = collect(pm, "routers", "router")
        self.stores: Registrar[Callable[..., Any]] = collect(pm, "stores", "store")
        self.strategies: Registrar[Callable[..., Any]] = collect(pm, "strategies", "strategy")
        self.sources: Registrar[Callable[..., Any]] = collect(pm, "sources", "source")
        self.api_handlers: Registrar[Any] = Registrar("API handler")
        call_registrar(pm, "dockyard_api_handlers", self.api_handlers)

    def kinds(self) -> list[str]:
        """The core kinds, then those plugins added (``protocols``, ...)."""
        added = sorted(
            name.removeprefix("dockyard_register_")
            for name, caller in vars(self._pm.hook).items()
            if name.startswith("dockyard_register_") and caller.spec is not None
        )
        return [*self.KINDS, *(kind for kind in added if kind not in self.KINDS)]

    def __getattr__(self, kind: str) -> Registrar[Any]:
        """A plugin-defined registry, filled once from ``dockyard_register_<kind>``."""
        caller = getattr(self._pm.hook, f"dockyard_register_{kind}", None)
        if kind.startswith("_") or caller is None or caller.spec is None:
            raise AttributeError(kind)  # no plugin defines this registrar hook
        registrar = collect(self._pm, kind, kind.rstrip("s"))
        setattr(self, kind, registrar)
        return registrar


def collect(pm: pluggy.PluginManager, kind: str, label: str) -> Registrar[Any]:
    """A registrar filled by every ``dockyard_register_<kind>`` implementation."""
    registrar: Registrar[Any] = Registrar(label)
    call_registrar(pm, f"dockyard_register_{kind}", registrar)
    return registrar


def call_registrar(pm: pluggy.PluginManager, hook_name: str, registrar: object) -> None:
    """Call a registrar hook through pluggy (``tryfirst``, ``trylast`` and wrappers are
    honoured); a failure names the plugin whose implementation raised it."""
    getattr(pm.hook, hook_name)(register=registrar)


def _attributed(plugin_name: str, hook_name: str, function: Callable[..., Any]) -> Any:
    """``function`` (one plugin's implementation of ``hook_name``) wrapped so the registrars
    know the plugin, and its failure is a PluginError naming it (a DockyardError passes as
    it is: a policy's refusal is the caller's answer). An observer's failure is logged and
    swallowed, awaited or not, so the next observer still runs."""
    observer = hook_name in OBSERVER_HOOKS

    async def observed(value: Awaitable[Any]) -> Any:
        try:
            return await value
        except Exception:
            log.exception("plugin %r failed in %s", plugin_name, hook_name)
            return None

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        token = _current_plugin.set(plugin_name)
        try:
            result = function(*args, **kwargs)
        except DockyardError:
            raise
        except Exception as exc:
            if observer:
                log.exception("plugin %r failed in %s", plugin_name, hook_name)
                return None
            raise PluginError(f"plugin {plugin_name!r} failed in {hook_name}: {exc}") from exc
        finally:
            _current_plugin.reset(token)
        if observer and inspect.isawaitable(result):
            return observed(result)
        return result

    return call


def _attributed_wrapper(plugin_name: str, function: Callable[..., Any]) -> Any:
    """A hook wrapper (``wrapper=True`` or ``hookwrapper=True``, a generator) whose code
    before and after its ``yield`` runs with its plugin's name attached, so what it registers
    is attributed to it; while it waits at the ``yield``, the other implementations run
    under their own names."""

    def steps(generator: Generator[Any, Any, Any]) -> Generator[Any, Any, Any]:
        token = _current_plugin.set(plugin_name)
        try:
            value = next(generator)
        finally:
            _current_plugin.reset(token)
        while True:
            try:
                sent = yield value
            except BaseException as exc:
                token = _current_plugin.set(plugin_name)
                try:
                    value = generator.throw(exc)
                except StopIteration as stop:
                    return stop.value
                finally:
                    _current_plugin.reset(token)
            else:
                token = _current_plugin.set(plugin_name)
                try:
                    value = generator.send(sent)
                except StopIteration as stop:
                    return stop.value
                finally:
                    _current_plugin.reset(token)

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        return steps(function(*args, **kwargs))

    return call


class DockyardPluginManager(pluggy.PluginManager):
    """pluggy's manager with dockyard's hookspecs, registries and plugin metadata."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self._registries: Registries | None = None
        self.versions: dict[str, str] = {}
        self.disabled: set[str] = set()
        # Historic: a plugin registered later still gets the call, so its hookspecs exist
        # before check_pending() looks for implementations without one.
        self.hook.dockyard_add_hookspecs.call_historic(kwargs={"add": self.add_hookspecs})

    def register(self, plugin: object, name: str | None = None) -> str | None:
        """Register ``plugin``; each of its implementations is wrapped (:func:`_attributed`)
        so pluggy calls it with the plugin's name attached to what it registers or raises;
        a hook wrapper (``wrapper=True``) gets its name around its own code
        (:func:`_attributed_wrapper`), its exceptions left as they are."""
        plugin_name = super().register(plugin, name)
        if plugin_name is None:
            return None
        for caller in self.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                if impl.wrapper or impl.hookwrapper:
                    impl.function = _attributed_wrapper(plugin_name, impl.function)
                else:
                    impl.function = _attributed(plugin_name, caller.name, impl.function)
        return plugin_name

    @property
    def registries(self) -> Registries:
        """Registries filled by the registrar hooks, computed once."""
        if self._registries is None:
            self._registries = Registries(self)
        return self._registries

    def describe(self) -> list[dict[str, Any]]:
        """Name, version, module and implemented hooks of every registered plugin."""
        out = []
        for name, plugin in sorted(self.list_name_plugin(), key=lambda item: item[0]):
            if plugin is None:
                continue
            hooks = sorted(c.name for c in self.get_hookcallers(plugin) or [])
            module = getattr(plugin, "__name__", type(plugin).__module__)
            out.append(
                {
                    "name": name,
                    "version": self.versions.get(name, ""),
                    "module": module,
                    "hooks": hooks,
                }
            )
        return out


def _disabled_names(disable: Iterable[str] | None) -> set[str]:
    names = set(disable or ())
    raw = os.environ.get(DISABLE_ENV, "")
    names.update(n.strip() for n in raw.split(",") if n.strip())
    return names


def dockyard_version() -> str:
    try:
        return metadata.version("dockyard")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def build_plugin_manager(
    disable: Iterable[str] | None = None,
    *,
    extra_plugins: Iterable[tuple[str, object]] = (),
    load_entry_points: bool = True,
) -> DockyardPluginManager:
    """A fresh plugin manager with built-ins, entry-point plugins and ``extra_plugins``.

    :param disable: plugin names to block, added to ``DOCKYARD_DISABLE_PLUGINS``.
    :param extra_plugins: ``(name, plugin)`` pairs to register too (tests, embedding).
    :raises PluginError: a plugin fails to import or implements a hook with no spec.
    """
    pm = DockyardPluginManager()
    pm.disabled = _disabled_names(disable)
    for name in sorted(pm.disabled):
        pm.set_blocked(name)
    own_version = dockyard_version()
    for name, module_path in DEFAULT_PLUGINS:
        if pm.is_blocked(name):
            continue
        pm.register(importlib.import_module(module_path), name=name)
        pm.versions[name] = own_version
    if load_entry_points:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
            _register(pm, plugin, ep.name)
            pm.versions[ep.name] = ep.dist.version if ep.dist else ""
    for name, plugin in extra_plugins:
        if not pm.is_blocked(name):
            _register(pm, plugin, name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {pm.get_name(exc.plugin)!r}: {exc}") from None
    return pm


def _register(pm: DockyardPluginManager, plugin: object, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise PluginError(f"plugin {name!r} cannot be registered: {exc}") from None
    except DockyardError:
        raise
    except Exception as exc:  # its dockyard_add_hookspecs, called as it registers
        raise PluginError(f"plugin {name!r} failed while registering: {exc}") from exc


async def await_me_maybe(value: Any) -> Any:
    """Await ``value`` if it is awaitable, return it otherwise."""
    if inspect.isawaitable(value):
        return await value
    return value


async def call_all(results: Iterable[Any | Awaitable[Any]]) -> list[Any]:
    """Await every awaitable among a hook's results, in order."""
    return [await await_me_maybe(r) for r in results]


async def emit_event(pm: pluggy.PluginManager, event: Any) -> None:
    """Hand ``event`` to every ``dockyard_event`` observer, through pluggy; an observer's
    failure is logged (naming it) and never propagated (see :func:`_attributed`)."""
    await call_all(pm.hook.dockyard_event(event=event))


async def check_spec(pm: pluggy.PluginManager, spec: Any) -> None:
    """Run every ``dockyard_check_spec`` policy, in pluggy's order; the first that raises
    refuses ``spec``."""
    results = pm.hook.dockyard_check_spec(spec=spec)
    try:
        for result in results:
            await await_me_maybe(result)
    finally:
        for result in results:  # a refusal leaves the later policies' coroutines unawaited
            if inspect.iscoroutine(result):
                result.close()
