"""What we know about each mailbox between runs: UIDVALIDITY, what was imported, what the server
still has to be told, and the health that `mailbridge status` shows. Runs in the database thread.
The connection's state is also kept in memory (`Ledger.health`) for the daemon's /healthz and /metrics,
which must answer without the database."""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

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


@dataclass(frozen=True, slots=True)
class Receipted:
    """What our records say about some UIDs of a folder, for counting it against the server."""

    uids: frozenset[int]  # those of the UIDs asked about that we hold a receipt for
    high_water: int  # the highest UID we hold a receipt for under this UIDVALIDITY
    baseline_uid: int
    initial_done: bool


@dataclass(frozen=True, slots=True)
class FolderCount:
    """A folder counted on the server against our receipts (what `mailbridge status` reconciles)."""

    in_folder: int
    waiting: int  # no receipt yet; the next fetch imports them
    missing: int  # no receipt, yet behind what the fetches still look at: passed over, never imported
    left_by_existing_mail: int  # there before the first run, and `existing_mail` says not to import them


def count_folder(uids: Iterable[int], receipted: Receipted, wanted_up_to_baseline: AbstractSet[int]) -> FolderCount:
    """Sort the UIDs in a folder by what will become of them. `wanted_up_to_baseline`: those up to the
    baseline that `existing_mail` imports (only looked at for UIDs up to the baseline without a receipt)."""
    in_folder = waiting = missing = left = 0
    horizon = max(receipted.high_water, receipted.baseline_uid)  # a fetch looks only above this ...
    for uid in uids:
        in_folder += 1
        if uid in receipted.uids:
            continue
        old = uid <= receipted.baseline_uid
        if old and uid not in wanted_up_to_baseline:
            left += 1
        elif uid > horizon or (old and not receipted.initial_done):  # ... and at the initial set until it is in
            waiting += 1
        else:
            missing += 1
    return FolderCount(in_folder, waiting, missing, left)


@dataclass
class SourceHealth:
    """The mailbox's connection as this process last saw it: updated on the event loop, read by /healthz."""

    # standby: another instance holds the mailbox's lease (see `mailbridge.leases`)
    state: Literal["starting", "connected", "failing", "stopped", "standby"] = "starting"
    since: datetime = field(default_factory=utcnow)
    error: str | None = None
    sessions: int = 0  # connections opened; every one after the first is a reconnect
    failures: int = 0

    def opened(self) -> None:
        self.sessions += 1
        self.state, self.since, self.error = "connected", utcnow(), None

    def failed(self, error: str) -> None:
        self.failures += 1
        if self.state != "failing":  # "since" is when the trouble began, not the latest retry
            self.state, self.since = "failing", utcnow()
        self.error = error

    def working(self) -> None:
        """A fetch went through: whatever failed before (a refused move) is over."""
        if self.state == "failing":
            self.state, self.since, self.error = "connected", utcnow(), None

    def stopped(self) -> None:
        self.state, self.since = "stopped", utcnow()


class Ledger:
    def __init__(self, db: Database, mailbox: str) -> None:
        self.db = db
        self.mailbox = mailbox
        self.health = SourceHealth()

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

    async def receipted(self, uidvalidity: int, uids: list[int]) -> Receipted:
        return await self.db.run(self._receipted, uidvalidity, uids)

    def _receipted(self, uidvalidity: int, uids: list[int]) -> Receipted:
        with self.db.reader() as session:
            state = session.get(MailboxState, self.mailbox)
            of_this_folder = (Receipt.mailbox == self.mailbox, Receipt.uidvalidity == uidvalidity)
            held: set[int] = set()
            if uids:
                # One range scan (the folder's lowest to highest UID) rather than a list of every UID:
                # with `move` the folder holds little; with `flag_seen` this is the folder's own size.
                wanted = set(uids)
                rows = session.scalars(
                    select(Receipt.uid).where(*of_this_folder, Receipt.uid.between(min(uids), max(uids)))
                )
                held = {uid for uid in rows if uid in wanted}
            return Receipted(
                uids=frozenset(held),
                high_water=session.scalar(select(func.max(Receipt.uid)).where(*of_this_folder)) or 0,
                baseline_uid=state.baseline_uid if state else 0,
                initial_done=bool(state and state.initial_done),
            )

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

    async def connected(self) -> None:
        self.health.opened()
        await self._update(connected=True, last_error=None)

    async def fetched(self, count: FolderCount) -> None:
        """A fetch is done; the folder as the server had it after it."""
        self.health.working()
        await self._update(
            last_fetch_at=utcnow(),
            messages_in_folder=count.in_folder,
            waiting=count.waiting,
            missing=count.missing,
            left_by_existing_mail=count.left_by_existing_mail,
        )

    async def failed(self, error: str) -> None:
        self.health.failed(error)
        await self._update(connected=False, last_error=error, last_error_at=utcnow())

    async def disconnected(self) -> None:
        self.health.stopped()
        await self._update(connected=False)

    async def _update(self, **values: object) -> None:
        await self.db.run(self._write_state, values)

    def _write_state(self, values: dict[str, object]) -> None:
        # One UPDATE, not a read and an ORM flush: this runs after every drain (under IDLE, every few mails).
        with self.db.unit_of_work() as session:
            written = session.connection().execute(
                update(MailboxState).where(MailboxState.mailbox == self.mailbox).values(**values)
            )
            if written.rowcount == 0:
                session.add(MailboxState(mailbox=self.mailbox, **values))
