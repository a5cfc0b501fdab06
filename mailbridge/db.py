"""Database: the engine, the sessions and the schema upgrade. The only owner of a session."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Select, Table, create_engine, event, insert, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

T = TypeVar("T")
log = logging.getLogger("mailbridge.db")

MIGRATIONS = Path(__file__).with_name("migrations")
# The newest migration. Checked against Alembic by the tests; lets a current database skip importing
# Alembic at all (it is a tenth of the daemon's memory).
SCHEMA_HEAD = "0013"
WRITE_OPTION = "mailbridge_write"
MIGRATIONS_LOCK = 0x6D620002
# A server connection unused for longer than this is checked (a round trip) before it is handed out.
PING_AFTER_IDLE_SECONDS = 1.0
_UPGRADE_FROM_STDIN = "import sys; from mailbridge.db import Database; Database(sys.stdin.read()).upgrade()"


def chunked(values: Sequence[T], size: int = 500) -> Iterator[Sequence[T]]:
    """Long `IN (…)` lists go in pieces: SQLite limits the number of bound parameters per statement."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


# Claims between instances. The one place where the backends differ: PostgreSQL locks the rows a
# transaction claims (FOR UPDATE SKIP LOCKED: another instance's claim passes them over instead of waiting)
# or reads under a fence (FOR KEY SHARE: a claim of that row skips it until this commit). SQLAlchemy
# renders neither on SQLite, where a write transaction holds the one writer lock from its start (BEGIN
# IMMEDIATE under the writer flock), which makes a select-then-update claim atomic by itself.
SelectT = TypeVar("SelectT", bound=Select)  # any row shape


def claim_rows(statement: SelectT) -> SelectT:
    return statement.with_for_update(skip_locked=True)


def share_rows(statement: SelectT) -> SelectT:
    # FOR KEY SHARE: holds off FOR UPDATE (a claim) but not a plain UPDATE (the holder's own renewal).
    return statement.with_for_update(read=True, key_share=True)


