"""SLA mails to our own people: a reminder before a deadline (template `sla_reminder`) to the ticket's
owner, or to the queue's agents when nobody owns it; an escalation at the breach (`sla_escalation`) to
the queue's escalation contacts, with the owner on Cc. Both carry our signed Message-ID, so an agent who
answers one answers the customer, as with any ticket mail."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailbridge.config import MailboxConfig, Settings
from mailbridge.ingest.mail import Address
from mailbridge.models import Article, Contact, Direction, Ticket
from mailbridge.notify.outbox import enqueue
from mailbridge.notify.render import sendable
from mailbridge.notify.writer import Letter, MailWriter
from mailbridge.sla.plan import BREACH, FIRST_RESPONSE

log = logging.getLogger("mailbridge.sla")

TARGET_LABELS = {
    "en": {"first_response": "first response", "resolution": "resolution"},
    "pl": {"first_response": "pierwszą odpowiedź", "resolution": "rozwiązanie"},
}
_EXCERPT = 1500


class SlaAlerts:
    def __init__(self, settings: Settings, writer: MailWriter) -> None:
        self.settings = settings
        self.writer = writer
        self.zone = ZoneInfo(settings.sla.calendar.timezone)
        self.boxes = {b.name: b for b in settings.mailboxes if settings.can_send(b) and b.address}
        self.retry_for = timedelta(hours=settings.outbox.retry_for_hours)

    def send(self, session: Session, ticket: Ticket, target: str, share: float, due: datetime, now: datetime) -> str:
        """Queue the reminder (share < 1) or escalation (share 1) for a ticket's target; returns what was
        done, in words, for the timer's record."""
        to, cc = self._recipients(ticket, escalation=share >= BREACH)
        if not to:
            what = "escalation" if share >= BREACH else "reminder"
            log.warning(
                "SLA %s for %s (%s): nobody to send it to (no owner, agents or contacts)", what, ticket.number, target
            )
            return "no recipient configured"
        box = self.boxes.get(ticket.mailbox) or next(iter(self.boxes.values()), None)
        if box is None:
            log.error("SLA mail for %s not sent: no mailbox has smtp and an address to send from", ticket.number)
            return "no mailbox sends mail"
        template = "sla_escalation" if share >= BREACH else "sla_reminder"
        context = self.writer.ticket_context(
            ticket,
            box,
            alert=self._alert(ticket, target, share, due, now, box),
            customer=self._customer(session, ticket),
            last_message=self._last_message(session, ticket),
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
        enqueue(session, [mail], now, self.retry_for)
        return f"{template} to {', '.join(a.address for a in (*to, *cc))}"

    def _recipients(self, ticket: Ticket, *, escalation: bool) -> tuple[list[Address], list[Address]]:
        names = {a.address.lower(): a.name for a in self.settings.agents}
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
    def _customer(session: Session, ticket: Ticket) -> dict[str, str]:
        customer = session.get(Contact, ticket.customer_id)
        return {"name": customer.name if customer else "", "address": customer.address if customer else ""}

    @staticmethod
    def _last_message(session: Session, ticket: Ticket) -> str:
        row = session.execute(
            select(Article.new_text, Article.text)
            .where(Article.ticket_id == ticket.id, Article.direction == Direction.INBOUND)
            .order_by(Article.id.desc())
            .limit(1)
        ).first()
        if row is None:
            return ""
        text = (row.new_text if row.new_text is not None else row.text) or ""
        return text[:_EXCERPT] + ("…" if len(text) > _EXCERPT else "")


def _span(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"
