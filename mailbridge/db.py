"""Database: the engine, the sessions and the schema upgrade. The only owner of a session."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")

MIGRATIONS = Path(__file__).with_name("migrations")
# The newest migration. Checked against Alembic by the tests; lets a current database skip importing
# Alembic at all (it is a tenth of the daemon's memory).
SCHEMA_HEAD = "0002"
WRITE_OPTION = "mailbridge_write"


def chunked(values: Sequence[T], size: int = 500) -> Iterator[Sequence[T]]:
    """Long `IN (…)` lists go in pieces: SQLite limits the number of bound parameters per statement."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


class Database:
    """Sync SQLAlchemy behind a one-thread executor.

    SQLite takes one writer at a time anyway, and a single writer thread keeps transactions from
    queueing on the file lock; the event loop only awaits `run()`, so IMAP IDLE never blocks on a commit.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._executor: ThreadPoolExecutor | None = None

    @contextlib.contextmanager
    def unit_of_work(self) -> Iterator[Session]:
        """One transaction: commit on normal exit, rollback on any exception."""
        with self._sessions() as session, session.begin():
            # A write transaction takes SQLite's write lock up front (BEGIN IMMEDIATE): it waits its turn
            # (busy timeout) instead of failing when another process commits between its first read and
            # its first write (SQLITE_BUSY_SNAPSHOT, which the busy timeout does not cover).
            session.connection(execution_options={WRITE_OPTION: True})
            yield session

    @contextlib.contextmanager
    def reader(self) -> Iterator[Session]:
        with self._sessions() as session:
            yield session

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking database work off the event loop, on the single database thread."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def schema_revision(self) -> str | None:
        try:
            with self.engine.connect() as connection:
                return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except Exception:  # no table yet: a new database
            return None

    def upgrade(self) -> None:
        """Apply the Alembic migrations up to head (idempotent)."""
        if self.schema_revision() == SCHEMA_HEAD:
            return
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as connection:
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Python's sqlite3 (before 3.12) opens transactions itself, but not before SAVEPOINT: a savepoint
    # outside a transaction becomes one, and RELEASE commits it. We take over BEGIN (the SQLAlchemy
    # recipe), so a batch is one atomic transaction and each mail's savepoint is just a savepoint.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets `mailbridge status` read while the daemon writes; FULL makes a commit survive a power cut,
    # which matters because the IMAP move that follows it cannot be undone.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    immediate = connection.get_execution_options().get(WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
