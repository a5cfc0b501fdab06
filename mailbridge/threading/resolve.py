"""Thread stage: does an incoming mail continue a ticket, and may its sender write into it?

In this order: a signed Message-ID of ours in In-Reply-To/References (proof that the sender got our mail);
a Message-ID of a mail already on a ticket; the ticket reference in the subject; the reference in the footer
of our mails quoted in the body. Only the first proves anything by itself. A match by the others lets the
mail in only when its sender takes part in the ticket (its customer, an address on the Cc of its mails, an
agent); anyone else gets a new ticket, linked to the one it claimed and flagged for triage, and learns
nothing of the old one. A sender whose DMARC failed at one of our trusted receiving servers is a stranger
whatever it quotes, and so is one that names a Message-ID of ours with a wrong signature (a forgery). A
ticket merged into another stands for the one it went into. Every decision is logged with its reason.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailbridge.config import TicketSettings
from mailbridge.db import chunked
from mailbridge.ingest.mail import ParsedMail
from mailbridge.models import Article, Ticket, TicketParticipant, TicketStatus
from mailbridge.threading.message_ids import read_message_id
from mailbridge.threading.ticket_refs import TicketRefs
from mailbridge.tickets import ticket_number

log = logging.getLogger("mailbridge.threading")


@dataclass(frozen=True, slots=True)
class Thread:
    """Where a mail goes. `ticket_id` None: a new ticket (linked to `linked_ticket_id`, flagged when
    `triage_reason` is set)."""

    ticket_id: int | None = None
    linked_ticket_id: int | None = None
    triage_reason: str | None = None
    reason: str = "no reference to a ticket: a new ticket"

    @property
    def is_reply(self) -> bool:
        return self.ticket_id is not None


NEW = Thread()


@dataclass(frozen=True, slots=True)
class _Claim:
    ticket_id: int
    how: str
    proven: bool
    forged: bool = False  # a Message-ID of ours whose signature is wrong: made up or altered


class Threader:
    def __init__(
        self,
        secret: bytes,
        tickets: TicketSettings,
        agents: Collection[str],
        trusted_authserv_ids: Collection[str],
        reopen_days: float,
    ) -> None:
        self.secret = secret
        self.refs = TicketRefs(tickets)
        self.tickets = tickets
        self.agents = {a.lower() for a in agents}
        self.trusted = {a.lower() for a in trusted_authserv_ids}
        self.reopen_window = timedelta(days=reopen_days)

    def resolve(self, session: Session, mails: Sequence[ParsedMail], now: datetime) -> list[Thread]:
        claims = self._claims(session, mails)
        tickets = _with_merge_targets(session, {c.ticket_id for c in claims if c is not None})
        participants = _participants(session, tickets.keys())
        threads = []
        for mail, claim in zip(mails, claims, strict=True):
            thread = self._decide(mail, claim, tickets, participants, now)
            if thread is not NEW:
                log.info(
                    "threading: %s",
                    thread.reason,
                    extra={"message_id": mail.message_id, "sender": _sender(mail), "ticket_id": thread.ticket_id},
                )
            threads.append(thread)
        return threads

    def _decide(
        self,
        mail: ParsedMail,
        claim: _Claim | None,
        tickets: dict[int, Ticket],
        participants: dict[int, set[str]],
        now: datetime,
    ) -> Thread:
        if claim is None:
            return NEW
        claimed = tickets.get(claim.ticket_id)
        if claimed is None:
            return Thread(reason=f"{claim.how} names a ticket that does not exist: a new ticket")
        # A ticket merged into another lives on in it: so do the mails that name it, and its participants.
        ticket = _surviving(claimed, tickets)
        if ticket is not claimed:
            claim = replace(claim, how=f"{claim.how}, merged into {ticket.number}")
        sender = _sender(mail)
        dmarc = self._dmarc_failed(mail)
        if dmarc:
            return self._stranger(ticket, f"{claim.how}, but DMARC failed for {sender} ({dmarc})")
        if claim.forged:
            # Nobody who got our mail has such a Message-ID: whoever sends it is not to be believed, whatever
            # address the mail claims to come from (a participant's is easy to put in a From).
            return self._stranger(ticket, claim.how)
        agent = self.is_agent(mail)
        if not claim.proven and sender not in participants.get(ticket.id, set()) and not agent:
            return self._stranger(ticket, f"{claim.how}, but {sender or 'the sender'} takes no part in it")
        how = f"{claim.how}; {'proven by our signature' if claim.proven else f'{sender} takes part in it'}"
        if ticket.status == TicketStatus.CLOSED and not agent:
            closed_at = ticket.closed_at or ticket.updated_at
            if now - closed_at > self.reopen_window:
                return Thread(
                    linked_ticket_id=ticket.id,
                    reason=f"{how}, but {ticket.number} was closed on {closed_at:%Y-%m-%d}: a new ticket linked to it",
                )
            return Thread(ticket_id=ticket.id, reason=f"{how}: reopens {ticket.number}")
        return Thread(ticket_id=ticket.id, reason=f"{how}: a reply on {ticket.number}")

    def _stranger(self, ticket: Ticket, why: str) -> Thread:
        return Thread(
            linked_ticket_id=ticket.id,
            triage_reason=f"claims to continue {ticket.number}: {why}",
            reason=f"{why}: a new ticket, flagged for triage",
        )

    def _claims(self, session: Session, mails: Sequence[ParsedMail]) -> list[_Claim | None]:
        claims: list[_Claim | None] = []
        inbound: list[list[str]] = []
        for mail in mails:
            claim = None
            forged = None
            ids = referenced_ids(mail)
            for message_id in ids:
                ours = read_message_id(message_id, self.secret)
                if ours is not None and ours.valid:
                    claim = _Claim(ours.ticket_id, f"it answers our mail <{message_id}>", proven=True)
                    break
                if ours is not None and forged is None:
                    forged = _Claim(
                        ours.ticket_id,
                        f"it names <{message_id}>, a Message-ID of ours with a wrong signature",
                        proven=False,
                        forged=True,
                    )
            claims.append(claim or forged)
            inbound.append(ids if claim is None else [])
        by_message_id = _articles_by_message_id(session, [i for ids in inbound for i in ids])
        numbers = {}
        for index, mail in enumerate(mails):
            if claims[index] is not None and claims[index].proven:  # type: ignore[union-attr]
                continue
            found = _conversation_ticket(inbound[index], by_message_id)
            if found is not None:
                if claims[index] is None:
                    claims[index] = _Claim(by_message_id[found][0], f"it answers <{found}>, a mail on a ticket", False)
                continue
            if claims[index] is not None:
                continue
            number, where = self.refs.in_subject(mail.subject), "subject"
            if number is None:
                number, where = self.refs.in_footer(mail.text), "quoted footer"
            if number is not None:
                numbers[index] = (number, where)
        if numbers:
            for index, (number, where) in numbers.items():
                claims[index] = _Claim(number, f"its {where} names {ticket_number(self.tickets, number)}", False)
        return claims

    def _dmarc_failed(self, mail: ParsedMail) -> str | None:
        """The verdict of a trusted receiving server, if it says DMARC failed."""
        verdict = dmarc_verdict(mail, self.trusted)
        return f"Authentication-Results from a trusted server: dmarc={verdict}" if verdict == "fail" else None

    def is_agent(self, mail: ParsedMail) -> bool:
        """An agent may act on any ticket, so the From alone is not enough where it can be checked: with
        trusted receiving servers configured, their DMARC verdict must be pass."""
        if _sender(mail) not in self.agents:
            return False
        return not self.trusted or dmarc_verdict(mail, self.trusted) == "pass"


def dmarc_verdict(mail: ParsedMail, trusted: Collection[str]) -> str | None:
    """pass / fail / … from the first Authentication-Results header added by a trusted server."""
    for value in mail.header_values("authentication-results"):
        authserv = value.split(";", 1)[0].strip().split()[0].lower() if value.strip() else ""
        if authserv in trusted:
            match = re.search(r"\bdmarc\s*=\s*([a-z]+)", value, re.IGNORECASE)
            return match.group(1).lower() if match else None
    return None


def referenced_ids(mail: ParsedMail) -> list[str]:
    """The mail's references to other mails, most specific first."""
    ids: list[str] = []
    if mail.report is not None:
        ids += mail.report.returned_message_ids
    if mail.in_reply_to:
        ids.append(mail.in_reply_to)
    ids += reversed(mail.references)
    return list(dict.fromkeys(ids))


