"""`mailbridge run` as systemd runs it (Type=notify): READY=1 once it runs, WATCHDOG=1 at half the watchdog
interval from the event loop, RELOADING=1/READY=1 around a SIGHUP reload, STOPPING=1 on SIGTERM. The
notification socket is one the test listens on; with `systemd-run --user` where the machine has it."""

from __future__ import annotations

import email
import email.utils
import itertools
import json
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.exc import OperationalError, ProgrammingError

from tests.imap_env import append_many, imap_box, new_user, sample_mail, write_config
from tests.service_env import NotifySocket, lmtp_client, start_daemon, stop_daemon, transaction
from tests.support import database
from tests.support.dovecot import Dovecot
from tests.support.smtp_sink import SmtpSink

pytestmark = pytest.mark.slow


def maildir(root: Path, name: str) -> Path:
    path = root / "maildirs" / name
    for sub in ("new", "cur", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def drop(box: Path, raw: bytes) -> None:
    name = f"{time.time_ns()}.test"
    (box / "tmp" / name).write_bytes(raw)
    (box / "tmp" / name).rename(box / "new" / name)


def tickets(db: Path) -> list[tuple[str, str | None]]:
    try:
        return database.rows(db, "select mailbox, queue from tickets order by id")
    except (OperationalError, ProgrammingError):  # schema not created yet
        return []


def count(db: Path, sql: str, **params: Any) -> int:
    if not database.is_postgresql() and not db.exists():
        return 0
    try:
        return int(database.scalar(db, sql, **params))
    except (OperationalError, ProgrammingError):  # schema not created yet
        return 0


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def wait_for_first_look(db: Path, mailbox: str) -> None:
    """Mail a mailbox holds before its first look is a backlog and gets no acknowledgement."""
    sql = "select count(*) from mailbox_state where initial_done and mailbox = :mailbox"
    wait_for(lambda: count(db, sql, mailbox=mailbox) == 1, 30, f"mailbox {mailbox} watched")


def test_ready_watchdog_and_stopping_are_told_to_systemd(tmp_path: Path) -> None:
    box = maildir(tmp_path, "support")
    config = write_config(tmp_path, [{"name": "support", "type": "maildir", "path": str(box)}])
    notify = NotifySocket(tmp_path, abstract=True)  # systemd hands out '@…' names
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, log, env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "2000000"})
    try:
        ready = notify.wait_for("READY=1", 60, daemon=daemon)
        # Every second (half of the 2 s systemd gave), from the event loop, while the daemon works.
        drop(box, sample_mail())
        notify.wait_for("WATCHDOG=1", 15, after=4, daemon=daemon)
        pings = [at for at, line in notify.fields() if line == "WATCHDOG=1" and at >= ready]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert min(gaps) > 0.8, gaps  # half the interval, not a flood
        assert max(gaps) < 2.0, gaps  # never as late as the interval systemd would kill at
        assert any(line.startswith("STATUS=running: 1 mailbox") for _, line in notify.fields())
        wait_for(lambda: len(tickets(tmp_path / "data" / "mailbridge.db")) == 1, 30, "the mail stored")

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0, log.read_text()[-3000:]
        lines = [line for _, line in notify.fields()]
        assert "STOPPING=1" in lines
        assert lines.index("READY=1") < lines.index("STOPPING=1")
    finally:
        stop_daemon(daemon)
        notify.close()


