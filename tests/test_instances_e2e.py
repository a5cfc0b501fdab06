"""Several instances on one PostgreSQL database: two `mailbridge run` processes, four mailboxes in Dovecot,
2,000 mails, one daemon killed (SIGKILL) half-way. Every mail becomes exactly one ticket, every
acknowledgement reaches the SMTP server exactly once, and the survivor takes over the dead daemon's
mailboxes within a minute (default lease: 30 s, renewed every 10 s)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, select, text, update

from mailbridge.config import DATABASE_URL_ENV
from mailbridge.models import MailboxLease, utcnow
from tests.crash_env import start_daemon
from tests.imap_env import append_many, count, imap_box, make_app, new_user, sample_mail, wait_until
from tests.service_env import free_port
from tests.support.dovecot import Dovecot
from tests.support.smtp_sink import SmtpSink

pytestmark = pytest.mark.skipif(not Dovecot.available(), reason="dovecot is not installed")

MAILBOXES = 4
PER_MAILBOX = 500
SECRET = "a-secret-both-instances-share-0123456789"


def _config(
    tmp_path: Path, name: str, boxes: list[dict[str, Any]], database_url: str, sink: SmtpSink, **top: Any
) -> Path:
    """One instance's config: its own data directory (as on its own machine); the database, the threading
    secret and the mailboxes are shared."""
    path = tmp_path / f"{name}.yaml"
    data = {
        "data_dir": str(tmp_path / f"data-{name}"),
        "database": {"url": database_url},
        "storage": {"fsync": False},
        "parsing": {"workers": 1},
        "fetch": {"reconnect_max_seconds": 1},
        "shutdown_grace_seconds": 5,
        "threading": {"secret": SECRET},
        "smtp": sink.config(),
        "outbox": {"domain": "helpdesk.example", "first_retry_seconds": 1, "poll_seconds": 1},
        "instances": {"name": name},
        "mailboxes": boxes,
        **top,
    }
    path.write_text(yaml.safe_dump(data))
    return path


class Db:
    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)

    def scalar(self, sql: str) -> Any:
        with self.engine.connect() as connection:
            return connection.execute(text(sql)).scalar()

    def rows(self, sql: str) -> list[Any]:
        with self.engine.connect() as connection:
            return list(connection.execute(text(sql)).all())

    def holders(self) -> dict[str, str | None]:
        return dict(self.rows("select mailbox, holder from mailbox_leases where expires_at > now()"))


@pytest.mark.slow
async def test_two_daemons_one_killed_every_mail_one_ticket_every_ack_once(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    postgres_url: str,
    sink: SmtpSink,
    report: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(DATABASE_URL_ENV, postgres_url)  # the PostgreSQL pass would give the daemons another one
    server = Dovecot.start(tmp_path_factory.mktemp("dovecot"))
    db = Db(postgres_url)
    daemons: dict[str, subprocess.Popen[bytes]] = {}
    try:
        users = [new_user(server, "multi") for _ in range(MAILBOXES)]
        boxes = [imap_box(server, u, address=f"support{n}@helpdesk.example") for n, u in enumerate(users)]
        configs = {name: _config(tmp_path, name, boxes, postgres_url, sink) for name in ("a", "b")}
        daemons["a"] = start_daemon(configs["a"], tmp_path / "a.log")
        await wait_until(lambda: len(_safe(db.holders)) == MAILBOXES, timeout=60)
        daemons["b"] = start_daemon(configs["b"], tmp_path / "b.log")
        # The fair share: the first instance gives two mailboxes back, the second takes them.
        shared = await wait_until(lambda: sorted(Counter(_safe(db.holders).values()).values()) == [2, 2], timeout=60)

        mails = {
            user.name: [sample_mail(sender=f"k{n}.{i}@klient.example") for i in range(PER_MAILBOX)]
            for n, user in enumerate(users)
        }
        appending = [threading.Thread(target=append_many, args=(server, user, mails[user.name])) for user in users]
        for thread in appending:
            thread.start()
        total = MAILBOXES * PER_MAILBOX
        await wait_until(
            lambda: (_safe(lambda: db.scalar("select count(*) from tickets")) or 0) >= total // 2, timeout=90
        )
        victims = sorted(box for box, holder in db.holders().items() if holder == "a")
        daemons["a"].send_signal(signal.SIGKILL)
        daemons["a"].wait()
        killed_at = time.monotonic()
        tickets_at_kill = db.scalar("select count(*) from tickets")
        took_over = await wait_until(
            lambda: set(db.holders().values()) == {"b"} and len(db.holders()) == MAILBOXES, timeout=75
        )
        for thread in appending:
            thread.join()
        status = subprocess.run(
            [sys.executable, "-m", "mailbridge", "status", "--json", "--config", str(configs["b"])],
            capture_output=True,
            check=False,
        )
        assert {row["mailbox"]: row["held_by"] for row in json.loads(status.stdout)["mailboxes"]} == {
            u.name: "b" for u in users
        }

        await wait_until(lambda: db.scalar("select count(*) from tickets") >= total, timeout=120)
        all_in = time.monotonic() - killed_at
        await wait_until(lambda: len(sink.received) >= total, timeout=60)
        await asyncio.sleep(2)  # anything sent twice would arrive now
        daemons["b"].send_signal(signal.SIGTERM)
        assert daemons["b"].wait(timeout=30) == 0
        report(
            f"two daemons, {total} mails in {MAILBOXES} mailboxes: two each {shared:.0f} s after the second "
            f"started; killed one at {tickets_at_kill} tickets; the other took over {', '.join(victims)} "
            f"{took_over:.0f} s after the kill and had every ticket {all_in:.0f} s after it"
        )

        assert len(victims) == 2
        assert took_over < 60
        tickets = db.scalar("select count(*) from tickets")
        articles = db.scalar("select count(*) from articles")
        receipts = db.rows("select mailbox, outcome, count(*) from receipts group by mailbox, outcome")
        assert tickets == total and articles == total
        assert sorted(receipts) == sorted((u.name, "stored", PER_MAILBOX) for u in users)
        sent_ids = Counter(r.message_id for r in sink.received)
        assert len(sent_ids) == total and set(sent_ids.values()) == {1}, "every acknowledgement exactly once"
        answered = Counter(str(r.message["In-Reply-To"]).strip() for r in sink.received)
        originals = {_message_id(raw) for box in mails.values() for raw in box}
        assert set(answered) == originals and set(answered.values()) == {1}
        assert db.rows("select status, count(*) from outbox group by status") == [("sent", total)]
        # Every mail was moved out of INBOX by whichever instance stored it (or by the survivor afterwards).
        assert all(server.uids(user=u.name) == [] for u in users)
    finally:
        for daemon in daemons.values():
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
        db.engine.dispose()
        server.stop()


def _safe(read: Callable[[], Any]) -> Any:
    """A read that may come before the first daemon has created the tables."""
    try:
        return read()
    except Exception:
        return {}


def _message_id(raw: bytes) -> str:
    for line in raw.split(b"\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode()
    raise AssertionError("a sample mail without a Message-ID")


SLA_SECONDS = 10
AGENT = "agata@helpdesk.example"
LEAD = "lead@helpdesk.example"


@pytest.mark.slow
async def test_two_daemons_send_each_sla_reminder_and_escalation_once(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    postgres_url: str,
    sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both daemons check the SLAs every 0.25 s while both create tickets: each ticket gets one reminder
    (75 %) and one escalation (the breach), whichever daemon's check comes first."""
    monkeypatch.setenv(DATABASE_URL_ENV, postgres_url)  # the PostgreSQL pass would give the daemons another one
    server = Dovecot.start(tmp_path_factory.mktemp("dovecot"))
    db = Db(postgres_url)
    daemons: dict[str, subprocess.Popen[bytes]] = {}
    per_box = 30
    try:
        users = [new_user(server, "sla") for _ in range(2)]
        boxes = [imap_box(server, u, address=f"support{n}@helpdesk.example") for n, u in enumerate(users)]
        sla = {
            "agents": [{"address": AGENT, "name": "Agata", "queues": ["general"]}],
            "routing": {"default_queue": "general"},
            "sla": {
                "policies": {"P3": {"first_response": f"{SLA_SECONDS}s", "business_hours": False}},
                "escalation_contacts": {"general": [LEAD]},
                "check_interval_seconds": 0.25,
            },
        }
        for name in ("a", "b"):
            path = _config(tmp_path, name, boxes, postgres_url, sink)
            path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **sla}))
            daemons[name] = start_daemon(path, tmp_path / f"{name}.log")
            await wait_until(lambda: len(_safe(db.holders)) == 2, timeout=60)
        await wait_until(lambda: sorted(Counter(_safe(db.holders).values()).values()) == [1, 1], timeout=60)
        appending = [
            threading.Thread(
                target=append_many,
                args=(server, u, [sample_mail(sender=f"s{n}.{i}@klient.example") for i in range(per_box)]),
            )
            for n, u in enumerate(users)
        ]
        for thread in appending:
            thread.start()
        for thread in appending:
            thread.join()
        total = 2 * per_box
        await wait_until(lambda: len(_by_kind(sink)["breach"]) >= total, timeout=60 + SLA_SECONDS)
        await asyncio.sleep(2)  # more checks by both: nothing more may come
        for daemon in daemons.values():
            daemon.send_signal(signal.SIGTERM)
        for daemon in daemons.values():
            assert daemon.wait(timeout=30) == 0
        tickets = {number for (number,) in db.rows("select number from tickets")}
    finally:
        for daemon in daemons.values():
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
        db.engine.dispose()
        server.stop()
    kinds = _by_kind(sink)
    assert len(tickets) == total
    for kind in ("ack", "reminder", "breach"):
        assert Counter(kinds[kind]) == Counter(tickets), kind
    assert {r.rcpt_tos[0] for r in sink.received if "SLA reminder" in str(r.message["Subject"])} == {AGENT}


