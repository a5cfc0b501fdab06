"""The pipeline: parse -> classify -> thread (onto our own mails, for now) -> store -> notify, one
transaction per batch, with receipts that make a mail fetched twice a no-op.

Side effects are not done here: the source moves the mail on the server in its `committed` callback,
i.e. after the commit, and then calls `mark_server_done`; acknowledgements are only written to the
outbox table, and the sender delivers them after the commit (`outbox_ready` wakes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from mailbridge import lifecycle, receipts, tickets
from mailbridge.agents import AgentDesk
from mailbridge.assignment import Assigner
from mailbridge.config import TicketSettings
from mailbridge.customers import CrmAnswer
from mailbridge.db import Database
from mailbridge.ingest.mail import ParsedMail, ParseFailure
from mailbridge.ingest.parse_pool import ParsePool
from mailbridge.ingest.raw import RawMail
from mailbridge.leases import LeaseLost
from mailbridge.models import MailKind, OutboxStatus, Outcome, QuarantinedMail, utcnow
from mailbridge.notify.acks import Acknowledger, NewTicket
from mailbridge.quarantine import quarantine
from mailbridge.routing import Decision, Router
from mailbridge.threading.our_mail import find_our_mails
from mailbridge.threading.resolve import Threader

if TYPE_CHECKING:
    from mailbridge.crm import Crm

log = logging.getLogger("mailbridge.pipeline")

# What the CRM said about the senders of a batch, by address (lower-case).
CrmAnswers = Mapping[str, CrmAnswer]


@dataclass(frozen=True, slots=True)
class Result:
    raw: RawMail
    outcome: Outcome
    ticket: str | None = None
    article_id: int | None = None
    quarantine_id: int | None = None
    reason: str | None = None
    message_id: str | None = None
    seen_before: bool = False  # the receipt existed: fetched again after a crash before the server was told
    acknowledged: bool = False  # an acknowledgement was put in the outbox
    reply: bool = False  # stored on an existing ticket


class Pipeline:
    def __init__(
        self,
        db: Database,
        parser: ParsePool,
        ticket_settings: TicketSettings,
        threader: Threader,
        answers: Acknowledger,
        desk: AgentDesk,
        router: Router,
        assigner: Assigner,
        crm: Crm | None = None,
        recorded: Callable[[Sequence[Result]], None] | None = None,
    ) -> None:
        self.db = db
        self.parser = parser
        self.ticket_settings = ticket_settings
        self.threader = threader
        self.answers = answers
        self.desk = desk
        self.router = router
        self.assigner = assigner
        self.crm = crm
        self.recorded = recorded  # told each batch's results after its commit (the daemon's metrics)
        self.outbox_ready = asyncio.Event()  # set after a commit that put mail in the outbox
        # Several instances: checks, in the transaction that records a batch, that its mailbox is still
        # leased to us (raises LeaseLost); None when fetching is not under leases (`run --once`, `ingest`).
        self.fence: Callable[[Session, Collection[str]], None] | None = None

    def parse(self, batch: Sequence[RawMail]) -> asyncio.Future[list[ParsedMail | ParseFailure]]:
        """Start parsing at once; callers overlap this with recording the previous batch."""
        return asyncio.ensure_future(
            self.parser.parse_many([raw.data for raw in batch], [raw.mailbox for raw in batch])
        )

    def prepare(self, batch: Sequence[RawMail]) -> asyncio.Future[tuple[list[ParsedMail | ParseFailure], CrmAnswers]]:
        """Parse, then ask the CRM about the senders, while the previous batch is being recorded."""

        async def prepared() -> tuple[list[ParsedMail | ParseFailure], CrmAnswers]:
            parsed = await self.parse(batch)
            return parsed, await self.ask_crm(parsed)

        return asyncio.ensure_future(prepared())

    async def record(
        self,
        batch: Sequence[RawMail],
        parsed: Sequence[ParsedMail | ParseFailure],
        crm: CrmAnswers | None = None,
    ) -> list[Result]:
        if crm is None:  # before the transaction: no network wait while the database is held
            crm = await self.ask_crm(parsed)
        try:
            results = await self.db.run(self._record_batch, batch, parsed, crm)
        except LeaseLost:
            raise  # not this batch's fault: nothing of it may be recorded by us
        except Exception:
            if len(batch) == 1:
                results = await self.db.run(self._record_alone, batch[0], parsed[0], crm)
            else:
                log.exception("recording a batch of %d failed; recording its mails one at a time", len(batch))
                results = []
                for raw, mail in zip(batch, parsed, strict=True):
                    results += await self.db.run(self._record_alone, raw, mail, crm)
        for result in results:
            _log_result(result)
        if self.recorded is not None:
            self.recorded(results)
        if any(result.acknowledged for result in results):
            self.outbox_ready.set()
        return results

    async def ask_crm(self, parsed: Sequence[ParsedMail | ParseFailure]) -> CrmAnswers:
        """Who the senders the directory does not know are, from the CRM (at most its timeout)."""
        if self.crm is None:
            return {}
        addresses = {address for mail in parsed if isinstance(mail, ParsedMail) and (address := self._crm_asks(mail))}
        if not addresses:
            return {}
        try:
            return await self.crm.look_up(addresses)
        except Exception as exc:  # our bug: the mail is still routed (by the rules alone) and stored
            log.exception("asking the CRM failed; routing %d sender(s) by the rules alone", len(addresses))
            failed = CrmAnswer(None, f"the CRM lookup failed ({type(exc).__name__}: {exc})")
            return dict.fromkeys(addresses, failed)

    def _crm_asks(self, mail: ParsedMail) -> str | None:
        """The sender's address if the CRM should be asked about it: not ours, not an agent, not in the directory."""
        if mail.sender is None:
            return None
        address = mail.sender.address.lower()
        if address in self.answers.own_addresses or self.desk.is_agent(mail) or self.router.knows(address):
            return None
        return address

    async def process_stream(
        self,
        batches: AsyncGenerator[list[RawMail], None],
        committed: Callable[[list[Result]], Awaitable[None]],
        depth: int = 3,
    ) -> None:
        """Keep every resource busy during a backlog: batch k is recorded (database thread) while batch
        k+1 is parsed (worker processes; then its senders are looked up in the CRM) and the source fetches
        batch k+2. Batches are committed in order, and `committed` (the server-side move) runs after each
        commit, in order, while the next batch goes on: waiting for the server's answer to the move of
        batch k before recording batch k+1 left the parser workers idle for a round trip per batch. When
        `batches` ends early (stop requested), what is already being parsed is still recorded: the mail in
        hand is finished."""
        in_flight: deque[tuple[list[RawMail], asyncio.Future[tuple[list[ParsedMail | ParseFailure], CrmAnswers]]]] = (
            deque()
        )
        telling: asyncio.Future[None] | None = None  # the previous batch's `committed`, still running

        async def record_and_tell() -> None:
            nonlocal telling
            raws, preparing = in_flight.popleft()
            results = await self.record(raws, *await preparing)
            if telling is not None:
                await telling  # one at a time, in commit order; its failure stops the stream here
            telling = asyncio.ensure_future(committed(results))

        try:
            async with contextlib.aclosing(batches):
                async for batch in batches:
                    if not batch:
                        continue
                    in_flight.append((batch, self.prepare(batch)))
                    if len(in_flight) >= depth:
                        await record_and_tell()
            while in_flight:
                await record_and_tell()
            if telling is not None:
                await telling
        finally:
            for _, preparing in in_flight:
                preparing.cancel()
            if telling is not None and not telling.done():
                # Failing already: the move still finishes (a half-sent IMAP command would desync the
                # connection); what it did not do, the next drain does (the receipts say what is stored).
                with contextlib.suppress(Exception):
                    await telling

    async def mark_server_done(self, source_keys: Sequence[str]) -> None:
        if source_keys:
            await self.db.run(self._mark_server_done, list(source_keys))

    async def retry_quarantined(self, quarantine_id: int) -> Result:
        """Run the pipeline again on a quarantined mail (after a fix); it stays quarantined if it fails again."""
        item = await self.db.run(self._load_quarantined, quarantine_id)
        raw = RawMail(mailbox=item.mailbox, source=item.source, data=item.raw)
        parsed = await self.parser.parse(raw.data, raw.mailbox)
        crm = await self.ask_crm([parsed])
        result = await self.db.run(self._record_retry, item.id, raw, parsed, crm)
        _log_result(result)
        return result

    # --- inside the database thread -------------------------------------------------------------

    def _record_batch(
        self, batch: Sequence[RawMail], parsed: Sequence[ParsedMail | ParseFailure], crm: CrmAnswers
    ) -> list[Result]:
        with self.db.unit_of_work() as session:
            if self.fence is not None:
                self.fence(session, {raw.mailbox for raw in batch})
            seen = receipts.known(session, [raw.source_key for raw in batch if raw.source_key])
            stored = tickets.find_articles(session, [p.dedup_key for p in parsed if isinstance(p, ParsedMail)])
            results: list[Result | None] = [None] * len(batch)
            new: list[receipts.NewReceipt] = []
            fresh: dict[str, int] = {}  # dedup key -> index of the mail in this batch that will store it
            for index, (raw, mail) in enumerate(zip(batch, parsed, strict=True)):
                if raw.source_key in seen:  # fetched again after a crash: already recorded
                    results[index] = _seen_before(raw, seen[raw.source_key])
                elif isinstance(mail, ParseFailure):
                    results[index] = self._quarantine(session, raw, mail.stage, mail.reason, mail.retryable, new)
                elif mail.dedup_key in stored:
                    results[index] = _duplicate(raw, mail, stored[mail.dedup_key], new)
                elif mail.dedup_key not in fresh:
                    fresh[mail.dedup_key] = index
            for index, outcome in self._store_fresh(session, batch, parsed, list(fresh.values()), crm).items():
                mail = parsed[index]
                assert isinstance(mail, ParsedMail)
                if isinstance(outcome, StoredNew):
                    stored[mail.dedup_key] = outcome.stored
                    results[index] = Result(
                        batch[index],
                        Outcome.STORED,
                        outcome.stored.ticket,
                        outcome.stored.article_id,
                        message_id=mail.message_id,
                        acknowledged=outcome.acknowledged,
                        reply=not outcome.stored.new_ticket,
                    )
                    new.append(
                        receipts.NewReceipt(
                            batch[index],
                            Outcome.STORED,
                            mail.raw_sha256,
                            mail.message_id,
                            article_id=outcome.stored.article_id,
                            reply=not outcome.stored.new_ticket,
                        )
                    )
                elif isinstance(outcome, Refused):
                    results[index] = self._quarantine(session, batch[index], "agent", outcome.reason, False, new)
                else:
                    results[index] = self._quarantine(session, batch[index], "store", outcome, True, new)
            for index, mail in enumerate(parsed):  # the same mail twice in one batch
                if results[index] is None:
                    assert isinstance(mail, ParsedMail)
                    if mail.dedup_key in stored:
                        results[index] = _duplicate(batch[index], mail, stored[mail.dedup_key], new)
                    else:  # its first copy could not be stored either: keep this one too
                        first = results[fresh[mail.dedup_key]]
                        reason = first.reason if first and first.reason else "its first copy could not be stored"
                        results[index] = self._quarantine(session, batch[index], "store", reason, True, new)
            receipts.add(session, new)
            assert all(r is not None for r in results)
            return [r for r in results if r is not None]

    def _record_alone(self, raw: RawMail, parsed: ParsedMail | ParseFailure, crm: CrmAnswers) -> list[Result]:
        """Last resort for a batch that cannot be committed: this mail on its own, and if even that fails,
        a bare quarantine row (raw bytes, hash, a short reason) so the mailbox is not blocked by it."""
        try:
            return self._record_batch([raw], [parsed], crm)
        except LeaseLost:
            raise
        except Exception as exc:
            log.exception("recording %s failed; keeping it in quarantine as it is", raw.source)
            with self.db.unit_of_work() as session:
                if self.fence is not None:
                    self.fence(session, {raw.mailbox})
                new: list[receipts.NewReceipt] = []
                result = self._quarantine(session, raw, "store", f"{type(exc).__name__}: {exc}"[:2000], True, new)
                receipts.add(session, new)
                return [result]

    def _store_fresh(
        self,
        session: Session,
        batch: Sequence[RawMail],
        parsed: Sequence[ParsedMail | ParseFailure],
        indices: list[int],
        crm: CrmAnswers,
    ) -> dict[int, StoredNew | Refused | str]:
        """Store the new mails in one go; if that fails, one by one, so one bad mail cannot sink the rest."""
        mails = {i: (batch[i], mail) for i in indices if isinstance(mail := parsed[i], ParsedMail)}
        try:
            with session.begin_nested():
                outcomes: dict[int, StoredNew | Refused | str] = {}
                # A reply to a mail of the same batch must find that mail's ticket: store in waves.
                for wave in reply_waves([(i, mail) for i, (_, mail) in mails.items()]):
                    stored = self._store_and_answer(session, [mails[i] for i in wave], crm)
                    outcomes.update(zip(wave, stored, strict=True))
                return outcomes
        except Exception as exc:
            if len(indices) == 1:
                raise
            log.warning("storing a batch of %d failed (%s); storing its mails one by one", len(indices), _brief(exc))
        outcomes = {}
        for index in indices:
            try:
                outcomes[index] = self._store_fresh(session, batch, parsed, [index], crm)[index]
            except Exception as exc:  # our bug or a constraint we did not foresee: keep the mail, retry later
                log.exception("storing %s failed; quarantining it", batch[index].source)
                outcomes[index] = f"{type(exc).__name__}: {exc}"
        return outcomes

    def _store_and_answer(
        self, session: Session, mails: Sequence[tuple[RawMail, ParsedMail]], crm: CrmAnswers
    ) -> list[StoredNew | Refused]:
        """classify -> thread -> store -> lifecycle -> notify, for mails we have not stored before."""
        now = utcnow()
        verdicts = [self.answers.classify(mail) for _, mail in mails]
        threads = self.threader.resolve(session, [mail for _, mail in mails], now)
        machine = [i for i, verdict in enumerate(verdicts) if verdict.kind is not MailKind.HUMAN]
        answered = dict(zip(machine, find_our_mails(session, [mails[i][1] for i in machine]), strict=True))
        agent_mail = {i for i, (_, mail) in enumerate(mails) if self.desk.is_agent(mail)}
        refused = {
            i: self.desk.refuse(session, mails[i][0].mailbox, mails[i][1], verdicts[i], now)
            for i in agent_mail
            if not threads[i].is_reply
        }
        opening = [
            i
            for i, thread in enumerate(threads)
            if not thread.is_reply and thread.triage_reason is None and i not in agent_mail
        ]
        plans = dict(
            zip(
                opening,
                self.answers.plan(session, [(*mails[i], verdicts[i]) for i in opening], now),
                strict=True,
            )
        )
        items: list[tickets.Incoming] = []
        kept = [i for i in range(len(mails)) if i not in refused]
        routed = self.assigner.assign(
            session,
            [None if threads[i].is_reply else self._route(*mails[i], crm) for i in kept],
        )
        routing = dict(zip(kept, routed, strict=True))
        if self.crm is not None and crm:
            # For `mailbridge status`: the CRM's health as this process saw it, and the tickets it left unknown.
            flagged = sum(1 for decision in routed if decision is not None and decision.customer_problem is not None)
            self.crm.record_health(session, flagged, now)
        for index in kept:
            raw, mail = mails[index]
            verdict, thread = verdicts[index], threads[index]
            if index in plans:
                reason = plans[index].no_answer_reason
            elif thread.is_reply:
                reason = verdict.no_answer_reason or "a reply on an existing ticket"
            else:
                reason = f"flagged for triage: {thread.triage_reason}"
            items.append(
                tickets.Incoming(
                    raw,
                    mail,
                    verdict.kind,
                    reason,
                    ticket_id=thread.ticket_id,
                    linked_ticket_id=thread.linked_ticket_id,
                    triage_reason=thread.triage_reason,
                    routing=routing[index],
                )
            )
        stored_kept = tickets.store(session, items, self.ticket_settings)
        lifecycle.after_store(session, items, stored_kept, self.threader.agents, self.answers.own_addresses, now)
        stored = dict(zip(kept, stored_kept, strict=True))
        # An agent's out-of-office or bounce is kept on the ticket like a customer's: it commands nothing
        # and is relayed to nobody (answering it is how a loop between two responders starts).
        for index in sorted(i for i in agent_mail - set(refused) if verdicts[i].kind is MailKind.HUMAN):
            raw, mail = mails[index]
            self.desk.answer(session, raw.mailbox, stored[index].ticket_id, stored[index].article_id, mail, now)
        acknowledging = [
            NewTicket(*mails[i], stored[i].ticket_id, stored[i].ticket, stored[i].article_id, plans[i])
            for i in kept
            if i in plans and plans[i].to
        ]
        acknowledged = set(self.answers.enqueue(session, acknowledging, now))
        for index, ours in answered.items():
            if ours is not None and index in stored and _returns_for_good(mails[index][1], verdicts[index].kind):
                ours.status = OutboxStatus.BOUNCED
                ours.bounced_at = now
                ours.bounce_article_id = stored[index].article_id
                ours.last_error = verdicts[index].no_answer_reason
                log.warning("outbox mail %s bounced", ours.message_id, extra={"ticket": stored[index].ticket})
        return [
            Refused(refused[i]) if i in refused else StoredNew(stored[i], stored[i].article_id in acknowledged)
            for i in range(len(mails))
        ]

    def _route(self, raw: RawMail, mail: ParsedMail, crm: CrmAnswers) -> Decision:
        # The parser workers have usually applied the rules already; the customer directory is looked up here,
        # and the CRM's answer (asked before the transaction) used.
        if isinstance(mail.routing, Decision):
            by_rules = mail.routing
        else:
            by_rules = self.router.by_rules(mail, raw.mailbox, explain=False)
        sender = mail.sender.address.lower() if mail.sender else ""
        return self.router.with_customer(by_rules, mail, crm.get(sender))

    @staticmethod
    def _quarantine(
        session: Session, raw: RawMail, stage: str, reason: str, retryable: bool, new: list[receipts.NewReceipt]
    ) -> Result:
        with session.begin_nested():
            item = quarantine(session, raw, stage=stage, reason=reason, retryable=retryable)
        new.append(receipts.NewReceipt(raw, Outcome.QUARANTINED, item.sha256, item.message_id, quarantine_id=item.id))
        return Result(raw, Outcome.QUARANTINED, quarantine_id=item.id, reason=reason, message_id=item.message_id)

    def _mark_server_done(self, source_keys: list[str]) -> None:
        with self.db.unit_of_work() as session:
            receipts.mark_server_done(session, source_keys)

    def _load_quarantined(self, quarantine_id: int) -> QuarantinedMail:
        with self.db.reader() as session:
            item = session.get(QuarantinedMail, quarantine_id)
            if item is None:
                raise KeyError(f"no quarantined mail with id {quarantine_id}")
            return item

    def _record_retry(
        self, quarantine_id: int, raw: RawMail, parsed: ParsedMail | ParseFailure, crm: CrmAnswers
    ) -> Result:
        with self.db.unit_of_work() as session:
            item = session.get(QuarantinedMail, quarantine_id)
            assert item is not None
            if isinstance(parsed, ParseFailure):
                item.reason, item.stage, item.retryable = parsed.reason, parsed.stage, parsed.retryable
                return Result(raw, Outcome.QUARANTINED, quarantine_id=item.id, reason=parsed.reason)
            existing = tickets.find_articles(session, [parsed.dedup_key]).get(parsed.dedup_key)
            outcome = Outcome.DUPLICATE if existing else Outcome.STORED
            if existing is None:
                [outcome_of_retry] = self._store_and_answer(session, [(raw, parsed)], crm)
                if isinstance(outcome_of_retry, Refused):
                    item.reason = outcome_of_retry.reason
                    return Result(raw, Outcome.QUARANTINED, quarantine_id=item.id, reason=item.reason)
                stored = outcome_of_retry.stored
            else:
                stored = existing
            item.resolved_at = utcnow()
            item.resolved_article_id = stored.article_id
            reply = outcome is Outcome.STORED and not stored.new_ticket
            receipts.resolve_quarantined(session, item.id, outcome, stored.article_id, reply)
            return Result(raw, outcome, stored.ticket, stored.article_id, message_id=parsed.message_id, reply=reply)


