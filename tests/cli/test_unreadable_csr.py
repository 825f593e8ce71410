"""A CSR cryptography refuses with an exception of its own, as the real ``trellis`` reports it."""

from __future__ import annotations

from pathlib import Path

from tests.ca.svidkit import unreadable_csr
from tests.cli.test_walkthrough import Trellis


def test_gateway_cert_issue_with_a_csr_of_another_version_is_exit_2(tmp_path: Path) -> None:
    """Regression: ``trellis gateway cert issue --csr`` with a CSR whose version is not v1 (0)
    printed a full traceback and exited 1: cryptography's ``InvalidVersion`` is not the
    ValueError ``ca.csr`` caught. It is bad input: one ``trellis:`` line, exit 2 (docs/cli.md),
    nothing written, nothing issued."""
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.set_up("init", "--trust-domain", "example.org")
    cli.set_up("gateway", "init")
    cli.set_up("gateway", "consumer", "add", "acme")
    csr, out = tmp_path / "v5.csr", tmp_path / "acme.pem"
    csr.write_bytes(unreadable_csr(tmp_path, "csr/version-5"))

    refused = cli.run(
        "gateway", "cert", "issue", "acme", "--csr", str(csr), "--out", str(out), ok=False
    )
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.splitlines() == [
        "trellis: the CSR is not a valid PEM certificate request"
    ], refused.stderr
    assert not out.exists()
    assert cli.json("gateway", "cert", "list") == []
