"""Trellis's own serving certificate (``ca.serving``): issued only where its files can be
written, and the key and certificate replaced together or not at all."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import Session, col, select

from ca.authority import active_issuer
from ca.config import Context
from ca.durations import Ttl
from ca.errors import Unavailable
from ca.jobs import renew_server_certificate
from ca.pem import private_key_pem
from ca.root_rotation import rotate_root
from ca.serving import WITHDRAWN_BY, ServerTls, ensure_server_certificate
from ca.store.models import CertificateRow
from cli.launch import Interrupted
from tests.ca.svidkit import SQLITE_ONLY
from tests.conftest import interrupt_a_rename
from tests.rotation.rotkit import needs_openssl


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


def _presented(tls: ServerTls) -> list[x509.Certificate]:
    """What a client is sent: the pair served by Python's ssl (as uvicorn serves it), read
    with ``openssl s_client -showcerts``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert_path, tls.key_path)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)

        def serve_one() -> None:
            connection, _ = listener.accept()
            try:
                with context.wrap_socket(connection, server_side=True) as tls_connection:
                    tls_connection.recv(1)  # until the client closes
            except (OSError, ssl.SSLError):
                pass

        server = threading.Thread(target=serve_one, daemon=True)
        server.start()
        port = listener.getsockname()[1]
        shown = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-showcerts"],
            input=b"",
            capture_output=True,
            timeout=30,
            check=True,
        )
        server.join(30)
    return x509.load_pem_x509_certificates(shown.stdout)


@needs_openssl
@SQLITE_ONLY
def test_the_served_chain_follows_a_root_rotation_to_its_retirement(ctx: Context) -> None:
    """The chain was written once, with the leaf, which is renewed at a third of its life left
    (days): after the retire the server went on sending "B signed by A", the cross certificate
    the retire had just revoked, and after the publish it lacked "A signed by B". Now each
    run writes the issuer's current chain after a good leaf, leaf and key untouched."""
    tls = ensure_server_certificate(ctx)
    assert len(_presented(tls)) == 2  # leaf, intermediate under A

    rotate_root(ctx, overlap=Ttl.parse("1h"))  # publish: the chain gains "A signed by B"
    leaf, key = _presented(tls)[0], tls.key_path.read_bytes()
    result = renew_server_certificate(ctx)
    assert _presented(tls) == [leaf, *active_issuer(ctx).chain]
    assert len(active_issuer(ctx).chain) == 2
    assert result == "wrote the issuer's current chain after the serving certificate"
    assert tls.key_path.read_bytes() == key

    rotate_root(ctx, step=True, force=True)  # switch: a new issuer, so a new certificate
    switched = ensure_server_certificate(ctx)
    assert switched.issued is not None
    leaf, key = _presented(tls)[0], tls.key_path.read_bytes()
    b_signed_by_a = active_issuer(ctx).chain[1]
    assert _presented(tls) == [leaf, *active_issuer(ctx).chain]

    rotate_root(ctx, step=True, force=True)  # retire: "B signed by A" is revoked
    again = ensure_server_certificate(ctx)
    assert _presented(tls) == [leaf, active_issuer(ctx).certificate]
    assert b_signed_by_a not in _presented(tls)
    assert (again.issued, again.rechained) == (None, True)
    assert tls.key_path.read_bytes() == key
    assert renew_server_certificate(ctx) == "serving certificate current"


def _names(tls: ServerTls) -> set[str]:
    cert = x509.load_pem_x509_certificates(tls.cert_path.read_bytes())[0]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)) | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    }


@SQLITE_ONLY
def test_a_name_taken_away_issues_the_certificate_anew(ctx: Context) -> None:
    """Only a missing name reissued it: a wildcard taken out of TRELLIS_SERVER_NAMES stayed
    served, and valid, until the certificate reached a third of its life (~20 days)."""
    first = ensure_server_certificate(ctx, ["*.example.org", "192.0.2.7"])
    assert first.issued is not None
    assert _names(first) == {"localhost", "127.0.0.1", "*.example.org", "192.0.2.7"}
    assert ensure_server_certificate(ctx, ["*.example.org", "192.0.2.7"]).issued is None

    narrower = ensure_server_certificate(ctx, ["192.0.2.7"])
    assert narrower.issued is not None and narrower.issued != first.issued
    assert _names(narrower) == {"localhost", "127.0.0.1", "192.0.2.7"}
    assert ensure_server_certificate(ctx, ["192.0.2.7"]).issued is None
