"""Receipts: one row per mail taken from a source, written in the same transaction as the ticket.

The receipt is what makes a mail fetched twice (after a crash, before the server was told) a no-op,
and what `mailbridge status` reconciles with what the server holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mailbridge.db import chunked, insert_rows
from mailbridge.ingest.raw import RawMail
from mailbridge.models import Article, Outcome, Receipt, Ticket, db_text_or_none


@dataclass(frozen=True, slots=True)
class Known:
    outcome: Outcome
    article_id: int | None
    quarantine_id: int | None
    message_id: str | None
    ticket: str | None


def known(session: Session, source_keys: Sequence[str]) -> dict[str, Known]:
    found: dict[str, Known] = {}
    for chunk in chunked(list(source_keys)):
        rows = session.execute(
            select(
                Receipt.source_key,
                Receipt.outcome,
                Receipt.article_id,
                Receipt.quarantine_id,
                Receipt.message_id,
                Ticket.number,
            )
            .outerjoin(Article, Article.id == Receipt.article_id)
            .outerjoin(Ticket, Ticket.id == Article.ticket_id)
            .where(Receipt.source_key.in_(chunk))
        )
        for key, outcome, article_id, quarantine_id, message_id, number in rows:
            if key is not None:
                found[key] = Known(Outcome(outcome), article_id, quarantine_id, message_id, number)
    return found


@dataclass(frozen=True, slots=True)
class NewReceipt:
    raw: RawMail
    outcome: Outcome
    sha256: str
    message_id: str | None
    article_id: int | None = None
    quarantine_id: int | None = None
    reply: bool = False  # stored on an existing ticket


def add(session: Session, receipts: Sequence[NewReceipt]) -> None:
    if not receipts:
        return
    insert_rows(
        session,
        Receipt,
        [
            {
                "mailbox": r.raw.mailbox,
                "source_key": r.raw.source_key,
                "uidvalidity": r.raw.uidvalidity,
                "uid": r.raw.uid,
                "sha256": r.sha256,
                "message_id": db_text_or_none(r.message_id, 998),
                "outcome": r.outcome,
                "reply": r.reply,
                "article_id": r.article_id,
                "quarantine_id": r.quarantine_id,
                # nothing to tell a server about a file import, or an MTA (the LMTP reply after the commit)
                "server_done": r.raw.source_key is None or r.raw.nothing_to_tell,
            }
            for r in receipts
        ],
    )


def mark_server_done(session: Session, source_keys: Sequence[str]) -> None:
    for chunk in chunked(list(source_keys)):
        session.execute(update(Receipt).where(Receipt.source_key.in_(chunk)).values(server_done=True))


def resolve_quarantined(
    session: Session, quarantine_id: int, outcome: Outcome, article_id: int | None, reply: bool
) -> None:
    session.execute(
        update(Receipt)
        .where(Receipt.quarantine_id == quarantine_id)
        .values(outcome=outcome, article_id=article_id, reply=reply)
    )
