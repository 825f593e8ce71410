"""Fixtures: a context with the mesh authority and an initialised, configured OpenVPN authority
(``vpn``) whose CRL file lives in the test's directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from ca.config import Context
from ca.openvpn import ConfigureParams, InitParams, VpnName, configure, init_openvpn

REMOTE = "vpn.example.org"


@pytest.fixture
def crl_file(tmp_path: Path) -> Path:
    """In a directory of its own that exists: Trellis does not create a CRL path's directory."""
    (tmp_path / "openvpn").mkdir()
    return tmp_path / "openvpn" / "crl.pem"


@pytest.fixture
def vpn(ctx: Context, crl_file: Path) -> Context:
    """``ctx`` (mesh initialised) plus ``trellis openvpn init`` and ``configure``."""
    init_openvpn(ctx, InitParams())
    configure(
        ctx,
        ConfigureParams(remote=REMOTE, crl_path=crl_file, server_cn=VpnName(REMOTE)),
    )
    return ctx


@pytest.fixture
def vpn_unconfigured(bare_ctx: Context) -> Context:
    """Only ``trellis openvpn init``: no mesh, no remote, no CRL file yet."""
    init_openvpn(bare_ctx, InitParams())
    return bare_ctx
