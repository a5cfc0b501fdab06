"""Tests for the private Dovecot test server in tests/support/dovecot.py."""

import contextlib
import imaplib
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dovecot import Dovecot, DovecotError, free_port, generate_tls_files

if not Dovecot.available():
    pytest.skip(Dovecot.unavailable_reason() or "dovecot not available", allow_module_level=True)


def _mail(subject: str) -> bytes:
    return (
        f"From: customer@example.org\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@example.org>\r\n\r\nHello, {subject}.\r\n"
    ).encode()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """One TLS instance shared by the read-only TLS tests (generating keys and starting costs CPU)."""
    dovecot = Dovecot.start(tmp_path_factory.mktemp("tls") / "dovecot", tls=True)
    try:
        yield dovecot
    finally:
        dovecot.stop()
    assert dovecot.pids() == []


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


# ------------------------------------------------------------------------------------------------ TLS


def _ca_context(dovecot: Dovecot) -> ssl.SSLContext:
    assert dovecot.ca_file is not None
    return ssl.create_default_context(cafile=str(dovecot.ca_file))


def test_without_tls_there_is_no_tls(server: Dovecot) -> None:
    assert (server.tls, server.tls_port, server.ca_file, server.cert_file) == (False, None, None, None)
    config = server.config_path.read_text()
    assert "ssl = no\n" in config
    assert "ssl_cert" not in config
    assert "STARTTLS" not in server.greeting_capabilities()
    assert not server.tls_dir.exists()
    with pytest.raises(DovecotError):
        server.ssl_context()


def test_tls_implicit_imaps_login(tls_server: Dovecot) -> None:
    assert tls_server.tls_port is not None
    assert tls_server.tls_port != tls_server.port
    assert tls_server.ca_file is not None and tls_server.ca_file.is_file()
    client = imaplib.IMAP4_SSL(tls_server.host, tls_server.tls_port, ssl_context=_ca_context(tls_server), timeout=5)
    try:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert "STARTTLS" not in client.capabilities  # already encrypted
        client.login(tls_server.user, tls_server.password)
        typ, _data = client.select("INBOX", readonly=True)
        assert typ == "OK"
    finally:
        client.logout()


