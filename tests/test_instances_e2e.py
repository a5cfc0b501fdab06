"""Several instances on one PostgreSQL database: two `mailbridge run` processes, four mailboxes in Dovecot,
2,000 mails, one daemon killed (SIGKILL) half-way. Every mail becomes exactly one ticket, every
acknowledgement reaches the SMTP server exactly once, and the survivor takes over the dead daemon's
mailboxes within a minute (default lease: 30 s, renewed every 10 s)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text

from mailbridge.config import DATABASE_URL_ENV
from tests.crash_env import start_daemon
from tests.imap_env import append_many, imap_box, new_user, sample_mail, wait_until
from tests.support.dovecot import Dovecot
from tests.support.smtp_sink import SmtpSink

pytestmark = pytest.mark.skipif(not Dovecot.available(), reason="dovecot is not installed")

MAILBOXES = 4
PER_MAILBOX = 500
SECRET = "a-secret-both-instances-share-0123456789"


def _config(tmp_path: Path, name: str, boxes: list[dict[str, Any]], database_url: str, sink: SmtpSink) -> Path:
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
    monkeypatch.setenv(DATABASE_URL_ENV, postgres_url)  # the PostgreSQL pass would give the daemons another one
    """Both daemons check the SLAs every 0.25 s while both create tickets: each ticket gets one reminder
    (75 %) and one escalation (the breach), whichever daemon's check comes first."""
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
