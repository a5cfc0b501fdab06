"""The daemon as systemd runs it: a separate process, told where to send sd_notify datagrams, and a real
LMTP client (the standard library's smtplib.LMTP) that hands it mail the way Postfix does."""

from __future__ import annotations

import os
import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path


class NotifySocket:
    """A unix datagram socket standing in for systemd's notification socket; records every datagram.
    `abstract`: an abstract-namespace name, given to the daemon as '@name' (what systemd usually hands out)."""

    def __init__(self, directory: Path, abstract: bool = False) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"mailbridge-test-{uuid.uuid4().hex}"
            self._sock.bind("\0" + name)
            self.address = "@" + name
        else:
            path = directory / "notify.sock"
            self._sock.bind(str(path))
            self.address = str(path)
        self._sock.settimeout(0.2)
        self._messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._messages.append((time.monotonic(), data.decode()))

    @property
    def messages(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self._messages)

    def fields(self) -> list[tuple[float, str]]:
        """Each KEY=VALUE line of each datagram, with the time it arrived."""
        return [(at, line) for at, text in self.messages for line in text.splitlines() if line]

    def wait_for(
        self, line: str, timeout: float, after: int = 0, daemon: subprocess.Popen[bytes] | None = None
    ) -> float:
        """When `line` (e.g. READY=1) arrived, as the (after+1)-th of its kind; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            seen = [at for at, got in self.fields() if got == line]
            if len(seen) > after:
                return seen[after]
            assert time.monotonic() < deadline, f"no {line} within {timeout} s; got {self.messages}"
            if daemon is not None:
                assert daemon.poll() is None, f"the daemon exited ({daemon.returncode}) before {line}"
            time.sleep(0.02)

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        self._thread.join(2)


def start_daemon(config: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mailbridge", "run", "--config", str(config), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MAILBRIDGE_CONFIG": "", **(env or {})},
        )


def stop_daemon(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is None:
        daemon.kill()
        daemon.wait(10)


@dataclass
class Delivery:
    """What the LMTP server answered: per RCPT, and after DATA one reply per accepted recipient."""

    rcpt: dict[str, tuple[int, str]] = field(default_factory=dict)
    data: list[tuple[int, str]] = field(default_factory=list)

    @property
    def codes(self) -> list[int]:
        return [code for code, _ in self.data]


def lmtp_client(listen: str, timeout: float = 60) -> smtplib.LMTP:
    if listen.startswith("unix:"):
        client = smtplib.LMTP(listen.removeprefix("unix:"), timeout=timeout)
    else:
        host, _, port = listen.rpartition(":")
        client = smtplib.LMTP(host, int(port), timeout=timeout)
    client.ehlo()  # LHLO
    return client


def deliver(
    listen: str, recipients: list[str], data: bytes, mail_from: str = "klient@example.com", timeout: float = 60
) -> Delivery:
    """One LMTP transaction, the way an MTA runs it: MAIL, RCPT for each, DATA, then one reply per
    accepted recipient (smtplib reads the first with data(); the others with getreply())."""
    client = lmtp_client(listen, timeout)
    try:
        return transaction(client, recipients, data, mail_from)
    finally:
        client.close()


def transaction(client: smtplib.LMTP, recipients: list[str], data: bytes, mail_from: str) -> Delivery:
    data = re.sub(rb"(?<!\r)\n", b"\r\n", data)  # on the wire, lines end in CRLF (an MTA converts them)
    result = Delivery()
    code, _ = client.mail(mail_from)
    assert code == 250
    for rcpt in recipients:
        code, text = client.rcpt(rcpt)
        result.rcpt[rcpt] = (code, text.decode())
    accepted = [r for r, (code, _) in result.rcpt.items() if code == 250]
    if not accepted:
        client.rset()
        return result
    code, text = client.data(data)
    result.data.append((code, text.decode()))
    for _ in accepted[1:]:
        code, text = client.getreply()
        result.data.append((code, text.decode()))
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
