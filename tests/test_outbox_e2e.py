"""Outgoing mail end to end: acknowledgements through the outbox to a real SMTP server (aiosmtpd) on
127.0.0.1, incoming mail from the real Dovecot or from files, and no answer to anything that is not a person."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import re
import signal
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from mailbridge.app import App
from mailbridge.ingest.maildir import ensure_maildir
from mailbridge.models import Article, OutboxMail, OutboxStatus, Ticket
from tests.crash_env import start_daemon
from tests.imap_env import count, imap_box, make_app, new_user, sample_mail, wait_until
from tests.support import database
from tests.support.dovecot import Dovecot, generate_tls_files
from tests.support.smtp_sink import SmtpSink

SUPPORT = "support@helpdesk.example"


def outbox_settings(**extra: Any) -> dict[str, Any]:
    return {
        "first_retry_seconds": 0.2,
        "max_retry_seconds": 1,
        "poll_seconds": 0.2,
        "domain": "helpdesk.example",
        **extra,
    }


def files_app(tmp_path: Path, sink: SmtpSink, box: dict[str, Any] | None = None, **top: Any) -> App:
    """A mailbox named `support` fed by `App.ingest(..., mailbox="support")`."""
    mailbox = {"type": "maildir", "name": "support", "path": str(tmp_path / "maildir"), "address": SUPPORT}
    return make_app(
        tmp_path,
        [{**mailbox, **(box or {})}],
        smtp=top.pop("smtp", sink.config()),
        outbox=outbox_settings(**top.pop("outbox", {})),
        **top,
    )


def write_mails(directory: Path, mails: list[bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for index, raw in enumerate(mails):
        (directory / f"{index:05d}.eml").write_bytes(raw)
    return directory


def outbox(app: App) -> list[OutboxMail]:
    with app.db.reader() as session:
        return list(session.scalars(select(OutboxMail).order_by(OutboxMail.id)))


def parsed(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


@pytest.mark.skipif(not Dovecot.available(), reason="dovecot is not installed")
async def test_acknowledgement_from_imap_carries_the_ticket_and_threads_in_the_mail_client(
    tmp_path: Path, sink: SmtpSink, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = Dovecot.start(tmp_path_factory.mktemp("dovecot"))
    try:
        user = new_user(server)
        app = make_app(
            tmp_path,
            [
                imap_box(
                    server,
                    user,
                    address=SUPPORT,
                    from_name="Obsługa klienta",
                    language="pl",
                    existing_mail="import",
                    acknowledge_backlog=True,
                )
            ],
            smtp=sink.config(),
            outbox=outbox_settings(),
        )
        customer_mail = sample_mail(subject="Faktura nr 12/2026", sender="anna.nowak@klient.example")
        server.append(customer_mail, user=user.name)
        try:
            await app.run_once()
        finally:
            app.close()
    finally:
        server.stop()
    [received] = sink.received
    ack = received.message
    original = parsed(customer_mail)
    assert received.rcpt_tos == ["anna.nowak@klient.example"]
    assert received.mail_from == SUPPORT
    assert ack["Subject"] == "[MB-000001] Re: Faktura nr 12/2026"
    assert ack["From"].addresses[0].addr_spec == SUPPORT
    assert ack["From"].addresses[0].display_name == "Obsługa klienta"
    assert ack["To"].addresses[0].addr_spec == "anna.nowak@klient.example"
    assert ack["In-Reply-To"] == original["Message-ID"]
    assert ack["References"] == original["Message-ID"]
    assert ack["Auto-Submitted"] == "auto-replied"
    assert ack["X-Auto-Response-Suppress"] == "All"
    assert ack["X-Loop"] == "mailbridge@helpdesk.example"
    assert ack["Message-ID"].startswith("<mb.1.") and ack["Message-ID"].endswith("@helpdesk.example>")
    text = ack.get_body(("plain",))
    html = ack.get_body(("html",))
    assert text is not None and html is not None
    assert "zgłoszenie MB-000001" in text.get_content() and "[MB-000001]" in text.get_content()
    assert "<strong>MB-000001</strong>" in html.get_content()
    [row] = outbox(app)
    assert row.status == OutboxStatus.SENT and row.attempts == 1 and row.template == "ack"
    assert row.message_id == received.message_id


@pytest.mark.skipif(not Dovecot.available(), reason="dovecot is not installed")
async def test_backlog_gets_no_acknowledgement_but_new_mail_does(
    tmp_path: Path, sink: SmtpSink, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = Dovecot.start(tmp_path_factory.mktemp("dovecot"))
    try:
        user = new_user(server)
        box = imap_box(server, user, address=SUPPORT)
        for _ in range(3):
            server.append(sample_mail(sender="old@klient.example"), user=user.name)
        app = make_app(tmp_path, [box], smtp=sink.config(), outbox=outbox_settings())
        try:
            await app.run_once()
            assert count(app, "select count(*) from tickets") == 3
            assert sink.received == []
            reasons = {a.no_answer_reason for a in _articles(app)}
            assert reasons == {"already in the mailbox before its first run (acknowledge_backlog is off)"}
            server.append(sample_mail(sender="new@klient.example"), user=user.name)
            await app.run_once()
        finally:
            app.close()
    finally:
        server.stop()
    assert [r.rcpt_tos for r in sink.received] == [["new@klient.example"]]


@pytest.mark.parametrize("acknowledge_backlog", [False, True])
async def test_maildir_backlog_gets_no_acknowledgement_but_later_drops_do(
    tmp_path: Path, sink: SmtpSink, acknowledge_backlog: bool
) -> None:
    inbox = tmp_path / "maildir"
    ensure_maildir(inbox)
    for index in range(3):
        (inbox / "new" / f"old{index}.eml").write_bytes(sample_mail(sender=f"old{index}@klient.example"))
    app = files_app(tmp_path, sink, box={"acknowledge_backlog": acknowledge_backlog})
    try:
        [watcher] = app.watchers
        await watcher.run_once()
        await app.sender.deliver_due()
        assert count(app, "select count(*) from tickets") == 3
        backlog_acks = sorted(r.rcpt_tos[0] for r in sink.received)
        reasons = {a.no_answer_reason for a in _articles(app)}
        (inbox / "new" / "fresh.eml").write_bytes(sample_mail(sender="new@klient.example"))
        await watcher.run_once()
        await app.sender.deliver_due()
    finally:
        app.close()
    if acknowledge_backlog:  # what the demo asks for: its pre-filled mails are acknowledged
        assert backlog_acks == [f"old{i}@klient.example" for i in range(3)] and reasons == {None}
    else:
        assert backlog_acks == []
        assert reasons == {"already in the mailbox before its first run (acknowledge_backlog is off)"}
    assert sink.received[-1].rcpt_tos == ["new@klient.example"]
    assert len(sink.received) == (4 if acknowledge_backlog else 1)


async def test_maildir_backlog_survives_a_restart_before_its_first_drain_is_done(
    tmp_path: Path, sink: SmtpSink
) -> None:
    inbox = tmp_path / "maildir"
    ensure_maildir(inbox)
    (inbox / "new" / "old.eml").write_bytes(sample_mail(sender="old@klient.example"))
    app = files_app(tmp_path, sink)
    try:
        stopped = asyncio.Event()
        stopped.set()  # stopped before the first drain took anything
        await app.watchers[0].run_once(stopped)
        assert count(app, "select count(*) from tickets") == 0
    finally:
        app.close()
    await asyncio.sleep(0.05)  # a mail delivered after the mailbox was first seen is not backlog
    (inbox / "new" / "later.eml").write_bytes(sample_mail(sender="later@klient.example"))
    app = files_app(tmp_path, sink)
    try:
        await app.watchers[0].run_once()
        await app.sender.deliver_due()
        reasons = sorted((a.no_answer_reason or "") for a in _articles(app))
    finally:
        app.close()
    assert [r.rcpt_tos for r in sink.received] == [["later@klient.example"]]
    assert reasons == ["", "already in the mailbox before its first run (acknowledge_backlog is off)"]


async def test_smtp_outage_loses_nothing_and_sends_each_acknowledgement_once(tmp_path: Path, sink: SmtpSink) -> None:
    sink.stop()
    mails = [sample_mail(sender=f"klient{i}@example.com") for i in range(100)]
    folder = write_mails(tmp_path / "in", mails)
    app = files_app(tmp_path, sink)
    try:
        summary = await app.ingest([folder], mailbox="support")
        assert summary.stored == 100
        await app.sender.deliver_due()  # the server is down: one attempt, then the server is backed off
        rows = outbox(app)
        assert len(rows) == 100 and all(r.status == OutboxStatus.PENDING for r in rows)
        assert sum(r.attempts for r in rows) >= 1
        assert any(r.last_error and "cannot connect" in r.last_error for r in rows)
        sink.start()
        stop = asyncio.Event()
        sender = asyncio.create_task(app.sender.run(stop))
        await wait_until(lambda: len(sink.received) >= 100, timeout=30)
        await asyncio.sleep(0.5)  # anything sent twice would arrive now
        stop.set()
        await asyncio.wait_for(sender, 10)
    finally:
        app.close()
    _assert_once_each(sink, 100)
    assert {r.rcpt_tos[0] for r in sink.received} == {f"klient{i}@example.com" for i in range(100)}


async def test_the_sender_keeps_its_smtp_session_from_one_wake_to_the_next_and_closes_it_when_idle(
    tmp_path: Path, sink: SmtpSink
) -> None:
    # Mail trickling in wakes the sender for one mail at a time; a session per wake (connect, EHLO, QUIT)
    # cost more than the mail. The session is closed once a wait for news ends without any.
    app = files_app(tmp_path, sink, outbox={"poll_seconds": 3.0})
    stop = asyncio.Event()
    sender = asyncio.create_task(app.sender.run(stop))
    try:
        for index in range(3):
            folder = write_mails(tmp_path / f"in{index}", [sample_mail(sender=f"klient{index}@example.com")])
            assert (await app.ingest([folder], mailbox="support")).stored == 1
            await wait_until(lambda index=index: len(sink.received) == index + 1, timeout=20)
        assert [r.session for r in sink.received] == [1, 1, 1]
        assert sink.handler.quits == 0
        await wait_until(lambda: sink.handler.quits == 1, timeout=20)  # idle: closed with QUIT
        folder = write_mails(tmp_path / "in-later", [sample_mail(sender="later@example.com")])
        await app.ingest([folder], mailbox="support")
        await wait_until(lambda: len(sink.received) == 4, timeout=20)
        assert sink.received[3].session == 2  # a new session after the idle one was closed
    finally:
        stop.set()
        await asyncio.wait_for(sender, 10)
        app.close()
    assert sink.handler.quits == 2  # closed on the way out too
    _assert_once_each(sink, 4)


async def test_a_wake_at_the_end_of_a_round_starts_another_round_not_the_next_poll(
    tmp_path: Path, sink: SmtpSink
) -> None:
    # Mail committed after a round's last claim found nothing, but before the round ended, wakes the sender;
    # clearing the wake after the round would lose it and leave the mail for the next poll (60 s here).
    app = files_app(tmp_path, sink, outbox={"poll_seconds": 60.0})
    later = write_mails(tmp_path / "later", [sample_mail(sender="later@example.com")])
    rounds_ended = 0
    real_round = app.sender.deliver_due

    async def round_then_new_mail(stop: asyncio.Event | None = None, *, keep_sessions: bool = False) -> int:
        nonlocal rounds_ended
        tried = await real_round(stop, keep_sessions=keep_sessions)
        rounds_ended += 1
        if rounds_ended == 1:
            assert (await app.ingest([later], mailbox="support")).stored == 1
        return tried

    app.sender.deliver_due = round_then_new_mail  # type: ignore[method-assign]
    first = write_mails(tmp_path / "first", [sample_mail(sender="first@example.com")])
    assert (await app.ingest([first], mailbox="support")).stored == 1
    stop = asyncio.Event()
    sender = asyncio.create_task(app.sender.run(stop))
    try:
        await wait_until(lambda: len(sink.received) == 2, timeout=10)
    finally:
        stop.set()
        await asyncio.wait_for(sender, 10)
        app.close()
    assert [r.rcpt_tos for r in sink.received] == [["first@example.com"], ["later@example.com"]]


async def test_a_kept_session_the_server_dropped_unnoticed_costs_no_back_off(tmp_path: Path, sink: SmtpSink) -> None:
    # The server closed the idle session (its timeout, a restart) and the sender learns it only from the next
    # MAIL: the mail goes out on a new session at once, and the server is not put in back-off (60 s here).
    app = files_app(tmp_path, sink, outbox={"first_retry_seconds": 60, "max_retry_seconds": 60})
    try:
        for index in range(2):
            folder = write_mails(tmp_path / f"in{index}", [sample_mail(sender=f"klient{index}@example.com")])
            assert (await app.ingest([folder], mailbox="support")).stored == 1
            if index == 1:
                sink.handler.drop_at_mail = 1
            assert await app.sender.deliver_due(keep_sessions=True) == 1
        statuses = [r.status for r in outbox(app)]
        await app.sender.deliver_due()  # closes the kept session
    finally:
        app.close()
    assert statuses == [OutboxStatus.SENT, OutboxStatus.SENT]
    assert [r.session for r in sink.received] == [1, 2]
    _assert_once_each(sink, 2)


async def test_smtp_outage_across_a_daemon_restart(tmp_path: Path, sink: SmtpSink) -> None:
    sink.stop()
    folder = write_mails(tmp_path / "in", [sample_mail(sender=f"k{i}@example.com") for i in range(100)])
    app = files_app(tmp_path, sink)
    try:
        await app.ingest([folder], mailbox="support")
        await app.sender.deliver_due()
    finally:
        app.close()  # the daemon stops during the outage
    sink.start()
    app = files_app(tmp_path, sink)
    try:
        for _ in range(50):  # the failed attempt set each mail's retry 0.2 s later
            await app.sender.deliver_due()
            if {r.status for r in outbox(app)} == {OutboxStatus.SENT}:
                break
            await asyncio.sleep(0.1)
        assert {r.status for r in outbox(app)} == {OutboxStatus.SENT}
    finally:
        app.close()
    _assert_once_each(sink, 100)


async def test_permanent_refusal_fails_at_once_and_temporary_is_retried(tmp_path: Path, sink: SmtpSink) -> None:
    sink.handler.refuse["gone@example.com"] = "550 5.1.1 No such user"
    sink.handler.refuse["busy@example.com"] = "451 4.3.0 Try again later"
    folder = write_mails(
        tmp_path / "in", [sample_mail(sender="gone@example.com"), sample_mail(sender="busy@example.com")]
    )
    app = files_app(tmp_path, sink)
    try:
        await app.ingest([folder], mailbox="support")
        await app.sender.deliver_due()
        gone, busy = outbox(app)
        assert gone.status == OutboxStatus.FAILED and gone.attempts == 1
        assert "550" in (gone.last_error or "")
        assert busy.status == OutboxStatus.PENDING and "451" in (busy.last_error or "")
        del sink.handler.refuse["busy@example.com"]
        await asyncio.sleep(0.3)
        await app.sender.deliver_due()
        gone, busy = outbox(app)
        assert busy.status == OutboxStatus.SENT and busy.attempts == 2
        assert gone.status == OutboxStatus.FAILED and gone.attempts == 1
    finally:
        app.close()
    assert [r.rcpt_tos for r in sink.received] == [["busy@example.com"]]


async def test_gives_up_after_the_retry_period(tmp_path: Path, sink: SmtpSink) -> None:
    sink.handler.refuse["busy@example.com"] = "451 4.3.0 Try again later"
    folder = write_mails(tmp_path / "in", [sample_mail(sender="busy@example.com")])
    app = files_app(tmp_path, sink, outbox={"retry_for_hours": 0.0003})  # about a second
    try:
        await app.ingest([folder], mailbox="support")
        for _ in range(20):
            await app.sender.deliver_due()
            if outbox(app)[0].status != OutboxStatus.PENDING:
                break
            await asyncio.sleep(0.3)
        [row] = outbox(app)
    finally:
        app.close()
    assert row.status == OutboxStatus.FAILED
    assert row.attempts >= 2 and "451" in (row.last_error or "")


async def test_rate_limit_per_sender(tmp_path: Path, sink: SmtpSink) -> None:
    folder = write_mails(tmp_path / "in", [sample_mail(sender="flood@example.com") for _ in range(5)])
    app = files_app(tmp_path, sink)
    try:
        await app.ingest([folder], mailbox="support")
        await app.sender.deliver_due()
        reasons = [a.no_answer_reason for a in _articles(app)]
    finally:
        app.close()
    assert len(sink.received) == 3
    assert reasons[:3] == [None, None, None]
    assert all(
        r and r.startswith("rate limit: 3 automatic mails to flood@example.com in the last hour") for r in reasons[3:]
    )


async def test_no_notify_import_and_switched_off_mailbox_send_nothing(
    tmp_path: Path, sink: SmtpSink, another_installation: Callable[[], AbstractContextManager[None]]
) -> None:
    folder = write_mails(tmp_path / "in", [sample_mail(sender="a@example.com")])
    app = files_app(tmp_path / "quiet", sink)
    try:
        await app.ingest([folder], mailbox="support", notify=False)
        await app.sender.deliver_due()
        assert [a.no_answer_reason for a in _articles(app)] == ["imported with --no-notify"]
    finally:
        app.close()
    with another_installation():
        app = files_app(tmp_path / "off", sink, box={"acknowledge": False})
    try:
        await app.ingest([folder], mailbox="support")
        await app.sender.deliver_due()
        assert [a.no_answer_reason for a in _articles(app)] == ["acknowledgements are off for mailbox support"]
    finally:
        app.close()
    assert sink.received == []


async def test_header_injection_in_the_subject_yields_one_encoded_header(tmp_path: Path, sink: SmtpSink) -> None:
    # The subject decodes to text with CR LF and a "Bcc:" after it, and Polish letters.
    evil = "=?utf-8?b?" + base64.b64encode("Zażółć\r\nBcc: victim@example.org".encode()).decode() + "?="
    raw = (
        f"From: Jan <jan@example.com>\r\nTo: {SUPPORT}\r\nSubject: {evil}\r\n"
        "Message-ID: <inj@example.com>\r\n\r\nhi\r\n"
    ).encode()
    folder = write_mails(tmp_path / "in", [raw])
    app = files_app(tmp_path, sink)
    try:
        await app.ingest([folder], mailbox="support")
        await app.sender.deliver_due()
    finally:
        app.close()
    [received] = sink.received
    header_block = received.data.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nBcc:" not in header_block and b"\nBcc:" not in header_block
    assert received.rcpt_tos == ["jan@example.com"]
    subject_lines = [line for line in header_block.split(b"\r\n") if line.lower().startswith(b"subject:")]
    assert len(subject_lines) == 1 and subject_lines[0].isascii() and b"=?utf-8?" in subject_lines[0]
    assert received.message["Subject"] == "[MB-000001] Re: Zażółć Bcc: victim@example.org"


async def test_bounce_of_our_acknowledgement_marks_it_bounced_on_its_ticket(tmp_path: Path, sink: SmtpSink) -> None:
    folder = write_mails(tmp_path / "in", [sample_mail(sender="gone@klient.example")])
    app = files_app(tmp_path, sink)
    try:
        await app.ingest([folder], mailbox="support")
        await app.sender.deliver_due()
        [ack] = sink.received
        bounce = _dsn(ack.data, "gone@klient.example")
        out_of_office = _out_of_office(ack.data)
        await app.ingest([write_mails(tmp_path / "back", [bounce, out_of_office])], mailbox="support")
        await app.sender.deliver_due()
        [row] = outbox(app)
        articles = _articles(app)
        with app.db.reader() as session:
            tickets = list(session.scalars(select(Ticket)))
    finally:
        app.close()
    assert len(tickets) == 1, "a bounce or an auto-reply to our mail must not open a ticket"
    assert tickets[0].status == "new"
    assert [a.kind for a in articles] == ["human", "bounce", "auto_reply"]
    assert all(a.ticket_id == tickets[0].id for a in articles)
    assert row.status == OutboxStatus.BOUNCED and row.bounce_article_id == articles[1].id
    assert len(sink.received) == 1, "nothing answers a bounce or an auto-reply"


async def test_two_instances_do_not_answer_each_others_acknowledgements(
    tmp_path: Path, sink: SmtpSink, another_installation: Callable[[], AbstractContextManager[None]]
) -> None:
    """Instance A (support@a) gets a mail from instance B's address; B then receives A's acknowledgement."""
    a_sink, b_sink = sink, SmtpSink().start()
    try:
        a = make_app(
            tmp_path / "a",
            [{"type": "maildir", "name": "a", "path": str(tmp_path / "a-in"), "address": "support@a.example"}],
            smtp=a_sink.config(),
            outbox=outbox_settings(domain="a.example"),
        )
        with another_installation():
            b = make_app(
                tmp_path / "b",
                [{"type": "maildir", "name": "b", "path": str(tmp_path / "b-in"), "address": "help@b.example"}],
                smtp=b_sink.config(),
                outbox=outbox_settings(domain="b.example"),
            )
        try:
            first = sample_mail(sender="help@b.example")  # e.g. B's agent forwarded something to A
            await a.ingest([write_mails(tmp_path / "1", [first])], mailbox="a")
            await a.sender.deliver_due()
            [a_ack] = a_sink.received
            await b.ingest([write_mails(tmp_path / "2", [a_ack.data])], mailbox="b")
            await b.sender.deliver_due()
            [article] = _articles(b)
        finally:
            a.close()
            b.close()
        assert b_sink.received == []
        assert article.kind == "auto_reply" and article.no_answer_reason == "Auto-Submitted: auto-replied"
    finally:
        b_sink.stop()


def _sender_pids(log: Path) -> list[int]:
    return [int(pid) for pid in re.findall(r"outbox sender running \(pid (\d+)\)", log.read_text())]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _articles(app: App) -> list[Article]:
    with app.db.reader() as session:
        return list(session.scalars(select(Article).order_by(Article.id)))


def _assert_once_each(sink: SmtpSink, expected: int) -> None:
    ids = Counter(r.message_id for r in sink.received)
    assert len(ids) == expected
    assert max(ids.values()) == 1, [m for m, n in ids.items() if n > 1]


def _dsn(returned: bytes, recipient: str) -> bytes:
    headers = returned.split(b"\r\n\r\n", 1)[0].decode()
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.klient.example>\r\n"
        f"To: {SUPPORT}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <dsn-1@mx.klient.example>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="rep"\r\n\r\n'
        "--rep\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--rep\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.klient.example\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: Recipient address rejected\r\n\r\n"
        f"--rep\r\nContent-Type: text/rfc822-headers\r\n\r\n{headers}\r\n--rep--\r\n"
    ).encode()


def _out_of_office(replied_to: bytes) -> bytes:
    ack = parsed(replied_to)
    return (
        "From: Anna <gone@klient.example>\r\n"
        f"To: {SUPPORT}\r\n"
        f"Subject: Automatic reply: {ack['Subject']}\r\n"
        "Message-ID: <oof-1@klient.example>\r\n"
        f"In-Reply-To: {ack['Message-ID']}\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "X-Auto-Response-Suppress: All\r\n\r\n"
        "I am out of the office until Monday.\r\n"
    ).encode()


@pytest.mark.slow
async def test_sigkill_during_sending_repeats_at_most_the_mails_in_flight(
    tmp_path: Path, sink: SmtpSink, report: Callable[[str], None]
) -> None:
    total, connections = 150, 4
    folder = write_mails(tmp_path / "in", [sample_mail(sender=f"k{i}@example.com") for i in range(total)])
    app = files_app(tmp_path, sink, outbox={"connections": connections})
    try:
        await app.ingest([folder], mailbox="support")  # acknowledgements wait in the outbox
    finally:
        app.close()
    sink.handler.delay = 0.01  # slow enough for the kills to land mid-delivery
    config = tmp_path / "mailbridge.yaml"
    log = tmp_path / "daemon.log"
    kills = 0
    while len({r.message_id for r in sink.received}) < total:
        daemon = start_daemon(config, log)
        if kills < 3:
            target = len(sink.received) + 30
            running = daemon
            await wait_until(lambda t=target, d=running: len(sink.received) >= t or d.poll() is not None, timeout=60)
            daemon.send_signal(signal.SIGKILL)
            daemon.wait()
            kills += 1
            # Its sender process records the mails in flight and exits: the restart sends next to no orphan.
            await wait_until(lambda: not any(_alive(pid) for pid in _sender_pids(log)), timeout=10)
            continue
        try:
            await wait_until(lambda: len({r.message_id for r in sink.received}) >= total, timeout=60)
            await asyncio.sleep(0.5)
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=20) == 0
        assert not any(_alive(pid) for pid in _sender_pids(log))
    ids = Counter(r.message_id for r in sink.received)
    repeats = sum(n - 1 for n in ids.values())
    report(f"SIGKILLed the sender {kills} times: {len(sink.received)} mails received, {repeats} repeated")
    rows = database.rows(tmp_path / "data" / "mailbridge.db", "select message_id, status from outbox")
    assert len(ids) == total and {m for m, _ in rows} == set(ids)
    assert {s for _, s in rows} == {"sent"}
    assert repeats <= kills * connections, "only the mails in flight at a kill may arrive twice"


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
async def test_smtp_over_tls_with_login(tmp_path: Path, tls: str) -> None:
    files = generate_tls_files(tmp_path / "pki")
    secure = SmtpSink(tls=tls, tls_files=files, login=("support@helpdesk.example", "smtp-secret")).start()
    try:
        folder = write_mails(tmp_path / "in", [sample_mail(sender="anna@example.com")])
        app = files_app(tmp_path, secure)
        try:
            await app.ingest([folder], mailbox="support")
            await app.sender.deliver_due()
            [row] = outbox(app)
        finally:
            app.close()
        [received] = secure.received
    finally:
        secure.stop()
    assert row.status == OutboxStatus.SENT
    assert received.tls and received.login == "support@helpdesk.example"
    assert received.rcpt_tos == ["anna@example.com"]


async def test_wrong_smtp_password_keeps_the_mail_for_later(tmp_path: Path) -> None:
    files = generate_tls_files(tmp_path / "pki")
    secure = SmtpSink(tls="starttls", tls_files=files, login=("support@helpdesk.example", "right")).start()
    try:
        folder = write_mails(tmp_path / "in", [sample_mail(sender="anna@example.com")])
        app = files_app(tmp_path, secure, smtp={**secure.config(), "password": "wrong"})
        try:
            await app.ingest([folder], mailbox="support")
            await app.sender.deliver_due()
            [row] = outbox(app)
        finally:
            app.close()
    finally:
        secure.stop()
    assert row.status == OutboxStatus.PENDING and "login refused" in (row.last_error or "")
    assert "right" not in (row.last_error or "") and "wrong" not in (row.last_error or "")
    assert secure.received == []


async def test_admin_templates_override_file_by_file_and_cc_on_request(tmp_path: Path, sink: SmtpSink) -> None:
    own = tmp_path / "my-templates" / "pl"
    own.mkdir(parents=True)
    (own / "ack.subject.txt").write_text("Zgłoszenie {{ ticket.number }}: {{ original.subject }}\n")
    raw = (
        "From: Anna <anna@example.com>\r\nTo: biuro@helpdesk.example\r\nCc: Jan <jan@example.com>, "
        f"{SUPPORT}\r\nSubject: Faktura\r\nMessage-ID: <cc1@example.com>\r\n\r\nProszę o fakturę.\r\n"
    ).encode()
    app = files_app(
        tmp_path,
        sink,
        box={"language": "pl", "acknowledge_cc": True},
        templates={"directory": str(tmp_path / "my-templates")},
    )
    try:
        await app.ingest([write_mails(tmp_path / "in", [raw])], mailbox="support")
        await app.sender.deliver_due()
    finally:
        app.close()
    [received] = sink.received
    ack = received.message
    assert ack["Subject"] == "Zgłoszenie MB-000001: Faktura"  # the admin's subject
    text = ack.get_body(("plain",))
    assert text is not None and "Dzień dobry Anna" in text.get_content()  # the shipped Polish body
    assert received.rcpt_tos == ["anna@example.com", "jan@example.com"]  # not our own address
    assert [a.addr_spec for a in ack["Cc"].addresses] == ["jan@example.com"]


async def test_a_template_that_reaches_for_internals_costs_the_acknowledgement_not_the_mail(
    tmp_path: Path, sink: SmtpSink
) -> None:
    own = tmp_path / "my-templates" / "en"
    own.mkdir(parents=True)
    (own / "ack.subject.txt").write_text("{{ ticket.number.__class__.__mro__ }}\n")
    app = files_app(tmp_path, sink, templates={"directory": str(tmp_path / "my-templates")})
    try:
        summary = await app.ingest([write_mails(tmp_path / "in", [sample_mail()])], mailbox="support")
        await app.sender.deliver_due()
        [article] = _articles(app)
        rows = outbox(app)
    finally:
        app.close()
    assert summary.stored == 1 and rows == [] and sink.received == []
    assert (article.no_answer_reason or "").startswith("the acknowledgement could not be composed")
