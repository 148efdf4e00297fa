"""Engine creation from one database URL, sessions, and migrations on start.

Backends:
- SQLite (`sqlite:///path/edgeprune.db`, the default, embedded): WAL journal, a busy
  timeout, foreign keys on; write transactions start with BEGIN IMMEDIATE so two writers
  queue on the lock instead of failing on a lock upgrade. `?max_page_count=N` caps the
  file at N pages (SQLite's PRAGMA max_page_count): past it writes fail as on a full disk.
- PostgreSQL (`postgresql+psycopg://user@host/db`; `postgresql://` and `postgres://` are
  read as psycopg 3): a connection pool checked with pre-ping, a connect timeout.

Driver errors are classified once, in `Database.session`: what may pass by itself (lock held
past the busy timeout, connection lost, disk full, I/O error) becomes the retryable
`Unavailable`, whose message names the condition but not the connection; integrity and data
errors (a bug or bad data) pass through unchanged and are fatal to the call.

Time: `Database.now` is the clock leases are measured on (see there).

A `Database` belongs to one process: create it after spawning workers (never share an
engine across fork).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from edgeprune.storage.errors import InvalidArgument, Unavailable
from edgeprune.storage.models import utcnow

log = logging.getLogger(__name__)

DEFAULT_DB_FILE = "edgeprune.db"
SQLITE_BUSY_TIMEOUT_S = 30.0  # workers: a long write of another process is worth waiting for
PG_CONNECT_TIMEOUT_S = 10  # an unreachable host fails the call instead of hanging it
MAX_PAGE_COUNT_PARAM = "max_page_count"
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
        raise InvalidArgument(f"cannot parse {url!r}", field="database_url") from err
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "postgres":
        backend = "postgresql"
    if backend == "postgresql":
        if driver not in ("", "psycopg"):
            raise InvalidArgument(f"use postgresql+psycopg://, not {parsed.drivername}",
                                  field="database_url")
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise InvalidArgument("SQLite needs a file path (sqlite:///path/x.db)",
                                  field="database_url")
        return parsed
    raise InvalidArgument(f"unsupported backend {backend!r}: use sqlite or postgresql",
                          field="database_url")


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
        busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S,
        echo: bool = False,
    ) -> None:
        """Create the engine (no connection is opened yet).

        pool_size / max_overflow / pool_timeout_s size the PostgreSQL pool (and SQLite's).
        busy_timeout_s: how long a SQLite call waits for another process's write lock before
        it fails as Unavailable (request paths use a short one so a stalled writer cannot
        hold their threads; migrations always wait SQLITE_BUSY_TIMEOUT_S).
        Raises InvalidArgument for a malformed or unsupported URL.
        """
        url_parsed = normalize_url(url)
        self.max_page_count = _max_page_count(url_parsed)
        self.url = url_parsed.difference_update_query([MAX_PAGE_COUNT_PARAM])
        self.dialect: str = self.url.get_backend_name()  # "sqlite" | "postgresql"
        self.busy_timeout_s = busy_timeout_s
        kwargs: dict[str, Any] = {
            "echo": echo,
            "pool_size": pool_size,
            "max_overflow": max_overflow,
            "pool_timeout": pool_timeout_s,
        }
        if self.dialect == "sqlite":
            Path(self.url.database or "").parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": busy_timeout_s}
        else:  # a server restart or failover must not leave dead pooled connections
            kwargs["pool_pre_ping"] = True
            kwargs["pool_recycle"] = 1800
            if "connect_timeout" not in self.url.query:
                kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine, busy_timeout_s, self.max_page_count)
        self._probe_engine: Engine | None = None
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
        except (exc.DBAPIError, exc.TimeoutError) as err:
            unavailable = unavailable_error(err)
            if unavailable is None:
                raise
            raise unavailable from err

    def now(self, session: Session) -> datetime:
        """The time leases are measured on, read inside ``session``'s transaction.

        PostgreSQL: the database server's clock, so workers on hosts whose clocks disagree
        still agree on when a lease expires. SQLite is embedded: every process that opens
        the file runs on the same host and reads the same clock, so this process's UTC clock
        is that clock (SQLite's own datetime('now') would read it too).
        """
        if self.dialect == "postgresql":
            value = session.execute(_STATEMENT_TIMESTAMP).scalar_one()
            return value.astimezone(UTC)
        return utcnow()

    def ping(self, timeout_s: float = 2.0) -> None:
        """Open a fresh connection and run one query (no pooled connection is used, so a busy
        pool cannot make a reachable database look down). Raises Unavailable."""
        if self._probe_engine is None:
            if self.is_sqlite:
                args: dict[str, Any] = {"timeout": timeout_s}
            else:  # libpq waits at least 2 s to connect
                args = {"connect_timeout": max(2, round(timeout_s)),
                        "options": f"-c statement_timeout={int(timeout_s * 1000)}"}
            self._probe_engine = create_engine(self.url, poolclass=NullPool, connect_args=args)
        # SQLite opens its file lazily: reading the schema proves the file is readable.
        query = "SELECT count(*) FROM sqlite_master" if self.is_sqlite else "SELECT 1"
        try:
            with self._probe_engine.connect() as conn:
                conn.exec_driver_sql(query).scalar()
        except exc.DBAPIError as err:
            raise unavailable_error(err) or Unavailable("the database cannot be queried",
                                                        detail=str(err.orig)) from err

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema up to `revision` (default: the latest); safe to call on every start.

        Concurrent starts are serialised (PostgreSQL advisory lock; SQLite write lock).
        """
        from alembic import command

        config = self.alembic_config()
        with self._write_engine.connect() as conn:
            if self.is_sqlite:  # another process migrating is worth the long wait
                _set_busy_timeout(conn, SQLITE_BUSY_TIMEOUT_S)
                _set_foreign_keys(conn, on=False)
            try:
                with conn.begin():
                    if self.dialect == "postgresql":
                        conn.exec_driver_sql(
                            f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
                    config.attributes["connection"] = conn
                    command.upgrade(config, revision)
            finally:
                if self.is_sqlite:
                    _set_busy_timeout(conn, self.busy_timeout_s)
                    _set_foreign_keys(conn, on=True)
        log.info("database %r at revision %s", self, self.current_revision())

    def downgrade(self, revision: str = "base") -> None:
        """Undo migrations down to `revision` (tests and operators only)."""
        from alembic import command

        config = self.alembic_config()
        with self._write_engine.connect() as conn:
            if self.is_sqlite:
                _set_foreign_keys(conn, on=False)
            try:
                with conn.begin():
                    config.attributes["connection"] = conn
                    command.downgrade(config, revision)
            finally:
                if self.is_sqlite:
                    _set_foreign_keys(conn, on=True)

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
        if self._probe_engine is not None:
            self._probe_engine.dispose()


_STATEMENT_TIMESTAMP = text("SELECT statement_timestamp()")


def _max_page_count(url: URL) -> int | None:
    """The `?max_page_count=N` of a SQLite URL (None when absent)."""
    raw = url.query.get(MAX_PAGE_COUNT_PARAM)
    if raw is None:
        return None
    if url.get_backend_name() != "sqlite":
        raise InvalidArgument(f"{MAX_PAGE_COUNT_PARAM} is a SQLite setting", field="database_url")
    try:
        value = int(raw if isinstance(raw, str) else raw[-1])
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidArgument(f"{MAX_PAGE_COUNT_PARAM} must be a positive "
                              f"number of pages, got {raw!r}", field="database_url")
    return value


def _set_busy_timeout(conn: Any, seconds: float) -> None:
    """Set a SQLite connection's busy timeout without starting a transaction."""
    conn.connection.driver_connection.execute(f"PRAGMA busy_timeout={int(seconds * 1000)}")


def _set_foreign_keys(conn: Any, *, on: bool) -> None:
    """Turn a SQLite connection's foreign key enforcement on or off (outside a transaction,
    where SQLite ignores it). Migrations that copy a table into a new one need it off: dropping
    the old table would otherwise delete or null every row that refers to it."""
    conn.connection.driver_connection.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


def _configure_sqlite(engine: Engine, busy_timeout_s: float, max_page_count: int | None) -> None:
    """WAL, busy timeout and foreign keys on every connection; our own BEGIN statements."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # pysqlite's own transaction handling would defer BEGIN; we emit it in _on_begin.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        if max_page_count is not None:
            cursor.execute(f"PRAGMA max_page_count={max_page_count}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")  # a committed result survives power loss
        cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


# SQLite result codes (primary, without the extended part) that a later call may not meet.
_SQLITE_TRANSIENT = {
    "SQLITE_BUSY": "the database is locked by another writer",
    "SQLITE_LOCKED": "the database is locked by another writer",
    "SQLITE_FULL": "the database's disk is full",
    "SQLITE_IOERR": "the database had a disk I/O error",
    "SQLITE_CANTOPEN": "the database file cannot be opened",
    "SQLITE_PROTOCOL": "the database is locked by another writer",
    "SQLITE_NOMEM": "the database ran out of memory",
}
# PostgreSQL SQLSTATE classes that name a passing condition (every psycopg OperationalError is
# one of these or a connection failure without a SQLSTATE).
_PG_TRANSIENT = {
    "08": "the database cannot be reached",
    "40": "the transaction conflicted with another one",
    "53": "the database is out of resources (disk, memory or connections)",
    "57": "the database cancelled the statement or is shutting down",
    "58": "the database had a system error",
}
# Retry hints (seconds) for callers: a lock passes quickly, an outage or a full disk does not.
_RETRY_AFTER_S = {"locked": 1.0, "other": 5.0}


def unavailable_error(err: BaseException) -> Unavailable | None:
    """The retryable `Unavailable` for a driver error that may pass by itself, or None for a
    fatal one (integrity, data or programming error). The message never holds the driver's
    text, which names the host, port, database and user; `detail` keeps it for the log."""
    if isinstance(err, exc.TimeoutError):  # every pooled connection is busy
        return Unavailable("no database connection is free", retry_after_s=1.0)
    if not isinstance(err, exc.DBAPIError):
        return None
    orig = err.orig
    detail = str(orig or err)
    name = getattr(orig, "sqlite_errorname", None)
    if name is not None:
        message = _SQLITE_TRANSIENT.get("_".join(name.split("_")[:2]))  # the primary code
        if message is None:
            return None
        kind = "locked" if "locked" in message else "other"
        return Unavailable(message, detail=detail, retry_after_s=_RETRY_AFTER_S[kind])
    if err.connection_invalidated or isinstance(err, exc.InterfaceError):
        return Unavailable("the database cannot be reached", detail=detail, retry_after_s=5.0)
    if isinstance(err, exc.OperationalError):
        sqlstate = getattr(orig, "sqlstate", None) or "08"
        message = _PG_TRANSIENT.get(sqlstate[:2], "the database is unavailable")
        return Unavailable(message, detail=detail, retry_after_s=_RETRY_AFTER_S["other"])
    return None
