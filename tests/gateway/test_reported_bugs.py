"""Defects outside the gateway's files that the gateway work ran into, pinned as strict xfails:
each starts passing (and so fails the suite, prompting removal) once the named line is fixed."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from ca import gateway
from ca.clock import FixedClock
from ca.config import Settings, build_context
from tests.conftest import PASSPHRASE
from tests.gateway.conftest import ACME
from tests.gateway.gwkit import partner_csr


def test_gateway_leaves_point_at_their_crl_with_a_public_url(
    tmp_path: Path, clock: FixedClock
) -> None:
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=f"sqlite:///{tmp_path / 'gateway.db'}",
        key_passphrase=PASSPHRASE,  # type: ignore[arg-type]
        public_url="https://trellis.example.org",
    )
    ctx = build_context(settings, clock=clock)
    try:
        gateway.init_gateway(ctx, gateway.GatewayParams())
        gateway.add_consumer(ctx, ACME)
        issued = gateway.issue_certificate(
            ctx, gateway.CertRequest(ACME, "tests", csr_pem=partner_csr()[1])
        )
        points = issued.certificate.extensions.get_extension_for_class(
            x509.CRLDistributionPoints
        ).value
        assert points[0].full_name is not None
        assert str(points[0].full_name[0].value).startswith("https://trellis.example.org/v1/crl/")
    finally:
        ctx.close()
