"""The outbox table: every mail we send is written here, complete, in the transaction of the event that
causes it; the sender delivers it after the commit. Stages call `enqueue` with their session."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, func, insert, select
from sqlalchemy.orm import Session

from mailbridge.config import RateLimit
from mailbridge.db import chunked
from mailbridge.models import OutboxMail, OutboxStatus, db_text


@dataclass(frozen=True, slots=True)
class Outgoing:
    ticket_id: int | None
    article_id: int | None
    template: str
    mailbox: str
    message_id: str
    envelope_from: str
    recipients: Sequence[str]
    subject: str
    raw: bytes
    automatic: bool = True


def enqueue(session: Session, mails: Sequence[Outgoing], now: datetime, retry_for: timedelta) -> None:
    if not mails:
        return
    session.execute(
        insert(OutboxMail),
        [
            {
                "ticket_id": mail.ticket_id,
                "article_id": mail.article_id,
                "template": mail.template,
                "mailbox": mail.mailbox,
                "message_id": mail.message_id,
                "envelope_from": mail.envelope_from,
                "recipients": list(mail.recipients),
                "recipient": db_text(mail.recipients[0].lower(), 320) if mail.recipients else "",
                "automatic": mail.automatic,
                "subject": db_text(mail.subject),
                "raw": mail.raw,
                "status": OutboxStatus.PENDING,
                "attempts": 0,
                "next_attempt_at": now,
                "deliver_until": now + retry_for,
                "created_at": now,
            }
            for mail in mails
        ],
    )


@dataclass
class RecentCounts:
    last_hour: int = 0
    last_day: int = 0

    def take(self, limit: RateLimit, address: str) -> str | None:
        """Count one more automatic mail to `address`, or say why the limit forbids it."""
        if self.last_hour >= limit.per_hour:
            return f"rate limit: {self.last_hour} automatic mails to {address} in the last hour"
        if self.last_day >= limit.per_day:
            return f"rate limit: {self.last_day} automatic mails to {address} in the last day"
        self.last_hour += 1
        self.last_day += 1
        return None


def automatic_mail_counts(session: Session, addresses: Iterable[str], now: datetime) -> dict[str, RecentCounts]:
    """Automatic mails written to each address in the last hour and day (what the rate limit counts;
    mails that later failed count too: the attempt was made)."""
    counts: dict[str, RecentCounts] = {}
    day_ago, hour_ago = now - timedelta(days=1), now - timedelta(hours=1)
    for chunk in chunked(sorted(set(addresses))):
        rows = session.execute(
            select(
                OutboxMail.recipient,
                func.count(),
                func.sum(case((OutboxMail.created_at >= hour_ago, 1), else_=0)),
            )
            .where(OutboxMail.recipient.in_(chunk), OutboxMail.automatic, OutboxMail.created_at >= day_ago)
            .group_by(OutboxMail.recipient)
        )
        for recipient, day, hour in rows:
            counts[recipient] = RecentCounts(last_hour=int(hour or 0), last_day=int(day))
    return counts


def find_by_message_ids(session: Session, message_ids: Iterable[str]) -> dict[str, OutboxMail]:
    found: dict[str, OutboxMail] = {}
    for chunk in chunked(sorted(set(message_ids))):
        for mail in session.scalars(select(OutboxMail).where(OutboxMail.message_id.in_(chunk))):
            found[mail.message_id] = mail
    return found
