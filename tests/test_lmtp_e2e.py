"""LMTP intake end to end: `mailbridge run` as a process, a real LMTP client (smtplib.LMTP) handing it mail as an
MTA does, a real SMTP sink for the acknowledgements. A delivery is answered 250 only once it is committed,
451 when it cannot be (so the MTA keeps it), and a retried delivery never makes a second ticket."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.imap_env import sample_mail, write_config
from tests.service_env import (
    NotifySocket,
    deliver,
    free_port,
    lmtp_client,
    start_daemon,
    stop_daemon,
    transaction,
)
from tests.support import database
from tests.support.smtp_sink import SmtpSink

pytestmark = pytest.mark.slow

SUPPORT = "support@helpdesk.example"
SALES = "sales@helpdesk.example"


def lmtp_boxes() -> list[dict[str, Any]]:
    return [
        {"name": "support", "type": "lmtp", "address": SUPPORT, "recipients": [SUPPORT, "@help.example"]},
        {"name": "sales", "type": "lmtp", "address": SALES},
    ]


class Daemon:
    def __init__(self, tmp_path: Path, listen: str, sink: SmtpSink | None, **top: Any) -> None:
        self.listen = listen
        self.db = tmp_path / "data" / "mailbridge.db"
        self.log = tmp_path / "daemon.log"
        lmtp = {"listen": listen, **top.pop("lmtp", {})}
        if sink is not None:
            top["smtp"] = sink.config()
        self.config = write_config(tmp_path, lmtp_boxes(), lmtp=lmtp, **top)
        self.notify = NotifySocket(tmp_path)
        self.process = start_daemon(self.config, self.log, env={"NOTIFY_SOCKET": self.notify.address})
        self.notify.wait_for("READY=1", 60, daemon=self.process)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        return database.rows(self.db, sql)

    def count(self, table: str) -> int:
        return int(self.query(f"select count(*) from {table}")[0][0])

    def stop(self) -> int:
        import signal

        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(15)
        self.notify.close()
        return code

    def close(self) -> None:
        stop_daemon(self.process)
        self.notify.close()


@pytest.fixture
def unix_daemon(tmp_path: Path, sink: SmtpSink) -> Iterator[Daemon]:
    daemon = Daemon(
        tmp_path, f"unix:{tmp_path / 'run' / 'lmtp.sock'}", sink, parsing={"max_message_bytes": 200_000, "workers": 2}
    )
    yield daemon
    daemon.close()


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def test_lmtp_deliveries_become_tickets_acknowledged_per_recipient(unix_daemon: Daemon, sink: SmtpSink) -> None:
    daemon = unix_daemon
    # Four MTA connections at once, five mails each: all stored, each answered 250 after its commit.
    # (Twenty senders: acknowledgements to one address are rate-limited.)
    senders = [f"klient{n}@example.com" for n in range(20)]
    mails = [(sender, sample_mail(sender=sender)) for sender in senders]

    def one_connection(chunk: list[tuple[str, bytes]]) -> list[list[int]]:
        client = lmtp_client(daemon.listen)
        try:
            return [transaction(client, [SUPPORT], raw, sender).codes for sender, raw in chunk]
        finally:
            client.quit()

    with ThreadPoolExecutor(4) as pool:
        answers = [codes for chunk in pool.map(one_connection, [mails[i::4] for i in range(4)]) for codes in chunk]
    assert answers == [[250]] * 20
    # 250 means committed: the tickets are there the moment the MTA hears it.
    assert daemon.count("tickets") == 20
    assert daemon.query("select count(*) from receipts where not server_done") == [(0,)]
    wait_for(lambda: len(sink.received) == 20, 30, "20 acknowledgements at the SMTP sink")
    assert sorted(r.rcpt_tos[0] for r in sink.received) == sorted(senders)
    assert all(r.message["From"].addresses[0].addr_spec == SUPPORT for r in sink.received)

    # One delivery for three recipients: the unknown one is refused at RCPT; after DATA there is one reply
    # per accepted recipient, in order, each naming its recipient.
    raw = sample_mail(subject="Do działu sprzedaży i wsparcia")
    answer = deliver(daemon.listen, ["Kto@help.example", "nikt@nowhere.example", "sales+pilne@helpdesk.example"], raw)
    assert answer.rcpt["nikt@nowhere.example"][0] == 550
    assert [code for code, _ in answer.rcpt.values()] == [250, 550, 250]
    assert answer.codes == [250, 250]
    assert "<Kto@help.example> stored" in answer.data[0][1]
    assert "<sales+pilne@helpdesk.example>" in answer.data[1][1]
    assert daemon.count("tickets") == 21  # the same mail in two mailboxes is one ticket
    assert daemon.query("select mailbox, outcome from receipts order by id desc limit 2") == [
        ("sales", "duplicate"),
        ("support", "stored"),
    ]

    # The MTA did not hear our answer and delivers the same mail again: 250, no second ticket, no second
    # acknowledgement.
    again = deliver(daemon.listen, ["kto@help.example"], raw)
    assert again.codes == [250] and "already stored" in again.data[0][1]
    assert daemon.count("tickets") == 21
    wait_for(lambda: len(sink.received) == 21, 30, "the acknowledgement of the two-mailbox mail")

    # A mail the parser cannot read (MIME nested thousands deep): kept in quarantine with its raw bytes,
    # and accepted (it is stored).
    nested = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(3000))
    malformed = b"From: a@example.com\r\nSubject: deep\r\n" + nested + b"Content-Type: text/plain\r\n\r\nx\r\n"
    broken = deliver(daemon.listen, [SUPPORT], malformed)
    assert broken.codes == [250] and "quarantine" in broken.data[0][1]
    [(kept, reason)] = daemon.query("select raw, reason from quarantine")
    assert kept == b"Return-Path: <klient@example.com>\r\n" + malformed
    assert "nest" in reason
    assert daemon.count("tickets") == 21

    # A bounce (MAIL FROM:<>) is recorded, and the envelope's empty sender is what tells us so: it gets no
    # acknowledgement (answering bounces is how mail loops start).
    bounce = deliver(daemon.listen, [SUPPORT], sample_mail(sender="mailer-daemon@example.net"), mail_from="")
    assert bounce.codes == [250]
    assert daemon.count("tickets") == 22
    assert daemon.query("select kind from articles order by id desc limit 1") == [("bounce",)]

    # Too big (parsing.max_message_bytes) for two recipients, sent without SIZE: one 552 per recipient, and
    # the session stays usable (a client waiting for a second reply would otherwise hang).
    client = lmtp_client(daemon.listen)
    try:
        too_big = transaction(
            client, [SUPPORT, SALES], sample_mail(body=("x" * 70 + "\n") * 4500), "klient@example.com"
        )
        assert too_big.codes == [552, 552]
        assert client.noop()[0] == 250
        # The same for a line longer than SMTP allows (RFC 5321: 1000 octets).
        long_line = b"From: a@example.com\r\nSubject: long\r\n\r\n" + b"y" * 2000 + b"\r\n"
        assert transaction(client, [SUPPORT, SALES], long_line, "klient@example.com").codes == [500, 500]
        assert client.noop()[0] == 250
    finally:
        client.close()

    time.sleep(1)
    assert len(sink.received) == 21  # none for the retry, the quarantined mail or the bounce
    assert daemon.stop() == 0
    assert not (Path(daemon.listen.removeprefix("unix:"))).exists(), "the socket file is removed at exit"
    text = daemon.log.read_text()
    assert " ERROR " not in text, text[-3000:]


@pytest.mark.sqlite_only("the failing writes come from an SQLite trigger (test_cli covers the PostgreSQL variant)")
def test_lmtp_answers_451_while_the_database_fails_and_the_retry_stores_once(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, f"127.0.0.1:{free_port()}", None)
    try:
        # The database refuses every write (as a full disk or a broken server would): nothing can be stored,
        # so nothing is accepted; the MTA keeps the mail.
        with sqlite3.connect(daemon.db, timeout=30) as conn:
            conn.execute(
                "create trigger refuse_receipts before insert on receipts"
                " begin select raise(abort, 'disk I/O error'); end"
            )
        raw = sample_mail()
        failed = deliver(daemon.listen, [SUPPORT, SALES], raw)
        assert failed.codes == [451, 451], failed
        assert all("4.3.0" in text for _, text in failed.data)
        assert daemon.count("tickets") == 0
        assert daemon.count("receipts") == 0

        with sqlite3.connect(daemon.db, timeout=30) as conn:
            conn.execute("drop trigger refuse_receipts")
        retried = deliver(daemon.listen, [SUPPORT, SALES], raw)
        assert retried.codes == [250, 250], retried
        assert daemon.count("tickets") == 1
        assert daemon.stop() == 0
    finally:
        daemon.close()


@pytest.mark.sqlite_only("another writer holds SQLite's one write lock (BEGIN IMMEDIATE)")
def test_lmtp_answers_451_when_the_database_is_locked_too_long(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, f"127.0.0.1:{free_port()}", None, lmtp={"answer_within_seconds": 2})
    try:
        raw = sample_mail()
        lock = sqlite3.connect(daemon.db, timeout=30, isolation_level=None)
        lock.execute("begin immediate")  # another writer holds the database
        try:
            started = time.monotonic()
            late = deliver(daemon.listen, [SUPPORT], raw)
            took = time.monotonic() - started
            assert late.codes == [451], late
            assert 1.5 < took < 10
            assert daemon.count("tickets") == 0
        finally:
            lock.execute("rollback")
            lock.close()
        # The batch we gave up waiting for commits once the lock is free; the MTA's retry finds it stored.
        wait_for(lambda: daemon.count("tickets") == 1, 40, "the waiting batch committed")
        retried = deliver(daemon.listen, [SUPPORT], raw)
        assert retried.codes == [250] and "already stored" in retried.data[0][1]
        assert daemon.count("tickets") == 1
        assert daemon.stop() == 0
    finally:
        daemon.close()
