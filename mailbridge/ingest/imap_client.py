"""The IMAP client side: one logged-in aioimaplib connection with the folder selected, and the few
commands the watcher needs, each with a time limit and aware of a dropped connection (aioimaplib
itself leaves pending commands waiting forever when the socket closes)."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import aioimaplib

from mailbridge.config import ImapMailbox, ImportSince
from mailbridge.oauth import (
    SASL_ERROR_ACK,
    AccessToken,
    OAuthError,
    TokenEndpointError,
    TokenSource,
    sasl_initial_response,
)

log = logging.getLogger("mailbridge.imap")

_UID = re.compile(rb"UID (\d+)")
_SIZE = re.compile(rb"RFC822\.SIZE (\d+)")
_CODE = re.compile(rb"\[(UIDVALIDITY|UIDNEXT) (\d+)\]")
_EXISTS = re.compile(rb"^(\d+) EXISTS")
_IDLE_RENEW_SECONDS = 20 * 60  # RFC 2177: re-issue IDLE at least every 29 minutes
_LISTING_CHUNK = 200  # aioimaplib recurses once per response line; keep any single response short


class ImapError(Exception):
    """The server refused a command or the connection broke; the watcher reconnects."""


class AuthenticationError(ImapError):
    pass


class CommandRefused(ImapError):
    """The server answered NO/BAD (over quota, a folder it will not create …): the connection is fine."""


@dataclass(frozen=True, slots=True)
class FolderStatus:
    uidvalidity: int
    uidnext: int
    exists: int


class _Protocol(aioimaplib.IMAP4ClientProtocol):
    """aioimaplib's protocol, minus two costs. Its `data_received` formats every received chunk for a
    debug line (`log.debug('Received : %s' % d)`) whether or not debug logging is on. Escaping every
    byte of every mail that way cost the main process about 9 µs per kB (~0.5 ms per 56 kB mail, a
    third of its CPU per mail in bench/). And its `_handle_responses` copies the rest of a received
    chunk (up to 256 kB) for every line and every literal in it (`partition`, `data[n:]`), each copy a
    fresh allocation above malloc's mmap threshold whose pages are faulted in anew: ~0.15 ms of the main
    process per mail in a pipelined FETCH. Ours walks the chunk by offsets, with the same steps."""

    incomplete_line: bytes  # set by aioimaplib's __init__ (untyped there)
    current_command: Any

    def data_received(self, d: bytes) -> None:
        if _aioimaplib_log.isEnabledFor(logging.DEBUG):
            _aioimaplib_log.debug("Received : %s", d)
        try:
            self._handle_responses(self.incomplete_line + d, self._handle_line, self.current_command)
            self.incomplete_line = b""
            self.current_command = None
        except aioimaplib.IncompleteRead as incomplete_read:
            self.current_command = incomplete_read.cmd
            self.incomplete_line = incomplete_read.data

    def _handle_responses(
        self,
        data: bytes,
        line_handler: Callable[[bytes, Any], Any],
        current_cmd: Any = None,
    ) -> None:
        # aioimaplib's recursion (one call per line, on the copied rest of the data) as a loop over offsets;
        # each step is the one aioimaplib takes, and raises what it raises.
        at, end = 0, len(data)
        while True:
            if at == end:
                if self.pending_sync_command is not None:
                    self.pending_sync_command.flush()
                if current_cmd is not None and current_cmd.wait_data():
                    raise aioimaplib.IncompleteRead(current_cmd)
                return
            if current_cmd is not None and current_cmd.wait_literal_data():
                # A view, not a copy: the command extends its literal with what it needs of it.
                rest = current_cmd.append_literal_data(memoryview(data)[at:])
                at = end - len(rest)
                if current_cmd.wait_literal_data():
                    raise aioimaplib.IncompleteRead(current_cmd)
            line_end = data.find(b"\r\n", at)
            if line_end == -1:
                raise aioimaplib.IncompleteRead(current_cmd, data[at:])
            line = data[at:line_end]
            at = line_end + 2
            cmd = line_handler(line, current_cmd)
            begin_literal = aioimaplib.literal_data_re.match(line)
            if begin_literal:
                if cmd is None:
                    cmd = aioimaplib.Command("NIL", "unused")
                cmd.begin_literal_data(int(begin_literal.group("size")))
                current_cmd = cmd
            elif cmd is not None and cmd.wait_data():
                current_cmd = cmd
            else:
                current_cmd = None

    async def fetch(
        self, message_set: str, message_parts: str, by_uid: bool = False, timeout: float | None = None
    ) -> aioimaplib.Response:
        # As aioimaplib's own fetch (UID FETCH comes here too), with our FetchCommand.
        command = _FetchCommand(
            self.new_tag(), message_set, message_parts, prefix="UID" if by_uid else "", loop=self.loop, timeout=timeout
        )
        response: aioimaplib.Response = await self.execute(command)
        return response


_aioimaplib_log = logging.getLogger("aioimaplib.aioimaplib")


class _FetchCommand(aioimaplib.FetchCommand):
    """aioimaplib's FetchCommand, minus one cost: `wait_data` (whether a message's response is still open)
    ran its regex over every line received so far for the command, and it is asked after each line: a
    pipelined FETCH of 50 mails cost ~0.1 ms of the main process per mail, a tenth of its CPU at a backlog.
    Lines are only ever appended, so the lines already looked at are remembered; the answer is the same."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._scanned = 0  # response lines already looked at for the start of a message's data
        self._last_fetch = 0  # index of the last of them that starts one

    def wait_data(self) -> bool:
        lines: list[Any] = self._resp_lines
        pattern = self.FETCH_MESSAGE_DATA_RE
        for index in range(self._scanned, len(lines)):
            line = lines[index]
            if isinstance(line, bytes) and pattern.match(line):
                self._last_fetch = index
        self._scanned = len(lines)
        # Literals (bytearray) do not count, as in aioimaplib.
        tail = b"".join(line for line in lines[self._last_fetch :] if isinstance(line, bytes))
        return not aioimaplib.matched_parenthesis(tail)


