"""Upgrading a populated database, as an operator's existing install is upgraded: every
migration must carry the rows across (SQLite rebuilds altered tables by copying them)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic import command

from ca.store import db

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
_OPENED: list[sa.Engine] = []


@pytest.fixture(autouse=True)
def _dispose_engines() -> Iterator[None]:
    """Every engine a test opened is disposed, whether the test passed or not, and whichever
    test forgot to: a pooled PostgreSQL connection left to the garbage collector warns in
    whatever test runs then (the 0018 test left one, and a SQLite test two files later failed)."""
    yield
    while _OPENED:
        _OPENED.pop().dispose()


def _at_revision(url: str, revision: str = "0001") -> sa.Engine:
    """The database at ``url`` migrated up to ``revision`` only: an install made by that
    release, before the migrations under test."""
    engine = db.connect(url)
    _OPENED.append(engine)
    config = db._config()
    with engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        connection.commit()
    return engine


def _insert_ca(
    connection: sa.Connection, ca_id: int, role: str, parent: int | None, when: dt.datetime
) -> None:
    connection.execute(
        sa.text(
            "INSERT INTO ca (id, authority, role, state, serial, parent_id, subject, "
            "key_backend, key_ref, key_type, cert_pem, not_before, not_after, created_at) "
            "VALUES (:id, 'mesh', :role, 'active', :serial, :parent, 'CN=x', 'file', "
            ":ref, 'ec-p256', 'pem', :t, :t, :t)"
        ),
        {
            "id": ca_id,
            "role": role,
            "serial": f"{ca_id:x}",
            "parent": parent,
            "ref": f"k{ca_id}",
            "t": when,
        },
    )


def _populate(engine: sa.Engine) -> None:
    naive = engine.dialect.name == "sqlite"
    when = NOW.replace(tzinfo=None) if naive else NOW
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO authority VALUES "
                "('mesh', 'spiffe', 'example.org', 'file', 604800, 3600, :t)"
            ),
            {"t": when},
        )
        for ca_id, role, parent in ((1, "root", None), (2, "intermediate", 1)):
            _insert_ca(connection, ca_id, role, parent, when)
        connection.execute(
            sa.text(
                "INSERT INTO certificate (serial, authority, issuer_ca_id, profile, spiffe_id, "
                "fingerprint_sha256, not_before, not_after, status, requested_by, cert_pem, "
                "created_at) VALUES ('abc', 'mesh', 2, 'x509-svid', 'spiffe://example.org/w', "
                "'f', :t, :t, 'active', 'test', 'pem', :t)"
            ),
            {"t": when},
        )


def test_a_populated_database_upgrades_to_head_keeping_every_row(database_url: str) -> None:
    engine = _at_revision(database_url)
    _populate(engine)
    db.upgrade(engine)
    current, head = db.schema_status(engine)
    assert current == head
    with engine.connect() as connection:
        cas = connection.execute(
            sa.text("SELECT id, parent_id, cross_for_id FROM ca ORDER BY id")
        ).all()
        assert [tuple(row) for row in cas] == [(1, None, None), (2, 1, None)]
        assert connection.execute(sa.text("SELECT count(*) FROM certificate")).scalar() == 1
    # Foreign keys are enforced again after the migration.
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO ca_event (authority, ca_id, event, at, actor) "
                "VALUES ('mesh', 999, 'x', :t, 'test')"
            ),
            {"t": NOW.replace(tzinfo=None) if engine.dialect.name == "sqlite" else NOW},
        )
    engine.dispose()


def test_istio_clusters_recorded_before_0011_keep_their_output(database_url: str) -> None:
    """0011 adds the kubectl target and ``ca-crl.pem`` columns: an existing cluster keeps its
    row, with no kubectl target, no CRL and no error."""
    engine = _at_revision(database_url, "0010")
    _populate(engine)
    when = NOW.replace(tzinfo=None) if engine.dialect.name == "sqlite" else NOW
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO istio_cluster VALUES ('east', 'mesh', 'ab', :t, :t, 'ec-p256', "
                "86400, '/srv/cacerts.yaml', 'secret-yaml', :t)"
            ),
            {"t": when},
        )
    db.upgrade(engine)
    with engine.connect() as connection:
        row = connection.execute(
            sa.text(
                "SELECT cluster, output, kubeconfig, kube_context, with_crl, "
                "intermediate_crl_pem, root_crl_number, last_error FROM istio_cluster"
            )
        ).one()
    assert tuple(row) == ("east", "/srv/cacerts.yaml", None, None, False, None, None, None)
    engine.dispose()


def test_ocsp_responders_recorded_before_0015_are_numbered_per_ca(database_url: str) -> None:
    """0015 numbers each CA's responders in the order they expire (``id`` breaks a tie, as two
    made by the race 0015 closes would have) and then makes (CA, generation) unique."""
    engine = _at_revision(database_url, "0014")
    _populate(engine)
    naive = engine.dialect.name == "sqlite"
    responders = [  # (id, ca_id, days after NOW it expires)
        (1, 2, 7), (2, 2, 14), (3, 2, 14), (4, 1, 7), (5, 2, 3),
    ]  # fmt: skip
    with engine.begin() as connection:
        for id_, ca_id, days in responders:
            when = NOW + dt.timedelta(days=days)
            connection.execute(
                sa.text(
                    "INSERT INTO ocsp_responder (id, ca_id, key_backend, key_ref, key_type, "
                    "cert_pem, not_after) VALUES (:id, :ca, 'file', :ref, 'ec-p256', 'pem', :t)"
                ),
                {
                    "id": id_,
                    "ca": ca_id,
                    "ref": f"r{id_}",
                    "t": when.replace(tzinfo=None) if naive else when,
                },
            )
    db.upgrade(engine)
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT id, ca_id, generation FROM ocsp_responder ORDER BY id")
        ).all()
    assert [tuple(row) for row in rows] == [(1, 2, 2), (2, 2, 3), (3, 2, 4), (4, 1, 1), (5, 2, 1)]
    with pytest.raises(sa.exc.IntegrityError, match="generation"), engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO ocsp_responder (id, ca_id, generation, key_backend, key_ref, "
                "key_type, cert_pem, not_after) "
                "VALUES (6, 2, 4, 'file', 'r6', 'ec-p256', 'pem', :t)"
            ),
            {"t": NOW.replace(tzinfo=None) if naive else NOW},
        )
    engine.dispose()


def test_crls_stored_under_a_cross_certificate_are_deleted_by_0016(database_url: str) -> None:
    """Before 0016 a GET for a cross-certificate's CRL made the root sign one, stored under the
    cross row; 0016 deletes those and keeps every issuer's own CRL."""
    engine = _at_revision(database_url, "0015")
    _populate(engine)
    naive = engine.dialect.name == "sqlite"
    when = NOW.replace(tzinfo=None) if naive else NOW
    with engine.begin() as connection:
        _insert_ca(connection, 3, "cross", 1, when)
        for ca_id in (1, 2, 3):
            connection.execute(
                sa.text(
                    "INSERT INTO crl (ca_id, number, this_update, next_update, der) "
                    "VALUES (:ca, 1, :t, :t, :der)"
                ),
                {"ca": ca_id, "t": when, "der": b"crl"},
            )
    db.upgrade(engine)
    with engine.connect() as connection:
        kept = connection.execute(sa.text("SELECT ca_id FROM crl ORDER BY ca_id")).scalars()
        assert list(kept) == [1, 2]
        assert connection.execute(sa.text("SELECT COUNT(*) FROM ca")).scalar_one() == 3
    engine.dispose()


