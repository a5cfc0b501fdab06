"""Mailbox leases: several daemons on one database, each mailbox fetched by one of them at a time.

A lease is a row per mailbox (`mailbox_leases`: holder, expires_at), not a PostgreSQL advisory lock: it
works the same on SQLite, `mailbridge status` can show who holds a mailbox, and it survives the holder's
connection (a database restart or a dropped connection does not make two holders; an advisory lock dies
with the session that took it, while the old holder may still be fetching). Each instance renews its
leases every `instances.renew_seconds` in one transaction that also says it is alive (`instances`); a
lease not renewed for `lease_seconds` is free for anyone.

Fair share: an instance holds at most ceil(mailboxes / instances alive); one that holds more gives the
rest back (after their watchers have stopped), so a second instance started next to a first gets half.

Renew or stop: the `LeaseKeeper` stops a mailbox's watcher when the renewal says the lease is gone, and
every watcher when no renewal has succeeded for `lease_seconds - renew_seconds` (the database is out of
reach); and the transaction that records a batch's receipts checks the lease first (`fence`, locking the
lease row FOR KEY SHARE on PostgreSQL, so it cannot be taken over until that commit), so a holder that lost
its lease records nothing more. The unique receipt key and the dedup key stay as the backstop.

A reload (SIGHUP) keeps the leases of the mailboxes that stay (`hand_over`): another instance cannot take
them while the daemon restarts inside its process. `mailbridge run --once` takes the free leases for its run
(`OneRunLeases`) and leaves the mailboxes a live instance holds to it; it is not an instance (no fair share).

Clocks: expiry is compared with each instance's own clock, so the instances' clocks must agree (NTP);
a skew of s seconds takes s seconds off the safety margin.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from mailbridge.config import InstanceSettings, Settings
from mailbridge.db import Database, claim_rows, insert_missing, share_rows
from mailbridge.logs import mailbox_context
from mailbridge.models import Instance, MailboxLease, utcnow

log = logging.getLogger("mailbridge.leases")


class LeaseLost(Exception):
    """This instance no longer holds the lease of a mailbox: record nothing more from it."""


class InstanceBusy(Exception):
    """Another daemon runs on this data directory."""


def instance_name(settings: Settings) -> str:
    """The configured name, or host and data directory: a daemon restarted after a crash has its
    predecessor's name and takes its leases back at once instead of waiting for them to run out. Only
    one daemon runs per data directory (`hold_data_dir`), so the name is never used twice at once."""
    if settings.instances.name:
        return settings.instances.name
    name = f"{socket.gethostname()}:{settings.data_dir.resolve()}"
    if len(name) > 200:
        name = (
            f"{socket.gethostname()[:100]}:{hashlib.sha256(str(settings.data_dir.resolve()).encode()).hexdigest()[:16]}"
        )
    return name


def hold_data_dir(data_dir: Path) -> int:
    """Lock the data directory for this daemon's lifetime (the kernel drops the lock when it dies)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(data_dir / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise InstanceBusy(f"another `mailbridge run` is using the data directory {data_dir}") from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    return descriptor


@dataclass(frozen=True, slots=True)
class Round:
    """What one renewal decided."""

    held: frozenset[str]  # renewed or newly taken, minus `excess`
    excess: frozenset[str]  # held beyond the fair share: to be given back once their watchers stop
    alive: int  # instances alive, this one included
    share: int
    next_expiry: datetime | None  # the next lease or instance of another one to run out: a takeover then


