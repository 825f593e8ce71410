"""Authority status, rotation and scheduled jobs (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import AdminDep, AuthorityName, CtxDep, QueryBool
from api.problems import PROBLEM_RESPONSES, responses
from api.schemas import AuthorityStatusOut, JobOut, RotateRequest, TransitionOut
from ca.errors import InvalidInput
from ca.rotation import authority_status, rotate
from ca.scheduler import job_statuses

router = APIRouter(prefix="/v1", tags=["authorities"], responses=PROBLEM_RESPONSES)


@router.get("/authorities/{authority}", response_model=AuthorityStatusOut, responses=responses(404))
def get_status(authority: AuthorityName, ctx: CtxDep, _admin: AdminDep) -> AuthorityStatusOut:
    return AuthorityStatusOut.of(authority_status(ctx, authority))


@router.post(
    "/authorities/{authority}/rotate",
    response_model=list[TransitionOut],
    responses=responses(404, 409),
    summary="Perform due transitions; force=true performs the next one now",
)
def rotate_now(
    authority: AuthorityName,
    ctx: CtxDep,
    admin: AdminDep,
    body: RotateRequest | None = None,
    force: Annotated[
        QueryBool | None,
        Query(description="true or false: the body's force, for callers without one"),
    ] = None,
) -> list[TransitionOut]:
    """The body is read as revoke-intermediate's is (unknown fields, or JSON that does not
    parse, refused): ignored, {"force": true} was a silent no-op. The query is as strict as
    the body's JSON boolean (``api.deps.QueryBool``)."""
    given = body is not None and "force" in body.model_fields_set
    if given and force is not None:
        raise InvalidInput("give force in the body or in the query, not both")
    forced = body.force if body is not None and given else bool(force)
    done = rotate(ctx, authority, force=forced, actor=str(admin))
    return [TransitionOut(event=t.event, serial=t.serial, at=t.at) for t in done]


@router.get("/jobs", response_model=list[JobOut])
def list_jobs(ctx: CtxDep, _admin: AdminDep) -> list[JobOut]:
    return [JobOut.of(status) for status in job_statuses(ctx)]
