"""What we know about each mailbox between runs: UIDVALIDITY, what was imported, what the server
still has to be told, and the health that `mailbridge status` shows. Runs in the database thread."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update

from mailbridge.db import Database, chunked
from mailbridge.models import MailboxState, Outcome, Receipt, utcnow


@dataclass(frozen=True, slots=True)
class Pending:
    source_key: str
    uid: int | None
    outcome: str


@dataclass(frozen=True, slots=True)
class FolderPlan:
    """Where a mailbox stands at the start of a drain."""

    uidvalidity: int
    baseline_uid: int  # UIDs up to this were in the folder when we first saw it (or its new UIDVALIDITY)
    initial_done: bool
    validity_changed: bool
    first_seen_at: datetime
    high_water: int  # the highest UID we hold a receipt for under this UIDVALIDITY
    pending: tuple[Pending, ...]  # stored, but the server was not told yet (we died in between)


class Ledger:
    def __init__(self, db: Database, mailbox: str) -> None:
        self.db = db
        self.mailbox = mailbox

    async def open_folder(self, uidvalidity: int, uidnext: int) -> FolderPlan:
        return await self.db.run(self._open_folder, uidvalidity, uidnext)

    def _open_folder(self, uidvalidity: int, uidnext: int) -> FolderPlan:
        with self.db.unit_of_work() as session:
            state = session.get(MailboxState, self.mailbox)
            changed = False
            if state is None:
                state = MailboxState(mailbox=self.mailbox, uidvalidity=uidvalidity, baseline_uid=uidnext - 1)
                session.add(state)
            elif state.uidvalidity != uidvalidity:
                # Every UID we knew is void. Re-import the folder; the dedup key keeps tickets single.
                changed = state.uidvalidity is not None
                state.uidvalidity, state.baseline_uid, state.initial_done = uidvalidity, uidnext - 1, False
            high_water = session.scalar(
                select(func.max(Receipt.uid)).where(Receipt.mailbox == self.mailbox, Receipt.uidvalidity == uidvalidity)
            )
            rows = session.scalars(
                select(Receipt).where(Receipt.mailbox == self.mailbox, Receipt.server_done.is_(False))
            ).all()
            stale = [r.id for r in rows if r.uidvalidity != uidvalidity]
            if stale:  # their UIDs mean nothing now; the re-import finds those mails again
                session.execute(update(Receipt).where(Receipt.id.in_(stale)).values(server_done=True))
            pending = tuple(Pending(r.source_key or "", r.uid, r.outcome) for r in rows if r.uidvalidity == uidvalidity)
            return FolderPlan(
                uidvalidity=uidvalidity,
                baseline_uid=state.baseline_uid,
                initial_done=state.initial_done,
                validity_changed=changed,
                first_seen_at=state.first_seen_at,
                high_water=high_water or 0,
                pending=pending,
            )

    async def known_uids(self, uidvalidity: int, uids: list[int]) -> set[int]:
        return await self.db.run(self._known_uids, uidvalidity, uids)

    def _known_uids(self, uidvalidity: int, uids: list[int]) -> set[int]:
        known: set[int] = set()
        with self.db.reader() as session:
            for chunk in chunked(uids):
                known.update(
                    uid
                    for uid in session.scalars(
                        select(Receipt.uid).where(
                            Receipt.mailbox == self.mailbox,
                            Receipt.uidvalidity == uidvalidity,
                            Receipt.uid.in_(chunk),
                        )
                    )
                    if uid is not None
                )
        return known

    async def outcomes(self, source_keys: list[str]) -> dict[str, Outcome]:
        """What became of the mails with these source keys, for those we hold a receipt of."""
        return await self.db.run(self._outcomes, source_keys)

    def _outcomes(self, source_keys: list[str]) -> dict[str, Outcome]:
        found: dict[str, Outcome] = {}
        with self.db.reader() as session:
            for chunk in chunked(source_keys):
                rows = session.execute(select(Receipt.source_key, Receipt.outcome).where(Receipt.source_key.in_(chunk)))
                found.update({key: Outcome(outcome) for key, outcome in rows if key})
        return found

    async def backlog_cutoff(self) -> datetime | None:
        """For a mailbox without UIDs (a Maildir): until its first complete drain, mail written before the
        mailbox was first seen is backlog; None once that drain is done."""
        return await self.db.run(self._backlog_cutoff)

    def _backlog_cutoff(self) -> datetime | None:
        with self.db.unit_of_work() as session:
            state = session.get(MailboxState, self.mailbox)
            if state is None:
                state = MailboxState(mailbox=self.mailbox, first_seen_at=utcnow())
                session.add(state)
            return None if state.initial_done else state.first_seen_at

    async def initial_import_done(self) -> None:
        await self._update(initial_done=True)

    async def connected(self, messages_in_folder: int | None = None) -> None:
        await self._update(connected=True, last_error=None, messages_in_folder=messages_in_folder)

    async def fetched(self, messages_in_folder: int | None) -> None:
        await self._update(last_fetch_at=utcnow(), messages_in_folder=messages_in_folder)

    async def failed(self, error: str) -> None:
        await self._update(connected=False, last_error=error, last_error_at=utcnow())

    async def disconnected(self) -> None:
        await self._update(connected=False)

    async def _update(self, **values: object) -> None:
        await self.db.run(self._write_state, values)

    def _write_state(self, values: dict[str, object]) -> None:
        with self.db.unit_of_work() as session:
            state = session.get(MailboxState, self.mailbox)
            if state is None:
                state = MailboxState(mailbox=self.mailbox)
                session.add(state)
            for key, value in values.items():
                if key == "messages_in_folder" and value is None:
                    continue
                setattr(state, key, value)
