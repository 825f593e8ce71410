"""One load generator for every system: pre-built requests, an async HTTP/1.1 keep-alive client.

``Target`` says how to turn CSR number ``i`` into a request (URL, headers, pre-encoded body) for
one system; ``run_cell`` keeps ``concurrency`` requests in flight on as many keep-alive
connections for a warm-up and then a measured window, and reports what completed inside the
window. Latency is taken around ``await client.post(...)``, so it includes time a response
waited for this process's event loop (the client's own CPU use is reported beside it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["CellResult", "Csr", "Target", "check_response", "make_csrs", "percentile", "run_cell"]

CLIENT_POOL = 8


@dataclass(frozen=True, slots=True)
class Csr:
    pem: str
    spiffe_id: str


def make_csrs(count: int, identities: list[str]) -> list[Csr]:
    """``count`` distinct P-256 CSRs, empty subject, one URI SAN each, identities round-robin."""
    csrs = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        spiffe_id = identities[i % len(identities)]
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        csrs.append(Csr(csr.public_bytes(serialization.Encoding.PEM).decode(), spiffe_id))
    return csrs


@dataclass
class Target:
    """How one system is asked to sign CSR ``i``."""

    name: str
    url: str  # the signing endpoint
    verify: ssl.SSLContext
    build: Callable[[int], tuple[dict[str, str], bytes]]  # i -> (headers, body)
    certificate_of: Callable[[Any], str]  # response JSON -> leaf PEM


@dataclass
class CellResult:
    concurrency: int
    seconds: float  # measured window
    ok: int
    errors: int
    latencies_ms: list[float] = field(repr=False)
    client_cpu_s: float = 0.0
    error_samples: list[str] = field(default_factory=list)
    checked: int = 0  # responses whose certificate was parsed and checked
    sample_serial: str | None = None
    percentiles_ms: dict[str, float] | None = None  # when the generator keeps a histogram (wrk)

    def latency(self, name: str) -> float:
        """p50/p90/p99/max in ms."""
        if self.percentiles_ms is not None:
            return self.percentiles_ms[name]
        if name == "max":
            return max(self.latencies_ms) if self.latencies_ms else float("nan")
        return percentile(self.latencies_ms, float(name[1:]))

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def check_response(target: Target, payload: Any, spiffe_id: str) -> str:
    """Parse the returned leaf; its one URI SAN must be the requested SPIFFE ID. The serial."""
    leaf = x509.load_pem_x509_certificate(target.certificate_of(payload).encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [spiffe_id]:
        raise AssertionError(f"{target.name}: URI SANs {uris}, wanted {spiffe_id}")
    return format(leaf.serial_number, "x")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _cell(
    target: Target,
    concurrency: int,
    warmup: float,
    seconds: float,
    spiffe_id_of: Callable[[int], str],
    on_window: Callable[[str], None],
) -> CellResult:
    timeout = httpx.Timeout(60.0)
    latencies: list[float] = []
    errors: list[str] = []
    counter = 0
    ok = 0
    bad = 0
    checked = 0
    sample_serial: str | None = None
    loop_start = time.perf_counter()
    window_start = loop_start + warmup
    window_end = window_start + seconds

    # httpcore's pool does bookkeeping over all its connections on every request, which costs
    # the client several ms of CPU per request at 64 connections: so one client per group of at
    # most CLIENT_POOL connections, each coroutine bound to one client (still c connections).
    sizes = [min(CLIENT_POOL, concurrency - k) for k in range(0, concurrency, CLIENT_POOL)]
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    http1=True,
                    http2=False,
                    verify=target.verify,
                    limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                    timeout=timeout,
                )
            )
            for n in sizes
        ]

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal counter, ok, bad, checked, sample_serial
            while time.perf_counter() < window_end:
                i = counter
                counter += 1
                headers, body = target.build(i)
                sent = time.perf_counter()
                try:
                    response = await client.post(target.url, content=body, headers=headers)
                    status, text = response.status_code, response.content
                except httpx.HTTPError as exc:
                    status, text = 0, repr(exc).encode()
                done = time.perf_counter()
                if status == 200 and checked < 3:  # a few full checks per cell, off the clock
                    serial = check_response(target, json.loads(text), spiffe_id_of(i))
                    sample_serial = sample_serial or serial
                    checked += 1
                # Throughput counts completions inside the window (steady state at both edges).
                if window_start <= done <= window_end:
                    if status == 200:
                        ok += 1
                        latencies.append((done - sent) * 1000)
                    else:
                        bad += 1
                        if len(errors) < 5:
                            errors.append(f"HTTP {status}: {text[:300]!r}")
                elif status != 200 and len(errors) < 5:
                    errors.append(f"(outside window) HTTP {status}: {text[:300]!r}")

        tasks = [
            asyncio.create_task(worker(client))
            for client, n in zip(clients, sizes, strict=True)
            for _ in range(n)
        ]
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        on_window("start")
        cpu_start = _cpu()
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        on_window("end")
        cpu_end = _cpu()
        await asyncio.gather(*tasks)
    return CellResult(
        concurrency=concurrency,
        seconds=seconds,
        ok=ok,
        errors=bad,
        latencies_ms=latencies,
        client_cpu_s=cpu_end - cpu_start,
        error_samples=errors,
        checked=checked,
        sample_serial=sample_serial,
    )


def run_cell(
    target: Target,
    concurrency: int,
    warmup: float,
    seconds: float,
    spiffe_id_of: Callable[[int], str],
    on_window: Callable[[str], None],
) -> CellResult:
    """One cell on a fresh event loop (uvloop when installed: less client CPU per request)."""
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    result: CellResult = runner(
        _cell(target, concurrency, warmup, seconds, spiffe_id_of, on_window)
    )
    return result