def _by_kind(sink: SmtpSink) -> dict[str, list[str]]:
    """Ticket numbers of the mails at the sink, by kind."""
    found: dict[str, list[str]] = {"ack": [], "reminder": [], "breach": []}
    for received in list(sink.received):
        subject = str(received.message["Subject"])
        match = re.search(r"\[(MB-\d+)\]", subject)
        assert match is not None, subject
        kind = "reminder" if "SLA reminder" in subject else "breach" if "SLA breached" in subject else "ack"
        found[kind].append(match.group(1))
    return found


def _fetched(port: int) -> dict[str, float]:
    """mailbridge_mails_fetched_total by mailbox, from the daemon's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        sample.labels["mailbox"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "mailbridge_mails_fetched_total"
    }


def _holder_watch(db: Db, mailbox: str, seen: list[str | None], stop: threading.Event) -> None:
    while not stop.is_set():
        seen.append(_safe(lambda: db.scalar(f"select holder from mailbox_leases where mailbox = '{mailbox}'")))
        time.sleep(0.02)


async def test_a_reload_keeps_the_leases_of_the_mailboxes_that_stay_and_the_counters_go_on(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    postgres_url: str,
    sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Instance b holds less than its fair share and asks for more every second: a mailbox that a's reload
    gave back for a moment would be b's. The reload keeps the lease of the mailbox that stays and gives back
    the removed one's; the Prometheus counters of a go on counting across it."""
    monkeypatch.setenv(DATABASE_URL_ENV, postgres_url)
    server = Dovecot.start(tmp_path_factory.mktemp("dovecot"))
    db = Db(postgres_url)
    daemons: dict[str, subprocess.Popen[bytes]] = {}
    port = free_port()
    try:
        users = [new_user(server, "reload") for _ in range(3)]
        boxes = [imap_box(server, u, address=f"support{n}@helpdesk.example") for n, u in enumerate(users)]
        config_a = _config(tmp_path, "a", boxes, postgres_url, sink, http={"listen": f"127.0.0.1:{port}"})
        daemons["a"] = start_daemon(config_a, tmp_path / "a.log")
        await wait_until(lambda: set(_safe(db.holders).values()) == {"a"} and len(db.holders()) == 3, timeout=60)
        for user in users:
            append_many(server, user, [sample_mail(), sample_mail()])
        await wait_until(lambda: db.scalar("select count(*) from tickets") == 6, timeout=60)
        assert _fetched(port) == {u.name: 2 for u in users}

        daemons["b"] = start_daemon(_config(tmp_path, "b", boxes, postgres_url, sink), tmp_path / "b.log")
        await wait_until(lambda: sorted(Counter(_safe(db.holders).values()).values()) == [1, 2], timeout=60)
        kept, dropped = sorted(box for box, holder in db.holders().items() if holder == "a")
        acquired = db.scalar(f"select acquired_at from mailbox_leases where mailbox = '{kept}'")

        seen: list[str | None] = []
        stop_watching = threading.Event()
        watching = threading.Thread(target=_holder_watch, args=(db, kept, seen, stop_watching))
        watching.start()
        try:
            data = yaml.safe_load(config_a.read_text())
            data["mailboxes"] = [box for box in boxes if box["name"] != dropped]
            data["routing"] = {"default_queue": "after-reload"}
            config_a.write_text(yaml.safe_dump(data))
            daemons["a"].send_signal(signal.SIGHUP)
            await wait_until(lambda: "configuration reloaded" in (tmp_path / "a.log").read_text(), timeout=60)
            # The removed mailbox's lease is given back, and b (below its share) takes it.
            await wait_until(lambda: db.holders().get(dropped) == "b", timeout=30)
            await asyncio.sleep(2)  # b asks every second: a lease a had let go would be b's by now
        finally:
            stop_watching.set()
            watching.join()
        assert seen and set(seen) == {"a"}, f"the lease of {kept} left a during the reload: {set(seen)}"
        assert db.scalar(f"select acquired_at from mailbox_leases where mailbox = '{kept}'") == acquired

        kept_user = next(u for u in users if u.name == kept)
        append_many(server, kept_user, [sample_mail()])
        await wait_until(lambda: db.scalar("select count(*) from tickets where queue = 'after-reload'") == 1, 60)
        # Counted on after the reload: 2 before it and 1 after, not 1; the removed mailbox keeps its 2.
        await wait_until(lambda: _safe(lambda: _fetched(port)).get(kept) == 3, timeout=30)
        assert _fetched(port)[dropped] == 2
        for daemon in daemons.values():
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=30) == 0
        assert " ERROR " not in (tmp_path / "a.log").read_text()
    finally:
        for daemon in daemons.values():
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
        db.engine.dispose()


