"""Agents work by e-mail: an agent's reply to a ticket mail is recorded as an outbound article and relayed
through the outbox to the customer and the ticket's other participants, from the mailbox's address, with
the ticket reference and threading headers, without the agent's quoted history. Commands on the first
lines act on the ticket instead: `#note` (an internal note, not relayed), `#status waiting|
waiting-third-party|open|closed`, `#assign <agent>`, `#priority P1..P4`."""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailbridge.blobstore import BlobStore
from mailbridge.classify import Verdict
from mailbridge.config import Agent, Settings
from mailbridge.ingest.mail import Address, ParsedMail
from mailbridge.lifecycle import change_status
from mailbridge.models import (
    Article,
    Attachment,
    Contact,
    Direction,
    MailKind,
    ParticipantRole,
    Ticket,
    TicketEvent,
    TicketParticipant,
    TicketStatus,
)
from mailbridge.notify.outbox import RecentCounts, automatic_mail_counts, enqueue
from mailbridge.notify.render import FileToSend, sendable
from mailbridge.notify.status import StatusMailer
from mailbridge.notify.writer import Letter, MailWriter
from mailbridge.threading.reply_text import new_text
from mailbridge.threading.resolve import Threader
from mailbridge.tickets import ticket_number

log = logging.getLogger("mailbridge.agents")

STATUS_WORDS = {
    "open": TicketStatus.OPEN,
    "waiting": TicketStatus.WAITING_CUSTOMER,
    "waiting-customer": TicketStatus.WAITING_CUSTOMER,
    "waiting-third-party": TicketStatus.WAITING_THIRD_PARTY,
    "closed": TicketStatus.CLOSED,
    "close": TicketStatus.CLOSED,
}
_COMMAND = re.compile(r"^#(note|status|assign|priority)\b[ \t]*(.*)$", re.IGNORECASE)
_PRIORITY = re.compile(r"^P[1-4]$", re.IGNORECASE)
MAX_RELAYED_BYTES = 20_000_000  # what mail servers commonly accept, with base64's third on top


@dataclass
class Commands:
    note: bool = False
    status: str | None = None
    assign: str | None = None
    priority: str | None = None
    problems: list[str] = field(default_factory=list)
    text: str = ""  # what is left to relay


def read_commands(text: str) -> Commands:
    """Commands are the lines at the very top that start with '#'; the rest is the answer."""
    commands = Commands()
    lines = text.strip().splitlines()
    taken = 0
    for line in lines:
        match = _COMMAND.match(line.strip())
        if match is None:
            break
        taken += 1
        name, argument = match.group(1).lower(), match.group(2).strip()
        if name == "note":
            commands.note = True
        elif name == "status":
            status = STATUS_WORDS.get(argument.lower())
            if status is None:
                commands.problems.append(f"#status {argument}: use open, waiting, waiting-third-party or closed")
            commands.status = status
        elif name == "assign":
            commands.assign = argument.lower() or None
        elif name == "priority":
            if _PRIORITY.match(argument):
                commands.priority = argument.upper()
            else:
                commands.problems.append(f"#priority {argument}: use P1, P2, P3 or P4")
    commands.text = "\n".join(lines[taken:]).strip()
    return commands


