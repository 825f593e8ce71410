"""``ca.profiles.is_istio_subject``: every subject an Istio plug-in intermediate of Trellis has had
(O=Trellis, OU=istio <td>, CN=istio-<cluster>; since f236cab both cut to 64 characters, the CN
then the cluster name alone), in any spelling OpenSSL takes for the same name, and none of the
CAs Trellis's own server certificate is issued under."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from ca.authority import active_issuer
from ca.config import Context
from ca.istio import IstioParams, issue_istio_intermediate
from ca.profiles import ca_subject, is_istio_subject, istio_subject
from tests.istio.conftest import SQLITE_ONLY

LONG_TD = f"{'a' * 63}.{'b' * 63}.{'c' * 63}.example.org"


def name(organisation: str, unit: str, common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


@pytest.mark.parametrize(
    "subject",
    [
        pytest.param(istio_subject("example.org", "c1"), id="istio/now"),
        pytest.param(istio_subject(LONG_TD, "c" * 63), id="istio/now-cut-to-64"),
        pytest.param(istio_subject("example.org", "c" * 58), id="istio/now-cn-just-fits"),
        pytest.param(name("Trellis", "istio example.org", "istio-c1"), id="istio/be35df8"),
        pytest.param(name("TRELLIS", "ISTIO EXAMPLE.ORG", "ISTIO-C1"), id="openssl/case"),
        pytest.param(name(" Trellis ", "\tistio\t  example.org ", "istio-c1"), id="openssl/spaces"),
    ],
)
def test_every_istio_intermediate_subject_is_one(subject: x509.Name) -> None:
    assert is_istio_subject(subject)


@pytest.mark.parametrize(
    "subject",
    [
        pytest.param(ca_subject("Trellis", "example.org root"), id="trellis/root"),
        pytest.param(ca_subject("Trellis", "example.org intermediate"), id="trellis/intermediate"),
        pytest.param(ca_subject("Trellis", "istio example.org"), id="trellis/cn-only"),
        pytest.param(name("Trellis", "istiod", "c1"), id="other/ou-istiod"),
        pytest.param(name("Example", "istio example.org", "istio-c1"), id="other/organisation"),
        pytest.param(x509.Name([]), id="other/empty"),
    ],
)
def test_other_names_are_not(subject: x509.Name) -> None:
    assert not is_istio_subject(subject)


@SQLITE_ONLY
def test_the_issued_intermediate_is_one_and_the_authoritys_cas_are_not(ctx: Context) -> None:
    issued = issue_istio_intermediate(ctx, IstioParams("c1"))
    assert is_istio_subject(issued.certificate.subject)
    issuer = active_issuer(ctx)
    assert not any(is_istio_subject(ca.subject) for ca in (*issuer.chain, *issuer.roots))
