"""Store stage: a parsed mail becomes a ticket with the mail as its first article.

Threading (replies onto existing tickets) and routing come in as stages before this one; here every
new mail opens a ticket. Stages receive the session and never commit: the pipeline owns the transaction.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailbridge.config import TicketSettings
from mailbridge.ingest.parse import Address, ParsedMail
from mailbridge.ingest.raw import RawMail
from mailbridge.models import Article, Attachment, Contact, Direction, Ticket, TicketStatus, utcnow

UNKNOWN_SENDER = Address(name="Unknown sender", address="unknown-sender@invalid")


def ticket_number(settings: TicketSettings, ticket_id: int) -> str:
    return f"{settings.number_prefix}-{ticket_id:0{settings.number_digits}d}"


def find_article(session: Session, dedup_key: str) -> Article | None:
    return session.scalars(select(Article).where(Article.dedup_key == dedup_key)).first()


def contact_for(session: Session, sender: Address) -> Contact:
    address = sender.address.strip().lower()
    contact = session.scalars(select(Contact).where(Contact.address == address)).first()
    if contact is None:
        contact = Contact(address=address, name=sender.name)
        session.add(contact)
        session.flush()
    elif sender.name and not contact.name:
        contact.name = sender.name
    return contact


def store(session: Session, raw: RawMail, mail: ParsedMail, settings: TicketSettings) -> Article:
    """Create the contact (if new), the ticket and its first inbound article with the attachments."""
    now = utcnow()
    customer = contact_for(session, mail.sender or UNKNOWN_SENDER)
    ticket = Ticket(
        status=TicketStatus.NEW,
        subject=mail.subject,
        customer_id=customer.id,
        mailbox=raw.mailbox,
        created_at=now,
        updated_at=now,
    )
    session.add(ticket)
    session.flush()
    ticket.number = ticket_number(settings, ticket.id)
    article = article_from(mail, raw, ticket, now)
    session.add(article)
    session.flush()
    return article


def article_from(mail: ParsedMail, raw: RawMail, ticket: Ticket, now: datetime) -> Article:
    return Article(
        ticket=ticket,
        direction=Direction.INBOUND,
        dedup_key=mail.dedup_key,
        mailbox=raw.mailbox,
        message_id=mail.message_id,
        in_reply_to=mail.in_reply_to,
        references=list(mail.references),
        subject=mail.subject,
        from_name=mail.sender.name if mail.sender else "",
        from_address=mail.sender.address.lower() if mail.sender else "",
        to=[a.as_json() for a in mail.to],
        cc=[a.as_json() for a in mail.cc],
        reply_to=[a.as_json() for a in mail.reply_to],
        sent_at=mail.date,
        text=mail.text,
        html=mail.html,
        raw_sha256=mail.raw_sha256,
        raw_size=mail.raw_size,
        defects=list(mail.defects),
        created_at=now,
        attachments=[
            Attachment(
                filename=p.filename,
                content_type=p.content_type,
                size=p.size,
                sha256=p.sha256,
                content_id=p.content_id,
                inline=p.inline,
            )
            for p in mail.attachments
        ],
    )
