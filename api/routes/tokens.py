"""Join and admin tokens (admin)."""

from __future__ import annotations

from fastapi import APIRouter, status

from api.deps import AdminDep, CtxDep
from api.problems import PROBLEM_RESPONSES, responses
from api.schemas import TokenCreate, TokenCreated, TokenOut
from ca import tokens
from ca.durations import Ttl
from ca.errors import InvalidInput

router = APIRouter(prefix="/v1/tokens", tags=["tokens"], responses=PROBLEM_RESPONSES)


@router.post(
    "",
    response_model=TokenCreated,
    status_code=status.HTTP_201_CREATED,
    responses=responses(404),
)
def create_token(body: TokenCreate, ctx: CtxDep, admin: AdminDep) -> TokenCreated:
    if body.admin == (body.entry_id is not None):
        raise InvalidInput("give either entry_id (a join token) or admin: true")
    if body.admin:
        if "uses" in body.model_fields_set:
            raise InvalidInput("'uses' applies to join tokens only")
        ttl = Ttl.parse(body.ttl) if body.ttl else None
        info, secret = tokens.create_admin_token(ctx, body.description, ttl=ttl, actor=str(admin))
    else:
        assert body.entry_id is not None
        info, secret = tokens.create_join_token(
            ctx,
            body.entry_id,
            uses=body.uses,
            ttl=Ttl.parse(body.ttl) if body.ttl else tokens.DEFAULT_JOIN_TTL,
            description=body.description,
            actor=str(admin),
        )
    return TokenCreated(**TokenOut.of(info).model_dump(), token=secret)


@router.get("", response_model=list[TokenOut])
def list_tokens(ctx: CtxDep, _admin: AdminDep) -> list[TokenOut]:
    return [TokenOut.of(info) for info in tokens.list_tokens(ctx)]


@router.post("/{token_id}/revoke", response_model=TokenOut, responses=responses(404))
def revoke_token(token_id: str, ctx: CtxDep, admin: AdminDep) -> TokenOut:
    return TokenOut.of(tokens.revoke_token(ctx, token_id, actor=str(admin)))
