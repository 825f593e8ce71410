"""Tests for ``ca.authority``: creating, refusing, replacing and unlocking an authority."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr
from sqlmodel import Session, select

from ca.authority import (
    DEFAULT_CA_TTL,
    DEFAULT_ROOT_TTL,
    AuthorityParams,
    active_issuer,
    bundle_pem,
    init_authority,
)
from ca.clock import FixedClock
from ca.config import Context, build_context
from ca.durations import Ttl
from ca.errors import Conflict, InvalidInput, NotInitialised, Unavailable
from ca.identity import TrustDomain
from ca.keys import KeyType
from ca.pem import certs_pem
from ca.profiles import BACKDATE
from ca.store.models import AuthorityRow, CaRow
from tests.ca.svidkit import SQLITE_ONLY, count_rows, enrol
from tests.certassert import assert_is_ca

# Tests that touch only keys or certificates run on SQLite alone (see svidkit.SQLITE_ONLY);
# those that write or compare rows run on both stores.
TD = TrustDomain.parse("example.org")
PASSPHRASE = b"test-passphrase-not-secret"  # tests/conftest.py


def key_dir(ctx: Context) -> Path:
    return ctx.settings.data_dir / "keys"


def key_files(ctx: Context) -> dict[str, bytes]:
    directory = key_dir(ctx)
    if not directory.exists():
        return {}
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def ca_rows(ctx: Context) -> list[CaRow]:
    with Session(ctx.engine) as session:
        return list(session.exec(select(CaRow).order_by(CaRow.id)).all())


def snapshot(ctx: Context) -> tuple[object, ...]:
    with Session(ctx.engine) as session:
        authorities = [row.model_dump() for row in session.exec(select(AuthorityRow)).all()]
    return (authorities, [row.model_dump() for row in ca_rows(ctx)], key_files(ctx))


def test_init_creates_root_and_intermediate(ctx: Context, clock: FixedClock) -> None:
    now = clock.now()
    issuer = active_issuer(ctx)
    (root,) = issuer.roots
    intermediate = issuer.certificate

    assert_is_ca(root, trust_domain="example.org", path_length=None)
    assert_is_ca(intermediate, trust_domain="example.org", path_length=0, issuer=root)
    assert root.subject == root.issuer
    assert root.subject.rfc4514_string() == "CN=example.org root,O=Trellis"
    assert intermediate.subject.rfc4514_string() == "CN=example.org intermediate,O=Trellis"

    # Defaults: EC P-384 root for ~10 years, EC P-256 intermediate for 7 days.
    assert KeyType.of(root.public_key()) is KeyType.EC_P384
    assert KeyType.of(intermediate.public_key()) is KeyType.EC_P256
    assert isinstance(root.signature_hash_algorithm, hashes.SHA384)
    assert isinstance(intermediate.signature_hash_algorithm, hashes.SHA384)  # signed by the root
    assert root.not_valid_before_utc == now - BACKDATE
    assert root.not_valid_after_utc == now + DEFAULT_ROOT_TTL.delta
    assert DEFAULT_ROOT_TTL.delta == dt.timedelta(days=3650)
    assert intermediate.not_valid_before_utc == now - BACKDATE
    assert intermediate.not_valid_after_utc == now + DEFAULT_CA_TTL.delta
    assert DEFAULT_CA_TTL.delta == dt.timedelta(days=7)

    assert issuer.chain == (intermediate,)
    assert bundle_pem(ctx) == certs_pem([root])
    assert issuer.chain_pem == certs_pem([intermediate])

    rows = ca_rows(ctx)
    assert [(r.role, r.state, r.key_type, r.key_backend) for r in rows] == [
        ("root", "active", "ec-p384", "file"),
        ("intermediate", "active", "ec-p256", "file"),
    ]
    assert rows[0].parent_id is None
    assert rows[1].parent_id == rows[0].id
    assert [r.serial for r in rows] == [
        format(root.serial_number, "x"),
        format(intermediate.serial_number, "x"),
    ]
    with Session(ctx.engine) as session:
        authority = session.get(AuthorityRow, "mesh")
    assert authority is not None
    assert (authority.trust_domain, authority.purpose) == ("example.org", "spiffe")
    assert (authority.ca_ttl_seconds, authority.svid_ttl_seconds) == (7 * 86400, 3600)


@SQLITE_ONLY
def test_no_authority_is_not_initialised(bare_ctx: Context) -> None:
    with pytest.raises(NotInitialised):
        active_issuer(bare_ctx)


@SQLITE_ONLY
@pytest.mark.usefixtures("cached_big_rsa")
@pytest.mark.parametrize("role", ["root", "intermediate"])
@pytest.mark.parametrize("key_type", list(KeyType), ids=[k.value for k in KeyType])
def test_init_with_every_key_type(bare_ctx: Context, role: str, key_type: KeyType) -> None:
    field = "root_key_type" if role == "root" else "key_type"
    params = AuthorityParams(TD, **{field: key_type})  # type: ignore[arg-type]
    issuer = init_authority(bare_ctx, params)
    (root,) = issuer.roots

    assert_is_ca(root, trust_domain="example.org", path_length=None)
    assert_is_ca(issuer.certificate, trust_domain="example.org", path_length=0, issuer=root)
    chosen = root if role == "root" else issuer.certificate
    assert KeyType.of(chosen.public_key()) is key_type
    # The signature the root makes uses the hash its key type calls for (none for Ed25519).
    expected_hash = params.root_key_type.signature_hash()
    for cert in (root, issuer.certificate):
        got = cert.signature_hash_algorithm
        assert (None if got is None else got.name) == (
            None if expected_hash is None else expected_hash.name
        )
    assert issuer.signer.handle.key_type is params.key_type
    assert issuer.signer.public_key() == issuer.certificate.public_key()


@pytest.mark.parametrize(
    "second",
    [
        pytest.param(AuthorityParams(TD), id="fail/same-params"),
        pytest.param(AuthorityParams(TD, key_type=KeyType.ED25519), id="fail/other-key-type"),
        pytest.param(AuthorityParams(TrustDomain("other.test")), id="fail/other-trust-domain"),
    ],
)
def test_init_twice_conflicts_and_changes_nothing(ctx: Context, second: AuthorityParams) -> None:
    before = snapshot(ctx)
    issuer = active_issuer(ctx)
    with pytest.raises(Conflict):
        init_authority(ctx, second)
    assert snapshot(ctx) == before
    assert active_issuer(ctx) == issuer


def test_init_force_replaces_everything(ctx: Context) -> None:
    old_issuer = active_issuer(ctx)
    old_files = set(key_files(ctx))
    enrol(ctx, "spiffe://example.org/web")
    assert count_rows(ctx, "certificate") == 1

    new_issuer = init_authority(ctx, AuthorityParams(TD, key_type=KeyType.EC_P384, force=True))

    new_files = key_files(ctx)
    assert len(new_files) == 2
    assert not old_files & set(new_files), "old key files must be destroyed"
    for name in new_files:
        assert stat.S_IMODE((key_dir(ctx) / name).stat().st_mode) == 0o600
    assert [(r.role, r.key_type) for r in ca_rows(ctx)] == [
        ("root", "ec-p384"),
        ("intermediate", "ec-p384"),
    ]
    for table in ("certificate", "entry", "token"):
        assert count_rows(ctx, table) == 0, table
    assert active_issuer(ctx) is new_issuer  # the cache was cleared and refilled
    assert new_issuer.certificate != old_issuer.certificate
    assert new_issuer.roots != old_issuer.roots
    assert KeyType.of(new_issuer.certificate.public_key()) is KeyType.EC_P384


@SQLITE_ONLY
def test_init_force_destroys_every_key_it_forgets(ctx: Context) -> None:
    from cryptography.x509 import ocsp

    from ca.ocsp import respond

    workload = enrol(ctx, "spiffe://example.org/web")
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(workload.cert, active_issuer(ctx).certificate, hashes.SHA256())
        .build()
    )
    answer = ocsp.load_der_ocsp_response(
        respond(ctx, request.public_bytes(serialization.Encoding.DER))
    )
    assert answer.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    before = set(key_files(ctx))
    assert len(before) == 3, "root, intermediate and the OCSP responder key"

    init_authority(ctx, AuthorityParams(TD, force=True))

    after = set(key_files(ctx))
    assert not before & after, f"orphaned key files: {sorted(before & after)}"
    assert len(after) == 2


@SQLITE_ONLY
@pytest.mark.parametrize(
    "params",
    [
        pytest.param(
            AuthorityParams(TD, ca_ttl=Ttl(6 * 3600), svid_ttl=Ttl(3601)),
            id="fail/svid-ttl-above-sixth-of-ca-ttl",
        ),
        pytest.param(
            AuthorityParams(TD, ca_ttl=Ttl(86400), svid_ttl=Ttl(86400)),
            id="fail/svid-ttl-equals-ca-ttl",
        ),
        pytest.param(
            AuthorityParams(TD, ca_ttl=Ttl(3650 * 86400), svid_ttl=Ttl(3600)),
            id="fail/ca-ttl-not-below-root-ttl",
        ),
    ],
)
def test_init_refuses_bad_lifetimes_and_writes_nothing(
    bare_ctx: Context, params: AuthorityParams
) -> None:
    with pytest.raises(InvalidInput):
        init_authority(bare_ctx, params)
    assert count_rows(bare_ctx, "authority") == 0
    assert count_rows(bare_ctx, "ca") == 0
    assert key_files(bare_ctx) == {}


@SQLITE_ONLY
def test_svid_ttl_of_exactly_a_sixth_is_accepted(bare_ctx: Context, clock: FixedClock) -> None:
    issuer = init_authority(bare_ctx, AuthorityParams(TD, ca_ttl=Ttl(6 * 3600), svid_ttl=Ttl(3600)))
    assert issuer.certificate.not_valid_after_utc == clock.now() + dt.timedelta(hours=6)
    assert issuer.default_svid_ttl == Ttl(3600)


@SQLITE_ONLY
def test_key_files_are_private_and_encrypted(ctx: Context) -> None:
    files = key_files(ctx)
    assert len(files) == 2
    assert stat.S_IMODE(key_dir(ctx).stat().st_mode) & 0o077 == 0
    issuer = active_issuer(ctx)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    public_keys = {
        cert.public_key().public_bytes(serialization.Encoding.DER, spki)
        for cert in (*issuer.roots, issuer.certificate)
    }
    for name, data in files.items():
        path = key_dir(ctx) / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
        assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----"), name
        with pytest.raises(TypeError, match="encrypted"):
            serialization.load_pem_private_key(data, password=None)
        key = serialization.load_pem_private_key(data, password=PASSPHRASE)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.public_key().public_bytes(serialization.Encoding.DER, spki) in public_keys
        public_keys.discard(key.public_key().public_bytes(serialization.Encoding.DER, spki))
    assert not public_keys, "every CA key has exactly one file"


@SQLITE_ONLY
def test_wrong_passphrase_is_unavailable(ctx: Context, clock: FixedClock) -> None:
    settings = ctx.settings.model_copy(
        update={"key_passphrase": SecretStr("a-different-passphrase")}
    )
    other = build_context(settings, clock=clock)
    try:
        with pytest.raises(Unavailable, match="passphrase"):
            active_issuer(other)
    finally:
        other.close()


def test_issuer_certificate_matches_stored_pem(ctx: Context) -> None:
    issuer = active_issuer(ctx)
    stored = [x509.load_pem_x509_certificate(r.cert_pem.encode()) for r in ca_rows(ctx)]
    assert stored == [*issuer.roots, issuer.certificate]
