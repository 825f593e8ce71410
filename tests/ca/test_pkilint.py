"""Everything Trellis signs, judged by an RFC 5280 linter Trellis did not write.

openssl and py-spiffe (``test_independent_checkers``) say whether relying parties accept the
certificates; pkilint (DigiCert's PKI linter) reads each structure against RFC 5280 and RFC
6960 themselves: encodings, extension criticality and contents, key identifiers, names, the
issuer/subject pair of each link, CRL and OCSP fields. Every profile is made as an operator
makes it, through the CLI, and each CRL holds a revoked entry with its reason.

pkilint checks a URI's syntax with a web-URL validator, which refuses any scheme but the web's:
``spiffe://example.org/...`` (the X509-SVID identity) and ``urn:trellis:...`` are valid RFC
3986 URIs all the same. That one finding is set aside for those two schemes only, and the test
checks it is reported for them (so that a pkilint that stops reporting it is noticed too).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from ca import ocsp as trellis_ocsp
from ca.config import Settings, build_context
from tests.openvpn.vpnkit import InProcessTrellis, crls_in, parse_profile
from tests.selfsigned import CA_KEY_USAGE, self_signed

pkilint = pytest.importorskip("pkilint", reason="pkilint is in the test extras")

from pkilint import loader, pkix, validation  # noqa: E402
from pkilint.bin import lint_pkix_signer_signee_cert_chain as chain_linter  # noqa: E402
from pkilint.pkix import certificate, crl, extension, name  # noqa: E402
from pkilint.pkix import ocsp as pkilint_ocsp  # noqa: E402

WEB = "spiffe://example.org/ns/default/sa/web"
# The finding pkilint raises for every URI that is not a web URL (see the module docstring).
URI_SYNTAX = "pkix.invalid_uri_syntax"
NON_WEB_URI = re.compile(r'^Invalid URI syntax: "(spiffe://|urn:)')


@dataclass
class Issued:
    """DER documents by name; ``links``: (issuer, subject) certificate names."""

    certificates: dict[str, bytes]
    crls: dict[str, bytes]
    ocsp_responses: dict[str, bytes]
    links: list[tuple[str, str]]


def _certs_in(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _cn(cert: x509.Certificate | x509.CertificateRevocationList) -> str:
    name = cert.subject if isinstance(cert, x509.Certificate) else cert.issuer
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else "(no CN)"


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> Issued:
    root = tmp_path_factory.mktemp("pkilint")
    cli = InProcessTrellis(root / "var", f"sqlite:///{root / 'trellis.db'}")
    cli.run("init", "--trust-domain", "example.org")
    cli.run("svid", "mint", "--spiffe-id", WEB, "--out", str(root / "svid"))
    cli.run("openvpn", "init")
    cli.run("openvpn", "configure", "--remote", "vpn.example.org")
    cli.run("openvpn", "server-cert", "--cn", "vpn.example.org", "--out", str(root / "vpn"))
    cli.run("openvpn", "client", "add", "alice", "--out", str(root / "alice.ovpn"))
    cli.run("gateway", "init")
    cli.run("gateway", "consumer", "add", "acme", "--contact", "api@acme.example")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme")]))
        .sign(key, hashes.SHA256())
    )
    (root / "acme.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    cli.run("gateway", "cert", "issue", "acme", "--csr", str(root / "acme.csr"),
            "--out", str(root / "acme.pem"))  # fmt: skip
    cli.run("istio", "issue", "--cluster", "c1", "--out", str(root / "istio.yaml"), "--with-crl")

    svid, mesh_intermediate = _certs_in(root / "svid" / "svid.pem")
    (mesh_root,) = _certs_in(root / "svid" / "bundle.pem")
    vpn_server, vpn_intermediate = _certs_in(root / "vpn" / "server.crt")
    profile = parse_profile((root / "alice.ovpn").read_bytes())
    vpn_client, vpn_root = profile.certificates("cert")[0], profile.certificates("ca")[-1]
    gateway_client, gateway_intermediate = _certs_in(root / "acme.pem")
    secret = yaml.safe_load((root / "istio.yaml").read_text())["data"]
    istio = x509.load_pem_x509_certificates(base64.b64decode(secret["ca-cert.pem"]))[0]
    istio_crls = crls_in(base64.b64decode(secret["ca-crl.pem"]))

    # Revoked, so that each CRL has an entry with its reason, and OCSP answers "revoked".
    cli.run("revoke", format(svid.serial_number, "x"), "--reason", "keyCompromise", "--yes")
    cli.run("openvpn", "client", "revoke", "alice", "--yes")
    cli.run("gateway", "cert", "revoke", format(gateway_client.serial_number, "x"),
            "--reason", "keyCompromise")  # fmt: skip
    cli.run("crl", "fetch", "--out", str(root / "mesh-int.crl"), "--ca", "intermediate")
    cli.run("crl", "fetch", "--out", str(root / "mesh-root.crl"), "--ca", "root")
    cli.run("openvpn", "crl", "--out", str(root / "vpn-crl.pem"))
    cli.run("gateway", "truststore", "--format", "nginx", "--out", str(root / "nginx"))
    crls = {
        "mesh intermediate CRL": (root / "mesh-int.crl").read_bytes(),
        "mesh root CRL": (root / "mesh-root.crl").read_bytes(),
    }
    for source in (root / "vpn-crl.pem", root / "nginx" / "crl.pem"):
        for found in crls_in(source.read_bytes()):
            crls[f"{_cn(found)} CRL"] = found.public_bytes(serialization.Encoding.DER)
    for found in istio_crls:
        crls[f"istio secret: {_cn(found)} CRL"] = found.public_bytes(serialization.Encoding.DER)

    ctx = build_context(
        Settings(
            data_dir=root / "var",
            database_url=cli.env["TRELLIS_DATABASE_URL"],
            key_passphrase=cli.env["TRELLIS_KEY_PASSPHRASE"],
        )
    )
    try:
        responses = {}
        for label, leaf, issuer in (
            ("revoked SVID", svid, mesh_intermediate),
            ("good OpenVPN server", vpn_server, vpn_intermediate),
        ):
            request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()
            responses[label] = trellis_ocsp.respond(
                ctx, request.public_bytes(serialization.Encoding.DER)
            )
    finally:
        ctx.close()

    certificates = {
        "SVID": svid,
        "mesh intermediate": mesh_intermediate,
        "mesh root": mesh_root,
        "Istio intermediate": istio,
        "OpenVPN server": vpn_server,
        "OpenVPN client": vpn_client,
        "OpenVPN intermediate": vpn_intermediate,
        "OpenVPN root": vpn_root,
        "gateway client": gateway_client,
        "gateway intermediate": gateway_intermediate,
    }
    links = [
        ("mesh intermediate", "SVID"),
        ("mesh root", "mesh intermediate"),
        ("mesh root", "Istio intermediate"),
        ("OpenVPN intermediate", "OpenVPN server"),
        ("OpenVPN intermediate", "OpenVPN client"),
        ("OpenVPN root", "OpenVPN intermediate"),
        ("gateway intermediate", "gateway client"),
    ]
    return Issued(
        {label: _der(cert) for label, cert in certificates.items()}, crls, responses, links
    )


def _findings(results: Iterable[validation.ValidationResult]) -> list[tuple[str, str, str]]:
    """(finding code, message, where) of every finding at NOTICE or above."""
    threshold = validation.ValidationFindingSeverity.NOTICE
    return [
        (described.finding.code, described.message or "", result.node.path)
        for result in results
        for described in result.finding_descriptions
        if described.finding.severity <= threshold
    ]


def _judged(findings: list[tuple[str, str, str]]) -> tuple[list[Any], list[Any]]:
    """(findings that count, the non-web URI findings set aside)."""
    set_aside = [f for f in findings if f[0] == URI_SYNTAX and NON_WEB_URI.match(f[1])]
    return [f for f in findings if f not in set_aside], set_aside


def _certificate_validator() -> Any:
    return certificate.create_pkix_certificate_validator_container(
        certificate.create_decoding_validators(
            name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS
        ),
        [
            certificate.create_issuer_validator_container([]),
            certificate.create_validity_validator_container(),
            certificate.create_subject_validator_container([]),
            certificate.create_extensions_validator_container([]),
            certificate.create_spki_validator_container([]),
        ],
    )


CERTIFICATES = [
    "SVID",
    "mesh intermediate",
    "mesh root",
    "Istio intermediate",
    "OpenVPN server",
    "OpenVPN client",
    "OpenVPN intermediate",
    "OpenVPN root",
    "gateway client",
    "gateway intermediate",
]
# Which certificates carry a non-web URI SAN (whose syntax finding is set aside).
WITH_NON_WEB_URI = {"SVID", "mesh intermediate", "mesh root", "Istio intermediate",
                    "gateway client"}  # fmt: skip


@pytest.mark.parametrize("label", CERTIFICATES)
def test_every_certificate_profile_passes_the_rfc_5280_linter(issued: Issued, label: str) -> None:
    document = loader.RFC5280CertificateDocumentLoader().load_der_document(
        issued.certificates[label], label
    )
    counted, set_aside = _judged(_findings(_certificate_validator().validate(document.root)))
    assert counted == [], f"{label}: {counted}"
    assert bool(set_aside) == (label in WITH_NON_WEB_URI), set_aside


def test_every_issuer_and_subject_pair_passes_the_chain_linter(issued: Issued) -> None:
    assert len(issued.links) == 7
    for issuer_label, subject_label in issued.links:
        # Each document sees the other through the shared mapping, as pkilint's CLI sets it up.
        documents: dict[str, Any] = {}
        load = loader.RFC5280CertificateDocumentLoader().load_der_document
        issuer = documents["issuer"] = load(
            issued.certificates[issuer_label], issuer_label, "issuer", documents
        )
        subject = documents["subject"] = load(
            issued.certificates[subject_label], subject_label, "subject", documents
        )
        decoding = chain_linter.create_decoder_validation_container()
        results = decoding.validate(issuer.root) + decoding.validate(subject.root)
        results += chain_linter.create_issuer_validation_container().validate(issuer.root)
        results += chain_linter.create_subject_validation_container().validate(subject.root)
        counted, _ = _judged(_findings(results))
        assert counted == [], f"{issuer_label} -> {subject_label}: {counted}"


def test_every_crl_passes_the_rfc_5280_crl_linter(issued: Issued) -> None:
    validator = crl.create_pkix_crl_validator_container(
        [
            pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
        ],
        [
            crl.create_issuer_validator_container([]),
            crl.create_validity_validator_container([]),
            crl.create_extensions_validator_container([]),
        ],
    )
    revoked_entries = 0
    assert len(issued.crls) >= 7, sorted(issued.crls)
    for label, der in issued.crls.items():
        document = loader.RFC5280CertificateListDocumentLoader().load_der_document(der, label)
        counted, set_aside = _judged(_findings(validator.validate(document.root)))
        assert counted == [] and set_aside == [], f"{label}: {counted + set_aside}"
        revoked_entries += len(x509.load_der_x509_crl(der))
    assert revoked_entries >= 3  # the SVID's, alice's and acme's entries were linted too


@pytest.mark.parametrize("label", ["revoked SVID", "good OpenVPN server"])
def test_ocsp_responses_pass_the_rfc_6960_linter(issued: Issued, label: str) -> None:
    der = issued.ocsp_responses[label]
    status = ocsp.load_der_ocsp_response(der).certificate_status
    assert status == (
        ocsp.OCSPCertStatus.REVOKED if "revoked" in label else ocsp.OCSPCertStatus.GOOD
    )
    validator = pkilint_ocsp.create_pkix_ocsp_response_validator_container(
        [
            pkilint_ocsp.create_response_decoder(),
            pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
        ],
        [],
    )
    document = loader.RFC6960OCSPResponseDocumentLoader().load_der_document(der, label)
    counted, set_aside = _judged(_findings(validator.validate(document.root)))
    assert counted == [] and set_aside == [], f"{label}: {counted + set_aside}"


def test_the_linter_reports_what_it_is_trusted_to_find() -> None:
    """The same validators on a certificate with known defects: a CA certificate whose
    basicConstraints is not critical and that lacks a subject key identifier (RFC 5280
    4.2.1.9, 4.2.1.2), signed by a throwaway key."""
    cert, _ = self_signed(
        "defective CA",
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), False),  # not critical: a defect
            (CA_KEY_USAGE, True),
        ],
    )
    document = loader.RFC5280CertificateDocumentLoader().load_der_document(_der(cert), "bad")
    codes = {code for code, _, _ in _findings(_certificate_validator().validate(document.root))}
    assert "pkix.basic_constraints_extension_not_critical" in codes, codes
    assert "pkix.certificate_skid_ca_missing" in codes, codes
