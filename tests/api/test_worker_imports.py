"""What an API worker loads: every worker pays for each module in memory (the benchmark's goal is
all workers together under 300 MB), so what only the CLI, migrations or a federation fetch need
is imported where it is used."""

from __future__ import annotations

import json
import subprocess
import sys

# alembic: only the parent migrates. httpx: with click installed it imports its own command line,
# and rich and pygments with it.
NOT_IN_A_WORKER = ("alembic", "httpx", "click", "rich", "pygments", "typer", "hvac")


def test_a_worker_imports_no_cli_migration_or_http_client_modules() -> None:
    probe = (
        "import json, sys; import api.asgi; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert set(json.loads(loaded.stdout)) & set(NOT_IN_A_WORKER) == set()
