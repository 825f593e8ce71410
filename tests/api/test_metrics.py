"""/metrics: after issuing and revoking, the exposition shows it and parses as Prometheus text."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ca.csr import parse_csr
from ca.renewal import make_proof
from tests.api.restkit import Rest, make_csr, new_key

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_issuance_and_revocation_show_in_metrics(rest: Rest) -> None:
    before = _samples(rest.client)
    issued = "trellis_certificates_issued_total"
    base = _value(before, issued, authority="mesh", profile="x509-svid", result="issued")
    serials = [rest.enrol(f"spiffe://example.org/w{i}").serial for i in range(3)]
    token = rest.join_token(rest.create_entry("spiffe://example.org/refused"))
    refused = rest.client.post(
        "/v1/svid", json={"csr": "not a csr"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert refused.status_code == 400
    revoked = rest.client.post(
        f"/v1/certificates/{serials[0]}/revoke",
        json={"reason": "keyCompromise"},
        headers=rest.admin,
    )
    assert revoked.status_code == 200
    after = _samples(rest.client)
    assert _value(after, issued, authority="mesh", profile="x509-svid", result="issued") == base + 3
    assert _value(after, issued, authority="mesh", profile="x509-svid", result="invalid-csr") >= 1
    assert _value(after, "trellis_revocations_total", authority="mesh", reason="keyCompromise") >= 1
    assert _value(after, "trellis_active_certificates", authority="mesh", profile="x509-svid") == 2
    latency = [v for (n, _), v in after.items() if n == "trellis_issuance_seconds_count"]
    assert sum(latency) >= 3
    expiry = [v for (n, _), v in after.items() if n == "trellis_ca_expiry_seconds"]
    assert len(expiry) == 2 and all(v > 0 for v in expiry)  # root and intermediate
    crl = [v for (n, _), v in after.items() if n == "trellis_crl_next_update_seconds"]
    assert crl and all(v > 0 for v in crl)  # the revocation signed the intermediate's CRL


def test_refused_credentials_count_as_unauthenticated(rest: Rest) -> None:
    """docs/operations.md lists ``unauthenticated`` as a result: a spent or unknown join token, a
    malformed renewal proof, renewing a revoked SVID and no credential at all are all 401, also
    with a body whose fields are bad (regression: a bad ``ttl`` was judged first, 400)."""
    issued = "trellis_certificates_issued_total"
    labels = {"authority": "mesh", "profile": "x509-svid", "result": "unauthenticated"}
    base = _value(_samples(rest.client), issued, **labels)
    token = rest.join_token(rest.create_entry("spiffe://example.org/once"))
    _key, csr = make_csr()
    assert rest.request_svid(token, csr).status_code == 200
    svid = rest.enrol("spiffe://example.org/revoked")
    revoked = rest.client.post(
        f"/v1/certificates/{svid.serial}/revoke",
        json={"reason": "keyCompromise"},
        headers=rest.admin,
    )
    assert revoked.status_code == 200, revoked.text
    forged = make_proof(
        svid.certificate, new_key(), parse_csr(csr.encode()).sha256, rest.clock.now()
    )
    refusals = [
        rest.request_svid(token, csr),  # used
        rest.request_svid("no-such-token", csr),  # unknown
        rest.renew(svid, csr, proof="not.a.jwt"),  # malformed proof
        rest.renew(svid, csr),  # a revoked SVID
        rest.client.post("/v1/svid", json={"csr": csr}),  # no credential
        # A bad credential with a bad body: the credential is judged first.
        rest.request_svid("no-such-token", "x", ttl="bogus"),
        rest.renew(svid, "x", proof="not.a.jwt", ttl="bogus"),
        # A well-formed proof signed by another key, with a CSR that is not one: the proof's
        # signature is checked before the CSR is judged.
        rest.renew(svid, "x", proof=forged),
    ]
    assert [r.status_code for r in refusals] == [401] * 8, [r.text for r in refusals]
    assert _value(_samples(rest.client), issued, **labels) == base + 8


def test_a_bad_ttl_with_a_valid_credential_counts_as_invalid_input(rest: Rest) -> None:
    """Regression: a join token or a renewal proof that authenticated, with a ``ttl`` that is no
    duration, was 400 but counted under no result (the TTL was parsed outside the measured
    issuance), unlike a TTL above the maximum (``policy-violation``)."""
    issued = "trellis_certificates_issued_total"
    labels = {"authority": "mesh", "profile": "x509-svid"}
    before = _samples(rest.client)
    svid = rest.enrol("spiffe://example.org/ttl")
    token = rest.join_token(rest.create_entry("spiffe://example.org/ttl-token"))
    _key, csr = make_csr()
    refusals = [
        rest.request_svid(token, csr, ttl="soon"),
        rest.renew(svid, csr, ttl="soon"),
        rest.renew(svid, csr, ttl="999h"),
    ]
    assert [r.status_code for r in refusals] == [400] * 3, [r.text for r in refusals]
    after = _samples(rest.client)
    for result, more in (("invalid-input", 2), ("policy-violation", 1), ("issued", 1)):
        counted = _value(after, issued, **labels, result=result)
        assert counted == _value(before, issued, **labels, result=result) + more, result