def _sender(mail: ParsedMail) -> str:
    return mail.sender.address.lower() if mail.sender else ""


def _tickets(session: Session, ids: Collection[int]) -> dict[int, Ticket]:
    found: dict[int, Ticket] = {}
    for chunk in chunked(sorted(ids)):
        found.update({t.id: t for t in session.scalars(select(Ticket).where(Ticket.id.in_(chunk)))})
    return found


def _with_merge_targets(session: Session, ids: Collection[int]) -> dict[int, Ticket]:
    """The tickets, and the tickets they were merged into, down to the end of every chain."""
    found = _tickets(session, ids)
    looked_up = set(ids)
    while wanted := {t.merged_into_id for t in found.values() if t.merged_into_id} - looked_up:
        found.update(_tickets(session, wanted))
        looked_up |= wanted
    return found


def _surviving(ticket: Ticket, tickets: dict[int, Ticket]) -> Ticket:
    """The ticket a merged one went into, following merges of merges; a chain that loops back (only a
    hand-edited database can make one) stops at the last ticket before the loop."""
    seen = {ticket.id}
    while ticket.merged_into_id is not None:
        target = tickets.get(ticket.merged_into_id)
        if target is None or target.id in seen:
            break
        seen.add(target.id)
        ticket = target
    return ticket


def _participants(session: Session, ticket_ids: Collection[int]) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for chunk in chunked(sorted(ticket_ids)):
        rows = session.execute(
            select(TicketParticipant.ticket_id, TicketParticipant.address).where(TicketParticipant.ticket_id.in_(chunk))
        )
        for ticket_id, address in rows:
            found.setdefault(ticket_id, set()).add(address)
    return found


def _conversation_ticket(ids: Sequence[str], known: dict[str, tuple[int, bool]]) -> str | None:
    """Of the mails a mail refers to, the one whose ticket carries the conversation: a ticket not flagged
    for triage before a flagged one (a reply to a stranger's mail still belongs to the thread), and the
    root of the References chain before its later mails."""
    found = [i for i in ids if i in known]
    if not found:
        return None
    root_first = list(reversed(found))
    return next((i for i in root_first if not known[i][1]), root_first[0])


def _articles_by_message_id(session: Session, message_ids: Collection[str]) -> dict[str, tuple[int, bool]]:
    """Message-ID -> (ticket id, whether that ticket is flagged for triage)."""
    found: dict[str, tuple[int, bool]] = {}
    for chunk in chunked(sorted(set(message_ids))):
        rows = session.execute(
            select(Article.message_id, Article.ticket_id, Ticket.triage_reason)
            .join(Ticket, Ticket.id == Article.ticket_id)
            .where(Article.message_id.in_(chunk))
        )
        found.update({mid: (ticket, flag is not None) for mid, ticket, flag in rows if mid})
    return found
