"""The served OpenAPI document says what the API really accepts and answers.

Litestar builds the document from the handlers; two things it gets wrong for msgspec models
are put right here, once, when the app starts:

* a constraint on an optional field (``Annotated[float, Meta(gt=0)] | None``) is dropped
  or placed beside the ``oneOf``, and a model that refuses unknown fields
  (``forbid_unknown_fields``) is shown as accepting them;
* so every component schema that is a msgspec model is replaced by msgspec's own JSON
  schema of it, which is what the request decoder enforces.

A query filter a plugin registers (an event tag on the event routes, a status filter on
``GET /v1/status``) is read from the query by name, not from the handler's signature; it is
added here as a query parameter of its operations, so clients see it.

Error responses are documented by ``dockyard.api.errors.document_errors``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from litestar import Litestar
from litestar._openapi.plugin import OpenAPIPlugin
from litestar.routes import HTTPRoute

REF_TEMPLATE = "#/components/schemas/{name}"


def _structs() -> dict[str, type[msgspec.Struct]]:
    """Every msgspec model class loaded, by name; names two classes share are left out."""
    found: dict[str, type[msgspec.Struct]] = {}
    shared: set[str] = set()
    todo = list(msgspec.Struct.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__name__ in found and found[cls.__name__] is not cls:
            shared.add(cls.__name__)
        found[cls.__name__] = cls
    return {name: cls for name, cls in found.items() if name not in shared}


def true_component_schemas(document: dict[str, Any]) -> None:
    """Replace (in place) the component schemas of msgspec models by msgspec's own."""
    components = document.get("components", {}).get("schemas", {})
    structs = _structs()
    types = [structs[name] for name in components if name in structs]
    if not types:
        return
    _, generated = msgspec.json.schema_components(types, ref_template=REF_TEMPLATE)
    for name, schema in generated.items():
        components[name] = schema


#: Query parameters to add, by operation id (each an OpenAPI parameter object).
QueryFilters = Mapping[str, list[dict[str, Any]]]


def add_query_filters(document: dict[str, Any], filters: QueryFilters) -> None:
    """Add (in place) each operation's registered filters as query parameters."""
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict) or operation.get("operationId") not in filters:
                continue
            parameters = operation.setdefault("parameters", [])
            present = {(p.get("name"), p.get("in")) for p in parameters}
            for parameter in filters[operation["operationId"]]:
                if (parameter["name"], "query") not in present:
                    parameters.append(parameter)


@dataclass(frozen=True)
class PluginParts:
    """What the loaded plugins add to the API's shape: query filters by operation id, the
    event tags (each a deprecated ``<tag>_id`` key of an event's JSON) and the token
    scopes a token request may name."""

    filters: QueryFilters = field(default_factory=dict)
    tag_names: tuple[str, ...] = ()
    scope_names: tuple[str, ...] = ()


def document_plugin_parts(document: dict[str, Any], parts: PluginParts) -> None:
    """Add (in place) the plugins' filters, event tag keys and token scopes."""
    add_query_filters(document, parts.filters)
    components = document.get("components", {}).get("schemas", {})
    event = components.get("StreamEvent", {}).get("properties")
    if event is not None:
        for name in parts.tag_names:
            event[f"{name}_id"] = {
                "anyOf": [{"type": "string"}, {"type": "null"}],
                "deprecated": True,
                "description": f"the {name!r} tag (deprecated for one release: read tags)",
            }
    scopes = components.get("TokenRequest", {}).get("properties", {}).get("scopes")
    if scopes is not None and parts.scope_names:
        scopes["items"] = {"type": "string", "enum": list(parts.scope_names)}


def serve_true_schema(app: Litestar, parts: PluginParts | None = None) -> None:
    """On startup: build the OpenAPI document once and correct it before it is served."""
    document = app.plugins.get(OpenAPIPlugin).provide_openapi_schema()
    true_component_schemas(document)
    document_plugin_parts(document, parts or PluginParts())


def fix_options_allow(app: Litestar) -> None:
    """Make every automatic ``OPTIONS`` answer list all the methods of its path.

    Litestar 2 builds a path's ``OPTIONS`` handler with the path's first route and keeps it
    when later handlers on the same path replace that route, so ``Allow`` misses their
    methods (``GET /v1/tokens`` and ``POST /v1/tokens``: ``Allow: OPTIONS, POST``). The
    handler reads ``methods`` from the route it was made with: point it at the final one.
    """
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            fn = getattr(handler, "fn", None)
            if getattr(fn, "__name__", "") != "options_handler" or not fn.__closure__:
                continue
            for cell in fn.__closure__:
                if isinstance(cell.cell_contents, HTTPRoute):
                    cell.cell_contents = route
