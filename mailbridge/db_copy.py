"""`mailbridge db migrate-to URL`: an SQLite installation copied into an empty PostgreSQL database.

The target is migrated to the newest schema by the same Alembic migrations, then every table is copied
in foreign-key order, in batches, through the models' column types (so UTC instants, JSON and raw bytes
come out on the other side as they went in). All of it is one transaction on the target: a copy that
fails leaves no half-filled database behind. Then the sequences are set past the copied ids and the rows
are counted again on both sides.

The source is read in one transaction, a snapshot: what the daemon commits after the copy began is not
in it, which is why the daemon is stopped first. Raw mails and attachments are files in the blob store
(storage.path), not rows: they stay where they are, and the PostgreSQL installation uses the same storage.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Connection, Table, bindparam, func, insert, inspect, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from mailbridge.db import Database
from mailbridge.models import Base, TicketEvent

BATCH_ROWS = 2000


class CopyError(Exception):
    """The copy cannot start or did not complete; the message says why, and the target is left as it was."""


@dataclass(frozen=True)
class CopySummary:
    rows: dict[str, int]  # per table, in the order copied

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def check_target_url(url: str) -> None:
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        raise CopyError("not a database URL: give postgresql+psycopg://user:password@host:5432/name") from None
    if backend != "postgresql":
        raise CopyError(f"the target must be a PostgreSQL database (postgresql+psycopg://…), not {backend}")


def copy_database(
    source: Database, target: Database, progress: Callable[[str, int], None] = lambda table, rows: None
) -> CopySummary:
    """Copy every row of `source` into the empty `target` (migrated to the newest schema first)."""
    if source.url == target.url:
        raise CopyError("the target is the configured database itself")
    _refuse_a_filled_target(target)
    target.upgrade()
    tables = Base.metadata.sorted_tables
    copied: dict[str, int] = {}
    with source.reader() as reading, target.engine.begin() as writing:
        read = reading.connection()
        # The target was empty before its upgrade: whatever is in it now the migrations seeded (e.g. the
        # crm_health row), and the source has its own version of those rows.
        for table in reversed(tables):
            writing.execute(table.delete())
        for table in tables:
            copied[table.name] = _copy_table(read, writing, table, functools.partial(progress, table.name))
        for table in tables:
            _restart_sequence(writing, table)
        expected = {table.name: _count(read, table) for table in tables}
        found = {table.name: _count(writing, table) for table in tables}
        if found != expected or copied != expected:
            wrong = ", ".join(
                f"{name}: {expected[name]} in the source, {found[name]} in the target"
                for name in expected
                if found[name] != expected[name] or copied[name] != expected[name]
            )
            raise CopyError(f"row counts differ after the copy ({wrong}); nothing was committed")
    return CopySummary(rows=copied)


def _refuse_a_filled_target(target: Database) -> None:
    try:
        with target.engine.connect() as connection:
            existing = set(inspect(connection).get_table_names())
            filled = {
                table.name: n
                for table in Base.metadata.sorted_tables
                if table.name in existing and (n := _count(connection, table))
            }
    except DBAPIError as exc:
        raise CopyError(f"cannot reach the target database: {exc.orig or exc}") from None
    if filled:
        shown = ", ".join(f"{name} ({n} rows)" for name, n in filled.items())
        raise CopyError(f"the target database is not empty: {shown}. migrate-to copies into an empty database only")


def _copy_table(read: Connection, write: Connection, table: Table, progress: Callable[[int], None]) -> int:
    # A ticket may point at a later ticket (merged into it): those columns are filled once all rows are in.
    deferred = [fk.parent for fk in table.foreign_keys if fk.column.table is table]
    links: list[dict[str, Any]] = []
    copied = 0
    for batch in _batches(read, table):
        rows = [dict(row._mapping) for row in batch]
        links += [
            {"row_id": row["id"], **{f"new_{c.name}": row[c.name] for c in deferred}}
            for row in rows
            if any(row[c.name] is not None for c in deferred)
        ]
        try:
            write.execute(insert(table), [_prepared(table, row, deferred) for row in rows])
        except DBAPIError as exc:
            raise CopyError(f"table {table.name}: a row was refused: {exc.orig or exc}") from None
        copied += len(rows)
        progress(copied)
    if links:
        write.execute(
            update(table)
            .where(table.c.id == bindparam("row_id"))
            .values({c.name: bindparam(f"new_{c.name}") for c in deferred}),
            links,
        )
    return copied


def _prepared(table: Table, row: dict[str, Any], deferred: Sequence[Column[Any]]) -> dict[str, Any]:
    for column in deferred:
        row[column.name] = None
    if table is TicketEvent.__table__:
        # Committed before the move: the SLA planner reads them as history, before anything new (0011).
        row["xact_id"] = 0
    return row


def _batches(read: Connection, table: Table) -> Iterator[Sequence[Any]]:
    """The rows in primary-key order, a batch at a time (keyset pagination: no OFFSET that rereads)."""
    key = list(table.primary_key.columns)
    if len(key) != 1:
        raise CopyError(f"table {table.name}: no single-column primary key to copy it by")
    column = key[0]
    last: Any = None
    while True:
        statement = select(table).order_by(column).limit(BATCH_ROWS)
        if last is not None:
            statement = statement.where(column > last)
        batch = read.execute(statement).all()
        if not batch:
            return
        yield batch
        last = getattr(batch[-1], column.name)


def _restart_sequence(write: Connection, table: Table) -> None:
    """Rows were inserted with their ids: the sequence behind `id` must hand out the next one after them."""
    if "id" not in table.c or table.c.id.autoincrement not in (True, "auto"):
        return
    sequence = write.scalar(text("SELECT pg_get_serial_sequence(:table, 'id')"), {"table": table.name})
    if sequence is None:
        return
    next_id = (write.scalar(select(func.max(table.c.id))) or 0) + 1
    write.execute(text("SELECT setval(:sequence, :next_id, false)"), {"sequence": sequence, "next_id": next_id})


def _count(connection: Connection, table: Table) -> int:
    return int(connection.scalar(select(func.count()).select_from(table)) or 0)
