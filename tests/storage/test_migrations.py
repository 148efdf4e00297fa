"""Migrations build exactly the schema the models describe, on both backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from edgeprune.storage import Database
from edgeprune.storage.models import Base
from tests.storage.databases import BACKENDS, fresh_postgres_database


@pytest.fixture(params=BACKENDS)
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A database nobody migrated yet."""
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'empty.db'}")
        yield db
        db.dispose()
        return
    with fresh_postgres_database() as url:
        db = Database(url)
        yield db
        db.dispose()


def _diff(db: Database) -> list:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def test_upgrade_empty_database_matches_models(empty_db: Database) -> None:
    assert empty_db.current_revision() is None
    empty_db.migrate()
    head = ScriptDirectory.from_config(empty_db.alembic_config()).get_current_head()
    assert empty_db.current_revision() == head
    assert _diff(empty_db) == []
    expected = {t.name for t in Base.metadata.sorted_tables} | {"alembic_version"}
    assert set(empty_db.table_names()) == expected


def test_migrate_is_idempotent_and_downgrade_removes_everything(empty_db: Database) -> None:
    empty_db.migrate()
    empty_db.migrate()  # every start calls it
    empty_db.downgrade("base")
    assert empty_db.table_names() == ["alembic_version"]
    assert empty_db.current_revision() is None
    empty_db.migrate()
    assert _diff(empty_db) == []


def test_upload_sizes_move_from_source_to_size_bytes(empty_db: Database) -> None:
    """0003 reads the size the service used to keep in `source` ("upload:<bytes>") into
    size_bytes, marks earlier datasets ready, and its downgrade puts the size back."""
    from sqlalchemy import text

    empty_db.migrate("0002")
    with empty_db.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO datasets (id, owner, display_name, source, task, model, tokenizer, "
            "description, labels, example_count, content_hash, created_at) VALUES "
            "('d1', 'alice', '', 'upload:1234', '', '', '', '', '{}', 0, '', CURRENT_TIMESTAMP), "
            "('d2', 'alice', '', 'api', '', '', '', '', '{}', 0, '', CURRENT_TIMESTAMP)"))
    empty_db.migrate()
    with empty_db.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT id, source, size_bytes, ready FROM datasets ORDER BY id")).all()
    assert [(r[0], r[1], r[2], bool(r[3])) for r in rows] == [
        ("d1", "upload", 1234, True), ("d2", "api", 0, True)]
    empty_db.downgrade("0002")
    with empty_db.engine.connect() as conn:
        assert conn.execute(text("SELECT source FROM datasets WHERE id = 'd1'")).scalar() == \
            "upload:1234"


def test_vocabulary_renames_keep_every_row(empty_db: Database) -> None:
    """0004 renames jobs.caller, the event sequence and the circuit counts, and copies jobs and
    circuits into new tables on SQLite: the rows, and the events and edges that refer to them,
    all survive (with foreign keys enforced, dropping the old tables would cascade)."""
    from sqlalchemy import text

    empty_db.migrate("0003")
    with empty_db.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO jobs (id, kind, display_name, spec, spec_json, state, priority, labels, "
            "caller, request_id, attempt, cancel_requested, created_at, updated_at, progress, "
            "result, last_event_seq) VALUES ('j1', 'discovery', '', :spec, '{}', 'SUCCEEDED', 0, "
            "'{}', 'alice', 'r1', 1, false, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, '{}', '{}', 2)"),
            {"spec": b"\x08\x01"})
        conn.execute(text(
            "INSERT INTO job_events (job_id, seq, kind, payload, attempt, created_at) VALUES "
            "('j1', 1, 'state', '{}', 1, CURRENT_TIMESTAMP), "
            "('j1', 2, 'state', '{}', 1, CURRENT_TIMESTAMP)"))
        conn.execute(text("INSERT INTO edge_names (model, name) VALUES ('m', 'tok->logits')"))
        conn.execute(text(
            "INSERT INTO circuits (model, method, task, job_id, display_name, n_edges, "
            "n_edges_total, n_nodes, n_nodes_total, sparsity, target, settings, provenance, "
            "metrics, created_at, owner) VALUES ('m', 'eap', 'ioi', 'j1', '', 1, 4, 2, 3, 0.75, "
            "'{}', '{}', '{}', '{}', CURRENT_TIMESTAMP, 'alice')"))
        conn.execute(text("INSERT INTO circuit_edges (circuit_id, edge_id) "
                          "SELECT c.id, e.id FROM circuits c, edge_names e"))
    empty_db.migrate()
    with empty_db.engine.connect() as conn:
        assert conn.execute(text(
            "SELECT owner, request_id, last_event_sequence FROM jobs")).all() == [("alice", "r1", 2)]
        assert conn.execute(text(
            "SELECT sequence FROM job_events ORDER BY sequence")).scalars().all() == [1, 2]
        assert conn.execute(text(
            "SELECT job_id, edge_count, total_edge_count, node_count, total_node_count "
            "FROM circuits")).all() == [("j1", 1, 4, 2, 3)]
        assert conn.execute(text("SELECT count(*) FROM circuit_edges")).scalar() == 1
    empty_db.downgrade("0003")
    with empty_db.engine.connect() as conn:
        assert conn.execute(text("SELECT caller, last_event_seq FROM jobs")).all() == [("alice", 2)]
        assert conn.execute(text("SELECT count(*) FROM job_events")).scalar() == 2
        assert conn.execute(text("SELECT n_edges_total FROM circuits")).scalar() == 4
