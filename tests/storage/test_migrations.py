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
