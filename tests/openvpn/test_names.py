"""Names OpenVPN would mangle or misuse are refused before anything is issued."""

from __future__ import annotations

from pathlib import Path

import pytest

from ca.config import Context
from ca.durations import Ttl
from ca.errors import InvalidInput
from ca.openvpn import (
    ConfigureParams,
    InitParams,
    Proto,
    TlsCrypt,
    VpnName,
    configure,
    init_openvpn,
    remote_host,
)
from tests.conftest import sqlite_database


@pytest.mark.parametrize(
    "name",
    ["alice", "Alice.Smith", "bob_2", "a", "x" * 64, "laptop-7.corp", "0day", "_svc"],
)
def test_accepted(name: str) -> None:
    assert str(VpnName(name)) == name


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * 65, id="too-long"),
        pytest.param(".hidden", id="leading-dot"),
        pytest.param("-option", id="leading-dash"),
        pytest.param("alice smith", id="space"),
        pytest.param("alice/../x", id="slash"),
        pytest.param("al'ice", id="quote"),
        pytest.param("alice@corp", id="at-sign"),
        pytest.param("ålice", id="non-ascii"),
        pytest.param("alice\n", id="newline"),
        pytest.param("CN=alice", id="equals"),
        pytest.param("a,b", id="comma"),
    ],
)
def test_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid name"):
        VpnName(name)


@pytest.mark.parametrize(
    "remote",
    ["vpn.example.org", "VPN.Example.org", "10.0.0.1", "::1", "localhost", "a-b.c"],
)
def test_remote_hosts_accepted(remote: str) -> None:
    assert remote_host(remote) == remote.lower()


@pytest.mark.parametrize(
    "remote",
    ["", "vpn example", "-vpn.example.org", "vpn..example", "vpn.example.org\n", "a" * 64],
)
def test_remote_hosts_refused(remote: str) -> None:
    with pytest.raises(InvalidInput):
        remote_host(remote)


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite only: nothing here depends on the database (test_clients.py and test_rest.py run
    on both)."""
    return sqlite_database(request, tmp_path / "trellis.db")


def test_configure_refuses_bad_values(vpn_unconfigured: Context) -> None:
    for port in (0, 65536):
        with pytest.raises(InvalidInput, match="port"):
            configure(vpn_unconfigured, ConfigureParams(port=port))
    with pytest.raises(InvalidInput, match="remote host"):
        configure(vpn_unconfigured, ConfigureParams(remote="vpn example"))


def test_enums_parse() -> None:
    assert Proto.parse(" TCP ") is Proto.TCP
    assert TlsCrypt.parse("Shared") is TlsCrypt.SHARED
    with pytest.raises(InvalidInput):
        Proto.parse("sctp")
    with pytest.raises(InvalidInput):
        TlsCrypt.parse("v1")


def test_too_short_a_ca_ttl_names_the_option_openvpn_init_has(bare_ctx: Context) -> None:
    """openvpn init has no SVIDs and no SVID TTL: the refusal names the CA TTL."""
    with pytest.raises(InvalidInput, match=r"give a CA TTL of 6s or more") as refused:
        init_openvpn(bare_ctx, InitParams(ca_ttl=Ttl.parse("5s")))
    assert "SVID" not in refused.value.detail
