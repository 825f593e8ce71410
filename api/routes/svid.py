"""Workload-facing issuance: bootstrap with a join token, renew with a proof of possession.

The two hottest routes, served twice over the same ``_issue``: as plain handlers, which the
application answers before its middleware stack (``api.app.TrellisApi``), and as the FastAPI
operations below, which document the contract in /openapi.json and answer only if the plain
handlers are left out (tests/api/test_svid_plain_routes.py sends both the same requests and
compares the answers).
FastAPI's per-request machinery (dependency solving, body and response-model validation,
included-router dispatch) cost ~135 µs of CPU per issuance, a tenth of a whole request
(docs/benchmarks.md).

Where the issuing keys are files (``Context.signs_locally``) an
issuance runs in place on the event loop: it is CPU work plus two short reads, and handing it to
a thread cost more than the issuance itself (1.1 ms of CPU per request on SQLite; on PostgreSQL
in-place issuance took c=16 from ~505 to ~710 certs/s; docs/benchmarks.md). The requests the
loop has ready share one commit, made on the loop for SQLite and, for PostgreSQL, by a task of
the loop through the asynchronous driver (``ca.store.batch``). With Vault every signature waits
on the network, so those issuances run on a small thread pool of their own, where concurrent
ones also share a commit.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Body
from fastapi.exceptions import RequestValidationError
from pydantic import SkipValidation, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp

from api.deps import BearerDep, CtxDep, bearer_credential
from api.limits import BodyLimit
from api.problems import PROBLEM_RESPONSES, answering_problems
from api.requestid import RequestId
from api.schemas import SvidRequest, SvidResponse
from ca.config import Context
from ca.durations import Ttl
from ca.errors import AuthenticationFailed, InternalError, TrellisError
from ca.grants import join_grant, join_grant_async, renewal_grant, renewal_grant_async
from ca.issue import Grant, IssuedSvid, issue_svid, issue_svid_async, refused, under_way

# Issuances whose signatures wait on Vault run here, not in the shared anyio thread pool (40
# threads): past a few threads they only contend for the GIL (measured when PostgreSQL
# issuances ran here too: with 8, c=64 went from 216 to ~380 certs/s; docs/benchmarks.md).
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


@dataclass(frozen=True, slots=True)
class _Authenticate:
    """A presented credential's grant for a CSR: in place on the loop, or in a thread."""

    on_loop: Callable[[bytes | None], Awaitable[Grant]]
    in_thread: Callable[[bytes | None], Grant]


def _ttl(body: SvidRequest, grant: Grant) -> Ttl | None:
    """Read once the credential is judged (see ``_issue``), outside ``issue_svid``'s measured
    pipeline: a bad one is counted here as that would count it (``invalid-input``)."""
    if not body.ttl:
        return None
    try:
        return Ttl.parse(body.ttl)
    except TrellisError as error:
        refused(error, grant.authority, grant.profile)
        raise


def _csr(document: Any) -> bytes | None:
    """The body's CSR before its fields are checked, for the renewal proof bound to it. None:
    the body holds no string ``csr``, so it is no request; a renewal proof is then judged
    without one (``ca.grants``) and the body refused after it, as for a join token. Once the
    fields are checked it is the CSR issued for (the same string)."""
    csr = document.get("csr") if isinstance(document, dict) else None
    # A lone surrogate is no PEM: it fails to decode here, and the fields' check refuses it.
    return csr.encode(errors="surrogatepass") if isinstance(csr, str) else None


def _checked(document: Any, csr: bytes | None) -> tuple[SvidRequest, bytes]:
    """The body's fields, checked once the credential is (400 ``invalid-request``)."""
    body = _svid_request(document)
    if csr is None:  # a body whose fields check out holds a string csr (``_csr``)
        raise InternalError("the request's CSR was lost between its reading and its check")
    return body, csr


async def _issue(ctx: Context, document: Any, authenticate: _Authenticate) -> SvidResponse:
    """``document`` is the JSON body, its fields unchecked: the credential is judged before
    them (the schema's here, then the TTL; the CSR in ``issue_svid``, or with a renewal proof,
    which is bound to it), so an unauthenticated caller learns nothing about its body and is
    counted as ``unauthenticated``. Authenticating spends nothing, so a body refused after it
    leaves the join token or the renewal proof unused."""
    csr = _csr(document)
    if ctx.signs_locally:
        with under_way(ctx):
            grant = await authenticate.on_loop(csr)
            body, pem = _checked(document, csr)
            svid = await issue_svid_async(ctx, grant, pem, _ttl(body, grant))
        return _render(svid, str(grant.spiffe_id))

    def in_thread() -> SvidResponse:
        grant = authenticate.in_thread(csr)
        body, pem = _checked(document, csr)
        return _render(issue_svid(ctx, grant, pem, _ttl(body, grant)), str(grant.spiffe_id))

    # With the request's context (its request id in the log lines), as anyio's pool would.
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, context.run, in_thread)


