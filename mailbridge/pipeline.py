"""The pipeline: parse -> (classify -> thread -> route, in later issues) -> store, one mail at a time,
one transaction per batch, one savepoint per mail.

Side effects on the mail server are not done here: the caller does them after `process` returned,
i.e. after the commit, and then calls `mark_server_done`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mailbridge import tickets
from mailbridge.config import TicketSettings
from mailbridge.db import Database
from mailbridge.ingest.parse import ParsedMail
from mailbridge.ingest.parse_pool import ParseFailure, ParsePool
from mailbridge.ingest.raw import RawMail
from mailbridge.models import Article, Outcome, QuarantinedMail, Receipt, utcnow
from mailbridge.quarantine import quarantine

log = logging.getLogger("mailbridge.pipeline")


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


class Pipeline:
    def __init__(self, db: Database, parser: ParsePool, ticket_settings: TicketSettings) -> None:
        self.db = db
        self.parser = parser
        self.ticket_settings = ticket_settings

    async def process(self, batch: Sequence[RawMail]) -> list[Result]:
        """Parse the batch on the worker processes, then record every mail in one transaction."""
        return await self.record(batch, await self.parse(batch))

    def parse(self, batch: Sequence[RawMail]) -> asyncio.Future[list[ParsedMail | ParseFailure]]:
        """Start parsing at once; callers overlap this with recording the previous batch."""
        return asyncio.gather(*(self.parser.parse(raw.data) for raw in batch))

    async def record(self, batch: Sequence[RawMail], parsed: Sequence[ParsedMail | ParseFailure]) -> list[Result]:
        results = await self.db.run(self._record_batch, batch, parsed)
        for result in results:
            _log_result(result)
        return results

    async def process_stream(
        self,
        batches: AsyncGenerator[list[RawMail], None],
        committed: Callable[[list[Result]], Awaitable[None]],
        depth: int = 2,
    ) -> None:
        """Keep every resource busy during a backlog: batch k is recorded (database thread) while batch
        k+1 is parsed (worker processes) and the source fetches batch k+2. Batches are committed in order,
        and `committed` (the server-side move) runs after each commit. When `batches` ends early (stop
        requested), what is already being parsed is still recorded: the mail in hand is finished."""
        in_flight: deque[tuple[list[RawMail], asyncio.Future[list[ParsedMail | ParseFailure]]]] = deque()
        try:
            async with contextlib.aclosing(batches):
                async for batch in batches:
                    if not batch:
                        continue
                    in_flight.append((batch, self.parse(batch)))
                    if len(in_flight) >= depth:
                        raws, parsing = in_flight.popleft()
                        await committed(await self.record(raws, await parsing))
            while in_flight:
                raws, parsing = in_flight.popleft()
                await committed(await self.record(raws, await parsing))
        finally:
            for _, parsing in in_flight:
                parsing.cancel()

    async def mark_server_done(self, source_keys: Sequence[str]) -> None:
        if source_keys:
            await self.db.run(self._mark_server_done, list(source_keys))

    async def retry_quarantined(self, quarantine_id: int) -> Result:
        """Run the pipeline again on a quarantined mail (after a fix); it stays quarantined if it fails again."""
        item = await self.db.run(self._load_quarantined, quarantine_id)
        raw = RawMail(mailbox=item.mailbox, source=item.source, data=item.raw)
        parsed = await self.parser.parse(raw.data)
        result = await self.db.run(self._record_retry, item.id, raw, parsed)
        _log_result(result)
        return result

    # --- inside the database thread -------------------------------------------------------------

    def _record_batch(self, batch: Sequence[RawMail], parsed: Sequence[ParsedMail | ParseFailure]) -> list[Result]:
        with self.db.unit_of_work() as session:
            return [self._record_one(session, raw, result) for raw, result in zip(batch, parsed, strict=True)]

    def _record_one(self, session: Session, raw: RawMail, parsed: ParsedMail | ParseFailure) -> Result:
        if raw.source_key is not None:
            known = session.scalars(select(Receipt).where(Receipt.source_key == raw.source_key)).first()
            if known is not None:
                return _result_of(session, raw, known)
        try:
            with session.begin_nested():
                result = self._store(session, raw, parsed)
        except Exception as exc:  # our bug or a constraint we did not foresee: keep the mail, retry later
            log.exception("storing %s failed; quarantining it", raw.source)
            with session.begin_nested():
                item = quarantine(session, raw, stage="store", reason=f"{type(exc).__name__}: {exc}", retryable=True)
                result = Result(raw, Outcome.QUARANTINED, quarantine_id=item.id, reason=item.reason)
                self._add_receipt(session, raw, result, item.sha256, item.message_id)
        return result

    def _store(self, session: Session, raw: RawMail, parsed: ParsedMail | ParseFailure) -> Result:
        if isinstance(parsed, ParseFailure):
            item = quarantine(session, raw, stage=parsed.stage, reason=parsed.reason, retryable=parsed.retryable)
            result = Result(raw, Outcome.QUARANTINED, quarantine_id=item.id, reason=parsed.reason)
            self._add_receipt(session, raw, result, item.sha256, item.message_id)
            return result
        result = self._store_parsed(session, raw, parsed)
        self._add_receipt(session, raw, result, parsed.raw_sha256, parsed.message_id)
        return result

    def _store_parsed(self, session: Session, raw: RawMail, mail: ParsedMail) -> Result:
        existing = tickets.find_article(session, mail.dedup_key)
        if existing is not None:
            return Result(
                raw,
                Outcome.DUPLICATE,
                ticket=existing.ticket.number,
                article_id=existing.id,
                message_id=mail.message_id,
            )
        article = tickets.store(session, raw, mail, self.ticket_settings)
        return Result(
            raw, Outcome.STORED, ticket=article.ticket.number, article_id=article.id, message_id=mail.message_id
        )

    @staticmethod
    def _add_receipt(session: Session, raw: RawMail, result: Result, sha256: str, message_id: str | None) -> None:
        session.add(
            Receipt(
                mailbox=raw.mailbox,
                source_key=raw.source_key,
                uidvalidity=raw.uidvalidity,
                uid=raw.uid,
                sha256=sha256,
                message_id=message_id,
                outcome=result.outcome,
                article_id=result.article_id,
                quarantine_id=result.quarantine_id,
                server_done=raw.source_key is None,  # nothing to tell a server about a file import
            )
        )
        session.flush()

    def _mark_server_done(self, source_keys: list[str]) -> None:
        with self.db.unit_of_work() as session:
            session.execute(update(Receipt).where(Receipt.source_key.in_(source_keys)).values(server_done=True))

    def _load_quarantined(self, quarantine_id: int) -> QuarantinedMail:
        with self.db.reader() as session:
            item = session.get(QuarantinedMail, quarantine_id)
            if item is None:
                raise KeyError(f"no quarantined mail with id {quarantine_id}")
            return item

    def _record_retry(self, quarantine_id: int, raw: RawMail, parsed: ParsedMail | ParseFailure) -> Result:
        with self.db.unit_of_work() as session:
            item = session.get(QuarantinedMail, quarantine_id)
            assert item is not None
            if isinstance(parsed, ParseFailure):
                item.reason, item.stage, item.retryable = parsed.reason, parsed.stage, parsed.retryable
                return Result(raw, Outcome.QUARANTINED, quarantine_id=item.id, reason=parsed.reason)
            result = self._store_parsed(session, raw, parsed)
            item.resolved_at = utcnow()
            item.resolved_article_id = result.article_id
            session.execute(
                update(Receipt)
                .where(Receipt.quarantine_id == item.id)
                .values(outcome=result.outcome, article_id=result.article_id)
            )
            return result


def _result_of(session: Session, raw: RawMail, receipt: Receipt) -> Result:
    article = session.get(Article, receipt.article_id) if receipt.article_id is not None else None
    ticket = article.ticket.number if article is not None else None
    return Result(
        raw,
        Outcome(receipt.outcome),
        ticket=ticket,
        article_id=receipt.article_id,
        quarantine_id=receipt.quarantine_id,
        message_id=receipt.message_id,
        seen_before=True,
    )


def _log_result(result: Result) -> None:
    log.info(
        "mail %s",
        result.outcome.value,
        extra={
            "source": result.raw.source,
            "message_id": result.message_id,
            "ticket": result.ticket,
            "outcome": result.outcome.value,
            "reason": result.reason,
            "seen_before": result.seen_before,
        },
    )
