"""The report's read-only queries: narrow rows over the period's tickets, grouped in SQL where SQL groups
cheaply and counted in Python where it does not.

SQLite groups by sorting every row (about 3 s for a million tickets by queue, mailbox and owner);
streaming the few narrow columns and counting them with `collections.Counter` costs less, and one pass
gives every count. Instants come back as UNIX seconds computed by the database, so a million
timestamps are never parsed in Python.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, Float, Integer, and_, case, func, or_, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from mailbridge.models import Ticket, TicketEvent, TicketStatus

_UNIXEPOCH = sqlite3.sqlite_version_info >= (3, 38, 0)
REOPENED_FROM = (TicketStatus.WAITING_CUSTOMER, TicketStatus.WAITING_THIRD_PARTY, TicketStatus.CLOSED)

# Bits of the per-ticket flags column.
AUTO_CLOSED, TRIAGED, FR_MET, FR_BREACHED, RES_MET, RES_BREACHED = (1 << n for n in range(6))


class epoch_seconds(FunctionElement[float]):
    """UNIX seconds of a UTC datetime column."""

    type = Float()
    inherit_cache = True


class epoch_hour(FunctionElement[int]):
    """Whole hours since the UNIX epoch (UTC): what the per-day chart groups by."""

    type = Integer()
    inherit_cache = True


@compiles(epoch_seconds, "sqlite")
def _epoch_sqlite(element: epoch_seconds, compiler: SQLCompiler, **kw: Any) -> str:
    return _sqlite_epoch(compiler.process(element.clauses, **kw))


def _sqlite_epoch(column: str) -> str:
    # Whole seconds, enough for a help desk; unixepoch() (SQLite 3.38) reads a million dates in half the
    # time of strftime().
    return f"unixepoch({column})" if _UNIXEPOCH else f"CAST(strftime('%s', {column}) AS INTEGER)"


@compiles(epoch_seconds, "postgresql")
def _epoch_postgresql(element: epoch_seconds, compiler: SQLCompiler, **kw: Any) -> str:
    # EXTRACT gives numeric (Decimal in Python, and slow to turn into numpy floats): float8, as SQLite's.
    return f"CAST(FLOOR(EXTRACT(EPOCH FROM {compiler.process(element.clauses, **kw)})) AS DOUBLE PRECISION)"


@compiles(epoch_hour, "sqlite")
def _hour_sqlite(element: epoch_hour, compiler: SQLCompiler, **kw: Any) -> str:
    return f"{_sqlite_epoch(compiler.process(element.clauses, **kw))} / 3600"


@compiles(epoch_hour, "postgresql")
def _hour_postgresql(element: epoch_hour, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST(FLOOR(EXTRACT(EPOCH FROM {compiler.process(element.clauses, **kw)}) / 3600) AS INTEGER)"


def _bit(condition: ColumnElement[bool], bit: int) -> ColumnElement[int]:
    return case((condition, bit), else_=0)


def _flags(now: datetime, triage_queue: str) -> ColumnElement[int]:
    """What each ticket counts towards, as one small integer (met/breached per SLA target: the target is
    met when done by its deadline, or done while the clock had not yet run out (the planner then leaves
    no deadline); breached when done late, or not done and past the deadline)."""
    t = Ticket
    return (
        _bit(and_(t.status == TicketStatus.CLOSED, t.first_response_at.is_(None)), AUTO_CLOSED)
        + _bit(or_(t.queue == triage_queue, t.triage_reason.is_not(None)), TRIAGED)
        + _met(t.first_response_at, t.first_response_due_at, FR_MET)
        + _breached(t.first_response_at, t.first_response_due_at, now, FR_BREACHED)
        + _met(t.closed_at, t.resolution_due_at, RES_MET)
        + _breached(t.closed_at, t.resolution_due_at, now, RES_BREACHED)
    )


def _met(done: Any, due: Any, bit: int) -> ColumnElement[int]:
    return _bit(and_(done.is_not(None), or_(due.is_(None), done <= due)), bit)


def _breached(done: Any, due: Any, now: datetime, bit: int) -> ColumnElement[int]:
    return _bit(or_(done > due, and_(done.is_(None), due <= now)), bit)


def _in(column: Any, start: datetime, end: datetime, queue: str | None) -> list[ColumnElement[bool]]:
    where = [column >= start, column < end]
    return [*where, Ticket.queue == queue] if queue is not None else where


def _opened_in(session: Session, start: datetime, end: datetime, queue: str | None) -> list[ColumnElement[bool]]:
    """Tickets opened in the period, as a range of ids as well. Tickets are numbered in the order they
    are stored, so the period's tickets are one stretch of the table: read in id order, they cost a
    sequential read, where going through the created_at index costs a lookup per ticket (twice as much
    for a year). The ids' range comes from that index alone."""
    first, last = session.execute(
        select(func.min(Ticket.id), func.max(Ticket.id)).where(*_in(Ticket.created_at, start, end, None))
    ).one()
    if first is None:
        return [Ticket.id.is_(None)]
    return [Ticket.id.between(first, last), *_in(Ticket.created_at, start, end, queue)]


