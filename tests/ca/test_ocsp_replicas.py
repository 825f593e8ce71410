"""One OCSP responder per CA across processes: replicas sharing a database that both find a CA
without a responder make one each, and only the first insert of (CA, generation) commits; the
other destroys its key and signs with the winner's. And a responder whose key this replica
cannot load answers ``tryLater`` (RFC 6960 §2.3), an OCSP response, not an HTTP problem.

The race runs in two real processes (``spawn``) on one database, SQLite and PostgreSQL; each
waits at a barrier after finding no responder, so both are sure to make one."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlmodel import Session, select

import ca.ocsp
from api.app import create_app
from ca.authority import active_issuer
from ca.config import Context, Settings, build_context
from ca.errors import Unavailable
from ca.ocsp import respond
from ca.store.db import SchemaPolicy
from ca.store.models import CaRow, OcspResponderRow
from tests.ca.svidkit import SQLITE_ONLY, enrol
from tests.ca.test_ocsp import TD, assert_signed_by_delegate, request_der
from tests.conftest import PASSPHRASE

TIMEOUT = 60


def _replica(
    data_dir: str,
    database_url: str,
    request: bytes,
    barrier: multiprocessing.synchronize.Barrier,
    answers: multiprocessing.Queue[bytes | str],
) -> None:
    """One replica: its own process and context; answers the request once the other replica
    has also found no responder."""
    try:
        settings = Settings(
            data_dir=Path(data_dir),
            database_url=database_url,
            key_passphrase=SecretStr(PASSPHRASE),
        )
        ctx = build_context(settings, schema=SchemaPolicy.TRUSTED)
        make: Callable[..., Any] = ca.ocsp._new_responder

        def after_the_other_looked(*args: Any) -> Any:
            barrier.wait(TIMEOUT)
            return make(*args)

        ca.ocsp._new_responder = after_the_other_looked  # type: ignore[assignment]
        answers.put(respond(ctx, request))
        ctx.close()
    except BaseException as exc:  # reported to the test, which fails with it
        answers.put(f"{type(exc).__name__}: {exc}")


def _responders(ctx: Context) -> list[OcspResponderRow]:
    with Session(ctx.engine) as session:
        return list(session.exec(select(OcspResponderRow)).all())


def _ocsp_keys(ctx: Context) -> list[str]:
    return sorted(p.name for p in (ctx.settings.data_dir / "keys").glob("*-ocsp-*"))


def test_two_processes_make_one_responder_for_a_ca(ctx: Context) -> None:
    issuer = active_issuer(ctx).certificate
    der = request_der(enrol(ctx, f"spiffe://{TD}/web").cert, issuer)
    spawn = multiprocessing.get_context("spawn")
    barrier, answers = spawn.Barrier(2), spawn.Queue()
    args = (str(ctx.settings.data_dir), ctx.settings.effective_database_url, der, barrier, answers)
    replicas = [spawn.Process(target=_replica, args=args) for _ in range(2)]
    for replica in replicas:
        replica.start()
    try:
        raw = [answers.get(timeout=TIMEOUT) for _ in replicas]
    finally:
        for replica in replicas:
            replica.join(TIMEOUT)
            if replica.is_alive():
                replica.kill()
    assert all(isinstance(answer, bytes) for answer in raw), raw
    responses = [ocsp.load_der_ocsp_response(answer) for answer in raw if isinstance(answer, bytes)]
    for response in responses:
        assert_signed_by_delegate(response, issuer)
    signers = {r.certificates[0].public_bytes(serialization.Encoding.DER) for r in responses}
    assert len(signers) == 1, "the two replicas signed with two responders"
    (row,) = _responders(ctx)
    assert row.generation == 1
    assert _ocsp_keys(ctx) == [f"{row.key_ref}.pem"]  # the loser's key is destroyed
    # This process finds it too and makes no other.
    assert_signed_by_delegate(ocsp.load_der_ocsp_response(respond(ctx, der)), issuer)
    assert len(_responders(ctx)) == 1


@SQLITE_ONLY
def test_a_responder_whose_key_is_missing_here_answers_try_later(ctx: Context) -> None:
    """Another replica made the responder, and its key is in that replica's key store: this
    one answers ``tryLater`` with HTTP 200 and the OCSP content type, makes no second
    responder, and stays ready (``/readyz`` checks the responder keys of shared stores only,
    ``ca.cas.signing_keys``): it issues as well as the replica that has the key."""
    issuer = active_issuer(ctx).certificate
    der = request_der(enrol(ctx, f"spiffe://{TD}/web").cert, issuer)
    assert_signed_by_delegate(ocsp.load_der_ocsp_response(respond(ctx, der)), issuer)
    (key,) = _ocsp_keys(ctx)
    (ctx.settings.data_dir / "keys" / key).unlink()
    ctx.cache.clear()  # a replica that never loaded it

    answer = ocsp.load_der_ocsp_response(respond(ctx, der))
    assert answer.response_status is ocsp.OCSPResponseStatus.TRY_LATER
    with TestClient(create_app(ctx)) as client:
        http = client.post(
            "/v1/ocsp", content=der, headers={"Content-Type": "application/ocsp-request"}
        )
        ready = client.get("/readyz")
    assert http.status_code == 200, http.text
    assert http.headers["content-type"] == "application/ocsp-response"
    status = ocsp.load_der_ocsp_response(http.content).response_status
    assert status is ocsp.OCSPResponseStatus.TRY_LATER
    assert len(_responders(ctx)) == 1
    assert ready.status_code == 200, ready.text


@SQLITE_ONLY
def test_a_responder_that_fails_reports_its_own_error_when_its_key_cannot_be_destroyed(
    ctx: Context, monkeypatch: Any
) -> None:
    """The clean-up of the key made for a responder that could not be recorded may fail too
    (the Vault that failed the signature is down for the destroy as well): the error reported
    is the one that stopped the responder, and the key is named in a warning."""
    with Session(ctx.engine) as session:
        row = session.get(CaRow, active_issuer(ctx).ca_id)
    assert row is not None

    def no_signature(*_: Any) -> Any:
        raise Unavailable("the issuer's key backend refused to sign")

    def no_destroy(*_: Any) -> None:
        raise Unavailable("the key backend is unreachable")

    monkeypatch.setattr(ca.ocsp, "sign", no_signature)
    monkeypatch.setattr(ctx.keys, "destroy", no_destroy)
    with pytest.raises(Unavailable, match="refused to sign"):
        ca.ocsp._new_responder(ctx, row, ctx.clock.now(), 1)
    assert _responders(ctx) == []
