"""Notify stage for new tickets: decide who gets an acknowledgement (and record why not), render it and
put it in the outbox, all inside the pipeline's transaction."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Table, bindparam, update
from sqlalchemy.orm import Session

from mailbridge.classify import Verdict, classify
from mailbridge.config import MailboxConfig, Settings
from mailbridge.ingest.mail import Address, ParsedMail
from mailbridge.ingest.raw import RawMail
from mailbridge.models import Article
from mailbridge.notify.outbox import Outgoing, RecentCounts, automatic_mail_counts, enqueue
from mailbridge.notify.render import sendable
from mailbridge.notify.writer import Letter, MailWriter

log = logging.getLogger("mailbridge.notify")


@dataclass(frozen=True, slots=True)
class Planned:
    """The answer a new mail gets: recipients, or the reason it gets none."""

    to: tuple[Address, ...] = ()
    cc: tuple[Address, ...] = ()
    no_answer_reason: str | None = None


@dataclass(frozen=True, slots=True)
class NewTicket:
    raw: RawMail
    mail: ParsedMail
    ticket_id: int
    number: str
    article_id: int
    plan: Planned


class Acknowledger:
    def __init__(self, settings: Settings, writer: MailWriter) -> None:
        self.settings = settings
        self.writer = writer
        self.sending = {box.name: box for box in settings.mailboxes if settings.can_send(box)}
        self.own_addresses = frozenset(a for box in settings.mailboxes if (a := box.own_address))
        self.loop_id = f"mailbridge@{settings.outbox.domain}"
        self.retry_for = timedelta(hours=settings.outbox.retry_for_hours)

    def classify(self, mail: ParsedMail) -> Verdict:
        return classify(mail, self.own_addresses, self.loop_id)

    def plan(
        self, session: Session, mails: Sequence[tuple[RawMail, ParsedMail, Verdict]], now: datetime
    ) -> list[Planned]:
        """Who gets an acknowledgement. The rate limit counts what is already in the outbox and what this
        batch adds, so a flood inside one batch is held back too."""
        plans: list[Planned] = []
        wanted: list[tuple[int, MailboxConfig, tuple[Address, ...], tuple[Address, ...]]] = []
        for raw, mail, verdict in mails:
            box = self.sending.get(raw.mailbox)
            reason = (
                verdict.no_answer_reason
                or raw.quiet
                or (None if box else f"mailbox {raw.mailbox} sends no mail (no smtp configured)")
                or (None if box and box.acknowledge else f"acknowledgements are off for mailbox {raw.mailbox}")
            )
            to, cc = self._recipients(mail, box) if box and reason is None else ((), ())
            if reason is None and not to:
                given = ", ".join(a.address for a in (mail.reply_to or ((mail.sender,) if mail.sender else ())))
                reason = f"no address to answer: {given or 'none'} (ours, or not one a mail server takes)"
            plans.append(Planned(no_answer_reason=reason))
            if reason is None and box is not None:
                wanted.append((len(plans) - 1, box, to, cc))
        counts = automatic_mail_counts(session, [to[0].address.lower() for _, _, to, _ in wanted], now)
        for index, box, to, cc in wanted:
            seen = counts.setdefault(to[0].address.lower(), RecentCounts())
            limited = seen.take(box.rate_limit, to[0].address)
            plans[index] = Planned(no_answer_reason=limited) if limited else Planned(to=to, cc=cc)
        return plans

    def enqueue(self, session: Session, tickets: Sequence[NewTicket], now: datetime) -> list[int]:
        """Acknowledge these new tickets; returns the article ids that got one. A mail whose acknowledgement
        cannot be made (a template error) is still stored: the reason is recorded on its article."""
        outgoing: list[Outgoing] = []
        failed: list[dict[str, object]] = []
        for ticket in tickets:
            if not ticket.plan.to:
                continue
            try:
                outgoing.append(self._acknowledgement(ticket))
            except Exception as exc:
                log.exception("cannot compose the acknowledgement for ticket %s", ticket.number)
                failed.append(
                    {"b_id": ticket.article_id, "b_reason": f"the acknowledgement could not be composed: {exc}"}
                )
        enqueue(session, outgoing, now, self.retry_for)
        if failed:
            articles = Article.__table__
            assert isinstance(articles, Table)
            session.execute(
                update(articles)
                .where(articles.c.id == bindparam("b_id"))
                .values(no_answer_reason=bindparam("b_reason")),
                failed,
            )
        return [mail.article_id for mail in outgoing if mail.article_id is not None]

    def _recipients(self, mail: ParsedMail, box: MailboxConfig) -> tuple[tuple[Address, ...], tuple[Address, ...]]:
        # Reply-To is where the customer asked answers to go; otherwise the sender.
        candidates = mail.reply_to or ((mail.sender,) if mail.sender else ())
        to = tuple(_unique(a for a in candidates if a.address.lower() not in self.own_addresses and sendable(a)))
        cc: tuple[Address, ...] = ()
        if box.acknowledge_cc:
            taken = {a.address.lower() for a in to}
            cc = tuple(
                a for a in _unique(mail.cc) if a.address.lower() not in self.own_addresses | taken and sendable(a)
            )
        return to, cc

    def _acknowledgement(self, ticket: NewTicket) -> Outgoing:
        box = self.sending[ticket.raw.mailbox]
        assert box.address is not None
        mail = ticket.mail
        customer = ticket.plan.to[0]
        context = {
            "ticket": {
                "id": ticket.ticket_id,
                "number": ticket.number,
                "reference": self.settings.tickets.reference(ticket.number),
                "subject": mail.subject,
                "status": "new",
            },
            "customer": {"name": customer.name, "address": customer.address},
            "mailbox": {"name": box.name, "address": box.address, "from_name": box.from_name},
            "original": {
                "subject": mail.subject,
                "date": mail.date.isoformat() if mail.date else None,
                "message_id": mail.message_id,
            },
        }
        return self.writer.write(
            Letter(
                "ack",
                box,
                context,
                to=ticket.plan.to,
                cc=ticket.plan.cc,
                ticket_id=ticket.ticket_id,
                article_id=ticket.article_id,
                in_reply_to=mail.message_id,
                references=[*mail.references, *([mail.message_id] if mail.message_id else [])],
            )
        )


def _unique(addresses: Iterable[Address]) -> list[Address]:
    seen: set[str] = set()
    result: list[Address] = []
    for address in addresses:
        key = address.address.lower()
        if key and key not in seen and "@" in key:
            seen.add(key)
            result.append(address)
    return result
