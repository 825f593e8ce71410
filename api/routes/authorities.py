"""Authority status, rotation and scheduled jobs (admin)."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import AdminDep, AuthorityName, CtxDep
from api.problems import PROBLEM_RESPONSES, responses
from api.schemas import AuthorityStatusOut, JobOut, TransitionOut
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
    authority: AuthorityName, ctx: CtxDep, admin: AdminDep, force: bool = False
) -> list[TransitionOut]:
    done = rotate(ctx, authority, force=force, actor=str(admin))
    return [TransitionOut(event=t.event, serial=t.serial, at=t.at) for t in done]


@router.get("/jobs", response_model=list[JobOut])
def list_jobs(ctx: CtxDep, _admin: AdminDep) -> list[JobOut]:
    return [JobOut.of(status) for status in job_statuses(ctx)]
