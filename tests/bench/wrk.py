"""The load generator in C: wrk (Debian's ``wrk``) with a Lua script replaying pre-built requests.

The Python client costs about 1 ms of CPU per request, on the same two cores as the servers: at
700 certificates per second it took most of a core, capping whichever system was faster. wrk
costs a few percent of that. Same requests as the Python generator (``Target.build(i)`` for
``i`` in 0..511, replayed in order), same transport (HTTPS, HTTP/1.1 keep-alive, ``c``
connections on one wrk thread, ``c`` requests in flight), a warm-up run then a measured run.
Latency percentiles are wrk's (microsecond histogram); non-2xx answers and socket errors are
errors. wrk does not verify the server certificate; the three responses checked per cell are
fetched afterwards with the Python client, which does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests.bench.loadgen import CellResult, Target, check_response

__all__ = ["available", "run_cell_wrk"]

SCRIPT = r"""
local requests = {}
local n = 0

init = function(args)
  for line in io.lines(args[1]) do
    local path, headers_json, body = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
    local headers = {}
    for name, value in headers_json:gmatch('"([^"]+)":"([^"]*)"') do headers[name] = value end
    requests[#requests + 1] = wrk.format("POST", path, headers, body)
  end
end

request = function()
  n = n + 1
  return requests[(n - 1) % #requests + 1]
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def available() -> str | None:
    return shutil.which("wrk")


def _run(
    binary: str, script: Path, lines: Path, base: str, concurrency: int, seconds: float
) -> tuple[dict[str, float], float]:
    """One wrk run; (its summary, its CPU seconds)."""
    command = [
        binary, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "60s",
        "--latency", "-s", str(script), base, "--", str(lines),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.stdout is not None and process.stderr is not None
    out, err = process.stdout.read(), process.stderr.read()
    process.stdout.close()
    process.stderr.close()
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed ({process.returncode}): {err.strip()}")
    summary = json.loads(out.strip().splitlines()[-1])
    return summary, usage.ru_utime + usage.ru_stime


def run_cell_wrk(
    target: Target,
    requests: list[tuple[dict[str, str], bytes]],
    concurrency: int,
    warmup: float,
    seconds: float,
    spiffe_id_of: Callable[[int], str],
    on_window: Callable[[str], None],
) -> CellResult:
    binary = available()
    assert binary is not None
    parts = urlsplit(target.url)
    base = f"{parts.scheme}://{parts.netloc}"
    with tempfile.TemporaryDirectory(prefix="trellis-bench-wrk-") as directory:
        script, lines = Path(directory) / "replay.lua", Path(directory) / "requests.tsv"
        script.write_text(SCRIPT)
        with lines.open("w") as out:
            for headers, body in requests:
                text = body.decode()
                assert "\t" not in text and "\n" not in text, "bodies must be one-line JSON"
                flat = json.dumps(headers, separators=(",", ":"))
                out.write(f"{parts.path}\t{flat}\t{text}\n")
        if warmup > 0:
            _run(binary, script, lines, base, concurrency, warmup)
        on_window("start")
        summary, client_cpu = _run(binary, script, lines, base, concurrency, seconds)
        on_window("end")
    window = summary["duration_us"] / 1e6
    errors = int(summary["status_errors"] + summary["socket_errors"])
    checked, sample_serial, samples = 0, None, []
    with httpx.Client(verify=target.verify, timeout=60) as client:
        for i in range(3):
            headers, body = requests[i]  # the cell's credentials (build(i) may need a new one)
            response = client.post(target.url, content=body, headers=headers)
            if response.status_code != 200:
                samples.append(f"HTTP {response.status_code}: {response.text[:300]!r}")
                continue
            serial = check_response(target, response.json(), spiffe_id_of(i))
            sample_serial = sample_serial or serial
            checked += 1
    if errors:
        samples.insert(0, f"wrk counted {errors} non-2xx answers or socket errors")
    return CellResult(
        concurrency=concurrency,
        seconds=window,
        ok=int(summary["requests"]) - errors,
        errors=errors,
        latencies_ms=[],
        percentiles_ms={
            "p50": summary["p50_us"] / 1000,
            "p90": summary["p90_us"] / 1000,
            "p99": summary["p99_us"] / 1000,
            "max": summary["max_us"] / 1000,
        },
        client_cpu_s=client_cpu,
        error_samples=samples,
        checked=checked,
        sample_serial=sample_serial,
    )
