"""Mailbox leases and outbox claims between instances, on SQLite and on PostgreSQL, with the clock given."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import time_machine
from pydantic import ValidationError
from sqlalchemy import insert, select, update

from mailbridge.app import App
from mailbridge.config import InstanceSettings, Settings
from mailbridge.db import SCHEMA_HEAD, Database
from mailbridge.leases import (
    LeaseKeeper,
    LeaseLost,
    Round,
    WatcherRun,
    check_held,
    instance_name,
    lease_round,
    release,
)
from mailbridge.models import Instance, MailboxLease, OutboxMail
from mailbridge.notify.sender import CLAIM_SIZE, OutboxSender, OutboxTally, _Recorder, _Result
from tests.imap_env import make_app

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
TTL = timedelta(seconds=30)
BOXES = ["a1", "a2", "a3", "a4"]


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'm.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    database = Database(url, fsync_each_commit=False)
    database.upgrade()
    yield database
    database.close()


def _round(db: Database, me: str, at: datetime, releasing: frozenset[str] = frozenset()) -> Round:
    with db.unit_of_work() as session:
        return lease_round(session, me, BOXES, releasing, at, TTL)


def test_a_second_instance_gets_half_once_the_first_gives_it_back(db: Database) -> None:
    first = _round(db, "one", T0)
    assert first.held == set(BOXES) and first.alive == 1
    second = _round(db, "two", T0 + timedelta(seconds=1))
    assert second.held == set() and second.share == 2  # nothing free yet: the first gives back at its renewal
    renewed = _round(db, "one", T0 + timedelta(seconds=10))
    assert renewed.held == {"a1", "a2"} and renewed.excess == {"a3", "a4"}
    with db.unit_of_work() as session:  # once their watchers have stopped
        release(session, "one", renewed.excess)
    assert _round(db, "two", T0 + timedelta(seconds=11)).held == {"a3", "a4"}
    assert _round(db, "one", T0 + timedelta(seconds=20)).held == {"a1", "a2"}  # and it stays so


def test_a_dead_holders_mailboxes_are_taken_when_its_lease_runs_out(db: Database) -> None:
    _round(db, "one", T0)
    _round(db, "two", T0 + timedelta(seconds=1))
    _round(db, "one", T0 + timedelta(seconds=10))
    with db.unit_of_work() as session:
        release(session, "one", ["a3", "a4"])
    _round(db, "two", T0 + timedelta(seconds=11))
    # "one" dies after its renewal at T0+10 s: its lease and its heartbeat run out at T0+40 s.
    before = _round(db, "two", T0 + timedelta(seconds=39))
    assert before.held == {"a3", "a4"} and before.alive == 2
    assert before.next_expiry == T0 + timedelta(seconds=40)  # the keeper comes back right then
    after = _round(db, "two", T0 + timedelta(seconds=40, milliseconds=100))
    assert after.held == set(BOXES) and after.alive == 1


def test_the_fence_refuses_a_holder_whose_lease_ran_out_or_was_taken(db: Database) -> None:
    _round(db, "one", T0)
    with db.unit_of_work() as session:
        check_held(session, "one", ["a1", "a2"], T0 + timedelta(seconds=29))
    with pytest.raises(LeaseLost, match="a1"), db.unit_of_work() as session:
        check_held(session, "one", ["a1"], T0 + timedelta(seconds=30))  # ran out, though nobody took it yet
    _round(db, "two", T0 + timedelta(seconds=31))
    with pytest.raises(LeaseLost), db.unit_of_work() as session:
        check_held(session, "one", ["a2"], T0 + timedelta(seconds=31))
    with db.reader() as session:
        assert set(session.scalars(select(MailboxLease.holder))) == {"two"}


def test_a_holder_that_missed_its_renewal_gets_its_lease_back_if_nobody_took_it(db: Database) -> None:
    _round(db, "one", T0)
    assert _round(db, "one", T0 + timedelta(seconds=45)).held == set(BOXES)


def _outbox(db: Database, count: int) -> None:
    rows = [
        {
            "template": "acknowledgement",
            "mailbox": "a1",
            "message_id": f"<m{n}@test>",
            "envelope_from": "support@helpdesk.example",
            "recipients": [f"k{n}@example.com"],
            "recipient": f"k{n}@example.com",
            "raw": b"Subject: x\r\n\r\nx\r\n",
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": T0 - timedelta(minutes=1),
            "deliver_until": T0 + timedelta(days=2),
            "created_at": T0,
            "automatic": True,
            "subject": "x",
        }
        for n in range(count)
    ]
    with db.unit_of_work() as session:
        session.execute(insert(OutboxMail), rows)


def _sender(db: Database, tmp_path: Path, name: str) -> OutboxSender:
    settings = Settings.model_validate({"data_dir": str(tmp_path / name), "instances": {"name": name}})
    return OutboxSender(db, settings, asyncio.Event())


def test_two_senders_claiming_at_once_never_take_the_same_mail(db: Database, tmp_path: Path) -> None:
    _outbox(db, 2 * CLAIM_SIZE + 50)
    senders = [_sender(db, tmp_path, name) for name in ("one", "two")]
    claims: list[list[int]] = [[], []]
    start = threading.Barrier(2)

    def claim(index: int) -> None:
        start.wait()
        for _ in range(3):
            claims[index] += [mail.id for mail in senders[index]._claim()]

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not set(claims[0]) & set(claims[1])
    assert len(claims[0]) + len(claims[1]) == 2 * CLAIM_SIZE + 50
    with db.reader() as session:
        claimed_by = {row.id: row.claimed_by for row in session.scalars(select(OutboxMail))}
    assert all(claimed_by[i].startswith("one/") for i in claims[0])
    assert all(claimed_by[i].startswith("two/") for i in claims[1])


def test_a_claim_given_back_or_run_out_can_be_taken_by_another_sender(db: Database, tmp_path: Path) -> None:
    _outbox(db, 3)
    one, two = _sender(db, tmp_path, "one"), _sender(db, tmp_path, "two")
    taken = one._claim()
    assert len(taken) == 3 and two._claim() == []
    one._unclaim([taken[0].id])
    assert [mail.id for mail in two._claim()] == [taken[0].id]
    # "one" died holding the other two (and "two" did not send its one): free once the claims run out.
    with time_machine.travel(datetime.now(UTC) + timedelta(seconds=119), tick=False):
        assert two._claim() == []
    with time_machine.travel(datetime.now(UTC) + timedelta(seconds=121), tick=False):
        assert sorted(mail.id for mail in two._claim()) == sorted(mail.id for mail in taken)


def test_a_late_outcome_never_undoes_the_work_of_the_sender_that_took_the_claim_over(
    db: Database, tmp_path: Path
) -> None:
    """Sender "one" claims three mails, and its commit of their outcomes comes after its claim ran out and
    "two" claimed them. Its "retry" must not clear two's claim or put a sent mail back in the queue; its
    "sent" stands (the server accepted the mail: it must never go out again)."""
    _outbox(db, 3)
    one, two = _sender(db, tmp_path, "one"), _sender(db, tmp_path, "two")
    first, second, third = sorted(one._claim(), key=lambda mail: mail.id)
    with time_machine.travel(datetime.now(UTC) + timedelta(seconds=121), tick=False):
        assert sorted(mail.id for mail in two._claim()) == [first.id, second.id, third.id]
    late, current = _Recorder(db, one.settings, one.name), _Recorder(db, two.settings, two.name)
    assert current._write([_Result(first, sent=True)]) == {("a1", "sent"): 1}

    tally = late._write(
        [
            _Result(first, sent=False, error="deferred: 451 try later"),  # two has sent it meanwhile
            _Result(second, sent=False, error="deferred: 451 try later"),  # two holds it, not sent yet
            _Result(third, sent=True),  # accepted by the server, though two holds it now
        ]
    )
    assert tally == {("a1", "sent"): 1}  # only what this commit changed is counted
    rows = _rows(db)
    assert rows[first.id] == ("sent", None, 1)
    assert rows[second.id] == ("pending", two.name, 0)  # still two's, not free for a third sender
    assert rows[third.id] == ("sent", None, 1)

    tally = current._write(
        [_Result(second, sent=False, error="refused: 550 no such user", permanent=True), _Result(third, sent=True)]
    )
    assert tally == {("a1", "failed"): 1}  # third: already recorded sent, not counted twice
    late.release()
    current.release()
    rows = _rows(db)
    assert rows[second.id] == ("failed", None, 1)
    assert rows[third.id] == ("sent", None, 1)
    three = _sender(db, tmp_path, "three")
    with time_machine.travel(datetime.now(UTC) + timedelta(days=1), tick=False):
        assert three._claim() == []  # nothing was put back in the queue


def test_a_commit_of_outcomes_waits_for_the_other_connections_but_not_for_a_stalled_one(
    db: Database, tmp_path: Path
) -> None:
    """Three connections: their three outcomes go into one commit. Then one of them stalls (a slow server)
    while another records its next outcome: that one is committed after the short wait, not held back
    until the stalled connection is done."""
    _outbox(db, 4)
    one = _sender(db, tmp_path, "one")
    mails = sorted(one._claim(), key=lambda mail: mail.id)
    commits: list[OutboxTally] = []

    async def connections() -> None:
        recorder = _Recorder(db, one.settings, one.name, commits.append)
        committer = asyncio.create_task(recorder.run())
        for _ in range(3):
            recorder.sending()
        await asyncio.wait_for(asyncio.gather(*(recorder.record(_Result(m, sent=True)) for m in mails[:3])), 10)
        assert commits == [{("a1", "sent"): 3}]
        await asyncio.wait_for(recorder.record(_Result(mails[3], sent=True)), 10)  # two connections silent
        assert commits == [{("a1", "sent"): 3}, {("a1", "sent"): 1}]
        for _ in range(3):
            recorder.done_sending()
        await recorder.close()
        await committer
        await db.run(recorder.release)

    asyncio.run(connections())
    assert {row[0] for row in _rows(db).values()} == {"sent"}


def _rows(db: Database) -> dict[int, tuple[str, str | None, int]]:
    with db.reader() as session:
        return {row.id: (row.status, row.claimed_by, row.attempts) for row in session.scalars(select(OutboxMail))}


def test_instances_started_at_once_on_a_new_database_migrate_it_once(postgres_url: str) -> None:
    errors: list[Exception] = []

    def upgrade() -> None:
        database = Database(postgres_url)
        try:
            database.upgrade()
        except Exception as exc:  # what a second instance met before: the tables the first one created
            errors.append(exc)
        finally:
            database.close()

    threads = [threading.Thread(target=upgrade) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    database = Database(postgres_url)
    assert database.schema_revision() == SCHEMA_HEAD
    database.close()


async def test_the_keeper_stops_a_watcher_whose_lease_was_lost_and_gives_back_the_rest(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'k.db'}", fsync_each_commit=False)
    db.upgrade()
    stopped: dict[str, float] = {}

    def watcher(name: str) -> WatcherRun:
        async def run(stop: asyncio.Event) -> None:
            await stop.wait()  # a watcher finishes its batch and returns once told to stop
            stopped[name] = time.monotonic()

        return run

    settings = InstanceSettings(lease_seconds=3, renew_seconds=1)
    keeper = LeaseKeeper(db, settings, "one", {name: watcher(name) for name in BOXES}, grace_seconds=1)
    stop = asyncio.Event()
    running = asyncio.create_task(keeper.run(stop))
    try:
        await _until(lambda: len(keeper._running) == len(BOXES))
        with db.unit_of_work() as session:  # taken over behind its back (as if its lease had run out)
            session.execute(
                update(MailboxLease)
                .where(MailboxLease.mailbox == "a2")
                .values(holder="two", expires_at=datetime.now(UTC) + timedelta(minutes=1))
            )
        await _until(lambda: "a2" in stopped and "a2" not in keeper._running)  # ended, then reaped
        assert set(stopped) == {"a2"} and set(keeper._running) == {"a1", "a3", "a4"}
    finally:
        stop.set()
        await running
    assert set(stopped) == set(BOXES)
    with db.reader() as session:  # a clean stop gives its leases back at once
        assert dict(session.execute(select(MailboxLease.mailbox, MailboxLease.holder)).all()) == {
            "a1": None,
            "a2": "two",
            "a3": None,
            "a4": None,
        }
    db.close()


async def _until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time limit"
        await asyncio.sleep(0.05)


def test_a_renewal_interval_that_could_lose_the_lease_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="renew_seconds must be at most half of lease_seconds"):
        Settings.model_validate({"instances": {"lease_seconds": 30, "renew_seconds": 20}})


def _holders(app: App) -> tuple[dict[str, str | None], list[str]]:
    with app.db.reader() as session:
        leases = dict(session.execute(select(MailboxLease.mailbox, MailboxLease.holder)).all())
        return leases, list(session.scalars(select(Instance.id)))


async def test_a_reload_keeps_the_leases_that_stay_and_a_stop_in_between_gives_them_back(tmp_path: Path) -> None:
    """What `serve` does at a reload (hand_over, then the run stops) and at a SIGTERM during its drain (leave)."""
    boxes = [{"name": name, "type": "maildir", "path": str(tmp_path / name)} for name in ("kept", "removed")]
    app = make_app(tmp_path, boxes)
    me = instance_name(app.settings)
    try:
        generation = asyncio.Event()
        running = asyncio.create_task(app.run(generation))
        await _until(lambda: _holders(app) == ({"kept": me, "removed": me}, [me]))
        app.hand_over(app.settings.model_copy(update={"mailboxes": app.settings.mailboxes[:1]}))
        generation.set()
        await running
        assert _holders(app) == ({"kept": me, "removed": None}, [me])  # still alive, for the next run
        await app.leave()
        assert _holders(app) == ({"kept": None, "removed": None}, [])
    finally:
        app.close()
