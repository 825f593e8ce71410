"""``trellis serve`` over its life: a serving key that is gone or not its certificate's, a
worker that cannot start, SIGHUP, and how it exits on SIGTERM and SIGINT (docs/operations.md).
Each test runs the real command."""

from __future__ import annotations

from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from ca.pem import private_key_pem
from tests.cli.test_walkthrough import Trellis


def _initialised(tmp_path: Path) -> Trellis:
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.set_up("init", "--trust-domain", "example.org")
    return cli


def test_serve_repairs_a_serving_key_that_is_gone_or_foreign(tmp_path: Path) -> None:
    """The banner printed, then 'trellis: No such file or directory' (or KEY_VALUES_MISMATCH),
    exit 8, on every start until someone removed server/tls.crt too."""
    cli = _initialised(tmp_path)
    with cli.serving(tmp_path / "first.log"):
        pass
    key = cli.data_dir / "server" / "tls.key"
    for damage, reason in (
        (key.unlink, "is missing"),
        (
            lambda: key.write_bytes(private_key_pem(ec.generate_private_key(ec.SECP256R1()))),
            "does not match the certificate",
        ),
    ):
        damage()
        log = tmp_path / "serve.log"
        with cli.serving(log) as serve:
            assert httpx.get(f"{serve.url}/healthz", verify=serve.tls).is_success
        assert f"issuing a new serving certificate: its key {key} {reason}" in log.read_text()
