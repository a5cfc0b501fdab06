"""Fetch stage for IMAP: one watcher per mailbox, IDLE where offered, polling otherwise.

What is new is decided by UID and our own receipts, never by \\Seen: a mail someone already opened in
Outlook is still a ticket. The server is told (move / flag / delete) only after the commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import aioimaplib

from mailbridge.config import FetchSettings, ImapMailbox, ImportSince, MoveTo
from mailbridge.ingest.imap_client import (
    AuthenticationError,
    CommandRefused,
    ImapConnection,
    ImapError,
    describe,
    uid_set,
    wait_for_stop,
)
from mailbridge.ingest.ledger import FolderCount, FolderPlan, Ledger, count_folder
from mailbridge.ingest.raw import BACKLOG, RawMail
from mailbridge.leases import LeaseLost
from mailbridge.models import Outcome
from mailbridge.oauth import TokenSource
from mailbridge.pipeline import Pipeline, Result

log = logging.getLogger("mailbridge.imap")

AUTH_RETRY_MAX_SECONDS = 15 * 60
UNDELIVERABLE_AFTER = 3  # drains in a row without a body for the same UID
# During a backlog the server is told of stored mail (moved, flagged, deleted) in groups of at least this
# many: Dovecot spends 2.5 times the CPU moving 4,000 mails 50 at a time as 200 at a time, and each
# group's `server_done` is one more commit. Whatever is left is told at the end of the drain; a crash
# before that leaves receipts without `server_done`, which the next drain finishes.
TELL_SERVER_EVERY = 200


class ImapWatcher:
    """Keeps one mailbox drained: connect, import what is new, wait, repeat; reconnect with backoff."""

    def __init__(
        self,
        box: ImapMailbox,
        pipeline: Pipeline,
        ledger: Ledger,
        fetch: FetchSettings,
        tokens: TokenSource | None = None,
    ) -> None:
        self.box = box
        self.tokens = tokens  # auth: oauth2
        self.pipeline = pipeline
        self.ledger = ledger
        self.settings = fetch
        self._strikes: dict[tuple[int, int], int] = {}

    @property
    def name(self) -> str:
        return self.box.name

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._watch(stop)
        finally:
            with suppress(Exception):  # also when cancelled: `status` must not say "connected"
                await self.ledger.disconnected()

    async def _watch(self, stop: asyncio.Event) -> None:
        delay = 1.0
        while not stop.is_set():
            try:
                async with self._connection() as conn:
                    delay = 1.0
                    again = False
                    while not stop.is_set():
                        count, imported = await self._drain(conn, stop)
                        if stop.is_set():
                            break
                        # Mail that arrived during the drain was announced in its replies, so IDLE would not
                        # report it again: fetch it now, and again for as long as mail keeps coming in
                        # during the drains (a steady stream); a mail the server cannot deliver makes one
                        # more drain, not a loop, and waits for news.
                        again = count.waiting > 0 and (imported or not again)
                        if not again and not _renewal_due(conn):
                            await conn.wait_for_news(stop, self._wait_seconds(conn))
                        if _renewal_due(conn):
                            # A server may end a session once its token has expired (Exchange Online
                            # does); start a new one with a fresh token before that.
                            log.info("mailbox %s: renewing the session before its access token expires", self.name)
                            break
            except LeaseLost as exc:  # another instance fetches this mailbox now
                log.warning("mailbox %s: %s; stopping", self.name, exc)
                return
            except Exception as exc:  # this mailbox backs off and retries; the others go on regardless
                expected = isinstance(exc, ImapError | OSError | TimeoutError | aioimaplib.AioImapException)
                reason = describe(exc) if expected else f"unexpected error: {describe(exc)}"
                log.warning("mailbox %s: %s; retrying in %.0f s", self.name, reason, delay, exc_info=not expected)
                with suppress(Exception):  # the database may be what failed
                    await self.ledger.failed(reason)
                await wait_for_stop(stop, delay)
                if isinstance(exc, AuthenticationError):
                    # Retrying a refused password every minute can lock the account (AD, fail2ban).
                    delay = min(max(delay * 2, self.settings.reconnect_max_seconds), AUTH_RETRY_MAX_SECONDS)
                else:
                    delay = min(delay * 2, self.settings.reconnect_max_seconds)

    def _wait_seconds(self, conn: ImapConnection) -> float:
        due = conn.renewal_due_in()
        return self.box.poll_interval if due is None else max(0.1, min(self.box.poll_interval, due))

    async def run_once(self) -> None:
        """Drain what is waiting now and return (`mailbridge run --once`, the tests)."""
        try:
            async with self._connection() as conn:
                await self._drain(conn, asyncio.Event())
        except (ImapError, OSError, TimeoutError, aioimaplib.AioImapException) as exc:
            await self.ledger.failed(describe(exc))
            raise
        finally:
            await self.ledger.disconnected()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[ImapConnection]:
        conn = ImapConnection(self.box, self.tokens)
        try:
            await conn.open()
            if isinstance(self.box.after_store, MoveTo):
                await conn.ensure_folder(self.box.after_store.move)
            await conn.ensure_folder(self.box.quarantine_folder)
            await self.ledger.connected()
            log.info("mailbox %s: connected to %s:%s", self.name, self.box.host, self.box.port)
            yield conn
        finally:
            await conn.close()

    async def _drain(self, conn: ImapConnection, stop: asyncio.Event) -> tuple[FolderCount, bool]:
        """One drain; the folder counted after it, and whether it imported anything."""
        status = await conn.select()
        plan = await self.ledger.open_folder(status.uidvalidity, status.uidnext)
        if plan.pending:
            await self._finish_pending(conn, plan)
        todo = await self._initial_uids(conn, plan) if not plan.initial_done else []
        todo += await conn.uids_above(max(plan.high_water, plan.baseline_uid))
        complete = await self._import(conn, plan, sorted(set(todo)), stop) if todo else True
        progress_made = bool(todo) and complete
        if not plan.initial_done and complete:
            # Only now: the initial set is recomputed (minus what has receipts) until every mail of it is in.
            await self.ledger.initial_import_done()
        after = await conn.select()
        count = await self._count_folder(conn, plan, after.exists)
        await self.ledger.fetched(count)
        return count, progress_made

    async def _count_folder(self, conn: ImapConnection, plan: FolderPlan, exists: int) -> FolderCount:
        """The folder as the server has it now, against our receipts: what `mailbridge status` reconciles.
        With `move` (the default) a drained folder is empty and this costs nothing."""
        uids = await conn.uids_above(0) if exists else []
        if not uids:  # nothing to sort, so no need to ask the database (once per drain under IDLE)
            return FolderCount(in_folder=0, waiting=0, missing=0, left_by_existing_mail=0)
        receipted = await self.ledger.receipted(plan.uidvalidity, uids)
        old = any(u <= receipted.baseline_uid and u not in receipted.uids for u in uids)
        wanted = set(await self._wanted_up_to_baseline(conn, plan)) if old else set()
        return count_folder(uids, receipted, wanted)

    async def _initial_uids(self, conn: ImapConnection, plan: FolderPlan) -> list[int]:
        """The mail that was already in the folder on the first run, as `existing_mail` says."""
        uids = await self._wanted_up_to_baseline(conn, plan)
        known = await self.ledger.known_uids(plan.uidvalidity, uids)
        return [u for u in uids if u not in known]

    async def _wanted_up_to_baseline(self, conn: ImapConnection, plan: FolderPlan) -> list[int]:
        policy = self.box.existing_mail
        if plan.validity_changed:
            # A reset folder: take everything again, but not what `skip`/`since` left out the first time.
            since = policy if isinstance(policy, ImportSince) else None
            if policy == "skip":
                since = ImportSince(since=plan.first_seen_at.date())
            return await conn.uids_up_to(plan.baseline_uid, since)
        if policy == "skip":
            return []
        return await conn.uids_up_to(plan.baseline_uid, policy if isinstance(policy, ImportSince) else None)

    async def _import(self, conn: ImapConnection, plan: FolderPlan, uids: list[int], stop: asyncio.Event) -> bool:
        """Import these UIDs in order; False when it stopped early (stop requested, or a gap on the server)."""
        sizes = await conn.sizes(uids)
        progress = _Progress(complete=all(u in sizes for u in uids))
        if not progress.complete:
            # Never import past a mail we could not see: the high-water mark would skip it for good.
            gap = next(u for u in uids if u not in sizes)
            log.warning("mailbox %s: no size for UID %d; importing up to it", self.name, gap)
            uids = [u for u in uids if u < gap]
        batches = list(_batches(uids, sizes, self.settings))

        # What to tell, not the results: those hold each mail's raw bytes (200 mails: ~11 MB of peak RSS).
        untold: list[tuple[int | None, Outcome, str | None]] = []

        async def tell_server(results: list[Result]) -> None:
            untold.extend((r.raw.uid, r.outcome, r.raw.source_key) for r in results)
            if len(untold) >= TELL_SERVER_EVERY:
                await tell_untold()

        async def tell_untold() -> None:
            told = untold[:]
            untold.clear()
            await self._apply(conn, told)

        await self.pipeline.process_stream(self._fetched(conn, plan, batches, stop, progress), tell_server)
        if untold:
            await tell_untold()
        return progress.complete

    async def _fetched(
        self,
        conn: ImapConnection,
        plan: FolderPlan,
        batches: list[list[int]],
        stop: asyncio.Event,
        progress: _Progress,
    ) -> AsyncGenerator[list[RawMail], None]:
        """The batches' mails, one UID FETCH each, the next one already travelling while a batch is handed on."""
        if not batches:
            return
        next_fetch: asyncio.Future[dict[int, bytes]] | None = asyncio.ensure_future(conn.fetch(batches[0]))
        try:
            for index, batch in enumerate(batches):
                assert next_fetch is not None
                bodies = await next_fetch
                next_fetch = None
                if stop.is_set():
                    progress.complete = False
                    return
                missing = self._missing(plan.uidvalidity, batch, bodies)
                if missing:
                    # Expunged by someone else meanwhile, or a server hiccup. Store only what precedes the
                    # gap, so the high-water mark never passes a mail we have not seen; the next drain
                    # looks again.
                    log.warning("mailbox %s: server returned no body for UIDs %s", self.name, uid_set(missing))
                    progress.complete = False
                    batch = [u for u in batch if u < missing[0]]
                elif index + 1 < len(batches):
                    next_fetch = asyncio.ensure_future(conn.fetch(batches[index + 1]))
                yield [self._raw(plan.uidvalidity, uid, bodies[uid], uid <= plan.baseline_uid) for uid in batch]
                if missing:
                    return
        finally:
            if next_fetch is not None:
                # Let the command finish rather than cancel it: a half-read FETCH would desync the protocol.
                with suppress(Exception):
                    await next_fetch

    def _missing(self, uidvalidity: int, batch: list[int], bodies: dict[int, bytes]) -> list[int]:
        """UIDs of the batch without a body. One that stays without a body drain after drain (a damaged
        message the server cannot deliver) is recorded as empty, so it is quarantined and moved aside
        instead of blocking every mail after it."""
        missing = [u for u in batch if u not in bodies]
        if missing:
            key = (uidvalidity, missing[0])
            self._strikes[key] = self._strikes.get(key, 0) + 1
            if self._strikes[key] >= UNDELIVERABLE_AFTER:
                log.error(
                    "mailbox %s: UID %d has no body after %d tries; quarantining it as an empty mail",
                    self.name,
                    missing[0],
                    self._strikes[key],
                )
                bodies[missing[0]] = b""
                return self._missing(uidvalidity, batch, bodies)
        return missing

    def _raw(self, uidvalidity: int, uid: int, data: bytes, backlog: bool) -> RawMail:
        quiet = BACKLOG if backlog and not self.box.acknowledge_backlog else None
        return RawMail(
            mailbox=self.name,
            source=f"imap://{self.name}/{self.box.folder};UIDVALIDITY={uidvalidity};UID={uid}",
            data=data,
            source_key=f"{self.name}/{uidvalidity}/{uid}",
            uidvalidity=uidvalidity,
            uid=uid,
            quiet=quiet,
        )

    async def _finish_pending(self, conn: ImapConnection, plan: FolderPlan) -> None:
        log.info("mailbox %s: finishing %d mail(s) stored before a restart", self.name, len(plan.pending))
        await self._apply(conn, [(p.uid, Outcome(p.outcome), p.source_key) for p in plan.pending])

    async def _apply(self, conn: ImapConnection, items: Iterable[tuple[int | None, Outcome, str | None]]) -> None:
        done_uids: list[int] = []
        quarantined: list[int] = []
        keys: list[str] = []
        for uid, outcome, key in items:
            if uid is None or key is None:
                continue
            (quarantined if outcome is Outcome.QUARANTINED else done_uids).append(uid)
            keys.append(key)
        try:
            if quarantined:
                await conn.move(quarantined, self.box.quarantine_folder)
            if done_uids:
                action = self.box.after_store
                if isinstance(action, MoveTo):
                    await conn.move(done_uids, action.move)
                elif action == "flag_seen":
                    await conn.flag_seen(done_uids)
                else:
                    await conn.delete(done_uids)
        except CommandRefused as exc:
            # The mails are stored; only the server-side tidy-up is refused (over quota, …). Intake goes
            # on (the receipts, not the folder, say what is new) and the next drain tries again.
            log.warning("mailbox %s: %s; will retry", self.name, exc)
            await self.ledger.failed(str(exc))
            return
        await self.pipeline.mark_server_done(keys)


def _renewal_due(conn: ImapConnection) -> bool:
    due = conn.renewal_due_in()
    return due is not None and due <= 0


@dataclass
class _Progress:
    complete: bool


def _batches(uids: Sequence[int], sizes: dict[int, int], settings: FetchSettings) -> Iterable[list[int]]:
    batch: list[int] = []
    total = 0
    for uid in uids:
        size = sizes[uid]
        if batch and (len(batch) >= settings.batch_size or total + size > settings.batch_bytes):
            yield batch
            batch, total = [], 0
        batch.append(uid)
        total += size
    if batch:
        yield batch
