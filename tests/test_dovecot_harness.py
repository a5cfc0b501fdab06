"""Tests for the private Dovecot test server in tests/support/dovecot.py."""

import imaplib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dovecot import Dovecot, DovecotError, free_port

if not Dovecot.available():
    pytest.skip(Dovecot.unavailable_reason() or "dovecot not available", allow_module_level=True)


def _mail(subject: str) -> bytes:
    return (
        f"From: customer@example.org\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@example.org>\r\n\r\nHello, {subject}.\r\n"
    ).encode()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Dovecot]:
    dovecot = Dovecot.start(tmp_path / "dovecot")
    try:
        yield dovecot
    finally:
        dovecot.stop()
    assert dovecot.pids() == []


def _no_processes_left(dovecot: Dovecot) -> bool:
    found = subprocess.run(["pgrep", "-f", str(dovecot.config_path)], capture_output=True, text=True)
    return found.stdout.strip() == "" and dovecot.pids() == []


def test_start_append_and_read_back(server: Dovecot) -> None:
    assert server.host == "127.0.0.1"
    assert (server.user, server.password) == ("support", "secret")
    assert len(server.pids()) > 1  # master and its children

    uids = [
        server.append(_mail("one")),
        server.append(_mail("two"), flags="\\Seen"),
        server.append(_mail("three"), flags="\\Seen \\Flagged"),
    ]
    assert uids == [1, 2, 3]
    assert server.uids() == uids
    assert server.flags() == {1: set(), 2: {"\\Seen"}, 3: {"\\Seen", "\\Flagged"}}
    assert server.fetch_all() == [_mail("one"), _mail("two"), _mail("three")]
    assert server.fetch(2) == _mail("two")
    assert server.flags()[1] == set()  # fetching peeks, \\Seen is not set
    assert server.mail_dir.is_dir()
    assert len(list((server.mail_dir / "new").iterdir()) + list((server.mail_dir / "cur").iterdir())) == 3

    caps = server.capabilities()
    assert {"IDLE", "UIDPLUS", "MOVE"} <= caps
    assert "IDLE" in server.greeting_capabilities()


def test_folders(server: Dovecot) -> None:
    server.create_folder("Tickets")
    server.create_folder("Tickets.Done")
    server.create_folder("Überweisungen & Co")
    assert server.folders() == ["INBOX", "Tickets", "Tickets.Done", "Überweisungen & Co"]
    assert server.append(_mail("archived"), "Überweisungen & Co") == 1
    assert server.uids("Überweisungen & Co") == [1]
    assert server.uids("Tickets") == []
    assert server.flags("Tickets") == {}
    assert server.fetch_all("Tickets") == []
    assert server.folder_path("Überweisungen & Co").is_dir()
    with pytest.raises(DovecotError):
        server.create_folder("Tickets")


def test_restart_keeps_mails_port_and_uidvalidity(server: Dovecot) -> None:
    server.append(_mail("one"))
    server.append(_mail("two"), flags="\\Seen")
    port, uidvalidity = server.port, server.uidvalidity()
    client = imaplib.IMAP4(server.host, server.port, timeout=5)
    client.login(server.user, server.password)
    client.select("INBOX")

    server.restart()

    with pytest.raises((imaplib.IMAP4.abort, OSError)):  # the old connection is gone
        client.noop()
    assert server.port == port
    assert server.uids() == [1, 2]
    assert server.flags() == {1: set(), 2: {"\\Seen"}}
    assert server.uidvalidity() == uidvalidity
    assert server.append(_mail("three")) == 3


def test_kill_connections(server: Dovecot) -> None:
    server.append(_mail("one"))
    for hard in (False, True):
        client = imaplib.IMAP4(server.host, server.port, timeout=5)
        client.login(server.user, server.password)
        client.select("INBOX")
        server.kill_connections(hard=hard)
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            client.noop()
        assert server.uids() == [1]  # the server itself keeps running


def test_idle_push_reaches_an_idling_client(server: Dovecot) -> None:
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        stream = sock.makefile("rwb")

        def command(tag: bytes, line: bytes) -> None:
            stream.write(tag + b" " + line + b"\r\n")
            stream.flush()
            while True:
                reply = stream.readline()
                assert reply, "connection closed"
                if reply.startswith(tag + b" "):
                    assert reply.startswith(tag + b" OK"), reply
                    return

        assert stream.readline().startswith(b"* OK")
        command(b"a", b"LOGIN support secret")
        command(b"b", b"SELECT INBOX")
        stream.write(b"c IDLE\r\n")
        stream.flush()
        assert stream.readline().startswith(b"+")
        server.append(_mail("pushed"))
        assert stream.readline() == b"* 1 EXISTS\r\n"


def test_idle_false_does_not_advertise_idle(tmp_path: Path) -> None:
    port = free_port()
    with Dovecot.start(tmp_path / "dovecot", port, idle=False) as server:
        assert server.port == port
        caps = server.capabilities()
        assert "IDLE" not in caps
        assert {"UIDPLUS", "MOVE", "IMAP4REV1"} <= caps
        assert "IDLE" not in server.greeting_capabilities()
        server.restart()  # the setting survives a restart
        assert "IDLE" not in server.capabilities()
    assert _no_processes_left(server)


def test_reset_uidvalidity_keeps_mails(server: Dovecot) -> None:
    server.append(_mail("one"))
    server.append(_mail("two"), flags="\\Seen")
    server.append(_mail("three"))
    old = server.uidvalidity()
    port = server.port

    new = server.reset_uidvalidity()

    assert new != old
    assert server.uidvalidity() == new
    assert server.port == port
    assert server.uids() == [1, 2, 3]
    assert sorted(server.fetch_all()) == sorted([_mail("one"), _mail("two"), _mail("three")])
    assert sorted(map(frozenset, server.flags().values()), key=len) == [set(), set(), {"\\Seen"}]


def test_reset_uidvalidity_of_other_folder(server: Dovecot) -> None:
    server.create_folder("Archive")
    server.append(_mail("archived"), "Archive")
    inbox, archive = server.uidvalidity(), server.uidvalidity("Archive")
    assert server.reset_uidvalidity("Archive") != archive
    assert server.uidvalidity() == inbox
    assert server.fetch_all("Archive") == [_mail("archived")]


def test_two_users_are_separate(server: Dovecot) -> None:
    billing = server.add_user("billing", "pw2")
    assert billing.mail_dir != server.mail_dir
    assert billing.mail_dir.is_dir()
    server.append(_mail("for support"))
    assert server.append(_mail("for billing 1"), user="billing") == 1
    assert server.append(_mail("for billing 2"), user="billing") == 2

    assert server.fetch_all() == [_mail("for support")]
    assert server.fetch_all(user="billing") == [_mail("for billing 1"), _mail("for billing 2")]

    client = imaplib.IMAP4(server.host, server.port, timeout=5)
    with pytest.raises(imaplib.IMAP4.error):
        client.login("billing", "secret")  # support's password does not work for billing
    client = imaplib.IMAP4(server.host, server.port, timeout=5)
    client.login("billing", "pw2")
    client.logout()

    server.restart()
    assert server.uids(user="billing") == [1, 2]


def test_stop_leaves_no_processes(tmp_path: Path) -> None:
    server = Dovecot.start(tmp_path / "dovecot")
    client = imaplib.IMAP4(server.host, server.port, timeout=5)
    client.login(server.user, server.password)
    client.select("INBOX")
    server.stop()
    assert _no_processes_left(server)
    assert not server.running
    server.stop()  # idempotent
    with pytest.raises(OSError):
        imaplib.IMAP4(server.host, server.port, timeout=5)
