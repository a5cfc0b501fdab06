"""Status mails: the customer hears when an agent changes the ticket's status (template `status_changed`,
or `closed`), where the mailbox's config asks for it (`status_mails: true`)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from mailbridge.config import Settings
from mailbridge.ingest.mail import Address
from mailbridge.models import Contact, Ticket, TicketStatus
from mailbridge.notify.outbox import Outgoing, enqueue
from mailbridge.notify.render import Envelope, Renderer, compose, sendable, status_context
from mailbridge.threading.message_ids import make_message_id


class StatusMailer:
    def __init__(self, settings: Settings, renderer: Renderer, secret: bytes) -> None:
        self.settings = settings
        self.renderer = renderer
        self.secret = secret
        self.boxes = {b.name: b for b in settings.mailboxes if settings.can_send(b) and b.status_mails}
        self.retry_for = timedelta(hours=settings.outbox.retry_for_hours)

    def changed(self, session: Session, ticket: Ticket, old: str, new: str, now: datetime) -> bool:
        """Queue the status mail for this change; False when none is due (config, no address)."""
        box = self.boxes.get(ticket.mailbox)
        customer = session.get(Contact, ticket.customer_id)
        if box is None or box.address is None or customer is None:
            return False
        to = Address(customer.name, customer.address)
        if not sendable(to):
            return False
        template = "closed" if new == TicketStatus.CLOSED else "status_changed"
        context = {
            "ticket": {
                "id": ticket.id,
                "number": ticket.number,
                "reference": self.settings.tickets.reference(ticket.number or ""),
                "subject": ticket.subject,
                "status": new,
            },
            "customer": {"name": customer.name, "address": customer.address},
            "mailbox": {"name": box.name, "address": box.address, "from_name": box.from_name},
            "status": status_context(old, new, box.language),
        }
        rendered = self.renderer.render(template, box.language, context)
        message_id = make_message_id(ticket.id, self.secret, self.settings.outbox.domain)
        envelope = Envelope(
            sender=Address(box.from_name, box.address),
            to=[to],
            message_id=message_id,
            loop_id=f"mailbridge@{self.settings.outbox.domain}",
        )
        # Not counted by the rate limit (that one is for answers to incoming mail), but marked as
        # automatic in its headers so that no responder answers it.
        mail = Outgoing(
            ticket.id,
            None,
            template,
            box.name,
            message_id,
            box.address,
            envelope.recipients,
            rendered.subject,
            compose(rendered, envelope),
            automatic=False,
        )
        enqueue(session, [mail], now, self.retry_for)
        return True
