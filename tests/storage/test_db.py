"""Engine configuration: URLs, SQLite pragmas, unreachable servers."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from edgeprune.storage import Database, InvalidArgument, JobRepo, Unavailable, default_database_url
from edgeprune.storage.db import normalize_url


def test_default_url_is_sqlite_file_under_data_dir(tmp_path: Path) -> None:
    url = default_database_url(tmp_path / "data")
    assert url == f"sqlite:///{tmp_path / 'data' / 'edgeprune.db'}"
    assert (tmp_path / "data").is_dir()


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg"),
        ("postgres://u@h/db", "postgresql+psycopg"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg"),
        ("sqlite:////tmp/x.db", "sqlite"),
    ],
)
def test_urls_are_normalised(url: str, driver: str) -> None:
    assert normalize_url(url).drivername == driver


@pytest.mark.parametrize(
    "url", ["mysql://u@h/db", "postgresql+psycopg2://u@h/db", "sqlite://", "sqlite:///:memory:", "::"]
)
def test_unsupported_urls_are_rejected(url: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        Database(url)
    assert info.value.field == "database_url"


def test_sqlite_runs_in_wal_with_foreign_keys_and_busy_timeout(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    with db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 1000
    db.dispose()


def test_unreachable_postgres_is_unavailable() -> None:
    db = Database("postgresql+psycopg://postgres@127.0.0.1:1/nothing?connect_timeout=2")
    with pytest.raises(Unavailable):
        JobRepo(db).get("x")
