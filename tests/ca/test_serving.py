"""Trellis's own serving certificate (``ca.serving``): issued only where its files can be
written, and the key and certificate replaced together or not at all."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import Session, col, select

from ca.config import Context
from ca.errors import Unavailable
from ca.pem import private_key_pem
from ca.serving import WITHDRAWN_BY, ensure_server_certificate
from ca.store.models import CertificateRow
from cli.launch import Interrupted
from tests.ca.svidkit import SQLITE_ONLY
from tests.conftest import interrupt_a_rename


def _serving_certificates(ctx: Context) -> list[CertificateRow]:
    with Session(ctx.engine) as session:
        served = col(CertificateRow.spiffe_id).endswith("/trellis/server")
        rows = session.exec(select(CertificateRow).where(served)).all()
    return sorted(rows, key=lambda row: row.not_before)


@SQLITE_ONLY
def test_a_data_directory_that_cannot_take_the_files_gets_no_certificate(ctx: Context) -> None:
    """``server/`` in the data directory is a regular file: the certificate was issued, its key
    could not be written (a traceback, exit 1), and it stayed live; every start did it again.
    Now it is the server's fault (exit 8), before anything is issued."""
    ctx.settings.server_tls_dir.write_text("not a directory\n")
    with pytest.raises(Unavailable, match="cannot write the serving certificate"):
        ensure_server_certificate(ctx)
    assert _serving_certificates(ctx) == []


@SQLITE_ONLY
def test_a_renewal_stopped_between_key_and_certificate_keeps_the_old_pair(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after tls.key was replaced: the new key stood beside the old certificate (the
    listener could not load them, 'trellis serve' did not start), and the new certificate
    stayed live with its key lost. Now both files are as they were and it is withdrawn."""
    tls = ensure_server_certificate(ctx)
    directory = tls.cert_path.parent
    before = {path.name: path.read_bytes() for path in directory.iterdir()}
    interrupt_a_rename(monkeypatch, directory, after=1)
    with pytest.raises(Interrupted):
        ensure_server_certificate(ctx, ["trellis.example.org"])  # a new name: a new certificate
    monkeypatch.undo()
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before
    first, withdrawn = _serving_certificates(ctx)
    served = x509.load_pem_x509_certificates(tls.cert_path.read_bytes())[0]
    assert (first.serial, first.status) == (format(served.serial_number, "x"), "active")
    assert (withdrawn.status, withdrawn.revoked_by) == ("revoked", WITHDRAWN_BY)


def _damage_missing(key: Path) -> None:
    key.unlink()


def _damage_another_key(key: Path) -> None:
    key.write_bytes(private_key_pem(ec.generate_private_key(ec.SECP256R1())))


def _damage_garbage(key: Path) -> None:
    key.write_bytes(b"not a key\n")


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_damage_missing, "is missing"),
        (_damage_another_key, "does not match the certificate"),
        (_damage_garbage, "is not a private key in PEM"),
    ],
    ids=["missing", "another-key", "garbage"],
)
def test_a_good_certificate_beside_a_bad_key_is_issued_anew(
    ctx: Context, caplog: pytest.LogCaptureFixture, damage: Callable[[Path], None], reason: str
) -> None:
    """Only the certificate was checked: beside a missing or foreign key it was kept, and
    every 'trellis serve' stopped at the listener ("No such file or directory" or
    KEY_VALUES_MISMATCH, naming no file) until someone removed the certificate too."""
    tls = ensure_server_certificate(ctx)
    assert ensure_server_certificate(ctx).issued is None  # a good pair is kept
    damage(tls.key_path)
    with caplog.at_level(logging.WARNING, logger="trellis.serving"):
        again = ensure_server_certificate(ctx)
    assert again.issued is not None and again.issued != tls.issued
    assert [r.getMessage() for r in caplog.records] == [
        f"issuing a new serving certificate: its key {tls.key_path} {reason}"
        + (f" {tls.cert_path}" if reason.startswith("does not") else "")
    ]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(again.cert_path, again.key_path)  # the pair loads
