"""The key-backend contract, and the file backend's own promises.

``TestKeyBackendContract`` is written against ``ca.keys.KeyBackend`` only: to run it against
another backend (Vault/OpenBao Transit, an in-memory fake), add a param to the ``backend``
fixture. ``TestFileKeyBackend`` holds what only files can promise (modes, encryption at rest).
"""

from __future__ import annotations

import datetime as dt
import logging
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from ca.errors import InvalidInput, NotFound, Unavailable
from ca.identity import TrustDomain
from ca.keys import KeyBackend, KeyHandle, KeyType, PublicKey, Signer
from ca.keys.file import FileKeyBackend, KeyPassphrase, load_or_create_passphrase
from ca.profiles import CaSpec, ca_builder, ca_subject, sign
from ca.serial import Serial
from tests.certassert import assert_is_ca

PASSPHRASE = b"correct horse battery staple"
KEY_TYPES = pytest.mark.parametrize("key_type", list(KeyType), ids=[k.value for k in KeyType])
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def file_backend(tmp_path: Path) -> FileKeyBackend:
    return FileKeyBackend(tmp_path / "keys", PASSPHRASE)


BACKENDS: dict[str, Callable[[Path], KeyBackend]] = {"file": file_backend}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> KeyBackend:
    return BACKENDS[request.param](tmp_path)


def verify(public_key: PublicKey, key_type: KeyType, signature: bytes, data: bytes) -> None:
    """Check a signature the way an X.509 verifier would for a CA key of ``key_type``."""
    digest = key_type.signature_hash()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        assert digest is not None
        public_key.verify(signature, data, ec.ECDSA(digest))
    elif isinstance(public_key, rsa.RSAPublicKey):
        assert digest is not None
        public_key.verify(signature, data, padding.PKCS1v15(), digest)
    else:
        public_key.verify(signature, data)


def raw_sign(signer: Signer, data: bytes) -> bytes:
    key, digest = signer.private_key, signer.hash_algorithm
    if isinstance(key, ec.EllipticCurvePrivateKey):
        assert digest is not None
        return key.sign(data, ec.ECDSA(digest))
    if isinstance(key, rsa.RSAPrivateKey):
        assert digest is not None
        return key.sign(data, padding.PKCS1v15(), digest)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return key.sign(data)


@pytest.mark.usefixtures("cached_big_rsa")
class TestKeyBackendContract:
    @KEY_TYPES
    def test_create_then_load(self, backend: KeyBackend, key_type: KeyType) -> None:
        handle = backend.create(key_type, "mesh-root")
        assert handle.backend == backend.name
        assert handle.key_type is key_type
        signer = backend.load(handle)
        assert signer.handle == handle
        assert KeyType.of(signer.public_key()) is key_type
        assert signer.public_key() == signer.private_key.public_key()
        # Loading again yields the same key, not a new one.
        assert backend.load(handle).public_key() == signer.public_key()

    @KEY_TYPES
    def test_loaded_signer_signs_verifiably(self, backend: KeyBackend, key_type: KeyType) -> None:
        handle = backend.create(key_type, "mesh-intermediate")
        signer = backend.load(handle)
        data = b"to be signed"
        signature = raw_sign(signer, data)
        verify(signer.public_key(), key_type, signature, data)
        with pytest.raises(InvalidSignature):
            verify(signer.public_key(), key_type, signature, data + b"!")

    @KEY_TYPES
    def test_signer_works_with_the_certificate_builder(
        self, backend: KeyBackend, key_type: KeyType
    ) -> None:
        """SPIRE's key proof: sign a throwaway CA certificate and verify it."""
        signer = backend.load(backend.create(key_type, "proof"))
        spec = CaSpec(
            subject=ca_subject("Trellis", "proof"),
            public_key=signer.public_key(),
            spiffe_id=TrustDomain("example.org").id(),
            serial=Serial.generate(),
            not_before=NOW,
            not_after=NOW + dt.timedelta(hours=1),
            path_length=None,
        )
        cert = sign(ca_builder(spec), signer)
        assert_is_ca(cert, trust_domain="example.org", path_length=None)
        assert (
            cert.signature_algorithm_oid
            == {
                KeyType.EC_P256: x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256,
                KeyType.EC_P384: x509.SignatureAlgorithmOID.ECDSA_WITH_SHA384,
                KeyType.RSA_2048: x509.SignatureAlgorithmOID.RSA_WITH_SHA256,
                KeyType.RSA_3072: x509.SignatureAlgorithmOID.RSA_WITH_SHA256,
                KeyType.RSA_4096: x509.SignatureAlgorithmOID.RSA_WITH_SHA256,
                KeyType.ED25519: x509.SignatureAlgorithmOID.ED25519,
            }[key_type]
        )

    def test_keys_are_distinct(self, backend: KeyBackend) -> None:
        first = backend.create(KeyType.EC_P256, "same-label")
        second = backend.create(KeyType.EC_P256, "same-label")
        assert first.ref != second.ref
        assert backend.load(first).public_key() != backend.load(second).public_key()

    def test_destroy_removes_the_key(self, backend: KeyBackend) -> None:
        keep = backend.create(KeyType.EC_P256, "keep")
        gone = backend.create(KeyType.EC_P256, "gone")
        backend.destroy(gone)
        with pytest.raises(NotFound):
            backend.load(gone)
        backend.load(keep)  # destroying one key leaves the others alone

    def test_destroy_is_idempotent(self, backend: KeyBackend) -> None:
        """``init_authority`` destroys keys on failure paths; a second destroy must not raise."""
        handle = backend.create(KeyType.EC_P256, "twice")
        backend.destroy(handle)
        backend.destroy(handle)
        with pytest.raises(NotFound):
            backend.load(handle)

    def test_load_of_a_missing_key_is_not_found(self, backend: KeyBackend) -> None:
        with pytest.raises(NotFound):
            backend.load(KeyHandle(backend.name, "never-created-0123456789ab", KeyType.EC_P256))

    def test_check_passes_when_usable(self, backend: KeyBackend) -> None:
        backend.load(backend.create(KeyType.EC_P256, "ready"))
        backend.check()