def test_job_runs_recorded_before_0017_are_keyed_per_node_for_node_jobs(database_url: str) -> None:
    """0017 keys ``job_run`` on (name, node): a cluster-wide job keeps its one record (node
    empty, the node of its last run in ``ran_on``); a node job's record becomes that of the node
    that ran it last, so its failures stay that node's; then other nodes add their own."""
    engine = _at_revision(database_url, "0016")
    naive = engine.dialect.name == "sqlite"
    when = NOW.replace(tzinfo=None) if naive else NOW
    with engine.begin() as connection:
        for name, node, failures in (("crl-resign", "a", 0), ("openvpn-crl", "b", 4)):
            connection.execute(
                sa.text(
                    "INSERT INTO job_run (name, last_started, last_finished, last_result, "
                    "last_ok, consecutive_failures, runs, next_run, node) "
                    "VALUES (:name, :t, :t, 'r', :ok, :failures, 9, :t, :node)"
                ),
                {"name": name, "t": when, "ok": failures == 0, "failures": failures, "node": node},
            )
    db.upgrade(engine)
    with engine.begin() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT name, node, ran_on, consecutive_failures, runs FROM job_run ORDER BY name"
            )
        ).all()
        assert [tuple(row) for row in rows] == [
            ("crl-resign", "", "a", 0, 9),
            ("openvpn-crl", "b", "b", 4, 9),
        ]
        connection.execute(
            sa.text(
                "INSERT INTO job_run (name, node, ran_on, last_result, last_ok, "
                "consecutive_failures, runs) VALUES ('openvpn-crl', 'a', 'a', 'r', true, 0, 1)"
            )
        )
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO job_run (name, node, ran_on, last_result, last_ok, "
                "consecutive_failures, runs) VALUES ('openvpn-crl', 'b', 'b', 'r', true, 0, 1)"
            )
        )
    engine.dispose()


def _job_run_schema(engine: sa.Engine) -> tuple[list[tuple[str, str, bool]], list[str]]:
    inspector = sa.inspect(engine)
    columns = [
        (c["name"], str(c["type"]), bool(c["nullable"])) for c in inspector.get_columns("job_run")
    ]
    return columns, inspector.get_pk_constraint("job_run")["constrained_columns"]


