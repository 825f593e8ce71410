"""Registration entries (admin)."""

from __future__ import annotations

from fastapi import APIRouter, status

from api.deps import AdminDep, CtxDep
from api.problems import PROBLEM_RESPONSES, responses
from api.schemas import EntryCreate, EntryOut
from ca import entries
from ca.durations import Ttl
from ca.identity import SpiffeId

router = APIRouter(prefix="/v1/entries", tags=["entries"], responses=PROBLEM_RESPONSES)


@router.post(
    "", response_model=EntryOut, status_code=status.HTTP_201_CREATED, responses=responses(409)
)
def create_entry(body: EntryCreate, ctx: CtxDep, admin: AdminDep) -> EntryOut:
    params = entries.EntryParams(
        spiffe_id=SpiffeId.parse(body.spiffe_id),
        dns_names=tuple(body.dns_names),
        ttl=Ttl.parse(body.ttl) if body.ttl else None,
        max_ttl=Ttl.parse(body.max_ttl) if body.max_ttl else None,
    )
    return EntryOut.of(entries.create_entry(ctx, params, actor=str(admin)))


@router.get("", response_model=list[EntryOut])
def list_entries(ctx: CtxDep, _admin: AdminDep) -> list[EntryOut]:
    return [EntryOut.of(entry) for entry in entries.list_entries(ctx)]


@router.get("/{entry_id}", response_model=EntryOut, responses=responses(404))
def show_entry(entry_id: str, ctx: CtxDep, _admin: AdminDep) -> EntryOut:
    return EntryOut.of(entries.get_entry(ctx, entry_id))


@router.delete("/{entry_id}", response_model=EntryOut, responses=responses(404))
def delete_entry(entry_id: str, ctx: CtxDep, admin: AdminDep) -> EntryOut:
    return EntryOut.of(entries.delete_entry(ctx, entry_id, actor=str(admin)))


@router.post("/{entry_id}/disable", response_model=EntryOut, responses=responses(404))
def disable_entry(entry_id: str, ctx: CtxDep, admin: AdminDep) -> EntryOut:
    """No certificate is issued or renewed for a disabled entry until it is enabled again."""
    return EntryOut.of(entries.set_entry_enabled(ctx, entry_id, enabled=False, actor=str(admin)))


@router.post("/{entry_id}/enable", response_model=EntryOut, responses=responses(404))
def enable_entry(entry_id: str, ctx: CtxDep, admin: AdminDep) -> EntryOut:
    return EntryOut.of(entries.set_entry_enabled(ctx, entry_id, enabled=True, actor=str(admin)))
