"""The store stage writes exactly what it wrote before its inserts were made cheaper (ids drawn before the
INSERT instead of `INSERT … RETURNING`, the ticket number in the INSERT instead of an UPDATE after it, Core
executemany instead of the ORM's bulk INSERT): random batches are stored by the code of today and by the
code before (kept here as the reference), each into a database of its own, and every row compared."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, delete, func, insert, select, update
from sqlalchemy.orm import DeclarativeBase, Session

from mailbridge import lifecycle, receipts, tickets
from mailbridge.config import TicketSettings
from mailbridge.customers import Organisation
from mailbridge.db import Database
from mailbridge.ingest.mail import Address, ParsedMail, Part
from mailbridge.ingest.raw import RawMail
from mailbridge.models import (
    Article,
    Attachment,
    MailKind,
    Outcome,
    Receipt,
    Ticket,
    TicketEvent,
    TicketParticipant,
    TicketStatus,
    db_text,
    db_text_or_none,
)
from mailbridge.routing import Decision
from tests.support.postgres import PostgresCluster

NOW = datetime(2026, 12, 1, 21, 30, 15, 123456, tzinfo=UTC)
OWN = {"support@helpdesk.example"}
AGENTS = {"anna@helpdesk.example"}
WRITTEN = (
    "contacts",
    "tickets",
    "articles",
    "attachments",
    "ticket_participants",
    "ticket_events",
    "receipts",
)


@pytest.fixture
def two_databases(database_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[Database]]:
    """Two empty databases of the backend under test, brought up to date."""
    if database_backend == "postgresql":
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        urls = [cluster.create_database(), cluster.create_database()]
    else:
        urls = [f"sqlite:///{tmp_path / 'today.db'}", f"sqlite:///{tmp_path / 'before.db'}"]
    databases = [Database(url) for url in urls]
    for db in databases:
        db.upgrade()
    yield databases
    for db in databases:
        db.engine.dispose()
    if database_backend == "postgresql":
        for url in urls:
            cluster.drop_database(url.rsplit("/", 1)[1])


def test_random_batches_are_stored_as_the_code_before_stored_them(
    two_databases: list[Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    today, before = two_databases
    monkeypatch.setattr(tickets, "utcnow", lambda: NOW)
    settings = TicketSettings()
    rng = random.Random(20261201)
    opened: list[int] = []  # ticket ids, the same in both databases (checked below)
    returned: dict[str, list[list[tickets.Stored]]] = {"today": [], "before": []}
    for batch_number in range(60):
        items = [_incoming(rng, batch_number, index, opened) for index in range(rng.randint(1, 30))]
        for name, db in (("today", today), ("before", before)):
            with db.unit_of_work() as session, monkeypatch.context() as code:
                if name == "before":  # the ORM's bulk INSERT, as before
                    code.setattr(lifecycle, "insert_rows", _orm_insert)
                    code.setattr(receipts, "insert_rows", _orm_insert)
                store = tickets.store if name == "today" else _store_before
                stored = store(session, items, settings)
                _after(session, items, stored)
            returned[name].append(stored)
        assert returned["today"][-1] == returned["before"][-1]
        opened += [s.ticket_id for s in returned["today"][-1] if s.new_ticket]
        if rng.random() < 0.2:  # the newest ticket deleted: SQLite gives its id to the next one
            for db in (today, before):
                with db.unit_of_work() as session:
                    _delete_newest_ticket(session)
            opened = [i for i in opened if i in _ticket_ids(today)]
    assert sum(len(batch) for batch in returned["today"]) > 600
    assert _rows(today) == _rows(before)
    numbers = _rows(today)["tickets"]
    assert all(row["number"] == tickets.ticket_number(settings, row["id"]) for row in numbers)


def test_ids_are_those_the_database_gives_next(two_databases: list[Database]) -> None:
    """Drawn ids do not collide with a row the database numbers itself afterwards (another writer that
    inserts without an id, such as a later version of this code or a tool)."""
    db = two_databases[0]
    settings = TicketSettings()
    rng = random.Random(7)
    with db.unit_of_work() as session:
        stored = tickets.store(session, [_incoming(rng, 0, i, []) for i in range(5)], settings)
        contact = session.scalar(select(func.min(Ticket.customer_id)))
        own = session.execute(
            insert(Ticket).returning(Ticket.id),
            [{"subject": "by the database", "customer_id": contact, "mailbox": "x"}],
        ).scalar_one()
        after = tickets.store(session, [_incoming(rng, 1, 0, [])], settings)
    ids = [s.ticket_id for s in stored]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert max(ids) < own < after[0].ticket_id


# --- the random batches ----------------------------------------------------------------------------


def _incoming(rng: random.Random, batch_number: int, index: int, opened: Sequence[int]) -> tickets.Incoming:
    key = f"{batch_number}-{index}"
    sender = None if rng.random() < 0.05 else _address(rng)
    mail = ParsedMail(
        subject=rng.choice(["", "Faktura 12/2026", "Проблема с доступом", "Re: order\x00 #5", "\udc80 broken"]),
        sender=sender,
        to=(*(_address(rng) for _ in range(rng.randint(0, 3))), Address("", "support@helpdesk.example")),
        cc=tuple(_address(rng) for _ in range(rng.choice([0, 0, 1, 2]))),
        reply_to=tuple(_address(rng) for _ in range(rng.choice([0, 0, 1]))),
        date=rng.choice([None, NOW - timedelta(days=rng.randint(0, 900), microseconds=rng.randint(0, 10**6))]),
        message_id=rng.choice([None, f"{key}@mail.example", "x" * 1200]),
        in_reply_to=rng.choice([None, f"parent-{key}@mail.example"]),
        references=tuple(f"ref-{n}@mail.example" for n in range(rng.choice([0, 0, 2]))),
        text=rng.choice(["", "Dzień dobry,\nfaktura w załączniku.", "text\x00with NUL", "a" * 3000]),
        html=rng.choice([None, "<p>Hello</p>"]),
        attachments=tuple(_part(rng, f"{key}-{n}") for n in range(rng.choice([0, 0, 1, 3]))),
        body_parts=1,
        defects=tuple(rng.sample(["MissingHeaderBodySeparatorDefect: text/plain", "CharsetGuessed: cp1250"], 1))
        if rng.random() < 0.2
        else (),
        headers=(("subject", "x"),),
        raw_sha256=hashlib.sha256(key.encode()).hexdigest(),
        raw_size=rng.randint(100, 10**7),
        dedup_key=hashlib.sha256(b"dedup " + key.encode()).hexdigest(),
        new_text=rng.choice([None, "", "only the new part"]),
    )
    reply_to_ticket = rng.choice(opened) if opened and rng.random() < 0.3 else None
    return tickets.Incoming(
        RawMail(
            rng.choice(["support", "sales"]),
            f"imap://support/INBOX;UID={key}",
            b"",
            source_key=rng.choice([None, f"support/7/{key}"]),
            uidvalidity=7,
            uid=index + 1,
        ),
        mail,
        kind=rng.choice([MailKind.HUMAN, MailKind.HUMAN, MailKind.AUTO_REPLY, MailKind.BOUNCE]),
        no_answer_reason=rng.choice([None, "an auto-reply", "flagged for triage: x"]),
        ticket_id=reply_to_ticket,
        linked_ticket_id=rng.choice(opened) if opened and reply_to_ticket is None and rng.random() < 0.1 else None,
        triage_reason=rng.choice([None, None, "a stranger's follow-up"]),
        routing=None if reply_to_ticket is not None or rng.random() < 0.4 else _decision(rng),
    )


def _address(rng: random.Random) -> Address:
    name = rng.choice(["", "Jan Kowalski", "Ольга", '"Quoted, Name"'])
    return Address(name, f"{rng.choice(['jan', 'olga', 'Mixed.Case', 'x'])}{rng.randint(0, 40)}@klient.example")


def _part(rng: random.Random, key: str) -> Part:
    return Part(
        filename=rng.choice(["faktura.pdf", "zdjęcie.jpg", "x" * 300]),
        content_type=rng.choice(["application/pdf", "image/jpeg"]),
        size=rng.randint(0, 10**6),
        sha256=hashlib.sha256(key.encode()).hexdigest(),
        content_id=rng.choice([None, f"{key}@cid"]),
        inline=rng.random() < 0.3,
    )


def _decision(rng: random.Random) -> Decision:
    return Decision(
        queue=rng.choice([None, "billing", "general"]),
        priority=rng.choice([None, "P1", "P3"]),
        owner=rng.choice([None, "anna@helpdesk.example"]),
        tags=tuple(rng.sample(["vip", "invoice", "pl"], rng.randint(0, 2))),
        confidence=rng.choice([1.0, 0.5]),
        triage_reason=rng.choice([None, None, "rules disagree"]),
        organisation=rng.choice([None, Organisation("Kancelaria Żak", "enterprise")]),
        rule_names=("r1",),
        customer_source="directory",
    )


def _after(session: Session, items: Sequence[tickets.Incoming], stored: Sequence[tickets.Stored]) -> None:
    """What the pipeline writes after the store stage: participants, events, receipts."""
    lifecycle.after_store(session, items, stored, AGENTS, OWN, NOW)
    receipts.add(
        session,
        [
            receipts.NewReceipt(item.raw, Outcome.STORED, item.mail.raw_sha256, item.mail.message_id, s.article_id)
            for item, s in zip(items, stored, strict=True)
            if item.raw.source_key is not None
        ],
    )


def _delete_newest_ticket(session: Session) -> None:
    newest = session.scalar(select(func.max(Ticket.id)))
    articles = select(Article.id).where(Article.ticket_id == newest).scalar_subquery()
    session.execute(delete(Receipt).where(Receipt.article_id.in_(articles)))
    session.execute(delete(Attachment).where(Attachment.article_id.in_(articles)))
    session.execute(delete(TicketParticipant).where(TicketParticipant.ticket_id == newest))
    session.execute(delete(TicketEvent).where(TicketEvent.ticket_id == newest))
    session.execute(update(Ticket).where(Ticket.linked_ticket_id == newest).values(linked_ticket_id=None))
    session.execute(delete(Article).where(Article.ticket_id == newest))
    session.execute(delete(Ticket).where(Ticket.id == newest))


def _ticket_ids(db: Database) -> set[int]:
    with db.reader() as session:
        return set(session.scalars(select(Ticket.id)))


def _rows(db: Database) -> dict[str, list[dict[str, Any]]]:
    """Every row the store stage and its followers wrote; what the clock or the server fills in (a receipt's
    time of insert, an event's transaction on PostgreSQL) only checked to be there."""
    metadata = MetaData()
    with db.engine.connect() as connection:
        metadata.reflect(connection, only=list(WRITTEN))
        found = {
            name: [dict(row._mapping) for row in connection.execute(select(table).order_by(*table.primary_key.columns))]
            for name, table in metadata.tables.items()
        }
    for receipt in found["receipts"]:
        assert isinstance(receipt.pop("created_at"), datetime | str)
    for event in found["ticket_events"]:
        assert event.pop("xact_id") is not None or not db.is_postgres  # NULL on SQLite
    return found


# --- the code before (848d725), the reference ------------------------------------------------------


def _orm_insert(session: Session, model: type[DeclarativeBase], rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        session.execute(insert(model), list(rows))


def _store_before(
    session: Session, items: Sequence[tickets.Incoming], settings: TicketSettings
) -> list[tickets.Stored]:
    now = tickets.utcnow()
    opening = [item for item in items if item.ticket_id is None]
    senders = [item.mail.sender or tickets.UNKNOWN_SENDER for item in opening]
    contact_ids = tickets._contacts(session, senders, now) if opening else {}
    new_ids = (
        _insert_ids_before(
            session,
            Ticket,
            [
                {
                    "status": TicketStatus.NEW,
                    "subject": db_text(item.mail.subject),
                    "customer_id": contact_ids[tickets.contact_key(sender)],
                    "mailbox": item.raw.mailbox,
                    "created_at": now,
                    "updated_at": now,
                    "linked_ticket_id": item.linked_ticket_id,
                    "triage_reason": db_text_or_none(
                        item.triage_reason or (item.routing.triage_reason if item.routing else None)
                    ),
                    **tickets._routing_columns(item.routing),
                }
                for item, sender in zip(opening, senders, strict=True)
            ],
        )
        if opening
        else []
    )
    numbers = {ticket_id: tickets.ticket_number(settings, ticket_id) for ticket_id in new_ids}
    if numbers:
        session.execute(update(Ticket), [{"id": i, "number": n} for i, n in numbers.items()])
    existing = [item.ticket_id for item in items if item.ticket_id is not None]
    if existing:
        numbers.update(
            (i, n or "") for i, n in session.execute(select(Ticket.id, Ticket.number).where(Ticket.id.in_(existing)))
        )
        session.execute(update(Ticket).where(Ticket.id.in_(existing)).values(updated_at=now))
    opened = iter(new_ids)
    ticket_ids = [item.ticket_id if item.ticket_id is not None else next(opened) for item in items]
    article_ids = _insert_ids_before(
        session,
        Article,
        [
            {key: value for key, value in tickets._article_row(item, 0, ticket_id, now).items() if key != "id"}
            for item, ticket_id in zip(items, ticket_ids, strict=True)
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
        session.execute(insert(Attachment), attachments)
    return [
        tickets.Stored(article_id, numbers[ticket_id] or "", ticket_id, item.ticket_id is None)
        for item, article_id, ticket_id in zip(items, article_ids, ticket_ids, strict=True)
    ]


def _insert_ids_before(session: Session, table: Any, rows: list[dict[str, Any]]) -> list[int]:
    statement = insert(table).returning(table.id, sort_by_parameter_order=True).execution_options(render_nulls=True)
    return list(session.execute(statement, rows).scalars())
