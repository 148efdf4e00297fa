"""Dialect-aware statements shared by the repositories."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def dialect_name(session: Session) -> str:
    return session.get_bind().dialect.name


def insert_ignore(
    session: Session, model: Any, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]
) -> None:
    """INSERT ... ON CONFLICT (keys) DO NOTHING, for many rows at once."""
    if not rows:
        return
    insert = postgresql.insert if dialect_name(session) == "postgresql" else sqlite.insert
    session.execute(insert(model).on_conflict_do_nothing(index_elements=list(keys)), list(rows))


def bulk_insert(
    session: Session, model: Any, columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """Insert many rows fast in the session's transaction: COPY on PostgreSQL, the
    driver's executemany on SQLite; both skip per-row SQLAlchemy work, so values must be
    ready for the driver (JSON columns take JSON text)."""
    table = model.__table__
    driver_conn = session.connection().connection.driver_connection
    if dialect_name(session) == "postgresql":
        sql = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
        with driver_conn.cursor() as cursor, cursor.copy(sql) as copy:
            for row in rows:
                copy.write_row(row)
        return
    placeholders = ", ".join("?" * len(columns))
    driver_conn.executemany(
        f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({placeholders})", rows
    )
