"""Pure pieces of running as a service: the lmtp settings, which mailbox takes a recipient, sd_notify's
environment, JSON log lines."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from mailbridge.config import ConfigError, LmtpMailbox, load_settings
from mailbridge.ingest.lmtp import Recipients
from mailbridge.logs import MAILBOX, setup_logging
from mailbridge.service import Notifier, _watchdog_interval


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


LMTP_BOXES = (
    "mailboxes:\n"
    "  - {name: support, type: lmtp, address: support@example.com,"
    " recipients: [Support@Example.com, '@help.example']}\n"
    "  - {name: sales, type: lmtp, address: sales@example.com}\n"
)


def test_lmtp_mailboxes_and_where_mail_for_an_address_goes(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "lmtp: {listen: 'unix:/run/mailbridge/lmtp.sock'}\n" + LMTP_BOXES))
    assert settings.lmtp is not None
    assert settings.lmtp.address == Path("/run/mailbridge/lmtp.sock") and settings.lmtp.mode == 0o660
    support, sales = settings.mailboxes
    assert isinstance(support, LmtpMailbox) and isinstance(sales, LmtpMailbox)
    assert support.recipients == ["support@example.com", "@help.example"]
    assert sales.recipients == ["sales@example.com"]  # its address, by default
    where = Recipients([support, sales])
    assert where.mailbox_for("SUPPORT@example.com") == "support"
    assert where.mailbox_for("support+urgent@example.com") == "support"  # subaddress
    assert where.mailbox_for("anyone@help.example") == "support"  # the domain
    assert where.mailbox_for("sales@example.com") == "sales"
    assert where.mailbox_for("other@example.com") is None
    assert where.mailbox_for("no-at-sign") is None


@pytest.mark.parametrize(
    ("listen", "address"),
    [("127.0.0.1:2424", ("127.0.0.1", 2424)), ("[::1]:24", ("::1", 24)), ("localhost:2424", ("localhost", 2424))],
)
def test_lmtp_listens_on_a_loopback_port(tmp_path: Path, listen: str, address: tuple[str, int]) -> None:
    settings = load_settings(write(tmp_path, f"lmtp: {{listen: '{listen}'}}\n" + LMTP_BOXES))
    assert settings.lmtp is not None and settings.lmtp.address == address


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lmtp: {listen: '0.0.0.0:24'}\n" + LMTP_BOXES, "without authentication"),
        ("lmtp: {listen: 'lmtp.sock'}\n" + LMTP_BOXES, "lmtp.listen"),
        ("lmtp: {listen: 'unix:/x.sock', socket_mode: 432}\n" + LMTP_BOXES, "lmtp.socket_mode"),
        (LMTP_BOXES, "there is no lmtp section"),
        ("lmtp: {listen: '127.0.0.1:24'}\nmailboxes: []\n", "no mailbox is type lmtp"),
        ("lmtp: {listen: '127.0.0.1:24'}\nmailboxes:\n  - {name: x, type: lmtp}\n", "needs recipients"),
        (
            "lmtp: {listen: '127.0.0.1:24'}\nmailboxes:\n"
            "  - {name: a, type: lmtp, recipients: [x@example.com]}\n"
            "  - {name: b, type: lmtp, recipients: [X@example.com]}\n",
            "recipient x@example.com is in the lmtp mailboxes a and b",
        ),
        ("lmtp: {listen: '127.0.0.1:24'}\nmailboxes:\n  - {name: a, type: lmtp, recipients: [nobody]}\n", "recipients"),
    ],
)
def test_bad_lmtp_settings_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_settings(write(tmp_path, text))


def test_a_remote_lmtp_address_must_be_asked_for(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "lmtp: {listen: '192.0.2.10:24', allow_remote: true}\n" + LMTP_BOXES))
    assert settings.lmtp is not None and settings.lmtp.address == ("192.0.2.10", 24)


def test_watchdog_interval_follows_sd_watchdog_enabled() -> None:
    assert _watchdog_interval("4000000", None) == 4.0
    assert _watchdog_interval("4000000", str(os.getpid())) == 4.0
    assert _watchdog_interval("4000000", str(os.getpid() + 1)) is None  # meant for another process
    assert _watchdog_interval(None, None) is None
    assert _watchdog_interval("0", None) is None
    assert _watchdog_interval("soon", None) is None


@pytest.mark.parametrize("abstract", [True, False])
def test_notifier_sends_datagrams_to_a_path_or_an_abstract_socket(
    tmp_path: Path, abstract: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"mailbridge-unit-{uuid.uuid4().hex}"
        receiver.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify")
        receiver.bind(address)
    receiver.settimeout(5)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        monkeypatch.setenv("WATCHDOG_USEC", "2000000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        notifier = Notifier()
        assert notifier.enabled and notifier.watchdog_interval == 2.0
        notifier.ready("running: 1 mailbox(es)")
        notifier.stopping()
        assert receiver.recv(4096).decode().splitlines() == ["READY=1", "STATUS=running: 1 mailbox(es)"]
        assert receiver.recv(4096).decode().splitlines()[0] == "STOPPING=1"
    finally:
        receiver.close()


def test_notifier_without_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    notifier = Notifier()
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("x")  # no socket: nothing is sent, nothing fails


def test_json_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging("INFO", "json")
        token = MAILBOX.set("support")
        try:
            logging.getLogger("mailbridge.test").info("mail %s", "stored", extra={"ticket": "MB-000001"})
        finally:
            MAILBOX.reset(token)
        try:
            raise ValueError("zły znak")
        except ValueError:
            logging.getLogger("mailbridge.test").exception("failed")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    first, second = lines
    assert {k: first[k] for k in ("level", "logger", "message", "mailbox", "ticket")} == {
        "level": "INFO",
        "logger": "mailbridge.test",
        "message": "mail stored",
        "mailbox": "support",
        "ticket": "MB-000001",
    }
    assert first["time"].endswith("+00:00")
    assert second["level"] == "ERROR" and "zły znak" in second["exc_info"] and "mailbox" not in second


UNIT = Path(__file__).resolve().parents[1] / "contrib" / "systemd" / "mailbridge.service"


def test_the_systemd_unit_is_a_hardened_notify_service() -> None:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    expected = {
        "Type": "notify",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "User": "mailbridge",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/mailbridge",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "Environment": "MAILBRIDGE_DATA_DIR=/var/lib/mailbridge",  # the data dir is the one it may write
    }
    assert {key: settings.get(key, [None])[0] for key in expected} == expected
    assert int(settings["WatchdogSec"][0]) >= 10
    assert " run " in settings["ExecStart"][0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    # Pointed at this checkout's mailbridge script, the unit must verify without a single complaint.
    script = Path(sys.executable).with_name("mailbridge")
    unit = tmp_path / "mailbridge.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/mailbridge", str(script)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