def test_0017_downgrades_to_the_schema_of_0016(database_url: str) -> None:
    """One record per job again, the last run's, in the very table 0016 made: on SQLite the
    downgrade rebuilds it, and the rebuild had left ``node`` nullable."""
    engine = _at_revision(database_url, "0016")
    expected = _job_run_schema(engine)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO job_run (name, last_result, last_ok, consecutive_failures, runs, "
                "node) VALUES ('openvpn-crl', 'r', true, 0, 1, 'a')"
            )
        )
    db.upgrade(engine)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO job_run (name, node, ran_on, last_started, last_result, last_ok, "
                "consecutive_failures, runs) VALUES ('openvpn-crl', 'b', 'b', :t, 'r', false, "
                "3, 2)"
            ),
            {"t": NOW.replace(tzinfo=None) if engine.dialect.name == "sqlite" else NOW},
        )
    config = db._config()
    with engine.connect() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0016")
        connection.commit()
    assert _job_run_schema(engine) == expected
    with engine.begin() as connection:
        rows = connection.execute(
            sa.text("SELECT name, node, consecutive_failures FROM job_run")
        ).all()
    assert [tuple(row) for row in rows] == [("openvpn-crl", "b", 3)]  # the last run's
    engine.dispose()


def test_0018_counts_crl_numbers_per_issuer_name_from_the_highest_stored(
    database_url: str,
) -> None:
    """0018 counts CRL numbers per issuer name: each name starts from the highest number any
    CA bearing it has stored (here an intermediate and its successor, and the root)."""
    engine = _at_revision(database_url, "0017")
    _populate(engine)
    naive = engine.dialect.name == "sqlite"
    when = NOW.replace(tzinfo=None) if naive else NOW
    with engine.begin() as connection:
        _insert_ca(connection, 3, "intermediate", 1, when)
        connection.execute(sa.text("UPDATE ca SET subject = 'CN=root' WHERE id = 1"))
        for ca_id, number in ((1, 4), (2, 9), (3, 2)):
            connection.execute(
                sa.text(
                    "INSERT INTO crl (ca_id, number, this_update, next_update, der) "
                    "VALUES (:ca, :number, :t, :t, :der)"
                ),
                {"ca": ca_id, "number": number, "t": when, "der": b"crl"},
            )
    db.upgrade(engine)
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT name, number FROM crl_issuer ORDER BY name"))
        assert [tuple(row) for row in rows] == [("CN=root", 4), ("CN=x", 9)]


def test_0019_mends_what_racing_transitions_left_and_allows_one_active_intermediate(
    database_url: str,
) -> None:
    """Before every CA transition took the rotation lock, an emergency revocation racing an
    activation left several active intermediates of one authority (the latest to expire is the
    one that issues) and a revoked one back in state ``retired``. 0019 retires the strays,
    makes the revoked one ``revoked`` again, and then refuses a second active intermediate."""
    engine = _at_revision(database_url, "0018")
    _populate(engine)  # root 1, intermediate 2 (active)
    naive = engine.dialect.name == "sqlite"
    when = NOW.replace(tzinfo=None) if naive else NOW
    with engine.begin() as connection:
        for ca_id, later in ((3, dt.timedelta(days=2)), (4, dt.timedelta(days=1))):
            _insert_ca(connection, ca_id, "intermediate", 1, when)
            connection.execute(
                sa.text("UPDATE ca SET not_after = :t WHERE id = :id"),
                {"t": when + later, "id": ca_id},
            )
        _insert_ca(connection, 5, "intermediate", 1, when)
        connection.execute(
            sa.text(
                "UPDATE ca SET state = 'retired', revoked_at = :t, "
                "revocation_reason = 'keyCompromise' WHERE id = 5"
            ),
            {"t": when},
        )
    db.upgrade(engine)
    with engine.connect() as connection:
        states = connection.execute(sa.text("SELECT id, state FROM ca ORDER BY id")).all()
    assert [tuple(row) for row in states] == [
        (1, "active"),
        (2, "retired"),
        (3, "active"),  # the latest to expire: the one that was issuing
        (4, "retired"),
        (5, "revoked"),
    ]
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
        connection.execute(sa.text("UPDATE ca SET state = 'active' WHERE id = 2"))
    with engine.begin() as connection:  # another authority's, and a root, are not in its way
        connection.execute(
            sa.text(
                "INSERT INTO authority VALUES ('gateway', 'gateway', '', 'file', 604800, 3600, :t)"
            ),
            {"t": when},
        )
        connection.execute(sa.text("UPDATE ca SET authority = 'gateway' WHERE id = 4"))
        connection.execute(sa.text("UPDATE ca SET state = 'active' WHERE id IN (4, 1)"))
    engine.dispose()
