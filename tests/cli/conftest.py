"""Fixtures for end-to-end CLI tests: an initialised CA and a real ``trellis serve``."""

from __future__ import annotations

import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cli.test_walkthrough import TRELLIS, Trellis
from tests.conftest import free_port


@pytest.fixture
def trellis(tmp_path: Path, database_url: str) -> Trellis:
    cli = Trellis(tmp_path / "var", database_url)
    cli.run("init", "--trust-domain", "example.org")
    return cli


@pytest.fixture
def server(trellis: Trellis) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [TRELLIS, "serve", "--port", str(port)],
        env=trellis.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"https://127.0.0.1:{port}"
    tls = ssl.create_default_context(cafile=str(trellis.data_dir / "bundle.pem"))
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz", verify=tls, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                output = process.stdout.read() if process.stdout else ""
                raise AssertionError(f"server did not start: {output}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        if process.stdout:
            process.stdout.close()
