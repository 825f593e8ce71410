"""Request-scoped dependencies: the context and the caller's credential."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ca.config import Context
from ca.errors import AuthenticationFailed
from ca.tokens import AdminPrincipal, authenticate_admin

_bearer = HTTPBearer(auto_error=False, description="Admin token, join token or renewal proof")


async def get_context(request: Request) -> Context:
    ctx = request.app.state.ctx
    assert isinstance(ctx, Context)
    return ctx


async def bearer(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    if credentials is None or not credentials.credentials:
        raise AuthenticationFailed("an 'Authorization: Bearer ...' credential is required")
    return credentials.credentials


CtxDep = Annotated[Context, Depends(get_context)]
BearerDep = Annotated[str, Depends(bearer)]


def admin(ctx: CtxDep, secret: BearerDep) -> AdminPrincipal:
    return authenticate_admin(ctx, secret)


AdminDep = Annotated[AdminPrincipal, Depends(admin)]