# The body as sent, once FastAPI has found one and parsed it: its fields are checked in
# ``_issue``, after the credential. /openapi.json shows SvidRequest's schema for it.
_Unchecked = Annotated[SkipValidation[SvidRequest], Body(title="SvidRequest")]


@router.post("", response_model=SvidResponse, summary="Issue an X509-SVID with a join token")
async def request_svid(body: _Unchecked, ctx: CtxDep, token: BearerDep) -> SvidResponse:
    return await _issue(ctx, body, _by_join_token(ctx, token))


@router.post(
    "/renew",
    response_model=SvidResponse,
    summary="Renew an X509-SVID, proving possession of the current one's key",
    description="The bearer credential is a renewal proof: a JWT signed with the current SVID's "
    "key, naming its serial, bound to this CSR's SHA-256, used once (see docs/api.md).",
)
async def renew_svid(body: _Unchecked, ctx: CtxDep, proof: BearerDep) -> SvidResponse:
    return await _issue(ctx, body, _by_renewal_proof(ctx, proof))


# The plain routes: what FastAPI would do for the operations above, step for step and in the
# same order (a body that is not JSON, then the credential's form, then no body at all, then
# ``_issue``), and nothing else.

_ABSENT = object()


def _json_body(raw: bytes, content_type: str | None) -> Any:
    """FastAPI's reading of a JSON body: parsed only when declared JSON; otherwise the bytes,
    which then fail validation."""
    if not raw:
        return _ABSENT
    media = (content_type or "").split(";", 1)[0].strip().lower()
    maintype, _, subtype = media.partition("/")
    if maintype != "application" or not (subtype == "json" or subtype.endswith("+json")):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", error.pos),
                    "msg": "JSON decode error",
                    "ctx": {"error": error.msg},  # as FastAPI's own reading gives it
                }
            ]
        ) from None
    except (ValueError, RecursionError):  # not UTF-8, nested too deep: FastAPI's answer too
        raise HTTPException(400, "There was an error parsing the body") from None


def _svid_request(document: Any) -> SvidRequest:
    try:
        return SvidRequest.model_validate(document)
    except ValidationError as error:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in error.errors(include_url=False)]
        ) from None


async def _plain(request: Request, grant: Callable[[Context, str], _Authenticate]) -> Response:
    ctx = request.app.state.ctx
    assert isinstance(ctx, Context)
    try:
        raw = await request.body()
    except ClientDisconnect:  # e.g. cut off by the body limit, which has answered already
        raise HTTPException(400, "There was an error parsing the body") from None
    document = _json_body(raw, request.headers.get("content-type"))
    try:
        credential = bearer_credential(request)
    except AuthenticationFailed as error:  # counted as ca.grants counts a bad credential
        refused(error)
        raise
    if document is _ABSENT:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required"}]
        )
    issued = await _issue(ctx, document, grant(ctx, credential))
    return Response(issued.model_dump_json(), media_type="application/json")


def _by_join_token(ctx: Context, token: str) -> _Authenticate:
    async def on_loop(_csr: bytes | None) -> Grant:
        return await join_grant_async(ctx, token)

    return _Authenticate(on_loop, lambda _csr: join_grant(ctx, token))


def _by_renewal_proof(ctx: Context, proof: str) -> _Authenticate:
    async def on_loop(csr: bytes | None) -> Grant:
        return await renewal_grant_async(ctx, proof, csr)

    return _Authenticate(on_loop, lambda csr: renewal_grant(ctx, proof, csr))


async def _plain_request_svid(request: Request) -> Response:
    return await _plain(request, _by_join_token)


async def _plain_renew_svid(request: Request) -> Response:
    return await _plain(request, _by_renewal_proof)


def hot_routes() -> dict[tuple[str, str], ASGIApp]:
    """The plain routes, each with what the application's middleware gives every request: a
    request id and the access log line, the body limit, problem responses."""
    return {
        ("POST", "/v1/svid"): RequestId(BodyLimit(answering_problems(_plain_request_svid))),
        ("POST", "/v1/svid/renew"): RequestId(BodyLimit(answering_problems(_plain_renew_svid))),
    }
