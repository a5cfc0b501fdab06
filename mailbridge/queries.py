"""Views of the database for the CLI: tickets, quarantine, outbox, mailbox status."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from mailbridge.config import Settings
from mailbridge.models import (
    Article,
    CrmHealth,
    MailboxLease,
    MailboxState,
    OutboxMail,
    OutboxStatus,
    Outcome,
    QuarantinedMail,
    Receipt,
    Ticket,
    TicketEvent,
    TicketParticipant,
    utcnow,
)


def ticket_rows(session: Session, limit: int) -> list[dict[str, Any]]:
    counts = select(Article.ticket_id, func.count(Article.id).label("articles")).group_by(Article.ticket_id).subquery()
    query = (
        select(Ticket, counts.c.articles)
        .join(counts, counts.c.ticket_id == Ticket.id, isouter=True)
        .order_by(Ticket.id.desc())
        .limit(limit)
    )
    return [
        {
            "number": t.number,
            "status": t.status,
            "subject": t.subject,
            "customer": {"name": t.customer.name, "address": t.customer.address},
            "mailbox": t.mailbox,
            "created_at": t.created_at.isoformat(),
            "articles": n or 0,
        }
        for t, n in session.execute(query)
    ]


def _sla(ticket: Ticket) -> dict[str, Any] | None:
    if ticket.sla_policy is None:
        return None

    def when(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "policy": ticket.sla_policy,
        "first_response_due": when(ticket.first_response_due_at),
        "first_response_at": when(ticket.first_response_at),
        "resolution_due": when(ticket.resolution_due_at),
        "paused_since": when(ticket.sla_paused_at),
    }


def ticket_detail(session: Session, number: str) -> dict[str, Any] | None:
    ticket = session.scalars(
        select(Ticket).where(Ticket.number == number).options(selectinload(Ticket.articles))
    ).first()
    if ticket is None:
        return None
    linked = session.get(Ticket, ticket.linked_ticket_id) if ticket.linked_ticket_id else None
    participants = session.execute(
        select(TicketParticipant.address, TicketParticipant.role)
        .where(TicketParticipant.ticket_id == ticket.id)
        .order_by(TicketParticipant.id)
    ).all()
    events = session.scalars(select(TicketEvent).where(TicketEvent.ticket_id == ticket.id).order_by(TicketEvent.id))
    return {
        "number": ticket.number,
        "status": ticket.status,
        "subject": ticket.subject,
        "triage_reason": ticket.triage_reason,
        "queue": ticket.queue,
        "priority": ticket.priority,
        "owner": ticket.owner,
        "tags": list(ticket.tags or []),
        "routing": ticket.routing_reason,
        "linked_ticket": linked.number if linked else None,
        "sla": _sla(ticket),
        "participants": [{"address": a, "role": r} for a, r in participants],
        "history": [
            {"at": e.at.isoformat(), "actor": e.actor, "kind": e.kind, "old": e.old, "new": e.new} for e in events
        ],
        "customer": {"name": ticket.customer.name, "address": ticket.customer.address},
        "mailbox": ticket.mailbox,
        "created_at": ticket.created_at.isoformat(),
        "articles": [
            {
                "id": a.id,
                "direction": a.direction,
                "from": {"name": a.from_name, "address": a.from_address},
                "to": a.to,
                "cc": a.cc,
                "subject": a.subject,
                "date": a.sent_at.isoformat() if a.sent_at else None,
                "message_id": a.message_id,
                "text": a.text,
                "new_text": a.new_text,
                "has_html": a.html is not None,
                "raw_sha256": a.raw_sha256,
                "raw_size": a.raw_size,
                "kind": a.kind,
                "no_answer_reason": a.no_answer_reason,
                "attachments": [
                    {
                        "filename": p.filename,
                        "content_type": p.content_type,
                        "size": p.size,
                        "sha256": p.sha256,
                        "content_id": p.content_id,
                        "inline": p.inline,
                    }
                    for p in a.attachments
                ],
            }
            for a in ticket.articles
        ],
    }


def outbox_row(mail: OutboxMail) -> dict[str, Any]:
    return {
        "id": mail.id,
        "status": mail.status,
        "template": mail.template,
        "mailbox": mail.mailbox,
        "ticket_id": mail.ticket_id,
        "to": ", ".join(mail.recipients),
        "subject": mail.subject,
        "message_id": mail.message_id,
        "attempts": mail.attempts,
        "created_at": mail.created_at.isoformat(),
        "next_attempt_at": mail.next_attempt_at.isoformat() if mail.status == OutboxStatus.PENDING else None,
        "deliver_until": mail.deliver_until.isoformat(),
        "sent_at": mail.sent_at.isoformat() if mail.sent_at else None,
        "bounced_at": mail.bounced_at.isoformat() if mail.bounced_at else None,
        "last_error": mail.last_error,
    }


def outbox_mails(session: Session, status: str | None, limit: int) -> list[OutboxMail]:
    query = select(OutboxMail).order_by(OutboxMail.id.desc()).limit(limit)
    if status:
        query = query.where(OutboxMail.status == status)
    return list(session.scalars(query))


def retry_outbox(session: Session, ids: list[int], retry_for: timedelta) -> list[int]:
    """Failed or pending mails go (back) to the front of the queue, with a fresh delivery deadline."""
    now = utcnow()
    mails = session.scalars(
        select(OutboxMail).where(
            OutboxMail.id.in_(ids), OutboxMail.status.in_([OutboxStatus.FAILED, OutboxStatus.PENDING])
        )
    ).all()
    for mail in mails:
        mail.status = OutboxStatus.PENDING
        mail.next_attempt_at = now
        mail.deliver_until = now + retry_for
    return [mail.id for mail in mails]


def quarantine_row(item: QuarantinedMail) -> dict[str, Any]:
    return {
        "id": item.id,
        "mailbox": item.mailbox,
        "source": item.source,
        "stage": item.stage,
        "reason": item.reason,
        "retryable": item.retryable,
        "size": item.size,
        "sha256": item.sha256,
        "message_id": item.message_id,
        "created_at": item.created_at.isoformat(),
        "resolved_at": item.resolved_at.isoformat() if item.resolved_at else None,
    }


def mailbox_status(session: Session, settings: Settings) -> list[dict[str, Any]]:
    """Per mailbox: health, what the receipts say was read (read = stored + replies + duplicates +
    quarantined), and the folder as the watcher last counted it on the server: `waiting` (the next fetch
    imports them) and `missing` (no receipt, yet behind the high-water mark: passed over; must be 0)."""
    counts: dict[str, dict[tuple[str, bool], int]] = {}
    for mailbox, outcome, reply, n in session.execute(
        select(Receipt.mailbox, Receipt.outcome, Receipt.reply, func.count()).group_by(
            Receipt.mailbox, Receipt.outcome, Receipt.reply
        )
    ):
        counts.setdefault(mailbox, {})[(outcome, bool(reply))] = n
    pending = dict(
        session.execute(
            select(Receipt.mailbox, func.count()).where(Receipt.server_done.is_(False)).group_by(Receipt.mailbox)
        ).all()
    )
    states = {s.mailbox: s for s in session.scalars(select(MailboxState))}
    now = utcnow()
    holders = dict(
        session.execute(
            select(MailboxLease.mailbox, MailboxLease.holder).where(
                MailboxLease.holder.is_not(None), MailboxLease.expires_at > now
            )
        ).all()
    )
    configured = [box.name for box in settings.mailboxes]
    names = list(configured)
    names += sorted(n for n in counts if n not in names)  # `ingest` imports and removed mailboxes
    rows = []
    for name in names:
        state = states.get(name)
        c = counts.get(name, {})
        stored, replies = c.get((Outcome.STORED, False), 0), c.get((Outcome.STORED, True), 0)
        dup = c.get((Outcome.DUPLICATE, False), 0) + c.get((Outcome.DUPLICATE, True), 0)
        quar = c.get((Outcome.QUARANTINED, False), 0) + c.get((Outcome.QUARANTINED, True), 0)
        rows.append(
            {
                "mailbox": name,
                "configured": name in configured,
                "connected": bool(state and state.connected),
                # The instance (`mailbridge run`) that fetches it now; None when no daemon holds its lease.
                "held_by": holders.get(name),
                "last_error": state.last_error if state else None,
                "last_error_at": _when(state.last_error_at if state else None),
                "last_fetch_at": _when(state.last_fetch_at if state else None),
                "read": stored + replies + dup + quar,
                "stored": stored,
                "replies": replies,
                "duplicates": dup,
                "quarantined": quar,
                "awaiting_server_update": pending.get(name, 0),
                # Counted on the server at the end of the last fetch, not derived from the receipts above.
                "in_folder": state.messages_in_folder if state else None,
                "waiting": state.waiting if state else None,
                "missing": state.missing if state else None,
                "left_by_existing_mail": state.left_by_existing_mail if state else None,
            }
        )
    return rows


def crm_status(session: Session, settings: Settings) -> dict[str, Any] | None:
    """The CRM lookup's health as the daemon recorded it: None when no CRM is configured."""
    crm = settings.routing.customers.crm
    if crm is None:
        return None
    row = session.get(CrmHealth, "crm")
    success = row.last_success_at if row else None
    failure = row.last_failure_at if row else None
    return {
        "url": crm.url,
        # Failing: the last lookup that reached a verdict failed (or none ever succeeded).
        "failing": failure is not None and (success is None or failure > success),
        "last_success_at": _when(success),
        "last_failure_at": _when(failure),
        "last_problem": row.last_problem if row else None,
        "flagged_tickets": row.flagged_tickets if row else 0,
        "last_flagged_at": _when(row.last_flagged_at if row else None),
    }


def _when(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
