"""Database tables. The schema itself is owned by the Alembic migrations in mailbridge/migrations."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    FetchedValue,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def db_text(value: str, limit: int | None = None) -> str:
    """Text every backend accepts: PostgreSQL refuses NUL, neither takes lone surrogates, and VARCHAR
    columns have a length (what a hostile mail puts in a header has none)."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value[:limit] if limit is not None else value


def db_text_or_none(value: str | None, limit: int | None = None) -> str | None:
    return None if value is None else db_text(value, limit)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class TicketStatus(enum.StrEnum):
    NEW = "new"
    OPEN = "open"
    WAITING_CUSTOMER = "waiting_customer"
    WAITING_THIRD_PARTY = "waiting_third_party"
    CLOSED = "closed"


class Direction(enum.StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"  # an agent's answer, relayed to the customer
    NOTE = "note"  # an agent's internal note (#note): never sent


class Outcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"


class MailKind(enum.StrEnum):
    """What an incoming mail is, as far as answering it goes (the classify stage decides)."""

    HUMAN = "human"
    AUTO_REPLY = "auto_reply"  # out-of-office, vacation, other responders
    BOUNCE = "bounce"  # delivery status notification, mailer-daemon
    REPORT = "report"  # read receipt, abuse/feedback report
    LIST = "list"  # mailing list, bulk
    OWN = "own"  # our own mail come back (X-Loop, from one of our addresses)


class OutboxStatus(enum.StrEnum):
    PENDING = "pending"  # waiting to be sent (again: next_attempt_at)
    SENT = "sent"  # the SMTP server accepted it
    FAILED = "failed"  # refused for good, or retried until the deadline
    BOUNCED = "bounced"  # accepted, then a bounce came back for it


class Contact(Base):
    __tablename__ = "contacts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)  # lower-cased
    name: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Ticket(Base):
    __tablename__ = "tickets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Filled right after the INSERT from the id, so numbers never collide; NULL only inside that transaction.
    number: Mapped[str | None] = mapped_column(String(32), unique=True)
    status: Mapped[str] = mapped_column(String(32), default=TicketStatus.NEW)
    subject: Mapped[str] = mapped_column(Text, default="")
    customer_id: Mapped[int] = mapped_column(ForeignKey("contacts.id"))
    mailbox: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column()
    first_response_at: Mapped[datetime | None] = mapped_column()  # the first agent answer relayed
    owner: Mapped[str | None] = mapped_column(String(320))  # an agent's address
    priority: Mapped[str | None] = mapped_column(String(8))  # P1 … P4
    queue: Mapped[str | None] = mapped_column(String(100), index=True)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    routing_confidence: Mapped[float | None] = mapped_column(Float)
    routing_reason: Mapped[str | None] = mapped_column(Text)  # which rules decided, for `tickets show`
    organisation: Mapped[str | None] = mapped_column(String(200))  # from the customer directory
    tier: Mapped[str | None] = mapped_column(String(32))
    # The ticket a mail claimed to belong to, when it could not be let in (a stranger), or the closed
    # ticket a late reply continues.
    linked_ticket_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"))
    # Set by `tickets merge` on the ticket merged away: mail that names it goes to this one.
    merged_into_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"))
    # Set when a human must look: why (a stranger's follow-up, …). NULL: nothing to triage.
    triage_reason: Mapped[str | None] = mapped_column(Text)
    # The SLA (filled by the SLA planner from the ticket's history): the policy, the priority its targets
    # follow (an escalation raising the priority does not move them), the deadlines, and since when the
    # clock is stopped (waiting on the customer, closed).
    sla_policy: Mapped[str | None] = mapped_column(String(200))
    sla_priority: Mapped[str | None] = mapped_column(String(8))
    first_response_due_at: Mapped[datetime | None] = mapped_column()
    resolution_due_at: Mapped[datetime | None] = mapped_column()
    sla_paused_at: Mapped[datetime | None] = mapped_column()

    customer: Mapped[Contact] = relationship(lazy="joined")
    articles: Mapped[list[Article]] = relationship(
        back_populates="ticket", order_by="Article.id", cascade="all, delete-orphan"
    )

    # The reports (mailbridge/reporting): tickets opened / closed in a period, the backlog by status.
    __table_args__ = (
        Index("ix_tickets_created_at", "created_at"),
        Index("ix_tickets_closed_at", "closed_at", "queue", "mailbox", "owner"),
        Index("ix_tickets_status_created_at", "status", "created_at"),
    )


class Article(Base):
    __tablename__ = "articles"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    direction: Mapped[str] = mapped_column(String(16), default=Direction.INBOUND)
    # The same mail reaching us twice (two mailboxes, a UIDVALIDITY reset) has the same key: one article.
    dedup_key: Mapped[str | None] = mapped_column(String(64), unique=True)
    mailbox: Mapped[str] = mapped_column(String(200))
    message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    in_reply_to: Mapped[str | None] = mapped_column(Text)
    references: Mapped[list[Any]] = mapped_column(default=list)
    subject: Mapped[str] = mapped_column(Text, default="")
    from_name: Mapped[str] = mapped_column(Text, default="")
    from_address: Mapped[str] = mapped_column(String(320), default="")
    to: Mapped[list[Any]] = mapped_column(default=list)
    cc: Mapped[list[Any]] = mapped_column(default=list)
    reply_to: Mapped[list[Any]] = mapped_column(default=list)
    sent_at: Mapped[datetime | None] = mapped_column()
    text: Mapped[str] = mapped_column(Text, default="")
    html: Mapped[str | None] = mapped_column(Text)
    raw_sha256: Mapped[str] = mapped_column(String(64))
    raw_size: Mapped[int] = mapped_column(BigInteger)
    defects: Mapped[list[Any]] = mapped_column(default=list)
    kind: Mapped[str] = mapped_column(String(16), default=MailKind.HUMAN)
    # What is new in this mail: the text without the quoted history and signature (the whole text is kept).
    new_text: Mapped[str | None] = mapped_column(Text)
    # Why this mail got no automatic answer (an auto-reply, a list, the rate limit …); NULL if it got one
    # or none was due (an outbound article).
    no_answer_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    ticket: Mapped[Ticket] = relationship(back_populates="articles")
    attachments: Mapped[list[Attachment]] = relationship(
        back_populates="article", order_by="Attachment.id", cascade="all, delete-orphan", lazy="selectin"
    )


class Attachment(Base):
    __tablename__ = "attachments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    article_id: Mapped[int] = mapped_column(ForeignKey("articles.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content_id: Mapped[str | None] = mapped_column(String(998))
    inline: Mapped[bool] = mapped_column(Boolean, default=False)

    article: Mapped[Article] = relationship(back_populates="attachments")


class QuarantinedMail(Base):
    __tablename__ = "quarantine"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mailbox: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(Text)  # where it came from, for a human
    stage: Mapped[str] = mapped_column(String(32))  # parse | store | internal
    reason: Mapped[str] = mapped_column(Text)
    retryable: Mapped[bool] = mapped_column(Boolean, default=False)
    # The raw bytes live in the row itself so that a quarantined mail is whole even if the file store is not.
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    message_id: Mapped[str | None] = mapped_column(String(998))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column()
    resolved_article_id: Mapped[int | None] = mapped_column(ForeignKey("articles.id"))


class Receipt(Base):
    """One row per mail taken from a source: what we did with it and whether the server was told."""

    __tablename__ = "receipts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mailbox: Mapped[str] = mapped_column(String(200))
    # IMAP: "<mailbox>/<uidvalidity>/<uid>"; Maildir: "<mailbox>/<unique name>"; NULL for file imports.
    source_key: Mapped[str | None] = mapped_column(String(500), unique=True)
    uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    uid: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str | None] = mapped_column(String(998))
    outcome: Mapped[str] = mapped_column(String(16))
    # A stored mail that went onto an existing ticket (`status` and `ingest` count these apart from new tickets).
    reply: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    article_id: Mapped[int | None] = mapped_column(ForeignKey("articles.id"))
    quarantine_id: Mapped[int | None] = mapped_column(ForeignKey("quarantine.id"))
    # False until the IMAP move/flag/delete (or Maildir move) that follows the commit has been done.
    server_done: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        Index("ix_receipts_mailbox_validity_uid", "mailbox", "uidvalidity", "uid"),
        Index("ix_receipts_pending", "mailbox", "server_done"),
    )