def insert_missing(session: Session, model: type[DeclarativeBase], rows: list[dict[str, Any]]) -> None:
    """INSERT … ON CONFLICT DO NOTHING: rows that another instance inserted first are left as they are."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(insert(model).on_conflict_do_nothing(), rows)


def insert_rows(session: Session, model: type[DeclarativeBase], rows: Sequence[dict[str, Any]]) -> None:
    """INSERT rows (the same keys in each) as one Core executemany. The ORM's bulk INSERT (`insert(model)`)
    writes the same rows with the mapper's bookkeeping on top: 24 µs a participant or event row against
    17 µs here (SQLite, batches of 50)."""
    if rows:
        table = model.__table__
        assert isinstance(table, Table)
        session.execute(insert(table), rows)


class MigrationError(Exception):
    """The schema could not be brought up to date (the message carries the migration's error)."""


class Database:
    """Sync SQLAlchemy behind a one-thread executor.

    SQLite takes one writer at a time anyway, and a single writer thread keeps transactions from
    queueing on the file lock; the event loop only awaits `run()`, so IMAP IDLE never blocks on a commit.
    """

    def __init__(
        self, url: str, *, fsync_each_commit: bool = True, ping_after_idle_seconds: float = PING_AFTER_IDLE_SECONDS
    ) -> None:
        """`fsync_each_commit=False`: commits need not be flushed to disk before they return (SQLite
        synchronous=NORMAL, PostgreSQL synchronous_commit=off); for marks that may be redone after a power cut."""
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.is_postgres = parsed.get_backend_name() == "postgresql"
        kwargs: dict[str, Any] = {}
        self._writer_lock_path: Path | None = None
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
                self._writer_lock_path = Path(f"{parsed.database}.writer-lock")
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", functools.partial(_sqlite_pragmas, full_sync=fsync_each_commit))
            event.listen(self.engine, "begin", _sqlite_begin)
        else:
            # A server restarted or a connection dropped by a firewall while the daemon idled: the pool
            # notices before handing it out, instead of the next transaction failing. Only a connection
            # that lay idle is asked (SQLAlchemy's pool_pre_ping asks at every checkout: one more round trip
            # for each of a busy daemon's many small transactions, which cost little more than that).
            event.listen(self.engine, "checkin", _note_checkin)
            event.listen(
                self.engine.pool, "checkout", functools.partial(_ping_after_idle, self.engine, ping_after_idle_seconds)
            )
            if self.is_postgres and not fsync_each_commit:
                event.listen(self.engine, "connect", _postgres_commit_without_flush)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._executor: ThreadPoolExecutor | None = None
        self._writer_lock_fd: int | None = None

    @contextlib.contextmanager
    def unit_of_work(self) -> Iterator[Session]:
        """One transaction: commit on normal exit, rollback on any exception."""
        with self._writer_turn(), self._sessions() as session, session.begin():
            # A write transaction takes SQLite's write lock up front (BEGIN IMMEDIATE): it waits its turn
            # (busy timeout) instead of failing when another process commits between its first read and
            # its first write (SQLITE_BUSY_SNAPSHOT, which the busy timeout does not cover).
            session.connection(execution_options={WRITE_OPTION: True})
            yield session

    def held_writer(self) -> HeldWriter:
        """A connection kept for a run of small write transactions (see `HeldWriter`); close it after."""
        return HeldWriter(self)

    @contextlib.contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """SQLite writers (the intake, the outbox sender's process, a CLI command) queue on a file lock.
        SQLite's own busy handler polls with sleeps of 1 to 100 ms, which costs a busy daemon most of its
        throughput once two writers commit often; a blocked flock is handed over the moment it is freed."""
        if self._writer_lock_path is None:
            yield
            return
        if self._writer_lock_fd is None:
            self._writer_lock_fd = os.open(self._writer_lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._writer_lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._writer_lock_fd, fcntl.LOCK_UN)

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
            if self.is_postgres:
                # Several instances started at once on a new database: one migrates, the others wait for it
                # (and then find nothing left to do) instead of failing on the tables it creates.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATIONS_LOCK})
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")

    def upgrade_in_child(self, meanwhile: Callable[[], None] | None = None) -> None:
        """`upgrade()` in a short-lived child process. Alembic brings Mako and Pygments along, about
        13 MiB that a process keeps once it has imported them; a daemon that migrates at its first start
        should not carry them for the rest of its life (a current schema never imports Alembic).
        `meanwhile` runs here while the child migrates: start-up work that needs no database."""
        if self.schema_revision() == SCHEMA_HEAD:
            return
        # The URL goes through stdin (it may hold a password: not in the process list); the child gets
        # our sys.path, so it imports this very mailbridge however we were started.
        # Written and closed before the child starts (a pipe takes a URL at once), so the child reads it
        # whole while `meanwhile` runs.
        url_out, url_in = os.pipe()
        with os.fdopen(url_in, "w") as pipe:
            pipe.write(self.url)
        with os.fdopen(url_out) as url:
            child = subprocess.Popen(
                [sys.executable, "-c", _UPGRADE_FROM_STDIN],
                stdin=url,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            _, stderr = child.communicate()
        if child.returncode != 0:
            raise MigrationError(f"upgrading the database schema failed:\n{stderr.strip()[-3000:]}")
        log.info("database schema upgraded to %s (in a child process)", SCHEMA_HEAD)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._writer_lock_fd is not None:
            os.close(self._writer_lock_fd)
            self._writer_lock_fd = None
        self.engine.dispose()


class HeldWriter:
    """One connection kept for a burst of small write transactions, each a Core transaction of its own:
    the outbox sender's outcome commits, a few hundred a second, each of one or a few short UPDATEs. An ORM
    Session and a pool checkout for each of them cost more CPU than the statements and SQLite's commit.

    Opened at its first transaction and kept until `close()`, so hold it for a burst, not across idle
    time (a PostgreSQL connection that lay idle is checked at checkout; a held one is not). After a failed
    transaction the connection is let go, and the next transaction checks out a fresh one."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._connection: Connection | None = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """Like `Database.unit_of_work()` (the writers' turn, BEGIN IMMEDIATE on SQLite), on Core."""
        with self._db._writer_turn():
            if self._connection is None:
                self._connection = self._db.engine.connect()
                self._connection.execution_options(**{WRITE_OPTION: True})
            try:
                with self._connection.begin():
                    yield self._connection
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            connection.close()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any, *, full_sync: bool = True) -> None:
    # Python's sqlite3 (before 3.12) opens transactions itself, but not before SAVEPOINT: a savepoint
    # outside a transaction becomes one, and RELEASE commits it. We take over BEGIN (the SQLAlchemy
    # recipe), so a batch is one atomic transaction and each mail's savepoint is just a savepoint.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets `mailbridge status` read while the daemon writes; FULL makes a commit survive a power cut,
    # which matters because the IMAP move that follows it cannot be undone.
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL (for the outbox sender's "sent" marks) still survives a killed process; only a power cut
    # may lose the last commits, and then a few acknowledgements go out again with their Message-IDs.
    cursor.execute("PRAGMA synchronous=FULL" if full_sync else "PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    if record is not None:
        record.info["checked_in_at"] = time.monotonic()


def _ping_after_idle(engine: Engine, idle_seconds: float, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    checked_in_at = record.info.get("checked_in_at")
    if checked_in_at is None or time.monotonic() - checked_in_at < idle_seconds:
        return  # a new connection, or one in use a moment ago
    dbapi_error = engine.dialect.loaded_dbapi.Error
    try:
        engine.dialect.do_ping(dbapi_connection)
    except dbapi_error as exc:
        if not engine.dialect.is_disconnect(exc, dbapi_connection, None):
            raise
        # The pool drops this connection and hands out a new one (SQLAlchemy's "pessimistic" recipe).
        raise DisconnectionError(str(exc)) from exc


def _postgres_commit_without_flush(dbapi_connection: Any, _record: Any) -> None:
    # The same promise as SQLite's synchronous=NORMAL for the connections that write only small marks (the
    # outbox sender's "sent", lease renewals): a commit returns before its WAL is flushed. A crash of the
    # server (not of the daemon) may lose the last fraction of a second of them, and then a few
    # acknowledgements go out again with their Message-IDs; the intake's commits still wait for the flush.
    # Without this, each of the sender's commits waits for an fsync, and its SMTP sessions wait for them.
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO off")
    dbapi_connection.commit()


def _sqlite_begin(connection: Any) -> None:
    immediate = connection.get_execution_options().get(WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
