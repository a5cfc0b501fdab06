"""The ticket lifecycle: who takes part in a ticket, its history, and the status changes mail causes.

New → Open → Waiting on customer / Waiting on third party → Closed. A customer's reply to a waiting
ticket opens it again; a reply within the reopen window reopens a closed one (later ones start a new,
linked ticket: the thread stage decides that). Every change is an event with who and when: the reports
compute response times from these.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from mailbridge.db import chunked, insert_rows
from mailbridge.models import (
    Article,
    MailKind,
    OutboxMail,
    ParticipantRole,
    Ticket,
    TicketEvent,
    TicketParticipant,
    TicketStatus,
)
from mailbridge.tickets import UNKNOWN_SENDER, Incoming, Stored, contact_key

SYSTEM = "mailbridge"
WAITING = {TicketStatus.WAITING_CUSTOMER, TicketStatus.WAITING_THIRD_PARTY}


def after_store(
    session: Session,
    items: Sequence[Incoming],
    stored: Sequence[Stored],
    agents: set[str],
    own_addresses: Collection[str],
    now: datetime,
) -> None:
    """Participants, history and status changes for mails just stored (new tickets and replies). Everyone
    a mail of the ticket went to (To and Cc, but not our own mailboxes) takes part in it."""
    statuses = _statuses(session, [s.ticket_id for s in stored if not s.new_ticket])
    people: list[tuple[int, str, str]] = []
    events: list[dict[str, Any]] = []
    changes: dict[int, str] = {}
    for item, result in zip(items, stored, strict=True):
        sender = contact_key(item.mail.sender or UNKNOWN_SENDER)
        ticket = result.ticket_id
        people += [
            (ticket, address, ParticipantRole.CC)
            for a in (*item.mail.to, *item.mail.cc)
            if (address := contact_key(a)) not in own_addresses
        ]
        if result.new_ticket:
            people.append((ticket, sender, ParticipantRole.CUSTOMER))
            events.append(_event(ticket, now, sender, "created", None, TicketStatus.NEW, result.article_id))
            if item.linked_ticket_id is not None:
                events.append(_event(ticket, now, SYSTEM, "linked", None, str(item.linked_ticket_id), None))
            continue
        role = ParticipantRole.AGENT if sender in agents else ParticipantRole.CC
        people.append((ticket, sender, role))  # proven by our signature, or already taking part
        events.append(_event(ticket, now, sender, "reply", None, None, result.article_id))
        old = changes.get(ticket, statuses.get(ticket))
        if item.kind == MailKind.HUMAN and sender not in agents and (old in WAITING or old == TicketStatus.CLOSED):
            events.append(_event(ticket, now, sender, "status", old, TicketStatus.OPEN, result.article_id))
            changes[ticket] = TicketStatus.OPEN
    fresh = {s.ticket_id for s in stored if s.new_ticket}
    _add_participants(session, people, now, new_tickets=fresh)
    if events:
        insert_rows(session, TicketEvent, events)
    for ticket, status in changes.items():
        session.execute(update(Ticket).where(Ticket.id == ticket).values(status=status, closed_at=None))


def change_status(session: Session, ticket: Ticket, new: str, actor: str, now: datetime) -> str | None:
    """Set a ticket's status (an agent's command, the CLI); returns the old status, None if unchanged."""
    old = ticket.status
    if old == new:
        return None
    ticket.status = new
    ticket.updated_at = now
    ticket.closed_at = now if new == TicketStatus.CLOSED else None
    session.add(TicketEvent(ticket_id=ticket.id, at=now, actor=actor, kind="status", old=old, new=new))
    return old


def _event(
    ticket: int, at: datetime, actor: str, kind: str, old: str | None, new: str | None, article: int | None
) -> dict[str, Any]:
    return {"ticket_id": ticket, "at": at, "actor": actor, "kind": kind, "old": old, "new": new, "article_id": article}


def _statuses(session: Session, ticket_ids: Sequence[int]) -> dict[int, str]:
    found: dict[int, str] = {}
    for chunk in chunked(sorted(set(ticket_ids))):
        found.update({i: s for i, s in session.execute(select(Ticket.id, Ticket.status).where(Ticket.id.in_(chunk)))})
    return found


def _add_participants(
    session: Session, people: list[tuple[int, str, str]], now: datetime, new_tickets: Collection[int] = ()
) -> None:
    wanted: dict[tuple[int, str], str] = {}
    for ticket, address, role in people:
        if address and "@" in address:
            wanted.setdefault((ticket, address), role)
    if not wanted:
        return
    existing: set[tuple[int, str]] = set()
    # Tickets opened in this transaction have no participants yet: no need to look.
    for chunk in chunked(sorted({t for t, _ in wanted if t not in new_tickets})):
        rows = session.execute(
            select(TicketParticipant.ticket_id, TicketParticipant.address).where(TicketParticipant.ticket_id.in_(chunk))
        )
        existing.update((t, a) for t, a in rows)
    new = [
        {"ticket_id": t, "address": a, "role": role, "created_at": now}
        for (t, a), role in wanted.items()
        if (t, a) not in existing
    ]
    if new:
        insert_rows(session, TicketParticipant, new)


def merge(session: Session, into: Ticket, source: Ticket, actor: str, now: datetime) -> int:
    """Move `source`'s articles, participants and history onto `into`; `source` is closed, links to it, and
    from now on redirects the mail that names it there. Returns how many articles moved."""
    if into.id == source.id:
        raise ValueError("a ticket cannot be merged into itself")
    if into.merged_into_id is not None:
        # Merging into a merged ticket would hide the articles on a closed, empty ticket (and could loop).
        raise ValueError(f"{into.number} was itself merged into another ticket: merge into that one")
    moved = len(session.scalars(select(Article.id).where(Article.ticket_id == source.id)).all())
    session.execute(update(Article).where(Article.ticket_id == source.id).values(ticket_id=into.id))
    session.execute(update(TicketEvent).where(TicketEvent.ticket_id == source.id).values(ticket_id=into.id))
    session.execute(update(OutboxMail).where(OutboxMail.ticket_id == source.id).values(ticket_id=into.id))
    theirs = session.execute(
        select(TicketParticipant.address, TicketParticipant.role).where(TicketParticipant.ticket_id == source.id)
    ).all()
    _add_participants(session, [(into.id, address, role) for address, role in theirs], now)
    session.execute(delete(TicketParticipant).where(TicketParticipant.ticket_id == source.id))
    session.add(TicketEvent(ticket_id=into.id, at=now, actor=actor, kind="merged", old=source.number, new=into.number))
    change_status(session, source, TicketStatus.CLOSED, actor, now)
    source.linked_ticket_id = into.id
    source.merged_into_id = into.id  # mail that names the source from now on goes to `into`
    source.triage_reason = None
    session.add(TicketEvent(ticket_id=source.id, at=now, actor=actor, kind="merged_into", old=None, new=into.number))
    into.updated_at = now
    return moved
