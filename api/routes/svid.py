"""Workload-facing issuance: bootstrap with a join token, renew with a proof of possession.

The two hottest routes. Where the issuing keys are files (``Context.signs_locally``) an
issuance runs in place on the event loop: it is CPU work plus two short reads, and handing it to
a thread cost more than the issuance itself (1.1 ms of CPU per request on SQLite; on PostgreSQL
in-place issuance took c=16 from ~505 to ~710 certs/s; docs/benchmarks.md). The requests the
loop has ready share one commit, made on the loop for SQLite and on a committing thread for
PostgreSQL (``ca.store.batch``). With Vault every signature waits on the network, so those
issuances run on a small thread pool of their own, where concurrent ones also share a commit.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi import APIRouter

from api.deps import BearerDep, CtxDep
from api.problems import PROBLEM_RESPONSES
from api.schemas import SvidRequest, SvidResponse
from ca.config import Context
from ca.durations import Ttl
from ca.grants import join_grant, renewal_grant
from ca.issue import Grant, IssuedSvid, issue_svid, issue_svid_async

# Issuances that wait on PostgreSQL or Vault run here, not in the shared anyio thread pool (40
# threads): past a few threads they only contend for the GIL. With 8, c=64 on PostgreSQL went
# from 216 to ~380 certs/s and p99 from 2.4 to 1.2-1.3 s (docs/benchmarks.md).
_EXECUTOR = ThreadPoolExecutor(max_workers=8, thread_name_prefix="issue")
router = APIRouter(prefix="/v1/svid", tags=["svid"], responses=PROBLEM_RESPONSES)


def _render(svid: IssuedSvid, spiffe_id: str) -> SvidResponse:
    return SvidResponse(
        spiffe_id=spiffe_id,
        serial=svid.serial.hex,
        expires_at=svid.expires_at,
        certificate=svid.certificate_pem.decode(),
        chain=svid.chain_pem.decode(),
        bundle=svid.bundle_pem.decode(),
    )


async def _issue(
    ctx: Context, body: SvidRequest, authenticate: Callable[[bytes], Grant]
) -> SvidResponse:
    csr = body.csr.encode()
    ttl = Ttl.parse(body.ttl) if body.ttl else None
    if ctx.signs_locally:
        grant = authenticate(csr)
        svid = await issue_svid_async(ctx, grant, csr, ttl)
        return _render(svid, str(grant.spiffe_id))

    def in_thread() -> SvidResponse:
        grant = authenticate(csr)
        return _render(issue_svid(ctx, grant, csr, ttl), str(grant.spiffe_id))

    # With the request's context (its request id in the log lines), as anyio's pool would.
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, context.run, in_thread)


@router.post("", response_model=SvidResponse, summary="Issue an X509-SVID with a join token")
async def request_svid(body: SvidRequest, ctx: CtxDep, token: BearerDep) -> SvidResponse:
    return await _issue(ctx, body, lambda _csr: join_grant(ctx, token))


@router.post(
    "/renew",
    response_model=SvidResponse,
    summary="Renew an X509-SVID, proving possession of the current one's key",
    description="The bearer credential is a renewal proof: a JWT signed with the current SVID's "
    "key, naming its serial, bound to this CSR's SHA-256, used once (see docs/api.md).",
)
async def renew_svid(body: SvidRequest, ctx: CtxDep, proof: BearerDep) -> SvidResponse:
    return await _issue(ctx, body, lambda csr: renewal_grant(ctx, proof, csr))
