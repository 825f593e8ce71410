"""Names at the limits Trellis accepts: a trust domain of 255 bytes (the SPIFFE limit Trellis
enforces, ``ca.identity``) and a cluster name of 63 characters (a DNS label). Every CA Trellis
signs for them names them in a subject attribute that X.520 caps at 64 characters, where
cryptography raised ValueError: ``init`` failed with a traceback for any trust domain of 52
characters or more, and ``istio issue`` for a cluster name of 59 or more."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from ca.authority import AuthorityParams, active_issuer, init_authority
from ca.config import Context
from ca.emergency import revoke_intermediate
from ca.identity import TrustDomain
from ca.istio import IstioParams, issue_istio_intermediate
from ca.root_rotation import rotate_root
from ca.rotation import rotate
from tests.ca.svidkit import enrol
from tests.ca.test_ocsp import ask, request_der

LONGEST = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 63])  # 255 bytes


def _values(name: x509.Name, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(attribute.value) for attribute in name.get_attributes_for_oid(oid)]


def _common_name(cert: x509.Certificate) -> str:
    (value,) = _values(cert.subject, NameOID.COMMON_NAME)
    return value


def test_every_ca_of_the_longest_trust_domain_is_signed(bare_ctx: Context, tmp_path: Path) -> None:
    ctx = bare_ctx
    assert len(LONGEST) == 255
    init_authority(ctx, AuthorityParams(TrustDomain.parse(LONGEST)))
    intermediate = active_issuer(ctx)
    root = intermediate.roots[0]
    names = {_common_name(root), _common_name(intermediate.certificate)}
    assert names == {LONGEST[:59] + " root", LONGEST[:51] + " intermediate"}
    # The SPIFFE ID is whole where it counts: an SVID's URI SAN, the CA's trust domain ID.
    workload = enrol(ctx, f"spiffe://{LONGEST}/web")
    leaf_san = workload.svid.certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert leaf_san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{LONGEST}/web"
    ]
    san = intermediate.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{LONGEST}"]

    # The OCSP responder, a rotated intermediate, a new root and an emergency replacement.
    (responder,) = ask(
        ctx, request_der(workload.svid.certificate, intermediate.certificate)
    ).certificates
    assert _common_name(responder) == LONGEST[:49] + " OCSP responder"
    assert rotate(ctx, force=True, actor="test")
    assert len(_common_name(active_issuer(ctx).certificate)) == 64
    assert rotate_root(ctx, actor="test").step == "published"
    revoke_intermediate(ctx, actor="test")
    assert _common_name(active_issuer(ctx).certificate) == LONGEST[:51] + " intermediate"

    # Istio: the trust domain in OU, cut; a 63-character cluster name whole, in the CN.
    cluster = "e" * 63
    istio = issue_istio_intermediate(
        ctx, IstioParams(cluster=cluster, output=tmp_path / "cacerts.yaml")
    )
    subject = istio.certificate.subject
    assert _values(subject, NameOID.COMMON_NAME) == [cluster]
    assert _values(subject, NameOID.ORGANIZATIONAL_UNIT_NAME) == [f"istio {LONGEST}"[:64]]
    short = issue_istio_intermediate(ctx, IstioParams(cluster="east", output=tmp_path / "e.yaml"))
    assert _values(short.certificate.subject, NameOID.COMMON_NAME) == ["istio-east"]
