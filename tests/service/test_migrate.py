"""`python -m edgeprune.service migrate`: brings a fresh database to the newest schema, idempotently,
on SQLite and PostgreSQL; a bad database or setting exits non-zero with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeprune.storage import Database
from tests.service.conftest import database_url
from tests.storage.databases import BACKENDS


def migrate(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPRUNE_")}
    return subprocess.run([sys.executable, "-m", "edgeprune.service", "migrate", *flags],
                          env={**clean, **(env or {})}, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_migrate_brings_a_fresh_database_to_head_and_is_idempotent(backend: str,
                                                                  tmp_path: Path) -> None:
    with database_url(backend, tmp_path) as url:
        first = migrate(env={"EDGEPRUNE_DATABASE_URL": url})
        assert first.returncode == 0, first.stderr
        revision = json.loads(first.stdout)["revision"]
        db = Database(url)
        try:
            assert db.current_revision() == revision and "jobs" in db.table_names()
        finally:
            db.dispose()
        again = migrate("--database-url", url)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["revision"] == revision


def test_migrate_reports_an_unreachable_database_in_one_line() -> None:
    out = migrate("--database-url", "postgresql+psycopg://postgres@127.0.0.1:1/none")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("edgeprune migrate: database:")


def test_migrate_rejects_a_bad_setting(tmp_path: Path) -> None:
    out = migrate("--config", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "missing.yaml" in out.stderr and "Traceback" not in out.stderr