def test_sighup_reloads_a_valid_configuration_and_keeps_the_old_one_on_error(tmp_path: Path, sink: SmtpSink) -> None:
    first, second = maildir(tmp_path, "first"), maildir(tmp_path, "second")
    boxes: list[dict[str, Any]] = [
        {"name": "first", "type": "maildir", "path": str(first), "address": "first@helpdesk.example"}
    ]
    config = write_config(tmp_path, boxes, smtp=sink.config())
    original = yaml.safe_load(config.read_text())
    db = tmp_path / "data" / "mailbridge.db"
    notify = NotifySocket(tmp_path)
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, log, env={"NOTIFY_SOCKET": notify.address})
    try:
        notify.wait_for("READY=1", 60, daemon=daemon)
        wait_for_first_look(db, "first")
        drop(first, sample_mail())
        wait_for(lambda: len(tickets(db)) == 1, 30, "the first mail stored")

        # A broken file: the error is logged, the running configuration stays and goes on working.
        config.write_text(yaml.safe_dump({**original, "mailboxes": [{**boxes[0], "colour": "blue"}]}))
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration not reloaded" in log.read_text(), 20, "the refused reload logged")
        assert "colour: unknown key" in log.read_text()
        drop(first, sample_mail())
        wait_for(lambda: len(tickets(db)) == 2, 30, "mail stored after the refused reload")

        # Valid, but it names a customer directory that cannot be read: refused as well, before anything stops.
        config.write_text(
            yaml.safe_dump({**original, "routing": {"customers": {"directory": str(tmp_path / "missing.yaml")}}})
        )
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: log.read_text().count("configuration not reloaded") == 2, 20, "the second refusal")
        assert not any(line == "RELOADING=1" for _, line in notify.fields())

        # A mailbox added, a routing rule, a template, a rate limit changed: applied without a restart. A new
        # data directory needs one: the old stays, with a warning.
        templates = tmp_path / "templates" / "en"
        templates.mkdir(parents=True)
        (templates / "ack.subject.txt").write_text("Przyjęliśmy: {{ ticket.reference }}")
        changed = {
            **original,
            "data_dir": str(tmp_path / "elsewhere"),
            "templates": {"directory": str(templates.parent)},
            "routing": {
                "rules": [{"name": "invoices", "when": {"text": {"any": ["faktur*"]}}, "then": {"queue": "billing"}}]
            },
            "mailboxes": [
                {**boxes[0], "rate_limit": {"per_hour": 1}},
                {"name": "second", "type": "maildir", "path": str(second), "address": "second@helpdesk.example"},
            ],
        }
        config.write_text(yaml.safe_dump(changed, allow_unicode=True))
        daemon.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1", 20, daemon=daemon)
        notify.wait_for("READY=1", 60, after=1, daemon=daemon)
        assert "data_dir changed; that takes a restart" in log.read_text()
        wait_for_first_look(db, "second")
        drop(second, sample_mail(subject="Faktura do zapłaty", sender="nowy@example.com"))
        drop(first, sample_mail(subject="Fakturę proszę", sender="inny@example.com"))
        wait_for(lambda: len(tickets(db)) == 4, 30, "mail in the added mailbox stored")
        assert sorted(tickets(db)[2:]) == [("first", "billing"), ("second", "billing")]
        wait_for(lambda: len(sink.received) == 4, 30, "four acknowledgements")
        subjects = [str(r.message["Subject"]) for r in sink.received]
        assert not subjects[0].startswith("Przyjęliśmy") and not subjects[1].startswith("Przyjęliśmy")
        assert all(subject.startswith("Przyjęliśmy: [MB-") for subject in subjects[2:]), subjects
        assert {r.message["From"].addresses[0].addr_spec for r in sink.received[2:]} == {
            "first@helpdesk.example",
            "second@helpdesk.example",
        }
        # The rate limit is now 1 an hour for this mailbox: the third mail from the first sender (2 answered
        # before, under the old limit of 3) gets none.
        drop(first, sample_mail())
        wait_for(lambda: len(tickets(db)) == 5, 30, "the fifth mail stored")
        [(reason,)] = database.rows(db, "select no_answer_reason from articles order by id desc limit 1")
        assert "rate limit" in reason
        assert len(sink.received) == 4
        assert not (tmp_path / "elsewhere").exists()

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0, log.read_text()[-3000:]
        assert " ERROR " not in log.read_text().replace("ERROR mailbridge.service: configuration not reloaded", "")
    finally:
        stop_daemon(daemon)
        notify.close()


