"""Store stage: parsed mails become tickets, each with the mail as its first article.

Threading (replies onto existing tickets) and routing come in as stages before this one; here every
new mail opens a ticket. Stages receive the session and never commit: the pipeline owns the transaction.
A batch is written with a handful of multi-row INSERTs, not a round of ORM flushes per mail: at a
backlog the database thread is the busiest part of the daemon.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.orm import Session

from mailbridge.config import TicketSettings
from mailbridge.db import chunked, insert_missing, insert_rows
from mailbridge.ingest.mail import Address, ParsedMail
from mailbridge.ingest.raw import RawMail
from mailbridge.models import (
    Article,
    Attachment,
    Base,
    Contact,
    Direction,
    MailKind,
    Ticket,
    TicketStatus,
    db_text,
    db_text_or_none,
    utcnow,
)
from mailbridge.routing import Decision

UNKNOWN_SENDER = Address(name="Unknown sender", address="unknown-sender@invalid")


@dataclass(frozen=True, slots=True)
class Stored:
    article_id: int
    ticket: str
    ticket_id: int = 0
    new_ticket: bool = True


@dataclass(frozen=True, slots=True)
class Incoming:
    """A mail to store: on a new ticket, or (`ticket_id`) on one it belongs to."""

    raw: RawMail
    mail: ParsedMail
    kind: str = MailKind.HUMAN
    no_answer_reason: str | None = None
    ticket_id: int | None = None
    linked_ticket_id: int | None = None  # a new ticket that continues (or claimed) this one
    triage_reason: str | None = None
    routing: Decision | None = None  # for a new ticket


def ticket_number(settings: TicketSettings, ticket_id: int) -> str:
    return f"{settings.number_prefix}-{ticket_id:0{settings.number_digits}d}"


def find_articles(session: Session, dedup_keys: Iterable[str]) -> dict[str, Stored]:
    """The articles already holding these mails (by dedup key)."""
    found: dict[str, Stored] = {}
    for chunk in chunked(list(set(dedup_keys))):
        rows = session.execute(
            select(Article.dedup_key, Article.id, Ticket.number, Ticket.id)
            .join(Ticket, Ticket.id == Article.ticket_id)
            .where(Article.dedup_key.in_(chunk))
        )
        found.update(
            {
                key: Stored(article_id, number or "", ticket_id, False)
                for key, article_id, number, ticket_id in rows
                if key
            }
        )
    return found


def store(session: Session, items: Sequence[Incoming], settings: TicketSettings) -> list[Stored]:
    """Each mail as an article: on a new ticket (with its contact, found or created) or on the ticket
    given; with its attachments."""
    if not items:
        return []
    now = utcnow()
    opening = [item for item in items if item.ticket_id is None]
    senders = [item.mail.sender or UNKNOWN_SENDER for item in opening]
    contact_ids = _contacts(session, senders, now) if opening else {}
    new_ids = _new_ids(session, Ticket, len(opening))
    # The number comes from the id, which is known before the INSERT: no UPDATE after it.
    numbers = {ticket_id: ticket_number(settings, ticket_id) for ticket_id in new_ids}
    if opening:
        insert_rows(
            session,
            Ticket,
            [
                {
                    "id": ticket_id,
                    "number": numbers[ticket_id],
                    "status": TicketStatus.NEW,
                    "subject": db_text(item.mail.subject),
                    "customer_id": contact_ids[contact_key(sender)],
                    "mailbox": item.raw.mailbox,
                    "created_at": now,
                    "updated_at": now,
                    "linked_ticket_id": item.linked_ticket_id,
                    "triage_reason": db_text_or_none(
                        item.triage_reason or (item.routing.triage_reason if item.routing else None)
                    ),
                    **_routing_columns(item.routing),
                }
                for ticket_id, item, sender in zip(new_ids, opening, senders, strict=True)
            ],
        )
    existing = [item.ticket_id for item in items if item.ticket_id is not None]
    if existing:
        numbers.update(
            (i, n or "") for i, n in session.execute(select(Ticket.id, Ticket.number).where(Ticket.id.in_(existing)))
        )
        session.execute(update(Ticket).where(Ticket.id.in_(existing)).values(updated_at=now))
    opened = iter(new_ids)
    ticket_ids = [item.ticket_id if item.ticket_id is not None else next(opened) for item in items]
    article_ids = _new_ids(session, Article, len(items))
    insert_rows(
        session,
        Article,
        [
            _article_row(item, article_id, ticket_id, now)
            for item, article_id, ticket_id in zip(items, article_ids, ticket_ids, strict=True)
        ],
    )
    attachments = [
        {
            "article_id": article_id,
            "filename": db_text(part.filename, 255),
            "content_type": db_text(part.content_type, 255),
            "size": part.size,
            "sha256": part.sha256,
            "content_id": db_text_or_none(part.content_id, 998),
            "inline": part.inline,
        }
        for item, article_id in zip(items, article_ids, strict=True)
        for part in item.mail.attachments
    ]
    if attachments:
        insert_rows(session, Attachment, attachments)
    return [
        Stored(article_id, numbers[ticket_id] or "", ticket_id, item.ticket_id is None)
        for item, article_id, ticket_id in zip(items, article_ids, ticket_ids, strict=True)
    ]


def _routing_columns(decision: Decision | None) -> dict[str, Any]:
    # Every row has the same columns (None where nothing was decided): see `insert_rows`.
    if decision is None:
        return {
            "queue": None,
            "priority": None,
            "owner": None,
            "tags": [],
            "routing_confidence": None,
            "organisation": None,
            "tier": None,
            "routing_reason": None,
        }
    return {
        "queue": decision.queue,
        "priority": decision.priority,
        "owner": db_text_or_none(decision.owner, 320),
        "tags": list(decision.tags),
        "routing_confidence": decision.confidence,
        "organisation": db_text_or_none(decision.organisation.name if decision.organisation else None, 200),
        "tier": db_text_or_none(decision.organisation.tier if decision.organisation else None, 32),
        "routing_reason": db_text(decision.summary),
    }


def contact_key(sender: Address) -> str:
    return db_text(sender.address.strip().lower(), 320)


def _contacts(session: Session, senders: Sequence[Address], now: datetime) -> dict[str, int]:
    names: dict[str, str] = {}
    for sender in senders:
        address = contact_key(sender)
        if not names.get(address):
            names[address] = db_text(sender.name, 500)
    rows = session.execute(
        select(Contact.address, Contact.id, Contact.name).where(Contact.address.in_(list(names)))
    ).all()
    ids: dict[str, int] = {address: contact_id for address, contact_id, _ in rows}
    new = [a for a in names if a not in ids]
    if new:
        # Another instance may be adding the same sender right now: its row is kept, ours skipped.
        insert_missing(session, Contact, [{"address": a, "name": names[a], "created_at": now} for a in new])
        rows_now = session.execute(select(Contact.address, Contact.id).where(Contact.address.in_(new))).all()
        ids.update({address: contact_id for address, contact_id in rows_now})
    # A contact first seen without a display name gets the one a later mail shows.
    unnamed = [{"b_id": contact_id, "b_name": names[a]} for a, contact_id, name in rows if not name and names[a]]
    if unnamed:
        contacts = Contact.__table__
        assert isinstance(contacts, Table)
        session.execute(
            update(contacts).where(contacts.c.id == bindparam("b_id")).values(name=bindparam("b_name")), unnamed
        )
    return ids


def _new_ids(session: Session, model: type[Base], count: int) -> list[int]:
    """Ids for `count` new rows of `model`'s table, the ones the database would give them, in order.

    Known before the INSERT, they need no `RETURNING`, which SQLite did one row per statement (SQLAlchemy
    cannot match the rows of a multi-row `INSERT … RETURNING` to its parameters there), and a ticket's
    number goes into its INSERT instead of an UPDATE after it: a backlog's database thread spent ~20 % less
    CPU per mail."""
    if count == 0:
        return []
    table = model.__table__
    assert isinstance(table, Table)
    if session.get_bind().dialect.name == "sqlite":
        # A write transaction holds SQLite's only write lock from its start (BEGIN IMMEDIATE): no other
        # insert comes between this and ours. An INTEGER PRIMARY KEY without AUTOINCREMENT (ours) is the
        # rowid, and SQLite gives a new row the largest rowid + 1.
        last = session.execute(select(func.max(table.c.id))).scalar_one_or_none() or 0
        return list(range(last + 1, last + 1 + count))
    # PostgreSQL: the serial column's sequence, as its default would have used it (concurrent inserts
    # of other instances take other numbers).
    sequence = func.pg_get_serial_sequence(table.name, "id")
    drawn = session.execute(select(func.nextval(sequence)).select_from(func.generate_series(1, count)))
    return sorted(drawn.scalars())


def _article_row(item: Incoming, article_id: int, ticket_id: int, now: datetime) -> dict[str, Any]:
    raw, mail = item.raw, item.mail
    return {
        "id": article_id,
        "ticket_id": ticket_id,
        "direction": Direction.INBOUND,
        "dedup_key": mail.dedup_key,
        "mailbox": raw.mailbox,
        "message_id": db_text_or_none(mail.message_id, 998),
        "in_reply_to": db_text_or_none(mail.in_reply_to),
        "references": [db_text(r) for r in mail.references],
        "subject": db_text(mail.subject),
        "from_name": db_text(mail.sender.name) if mail.sender else "",
        "from_address": contact_key(mail.sender) if mail.sender else "",
        "to": [a.as_json() for a in mail.to],
        "cc": [a.as_json() for a in mail.cc],
        "reply_to": [a.as_json() for a in mail.reply_to],
        "sent_at": mail.date,
        "text": db_text(mail.text),
        "html": db_text_or_none(mail.html),
        "raw_sha256": mail.raw_sha256,
        "raw_size": mail.raw_size,
        "defects": list(mail.defects),
        "kind": item.kind,
        "no_answer_reason": db_text_or_none(item.no_answer_reason),
        "new_text": db_text_or_none(mail.new_text),
        "created_at": now,
    }
