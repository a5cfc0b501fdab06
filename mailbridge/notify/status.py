"""Status mails: the customer hears when an agent changes the ticket's status (template `status_changed`,
or `closed`), where the mailbox's config asks for it (`status_mails: true`)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from mailbridge.config import Settings
from mailbridge.ingest.mail import Address
from mailbridge.models import Contact, Ticket, TicketStatus
from mailbridge.notify.outbox import enqueue
from mailbridge.notify.render import sendable, status_context
from mailbridge.notify.writer import Letter, MailWriter


class StatusMailer:
    def __init__(self, settings: Settings, writer: MailWriter) -> None:
        self.settings = settings
        self.writer = writer
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
        context = self.writer.ticket_context(
            ticket,
            box,
            customer={"name": customer.name, "address": customer.address},
            status=status_context(old, new, box.language),
        )
        # Not counted by the rate limit (that one is for answers to incoming mail), but marked as
        # automatic in its headers (auto-generated: it answers no mail) so that no responder answers it.
        mail = self.writer.write(
            Letter(
                template,
                box,
                context,
                to=[to],
                ticket_id=ticket.id,
                rate_limited=False,
                auto_submitted="auto-generated",
            )
        )
        enqueue(session, [mail], now, self.retry_for)
        return True