def _raw(session: Session, statement: Any) -> Any:
    """The DBAPI cursor of a Core statement. Building a SQLAlchemy Row costs more than reading it
    (6 s instead of 2 for a million); the columns read this way are text, numbers and epochs, which
    need no conversion by SQLAlchemy."""
    return session.connection().execute(statement).cursor


def opened_groups(
    session: Session, start: datetime, end: datetime, queue: str | None, now: datetime, triage_queue: str
) -> Counter[tuple[Any, ...]]:
    """Tickets opened in the period, counted by (queue, mailbox, owner, SLA priority (planned tickets
    only), tier, flags). Counted in Python: SQLite would sort the million rows to group them."""
    t = Ticket
    return Counter(
        _raw(
            session,
            select(
                t.queue,
                t.mailbox,
                t.owner,
                case((t.sla_policy.is_not(None), t.sla_priority)),
                t.tier,
                _flags(now, triage_queue),
            ).where(*_opened_in(session, start, end, queue)),
        )
    )


def opened_instants(session: Session, start: datetime, end: datetime, queue: str | None) -> np.ndarray[Any, Any]:
    """(created, first response, closed) of each ticket opened in the period, as UNIX seconds (NaN: not yet)."""
    t = Ticket
    # -1 for "not yet": numpy reads a flat stream of numbers faster than tuples holding None.
    columns = [
        epoch_seconds(t.created_at),
        *(func.coalesce(epoch_seconds(c), -1) for c in (t.first_response_at, t.closed_at)),
    ]
    cursor = _raw(session, select(*columns).where(*_opened_in(session, start, end, queue)))
    instants = np.fromiter(itertools.chain.from_iterable(cursor), dtype=float).reshape(-1, 3)
    instants[instants < 0] = np.nan
    return instants


def closed_groups(session: Session, start: datetime, end: datetime, queue: str | None) -> Counter[tuple[Any, ...]]:
    """Tickets closed in the period (whenever they were opened), by (queue, mailbox, owner)."""
    t = Ticket
    return Counter(_raw(session, select(t.queue, t.mailbox, t.owner).where(*_in(t.closed_at, start, end, queue))))


def closed_per_hour(session: Session, start: datetime, end: datetime, queue: str | None) -> Counter[int]:
    hour = epoch_hour(Ticket.closed_at)
    rows = _raw(session, select(hour, func.count()).where(*_in(Ticket.closed_at, start, end, queue)).group_by(hour))
    return Counter(dict(rows.fetchall()))


def backlog(session: Session, queue: str | None, bounds: Sequence[datetime]) -> Sequence[Any]:
    """Tickets not closed, by status and age bucket (index of the first bound their creation is after)."""
    t = Ticket
    bucket = case(*((t.created_at > bound, index) for index, bound in enumerate(bounds)), else_=len(bounds))
    where = [t.status != TicketStatus.CLOSED] + ([t.queue == queue] if queue is not None else [])
    return session.execute(select(t.status, bucket, func.count()).where(*where).group_by(t.status, bucket)).all()


def reopened(session: Session, start: datetime, end: datetime, queue: str | None) -> Sequence[Any]:
    """(ticket, the status it came back to open from) for the tickets opened in the period."""
    e, t = TicketEvent, Ticket
    statement = (
        select(e.ticket_id, e.old)
        .join(t, t.id == e.ticket_id)
        .where(e.kind == "status", e.new == TicketStatus.OPEN, e.old.in_(REOPENED_FROM))
        .where(*_in(t.created_at, start, end, queue))
    )
    return list(_raw(session, statement).fetchall())