def lease_round(
    session: Session,
    me: str,
    mailboxes: Sequence[str],
    releasing: Collection[str],
    now: datetime,
    ttl: timedelta,
) -> Round:
    """Say this instance is alive, renew its leases, and take free ones up to its fair share."""
    until = now + ttl
    instance = session.get(Instance, me)
    if instance is None:
        session.add(Instance(id=me, host=socket.gethostname(), pid=os.getpid(), started_at=now, alive_until=until))
    else:
        instance.alive_until = until
    session.execute(delete(Instance).where(Instance.alive_until < now - 10 * ttl))  # long gone
    session.flush()
    alive = session.scalar(select(func.count()).select_from(Instance).where(Instance.alive_until > now)) or 1
    insert_missing(session, MailboxLease, [{"mailbox": name} for name in mailboxes])
    # Our own rows are updated, not claimed: a batch of ours that is being recorded holds one FOR KEY SHARE
    # (the fence), which a plain UPDATE does not wait for, while a claim (FOR UPDATE) skips the row.
    renewed = set(
        session.scalars(
            update(MailboxLease)
            .where(MailboxLease.mailbox.in_(mailboxes), MailboxLease.holder == me)
            .values(expires_at=until)
            .returning(MailboxLease.mailbox)
        )
    )
    share = math.ceil(len(mailboxes) / max(alive, 1))
    keeping = sorted(renewed - set(releasing))
    excess = frozenset(keeping[share:])
    held = set(keeping[:share])
    wanted = share - len(held) - len(renewed & set(releasing))
    if wanted > 0:
        free = session.scalars(
            claim_rows(
                select(MailboxLease.mailbox)
                .where(
                    MailboxLease.mailbox.in_(mailboxes),
                    (MailboxLease.holder.is_(None)) | (MailboxLease.expires_at <= now),
                )
                .order_by(MailboxLease.mailbox)
                .limit(wanted)
            )
        ).all()
        if free:
            session.execute(
                update(MailboxLease)
                .where(MailboxLease.mailbox.in_(free))
                .values(holder=me, expires_at=until, acquired_at=now)
            )
            held.update(free)
    others = (MailboxLease.holder != me) & (MailboxLease.expires_at > now) & MailboxLease.mailbox.in_(mailboxes)
    expiries = [
        session.scalar(select(func.min(MailboxLease.expires_at)).where(others)),
        session.scalar(select(func.min(Instance.alive_until)).where(Instance.id != me, Instance.alive_until > now)),
    ]
    next_expiry = min((at for at in expiries if at is not None), default=None)
    return Round(frozenset(held), excess, alive, share, next_expiry)


def release(session: Session, me: str, mailboxes: Collection[str]) -> None:
    """Give leases back at once (a clean stop, or more than the fair share), so another instance need not wait
    for them to run out."""
    if mailboxes:
        session.execute(
            update(MailboxLease)
            .where(MailboxLease.mailbox.in_(list(mailboxes)), MailboxLease.holder == me)
            .values(holder=None, expires_at=None)
        )


def leave(session: Session, me: str) -> None:
    release(session, me, list(session.scalars(select(MailboxLease.mailbox).where(MailboxLease.holder == me))))
    session.execute(delete(Instance).where(Instance.id == me))


def hand_over(session: Session, me: str, keep: Collection[str], now: datetime, ttl: timedelta) -> None:
    """A reload: every lease but `keep` is given back; those are renewed for the next run, which renews them
    again at its first round, and this instance stays alive, so no other instance takes them in between."""
    held = session.scalars(select(MailboxLease.mailbox).where(MailboxLease.holder == me)).all()
    release(session, me, [name for name in held if name not in keep])
    if keep:
        session.execute(
            update(MailboxLease)
            .where(MailboxLease.mailbox.in_(list(keep)), MailboxLease.holder == me)
            .values(expires_at=now + ttl)
        )
    session.execute(update(Instance).where(Instance.id == me).values(alive_until=now + ttl))


def check_held(session: Session, me: str, mailboxes: Collection[str], now: datetime) -> None:
    """The fence, in the transaction that records receipts: raises LeaseLost unless every one of these
    mailboxes is leased to us and the lease has not run out."""
    rows = dict(
        session.execute(
            share_rows(
                select(MailboxLease.mailbox, MailboxLease.holder).where(
                    MailboxLease.mailbox.in_(list(mailboxes)), MailboxLease.expires_at > now
                )
            )
        ).all()
    )
    lost = sorted(name for name in mailboxes if rows.get(name) != me)
    if lost:
        raise LeaseLost(f"no longer holding the lease of mailbox(es) {', '.join(lost)}")


def take_free(
    session: Session, me: str, mailboxes: Sequence[str], now: datetime, ttl: timedelta
) -> tuple[list[str], dict[str, str]]:
    """Take every free (or run out) lease of these mailboxes, without a fair share: the mailboxes taken, and
    those another holder keeps, with its name."""
    insert_missing(session, MailboxLease, [{"mailbox": name} for name in mailboxes])
    free = list(
        session.scalars(
            claim_rows(
                select(MailboxLease.mailbox).where(
                    MailboxLease.mailbox.in_(mailboxes),
                    (MailboxLease.holder.is_(None)) | (MailboxLease.expires_at <= now) | (MailboxLease.holder == me),
                )
            )
        )
    )
    if free:
        session.execute(
            update(MailboxLease)
            .where(MailboxLease.mailbox.in_(free))
            .values(holder=me, expires_at=now + ttl, acquired_at=now)
        )
    held = session.execute(
        select(MailboxLease.mailbox, MailboxLease.holder).where(
            MailboxLease.mailbox.in_(mailboxes), MailboxLease.mailbox.not_in(free)
        )
    ).all()
    # A row skipped because another transaction had it locked is held: its holder is renewing or fencing it.
    return sorted(free), {name: holder or "another instance" for name, holder in held}


