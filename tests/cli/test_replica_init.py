"""``trellis init`` run by several replicas of one database, each with a data dir of its own
(docs/deploy.md): at once, as replicas starting together run it, or one after another. Real
processes on both databases; tests/ca/test_init_races.py makes the race happen on purpose."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography import x509

from ca.pem import fingerprint
from tests import zygote
from tests.cli.test_walkthrough import Trellis


def together(replicas: list[Trellis], *args: str) -> list[subprocess.CompletedProcess[str]]:
    """``trellis ARGS`` started in every replica at once; their results, in that order."""
    with ThreadPoolExecutor(len(replicas)) as pool:
        return list(
            pool.map(lambda replica: zygote.run(args, env=replica.env, timeout=120), replicas)
        )


def key_files(replica: Trellis) -> list[str]:
    keys = replica.data_dir / "keys"
    return sorted(p.name for p in keys.iterdir()) if keys.exists() else []


def test_exists_ok_on_a_replica_with_its_own_data_dir_finds_the_ca(
    trellis: Trellis, database_url: str, tmp_path: Path
) -> None:
    """It exited 8 "CA key ... missing" (it unlocked the issuing key to name the trust domain),
    and left an empty keys/ behind. The CA exists, which is all --exists-ok asks; whether this
    replica holds its keys is what 'serve' checks at start-up."""
    replica = Trellis(tmp_path / "replica", database_url)

    result = replica.run("init", "--trust-domain", "example.org", "--exists-ok", "--json")

    assert json.loads(result.stdout) == {"created": False, "trust_domain": "example.org"}
    assert key_files(replica) == []
    other = replica.run("init", "--trust-domain", "other.org", "--exists-ok", ok=False)
    assert other.returncode == 6 and "not for other.org" in other.stderr, other


def test_three_replicas_init_at_once_and_one_creates_the_ca(
    database_url: str, tmp_path: Path
) -> None:
    """On an empty PostgreSQL database one of three exited 8 "duplicate key value violates
    unique constraint authority_pkey" where --exists-ok promises 0."""
    replicas = [Trellis(tmp_path / f"replica-{n}", database_url) for n in range(3)]

    results = together(replicas, "init", "--trust-domain", "example.org", "--exists-ok", "--json")

    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    created = [json.loads(r.stdout)["created"] for r in results]
    assert sorted(created) == [False, False, True]
    for replica, made in zip(replicas, created, strict=True):
        assert bool(key_files(replica)) == made, key_files(replica)


def test_plain_inits_at_once_create_one_ca_and_refuse_the_others(
    database_url: str, tmp_path: Path
) -> None:
    """The others are refused as a second init after the first is (exit 6), not with the
    database's duplicate-key error (exit 8)."""
    replicas = [Trellis(tmp_path / f"replica-{n}", database_url) for n in range(3)]

    results = together(replicas, "init", "--trust-domain", "example.org")

    assert sorted(r.returncode for r in results) == [0, 6, 6], [r.stderr for r in results]
    for replica, result in zip(replicas, results, strict=True):
        if result.returncode == 6:
            assert "already exists" in result.stderr, result.stderr
            assert not replica.data_dir.exists(), replica.data_dir  # a refused init: nothing


def root_fingerprint(replica: Trellis) -> str:
    """The root of the CA in the database, as ``trellis bundle show`` reads it."""
    pem = replica.run("bundle", "show").stdout.encode()
    (root,) = x509.load_pem_x509_certificates(pem)
    return fingerprint(root)


def test_three_forced_inits_at_once_replace_the_ca_once(
    trellis: Trellis, database_url: str, tmp_path: Path
) -> None:
    """Two reported success with different roots (each replaced the CA, the second the
    first's) and the third exited 8 on a foreign key. Those given while another ran are
    refused now, however long their imports kept them from the database."""
    replicas = [Trellis(tmp_path / f"replica-{n}", database_url) for n in range(3)]

    results = together(replicas, "init", "--trust-domain", "example.org", "--force", "--json")

    assert sorted(r.returncode for r in results) == [0, 6, 6], [r.stderr for r in results]
    (won,) = [json.loads(r.stdout) for r in results if r.returncode == 0]
    assert won["root_fingerprint_sha256"] == root_fingerprint(trellis)
    for replica, result in zip(replicas, results, strict=True):
        if result.returncode == 6:
            assert "it was not replaced again" in result.stderr, result.stderr
            assert not replica.data_dir.exists(), replica.data_dir


def test_a_forced_init_given_after_another_ended_replaces_its_ca(trellis: Trellis) -> None:
    """Taking turns is not refusing: one given as soon as another ended (often in the same
    second, the resolution of the times compared) replaces that one's CA, as it always did."""
    fingerprints = []
    for _ in range(3):
        forced = trellis.run("init", "--trust-domain", "example.org", "--force", "--json")
        fingerprints.append(json.loads(forced.stdout)["root_fingerprint_sha256"])
    assert len(set(fingerprints)) == 3
