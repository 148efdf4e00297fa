"""Engine creation from one database URL, sessions, and migrations on start.

Backends:
- SQLite (`sqlite:///path/edgeprune.db`, the default, embedded): WAL journal, a busy
  timeout, foreign keys on; write transactions start with BEGIN IMMEDIATE so two writers
  queue on the lock instead of failing on a lock upgrade.
- PostgreSQL (`postgresql+psycopg://user@host/db`; `postgresql://` and `postgres://` are
  read as psycopg 3): a connection pool checked with pre-ping.

A `Database` belongs to one process: create it after spawning workers (never share an
engine across fork).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from edgeprune.storage.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

DEFAULT_DB_FILE = "edgeprune.db"
SQLITE_BUSY_TIMEOUT_S = 30.0
SQLITE_CACHE_KIB = 65536  # page cache per connection (the default is 2 MiB)
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant works: every migrating process takes the same PostgreSQL advisory lock.
_MIGRATION_LOCK_KEY = 0x6564_6770  # "edgp"


def default_database_url(data_dir: str | os.PathLike[str]) -> str:
    """The embedded default: `sqlite:///<data_dir>/edgeprune.db` (the folder is created)."""
    path = Path(data_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / DEFAULT_DB_FILE}"


def normalize_url(url: str) -> URL:
    """Parse a database URL; map plain PostgreSQL URLs onto the psycopg 3 driver.

    Raises InvalidArgument for anything but SQLite or PostgreSQL.
    """
    try:
        parsed = make_url(url)
    except exc.ArgumentError as err:
        raise InvalidArgument("database_url", f"cannot parse {url!r}") from err
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "postgres":
        backend = "postgresql"
    if backend == "postgresql":
        if driver not in ("", "psycopg"):
            raise InvalidArgument("database_url", f"use postgresql+psycopg://, not {parsed.drivername}")
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise InvalidArgument("database_url", "SQLite needs a file path (sqlite:///path/x.db)")
        return parsed
    raise InvalidArgument("database_url", f"unsupported backend {backend!r}: use sqlite or postgresql")


class Database:
    """One database: its engine, transactional sessions and schema migrations.

    >>> db = Database("sqlite:////tmp/x.db"); db.migrate()
    >>> with db.session() as s: ...          # commits on success, rolls back on error
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 5,
        max_overflow: int = 10,
        pool_timeout_s: float = 30.0,
        echo: bool = False,
    ) -> None:
        """Create the engine (no connection is opened yet).

        pool_size / max_overflow / pool_timeout_s size the PostgreSQL pool (and SQLite's).
        Raises InvalidArgument for a malformed or unsupported URL.
        """
        self.url = normalize_url(url)
        self.dialect: str = self.url.get_backend_name()  # "sqlite" | "postgresql"
        kwargs: dict[str, Any] = {
            "echo": echo,
            "pool_size": pool_size,
            "max_overflow": max_overflow,
            "pool_timeout": pool_timeout_s,
        }
        if self.dialect == "sqlite":
            Path(self.url.database or "").parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        else:  # a server restart or failover must not leave dead pooled connections
            kwargs["pool_pre_ping"] = True
            kwargs["pool_recycle"] = 1800
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine)
        # Writes on SQLite take the database lock up front (BEGIN IMMEDIATE).
        self._write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self._read_sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(self._write_engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def __repr__(self) -> str:
        return f"Database({self.url.render_as_string(hide_password=True)!r})"

    @contextlib.contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        """One transaction: commit when the block ends, roll back if it raises.

        write=False marks a read-only block (on SQLite it then takes no write lock).
        Connection failures and lock timeouts surface as `Unavailable`.
        """
        factory = self._write_sessions if write else self._read_sessions
        try:
            with factory() as session, session.begin():
                yield session
        except (exc.OperationalError, exc.InterfaceError) as err:
            if isinstance(err, exc.OperationalError) and not _is_unavailable(err):
                raise
            raise Unavailable(f"database unavailable: {err.orig or err}") from err

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema up to `revision` (default: the latest); safe to call on every start.

        Concurrent starts are serialised (PostgreSQL advisory lock; SQLite write lock).
        """
        from alembic import command

        config = self.alembic_config()
        with self._write_engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
        log.info("database %r at revision %s", self, self.current_revision())

    def downgrade(self, revision: str = "base") -> None:
        """Undo migrations down to `revision` (tests and operators only)."""
        from alembic import command

        config = self.alembic_config()
        with self._write_engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, revision)

    def current_revision(self) -> str | None:
        """The schema revision stored in the database, or None when it was never migrated."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def alembic_config(self) -> Any:
        """An Alembic `Config` for this database, built in code (no alembic.ini)."""
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.set_main_option("sqlalchemy.url", self.url.render_as_string(hide_password=False))
        return config

    def table_names(self) -> list[str]:
        with self.engine.connect() as conn:
            return sorted(inspect(conn).get_table_names())

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def _configure_sqlite(engine: Engine) -> None:
    """WAL, busy timeout and foreign keys on every connection; our own BEGIN statements."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # pysqlite's own transaction handling would defer BEGIN; we emit it in _on_begin.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")  # a committed result survives power loss
        cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _is_unavailable(err: exc.OperationalError) -> bool:
    """Connection refused/lost or a lock held past the busy timeout (not a SQL mistake)."""
    text = str(err.orig).lower()
    markers = ("database is locked", "connection", "could not connect", "server closed",
               "terminating", "timeout", "unable to open database")
    return err.connection_invalidated or any(m in text for m in markers)