class AgentDesk:
    def __init__(
        self,
        settings: Settings,
        writer: MailWriter,
        own_addresses: Collection[str],
        status_mailer: StatusMailer,
        threader: Threader,
    ) -> None:
        self.writer = writer
        self.status_mailer = status_mailer
        self.threader = threader
        self.settings = settings
        self.agents: dict[str, Agent] = {a.address.lower(): a for a in settings.agents}
        self.own_addresses = set(own_addresses)
        self.boxes = {box.name: box for box in settings.mailboxes if settings.can_send(box)}
        self.retry_for = timedelta(hours=settings.outbox.retry_for_hours)
        self.blobs = BlobStore(settings.storage_path / "blobs")

    def is_agent(self, mail: ParsedMail) -> bool:
        return self.threader.is_agent(mail)

    def answer(
        self, session: Session, mailbox: str, ticket_id: int, article_id: int, mail: ParsedMail, now: datetime
    ) -> None:
        """An agent's mail on a ticket: its commands, then (unless a #note) the relay to the customer."""
        assert mail.sender is not None
        agent = self.agents[mail.sender.address.lower()]
        ticket = session.get(Ticket, ticket_id)
        article = session.get(Article, article_id)
        assert ticket is not None and article is not None
        # The parser only looks for quoted history in replies to our mails; an agent's is always needed.
        commands = read_commands(mail.new_text if mail.new_text is not None else new_text(mail.text))
        actor = agent.address.lower()
        if commands.assign is not None:
            owner = self._agent_by_name(commands.assign)
            if owner is None:  # a typo must not take the ticket away from its owner
                commands.problems.append(
                    f"#assign {commands.assign}: no agent has that name or address, so the ticket stays with "
                    f"{ticket.owner or 'nobody'}; the agents are "
                    + ", ".join(f"{a.name} <{a.address}>" if a.name else a.address for a in self.agents.values())
                )
            else:
                session.add(
                    TicketEvent(ticket_id=ticket.id, at=now, actor=actor, kind="assign", old=ticket.owner, new=owner)
                )
                ticket.owner = owner
        for problem in commands.problems:
            log.warning("agent %s on %s: %s", actor, ticket.number, problem)
        if commands.problems:
            self._explain(session, mailbox, ticket, mail, commands.problems, now)
        if commands.priority is not None:
            session.add(
                TicketEvent(
                    ticket_id=ticket.id,
                    at=now,
                    actor=actor,
                    kind="priority",
                    old=ticket.priority,
                    new=commands.priority,
                )
            )
            ticket.priority = commands.priority
        article.new_text = commands.text
        if commands.note:
            article.direction = Direction.NOTE
            article.no_answer_reason = "an internal note (#note): not sent"
        elif commands.text:
            article.direction = Direction.OUTBOUND
            self._relay(session, mailbox, ticket, article, agent, commands.text, now)
            if ticket.first_response_at is None:
                ticket.first_response_at = now
                session.add(
                    TicketEvent(ticket_id=ticket.id, at=now, actor=actor, kind="first_response", article_id=article.id)
                )
            if commands.status is None and ticket.status == TicketStatus.NEW:
                change_status(session, ticket, TicketStatus.OPEN, actor, now)
        if commands.status is not None:
            old = change_status(session, ticket, commands.status, actor, now)
            if old is not None:
                self.status_mailer.changed(session, ticket, old, commands.status, now)

    def refuse(self, session: Session, mailbox: str, mail: ParsedMail, verdict: Verdict, now: datetime) -> str:
        """An agent's mail that answers no ticket: a short explanation back to the agent; returns the reason
        to keep the mail by (in quarantine, never dropped). An agent's out-of-office or bounce gets no
        explanation, and explanations count towards the per-address limit on automatic mails."""
        if verdict.kind is not MailKind.HUMAN:
            return f"an agent's automatic mail ({verdict.no_answer_reason}) that answers no ticket: not answered"
        reason = "an agent's mail that answers no ticket mail: not sent to anyone"
        box = self.boxes.get(mailbox)
        if box is None or box.address is None or mail.sender is None:
            return reason
        address = mail.sender.address.lower()
        limited = (
            automatic_mail_counts(session, [address], now).get(address, RecentCounts()).take(box.rate_limit, address)
        )
        if limited:
            log.warning("no explanation to agent %s: %s", address, limited)
            return f"{reason} (no explanation sent: {limited})"
        context = {
            "original": {"subject": mail.subject},
            "reference_example": ticket_number(self.settings.tickets, 123),
        }
        self._answer_agent(session, Letter("agent_unmatched", box, context, to=[mail.sender]), mail, now)
        return reason

    def _explain(
        self, session: Session, mailbox: str, ticket: Ticket, mail: ParsedMail, problems: list[str], now: datetime
    ) -> None:
        """Tell the agent which of their commands were not carried out, and why, within the per-address
        limit on automatic mails (an agent's script or a loop must not make us answer every mail). The
        refusal is kept in the ticket's history either way, with what became of the explanation."""
        assert mail.sender is not None
        address = mail.sender.address.lower()
        box = self.boxes.get(ticket.mailbox) or self.boxes.get(mailbox)
        if box is None or box.address is None:
            outcome = "no explanation sent: the mailbox sends no mail"
        elif limited := (
            automatic_mail_counts(session, [address], now).get(address, RecentCounts()).take(box.rate_limit, address)
        ):
            log.warning("no explanation to agent %s on %s: %s", address, ticket.number, limited)
            outcome = f"no explanation sent: {limited}"
        else:
            context = self.writer.ticket_context(ticket, box, original={"subject": mail.subject}, problems=problems)
            letter = Letter("agent_commands_refused", box, context, to=[mail.sender], ticket_id=ticket.id)
            self._answer_agent(session, letter, mail, now)
            outcome = f"explained to {address}"
        session.add(
            TicketEvent(
                ticket_id=ticket.id,
                at=now,
                actor=address,
                kind="commands_refused",
                new=f"{'; '.join(problems)} ({outcome})",
            )
        )

    def _answer_agent(self, session: Session, letter: Letter, mail: ParsedMail, now: datetime) -> None:
        """Queue an explanation to the agent, threaded under the agent's own mail."""
        references = [*mail.references, *([mail.message_id] if mail.message_id else [])]
        outgoing = self.writer.write(replace(letter, in_reply_to=mail.message_id, references=references))
        enqueue(session, [outgoing], now, self.retry_for)

    def _relay(
        self, session: Session, mailbox: str, ticket: Ticket, article: Article, agent: Agent, text: str, now: datetime
    ) -> None:
        box = self.boxes.get(ticket.mailbox) or self.boxes.get(mailbox)
        if box is None or box.address is None:
            article.no_answer_reason = f"mailbox {ticket.mailbox} sends no mail: the answer was not relayed"
            log.error("cannot relay the agent's answer on %s: %s", ticket.number, article.no_answer_reason)
            return
        to, cc = self._recipients(session, ticket)
        if not to:
            article.no_answer_reason = "no customer address to relay the answer to"
            return
        thread = list(
            session.scalars(
                select(Article.message_id)
                .where(
                    Article.ticket_id == ticket.id,
                    Article.message_id.is_not(None),
                    Article.id != article.id,
                    Article.direction != Direction.NOTE,  # internal: not even their Message-IDs go out
                )
                .order_by(Article.id)
            )
        )
        last_inbound = session.scalars(
            select(Article.message_id)
            .where(Article.ticket_id == ticket.id, Article.direction == Direction.INBOUND, Article.id != article.id)
            .order_by(Article.id.desc())
        ).first()
        context = self.writer.ticket_context(
            ticket, box, agent={"name": agent.name, "address": agent.address}, reply=text
        )
        outgoing = self.writer.write(
            Letter(
                "agent_reply",
                box,
                context,
                to=to,
                cc=cc,
                ticket_id=ticket.id,
                article_id=article.id,
                in_reply_to=last_inbound,
                references=[m for m in thread if m],
                sender_name=f"{agent.name} ({box.from_name})" if agent.name else None,
                auto_submitted=None,
                rate_limited=False,
                files=self._attachments(session, article),
            )
        )
        enqueue(session, [outgoing], now, self.retry_for)

    def _attachments(self, session: Session, article: Article) -> list[FileToSend]:
        """The agent's attachments, from the blob store, up to what mail servers commonly accept."""
        files: list[FileToSend] = []
        total = 0
        for part in session.scalars(
            select(Attachment).where(Attachment.article_id == article.id).order_by(Attachment.id)
        ):
            total += part.size
            if total > MAX_RELAYED_BYTES:
                article.no_answer_reason = f"attachments over {MAX_RELAYED_BYTES // 1_000_000} MB were not relayed"
                log.warning("%s on ticket %s", article.no_answer_reason, article.ticket_id)
                break
            try:
                data = self.blobs.path(part.sha256).read_bytes()
            except OSError as exc:
                article.no_answer_reason = f"attachment {part.filename} could not be read: {exc.strerror}"
                log.error("%s", article.no_answer_reason)
                continue
            files.append(FileToSend(part.filename, part.content_type, data))
        return files

    def _recipients(self, session: Session, ticket: Ticket) -> tuple[list[Address], list[Address]]:
        customer = session.get(Contact, ticket.customer_id)
        others = session.scalars(
            select(TicketParticipant.address).where(
                TicketParticipant.ticket_id == ticket.id, TicketParticipant.role == ParticipantRole.CC
            )
        ).all()
        skip = self.own_addresses | set(self.agents)
        to = [Address(customer.name, customer.address)] if customer and customer.address not in skip else []
        to = [a for a in to if sendable(a)]
        taken = {a.address for a in to}
        cc = [Address("", a) for a in others if a not in skip and a not in taken and sendable(Address("", a))]
        return to, cc

    def _agent_by_name(self, name: str) -> str | None:
        """An agent's address from their address, name or the local part of their address."""
        wanted = name.lower().lstrip("@")
        if "@" in wanted:
            return wanted if wanted in self.agents else None
        for address, agent in self.agents.items():
            if agent.name.lower() == wanted or address.split("@")[0] == wanted:
                return address
        return None