class MailboxState(Base):
    """What the daemon knows about each mailbox between runs, and what `mailbridge status` shows."""

    __tablename__ = "mailbox_state"
    mailbox: Mapped[str] = mapped_column(String(200), primary_key=True)
    uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    # UIDs up to baseline_uid were in the folder at the first run; what happens to them is `existing_mail`.
    baseline_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    initial_done: Mapped[bool] = mapped_column(Boolean, default=False)
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    connected: Mapped[bool] = mapped_column(Boolean, default=False)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None] = mapped_column()
    last_fetch_at: Mapped[datetime | None] = mapped_column()
    # The folder counted on the server against our receipts at the end of each fetch (last_fetch_at): its
    # mails; those without a receipt that the next fetch imports;
    # those without a receipt behind the high-water mark, which no fetch would import (must stay 0);
    # those `existing_mail` leaves alone.
    messages_in_folder: Mapped[int | None] = mapped_column(BigInteger)
    waiting: Mapped[int | None] = mapped_column(BigInteger)
    missing: Mapped[int | None] = mapped_column(BigInteger)
    left_by_existing_mail: Mapped[int | None] = mapped_column(BigInteger)


class OutboxMail(Base):
    """A mail we send, complete as it goes on the wire; written in the transaction of the event that
    causes it, and delivered from here after that commit."""

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"), index=True)
    # The inbound article this mail answers (an acknowledgement answers the ticket's first mail).
    article_id: Mapped[int | None] = mapped_column(ForeignKey("articles.id"))
    template: Mapped[str] = mapped_column(String(64))
    mailbox: Mapped[str] = mapped_column(String(200))
    message_id: Mapped[str] = mapped_column(String(998), unique=True)
    envelope_from: Mapped[str] = mapped_column(String(320))
    recipients: Mapped[list[Any]] = mapped_column(default=list)
    # The first recipient, lower-cased: the rate limit counts automatic mail per address.
    recipient: Mapped[str] = mapped_column(String(320))
    automatic: Mapped[bool] = mapped_column(Boolean, default=True)
    subject: Mapped[str] = mapped_column(Text, default="")
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16), default=OutboxStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    deliver_until: Mapped[datetime] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column()
    bounced_at: Mapped[datetime | None] = mapped_column()
    # The bounce (an inbound article) that came back for this mail.
    bounce_article_id: Mapped[int | None] = mapped_column(ForeignKey("articles.id"))
    # Which sender has taken the mail to deliver it, and until when: another instance's sender claims
    # only mails without a claim or with one that ran out (its holder died).
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    claimed_until: Mapped[datetime | None] = mapped_column()

    __table_args__ = (
        Index("ix_outbox_due", "status", "next_attempt_at"),
        Index("ix_outbox_recipient_created", "recipient", "created_at"),
    )