class TestFileKeyBackend:
    @pytest.mark.usefixtures("cached_big_rsa")
    @KEY_TYPES
    def test_key_file_is_0600_and_encrypted(self, tmp_path: Path, key_type: KeyType) -> None:
        backend = file_backend(tmp_path)
        handle = backend.create(key_type, "Mesh Root!")
        (path,) = (tmp_path / "keys").iterdir()
        assert path.name == f"{handle.ref}.pem"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
        data = path.read_bytes()
        assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n")
        with pytest.raises(TypeError):
            serialization.load_pem_private_key(data, password=None)
        assert handle.ref.startswith("mesh-root--")  # the label, sanitised, then randomness

    @pytest.mark.parametrize(
        "passphrase",
        [b"", b"short", b"elevenchars"],
        ids=["fail/empty", "fail/5-bytes", "fail/11-bytes"],
    )
    def test_short_passphrase_is_refused(self, tmp_path: Path, passphrase: bytes) -> None:
        with pytest.raises(InvalidInput, match="at least 12"):
            FileKeyBackend(tmp_path / "keys", passphrase)
        assert not (tmp_path / "keys").exists()

    def test_twelve_byte_passphrase_is_enough(self, tmp_path: Path) -> None:
        backend = FileKeyBackend(tmp_path / "keys", b"twelve-bytes")
        backend.load(backend.create(KeyType.EC_P256, "ok"))

    def test_wrong_passphrase_is_unavailable(self, tmp_path: Path) -> None:
        handle = file_backend(tmp_path).create(KeyType.EC_P256, "locked")
        other = FileKeyBackend(tmp_path / "keys", b"a different passphrase")
        with pytest.raises(Unavailable, match="passphrase"):
            other.load(handle)

    def test_key_of_another_type_than_recorded_is_unavailable(self, tmp_path: Path) -> None:
        backend = file_backend(tmp_path)
        handle = backend.create(KeyType.EC_P256, "typed")
        with pytest.raises(Unavailable, match="not of type"):
            backend.load(KeyHandle(handle.backend, handle.ref, KeyType.EC_P384))

    @pytest.mark.parametrize(
        "ref",
        ["../escape", "/etc/passwd", "UPPER", "-leading-dash", "a" * 82, "", "dot.pem"],
        ids=[
            "fail/parent",
            "fail/absolute",
            "fail/upper",
            "fail/dash",
            "fail/long",
            "fail/empty",
            "fail/dot",
        ],
    )
    def test_key_references_cannot_leave_the_directory(self, tmp_path: Path, ref: str) -> None:
        backend = file_backend(tmp_path)
        with pytest.raises(InvalidInput):
            backend.load(KeyHandle("file", ref, KeyType.EC_P256))
        with pytest.raises(InvalidInput):
            backend.destroy(KeyHandle("file", ref, KeyType.EC_P256))

    def test_a_key_of_a_type_trellis_never_writes_is_unavailable(self, tmp_path: Path) -> None:
        """A key file replaced by another encrypted with the same passphrase, on a curve Trellis
        has no key type for: ``KeyType.of`` refuses it as invalid input, which was exit 2 / 400
        as if the caller had made a mistake; the damage is the server's (exit 8 / 503)."""
        backend = file_backend(tmp_path)
        handle = backend.create(KeyType.EC_P256, "other-curve")
        (path,) = (tmp_path / "keys").iterdir()
        path.write_bytes(
            ec.generate_private_key(ec.SECP521R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(PASSPHRASE),
            )
        )
        with pytest.raises(Unavailable, match="not of type ec-p256"):
            backend.load(handle)

    def test_an_unencrypted_key_file_is_unavailable(self, tmp_path: Path) -> None:
        """cryptography's ``TypeError`` for a key given a passphrase it does not need was a
        traceback (exit 1, HTTP 500)."""
        backend = file_backend(tmp_path)
        handle = backend.create(KeyType.EC_P256, "replaced")
        (path,) = (tmp_path / "keys").iterdir()
        path.write_bytes(
            KeyType.EC_P256.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        with pytest.raises(Unavailable, match="is not encrypted with the key passphrase"):
            backend.load(handle)

    def test_a_loose_key_file_is_tightened_with_a_warning(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """As the directories are (``ca.files.data_directory``): a key file copied in by hand
        without its mode is made 0600 when it is read, and the operator is told."""
        backend = file_backend(tmp_path)
        handle = backend.create(KeyType.EC_P256, "copied")
        (path,) = (tmp_path / "keys").iterdir()
        path.chmod(0o644)
        with caplog.at_level(logging.WARNING, logger="trellis.files"):
            backend.load(handle)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert f"{path} was mode 0644: tightened to 0600 (it is a secret)" in caplog.text

    def test_generated_passphrase_file(self, tmp_path: Path) -> None:
        path = tmp_path / "key-passphrase"
        first = load_or_create_passphrase(path)
        assert len(first) >= 32
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert load_or_create_passphrase(path) == first
        FileKeyBackend(tmp_path / "keys", first)  # long enough for the backend

    def test_a_loose_passphrase_file_is_tightened_with_a_warning(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        path = tmp_path / "key-passphrase"
        first = load_or_create_passphrase(path)
        path.chmod(0o664)
        with caplog.at_level(logging.WARNING, logger="trellis.files"):
            assert load_or_create_passphrase(path) == first
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert f"{path} was mode 0664: tightened to 0600" in caplog.text

    @pytest.mark.parametrize(
        ("content", "message"),
        [
            (b"", "is empty or shorter than 12 characters"),
            (b"\n", "is empty or shorter than 12 characters"),
            (b"elevenchars\n", "is empty or shorter than 12 characters"),
            (None, "cannot read the key passphrase file"),
        ],
        ids=["fail/empty", "fail/blank-line", "fail/11-characters", "fail/directory"],
    )
    def test_a_damaged_passphrase_file_is_unavailable_naming_it(
        self, tmp_path: Path, content: bytes | None, message: str
    ) -> None:
        """Damage to the server's data (exit 8), not a setting to correct (exit 2), and named:
        it said "the key passphrase must be at least 12 characters". Never replaced: a new
        passphrase would open none of the keys."""
        path = tmp_path / "key-passphrase"
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        with pytest.raises(Unavailable, match=message) as refused:
            load_or_create_passphrase(path)
        assert str(path) in refused.value.detail
        assert path.is_dir() if content is None else path.read_bytes() == content

    def test_the_passphrase_is_read_when_a_key_first_needs_it(self, tmp_path: Path) -> None:
        """An instance whose keys all live in Vault has a file backend it never uses: the
        passphrase file is neither read nor made until a file key is created or loaded, and a
        failure is not kept (the file put back is read at the next use)."""
        data = tmp_path / "var"
        passphrase = KeyPassphrase(data)
        backend = FileKeyBackend(data / "keys", passphrase)
        backend.check()
        assert not passphrase.file.exists()
        passphrase.file.write_bytes(b"")
        passphrase.file.chmod(0o600)
        with pytest.raises(Unavailable, match="is empty or shorter than 12") as refused:
            backend.create(KeyType.EC_P256, "file-ca")
        assert str(passphrase.file) in refused.value.detail
        assert list((data / "keys").iterdir()) == []
        passphrase.file.unlink()
        handle = backend.create(KeyType.EC_P256, "file-ca")
        assert stat.S_IMODE(passphrase.file.stat().st_mode) == 0o600
        again = FileKeyBackend(data / "keys", KeyPassphrase(data))
        assert again.load(handle).public_key() == backend.load(handle).public_key()

    @pytest.mark.parametrize(
        ("directory", "what"),
        [("keys", "CA keys"), ("secrets", "sealed secrets")],
        ids=["fail/keys", "fail/sealed-secrets"],
    )
    def test_a_missing_passphrase_file_is_not_made_again_over_what_it_encrypted(
        self, tmp_path: Path, directory: str, what: str
    ) -> None:
        data = tmp_path / "var"
        (data / directory).mkdir(parents=True)
        (data / directory / "x").write_bytes(b"encrypted with the lost passphrase")
        passphrase = KeyPassphrase(data)
        with pytest.raises(Unavailable) as refused:
            passphrase.get()
        assert refused.value.detail == (
            f"the {what} in {data / directory} are encrypted, and {passphrase.file} is missing:"
            " put it back, or set TRELLIS_KEY_PASSPHRASE"
        )
        assert not passphrase.file.exists()
        assert KeyPassphrase(data, PASSPHRASE).get() == PASSPHRASE  # the setting needs no file
