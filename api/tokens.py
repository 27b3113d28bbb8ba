"""Token administration (scope ``admin``): create, list and revoke scoped tokens."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, PathParameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED
from msgspec import Meta

from dockyard.api.auth import SCOPE_NAME_RE, TokenBook, TokenRecord
from dockyard.api.errors import errors
from dockyard.core.models import Model

#: A scope's name: ``read``, ``deploy``, ``admin`` or one a loaded plugin registers
#: (``dockyard_register_token_scopes``); one no loaded plugin registers is a 400.
ScopeName = Annotated[str, Meta(pattern=SCOPE_NAME_RE.pattern)]
#: A token id in a path (the 8 hex digits after ``dy_``).
TokenId = Annotated[
    str, PathParameter(pattern=r"^[0-9a-f]{8}$", description="a token's id (8 hex digits)")
]


class TokenRequest(Model):
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._ -]{1,64}$")]
    scopes: Annotated[list[ScopeName], Meta(min_length=1, max_length=16)]


class TokenView(Model):
    """A token's record; never its secret (nor its hash)."""

    id: str
    name: str
    scopes: list[str]
    created_at: float
    revoked_at: float | None
    source: str


class CreatedToken(TokenView):
    token: str  # shown once, here


def _view(record: TokenRecord) -> TokenView:
    return TokenView(
        id=record.id,
        name=record.name,
        scopes=list(record.scopes),
        created_at=record.created_at,
        revoked_at=record.revoked_at,
        source=record.source,
    )


class TokenRoutes(Controller):
    """Bearer tokens."""

    path = "/v1/tokens"
    tags = ["tokens"]
    opt = {"scope": "admin"}

    @post(
        "/",
        operation_id="createToken",
        summary="Create a scoped token (shown once)",
        status_code=HTTP_201_CREATED,
    )
    async def create(
        self, data: JSONBody[TokenRequest], tokens: NamedDependency[TokenBook]
    ) -> CreatedToken:
        record, secret = tokens.create(data.name, data.scopes)
        return CreatedToken(
            id=record.id,
            name=record.name,
            scopes=list(record.scopes),
            created_at=record.created_at,
            revoked_at=None,
            source=record.source,
            token=secret,
        )

    @get("/", operation_id="listTokens", summary="Every token (no secrets)")
    async def list_tokens(self, tokens: NamedDependency[TokenBook]) -> list[TokenView]:
        return [_view(r) for r in tokens.records()]

    @delete(
        "/{token_id:str}",
        operation_id="revokeToken",
        summary="Revoke a token",
        status_code=HTTP_200_OK,
        responses=errors(409),
    )
    async def revoke(self, token_id: TokenId, tokens: NamedDependency[TokenBook]) -> TokenView:
        return _view(tokens.revoke(token_id))
