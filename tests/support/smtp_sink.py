"""A real SMTP server for the tests: aiosmtpd on 127.0.0.1 in its own thread, recording every mail it
accepts. It can be stopped and started again on the same port (an outage), refuse recipients with a given
reply (550 for good, 451 for now), and take its time over each mail (to kill a sender mid-flight)."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, AuthResult, LoginPassword

from tests.support.dovecot import TlsFiles


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool = False
    login: str | None = None
    session: int = 0  # which SMTP session (connection) it came in on: 1, 2, ... in the order they began

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"]).strip().strip("<>")


@dataclass
class _Handler:
    received: list[Received] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)  # recipient -> SMTP reply
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    sessions: int = 0  # sessions that delivered a mail
    quits: int = 0  # sessions the client ended with QUIT
    drop_at_mail: int = 0  # the next this many MAIL commands: the connection is closed instead of an answer

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        with self.lock:
            drop, self.drop_at_mail = self.drop_at_mail > 0, max(self.drop_at_mail - 1, 0)
        if drop:  # as a server does that timed the idle session out or restarted, unseen by the client yet
            server.transport.close()
            return "421 4.4.2 closing"  # never reaches the client: the transport is closed
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.quits += 1
        return "221 Bye"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if address.lower() in self.refuse:
            return self.refuse[address.lower()]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            time.sleep(self.delay)  # the sink's own loop: blocks only the sink
        data = envelope.original_content or envelope.content
        # auth_data, not the deprecated login_data (which logs a warning on every read: per mail).
        user = getattr(session.auth_data, "login", None) if session.authenticated else None
        login = user.decode() if isinstance(user, bytes) else None
        tls = server.transport.get_extra_info("ssl_object") is not None
        with self.lock:
            if getattr(session, "number", None) is None:
                self.sessions += 1
                session.number = self.sessions
            received = Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(data), tls, login, session.number)
            self.received.append(received)
        return "250 Message accepted for delivery"


@dataclass
class _OAuthHandler(_Handler):
    """AUTH XOAUTH2 (as Gmail and Exchange Online speak it) and OAUTHBEARER (RFC 7628), the token checked at
    an RFC 7662 introspection endpoint."""

    introspection_url: str = ""
    tokens_refused: int = 0
    mechanisms: list[str] = field(default_factory=list)  # of the successful logins

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> AuthResult:
        return await self._bearer(server, args, "XOAUTH2")

    async def auth_OAUTHBEARER(self, server: Any, args: list[str]) -> AuthResult:
        return await self._bearer(server, args, "OAUTHBEARER")

    async def _bearer(self, server: Any, args: list[str], mechanism: str) -> AuthResult:
        if len(args) < 2:
            return AuthResult(success=False, handled=False, message="501 5.5.2 initial response required")
        try:
            parts = base64.b64decode(args[1], validate=True).decode().split("\x01")
        except (ValueError, UnicodeDecodeError):
            return AuthResult(success=False, handled=False, message="501 5.5.2 cannot decode the response")
        fields = dict(part.split("=", 1) for part in parts[1:] if "=" in part)
        if mechanism == "XOAUTH2":
            user = parts[0].removeprefix("user=")
        else:  # GS2 header "n,a=USER," (RFC 5801 escapes)
            authzid = next((item[2:] for item in parts[0].split(",") if item.startswith("a=")), "")
            user = authzid.replace("=2C", ",").replace("=3D", "=")
        token = fields.get("auth", "").removeprefix("Bearer ")
        answer = await asyncio.to_thread(_introspect, self.introspection_url, token)
        if answer.get("active") is True and answer.get("username") == user:
            with self.lock:
                self.mechanisms.append(mechanism)
            return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))
        with self.lock:
            self.tokens_refused += 1
        # Like Gmail: the error as a base64 JSON challenge, which the client must acknowledge first.
        answer_to_challenge = await server.challenge_auth(
            json.dumps({"status": "invalid_token", "schemes": "bearer", "scope": "mail"})
        )
        if answer_to_challenge is MISSING:  # aiosmtpd has answered the client already
            return AuthResult(success=False, handled=True)
        expected = b"" if mechanism == "XOAUTH2" else b"\x01"
        if answer_to_challenge != expected:
            return AuthResult(success=False, handled=False, message="501 5.5.2 bad answer to the error challenge")
        return AuthResult(success=False, handled=False)


def _introspect(url: str, token: str) -> dict[str, Any]:
    request = urllib.request.Request(url, urllib.parse.urlencode({"token": token}).encode())
    with urllib.request.urlopen(request, timeout=5) as response:
        body = json.load(response)
    return body if isinstance(body, dict) else {}


class SmtpSink:
    """`tls`: None (plain), "implicit" (TLS from the first byte, like port 465) or "starttls" (required
    before MAIL). `login`: (user, password) that AUTH must give; then mail without AUTH is refused.
    `xoauth2_introspection_url`: AUTH XOAUTH2 only, its token checked at that endpoint; mail needs AUTH."""

    def __init__(
        self,
        port: int | None = None,
        *,
        tls: str | None = None,
        tls_files: TlsFiles | None = None,
        login: tuple[str, str] | None = None,
        xoauth2_introspection_url: str | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or _free_port()
        self.handler = (
            _OAuthHandler(introspection_url=xoauth2_introspection_url) if xoauth2_introspection_url else _Handler()
        )
        self.tls = tls
        self.tls_files = tls_files
        self.login = login
        self._controller: Controller | None = None

    def start(self) -> SmtpSink:
        options: dict[str, Any] = {}
        if self.tls is not None:
            assert self.tls_files is not None, "tls needs tls_files"
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(self.tls_files.cert_file), str(self.tls_files.key_file))
            if self.tls == "implicit":
                options["ssl_context"] = context
            else:
                options.update(tls_context=context, require_starttls=True)
        if self.login is not None:
            # aiosmtpd counts only STARTTLS as TLS for auth_require_tls; implicit TLS is TLS from the start.
            options.update(
                authenticator=self._authenticate, auth_required=True, auth_require_tls=self.tls == "starttls"
            )
        if isinstance(self.handler, _OAuthHandler):
            options.update(auth_required=True, auth_require_tls=False, auth_exclude_mechanism=["PLAIN", "LOGIN"])
        self._controller = Controller(self.handler, hostname=self.host, port=self.port, **options)
        self._controller.start()
        return self

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        assert self.login is not None
        given = (
            (auth_data.login.decode(), auth_data.password.decode()) if isinstance(auth_data, LoginPassword) else None
        )
        # handled=False: aiosmtpd then answers 535 itself (True would leave the client waiting).
        return AuthResult(success=given == self.login, handled=False, auth_data=auth_data)

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    @property
    def received(self) -> list[Received]:
        with self.handler.lock:
            return list(self.handler.received)

    @property
    def count(self) -> int:
        """How many mails it has received (without copying them, for a loop that polls it)."""
        with self.handler.lock:
            return len(self.handler.received)

    @property
    def tokens_refused(self) -> int:
        """AUTH XOAUTH2 attempts whose token the introspection endpoint did not accept."""
        assert isinstance(self.handler, _OAuthHandler), "tokens_refused needs xoauth2_introspection_url"
        with self.handler.lock:
            return self.handler.tokens_refused

    @property
    def oauth_mechanisms(self) -> list[str]:
        """The SASL mechanism of each successful OAuth2 login."""
        assert isinstance(self.handler, _OAuthHandler), "oauth_mechanisms needs xoauth2_introspection_url"
        with self.handler.lock:
            return list(self.handler.mechanisms)

    def clear(self) -> None:
        with self.handler.lock:
            self.handler.received.clear()

    def config(self) -> dict[str, Any]:
        """The `smtp:` section that points mailbridge at this sink."""
        security = {None: "none", "implicit": "tls", "starttls": "starttls"}[self.tls]
        section: dict[str, Any] = {"host": self.host, "port": self.port, "security": security, "timeout": 5}
        if self.tls_files is not None:
            section["ca_file"] = str(self.tls_files.ca_file)
        if self.login is not None:
            section.update(user=self.login[0], password=self.login[1])
        return section


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
