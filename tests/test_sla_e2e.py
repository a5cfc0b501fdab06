"""SLA end to end: the daemon (`mailbridge run`, a real process) takes a mail from Dovecot, and a ticket
with a short SLA produces exactly one reminder at 75 % and one escalation at the breach in the SMTP sink,
also when the daemon is killed and restarted in between."""

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
FIRST_RESPONSE_SECONDS = 8


def _by_subject(sink: SmtpSink, word: str) -> list[str]:
    return [r.message_id for r in sink.received if word in str(r.message["Subject"])]


def _outbox_sent(db: Path, template: str) -> bool:
    return database.rows(db, "select status from outbox where template = :template", template=template) == [("sent",)]


def _ticket_created(db: Path) -> float:
    created = database.scalar(db, "select created_at from tickets")
    # SQLite keeps the UTC instant as text without a zone; PostgreSQL hands back an aware datetime.
    at = created if isinstance(created, datetime) else datetime.fromisoformat(created)
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


@pytest.mark.skipif(not Dovecot.available(), reason="dovecot is not installed")
async def test_one_reminder_and_one_escalation_across_a_killed_daemon(
    tmp_path: Path, sink: SmtpSink, tmp_path_factory: pytest.TempPathFactory
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
                "policies": {"P3": {"first_response": f"{FIRST_RESPONSE_SECONDS}s", "business_hours": False}},
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
        await wait_until(lambda: bool(_by_subject(sink, "SLA reminder")), timeout=FIRST_RESPONSE_SECONDS + 20)
        reminded_after = time.time() - created
        # Killed once the reminder is recorded as sent: anything it did not finish, a restart must.
        await wait_until(lambda: _outbox_sent(db, "sla_reminder"), timeout=10)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        assert not _by_subject(sink, "SLA breached")
        daemon = start_daemon(config, log)
        await wait_until(lambda: bool(_by_subject(sink, "SLA breached")), timeout=FIRST_RESPONSE_SECONDS + 20)
        escalated_after = time.time() - created
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
    [reminder] = [r for r in sink.received if "SLA reminder" in str(r.message["Subject"])]
    [breach] = [r for r in sink.received if "SLA breached" in str(r.message["Subject"])]
    assert reminder.rcpt_tos == [AGENT] and breach.rcpt_tos == [LEAD]
    assert "[MB-000001]" in str(reminder.message["Subject"]) and reminder.message["Auto-Submitted"] == "auto-generated"
    body = reminder.message.get_body(("plain",))
    assert body is not None and "Awaria drukarki" in body.get_content() and "75 %" in body.get_content()
    # 75 % of 8 s is 6 s after the ticket was created (the check runs every 0.25 s; then the sender's SMTP).
    assert 0.75 * FIRST_RESPONSE_SECONDS - 1.5 <= reminded_after <= 0.75 * FIRST_RESPONSE_SECONDS + 3
    assert FIRST_RESPONSE_SECONDS - 1.5 <= escalated_after <= FIRST_RESPONSE_SECONDS + 8