def reply_waves(mails: Sequence[tuple[int, ParsedMail]]) -> list[list[int]]:
    """Indices in waves: each mail comes after the mails of the batch it refers to (In-Reply-To,
    References), so threading finds them stored. Most batches are one wave."""
    by_id = {mail.message_id: index for index, mail in mails if mail.message_id}
    parents = {
        index: {by_id[ref] for ref in (mail.in_reply_to, *mail.references) if ref in by_id and by_id[ref] != index}
        for index, mail in mails
    }
    waves: list[list[int]] = []
    done: set[int] = set()
    todo = [index for index, _ in mails]
    while todo:
        wave = [index for index in todo if parents[index] <= done]
        if not wave:  # a reference cycle (forged headers): store the rest together
            wave = todo
        waves.append(wave)
        done.update(wave)
        todo = [index for index in todo if index not in done]
    return waves


@dataclass(frozen=True, slots=True)
class StoredNew:
    stored: tickets.Stored
    acknowledged: bool


@dataclass(frozen=True, slots=True)
class Refused:
    """Not stored as a ticket, for a reason that is not a fault (an agent's mail that answers no ticket):
    kept in quarantine with its raw bytes."""

    reason: str


def _returns_for_good(mail: ParsedMail, kind: MailKind) -> bool:
    """A bounce that says our mail was not delivered (a delay notice does not)."""
    report = mail.report
    return kind is MailKind.BOUNCE and report is not None and (bool(report.failed) or not report.delayed)


def _seen_before(raw: RawMail, known: receipts.Known) -> Result:
    return Result(
        raw,
        known.outcome,
        known.ticket,
        known.article_id,
        known.quarantine_id,
        message_id=known.message_id,
        seen_before=True,
    )


def _duplicate(raw: RawMail, mail: ParsedMail, stored: tickets.Stored, new: list[receipts.NewReceipt]) -> Result:
    new.append(receipts.NewReceipt(raw, Outcome.DUPLICATE, mail.raw_sha256, mail.message_id, stored.article_id))
    return Result(raw, Outcome.DUPLICATE, stored.ticket, stored.article_id, message_id=mail.message_id)


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def _log_result(result: Result) -> None:
    log.info(
        "mail %s",
        result.outcome.value,
        extra={
            "mailbox": result.raw.mailbox,
            "source": result.raw.source,
            "message_id": result.message_id,
            "ticket": result.ticket,
            "outcome": result.outcome.value,
            "reason": result.reason,
            "seen_before": result.seen_before,
        },
    )
