"""The OpenVPN server certificate is renewed by schedule into its server-config directory."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.clock import FixedClock
from ca.config import Context
from ca.durations import Ttl
from ca.jobs import job_named
from ca.openvpn import ServerRequest, renew_server_certificates, server_config, write_files


def _serial(directory: Path) -> int:
    return x509.load_pem_x509_certificates((directory / "server.crt").read_bytes())[0].serial_number


def test_server_certificate_is_renewed_in_place_after_two_thirds(
    vpn: Context, clock: FixedClock, tmp_path: Path
) -> None:
    out = tmp_path / "server"
    write_files(server_config(vpn, ServerRequest(ttl=Ttl.parse("30d")), out_dir=out), out)
    first = _serial(out)
    assert renew_server_certificates(vpn) == []  # fresh: nothing due
    clock.advance(dt.timedelta(days=19))
    assert job_named("openvpn-server-certificate").run(vpn) == "nothing due"
    clock.advance(dt.timedelta(days=1, hours=1))  # past 20 of 30 days
    renewed = renew_server_certificates(vpn)
    assert len(renewed) == 1 and renewed[0].startswith("vpn: ")
    second = _serial(out)
    assert second != first
    cert = x509.load_pem_x509_certificates((out / "server.crt").read_bytes())[0]
    key = serialization.load_pem_private_key((out / "server.key").read_bytes(), None)
    assert cert.public_key() == key.public_key()  # the pair on disk matches
    assert (out / "server.key").stat().st_mode & 0o777 == 0o600
    assert cert.not_valid_after_utc - clock.now() > dt.timedelta(days=29)  # same 30-day lifetime
    assert renew_server_certificates(vpn) == []  # and not again