def test_tls_certificate_names(tls_server: Dovecot) -> None:
    assert tls_server.tls_port is not None
    for name in ("127.0.0.1", "localhost"):  # subjectAltName IP:127.0.0.1, DNS:localhost
        with (
            socket.create_connection((tls_server.host, tls_server.tls_port), timeout=5) as raw,
            tls_server.ssl_context().wrap_socket(raw, server_hostname=name) as sock,
        ):
            assert sock.makefile("rb").readline().startswith(b"* OK")
    with (
        socket.create_connection((tls_server.host, tls_server.tls_port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match=r"[Hh]ostname mismatch"),
    ):
        tls_server.ssl_context().wrap_socket(raw, server_hostname="mail.example.org")


def test_tls_starttls_on_plain_port(tls_server: Dovecot) -> None:
    client = imaplib.IMAP4(tls_server.host, tls_server.port, timeout=5)
    try:
        assert "STARTTLS" in client.capabilities
        assert client.starttls(ssl_context=_ca_context(tls_server))[0] == "OK"
        assert isinstance(client.sock, ssl.SSLSocket)
        assert "STARTTLS" not in client.capabilities  # imaplib re-reads them after the handshake
        client.login(tls_server.user, tls_server.password)
        typ, _data = client.select("INBOX", readonly=True)
        assert typ == "OK"
    finally:
        client.logout()


def test_tls_plaintext_login_still_works(tls_server: Dovecot) -> None:
    assert "STARTTLS" in tls_server.greeting_capabilities()
    client = imaplib.IMAP4(tls_server.host, tls_server.port, timeout=5)
    client.login(tls_server.user, tls_server.password)  # disable_plaintext_auth = no
    client.logout()
    assert tls_server.append(_mail("over plain imap")) >= 1


def test_tls_default_context_does_not_trust_the_test_ca(tls_server: Dovecot) -> None:
    assert tls_server.tls_port is not None
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(tls_server.host, tls_server.tls_port, ssl_context=ssl.create_default_context(), timeout=5)
    client = imaplib.IMAP4(tls_server.host, tls_server.port, timeout=5)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(ssl_context=ssl.create_default_context())
    finally:
        with contextlib.suppress(OSError):  # the failed handshake already closed the socket
            client.shutdown()


def test_tls_restart_and_stop(tmp_path: Path) -> None:
    server = Dovecot.start(tmp_path / "dovecot", tls=True, idle=False)
    try:
        assert server.tls_port is not None and server.ca_file is not None and server.cert_file is not None
        ports, ca_pem, cert_pem = (
            (server.port, server.tls_port),
            server.ca_file.read_bytes(),
            server.cert_file.read_bytes(),
        )
        assert "IDLE" not in server.capabilities()
        assert "STARTTLS" in server.greeting_capabilities()
        client = imaplib.IMAP4_SSL(server.host, server.tls_port, ssl_context=server.ssl_context(), timeout=5)
        client.login(server.user, server.password)
        client.select("INBOX")

        server.restart()

        with pytest.raises((imaplib.IMAP4.abort, OSError)):  # the old connection is gone
            client.noop()
        assert (server.port, server.tls_port) == ports
        assert server.ca_file.read_bytes() == ca_pem  # generated once per instance
        assert server.cert_file.read_bytes() == cert_pem
        assert "IDLE" not in server.capabilities()
        client = imaplib.IMAP4_SSL(server.host, server.tls_port, ssl_context=server.ssl_context(), timeout=5)
        client.login(server.user, server.password)
        client.select("INBOX")
    finally:
        server.stop()
    assert _no_processes_left(server)
    server.stop()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection((server.host, server.tls_port), timeout=5)

    # If the IMAPS port was taken meanwhile, a restart picks another one (like port=None does).
    with socket.create_server((server.host, server.tls_port)):
        server.restart()
    try:
        assert server.tls_port != ports[1]
        client = imaplib.IMAP4_SSL(server.host, server.tls_port, ssl_context=server.ssl_context(), timeout=5)
        client.login(server.user, server.password)
        client.logout()
    finally:
        server.stop()
    assert _no_processes_left(server)


@pytest.mark.parametrize("backend", ["openssl", "cryptography"])
def test_generate_tls_files(tmp_path: Path, backend: str) -> None:
    if backend == "openssl" and shutil.which("openssl") is None and not Path("/usr/bin/openssl").exists():
        pytest.skip("no openssl command line tool")
    if backend == "cryptography":
        pytest.importorskip("cryptography")
    files = generate_tls_files(tmp_path / "tls", backend=backend)
    assert files.key_file.stat().st_mode & 0o077 == 0
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(files.cert_file, files.key_file)
    client_context = ssl.create_default_context(cafile=str(files.ca_file))
    client_context.verify_flags |= ssl.VERIFY_X509_STRICT  # what Python 3.13's default context adds

    def handshake(server_hostname: str) -> None:
        left, right = socket.socketpair()
        with left, right:
            left.settimeout(5)
            right.settimeout(5)
            errors: list[BaseException] = []

            def serve() -> None:
                try:
                    with server_context.wrap_socket(right, server_side=True) as sock:
                        sock.sendall(b"ok")
                except (OSError, ssl.SSLError) as exc:
                    errors.append(exc)

            thread = threading.Thread(target=serve)
            thread.start()
            try:
                with client_context.wrap_socket(left, server_hostname=server_hostname) as sock:
                    assert sock.recv(2) == b"ok"
            finally:
                thread.join(5)
            assert errors == []

    handshake("127.0.0.1")
    handshake("localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake("mail.example.org")
