"""SLA mails to our own people: a reminder before a deadline (template `sla_reminder`) to the ticket's
owner, or to the queue's agents when nobody owns it; an escalation at the breach (`sla_escalation`) to
the queue's escalation contacts, with the owner on Cc. Both carry our signed Message-ID, so an agent who
answers one answers the customer, as with any ticket mail."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailbridge.config import MailboxConfig, Settings
from mailbridge.db import chunked
from mailbridge.ingest.mail import Address
from mailbridge.models import Article, Direction, Ticket
from mailbridge.notify.outbox import Outgoing, enqueue
from mailbridge.notify.render import sendable
from mailbridge.notify.writer import Letter, MailWriter
from mailbridge.sla.plan import BREACH, FIRST_RESPONSE

log = logging.getLogger("mailbridge.sla")

TARGET_LABELS = {
    "en": {"first_response": "first response", "resolution": "resolution"},
    "pl": {"first_response": "pierwszą odpowiedź", "resolution": "rozwiązanie"},
}
_EXCERPT = 1500


@dataclass(frozen=True, slots=True)
class Alert:
    """A reminder (share < 1) or the escalation (share 1) of one target of a ticket."""

    ticket: Ticket
    target: str
    share: float
    due: datetime


class SlaAlerts:
    def __init__(self, settings: Settings, writer: MailWriter) -> None:
        self.settings = settings
        self.writer = writer
        self.zone = ZoneInfo(settings.sla.calendar.timezone)
        self.boxes = {b.name: b for b in settings.mailboxes if settings.can_send(b) and b.address}
        self.retry_for = timedelta(hours=settings.outbox.retry_for_hours)
        self.names = {a.address.lower(): a.name for a in settings.agents}

    def send(self, session: Session, alerts: Sequence[Alert], now: datetime) -> list[str]:
        """Queue the reminders and escalations (in one insert, in the caller's transaction); returns what
        was done for each, in words, for its timer's record."""
        excerpts = self._last_messages(session, sorted({a.ticket.id for a in alerts}))
        outcomes: list[str] = []
        mails: list[Outgoing] = []
        for alert in alerts:
            outcome, mail = self._write(alert, excerpts.get(alert.ticket.id, ""), now)
            outcomes.append(outcome)
            if mail is not None:
                mails.append(mail)
        enqueue(session, mails, now, self.retry_for)
        return outcomes

    def _write(self, alert: Alert, last_message: str, now: datetime) -> tuple[str, Outgoing | None]:
        ticket, target, share = alert.ticket, alert.target, alert.share
        to, cc = self._recipients(ticket, escalation=share >= BREACH)
        if not to:
            what = "escalation" if share >= BREACH else "reminder"
            log.warning(
                "SLA %s for %s (%s): nobody to send it to (no owner, agents or contacts)", what, ticket.number, target
            )
            return "no recipient configured", None
        box = self.boxes.get(ticket.mailbox) or next(iter(self.boxes.values()), None)
        if box is None:
            log.error("SLA mail for %s not sent: no mailbox has smtp and an address to send from", ticket.number)
            return "no mailbox sends mail", None
        template = "sla_escalation" if share >= BREACH else "sla_reminder"
        context = self.writer.ticket_context(
            ticket,
            box,
            alert=self._alert(ticket, target, share, alert.due, now, box),
            customer=self._customer(ticket),
            last_message=last_message,
        )
        mail = self.writer.write(
            Letter(
                template,
                box,
                context,
                to=to,
                cc=cc,
                ticket_id=ticket.id,
                rate_limited=False,
                auto_submitted="auto-generated",
            )
        )
        return f"{template} to {', '.join(a.address for a in (*to, *cc))}", mail

    def _recipients(self, ticket: Ticket, *, escalation: bool) -> tuple[list[Address], list[Address]]:
        names = self.names
        owner = [ticket.owner.lower()] if ticket.owner else []
        queue_agents = [a.address.lower() for a in self.settings.agents if ticket.queue in a.queues]
        contacts = self.settings.sla.escalation_contacts
        escalate_to = [c.lower() for c in contacts.get(ticket.queue or "", contacts.get("*", []))]
        if escalation:
            to = escalate_to or owner or queue_agents
            cc = [a for a in owner if a not in to]
        else:
            to, cc = owner or queue_agents or escalate_to, []
        people = [Address(names.get(a, ""), a) for a in dict.fromkeys(to)]
        copies = [Address(names.get(a, ""), a) for a in dict.fromkeys(cc)]
        return [p for p in people if sendable(p)], [p for p in copies if sendable(p)]

    def _alert(
        self, ticket: Ticket, target: str, share: float, due: datetime, now: datetime, box: MailboxConfig
    ) -> dict[str, object]:
        labels = TARGET_LABELS.get(box.language, TARGET_LABELS["en"])
        left = due - now
        return {
            "target": target,
            "target_label": labels.get(target, target),
            "share_percent": round(share * 100),
            "breach": share >= BREACH,
            "due_at": f"{due.astimezone(self.zone):%Y-%m-%d %H:%M} ({self.settings.sla.calendar.timezone})",
            "left": _span(left) if left.total_seconds() > 0 else "",
            "overdue": _span(-left) if left.total_seconds() < 0 else "",
            "policy": ticket.sla_policy or "",
            "priority": ticket.priority or "",
            "queue": ticket.queue or "",
            "owner": ticket.owner or "",
            "first_response": target == FIRST_RESPONSE,
        }

    @staticmethod
    def _customer(ticket: Ticket) -> dict[str, str]:
        customer = ticket.customer  # loaded with the ticket
        return {"name": customer.name if customer else "", "address": customer.address if customer else ""}

    @staticmethod
    def _last_messages(session: Session, ticket_ids: Sequence[int]) -> dict[int, str]:
        """The customer's last message on each ticket (its new text), shortened: one query per 500."""
        found: dict[int, str] = {}
        for chunk in chunked(ticket_ids):
            last = (
                select(func.max(Article.id))
                .where(Article.ticket_id.in_(chunk), Article.direction == Direction.INBOUND)
                .group_by(Article.ticket_id)
            )
            rows = session.execute(
                select(Article.ticket_id, Article.new_text, Article.text).where(Article.id.in_(last))
            )
            for ticket_id, new_text, text in rows:
                excerpt = (new_text if new_text is not None else text) or ""
                found[ticket_id] = excerpt[:_EXCERPT] + ("…" if len(excerpt) > _EXCERPT else "")
        return found


def _span(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"