class ParticipantRole(enum.StrEnum):
    CUSTOMER = "customer"
    CC = "cc"  # on the Cc of a mail of the ticket
    AGENT = "agent"


class TicketParticipant(Base):
    """Who may write into a ticket by mail without a signed reference of ours."""

    __tablename__ = "ticket_participants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"))
    address: Mapped[str] = mapped_column(String(320))  # lower-cased
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ux_participants_ticket_address", "ticket_id", "address", unique=True),)


class TicketEvent(Base):
    """The ticket's history: every status change and decision, with who and when."""

    __tablename__ = "ticket_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(320))  # an address, or "mailbridge"
    kind: Mapped[str] = mapped_column(String(32))  # created, status, reply, linked, merged …
    old: Mapped[str | None] = mapped_column(Text)
    new: Mapped[str | None] = mapped_column(Text)
    article_id: Mapped[int | None] = mapped_column(ForeignKey("articles.id"))
    # PostgreSQL: the transaction that wrote the event (pg_current_xact_id(), a server default), so the SLA
    # planner reads the history in commit order (migration 0011). NULL on SQLite, where ids are in that order.
    xact_id: Mapped[int | None] = mapped_column(BigInteger, server_default=FetchedValue())

    __table_args__ = (
        # The reports' reopen count: status changes back to open, without reading the rest of the history.
        Index("ix_ticket_events_kind_new_old", "kind", "new", "old", "ticket_id"),
        Index("ix_ticket_events_xact_id", "xact_id", "id"),
    )


