"""One input, one reason: REST (a 400 problem) and the CLI (exit 2, ``trellis: <detail>``) refuse
the same bad value with the same sentence, because ``ca`` judges it for both.

Before, pydantic caps on the wire models fired first over REST ("spiffe_id: String should have
at most 2048 characters", "List should have at most 32 items") while the CLI gave ``ca``'s
reason; ``ca`` named CLI flags to REST callers; and the CLI stored what REST refused (a token
description cut to 255 characters) or both stored what neither should (control characters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from ca import gateway
from ca.config import Context, Settings
from ca.entries import EntryParams, create_entry
from ca.identity import SpiffeId
from ca.tokens import list_tokens
from cli.main import main
from tests.api.restkit import Rest, assert_problem, make_csr
from tests.conftest import PASSPHRASE
from tests.selfsigned import self_signed

SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
CLI_EXIT_INVALID = 2


@dataclass(frozen=True)
class Refused:
    code: int
    detail: str


@pytest.fixture
def cli(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Refused]:
    """``trellis ARGS`` in this process (``cli.main.main``, which maps errors to exit codes), on
    the test's data dir and database: how it refused."""
    monkeypatch.setenv("TRELLIS_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("TRELLIS_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("TRELLIS_KEY_PASSPHRASE", PASSPHRASE)

    def run(*args: str) -> Refused:
        capsys.readouterr()
        try:
            main(list(args))
        except SystemExit as done:
            err = capsys.readouterr().err.strip()
            assert isinstance(done.code, int) and err.startswith("trellis: "), (done.code, err)
            return Refused(done.code, err.removeprefix("trellis: "))
        raise AssertionError(f"trellis {' '.join(args)[:200]} succeeded")

    return run


def _rest(rest: Rest, path: str, body: dict[str, Any]) -> Refused:
    problem = assert_problem(rest.client.post(path, json=body, headers=rest.admin), 400)
    return Refused(problem["status"], problem["detail"])


def _same_reason(rest_said: Refused, cli_said: Refused, expected: str) -> None:
    assert rest_said.code == 400 and cli_said.code == CLI_EXIT_INVALID, (rest_said, cli_said)
    assert rest_said.detail == cli_said.detail, (rest_said, cli_said)
    assert expected in rest_said.detail, rest_said


LONG_ID = "spiffe://example.org/" + "a" * 3000
MANY_DNS = [f"h{i}.example.org" for i in range(1000)]
LONG_TD = ".".join(["a" * 63] * 4)  # 255 characters
PARTNER_URL = "https://bundle.partner.test/bundle"


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("path", "body", "args", "expected"),
    [
        pytest.param(
            "/v1/entries",
            {"spiffe_id": LONG_ID},
            ("entry", "create", "--spiffe-id", LONG_ID),
            "ID exceeds 2048 bytes",
            id="entry/spiffe-id-3000",
        ),
        pytest.param(
            "/v1/entries",
            {"spiffe_id": "spiffe://example.org/web", "dns_names": MANY_DNS},
            (
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/web",
                *(arg for name in MANY_DNS for arg in ("--dns", name)),
            ),
            "at most 32 DNS names per entry",
            id="entry/dns-names-1000",
        ),
        pytest.param(
            "/v1/revocations",
            {"spiffe_id": LONG_ID},
            ("revoke", "--spiffe-id", LONG_ID, "--yes"),
            "ID exceeds 2048 bytes",
            id="revocations/spiffe-id-3000",
        ),
        pytest.param(
            "/v1/federation",
            {"trust_domain": LONG_TD + "a", "url": PARTNER_URL, "profile": "https_web"},
            (
                "federation",
                "add",
                "--trust-domain",
                LONG_TD + "a",
                "--url",
                PARTNER_URL,
                "--profile",
                "https_web",
            ),
            "255",
            id="federation/trust-domain-256",
        ),
        pytest.param(
            "/v1/federation",
            {"trust_domain": "partner.test", "url": PARTNER_URL, "profile": "https_spiffe"},
            (
                "federation",
                "add",
                "--trust-domain",
                "partner.test",
                "--url",
                PARTNER_URL,
                "--profile",
                "https_spiffe",
            ),
            "https_spiffe needs an endpoint SPIFFE ID and a bootstrap bundle",
            id="federation/spiffe-without-endpoint",
        ),
        pytest.param(
            "/v1/federation",
            {
                "trust_domain": "partner.test",
                "url": PARTNER_URL,
                "profile": "https_web",
                "endpoint_spiffe_id": "spiffe://partner.test/server",
            },
            (
                "federation",
                "add",
                "--trust-domain",
                "partner.test",
                "--url",
                PARTNER_URL,
                "--profile",
                "https_web",
                "--endpoint-spiffe-id",
                "spiffe://partner.test/server",
            ),
            "an endpoint SPIFFE ID and a bootstrap bundle are for https_spiffe only",
            id="federation/web-with-endpoint",
        ),
        pytest.param(
            "/v1/gateway/consumers",
            {"name": "a" * 65},
            ("gateway", "consumer", "add", "a" * 65),
            "at most 64 characters",
            id="gateway/consumer-name-65",
        ),
        pytest.param(
            "/v1/gateway/consumers",
            {"name": "acme", "contact": "ops\x1b[31m@acme.example"},
            ("gateway", "consumer", "add", "acme", "--contact", "ops\x1b[31m@acme.example"),
            "U+001B at position 4 is a control or format character",
            id="gateway/contact-escape",
        ),
        *[
            pytest.param(
                "/v1/tokens",
                {"admin": True, "description": text},
                ("token", "create", "--admin", "--description", text),
                reason,
                id=f"token/admin-{case}",
            )
            for case, text, reason in [
                (
                    "description-300",
                    "d" * 300,
                    "at most 255 printable characters: this one has 300",
                ),
                ("description-newline-escape", "a\nb\x1b[31m", "U+000A at position 2"),
                ("description-bidi-override", "\u202eevil", "U+202E at position 1"),
                ("description-zero-width-space", "ad\u200bmin", "U+200B at position 3"),
                ("description-c1-control", "a\x85b", "U+0085 at position 2"),
                ("description-line-separator", "a\u2028b", "U+2028 at position 2"),
            ]
        ],
    ],
)
def test_rest_and_cli_refuse_alike(
    rest: Rest,
    ctx: Context,
    cli: Callable[..., Refused],
    path: str,
    body: dict[str, Any],
    args: tuple[str, ...],
    expected: str,
) -> None:
    _same_reason(_rest(rest, path, body), cli(*args), expected)
    assert [token.description for token in list_tokens(ctx)] == ["tests/api"]


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("description", "reason"),
    [
        pytest.param("d" * 256, "this one has 256", id="256"),
        pytest.param("a\tb", "U+0009 at position 2", id="tab"),
        pytest.param("\ufeffjoin", "U+FEFF at position 1", id="byte-order-mark"),
    ],
)
def test_join_token_descriptions_are_refused_alike(
    rest: Rest, ctx: Context, cli: Callable[..., Refused], description: str, reason: str
) -> None:
    entry = create_entry(ctx, EntryParams(SpiffeId.parse("spiffe://example.org/web")))
    rest_said = _rest(rest, "/v1/tokens", {"entry_id": entry.id, "description": description})
    cli_said = cli("token", "create", "--entry", entry.id, "--description", description)
    _same_reason(rest_said, cli_said, reason)
    assert [token.kind.value for token in list_tokens(ctx)] == ["admin"]


