"""Request-scoped dependencies: the context and the caller's credential."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

from api.schemas.wire import CaSelectorText
from ca.config import Context
from ca.errors import AuthenticationFailed, InvalidInput
from ca.tokens import AdminPrincipal, authenticate_admin

# Path parameters the ``ca`` lookups judge, each with one message for every bad value: a
# pattern here answered some values with pydantic's wording and its regex, and the rest with
# Trellis's (``/v1/crl/mesh/zz.crl`` and ``/00.crl``, ``MESH`` and ``nope``). The pattern
# ``/openapi.json`` shows (``api.schemas.wire``) is not enforced: ``ca`` still judges.
AuthorityName = Annotated[
    str, Path(description="The authority's name (mesh, ...): one that does not exist is 404")
]
CaSelector = Annotated[
    CaSelectorText,
    Path(description="root, intermediate (the active ones) or a CA serial in hex: else 400"),
]

_bearer = HTTPBearer(auto_error=False, description="Admin token, join token or renewal proof")


async def get_context(request: Request) -> Context:
    ctx = request.app.state.ctx
    assert isinstance(ctx, Context)
    return ctx


_MISSING_BEARER = "an 'Authorization: Bearer ...' credential is required"


def one_authorization(request: Request) -> str | None:
    """The request's one ``Authorization`` field. RFC 9110 §11.6.2 allows one credential, and
    Starlette's ``headers.get`` read only the first of two: a good token first and anything
    second was served, while a proxy or a log reading the last saw the other. Two are 400,
    whatever they hold."""
    fields = request.headers.getlist("authorization")
    if len(fields) > 1:
        raise InvalidInput(
            f"{len(fields)} Authorization header fields: send one (RFC 9110 §11.6.2)"
        )
    return fields[0] if fields else None


async def bearer(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    one_authorization(request)
    if credentials is None or not credentials.credentials:
        raise AuthenticationFailed(_MISSING_BEARER)
    return credentials.credentials


def bearer_credential(request: Request) -> str:
    """``bearer`` for the plain routes (``api.routes.svid``), which run no dependencies: the
    same rules as ``one_authorization``, ``HTTPBearer`` then ``bearer``."""
    scheme, credential = get_authorization_scheme_param(one_authorization(request))
    if not credential or scheme.lower() != "bearer":
        raise AuthenticationFailed(_MISSING_BEARER)
    return credential


async def well_formed_url(request: Request) -> None:
    """``api.schemas.RequestBody``'s rule for the URL, run before every routed operation that
    takes no admin credential; one that does runs it once the credential has passed
    (``admin``): a caller with none is told 401, a join token 403, whatever the URL holds
    (docs/api.md). U+0000 (``%00``) in a query parameter the operation reads is malformed
    input, 400 (those it does not read reach nothing). In the path it never gets here: a path
    holding any control character is an unknown path, 404 (``api.plainpath``), before it
    reaches a lookup PostgreSQL cannot run.

    A query parameter the operation reads may also be given only once: FastAPI keeps the last
    value, so ``?force=false&force=true`` forced a rotation that a reader of the first value
    (a proxy's log, a policy check) saw refused. Trellis declares no list-valued one."""
    route = request.scope.get("route")
    if request.scope["query_string"] and isinstance(route, APIRoute) and not _takes_admin(route):
        _check_query(request, route)


def _takes_admin(route: APIRoute) -> bool:
    """Whether ``route`` depends on ``admin``: the same for every request, so worked out once
    and kept on the route (which is not hashable, so no cache keyed by it)."""
    found: bool | None = getattr(route, "_trellis_takes_admin", None)
    if found is None:
        found = _depends_on_admin(route.dependant)
        setattr(route, "_trellis_takes_admin", found)  # noqa: B010 (not an attribute of its class)
    return found


def _depends_on_admin(dependant: Dependant) -> bool:
    return any(sub.call is admin or _depends_on_admin(sub) for sub in dependant.dependencies)


def _check_query(request: Request, route: APIRoute) -> None:
    if not request.scope["query_string"]:
        return
    for parameter in route.dependant.query_params:
        values = request.query_params.getlist(parameter.alias)
        if any("\x00" in value for value in values):
            raise InvalidInput(f"query parameter {parameter.alias!r} holds NUL (U+0000)")
        if len(values) > 1:
            raise InvalidInput(
                f"query parameter {parameter.alias!r} is given {len(values)} times: give it once"
            )


def _true_or_false(value: object) -> object:
    if value == "true" or value == "false":
        return value == "true"
    raise PydanticCustomError("bool_parsing", "give true or false")


# A boolean query parameter, spelt as OpenAPI and docs/api.md spell it: pydantic's bool also
# took yes, on, 1 and TRUE, so ``?force=yes`` rotated while the body's {"force": "yes"} is 400.
QueryBool = Annotated[bool, BeforeValidator(_true_or_false)]


CtxDep = Annotated[Context, Depends(get_context)]
BearerDep = Annotated[str, Depends(bearer)]


def admin(ctx: CtxDep, secret: BearerDep, request: Request) -> AdminPrincipal:
    """The admin credential, then the URL (``well_formed_url``): FastAPI runs an application's
    dependencies before a route's own, so a URL judged there answered a caller with no
    credential 400 (``?limit=1&limit=2``) where docs/api.md promises 401."""
    principal = authenticate_admin(ctx, secret)
    route = request.scope.get("route")
    if isinstance(route, APIRoute):
        _check_query(request, route)
    return principal


AdminDep = Annotated[AdminPrincipal, Depends(admin)]
