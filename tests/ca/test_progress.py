"""The progress the long-running ``ca`` operations report (``ca.progress``): counts that never
go back and, where a total is given, end at it once the work is done. ``trellis`` draws its
bar from these (tests/cli/test_progress.py)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from ca import audit, backup
from ca.certs import CertStatus, revoke_identity
from ca.config import Context, Settings
from ca.grants import join_grant
from ca.identity import SpiffeId
from ca.issue import issue_svid
from ca.keys import KeyType
from ca.progress import Progress
from ca.revocation import RevocationReason
from ca.store import db
from tests.ca.svidkit import SQLITE_ONLY, add_entry, join_secret, make_csr, new_key
from tests.conftest import PASSPHRASE

Calls = list[tuple[int, int | None]]


def _recorder() -> tuple[Calls, Progress]:
    calls: Calls = []
    return calls, lambda done, total: calls.append((done, total))


def assert_grows_to_total(calls: Calls) -> int:
    """Counts never go back, more than one is told, and the last is the total. The total."""
    assert calls, "no progress reported"
    done = [d for d, _ in calls]
    assert done == sorted(done), calls
    assert len(set(done)) > 1, calls
    last, total = calls[-1]
    assert total is not None and last == total, calls
    assert all(t is None or d <= t for d, t in calls), calls
    return total


@SQLITE_ONLY
def test_backup_and_restore_count_bytes_up_to_their_totals(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, progress = _recorder()
    out = tmp_path / "backup.tgz"
    result = backup.backup(ctx, out, progress=progress)
    total = assert_grows_to_total(calls)
    # The snapshot counted once taken, then every byte archived: the database twice.
    database = backup._sqlite_path(ctx.settings)
    assert total >= 2 * database.stat().st_size
    assert len(result.files) > 1

    monkeypatch.setattr(backup, "_CHUNK", 4096)  # a test database is a few hundred KiB
    calls, progress = _recorder()
    target = tmp_path / "restored"
    restored = Settings(
        data_dir=target,
        database_url=f"sqlite:///{target / 'trellis.db'}",
        key_passphrase=PASSPHRASE,  # type: ignore[arg-type]
    )
    backup.restore(out, restored, progress=progress)
    assert calls[0] == (0, None)  # the archive is being checked: nothing to count yet
    total = assert_grows_to_total(calls)
    assert total == (target / "trellis.db").stat().st_size


def test_revoking_an_identity_counts_its_certificates(ctx: Context) -> None:
    web = "spiffe://example.org/web"
    _, secret = join_secret(ctx, add_entry(ctx, web), uses=5)
    for _ in range(5):
        issue_svid(ctx, join_grant(ctx, secret), make_csr(new_key(KeyType.EC_P256), uris=[web]))
    calls, progress = _recorder()
    revoked = revoke_identity(
        ctx, SpiffeId.parse(web), RevocationReason.KEY_COMPROMISE, "ops", progress=progress
    )
    assert assert_grows_to_total(calls) == 5
    assert [d for d, _ in calls] == [0, 1, 2, 3, 4, 5]
    assert {info.status for info in revoked} == {CertStatus.REVOKED}


def test_sealing_and_verifying_the_audit_trail_count_records(ctx: Context) -> None:
    calls, progress = _recorder()
    sealed = audit.seal(ctx, settle=dt.timedelta(0), progress=progress)  # PostgreSQL's waits
    assert sealed.records > 0
    assert calls[-1] == (sealed.records, None)  # chunk by chunk, how many pending is not counted
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)

    calls, progress = _recorder()
    verified = audit.verify(ctx, progress=progress)
    assert verified.ok, verified.problems
    assert assert_grows_to_total(calls) == verified.sealed + verified.seals_checked


def test_migrating_counts_the_revisions_applied(tmp_path: Path) -> None:
    calls, progress = _recorder()
    migration = db.migrate(f"sqlite:///{tmp_path / 'new.db'}", progress=progress)
    assert migration.changed
    assert assert_grows_to_total(calls) == len(db.known_revisions())
    calls, progress = _recorder()
    assert not db.migrate(f"sqlite:///{tmp_path / 'new.db'}", progress=progress).changed
    assert calls == []  # nothing to do, nothing to watch
