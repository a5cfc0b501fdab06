"""`mailbridge run` as systemd runs it (Type=notify): READY=1 once it runs, WATCHDOG=1 at half the watchdog
interval from the event loop, RELOADING=1/READY=1 around a SIGHUP reload, STOPPING=1 on SIGTERM. The
notification socket is one the test listens on; with `systemd-run --user` where the machine has it."""

from __future__ import annotations

import email.utils
import itertools
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.imap_env import sample_mail
from tests.service_env import NotifySocket, start_daemon, stop_daemon, write_config

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
    with sqlite3.connect(db, timeout=30) as conn:
        return conn.execute("select mailbox, queue from tickets order by id").fetchall()


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


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


def test_sighup_reloads_a_valid_configuration_and_keeps_the_old_one_on_error(tmp_path: Path) -> None:
    first, second = maildir(tmp_path, "first"), maildir(tmp_path, "second")
    boxes: list[dict[str, Any]] = [{"name": "first", "type": "maildir", "path": str(first)}]
    config = write_config(tmp_path, boxes)
    original = yaml.safe_load(config.read_text())
    db = tmp_path / "data" / "mailbridge.db"
    notify = NotifySocket(tmp_path)
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, log, env={"NOTIFY_SOCKET": notify.address})
    try:
        notify.wait_for("READY=1", 60, daemon=daemon)
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

        # A mailbox added, a routing rule, a rate limit changed: applied without a restart. A new data
        # directory needs one: the old stays, with a warning.
        changed = {
            **original,
            "data_dir": str(tmp_path / "elsewhere"),
            "routing": {
                "rules": [{"name": "invoices", "when": {"text": {"any": ["faktur*"]}}, "then": {"queue": "billing"}}]
            },
            "mailboxes": [
                {**boxes[0], "rate_limit": {"per_hour": 1}},
                {"name": "second", "type": "maildir", "path": str(second)},
            ],
        }
        config.write_text(yaml.safe_dump(changed, allow_unicode=True))
        daemon.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1", 20, daemon=daemon)
        notify.wait_for("READY=1", 60, after=1, daemon=daemon)
        assert "data_dir changed; that takes a restart" in log.read_text()
        drop(second, sample_mail(subject="Faktura do zapłaty"))
        drop(first, sample_mail(subject="Fakturę proszę"))
        wait_for(lambda: len(tickets(db)) == 4, 30, "mail in the added mailbox stored")
        assert sorted(tickets(db)[2:]) == [("first", "billing"), ("second", "billing")]
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
