"""Helpers for the rotation suites: the short-lived drill authority, CA rows by role and state,
``ca_event`` counting, and real ``openssl verify`` at a chosen moment (``-attime``)."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session, col, select

from ca.authority import AuthorityParams
from ca.config import Context
from ca.durations import Ttl
from ca.store.models import CaRow
from tests.conftest import TRUST_DOMAIN

# The drill authority of docs/rotation.md: a 3-minute intermediate, 20-second SVIDs (= L/9).
CA_TTL = Ttl.parse("3m")
SVID_TTL = Ttl.parse("20s")
DRILL = AuthorityParams(TRUST_DOMAIN, ca_ttl=CA_TTL, svid_ttl=SVID_TTL)


# Rotation tests whose outcome depends on the store run on both databases.
POSTGRES_ROTATION = [
    pytest.mark.postgres,
]
BOTH_DATABASES = pytest.mark.parametrize(
    "database_url",
    ["sqlite", pytest.param("postgres", marks=POSTGRES_ROTATION)],
    indirect=True,
)
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary")


def ca_rows(ctx: Context, role: str = "intermediate", state: str | None = None) -> list[CaRow]:
    with Session(ctx.engine) as session:
        query = select(CaRow).where(CaRow.role == role)
        if state is not None:
            query = query.where(CaRow.state == state)
        return list(session.exec(query.order_by(col(CaRow.id))).all())


def only(ctx: Context, role: str, state: str) -> CaRow:
    rows = ca_rows(ctx, role, state)
    assert len(rows) == 1, f"expected exactly one {state} {role}, got {[r.serial for r in rows]}"
    return rows[0]


def cert_of(row: CaRow) -> x509.Certificate:
    return x509.load_pem_x509_certificate(row.cert_pem.encode())


def events(ctx: Context, event: str | None = None) -> list[tuple[int, str]]:
    """(ca_id, event) of every recorded CA transition, oldest first."""
    query = "SELECT ca_id, event FROM ca_event"
    params: dict[str, str] = {}
    if event is not None:
        query += " WHERE event = :event"
        params["event"] = event
    with ctx.engine.connect() as connection:
        rows = connection.execute(sa.text(query + " ORDER BY id"), params).all()
    return [(int(r[0]), str(r[1])) for r in rows]


def prepare_moment(row: CaRow | x509.Certificate) -> dt.datetime:
    """notAfter - min(L/2, 30 d), written out from docs/rotation.md (not via RotationPolicy)."""
    nb, na = _window(row)
    return na - min((na - nb) / 2, dt.timedelta(days=30))


def activate_moment(row: CaRow | x509.Certificate) -> dt.datetime:
    """notAfter - min(L/6, 7 d)."""
    nb, na = _window(row)
    return na - min((na - nb) / 6, dt.timedelta(days=7))


def _window(row: CaRow | x509.Certificate) -> tuple[dt.datetime, dt.datetime]:
    if isinstance(row, x509.Certificate):
        return row.not_valid_before_utc, row.not_valid_after_utc
    cert = cert_of(row)  # the stored datetimes may come back naive from SQLite
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def openssl_verify(
    bundle: bytes | Sequence[x509.Certificate],
    leaf: x509.Certificate,
    chain: Sequence[x509.Certificate],
    at: dt.datetime,
    purpose: str = "sslclient",
) -> subprocess.CompletedProcess[str]:
    """``openssl verify -x509_strict -attime`` of ``leaf`` with ``chain`` as untrusted
    intermediates against ``bundle`` as the only trust anchors."""
    bundle_pem = bundle if isinstance(bundle, bytes) else pem(bundle)
    with tempfile.TemporaryDirectory(prefix="trellis-verify-") as tmp:
        directory = Path(tmp)
        (directory / "bundle.pem").write_bytes(bundle_pem)
        (directory / "leaf.pem").write_bytes(pem([leaf]))
        args = [
            "openssl",
            "verify",
            "-x509_strict",
            "-attime",
            str(int(at.timestamp())),
            "-purpose",
            purpose,
            "-CAfile",
            str(directory / "bundle.pem"),
        ]
        if chain:
            (directory / "chain.pem").write_bytes(pem(chain))
            args += ["-untrusted", str(directory / "chain.pem")]
        return subprocess.run(
            [*args, str(directory / "leaf.pem")], capture_output=True, text=True, check=False
        )


def assert_verifies(
    bundle: bytes | Sequence[x509.Certificate],
    leaf: x509.Certificate,
    chain: Sequence[x509.Certificate],
    at: dt.datetime,
) -> None:
    for purpose in ("sslclient", "sslserver"):
        result = openssl_verify(bundle, leaf, chain, at, purpose)
        assert result.returncode == 0, f"openssl ({purpose}): {result.stdout}{result.stderr}"


def assert_rejected(
    bundle: bytes | Sequence[x509.Certificate],
    leaf: x509.Certificate,
    chain: Sequence[x509.Certificate],
    at: dt.datetime,
) -> str:
    result = openssl_verify(bundle, leaf, chain, at)
    assert result.returncode != 0, f"openssl accepted it: {result.stdout}"
    return result.stdout + result.stderr