class SlaTimer(Base):
    """A reminder (share < 1) or the escalation at a breach (share 1) of one SLA target of a ticket.
    Done once: `done_at` is set in the transaction that queues its mail."""

    __tablename__ = "sla_timers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"))
    target: Mapped[str] = mapped_column(String(32))  # first_response | resolution
    share: Mapped[float] = mapped_column(Float)
    fire_at: Mapped[datetime | None] = mapped_column()  # NULL: not scheduled (clock stopped, target met)
    done_at: Mapped[datetime | None] = mapped_column()
    outcome: Mapped[str | None] = mapped_column(Text)  # what was done, for `tickets show`

    __table_args__ = (
        Index("ux_sla_timers_ticket_target_share", "ticket_id", "target", "share", unique=True),
        Index("ix_sla_timers_due", "done_at", "fire_at"),
    )


class SlaCursor(Base):
    """How far the SLA planner has read the ticket history (the id of the last event it planned from),
    and since when SLAs apply: tickets older than the first start with policies get none, rather than a
    flood of escalations for deadlines that passed before anyone set them."""

    __tablename__ = "sla_cursor"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_event_id: Mapped[int] = mapped_column(Integer, default=0)
    last_xact_id: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # PostgreSQL only
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A digest of the SLA settings the open tickets are planned under: when the settings change (a
    # restart with other targets, calendar, reminders), every open ticket is planned again, once.
    settings_digest: Mapped[str | None] = mapped_column(String(64))


class CrmHealth(Base):
    """How the CRM lookups went, for `mailbridge status` (another process than the daemon that asks): one
    row, written in the intake's batch transaction when a lookup was made or a ticket flagged."""

    __tablename__ = "crm_health"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)  # "crm"
    last_success_at: Mapped[datetime | None] = mapped_column()  # the CRM answered (a customer, or "not known")
    last_failure_at: Mapped[datetime | None] = mapped_column()  # timed out, refused, an HTTP error, not JSON
    last_problem: Mapped[str | None] = mapped_column(Text)
    # New tickets routed by the rules alone and flagged because the CRM could not say who the customer is.
    flagged_tickets: Mapped[int] = mapped_column(BigInteger, default=0)
    last_flagged_at: Mapped[datetime | None] = mapped_column()


class Instance(Base):
    """A running daemon (`mailbridge run`) on this database: it counts towards the fair share of mailboxes
    while `alive_until` lies ahead, and renews that with its leases."""

    __tablename__ = "instances"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    alive_until: Mapped[datetime] = mapped_column()


class MailboxLease(Base):
    """Which instance fetches a mailbox, and until when: one holder at a time, taken over by another
    instance once `expires_at` has passed without a renewal (its holder died or lost the database)."""

    __tablename__ = "mailbox_leases"
    mailbox: Mapped[str] = mapped_column(String(200), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(200))
    expires_at: Mapped[datetime | None] = mapped_column()
    acquired_at: Mapped[datetime | None] = mapped_column()