def test_the_packaged_unit_under_systemd_run(tmp_path: Path) -> None:
    """The real thing where the machine allows it: a transient user service of Type=notify."""
    if shutil.which("systemd-run") is None:
        pytest.skip("systemd-run is not installed")
    probe = subprocess.run(["systemctl", "--user", "is-system-running"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0 and probe.stdout.strip() not in ("running", "degraded"):
        pytest.skip(f"no systemd user manager here ({(probe.stdout or probe.stderr).strip()})")
    box = maildir(tmp_path, "support")
    config = write_config(tmp_path, [{"name": "support", "type": "maildir", "path": str(box)}])
    unit = f"mailbridge-test-{email.utils.make_msgid().strip('<>').split('@')[0].replace('.', '-')}"
    started = subprocess.run(
        [
            "systemd-run",
            "--user",
            f"--unit={unit}",
            "--property=Type=notify",
            "--property=WatchdogSec=10",
            "--wait",
            "--no-block",
            sys.executable,
            "-m",
            "mailbridge",
            "run",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 0, started.stderr
    try:
        wait_for(
            lambda: (
                subprocess.run(
                    ["systemctl", "--user", "is-active", unit], capture_output=True, text=True
                ).stdout.strip()
                == "active"
            ),
            60,
            "the unit active (READY=1 received)",
        )
        drop(box, sample_mail())
        wait_for(lambda: len(tickets(tmp_path / "data" / "mailbridge.db")) == 1, 30, "the mail stored")
    finally:
        subprocess.run(["systemctl", "--user", "stop", unit], capture_output=True, timeout=30)


@pytest.mark.skipif(not Dovecot.available(), reason="dovecot is not installed")
def test_sigterm_with_a_backlog_and_lmtp_deliveries_in_flight_exits_within_10_s(
    tmp_path: Path, report: Callable[[str], None]
) -> None:
    """IMAP backlog being imported, four MTA connections delivering: SIGTERM finishes the batches in hand,
    answers what it committed, and exits 0 well within systemd's stop timeout. Nothing answered 250 is
    missing; nothing is lost (a rerun imports the rest). The log, at DEBUG in JSON, is one object per
    line and never shows a password or the threading secret."""
    server = Dovecot.start(tmp_path / "dovecot")
    try:
        user = new_user(server)
        total = 300
        append_many(server, user, [sample_mail(body="Dzień dobry. " * 200) for _ in range(total)])
        secret = "threading-secret-that-must-not-leak"
        listen = f"unix:{tmp_path / 'lmtp.sock'}"
        config = write_config(
            tmp_path,
            [
                imap_box(server, user, poll_interval=0.5),
                {"name": "lmtp", "type": "lmtp", "recipients": ["support@helpdesk.example"], "acknowledge": False},
            ],
            fetch={"batch_size": 10},
            lmtp={"listen": listen},
            shutdown_grace_seconds=10,
            logging={"level": "DEBUG"},
            threading={"secret": secret},
        )
        db = tmp_path / "data" / "mailbridge.db"
        notify = NotifySocket(tmp_path)
        log = tmp_path / "daemon.log"
        daemon = start_daemon(config, log, "--log-format", "json", env={"NOTIFY_SOCKET": notify.address})
        answered: list[tuple[str, list[int]]] = []
        flooding = threading.Event()
        flooding.set()

        def mta() -> None:
            while flooding.is_set():
                try:
                    client = lmtp_client(listen, timeout=30)
                except OSError:
                    time.sleep(0.05)  # not listening (any more): an MTA defers and tries later
                    continue
                try:
                    while flooding.is_set():
                        raw = sample_mail(body="Przez LMTP. " * 100)
                        message_id = str(email.message_from_bytes(raw)["Message-ID"]).strip("<>")
                        codes = transaction(client, ["support@helpdesk.example"], raw, "klient@example.com").codes
                        answered.append((message_id, codes))
                except (OSError, smtplib.SMTPException):
                    pass  # the connection was closed at shutdown: the MTA keeps the mail
                finally:
                    client.close()

        try:
            notify.wait_for("READY=1", 60, daemon=daemon)
            clients = [threading.Thread(target=mta, daemon=True) for _ in range(4)]
            for client in clients:
                client.start()
            wait_for(lambda: count(db, "select count(*) from tickets") >= 30 and len(answered) >= 10, 60, "work")
            daemon.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = daemon.wait(30)
            took = time.monotonic() - signalled
            flooding.clear()
            for client in clients:
                client.join(30)
        finally:
            flooding.clear()
            stop_daemon(daemon)
            notify.close()
        report(f"SIGTERM to exit: {took:.2f} s ({len(answered)} LMTP deliveries answered)")
        assert code == 0, log.read_text()[-3000:]
        assert took < 10, f"SIGTERM to exit took {took:.1f} s"
        assert "STOPPING=1" in [line for _, line in notify.fields()]

        imported = count(db, "select count(*) from receipts where mailbox = :mailbox", mailbox=user.name)
        assert 0 < imported < total, "the signal did not land during the backlog"
        assert count(db, "select count(*) from receipts where not server_done") == 0
        assert len(server.uids("Processed", user=user.name)) == imported
        stored = {
            row[0].strip("<>") for row in database.rows(db, "select message_id from receipts where mailbox = 'lmtp'")
        }
        accepted = [message_id for message_id, codes in answered if codes == [250]]
        assert accepted and set(accepted) <= stored  # every 250 was committed
        assert all(codes in ([250], [451]) for _, codes in answered), answered

        rerun = subprocess.run(
            [sys.executable, "-m", "mailbridge", "run", "--once", "--config", str(config)],
            capture_output=True,
            env={**os.environ, "MAILBRIDGE_CONFIG": ""},
            timeout=120,
        )
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert count(db, "select count(*) from receipts where mailbox = :mailbox", mailbox=user.name) == total

        text = log.read_text()
        not_json = [line for line in text.splitlines() if line.strip() and not line.startswith("{")]
        assert not not_json, "\n".join(not_json[:40])
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
        assert any(record.get("mailbox") == user.name for record in records)  # the watcher's lines name it
        assert any(record.get("mailbox") == "lmtp" and record["message"] == "mail stored" for record in records)
        assert user.password not in text and secret not in text
        assert not [record for record in records if record["level"] == "ERROR"], text[-3000:]
    finally:
        server.stop()
