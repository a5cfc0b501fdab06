"""SLA end to end: the daemon (`mailbridge run`, a real process) takes a mail from Dovecot, and a ticket
with a short SLA produces exactly one reminder at 75 % and one escalation at the breach in the SMTP sink,
also when the daemon is killed between them: after the reminder was delivered, or while it waited in
the outbox because the SMTP server put it off."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.crash_env import start_daemon
from tests.imap_env import imap_box, new_user, sample_mail, wait_until, write_config
from tests.support import database
from tests.support.dovecot import Dovecot
from tests.support.smtp_sink import SmtpSink

SUPPORT = "support@helpdesk.example"
AGENT = "agata@helpdesk.example"
LEAD = "lead@helpdesk.example"
CUSTOMER = "anna.nowak@klient.example"
FIRST_RESPONSE_SECONDS = 12  # the reminder at 9 s: 3 s for the restart before the breach


def _by_subject(sink: SmtpSink, word: str) -> list[str]:
    return [r.message_id for r in sink.received if word in str(r.message["Subject"])]


def _outbox_status(db: Path, template: str) -> list[tuple[str, int]]:
    return database.rows(db, "select status, attempts from outbox where template = :template", template=template)


def _sla_history(db: Path) -> list[tuple[str, str | None, str | None]]:
    return database.rows(db, "select kind, old, new from ticket_events where actor = 'sla' order by id")


def _timers(db: Path) -> list[tuple[str, float, bool]]:
    rows = database.rows(db, "select target, share, done_at is not null from sla_timers order by share")
    return [(target, share, bool(done)) for target, share, done in rows]


def _ticket_created(db: Path) -> float:
    return _timestamp(database.scalar(db, "select created_at from tickets"))


def _queued(db: Path, template: str) -> float:
    """When the SLA check queued the mail (the instant its timer fired), as a UNIX timestamp."""
    return _timestamp(
        database.scalar(db, "select created_at from outbox where template = :template", template=template)
    )


def _checks_started(log: Path, offset: int) -> float:
    """When the daemon that wrote the log from `offset` on began its SLA checks (its scheduler started)."""
    for line in log.read_bytes()[offset:].decode(errors="replace").splitlines():
        if "mailbridge: SLA checks every" in line:
            # logging's asctime: local time, as the daemon's clock saw it
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError("the restarted daemon never started its SLA checks")


def _timestamp(stored: str | datetime) -> float:
    # SQLite keeps the UTC instant as text without a zone; PostgreSQL hands back an aware datetime.
    at = stored if isinstance(stored, datetime) else datetime.fromisoformat(stored)
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


@pytest.mark.skipif(not Dovecot.available(), reason="dovecot is not installed")
@pytest.mark.parametrize(
    "killed",
    [
        "after_the_reminder_was_sent",
        # The reminder fired (its timer is done) but the SMTP server put it off (451): it waits in the
        # outbox when the daemon dies. The restarted daemon must deliver it, once, and not fire it again.
        "while_the_reminder_waits_in_the_outbox",
    ],
)
async def test_one_reminder_and_one_escalation_across_a_killed_daemon(
    tmp_path: Path, sink: SmtpSink, tmp_path_factory: pytest.TempPathFactory, killed: str
) -> None:
    server = Dovecot.start(tmp_path_factory.mktemp("dovecot"))
    daemon = None
    try:
        user = new_user(server)
        config = write_config(
            tmp_path,
            [imap_box(server, user, address=SUPPORT, existing_mail="import", acknowledge_backlog=True)],
            smtp=sink.config(),
            outbox={"domain": "helpdesk.example", "first_retry_seconds": 0.2, "poll_seconds": 0.2},
            agents=[{"address": AGENT, "name": "Agata", "queues": ["general"]}],
            routing={"default_queue": "general"},
            sla={
                "policies": {
                    "P3": {
                        "first_response": f"{FIRST_RESPONSE_SECONDS}s",
                        "business_hours": False,
                        "raise_priority": True,
                    }
                },
                "escalation_contacts": {"general": [LEAD]},
                "check_interval_seconds": 0.25,
            },
        )
        log = tmp_path / "daemon.log"
        db = tmp_path / "data" / "mailbridge.db"
        daemon = start_daemon(config, log)
        server.append(sample_mail(subject="Awaria drukarki", sender=CUSTOMER), user=user.name)
        await wait_until(lambda: bool(_by_subject(sink, "Re: Awaria drukarki")), timeout=30)
        # Timed from the ticket's creation, not from the acknowledgement: on a busy machine the sender
        # process may take seconds to start, and the acknowledgement with it.
        created = _ticket_created(db)
        if killed == "after_the_reminder_was_sent":
            await wait_until(lambda: bool(_by_subject(sink, "SLA reminder")), timeout=FIRST_RESPONSE_SECONDS + 20)
            # Killed once the reminder is recorded as sent: anything it did not finish, a restart must.
            await wait_until(lambda: _outbox_status(db, "sla_reminder") == [("sent", 1)], timeout=10)
        else:
            sink.handler.refuse[AGENT] = "451 4.3.0 Try again later"
            await wait_until(
                lambda: [s for s, n in _outbox_status(db, "sla_reminder") if s == "pending" and n >= 1] != [],
                timeout=FIRST_RESPONSE_SECONDS + 20,
            )
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        assert not _by_subject(sink, "SLA breached")
        assert _sla_history(db) == [("sla_reminder", None, "first_response")]  # fired before the kill
        sink.handler.refuse.clear()
        restarted_after = time.time() - created
        log_offset = log.stat().st_size
        daemon = start_daemon(config, log)
        await wait_until(lambda: bool(_by_subject(sink, "SLA breached")), timeout=FIRST_RESPONSE_SECONDS + 30)
        await asyncio.sleep(2)  # more checks: nothing more may come
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
        daemon = None
    finally:
        if daemon is not None:
            daemon.kill()
            daemon.wait()
        server.stop()
    subjects = Counter(
        "reminder"
        if "SLA reminder" in str(r.message["Subject"])
        else "breach"
        if "SLA breached" in str(r.message["Subject"])
        else "ack"
        for r in sink.received
    )
    assert subjects == {"ack": 1, "reminder": 1, "breach": 1}, log.read_text()[-3000:]
    assert len({r.message_id for r in sink.received}) == 3
    # The history has each once, and the breach raised the priority once.
    assert _sla_history(db) == [
        ("sla_reminder", None, "first_response"),
        ("sla_breach", None, "first_response"),
        ("priority", "P3", "P2"),
    ]
    assert _timers(db) == [("first_response", 0.75, True), ("first_response", 1.0, True)]
    assert _outbox_status(db, "sla_reminder")[0][0] == "sent" and _outbox_status(db, "sla_escalation") == [("sent", 1)]
    [reminder] = [r for r in sink.received if "SLA reminder" in str(r.message["Subject"])]
    [breach] = [r for r in sink.received if "SLA breached" in str(r.message["Subject"])]
    assert reminder.rcpt_tos == [AGENT] and breach.rcpt_tos == [LEAD]
    assert "[MB-000001]" in str(reminder.message["Subject"]) and reminder.message["Auto-Submitted"] == "auto-generated"
    body = reminder.message.get_body(("plain",))
    assert body is not None and "Awaria drukarki" in body.get_content() and "75 %" in body.get_content()
    # Timed by when the check queued each mail (its timer fired), against the ticket's creation: never
    # early; late by at most a few checks (every 0.25 s, slower on a busy machine). The escalation is due
    # while the daemon may still be starting again: then it goes at the first checks it runs.
    reminded_after, escalated_after = _queued(db, "sla_reminder") - created, _queued(db, "sla_escalation") - created
    checking_after = _checks_started(log, log_offset) - created
    assert 0.75 * FIRST_RESPONSE_SECONDS <= reminded_after <= 0.75 * FIRST_RESPONSE_SECONDS + 3
    assert restarted_after < FIRST_RESPONSE_SECONDS  # the restart came between the reminder and the breach
    assert FIRST_RESPONSE_SECONDS <= escalated_after <= max(FIRST_RESPONSE_SECONDS, checking_after) + 3
