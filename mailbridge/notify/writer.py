"""The one way a mail of ours is written: a template rendered with the mailbox's language, our signed
Message-ID, the envelope, the finished bytes, ready for the outbox. Acknowledgements, agents' answers,
status mails and explanations all go through here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mailbridge.config import MailboxConfig, Settings
from mailbridge.ingest.mail import Address
from mailbridge.models import Ticket
from mailbridge.notify.outbox import Outgoing
from mailbridge.notify.render import Envelope, FileToSend, Renderer, compose
from mailbridge.threading.message_ids import make_message_id


@dataclass(frozen=True)
class Letter:
    template: str
    box: MailboxConfig
    context: dict[str, Any]
    to: Sequence[Address]
    cc: Sequence[Address] = ()
    ticket_id: int | None = None
    article_id: int | None = None
    in_reply_to: str | None = None
    references: Sequence[str] = ()
    sender_name: str | None = None  # default: the mailbox's from_name
    # Auto-Submitted (no responder answers it): "auto-replied", "auto-generated", or None for a person's mail.
    auto_submitted: str | None = "auto-replied"
    rate_limited: bool = True  # counted by the per-address limit on automatic answers
    files: Sequence[FileToSend] = field(default=())


class MailWriter:
    def __init__(self, settings: Settings, renderer: Renderer, secret: bytes) -> None:
        self.settings = settings
        self.renderer = renderer
        self.secret = secret
        self.loop_id = f"mailbridge@{settings.outbox.domain}"

    def write(self, letter: Letter) -> Outgoing:
        box = letter.box
        assert box.address is not None
        rendered = self.renderer.render(letter.template, box.language, letter.context)
        message_id = make_message_id(letter.ticket_id, self.secret, self.settings.outbox.domain)
        envelope = Envelope(
            sender=Address(letter.sender_name or box.from_name, box.address),
            to=letter.to,
            cc=letter.cc,
            message_id=message_id,
            in_reply_to=letter.in_reply_to,
            references=letter.references,
            loop_id=self.loop_id,
            auto_submitted=letter.auto_submitted,
        )
        return Outgoing(
            ticket_id=letter.ticket_id,
            article_id=letter.article_id,
            template=letter.template,
            mailbox=box.name,
            message_id=message_id,
            envelope_from=box.address,
            recipients=envelope.recipients,
            subject=rendered.subject,
            raw=compose(rendered, envelope, letter.files),
            automatic=letter.rate_limited,
        )

    def ticket_context(self, ticket: Ticket, box: MailboxConfig, **more: Any) -> dict[str, Any]:
        """What every ticket template gets: the ticket and the mailbox, plus `more`."""
        return {
            "ticket": {
                "id": ticket.id,
                "number": ticket.number,
                "reference": self.settings.tickets.reference(ticket.number or ""),
                "subject": ticket.subject,
                "status": ticket.status,
            },
            "mailbox": {"name": box.name, "address": box.address, "from_name": box.from_name},
            **more,
        }
