"""The served OpenAPI document says what the API really accepts and answers.

Litestar builds the document from the handlers; two things it gets wrong for msgspec models
are put right here, once, when the app starts:

* a constraint on an optional field (``Annotated[float, Meta(gt=0)] | None``) is dropped
  or placed beside the ``oneOf``, and a model that refuses unknown fields
  (``forbid_unknown_fields``) is shown as accepting them;
* so every component schema that is a msgspec model is replaced by msgspec's own JSON
  schema of it, which is what the request decoder enforces.

Error responses are documented by ``dockyard.api.errors.document_errors``.
"""

from __future__ import annotations

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


def serve_true_schema(app: Litestar) -> None:
    """On startup: build the OpenAPI document once and correct it before it is served."""
    true_component_schemas(app.plugins.get(OpenAPIPlugin).provide_openapi_schema())


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
