"""Scale benchmark: issuance and listing with a million stored certificates.

A script, not a pytest test::

    .venv/bin/python -m tests.bench.scale [--count 1000000] [--database sqlite|postgres|both]
        [--seconds 3] [--queries 200] [--json bench-results/scale.json]

For each database: initialise ``example.org`` in a temporary data dir, measure in-process
join-token issuance (``join_grant`` + ``issue_svid``, one core, as tests/bench/inprocess.py) on
the empty store, bulk-insert ``--count`` certificate rows straight through SQLAlchemy (issuing a
million real certificates would take far longer than what is measured; rows are shaped like a
year of hourly SVIDs: 20,000 identities, 95 % expired, 5 % of the rest revoked, a real-size
PEM), ``ANALYZE``, then measure issuance again and the latency of the listings operators run
(``ca.certs.list_certificates``, 100 per page): by SPIFFE ID, live certificates expiring
within the hour (soonest first), the first page of everything, a page from the middle, and the
revoked ones. Latencies are the median and p90 of ``--queries`` queries each.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ca.authority import AuthorityParams, active_issuer, init_authority
from ca.certs import CertStatus, list_certificates
from ca.config import Context, Settings, build_context
from ca.entries import EntryParams, create_entry
from ca.grants import join_grant
from ca.identity import SpiffeId, TrustDomain
from ca.issue import issue_svid
from ca.serial import Serial
from ca.store.core import table
from ca.store.models import CertificateRow
from tests.bench.inprocess import _rate, _Tokens, one_core
from tests.bench.loadgen import make_csrs
from tests.pgserver import embedded_postgres_server, make_postgres_database

REPO = Path(__file__).resolve().parents[2]
IDENTITIES = 20_000
BATCH = 10_000
PASSPHRASE = "bench-passphrase-not-secret"
SPIFFE_ID = "spiffe://example.org/bench/scale"
_START = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def populate(ctx: Context, count: int, pem: str, now: dt.datetime) -> None:
    issuer = active_issuer(ctx)
    rng = random.Random(20261126)
    certificates = table(CertificateRow)
    insert = sa.insert(certificates)
    done = 0
    while done < count:
        rows = []
        for _ in range(min(BATCH, count - done)):
            expired = rng.random() < 0.95
            not_after = (
                now - dt.timedelta(seconds=rng.randint(1, 365 * 86400))
                if expired
                else now + dt.timedelta(seconds=rng.randint(1, 3600))
            )
            # as issued then: serials start with their issuance time (ca.serial)
            serial = Serial.generate(at=(not_after - dt.timedelta(hours=1)).timestamp()).hex
            revoked = not expired and rng.random() < 0.05
            rows.append(
                {
                    "serial": serial,
                    "authority": "mesh",
                    "issuer_ca_id": issuer.ca_id,
                    "profile": "x509-svid",
                    "spiffe_id": f"spiffe://example.org/ns/n{rng.randrange(IDENTITIES)}/sa/w",
                    "entry_id": None,
                    "fingerprint_sha256": hashlib.sha256(serial.encode()).hexdigest(),
                    "not_before": not_after - dt.timedelta(hours=1),
                    "not_after": not_after,
                    "status": "revoked" if revoked else "active",
                    "requested_by": "bench",
                    "revoked_at": now if revoked else None,
                    "revocation_reason": "keyCompromise" if revoked else None,
                    "cert_pem": pem,
                    "created_at": not_after - dt.timedelta(hours=1),
                }
            )
        with ctx.engine.begin() as connection:
            connection.execute(insert, rows)
        done += len(rows)
        if done % 100_000 == 0 or done == count:
            progress(f"  {done:,} rows")
    with ctx.engine.begin() as connection:
        connection.exec_driver_sql("ANALYZE")


def latencies(query: Callable[[int], object], count: int) -> dict[str, float]:
    for i in range(5):
        query(i)
    times = []
    for i in range(count):
        started = time.perf_counter()
        query(i)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "max_ms": times[-1],
    }


def measure(ctx: Context, count: int, seconds: float, queries: int) -> dict[str, Any]:
    init_authority(ctx, AuthorityParams(TrustDomain.parse("example.org")))
    entry = create_entry(ctx, EntryParams(spiffe_id=SpiffeId.parse(SPIFFE_ID)))
    tokens = _Tokens(ctx, entry.id)
    pems = [c.pem.encode() for c in make_csrs(128, [SPIFFE_ID])]

    def issue(i: int) -> object:
        return issue_svid(ctx, join_grant(ctx, tokens.next()), pems[i % len(pems)])

    result: dict[str, Any] = {"count": count}
    with one_core():
        result["issuance_empty"] = _rate(issue, seconds)
    progress(f"  empty store: {result['issuance_empty']['certs_per_cpu_s']:,.0f} certs/CPU-s")
    pem = issue(0).certificate_pem.decode()  # type: ignore[attr-defined]
    now = ctx.clock.now()
    started = time.perf_counter()
    populate(ctx, count, pem, now)
    result["populate_s"] = time.perf_counter() - started
    with one_core():
        result["issuance_full"] = _rate(issue, seconds)
    full, empty = result["issuance_full"], result["issuance_empty"]
    result["issuance_ratio"] = full["certs_per_cpu_s"] / empty["certs_per_cpu_s"]
    progress(
        f"  {count:,} stored: {full['certs_per_cpu_s']:,.0f} certs/CPU-s "
        f"({100 * result['issuance_ratio']:.0f} % of empty)"
    )

    rng = random.Random(7)
    ids = [
        SpiffeId.parse(f"spiffe://example.org/ns/n{rng.randrange(IDENTITIES)}/sa/w")
        for _ in range(queries + 5)
    ]
    with ctx.engine.connect() as connection:
        middle = [
            Serial.parse(s)
            for s in connection.execute(
                sa.text("SELECT serial FROM certificate ORDER BY random() LIMIT :n"),
                {"n": queries + 5},
            ).scalars()
        ]
    cases: dict[str, Callable[[int], object]] = {
        "by SPIFFE ID": lambda i: list_certificates(ctx, spiffe_id=ids[i]),
        "live, expiring within 1h, soonest first": lambda i: list_certificates(
            ctx, status=CertStatus.ACTIVE, expiring_within=dt.timedelta(hours=1)
        ),
        "everything, first page": lambda i: list_certificates(ctx),
        "everything, a page after a random serial": lambda i: list_certificates(
            ctx, after=middle[i]
        ),
        "revoked": lambda i: list_certificates(ctx, status=CertStatus.REVOKED),
    }
    result["listing"] = {}
    for name, query in cases.items():
        result["listing"][name] = latencies(query, queries)
        progress(f"  {name}: p50 {result['listing'][name]['p50_ms']:.2f} ms")
    return result


@contextlib.contextmanager
def context_for(database: str, workdir: Path) -> Iterator[Context]:
    with contextlib.ExitStack() as stack:
        if database == "postgres":
            uri, _ = stack.enter_context(embedded_postgres_server("trellis-bench-scale-"))
            url = make_postgres_database(uri)
        else:
            url = f"sqlite:///{workdir / 'var' / 'trellis.db'}"
        settings = Settings(
            data_dir=workdir / "var",
            database_url=url,
            key_passphrase=PASSPHRASE,  # type: ignore[arg-type]
        )
        ctx = build_context(settings)
        try:
            yield ctx
        finally:
            ctx.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--json", type=Path, default=REPO / "bench-results" / "scale.json")
    args = parser.parse_args(argv)
    databases = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    results: dict[str, Any] = {
        "machine": {"nproc": len(os.sched_getaffinity(0)), "loadavg": os.getloadavg()},
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    for database in databases:
        progress(f"{database}: {args.count:,} certificates")
        with (
            tempfile.TemporaryDirectory(prefix="trellis-bench-scale-") as workdir,
            context_for(database, Path(workdir)) as ctx,
        ):
            results[database] = measure(ctx, args.count, args.seconds, args.queries)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    for database in databases:
        r = results[database]
        inserted = f"inserted in {r['populate_s']:.0f} s"
        print(f"\n{database}: {r['count']:,} stored certificates ({inserted})")
        print(
            f"  issuance: {r['issuance_empty']['certs_per_cpu_s']:,.0f} -> "
            f"{r['issuance_full']['certs_per_cpu_s']:,.0f} certs/CPU-s "
            f"({100 * r['issuance_ratio']:.0f} % of the empty store)"
        )
        for name, lat in r["listing"].items():
            print(f"  {name:45} p50 {lat['p50_ms']:7.2f} ms  p90 {lat['p90_ms']:7.2f} ms")
    progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
