"""A CA key that is missing from its store, or is not the key of its CA certificate, is the
server's damage: ``Unavailable`` (HTTP 503, exit 8), found when the key is loaded, before
anything is signed or recorded, and without this server's paths in what clients are shown."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.x509 import ocsp as x509_ocsp
from fastapi.testclient import TestClient
from sqlmodel import Session, select

import ca.readiness
from api.app import create_app
from ca import gateway
from ca.authority import active_issuer, check_keys
from ca.certs import CertStatus, get_certificate, revoke_certificate
from ca.clock import FixedClock, utc
from ca.config import Context
from ca.crl import current_crl
from ca.errors import Unavailable
from ca.jobs import catch_up
from ca.keys import KeyType
from ca.revocation import RevocationReason
from ca.rotation import rotate
from ca.serial import Serial
from ca.store.models import CaRow
from tests.api.restkit import assert_problem, bearer
from tests.ca.svidkit import (
    SQLITE_ONLY,
    add_entry,
    count_rows,
    enrol,
    join_secret,
    key_pem,
    make_csr,
    uses_remaining,
)
from tests.ca.svidkit import new_key as new_subject_key
from tests.ca.test_ocsp import request_der
from tests.cli.test_walkthrough import Trellis
from tests.rotation.rotkit import activate_moment, only, prepare_moment

pytestmark = SQLITE_ONLY
TD = "example.org"


def intermediate_key_file(ctx: Context, authority: str = "mesh", state: str = "active") -> Path:
    with Session(ctx.engine) as session:
        row = session.exec(
            select(CaRow).where(
                CaRow.authority == authority, CaRow.role == "intermediate", CaRow.state == state
            )
        ).one()
    return ctx.settings.data_dir / "keys" / f"{row.key_ref}.pem"


def intermediate_serials(ctx: Context) -> dict[str, str]:
    with Session(ctx.engine) as session:
        rows = session.exec(select(CaRow).where(CaRow.role == "intermediate")).all()
        return {row.serial: row.state for row in rows}


def replace_with_stranger(ctx: Context, path: Path) -> None:
    """Same type, same passphrase, another key: a restore from another instance."""
    stranger = ctx.keys.create(KeyType.EC_P256, "stranger")
    shutil.copyfile(ctx.settings.data_dir / "keys" / f"{stranger.ref}.pem", path)


def replace_with_unencrypted(_ctx: Context, path: Path) -> None:
    """What ``openssl genpkey`` writes: PKCS#8, not encrypted."""
    path.write_bytes(key_pem(new_subject_key(KeyType.EC_P256)))


REPLACEMENTS = pytest.mark.parametrize(
    "replace",
    [replace_with_stranger, replace_with_unencrypted],
    ids=["fail/another-instances-key", "fail/unencrypted"],
)


def post_svid(ctx: Context, client: TestClient, label: str) -> tuple[str, dict[str, object]]:
    """A fresh workload's first request: (its join token id, the problem body), asserting 503."""
    spiffe_id = f"spiffe://{TD}/{label}"
    token_id, secret = join_secret(ctx, add_entry(ctx, spiffe_id))
    csr = make_csr(new_subject_key(KeyType.EC_P256), uris=[spiffe_id])
    response = client.post("/v1/svid", json={"csr": csr.decode()}, headers=bearer(secret))
    return token_id, assert_problem(response, 503)


