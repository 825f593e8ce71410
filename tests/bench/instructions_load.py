"""The workload ``tests.bench.instructions`` counts under valgrind: ``python instructions_load.py
MODE BATCHES`` sets up a CA on SQLite, warms up, then makes BATCHES batches of 16 join-token
issuances at once on one event loop, as a serving worker does.

MODE ``ca``: ``join_grant_async`` + ``issue_svid_async``, the ``ca`` path below HTTP. MODE
``asgi``: ``POST /v1/svid`` through the application ``trellis serve`` runs (``create_app``),
called as an ASGI server calls it, without sockets or TLS. MODE ``renew``: ``POST
/v1/svid/renew`` the same way, each with a renewal proof of an SVID issued before (the request
a platform of hourly SVIDs makes most); the SVIDs, their new keys' CSRs and the proofs are
made for ``MAX_BATCHES`` whatever BATCHES is, so that set-up counts the same in every run, on
a fixed clock, so that no proof outlives its five minutes under valgrind.

Run as a file, from the tree whose code it measures (``PYTHONPATH`` and the working directory
that tree), so it imports only ``ca`` and ``api`` and names nothing of ``tests``: the base
revision's tree may have another ``tests/bench``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # this file's directory: its modules must not shadow the tree's
    del sys.path[0]

import asyncio
import datetime as dt
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from api.app import create_app, freeze_startup_heap
from ca.authority import AuthorityParams, init_authority
from ca.clock import FixedClock
from ca.config import Settings, build_context
from ca.entries import EntryParams, create_entry
from ca.grants import join_grant, join_grant_async
from ca.identity import SpiffeId, TrustDomain
from ca.issue import issue_svid, issue_svid_async
from ca.renewal import make_proof
from ca.tokens import create_join_token

SPIFFE_ID = "spiffe://example.org/bench/instructions"
AT_ONCE, WARM_BATCHES, MAX_BATCHES, USES = 16, 5, 30, 1000


def csrs(count: int) -> list[str]:
    return [csr for csr, _ in keyed_csrs(count)]


def keyed_csrs(count: int) -> list[tuple[str, ec.EllipticCurvePrivateKey]]:
    made = []
    for _ in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SPIFFE_ID)]),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        made.append((csr.public_bytes(serialization.Encoding.PEM).decode(), key))
    return made


def renewals(ctx: Any, secret: str, count: int) -> list[tuple[str, str]]:
    """(proof, CSR) for ``count`` renewals: an SVID issued with the join token for each, a CSR
    of a new key, and a proof of the SVID's key bound to it."""
    made = []
    for pem, key in keyed_csrs(count):
        svid = issue_svid(ctx, join_grant(ctx, secret), pem.encode())
        new_pem, _ = keyed_csrs(1)[0]
        der = x509.load_pem_x509_csr(new_pem.encode()).public_bytes(serialization.Encoding.DER)
        proof = make_proof(svid.certificate, key, hashlib.sha256(der).digest(), ctx.clock.now())
        made.append((proof, new_pem))
    return made


def main(mode: str, batches: int, most: int = MAX_BATCHES) -> None:
    """``most``: the batches set up for (tests make fewer)."""
    with tempfile.TemporaryDirectory(prefix="trellis-bench-instructions-") as workdir:
        var = Path(workdir) / "var"
        ctx = build_context(
            Settings(
                data_dir=var,
                database_url=f"sqlite:///{var / 'trellis.db'}",
                key_passphrase="bench-passphrase-not-secret",  # type: ignore[arg-type]
            ),
            clock=FixedClock(dt.datetime.now(dt.UTC)) if mode == "renew" else None,
        )
        try:
            init_authority(ctx, AuthorityParams(TrustDomain.parse("example.org")))
            entry = create_entry(ctx, EntryParams(spiffe_id=SpiffeId.parse(SPIFFE_ID)))
            needed = (WARM_BATCHES + most) * AT_ONCE
            secrets = [
                create_join_token(ctx, entry.id, uses=USES)[1] for _ in range(needed // USES + 1)
            ]
            pems = csrs(AT_ONCE)
            renewing = renewals(ctx, secrets[0], needed) if mode == "renew" else []
            answers = asyncio.run(_run(ctx, mode, batches, pems, secrets, renewing))
        finally:
            ctx.close()
    if answers != [200] * len(answers):
        raise SystemExit(f"not every issuance succeeded: {sorted(set(answers))}")


async def _run(
    ctx: Any,
    mode: str,
    batches: int,
    pems: list[str],
    secrets: list[str],
    renewing: list[tuple[str, str]],
) -> list[int]:
    answers: list[int] = []
    app = create_app(ctx)

    async def through_ca(i: int) -> None:
        grant = await join_grant_async(ctx, secrets[i // USES])
        await issue_svid_async(ctx, grant, pems[i % len(pems)].encode())
        answers.append(200)

    async def through_asgi(i: int) -> None:
        if mode == "renew":
            credential, csr = renewing[i]
            path = "/v1/svid/renew"
        else:
            credential, csr = secrets[i // USES], pems[i % len(pems)]
            path = "/v1/svid"
        body = json.dumps({"csr": csr}).encode()
        headers = [
            (b"host", b"127.0.0.1:8443"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"authorization", b"Bearer " + credential.encode()),
        ]
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "https", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8443),
        }  # fmt: skip
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never disconnects
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answers.append(message["status"])

        await app(scope, receive, send)

    one = through_ca if mode == "ca" else through_asgi
    async with app.router.lifespan_context(app):
        done = 0
        for batch in range(WARM_BATCHES + batches):
            if batch == WARM_BATCHES:  # the templates, statements and caches are made
                freeze_startup_heap()
            await asyncio.gather(*(one(done + k) for k in range(AT_ONCE)))
            done += AT_ONCE
    return answers


if __name__ == "__main__":
    if sys.argv[1] not in ("ca", "asgi", "renew") or not 0 <= int(sys.argv[2]) <= MAX_BATCHES:
        raise SystemExit(f"usage: instructions_load.py ca|asgi|renew 0..{MAX_BATCHES}")
    main(sys.argv[1], int(sys.argv[2]))
