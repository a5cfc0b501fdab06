"""Killed at any instant (SIGKILL) and restarted, the daemon ends with every mail stored exactly once."""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.crash_env import start_daemon
from tests.imap_env import append_many, imap_box, new_user, sample_mail, write_config
from tests.support import database
from tests.support.dovecot import Dovecot

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Dovecot.available(), reason="dovecot is not installed")]

TOTAL = 500


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Dovecot]:
    dovecot = Dovecot.start(tmp_path / "dovecot")
    yield dovecot
    dovecot.stop()


def start_connected(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """A daemon that has logged in to the mailbox, so a kill lands in the middle of the work."""
    offset = log.stat().st_size if log.exists() else 0
    daemon = start_daemon(config, log)
    deadline = time.monotonic() + 30
    while "connected to" not in log.read_bytes()[offset:].decode(errors="replace"):
        assert daemon.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    return daemon


def tickets(db: Path) -> int:
    return database.count_or_zero(db, "tickets")


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    server: Dovecot, tmp_path: Path, report: Callable[[str], None]
) -> None:
    user = new_user(server)
    rng = random.Random(20261125)
    for n in range(TOTAL):
        body = "Proszę o pomoc. " * rng.randint(5, 400)
        server.append(sample_mail(body=body), flags=r"\Seen" if n % 7 == 0 else "", user=user.name)
    config = write_config(tmp_path, [imap_box(server, user, poll_interval=0.5)], fetch={"batch_size": 5})
    db = tmp_path / "data" / "mailbridge.db"
    log = tmp_path / "daemon.log"

    kills = 0
    progress: list[int] = []
    while kills < 15 and server.uids("INBOX", user=user.name):
        daemon = start_connected(config, log)
        if kills % 2:
            # Every other kill lands once this run has committed something: on a busy machine the first
            # commit can take longer than the random delay below, and no kill would be mid-import.
            before = tickets(db)
            deadline = time.monotonic() + 30
            while tickets(db) == before and daemon.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.5))
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        kills += 1
        progress.append(tickets(db))
    report(f"SIGKILLed {kills} times; tickets after each kill: {progress}")
    mid_import = [n for n in progress if 0 < n < TOTAL]
    assert len(set(mid_import)) >= 2, "the daemon was not killed often enough mid-import; the test proves little"

    # A last run, stopped cleanly: SIGTERM finishes the mail in hand and exits 0.
    daemon = start_connected(config, log)
    deadline = time.monotonic() + 120
    while (server.uids("INBOX", user=user.name) or tickets(db) < TOTAL) and time.monotonic() < deadline:
        time.sleep(0.2)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(15) == 0, log.read_text()[-3000:]

    assert database.scalar(db, "select count(*) from tickets") == TOTAL
    assert database.scalar(db, "select count(distinct dedup_key) from articles") == TOTAL
    assert database.scalar(db, "select count(*) from receipts") == TOTAL
    assert database.scalar(db, "select count(*) from receipts where not server_done") == 0
    assert database.scalar(db, "select count(*) from quarantine") == 0
    stored = {row[0] for row in database.rows(db, "select raw_sha256 from articles")}
    assert server.uids("INBOX", user=user.name) == []
    processed = server.fetch_all("Processed", user=user.name)
    assert len(processed) == TOTAL
    import hashlib

    assert {hashlib.sha256(raw).hexdigest() for raw in processed} == stored
    # No error of ours. (A daemon killed while its forkserver was starting a parser makes that process
    # print "EOFError: Ran out of input" from multiprocessing; that is the kill, not a bug.)
    text = log.read_text()
    assert not re.search(r'File "[^"]*/mailbridge/', text), text[-3000:]
    assert " ERROR mailbridge" not in text
    assert user.password not in text


def test_sigterm_during_a_backlog_finishes_the_mail_in_hand_and_exits_0(server: Dovecot, tmp_path: Path) -> None:
    user = new_user(server)
    total = 300
    for _ in range(total):
        server.append(sample_mail(body="Dzień dobry. " * 200), user=user.name)
    config = write_config(tmp_path, [imap_box(server, user, poll_interval=0.5)], fetch={"batch_size": 10})
    db = tmp_path / "data" / "mailbridge.db"
    log = tmp_path / "daemon.log"
    daemon = start_connected(config, log)
    while tickets(db) == 0:
        time.sleep(0.01)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(15) == 0, log.read_text()[-3000:]
    stored = tickets(db)
    assert 0 < stored < total, "the signal did not land during the backlog"
    # Everything committed was also moved on the server: nothing is left half done.
    assert database.scalar(db, "select count(*) from receipts where not server_done") == 0
    assert database.scalar(db, "select count(*) from mailbox_state where connected") == 0
    assert len(server.uids("Processed", user=user.name)) == stored
    assert len(server.uids("INBOX", user=user.name)) == total - stored
    rerun = subprocess.run(
        [sys.executable, "-m", "mailbridge", "run", "--once", "--config", str(config)],
        capture_output=True,
        env={**os.environ, "MAILBRIDGE_CONFIG": ""},
        timeout=120,
    )
    assert rerun.returncode == 0
    assert tickets(db) == total
    assert server.uids("INBOX", user=user.name) == []


def test_server_stopped_mid_fetch_and_started_again_loses_and_duplicates_nothing(
    server: Dovecot, tmp_path: Path, report: Callable[[str], None]
) -> None:
    user = new_user(server)
    total = 300
    rng = random.Random(20261201)
    append_many(server, user, [sample_mail(body="Proszę o pomoc. " * rng.randint(5, 400)) for _ in range(total)])
    on_server = {hashlib.sha256(raw).hexdigest() for raw in server.fetch_all(user=user.name)}
    config = write_config(tmp_path, [imap_box(server, user, poll_interval=0.5)], fetch={"batch_size": 5})
    db = tmp_path / "data" / "mailbridge.db"
    log = tmp_path / "daemon.log"
    daemon = start_connected(config, log)
    try:
        while tickets(db) < total // 6:  # well into the backlog
            assert daemon.poll() is None, log.read_text()[-3000:]
            time.sleep(0.005)
        server.stop()
        at_stop = tickets(db)
        assert at_stop < total, "the import finished before the server stopped; the test proves nothing"
        # The daemon keeps running while the server is away, and says so.
        offset = log.stat().st_size
        deadline = time.monotonic() + 20
        while "retrying in" not in log.read_bytes()[offset:].decode(errors="replace"):
            assert daemon.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        while_down = tickets(db)
        server.restart()
        deadline = time.monotonic() + 120
        while (server.uids("INBOX", user=user.name) or tickets(db) < total) and time.monotonic() < deadline:
            assert daemon.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0, log.read_text()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
    report(f"server stopped with {at_stop} of {total} stored ({while_down} once it was down); all {total} after it")

    assert database.scalar(db, "select count(*) from tickets") == total
    assert database.scalar(db, "select count(distinct dedup_key) from articles") == total
    assert database.scalar(db, "select count(*) from receipts") == total
    assert database.scalar(db, "select count(*) from receipts where not server_done") == 0
    assert database.scalar(db, "select count(*) from quarantine") == 0
    stored = {row[0] for row in database.rows(db, "select raw_sha256 from articles")}
    assert stored == on_server
    assert server.uids("INBOX", user=user.name) == []
    processed = server.fetch_all("Processed", user=user.name)
    assert len(processed) == total
    assert {hashlib.sha256(raw).hexdigest() for raw in processed} == on_server
    text = log.read_text()
    assert not re.search(r'File "[^"]*/mailbridge/', text), text[-3000:]
    assert " ERROR mailbridge" not in text