async def test_run_once_leaves_the_mailboxes_a_running_daemon_holds_to_it(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    postgres_url: str,
    sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daemon holds mailbox `busy` (polling it every 10 minutes); `run --once` with `busy` and `free` in its
    configuration fetches `free` only, says that `busy` is the daemon's, and gives `free`'s lease back."""
    monkeypatch.setenv(DATABASE_URL_ENV, postgres_url)
    server = Dovecot.start(tmp_path_factory.mktemp("dovecot"))
    db = Db(postgres_url)
    daemon: subprocess.Popen[bytes] | None = None
    try:
        busy_user, free_user = new_user(server, "busy"), new_user(server, "free")
        busy = imap_box(server, busy_user, idle=False, poll_interval=600, address="busy@helpdesk.example")
        free = imap_box(server, free_user, address="free@helpdesk.example")
        # In the mailbox before the daemon starts, so its first drain (it then polls again in 10 minutes)
        # surely imports it: the drain is done once this mail is a ticket. Appended after the lease was
        # seen, it could miss a first drain that came first and wait out the 10 minutes.
        append_many(server, busy_user, [sample_mail()])
        daemon = start_daemon(_config(tmp_path, "daemon", [busy], postgres_url, sink), tmp_path / "daemon.log")
        await wait_until(lambda: _safe(db.holders) == {busy_user.name: "daemon"}, timeout=60)
        await wait_until(lambda: (_safe(lambda: db.scalar("select count(*) from tickets")) or 0) == 1, timeout=60)
        await asyncio.sleep(1)  # the drain's server update (the move) is done as well
        append_many(server, busy_user, [sample_mail(), sample_mail()])
        append_many(server, free_user, [sample_mail(), sample_mail(), sample_mail()])

        once = subprocess.run(
            [
                sys.executable,
                "-m",
                "mailbridge",
                "run",
                "--once",
                "--config",
                str(_config(tmp_path, "once", [busy, free], postgres_url, sink)),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "MAILBRIDGE_CONFIG": ""},
            check=False,
        )
        assert once.returncode == 0, once.stderr[-3000:]
        assert f"mailbox {busy_user.name}: skipped, instance daemon is fetching it" in once.stderr
        assert db.scalar("select count(*) from tickets") == 4
        assert db.rows("select mailbox, count(*) from receipts group by mailbox order by mailbox") == sorted(
            [(busy_user.name, 1), (free_user.name, 3)]
        )
        assert len(server.uids(user=busy_user.name)) == 2, "the daemon's mailbox was left to it"
        assert server.uids(user=free_user.name) == []
        assert db.rows("select holder from mailbox_leases where mailbox = '" + free_user.name + "'") == [(None,)]
        assert db.rows("select id from instances") == [("daemon",)]  # run --once is not an instance
        assert _safe(db.holders) == {busy_user.name: "daemon"}
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        db.engine.dispose()


async def test_two_daemons_on_one_host_fetch_a_shared_maildir_one_at_a_time(
    tmp_path: Path, postgres_url: str, sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Maildir mailbox is leased like an IMAP one: two instances that see the same directory (one host, or
    shared storage) take turns at it, so no file is read or moved by both; a stopped holder's turn passes on."""
    monkeypatch.setenv(DATABASE_URL_ENV, postgres_url)
    db = Db(postgres_url)
    box = tmp_path / "maildirs" / "local"
    for sub in ("new", "cur", "tmp"):
        (box / sub).mkdir(parents=True)
    boxes = [{"name": "local", "type": "maildir", "path": str(box), "address": "local@helpdesk.example"}]
    daemons = {
        name: start_daemon(_config(tmp_path, name, boxes, postgres_url, sink), tmp_path / f"{name}.log")
        for name in ("a", "b")
    }
    try:
        await wait_until(lambda: len(_safe(lambda: db.rows("select id from instances")) or []) == 2, timeout=60)
        # Files written before the mailbox's first look are a backlog (no acknowledgement): wait for it.
        first_look = "select count(*) from mailbox_state where initial_done"
        await wait_until(lambda: (_safe(lambda: db.scalar(first_look)) or 0) == 1, timeout=60)
        mails = [sample_mail(sender=f"k{i}@klient.example") for i in range(100)]
        for n, raw in enumerate(mails):
            (box / "tmp" / f"{n}.test").write_bytes(raw)
            (box / "tmp" / f"{n}.test").rename(box / "new" / f"{n}.test")
        await wait_until(lambda: db.scalar("select count(*) from tickets") == 100, timeout=90)
        [holder] = set(db.holders().values())
        other = "b" if holder == "a" else "a"
        daemons[holder].send_signal(signal.SIGTERM)
        assert daemons[holder].wait(timeout=30) == 0
        await wait_until(lambda: db.holders() == {"local": other}, timeout=30)  # given back at the stop: at once
        more = [sample_mail(sender=f"later{i}@klient.example") for i in range(20)]
        for n, raw in enumerate(more, start=len(mails)):
            (box / "tmp" / f"{n}.test").write_bytes(raw)
            (box / "tmp" / f"{n}.test").rename(box / "new" / f"{n}.test")
        await wait_until(lambda: db.scalar("select count(*) from tickets") == 120, timeout=60)
        await wait_until(lambda: len(sink.received) >= 120, timeout=60)
        await asyncio.sleep(2)  # anything sent twice would arrive now
        daemons[other].send_signal(signal.SIGTERM)
        assert daemons[other].wait(timeout=30) == 0

        assert db.rows("select outcome, count(*) from receipts group by outcome") == [("stored", 120)]
        assert list((box / "new").iterdir()) == [] and list((box / "cur").iterdir()) == []
        processed = [*(box / ".Processed" / "cur").iterdir(), *(box / ".Processed" / "new").iterdir()]
        assert len(processed) == 120, "every file moved once, by the instance that stored it"
        assert len({r.message_id for r in sink.received}) == len(sink.received) == 120
        for name in ("a", "b"):
            assert " ERROR " not in (tmp_path / f"{name}.log").read_text()
    finally:
        for daemon in daemons.values():
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
        db.engine.dispose()


async def test_run_once_whose_lease_is_taken_mid_run_stops_that_mailbox_and_loses_nothing(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """`run --once` holds the lease of its mailbox while it drains it. When another instance takes the lease
    over mid-run (as after a renewal that came too late), the next batch's commit is refused by the fence:
    the mails fetched after that are neither stored nor moved, the lease stays with its new holder, and
    the run ends cleanly. A later run stores the rest: every mail one ticket, none lost."""
    server = Dovecot.start(tmp_path_factory.mktemp("dovecot"))
    try:
        user = new_user(server, "once")
        total = 400
        append_many(server, user, [sample_mail() for _ in range(total)])
        app = make_app(tmp_path, [imap_box(server, user)], fetch={"batch_size": 5})
        try:
            draining = asyncio.create_task(app.run_once())
            await wait_until(lambda: count(app, "select count(*) from tickets") > 0, timeout=60)
            with app.db.unit_of_work() as session:
                session.execute(
                    update(MailboxLease)
                    .where(MailboxLease.mailbox == user.name)
                    .values(holder="thief", expires_at=utcnow() + timedelta(minutes=10))
                )
            with caplog.at_level("WARNING", logger="mailbridge"):
                assert await asyncio.wait_for(draining, 120) == {}
            assert f"mailbox {user.name}: no longer holding the lease" in caplog.text
            stored = count(app, "select count(*) from tickets")
            assert 0 < stored < total, "the fence stopped the run part-way"
            assert count(app, "select count(distinct message_id) from articles") == stored
            inbox, processed = server.uids("INBOX", user=user.name), server.uids("Processed", user=user.name)
            assert len(processed) <= stored, "only what was committed is moved"
            assert len(inbox) + len(processed) == total, "nothing removed from the server unrecorded"
            with app.db.reader() as session:  # run --once gives back only its own leases
                holder = session.scalar(select(MailboxLease.holder).where(MailboxLease.mailbox == user.name))
            assert holder == "thief"

            with app.db.unit_of_work() as session:  # the other instance lets go
                session.execute(
                    update(MailboxLease).where(MailboxLease.mailbox == user.name).values(holder=None, expires_at=None)
                )
            await app.run_once()
            assert count(app, "select count(*) from tickets") == total
            assert count(app, "select count(distinct message_id) from articles") == total
            assert server.uids("INBOX", user=user.name) == []
            assert len(server.uids("Processed", user=user.name)) == total
        finally:
            app.close()
    finally:
        server.stop()