def test_a_missing_key_file_is_unavailable_and_names_no_server_path(ctx: Context) -> None:
    workload = enrol(ctx, f"spiffe://{TD}/before")
    issuer = active_issuer(ctx)
    intermediate_key_file(ctx).unlink()
    ctx.cache.clear()  # a process started after the file went
    certificates = count_rows(ctx, "certificate")
    with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
        token_id, body = post_svid(ctx, client, "after")
        ocsp = client.post(
            "/v1/ocsp",
            content=request_der(workload.cert, issuer.certificate),
            headers={"Content-Type": "application/ocsp-request"},
        )
    assert body["code"] == "unavailable"
    assert "is missing from the file key store" in str(body["detail"])
    assert str(ctx.settings.data_dir) not in str(body["detail"])
    assert count_rows(ctx, "certificate") == certificates
    # The join token is not spent: the workload retries with it once the key is back.
    assert uses_remaining(ctx, token_id) == 1
    # The responder cannot be made without the CA's key: an OCSP "tryLater", which says nothing
    # of this server's paths (RFC 6960 §2.3), not an HTTP problem.
    assert ocsp.status_code == 200
    assert ocsp.headers["content-type"] == "application/ocsp-response"
    answer = x509_ocsp.load_der_ocsp_response(ocsp.content)
    assert answer.response_status is x509_ocsp.OCSPResponseStatus.TRY_LATER
    assert str(ctx.settings.data_dir).encode() not in ocsp.content
    # trellis serve's start-up check: exit 8 (Unavailable), not 5 (NotFound).
    with pytest.raises(Unavailable, match="missing from the file key store"):
        check_keys(ctx)


def test_a_key_file_that_is_not_the_certificates_key_is_refused_before_signing(
    ctx: Context,
) -> None:
    workload = enrol(ctx, f"spiffe://{TD}/before")
    serial = Serial(workload.cert.serial_number)
    crl_before = current_crl(ctx, "mesh", "intermediate").der
    replace_with_stranger(ctx, intermediate_key_file(ctx))
    ctx.cache.clear()

    with pytest.raises(Unavailable, match="not the key of its CA certificate"):
        revoke_certificate(ctx, serial, RevocationReason.KEY_COMPROMISE, "test")
    assert get_certificate(ctx, serial).status is CertStatus.ACTIVE
    assert current_crl(ctx, "mesh", "intermediate").der == crl_before  # nothing new published
    with pytest.raises(Unavailable, match="not the key of its CA certificate"):
        check_keys(ctx)
    certificates = count_rows(ctx, "certificate")
    with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
        token_id, body = post_svid(ctx, client, "after")
        ready = client.get("/readyz")
    assert uses_remaining(ctx, token_id) == 1
    assert "not the key of its CA certificate" in str(body["detail"])
    assert count_rows(ctx, "certificate") == certificates
    assert ready.status_code == 503
    assert "not the key of its CA certificate" in ready.json()["detail"]["keys"]


def test_an_unencrypted_key_file_is_unavailable_not_a_crash(ctx: Context) -> None:
    """cryptography raises ``TypeError`` (not ``ValueError``) for a key given a passphrase it
    does not need: that was a traceback on the CLI and a 500 on ``/v1/svid`` and ``/readyz``."""
    workload = enrol(ctx, f"spiffe://{TD}/before")
    serial = Serial(workload.cert.serial_number)
    replace_with_unencrypted(ctx, intermediate_key_file(ctx))
    ctx.cache.clear()

    with pytest.raises(Unavailable, match="is not encrypted with the key passphrase"):
        check_keys(ctx)
    with pytest.raises(Unavailable, match="is not encrypted"):
        revoke_certificate(ctx, serial, RevocationReason.KEY_COMPROMISE, "test")
    assert get_certificate(ctx, serial).status is CertStatus.ACTIVE
    certificates = count_rows(ctx, "certificate")
    with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
        token_id, body = post_svid(ctx, client, "after")
        ready = client.get("/readyz")
    assert body["code"] == "unavailable" and "is not encrypted" in str(body["detail"])
    assert str(ctx.settings.data_dir) not in str(body["detail"])
    assert uses_remaining(ctx, token_id) == 1
    assert count_rows(ctx, "certificate") == certificates
    assert ready.status_code == 503
    assert "is not encrypted" in ready.json()["detail"]["keys"]


@REPLACEMENTS
def test_a_prepared_intermediate_whose_key_cannot_be_loaded_is_not_activated(
    ctx: Context, replace: Callable[[Context, Path], None]
) -> None:
    """``authority rotate --now`` twice: prepare, then activate. A prepared key file replaced in
    between must stop the activation, with the old intermediate still issuing, rather than make
    active a CA that cannot sign (every issuance and ``/readyz`` failing from then on)."""
    rotate(ctx, force=True, actor="test")  # prepare
    before = intermediate_serials(ctx)
    assert sorted(before.values()) == ["active", "prepared"]
    replace(ctx, intermediate_key_file(ctx, state="prepared"))
    ctx.cache.clear()

    with pytest.raises(Unavailable, match="CA key mesh-intermediate-"):
        rotate(ctx, force=True, actor="test")  # activate
    assert intermediate_serials(ctx) == before
    enrol(ctx, f"spiffe://{TD}/still-issuing")  # the active intermediate signs on