class OneRunLeases:
    """The leases of `mailbridge run --once` next to running daemons: it fetches only the mailboxes whose lease
    is free, holds them for its run (renewed every `renew_seconds`) and gives them back at the end. It takes
    no part in the fair share and does not count as an instance: a daemon started meanwhile takes the
    mailboxes once they are given back."""

    def __init__(self, db: Database, settings: InstanceSettings, me: str) -> None:
        self.db = db  # its own database thread, like the keeper's
        self.settings = settings
        self.me = me
        self.held: list[str] = []

    @property
    def ttl(self) -> timedelta:
        return timedelta(seconds=self.settings.lease_seconds)

    async def take(self, mailboxes: Sequence[str]) -> dict[str, str]:
        """Take the free leases (`held`); the mailboxes left out, with the instance that holds each."""
        self.held, busy = await self.db.run(self._take, mailboxes)
        return busy

    def fence(self, session: Session, mailboxes: Collection[str]) -> None:
        leased = [name for name in mailboxes if name in self.held]
        if leased:
            check_held(session, self.me, leased, utcnow())

    async def renew_until(self, done: asyncio.Event) -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.settings.renew_seconds)
            if not done.is_set():
                try:
                    await self.db.run(self._renew)
                except Exception:  # the fence stops the batches if the leases run out meanwhile
                    log.exception("run --once: renewing the leases failed")

    async def release(self) -> None:
        await self.db.run(self._release)

    def _take(self, mailboxes: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        with self.db.unit_of_work() as session:
            return take_free(session, self.me, mailboxes, utcnow(), self.ttl)

    def _renew(self) -> None:
        with self.db.unit_of_work() as session:
            session.execute(
                update(MailboxLease)
                .where(MailboxLease.mailbox.in_(self.held), MailboxLease.holder == self.me)
                .values(expires_at=utcnow() + self.ttl)
            )

    def _release(self) -> None:
        with self.db.unit_of_work() as session:
            release(session, self.me, self.held)


# A watcher: given the event that stops it, fetches one mailbox until then.
WatcherRun = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


class LeaseKeeper:
    """Runs the watchers of the mailboxes this instance holds, and only those, while it holds them."""

    def __init__(
        self, db: Database, settings: InstanceSettings, me: str, watchers: dict[str, WatcherRun], grace_seconds: float
    ) -> None:
        self.db = db  # its own database thread: a renewal must not queue behind the intake's batches
        self.settings = settings
        self.me = me
        self.watchers = watchers
        self.grace_seconds = grace_seconds
        self._running: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = {}
        self._releasing: set[str] = set()
        self._renewed_at = 0.0  # monotonic time the last successful renewal started
        self._last: Round | None = None
        self._failed = False
        # Set by a reload before it stops this run: the leases the next run goes on holding (None: a stop,
        # which gives every lease back).
        self.keep_at_stop: frozenset[str] | None = None

    @property
    def ttl(self) -> timedelta:
        return timedelta(seconds=self.settings.lease_seconds)

    def running(self) -> Collection[str]:
        """The mailboxes whose watchers run here now."""
        return self._running.keys()

    def fence(self, session: Session, mailboxes: Collection[str]) -> None:
        leased = [name for name in mailboxes if name in self.watchers]
        if leased:
            check_held(session, self.me, leased, utcnow())

    async def run(self, stop: asyncio.Event) -> None:
        log.info("instance %s: taking part in mailbox leases (%d mailbox(es))", self.me, len(self.watchers))
        try:
            while not stop.is_set():
                await self._renew(stop)
                await self._reap()
                # Woken early by a watcher that ends: a crash stops the daemon at once, a lease given back
                # is free for the other instances at once.
                watching = [task for task, _ in self._running.values()]
                await _wait(stop, watching, self._until_next_round())
        finally:
            await self._stop_all()
            try:
                keep = None if self.keep_at_stop is None else self.keep_at_stop - self._releasing
                await self.db.run(self._leave, keep)
            except Exception:
                log.exception("could not give back the leases; they run out in %g s", self.settings.lease_seconds)

    async def _renew(self, stop: asyncio.Event) -> None:
        started = time.monotonic()
        attempt = asyncio.ensure_future(self.db.run(self._round, set(self._releasing)))
        safe_for = self._renewed_at + self.settings.lease_seconds - self.settings.renew_seconds - started
        done, _ = await asyncio.wait([attempt], timeout=max(safe_for, 0.0))
        if not done:
            # Renew or stop: our leases may run out before this renewal gets through.
            if self._running:
                log.error("instance %s: cannot renew the leases in time; stopping every mailbox", self.me)
                self._stop(list(self._running))
            await asyncio.wait([attempt])
        try:
            result = attempt.result()
        except Exception:
            log.exception("instance %s: renewing the leases failed", self.me)
            self._failed = True  # tried again in a second, so that the deadline below is met on time
            if time.monotonic() - self._renewed_at > self.settings.lease_seconds - self.settings.renew_seconds:
                self._stop(list(self._running))
            return
        self._failed = False
        self._renewed_at = started
        self._last = result
        keep = result.held | result.excess | self._releasing
        lost = [name for name in self._running if name not in keep]
        if lost:
            log.warning("instance %s: lease of %s lost; stopping it", self.me, ", ".join(sorted(lost)))
            self._stop(lost)
        if result.excess:
            log.info(
                "instance %s: %d instance(s) alive, fair share %d; giving back %s",
                self.me,
                result.alive,
                result.share,
                ", ".join(sorted(result.excess)),
            )
            self._releasing |= result.excess
            self._stop([name for name in result.excess if name in self._running])
        for name in sorted(result.held):
            if name not in self._running and not stop.is_set():
                log.info("instance %s: took the lease of mailbox %s", self.me, name)
                event = asyncio.Event()
                task = asyncio.create_task(
                    self.watchers[name](event), name=f"fetch:{name}", context=mailbox_context(name)
                )
                self._running[name] = (task, event)

    def _until_next_round(self) -> float:
        """Renew every `renew_seconds`; sooner when a lease or an instance runs out before that (its mailboxes
        are taken over as soon as may be), and every second while this instance holds less than its share
        (another one gives mailboxes back after its next renewal)."""
        wait = self.settings.renew_seconds
        last = self._last
        if last is None or self._failed:
            return min(wait, 1.0)
        if len(last.held) + len(self._releasing) < last.share:
            wait = min(wait, 1.0)
        if last.next_expiry is not None:
            wait = min(wait, max((last.next_expiry - utcnow()).total_seconds() + 0.1, 0.1))
        return wait

    def _round(self, releasing: set[str]) -> Round:
        with self.db.unit_of_work() as session:
            return lease_round(session, self.me, list(self.watchers), releasing, utcnow(), self.ttl)

    def _leave(self, keep: frozenset[str] | None) -> None:
        with self.db.unit_of_work() as session:
            if keep is None:
                leave(session, self.me)
            else:
                hand_over(session, self.me, keep, utcnow(), self.ttl)

    def _stop(self, names: Sequence[str]) -> None:
        for name in names:
            if name in self._running:
                self._running[name][1].set()

    async def _reap(self) -> None:
        """Watchers that ended: a crash stops the daemon; a stopped one's lease is given back if we were
        letting it go."""
        for name, (task, _) in list(self._running.items()):
            if not task.done():
                continue
            del self._running[name]
            if task.cancelled():
                continue
            error = task.exception()
            if error is not None:
                raise RuntimeError(f"the watcher of mailbox {name} crashed") from error
        gone = {name for name in self._releasing if name not in self._running}
        if gone:
            self._releasing -= gone
            await self.db.run(self._release, gone)

    def _release(self, names: set[str]) -> None:
        with self.db.unit_of_work() as session:
            release(session, self.me, names)

    async def _stop_all(self) -> None:
        """Each watcher finishes the batch in hand (commit + server update); past the grace period it is cancelled."""
        self._stop(list(self._running))
        tasks = [task for task, _ in self._running.values()]
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=self.grace_seconds)
        for task in late:
            log.warning("%s did not stop within the grace period; cancelling it", task.get_name())
            task.cancel()
        if late:  # a cancelled watcher may still wait for a FETCH in flight; do not wait for it for long
            await asyncio.wait(late, timeout=5)
        for task, _ in self._running.values():
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("task %s crashed", task.get_name(), exc_info=task.exception())
        self._running.clear()


async def _wait(stop: asyncio.Event, tasks: list[asyncio.Task[None]], seconds: float) -> None:
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([stopping, *tasks], timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
