"""Revocation benchmark: CRL build-and-sign cost and OCSP throughput with many revoked certificates.

A script, not a pytest test (pytest only collects ``test_*.py``)::

    .venv/bin/python -m tests.bench.revocation [--sizes 1000,10000,100000]
        [--database sqlite|postgres|both] [--ocsp-seconds 5] [--json OUT] [--no-http] [--profile]

For each database it initialises an ``example.org`` authority in a temporary data dir, then for
each size N bulk-inserts revoked ``CertificateRow`` rows for the active intermediate straight
through SQLAlchemy (issuing N real certificates would take far longer than the thing measured;
CRL building only reads serial, revoked_at, reason and invalidity date, so ``cert_pem`` is a
placeholder). At each size it times ``ca.crl.refresh_crl`` (median of 3), checks once that the
CRL parses, is signed by the intermediate and lists exactly N entries, and times one end-to-end
``ca.certs.revoke_certificate`` (which re-signs the CRL in its transaction). At the largest size
it measures OCSP responses per second through ``ca.ocsp.respond`` with real DER requests, and
over HTTP (``POST /v1/ocsp`` on a uvicorn server in a child process) unless ``--no-http``.

Progress goes to stderr; the table to stdout; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import hashlib
import io
import json
import os
import platform
import pstats
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cryptography
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from sqlmodel import Session

from ca.authority import AuthorityParams, init_authority
from ca.certs import revoke_certificate
from ca.config import Context, Settings, build_context
from ca.crl import refresh_crl
from ca.identity import TrustDomain
from ca.ocsp import respond
from ca.revocation import RevocationReason
from ca.serial import Serial
from ca.store.db import SchemaPolicy
from ca.store.models import CaRow, CertificateRow
from tests.pgserver import embedded_postgres_server, make_postgres_database
from tests.processes import terminate

REPO = Path(__file__).resolve().parents[2]
TRUST_DOMAIN = "example.org"
PASSPHRASE = "bench-passphrase-not-secret"
CRL_RUNS = 3
REVOKE_RUNS = 3
BATCH = 10_000
GOOD_ROWS = 2_000  # active certificates: OCSP "good" answers
OCSP_POOL = 300  # pre-built requests per status (good / revoked / unknown)
OCSP_WARMUP = 90
PLACEHOLDER_PEM = (
    "-----BEGIN CERTIFICATE-----\nYmVuY2ggcGxhY2Vob2xkZXI=\n-----END CERTIFICATE-----\n"
)
# Rough mix of reasons a mesh operator records; "unspecified" carries no CRL entry extension.
REASONS: list[tuple[RevocationReason, int]] = [
    (RevocationReason.UNSPECIFIED, 40),
    (RevocationReason.SUPERSEDED, 20),
    (RevocationReason.KEY_COMPROMISE, 15),
    (RevocationReason.CESSATION_OF_OPERATION, 15),
    (RevocationReason.AFFILIATION_CHANGED, 5),
    (RevocationReason.PRIVILEGE_WITHDRAWN, 5),
]

_START = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


# --- machine ------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) // 1024} MiB"
                break
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    return {
        "nproc": nproc,
        "cpu_model": model,
        "memory": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "sqlalchemy": sa.__version__,
        "sqlite": sqlite3.sqlite_version,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# --- databases ----------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    with embedded_postgres_server("trellis-bench-pg-") as (uri, _data):
        yield uri


def server_version(ctx: Context) -> str:
    with ctx.engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            return str(connection.execute(sa.text("SHOW server_version")).scalar())
        return "SQLite " + str(connection.execute(sa.text("SELECT sqlite_version()")).scalar())


# --- rows ---------------------------------------------------------------------------------------


@dataclass
class Population:
    """What is in the certificate table, so each size only tops it up."""

    revoked: list[int] = field(default_factory=list)  # serials (ints) of revoked rows
    good: list[int] = field(default_factory=list)  # active rows for OCSP "good"
    spare: list[int] = field(default_factory=list)  # active rows for end-to-end revocations
    known: set[int] = field(default_factory=set)


def _new_serial(rng: random.Random, known: set[int]) -> int:
    while True:  # random, as serials were before change 34; CRL size does not depend on it
        value = rng.getrandbits(159)
        if value >= 2**64 and value not in known:
            known.add(value)
            return value


def make_rows(
    rng: random.Random,
    population: Population,
    count: int,
    *,
    issuer: CaRow,
    now: dt.datetime,
    revoked: bool,
) -> list[dict[str, Any]]:
    assert issuer.id is not None
    latest = min(issuer.not_after, now + dt.timedelta(days=30))
    span = max(int((latest - now).total_seconds()) - 3600, 60)
    reasons = [r for r, _ in REASONS]
    weights = [w for _, w in REASONS]
    rows: list[dict[str, Any]] = []
    for _ in range(count):
        serial = _new_serial(rng, population.known)
        hex_serial = format(serial, "x")
        not_before = now - dt.timedelta(seconds=rng.randint(3600, 5 * 86400))
        not_after = now + dt.timedelta(seconds=3600 + rng.randint(0, span))
        row: dict[str, Any] = {
            "serial": hex_serial,
            "authority": issuer.authority,
            "issuer_ca_id": issuer.id,
            "profile": "x509-svid",
            "spiffe_id": f"spiffe://{TRUST_DOMAIN}/bench/workload-{serial % 50_000}",
            "entry_id": None,
            "fingerprint_sha256": hashlib.sha256(hex_serial.encode()).hexdigest(),
            "not_before": not_before,
            "not_after": not_after,
            "status": "active",
            "requested_by": "bench",
            "revoked_at": None,
            "revocation_reason": None,
            "revoked_by": None,
            "revocation_request_id": None,
            "invalidity_date": None,
            "cert_pem": PLACEHOLDER_PEM,
            "created_at": not_before,
        }
        if revoked:
            revoked_at = not_before + dt.timedelta(
                seconds=rng.randint(0, int((now - not_before).total_seconds()))
            )
            reason = rng.choices(reasons, weights)[0]
            row.update(
                status="revoked",
                revoked_at=revoked_at,
                revocation_reason=reason.value,
                revoked_by="bench",
                revocation_request_id=uuid.UUID(int=rng.getrandbits(128)).hex,
            )
            if reason is RevocationReason.KEY_COMPROMISE:
                row["invalidity_date"] = revoked_at - dt.timedelta(minutes=rng.randint(1, 600))
            population.revoked.append(serial)
        rows.append(row)
    return rows


def bulk_insert(ctx: Context, rows: list[dict[str, Any]]) -> None:
    with Session(ctx.engine) as session:
        for start in range(0, len(rows), BATCH):
            session.execute(sa.insert(CertificateRow), rows[start : start + BATCH])
        session.commit()


def count_revoked(ctx: Context, ca_id: int) -> int:
    with Session(ctx.engine) as session:
        return int(
            session.execute(
                sa.select(sa.func.count())
                .select_from(CertificateRow)
                .where(CertificateRow.issuer_ca_id == ca_id, CertificateRow.status == "revoked")
            ).scalar_one()
        )


# --- CRL ----------------------------------------------------------------------------------------


def timed_refresh(ctx: Context, ca_id: int) -> tuple[float, float, bytes, int]:
    """(refresh_crl seconds, commit seconds, DER, CRL number)."""
    with Session(ctx.engine) as session:
        ca = session.get(CaRow, ca_id)
        assert ca is not None
        started = time.perf_counter()
        row = refresh_crl(ctx, session, ca)
        built = time.perf_counter()
        der, number = row.der, row.number
        session.commit()
        committed = time.perf_counter()
    return built - started, committed - built, der, number


def verify_crl(der: bytes, issuer: x509.Certificate, expected: int, sample: list[int]) -> int:
    crl = x509.load_der_x509_crl(der)
    public_key = issuer.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    if not crl.is_signature_valid(public_key):
        raise AssertionError("CRL signature does not verify with the intermediate's key")
    if crl.issuer != issuer.subject:
        raise AssertionError("CRL issuer is not the intermediate")
    entries = len(crl)
    if entries != expected:
        raise AssertionError(f"CRL lists {entries} entries, expected {expected}")
    for serial in sample:
        if crl.get_revoked_certificate_by_serial_number(serial) is None:
            raise AssertionError(f"revoked serial {serial:x} missing from the CRL")
    return entries


def profile_refresh(ctx: Context, ca_id: int, top: int = 12) -> str:
    profiler = cProfile.Profile()
    with Session(ctx.engine) as session:
        ca = session.get(CaRow, ca_id)
        assert ca is not None
        profiler.enable()
        refresh_crl(ctx, session, ca)
        profiler.disable()
        session.commit()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


@dataclass
class CrlResult:
    database: str
    size: int
    insert_seconds: float
    build_ms_runs: list[float]
    build_ms_median: float
    commit_ms_median: float
    der_bytes: int
    entries: int
    bytes_per_entry: float
    revoke_ms_runs: list[float]
    revoke_ms_median: float | None


# --- OCSP ---------------------------------------------------------------------------------------


def _public_key_bits(cert: x509.Certificate) -> bytes:
    """subjectPublicKey contents (what issuerKeyHash covers), computed without ca.ocsp."""
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    if isinstance(key, rsa.RSAPublicKey):
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    raise TypeError(f"unsupported issuer key {type(key).__name__}")


@dataclass(frozen=True)
class OcspRequest:
    der: bytes
    serial: int
    expected: ocsp.OCSPCertStatus
    nonce: bytes


def build_requests(
    rng: random.Random, issuer: x509.Certificate, population: Population
) -> list[OcspRequest]:
    name_hash = hashlib.sha1(issuer.subject.public_bytes(), usedforsecurity=False).digest()
    key_hash = hashlib.sha1(_public_key_bits(issuer), usedforsecurity=False).digest()
    picks: list[tuple[int, ocsp.OCSPCertStatus]] = []
    picks += [(s, ocsp.OCSPCertStatus.GOOD) for s in rng.sample(population.good, OCSP_POOL)]
    picks += [(s, ocsp.OCSPCertStatus.REVOKED) for s in rng.sample(population.revoked, OCSP_POOL)]
    unknown: set[int] = set()
    while len(unknown) < OCSP_POOL:  # never issued: the responder must say "unknown"
        value = rng.getrandbits(159)
        if value >= 2**64 and value not in population.known:
            unknown.add(value)
    picks += [(s, ocsp.OCSPCertStatus.UNKNOWN) for s in sorted(unknown)]
    rng.shuffle(picks)
    requests = []
    for serial, expected in picks:
        nonce = rng.randbytes(16)
        request = (
            ocsp.OCSPRequestBuilder()
            .add_certificate_by_hash(name_hash, key_hash, serial, hashes.SHA1())
            .add_extension(x509.OCSPNonce(nonce), critical=False)
            .build()
        )
        der = request.public_bytes(serialization.Encoding.DER)
        requests.append(OcspRequest(der, serial, expected, nonce))
    return requests


def check_response(der: bytes, request: OcspRequest) -> None:
    response = ocsp.load_der_ocsp_response(der)
    if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise AssertionError(f"OCSP response status {response.response_status}")
    if response.serial_number != request.serial:
        raise AssertionError("OCSP response is for another serial")
    if response.certificate_status is not request.expected:
        raise AssertionError(
            f"serial {request.serial:x}: {response.certificate_status}, expected {request.expected}"
        )
    nonce = response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    if nonce != request.nonce:
        raise AssertionError("OCSP nonce not echoed")


@dataclass
class OcspResult:
    database: str
    size: int
    mode: str
    seconds: float
    responses: int
    per_second: float
    p50_ms: float
    p99_ms: float
    by_status: dict[str, int]


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run_ocsp(
    call: Any, requests: list[OcspRequest], seconds: float, database: str, size: int, mode: str
) -> OcspResult:
    for request in requests[:OCSP_WARMUP]:  # warm-up; also checks every answer once
        check_response(call(request.der), request)
    latencies: list[float] = []
    by_status = {"good": 0, "revoked": 0, "unknown": 0}
    names = {
        ocsp.OCSPCertStatus.GOOD: "good",
        ocsp.OCSPCertStatus.REVOKED: "revoked",
        ocsp.OCSPCertStatus.UNKNOWN: "unknown",
    }
    pool = len(requests)
    index = 0
    started = time.perf_counter()
    deadline = started + seconds
    now = started
    while now < deadline:
        request = requests[index % pool]
        call(request.der)
        after = time.perf_counter()
        latencies.append(after - now)
        by_status[names[request.expected]] += 1
        index += 1
        now = after
    elapsed = now - started
    return OcspResult(
        database=database,
        size=size,
        mode=mode,
        seconds=round(elapsed, 3),
        responses=index,
        per_second=round(index / elapsed, 1),
        p50_ms=round(_percentile(latencies, 0.50) * 1000, 3),
        p99_ms=round(_percentile(latencies, 0.99) * 1000, 3),
        by_status=by_status,
    )


def serve_ocsp() -> None:
    """Child process entry point: the real API app on plain HTTP (settings from TRELLIS_*)."""
    import uvicorn

    from api.app import create_app

    settings = Settings()
    ctx = build_context(settings, schema=SchemaPolicy.TRUSTED)
    uvicorn.run(
        create_app(ctx),
        host="127.0.0.1",
        port=settings.port,
        log_level="warning",
        access_log=False,
        server_header=False,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def http_server(settings: Settings) -> Iterator[str]:
    import httpx

    port = _free_port()
    env = {
        **os.environ,
        "TRELLIS_DATA_DIR": str(settings.data_dir),
        "TRELLIS_DATABASE_URL": settings.effective_database_url,
        "TRELLIS_KEY_PASSPHRASE": PASSPHRASE,
        "TRELLIS_PORT": str(port),
    }
    with tempfile.TemporaryFile() as log:
        child = subprocess.Popen(
            [sys.executable, "-c", "from tests.bench.revocation import serve_ocsp; serve_ocsp()"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if child.poll() is not None:
                    log.seek(0)
                    output = log.read().decode(errors="replace")
                    raise RuntimeError(f"OCSP server exited:\n{output}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("OCSP server did not start within 60 s")
                time.sleep(0.2)
            yield base
        finally:
            terminate(child)


# --- one database -------------------------------------------------------------------------------


def bench_database(
    database: str, url: str | None, workdir: Path, args: argparse.Namespace
) -> tuple[list[CrlResult], list[OcspResult], dict[str, Any]]:
    rng = random.Random(args.seed)
    data_dir = workdir / f"{database}-var"
    settings = Settings(
        data_dir=data_dir,
        database_url=url or f"sqlite:///{data_dir / 'trellis.db'}",
        key_passphrase=PASSPHRASE,  # type: ignore[arg-type]
    )
    ctx = build_context(settings)
    info: dict[str, Any] = {"server": server_version(ctx)}
    crl_results: list[CrlResult] = []
    ocsp_results: list[OcspResult] = []
    try:
        issuer = init_authority(ctx, AuthorityParams(TrustDomain.parse(TRUST_DOMAIN)))
        with Session(ctx.engine) as session:
            ca = session.get(CaRow, issuer.ca_id)
            assert ca is not None
            session.expunge(ca)
        now = ctx.clock.now()
        population = Population()
        active = make_rows(rng, population, GOOD_ROWS, issuer=ca, now=now, revoked=False)
        population.good = [int(r["serial"], 16) for r in active[REVOKE_RUNS * len(args.sizes) :]]
        population.spare = [int(r["serial"], 16) for r in active[: REVOKE_RUNS * len(args.sizes)]]
        bulk_insert(ctx, active)
        timed_refresh(ctx, issuer.ca_id)  # warm-up: unlocks and caches the CA key
        progress(f"{database}: authority ready ({info['server']})")
        for size in args.sizes:
            missing = size - count_revoked(ctx, issuer.ca_id)
            started = time.perf_counter()
            if missing > 0:
                progress(f"{database}: inserting {missing:,} revoked rows (to {size:,})")
                bulk_insert(
                    ctx,
                    make_rows(
                        rng, population, missing, issuer=ca, now=ctx.clock.now(), revoked=True
                    ),
                )
            insert_seconds = time.perf_counter() - started
            expected = count_revoked(ctx, issuer.ca_id)
            builds: list[float] = []
            commits: list[float] = []
            der = b""
            for run in range(CRL_RUNS):
                progress(f"{database}: N={size:,} refresh_crl run {run + 1}/{CRL_RUNS}")
                built, committed, der, _ = timed_refresh(ctx, issuer.ca_id)
                builds.append(built * 1000)
                commits.append(committed * 1000)
            sample = rng.sample(population.revoked, min(50, len(population.revoked)))
            entries = verify_crl(der, issuer.certificate, expected, sample)
            revokes: list[float] = []
            for run in range(REVOKE_RUNS if population.spare else 0):
                progress(f"{database}: N={size:,} revoke_certificate run {run + 1}/{REVOKE_RUNS}")
                serial = population.spare.pop()
                started = time.perf_counter()
                revoke_certificate(ctx, Serial(serial), RevocationReason.SUPERSEDED, "bench")
                revokes.append((time.perf_counter() - started) * 1000)
                population.revoked.append(serial)
            crl_results.append(
                CrlResult(
                    database=database,
                    size=expected,
                    insert_seconds=round(insert_seconds, 2),
                    build_ms_runs=[round(b, 1) for b in builds],
                    build_ms_median=round(statistics.median(builds), 1),
                    commit_ms_median=round(statistics.median(commits), 1),
                    der_bytes=len(der),
                    entries=entries,
                    bytes_per_entry=round(len(der) / max(entries, 1), 1),
                    revoke_ms_runs=[round(r, 1) for r in revokes],
                    revoke_ms_median=round(statistics.median(revokes), 1) if revokes else None,
                )
            )
            progress(
                f"{database}: N={size:,} CRL {statistics.median(builds):.1f} ms, "
                f"{len(der):,} bytes, {entries:,} entries"
            )
        top = count_revoked(ctx, issuer.ca_id)
        if args.profile:
            progress(f"{database}: profiling one refresh_crl at N={top:,}")
            info["profile"] = profile_refresh(ctx, issuer.ca_id)
            print(info["profile"], file=sys.stderr)
        if args.ocsp_seconds > 0:
            requests = build_requests(rng, issuer.certificate, population)
            progress(f"{database}: OCSP respond() for {args.ocsp_seconds:g} s at N={top:,}")
            ocsp_results.append(
                run_ocsp(
                    lambda der: respond(ctx, der),
                    requests,
                    args.ocsp_seconds,
                    database,
                    top,
                    "respond()",
                )
            )
            if args.http:
                progress(f"{database}: OCSP over HTTP for {args.ocsp_seconds:g} s at N={top:,}")
                import httpx

                with http_server(settings) as base, httpx.Client(base_url=base) as client:

                    def post(der: bytes) -> bytes:
                        reply = client.post(
                            "/v1/ocsp",
                            content=der,
                            headers={"content-type": "application/ocsp-request"},
                        )
                        reply.raise_for_status()
                        return reply.content

                    ocsp_results.append(
                        run_ocsp(post, requests, args.ocsp_seconds, database, top, "HTTP POST")
                    )
    finally:
        ctx.close()
    return crl_results, ocsp_results, info


# --- output -------------------------------------------------------------------------------------


def render(
    machine: dict[str, Any],
    servers: dict[str, str],
    crl: list[CrlResult],
    ocsp_results: list[OcspResult],
) -> str:
    lines = [
        f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory']}, "
        f"{machine['platform']}",
        f"Python {machine['python']}, cryptography {machine['cryptography']}, "
        f"SQLAlchemy {machine['sqlalchemy']}; "
        + ", ".join(f"{db}: {version}" for db, version in servers.items()),
        f"Load average at start: {machine['loadavg_at_start']}",
        "",
        f"CRL (refresh_crl: query + entries + sign + flush; median of {CRL_RUNS})",
        f"{'database':<9} {'revoked':>9} {'build ms':>10} {'commit ms':>10} {'DER bytes':>12} "
        f"{'B/entry':>8} {'entries':>9} {'revoke_certificate ms':>22}",
    ]
    for r in crl:
        revoke = "-" if r.revoke_ms_median is None else f"{r.revoke_ms_median:,.1f}"
        head = f"{r.database:<9} {r.size:>9,} {r.build_ms_median:>10,.1f}"
        size = f"{r.der_bytes:>12,} {r.bytes_per_entry:>8.1f} {r.entries:>9,}"
        lines.append(f"{head} {r.commit_ms_median:>10,.1f} {size} {revoke:>22}")
    if ocsp_results:
        lines += [
            "",
            "OCSP (single client, sequential; 1/3 good, 1/3 revoked, 1/3 unknown, with nonce)",
            f"{'database':<9} {'revoked':>9} {'mode':<10} {'responses/s':>12} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'responses':>10}",
        ]
        for o in ocsp_results:
            lines.append(
                f"{o.database:<9} {o.size:>9,} {o.mode:<10} {o.per_second:>12,.1f} "
                f"{o.p50_ms:>8.2f} {o.p99_ms:>8.2f} {o.responses:>10,}"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.revocation", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sizes", default="1000,10000,100000", help="revoked counts, ascending")
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--ocsp-seconds", type=float, default=5.0, help="0 skips OCSP")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--no-http", dest="http", action="store_false", help="skip OCSP over HTTP")
    parser.add_argument("--profile", action="store_true", help="cProfile one refresh_crl")
    parser.add_argument("--seed", type=int, default=20260101)
    args = parser.parse_args(argv)
    try:
        args.sizes = sorted({int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error("--sizes takes comma-separated integers")
    if not args.sizes or args.sizes[0] < 1:
        parser.error("--sizes must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    progress(
        f"machine: {machine['nproc']} CPUs, {machine['cpu_model']}, Python {machine['python']}, "
        f"cryptography {machine['cryptography']}"
    )
    databases = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    crl: list[CrlResult] = []
    ocsp_results: list[OcspResult] = []
    infos: dict[str, dict[str, Any]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="trellis-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            for database in databases:
                url = None
                if database == "postgres":
                    progress("starting embedded PostgreSQL")
                    server = stack.enter_context(postgres_server())
                    url = make_postgres_database(server)
                results, ocsps, info = bench_database(database, url, workdir, args)
                crl += results
                ocsp_results += ocsps
                infos[database] = info
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    servers = {db: info["server"] for db, info in infos.items()}
    print(render(machine, servers, crl, ocsp_results))
    if args.json:
        document = {
            "machine": machine,
            "databases": infos,
            "settings": {
                "sizes": args.sizes,
                "ocsp_seconds": args.ocsp_seconds,
                "crl_runs": CRL_RUNS,
                "revoke_runs": REVOKE_RUNS,
                "seed": args.seed,
                "total_seconds": round(time.perf_counter() - _START, 1),
            },
            "crl": [asdict(r) for r in crl],
            "ocsp": [asdict(o) for o in ocsp_results],
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        progress(f"wrote {args.json}")
    progress("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