@REPLACEMENTS
def test_start_up_goes_on_while_a_broken_prepared_intermediate_is_due(
    ctx: Context, clock: FixedClock, replace: Callable[[Context, Path], None]
) -> None:
    """What ``trellis serve`` does at start (``catch_up``, then ``check_keys``) with a prepared
    intermediate whose key was replaced, due for activation while the active one is valid: as
    the running job, it logs the stopped activation and goes on (the active one issues); it
    refused to start (exit 8). Once the active one has expired too, nothing can issue: refused."""
    active = only(ctx, "intermediate", "active")
    clock.current = prepare_moment(active)
    assert [t.event for t in rotate(ctx, actor="test")] == ["prepared"]
    before = intermediate_serials(ctx)
    replace(ctx, intermediate_key_file(ctx, state="prepared"))
    ctx.cache.clear()
    clock.current = activate_moment(active)

    catch_up(ctx)
    problems = check_keys(ctx)
    assert [type(p) for p in problems] == [Unavailable]
    assert "CA key mesh-intermediate-" in problems[0].detail
    assert intermediate_serials(ctx) == before
    enrol(ctx, f"spiffe://{TD}/still-issuing")

    clock.current = utc(active.not_after)
    with pytest.raises(Unavailable, match="CA key mesh-intermediate-"):
        catch_up(ctx)
    assert intermediate_serials(ctx) == before


def test_readiness_checks_every_issuing_key(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's intermediate key gone (replaced on another replica, say) while the mesh's is
    here: every gateway issuance would fail, so the replica is not ready."""
    gateway.init_gateway(ctx, gateway.GatewayParams())
    monkeypatch.setattr(ca.readiness, "READY_FOR", 0.0)
    with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200
        intermediate_key_file(ctx, "gateway").unlink()
        ready = client.get("/readyz")
        assert ready.status_code == 503
        keys = ready.json()["detail"]["keys"]
        assert "is missing from the file key store" in keys
        assert str(ctx.settings.data_dir) not in keys
        assert ready.json()["detail"]["database"] == "ok"


def test_readiness_reuses_its_verdict_for_a_few_seconds(ctx: Context) -> None:
    with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200
        intermediate_key_file(ctx).unlink()
        assert client.get("/readyz").status_code == 200  # polled: not a stat per probe
        ctx.cache.pop(("readiness", "issuing-keys"))
        assert client.get("/readyz").status_code == 503


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            Path.unlink,
            "is missing from the file key store (every replica needs every CA key file:"
            " docs/deploy.md#per-replica-key-directories-split-the-ca)",
        ),
        (
            lambda key: key.write_bytes(key_pem(new_subject_key(KeyType.EC_P256))),
            "is not encrypted with the key passphrase, as Trellis writes its keys: the file was"
            " replaced",
        ),
    ],
    ids=["fail/missing", "fail/unencrypted"],
)
def test_a_damaged_key_is_one_line_on_the_cli(
    database_url: str, tmp_path: Path, damage: Callable[[Path], object], message: str
) -> None:
    """A CLI command logs nothing below WARNING, and its error line says what is wrong: the
    path (which a server logs, at INFO, for its operators) was a second line before. A real
    process: under pytest the root logger has a handler, and nothing reaches stderr."""
    cli = Trellis(tmp_path / "var", database_url)
    cli.set_up("init", "--trust-domain", TD)
    (key,) = (tmp_path / "var" / "keys").glob("mesh-intermediate-*.pem")
    damage(key)
    minted = cli.run(
        "svid", "mint", "--spiffe-id", f"spiffe://{TD}/a", "--out", str(tmp_path / "a"), ok=False
    )
    assert minted.returncode == 8
    assert minted.stderr.splitlines() == [f"trellis: CA key {key.stem} {message}"]
    assert not (tmp_path / "a").exists()