@SQLITE_ONLY
def test_join_token_uses_are_refused_alike(
    rest: Rest, ctx: Context, cli: Callable[..., Refused]
) -> None:
    """pydantic's "Input should be less than or equal to 1000" no longer comes first."""
    entry = create_entry(ctx, EntryParams(SpiffeId.parse("spiffe://example.org/web")))
    for uses in (0, 1001):
        rest_said = _rest(rest, "/v1/tokens", {"entry_id": entry.id, "uses": uses})
        cli_said = cli("token", "create", "--entry", entry.id, "--uses", str(uses))
        _same_reason(rest_said, cli_said, "a join token allows 1 to 1000 uses")


def _certificate_pem() -> str:
    cert, _ = self_signed("not a csr")
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _two_csrs() -> str:
    return make_csr()[1] + make_csr()[1]


@SQLITE_ONLY
@pytest.mark.parametrize(
    "csr",
    [
        pytest.param(_two_csrs, id="two-csrs"),
        pytest.param(lambda: make_csr()[1] + _certificate_pem(), id="csr-then-certificate"),
    ],
)
def test_a_gateway_csr_is_exactly_one_request(
    rest: Rest,
    ctx: Context,
    cli: Callable[..., Refused],
    tmp_path: Path,
    csr: Callable[[], str],
) -> None:
    gateway.init_gateway(ctx, gateway.GatewayParams())
    gateway.add_consumer(ctx, gateway.ConsumerName("acme"))
    pem = csr()
    (tmp_path / "two.csr").write_text(pem)
    rest_said = _rest(rest, "/v1/gateway/consumers/acme/certificates", {"csr": pem})
    cli_said = cli(
        "gateway", "cert", "issue", "acme", "--csr", str(tmp_path / "two.csr"),
        "--out", str(tmp_path / "acme.pem"),
    )  # fmt: skip
    _same_reason(rest_said, cli_said, "send exactly one BEGIN/END CERTIFICATE REQUEST block")
    assert gateway.get_consumer(ctx, gateway.ConsumerName("acme")).live_certificates == 0
    assert not (tmp_path / "acme.pem").exists()