class _Imap4(aioimaplib.IMAP4):
    def create_client(
        self,
        host: str,
        port: int,
        loop: asyncio.AbstractEventLoop | None,
        conn_lost_cb: Any = None,
        ssl_context: Any = None,
    ) -> None:
        # As aioimaplib's own create_client, with our protocol.
        local_loop = loop if loop is not None else asyncio.get_running_loop()
        self.protocol = _Protocol(local_loop, conn_lost_cb)
        self._client_task = local_loop.create_task(
            local_loop.create_connection(lambda: self.protocol, host, port, ssl=ssl_context)
        )


class _Imap4Ssl(aioimaplib.IMAP4_SSL, _Imap4):
    """IMAP4_SSL's create_client (a default TLS context) calls on to _Imap4's (our protocol)."""


class ImapConnection:
    """A logged-in aioimaplib client with the folder selected, and the few commands we need."""

    def __init__(self, box: ImapMailbox, tokens: TokenSource | None = None) -> None:
        self.box = box
        self.tokens = tokens  # auth: oauth2
        self.lost = asyncio.Event()
        self.client: aioimaplib.IMAP4 | None = None
        self.token_expires_at: float | None = None  # time.time() of the token this session logged in with

    async def open(self) -> FolderStatus:
        box = self.box
        assert box.port is not None
        if box.security == "tls":
            self.client = _Imap4Ssl(host=box.host, port=box.port, timeout=box.timeout, ssl_context=box.ssl_context())
        else:
            self.client = _Imap4(host=box.host, port=box.port, timeout=box.timeout, conn_lost_cb=self._on_lost)
        if box.security == "tls":
            self.client.protocol.conn_lost_cb = self._on_lost
        await self.client.wait_hello_from_server()
        if box.security == "starttls":
            await self._starttls()
        if box.auth == "oauth2":
            await self._login_with_token()
        else:
            response = await self._call(self.client.login(box.user, box.secret), "LOGIN")
            if response.result != "OK":
                raise AuthenticationError(f"login as {box.user} refused: {_text(response.lines)}")
        return await self.select()

    async def _login_with_token(self) -> None:
        """XOAUTH2 or OAUTHBEARER; a refused token is renewed once (the server learns of a revocation or an
        early expiry before our clock does) and tried again."""
        assert self.tokens is not None
        token = await self._token(force_refresh=False)
        response = await self._authenticate(token)
        if response.result != "OK":
            log.info("mailbox %s: the server refused the access token; renewing it", self.box.name)
            token = await self._token(force_refresh=True)
            response = await self._authenticate(token)
            if response.result != "OK":
                raise AuthenticationError(
                    f"OAuth2 login as {self.box.user} refused with a fresh token: {_text(response.lines)}"
                )
        self.token_expires_at = token.expires_at

    async def _token(self, *, force_refresh: bool) -> AccessToken:
        assert self.tokens is not None
        try:
            return await self.tokens.token(force_refresh=force_refresh)
        except TokenEndpointError as exc:  # an outage, not a refusal: the usual reconnect back-off
            raise ImapError(str(exc)) from None
        except OAuthError as exc:
            raise AuthenticationError(str(exc)) from None

    async def _authenticate(self, token: AccessToken) -> aioimaplib.Response:
        assert self.client is not None and self.box.oauth2 is not None and self.box.port is not None
        protocol = self.client.protocol
        mechanism = self.box.oauth2.mechanism
        initial = sasl_initial_response(mechanism, self.box.user, token.value, self.box.host, self.box.port)
        command = _Authenticate(protocol, mechanism.upper(), initial, SASL_ERROR_ACK[mechanism])
        response: aioimaplib.Response = await self._call(
            protocol.execute(command, scrub=initial), f"AUTHENTICATE {mechanism.upper()}"
        )
        if response.result == "OK":
            protocol.state = aioimaplib.AUTH
        return response

    def renewal_due_in(self) -> float | None:
        """Seconds until this session should be renewed because its token expires (None: never)."""
        if self.token_expires_at is None:
            return None
        assert self.box.oauth2 is not None
        return self.token_expires_at - self.box.oauth2.refresh_margin_seconds - time.time()

    async def _starttls(self) -> None:
        assert self.client is not None
        protocol = self.client.protocol
        if "STARTTLS" not in protocol.capabilities:
            raise ImapError("security: starttls, but the server does not offer STARTTLS")
        # aioimaplib knows STARTTLS but has no method for it; send the command and upgrade the transport.
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        response = await asyncio.wait_for(protocol.execute(command), self.box.timeout)
        if response.result != "OK":
            raise ImapError(f"STARTTLS refused: {_text(response.lines)}")
        loop = asyncio.get_running_loop()
        context = self.box.ssl_context()
        protocol.transport = await loop.start_tls(protocol.transport, protocol, context, server_hostname=self.box.host)
        # RFC 3501 6.2.1: capabilities may change after STARTTLS.
        await self._call(protocol.capability(), "CAPABILITY")

    def _on_lost(self, exc: Exception | None) -> None:
        self.lost.set()

    @property
    def capabilities(self) -> set[str]:
        assert self.client is not None
        return set(self.client.protocol.capabilities)

    async def _call(self, command: Awaitable[Any], what: str, timeout: float | None = -1.0) -> Any:
        """Await an aioimaplib command, but give up when the connection drops or the server goes quiet.

        aioimaplib applies no timeout to UID MOVE/STORE/COPY/EXPUNGE and never fails a pending
        command when the socket closes, so without this a dropped connection hangs the watcher.
        """
        limit = self.box.timeout if timeout == -1.0 else timeout
        task = asyncio.ensure_future(command)
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            done, _ = await asyncio.wait({task, lost}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.wait({task})  # let it unwind; unlike `await task`, this keeps our own cancellation
        if self.lost.is_set():
            raise ImapError(f"{what}: connection lost")
        raise ImapError(f"{what}: no answer from the server within {limit:g} s")

    async def select(self) -> FolderStatus:
        assert self.client is not None
        response = await self._call(self.client.select(_quote(self.box.folder)), "SELECT")
        _check(response, f"SELECT {self.box.folder}")
        codes = {m.group(1): int(m.group(2)) for line in response.lines for m in _CODE.finditer(_b(line))}
        exists = next((int(m.group(1)) for line in response.lines if (m := _EXISTS.match(_b(line)))), 0)
        if b"UIDVALIDITY" not in codes:
            raise ImapError(f"the server sent no UIDVALIDITY for {self.box.folder}")
        uidnext = codes.get(b"UIDNEXT")
        if uidnext is None:  # optional before IMAP4rev2; derive it, the first-run baseline depends on it
            uids = await self.uids_above(0)
            uidnext = (max(uids) + 1) if uids else 1
        return FolderStatus(codes[b"UIDVALIDITY"], uidnext, exists)

    async def ensure_folder(self, name: str) -> None:
        assert self.client is not None
        response = await self._call(self.client.create(_quote(name)), "CREATE")
        if response.result != "OK" and b"ALREADYEXISTS" not in b" ".join(map(_b, response.lines)):
            # Servers without RFC 5530 codes say "NO Mailbox exists" in words; check by listing.
            listing = await self._call(self.client.list('""', _quote(name)), "LIST")
            if not any(b"LIST" in _b(line) or name.encode() in _b(line) for line in listing.lines[:-1]):
                raise ImapError(f"cannot create folder {name}: {_text(response.lines)}")

    async def uids_above(self, floor: int) -> list[int]:
        assert self.client is not None
        response = await self._call(self.client.uid_search(f"UID {floor + 1}:*", charset=None), "UID SEARCH")
        _check(response, "UID SEARCH")
        return sorted(u for u in _search_uids(response.lines) if u > floor)

    async def uids_up_to(self, ceiling: int, since: ImportSince | None) -> list[int]:
        assert self.client is not None
        if ceiling < 1:
            return []
        criteria = [f"UID 1:{ceiling}"]
        if since is not None:
            criteria.append(f"SINCE {since.since.strftime('%d-%b-%Y')}")
        response = await self._call(self.client.uid_search(*criteria, charset=None), "UID SEARCH")
        _check(response, "UID SEARCH")
        return sorted(u for u in _search_uids(response.lines) if u <= ceiling)

    async def sizes(self, uids: Sequence[int]) -> dict[int, int]:
        assert self.client is not None
        sizes: dict[int, int] = {}
        for start in range(0, len(uids), _LISTING_CHUNK):
            chunk = uids[start : start + _LISTING_CHUNK]
            response = await self._call(self.client.uid("fetch", uid_set(chunk), "(UID RFC822.SIZE)"), "UID FETCH")
            _check(response, "UID FETCH RFC822.SIZE")
            for line in response.lines:
                data = _b(line)
                uid, size = _UID.search(data), _SIZE.search(data)
                if uid and size:
                    sizes[int(uid.group(1))] = int(size.group(1))
        return sizes

    async def fetch(self, uids: Sequence[int]) -> dict[int, bytes]:
        """One UID FETCH for the whole batch: BODY.PEEK[] leaves \\Seen as it was."""
        assert self.client is not None
        # No overall limit: a big batch may take long; aioimaplib times out when no data arrives.
        response = await self._call(self.client.uid("fetch", uid_set(uids), "(UID BODY.PEEK[])"), "UID FETCH", None)
        _check(response, "UID FETCH BODY.PEEK[]")
        bodies: dict[int, bytes] = {}
        lines = response.lines
        for index, line in enumerate(lines):
            if isinstance(line, bytearray) and index > 0:
                uid = _UID.search(_b(lines[index - 1])) or _UID.search(
                    _b(lines[index + 1]) if index + 1 < len(lines) else b""
                )
                if uid:
                    bodies[int(uid.group(1))] = bytes(line)
        return bodies

    async def move(self, uids: Sequence[int], folder: str) -> None:
        if "MOVE" in self.capabilities:
            await self._uid("move", uid_set(uids), _quote(folder))
            return
        await self._uid("copy", uid_set(uids), _quote(folder))
        await self.delete(uids)

    async def flag_seen(self, uids: Sequence[int]) -> None:
        await self._uid("store", uid_set(uids), "+FLAGS.SILENT", r"(\Seen)")

    async def delete(self, uids: Sequence[int]) -> None:
        await self._uid("store", uid_set(uids), "+FLAGS.SILENT", r"(\Deleted)")
        if "UIDPLUS" in self.capabilities:
            await self._uid("expunge", uid_set(uids))
        else:
            assert self.client is not None
            _check(await self._call(self.client.expunge(), "EXPUNGE"), "EXPUNGE")

    async def _uid(self, command: str, *args: str) -> None:
        assert self.client is not None
        what = f"UID {command.upper()} {' '.join(args)}"
        # MOVE/STORE wait in aioimaplib's queue behind the next batch's FETCH, which may be large on a
        # slow link: their time limit covers that wait too.
        _check(await self._call(self.client.uid(command, *args), what, self.box.timeout * 4), what)

    async def wait_for_news(self, stop: asyncio.Event, timeout: float) -> None:
        """Return when the server reports new mail, on `stop`, or after `timeout` seconds."""
        assert self.client is not None
        if not ({"IDLE"} <= self.capabilities and self.box.idle):
            await wait_for_stop(stop, timeout, self.lost)
            return
        idle = await self._call(self.client.idle_start(timeout=min(timeout, _IDLE_RENEW_SECONDS)), "IDLE")
        try:
            while not stop.is_set() and not self.lost.is_set():
                push = asyncio.ensure_future(self.client.wait_server_push(timeout=timeout))
                stopper = asyncio.ensure_future(stop.wait())
                lost = asyncio.ensure_future(self.lost.wait())
                done, pending = await asyncio.wait({push, stopper, lost}, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                if push not in done:
                    break
                try:
                    lines = push.result()
                except TimeoutError:
                    break
                if lines == aioimaplib.STOP_WAIT_SERVER_PUSH or any(
                    b"EXISTS" in _b(line) for line in (lines if isinstance(lines, list) else [lines])
                ):
                    break
        finally:
            if not self.lost.is_set():
                self.client.idle_done()
                with suppress(ImapError):
                    await self._call(idle, "DONE")
        if self.lost.is_set():
            raise ImapError("connection lost while idling")

    async def close(self) -> None:
        if self.client is None:
            return
        with suppress(Exception):
            if not self.lost.is_set():
                await asyncio.wait_for(self.client.logout(), 5)
        with suppress(Exception):
            transport = self.client.protocol.transport
            if transport is not None:
                transport.close()


class _Authenticate(aioimaplib.Command):
    """AUTHENTICATE with the initial response (SASL-IR). When the server refuses the token it sends its error
    as a continuation and waits for the client's acknowledgement (RFC 7628 3.2.3); aioimaplib's own xoauth2()
    does not answer it and waits until its timeout, so this command answers every continuation."""

    def __init__(
        self, protocol: aioimaplib.IMAP4ClientProtocol, mechanism: str, initial_response: str, error_ack: str
    ) -> None:
        super().__init__("AUTHENTICATE", protocol.new_tag(), mechanism, initial_response, loop=protocol.loop)
        self._protocol = protocol
        self._error_ack = error_ack

    def flush(self) -> None:
        # aioimaplib calls flush() after it recorded a continuation line for the pending command.
        if self._protocol.transport is not None:
            self._protocol.transport.write(self._error_ack.encode("ascii") + b"\r\n")


def uid_set(uids: Iterable[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> '1:3,7,9:10'"""
    ordered = sorted(set(uids))
    ranges: list[str] = []
    start = prev = None
    for uid in ordered:
        if start is None:
            start = prev = uid
        elif prev is not None and uid == prev + 1:
            prev = uid
        else:
            ranges.append(f"{start}:{prev}" if start != prev else f"{start}")
            start = prev = uid
    if start is not None:
        ranges.append(f"{start}:{prev}" if start != prev else f"{start}")
    return ",".join(ranges)


def _search_uids(lines: Sequence[bytes | bytearray]) -> list[int]:
    # aioimaplib strips the "* SEARCH" prefix; the last line is the tagged status text.
    uids: list[int] = []
    for line in lines[:-1]:
        tokens = _b(line).split()
        if tokens and tokens[0].upper() == b"SEARCH":
            tokens = tokens[1:]
        if tokens and all(tok.isdigit() for tok in tokens):
            uids.extend(int(tok) for tok in tokens)
    return uids


def imap_utf7(name: str) -> str:
    """RFC 3501 5.1.3 modified UTF-7 for folder names ("Wysłane" -> "Wys&AUI-ane")."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            encoded = base64.b64encode("".join(pending).encode("utf-16-be")).decode("ascii").rstrip("=")
            out.append("&" + encoded.replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def _quote(name: str) -> str:
    name = imap_utf7(name)
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _b(line: bytes | bytearray | str) -> bytes:
    return line.encode() if isinstance(line, str) else bytes(line)


def _text(lines: Sequence[bytes | bytearray | str]) -> str:
    return " ".join(_b(line).decode("utf-8", "replace") for line in lines)[:300]


def _check(response: aioimaplib.Response, what: str) -> None:
    if response.result in ("NO", "BAD"):
        raise CommandRefused(f"{what} refused: {response.result} {_text(response.lines)}")
    if response.result != "OK":
        raise ImapError(f"{what} failed: {response.result} {_text(response.lines)}")


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out waiting for the server"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def wait_for_stop(stop: asyncio.Event, seconds: float, *others: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in (stop, *others)]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
