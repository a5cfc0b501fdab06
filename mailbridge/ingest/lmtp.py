"""LMTP intake: an MTA (Postfix `mailbox_transport = lmtp:unix:…`, Exim's lmtp transport) hands mail over
directly, with no mailbox to poll.

Each delivery goes through the same pipeline as IMAP mail, in batches (the deliveries that arrive while the
previous batch is being committed form the next one), and is answered after the commit that stored it: 250
per recipient once it is stored (as a ticket, a duplicate, or in quarantine with its raw bytes), 451 when it
could not be committed (the database is down) or not in time, so the MTA keeps it and tries again. A retry of
a mail we did store is recognised by its receipt (`lmtp/<mailbox>/<sha256>`) and answered 250 again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, AnyStr

from aiosmtpd.lmtp import LMTP

from mailbridge.config import FetchSettings, LmtpMailbox, LmtpSettings
from mailbridge.ingest.raw import RawMail
from mailbridge.models import Outcome
from mailbridge.pipeline import Pipeline, Result

log = logging.getLogger("mailbridge.lmtp")

# Batches prepared (parsed) while the one before them is committed.
PREPARE_AHEAD = 2


class Recipients:
    """Which lmtp mailbox takes mail for an address: the address itself, then without its +detail
    (support+urgent@ is support@), then its domain (@example.com)."""

    def __init__(self, boxes: Sequence[LmtpMailbox]) -> None:
        self._owners = {recipient: box.name for box in boxes for recipient in box.recipients}

    def mailbox_for(self, address: str) -> str | None:
        address = address.lower()
        local, at, domain = address.rpartition("@")
        if not at:
            return None
        base = local.split("+", 1)[0]
        for candidate in (address, f"{base}@{domain}", f"@{domain}"):
            if candidate in self._owners:
                return self._owners[candidate]
        return None


class LmtpIntake:
    def __init__(
        self,
        settings: LmtpSettings,
        boxes: Sequence[LmtpMailbox],
        pipeline: Pipeline,
        fetch: FetchSettings,
        max_message_bytes: int,
        hostname: str,
    ) -> None:
        self.settings = settings
        self.recipients = Recipients(boxes)
        self.pipeline = pipeline
        self.fetch = fetch
        self.max_message_bytes = max_message_bytes
        self.hostname = hostname
        self.listening = asyncio.Event()  # set once the socket accepts connections
        self.draining = False  # set at `stop`: each connection is closed once its DATA is answered
        self._queue: deque[RawMail] = deque()
        self._pending: dict[str, asyncio.Future[Result]] = {}  # source key -> its outcome, once committed
        self._arrived = asyncio.Event()
        self._connections: set[_LmtpSession] = set()
        self._idle = asyncio.Event()  # no connection is inside a DATA command

    async def run(self, stop: asyncio.Event) -> None:
        """Listen until `stop`; then take no new connections, answer the deliveries in hand, and return."""
        server = await self._listen()
        self.listening.set()
        log.info("listening for LMTP on %s", self.settings.listen)
        recording = asyncio.create_task(self._record_until_drained(stop), name="lmtp:record")
        try:
            waiting = asyncio.ensure_future(stop.wait())
            await asyncio.wait([waiting, recording], return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if recording.done():
                recording.result()  # a crash of ours: let the daemon see it
            server.close()
            self._remove_socket_file()
            self.draining = True
            # A connection between transactions, or still in MAIL/RCPT, is closed: the MTA tries again later.
            # One whose DATA is complete is answered after the last commit.
            for session in list(self._connections):
                if not session.in_data:
                    session.hang_up()
            self._arrived.set()
            await recording
            await self._wait_idle()
        finally:
            recording.cancel()
            server.close()
            for session in list(self._connections):
                session.hang_up()
            self._remove_socket_file()

    async def deliver(self, raws: Sequence[RawMail]) -> list[Result]:
        """Queue these mails for the next batch and wait for their commit. A mail already queued or in a
        batch (the MTA retried while we were still at it) shares that one's outcome."""
        futures = []
        loop = asyncio.get_running_loop()
        for raw in raws:
            assert raw.source_key is not None
            future = self._pending.get(raw.source_key)
            if future is None:
                future = self._pending[raw.source_key] = loop.create_future()
                self._queue.append(raw)
            futures.append(future)
        self._arrived.set()
        return list(await asyncio.gather(*futures))

    async def _record_until_drained(self, stop: asyncio.Event) -> None:
        preparing: deque[tuple[list[RawMail], asyncio.Future[Any]]] = deque()
        try:
            while True:
                while self._queue and len(preparing) < PREPARE_AHEAD:
                    batch = self._take_batch()
                    preparing.append((batch, self.pipeline.prepare(batch)))
                if not preparing:
                    # After `stop`, a connection still inside DATA is waited for: its mail is in hand.
                    if stop.is_set() and not any(session.in_data for session in self._connections):
                        return
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                batch, prepared = preparing.popleft()
                try:
                    results = await self.pipeline.record(batch, *await prepared)
                except Exception as exc:
                    log.exception("%d LMTP deliveries could not be stored; answering 451 (the MTA retries)", len(batch))
                    for raw in batch:
                        self._settle(raw, exc)
                    continue
                by_key = {result.raw.source_key: result for result in results}
                for raw in batch:
                    self._settle(raw, by_key.get(raw.source_key) or RuntimeError("no result for this mail"))
        finally:
            for batch, prepared in preparing:
                prepared.cancel()
                for raw in batch:
                    self._settle(raw, RuntimeError("shutting down"))
            while self._queue:
                self._settle(self._queue.popleft(), RuntimeError("shutting down"))

    def _take_batch(self) -> list[RawMail]:
        batch: list[RawMail] = []
        size = 0
        while self._queue and len(batch) < self.fetch.batch_size and size < self.fetch.batch_bytes:
            raw = self._queue.popleft()
            batch.append(raw)
            size += len(raw.data)
        return batch

    def _settle(self, raw: RawMail, outcome: Result | Exception) -> None:
        assert raw.source_key is not None
        future = self._pending.pop(raw.source_key, None)
        if future is None or future.done():
            return
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    # --- the LMTP side ----------------------------------------------------------------------------

    async def _listen(self) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        address = self.settings.address
        if isinstance(address, tuple):
            host, port = address
            return await loop.create_server(self._new_session, host, port)
        address.parent.mkdir(parents=True, exist_ok=True)
        _refuse_if_in_use(address)
        server = await loop.create_unix_server(self._new_session, str(address))
        os.chmod(address, self.settings.mode)
        return server

    def _remove_socket_file(self) -> None:
        address = self.settings.address
        if isinstance(address, Path):
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(address.lstat().st_mode):
                    address.unlink()

    def _new_session(self) -> _LmtpSession:
        return _LmtpSession(
            self,
            _Handler(self),
            data_size_limit=self.max_message_bytes,
            enable_SMTPUTF8=True,
            hostname=self.hostname,
            ident="mailbridge",
            loop=asyncio.get_running_loop(),
        )

    def _opened(self, session: _LmtpSession) -> None:
        self._connections.add(session)

    def _closed(self, session: _LmtpSession) -> None:
        self._connections.discard(session)
        self._update_idle()

    def _update_idle(self) -> None:
        if any(session.in_data for session in self._connections):
            self._idle.clear()
        else:
            self._idle.set()
            self._arrived.set()  # a draining intake may be done now

    async def _wait_idle(self) -> None:
        self._update_idle()
        await self._idle.wait()


def _refuse_if_in_use(path: Path) -> None:
    """asyncio replaces a socket file that is in the way; a live one belongs to another daemon."""
    if not path.exists():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise RuntimeError(f"lmtp.listen: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return  # left behind by a daemon that died: replaced
    finally:
        probe.close()
    raise RuntimeError(f"lmtp.listen: another process is listening on {path}")


class _LmtpSession(LMTP):
    """aiosmtpd's LMTP protocol, told to its intake (to drain at shutdown), and with one reply per
    recipient for the errors aiosmtpd itself gives after DATA (too much data, a line too long): LMTP
    (RFC 2033, 4.2) owes one reply per accepted recipient, and a client waiting for the second would hang."""

    def __init__(self, intake: LmtpIntake, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.intake = intake
        self.in_data = False
        self._data_recipients = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.intake._opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.intake._closed(self)
        super().connection_lost(error)

    def hang_up(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def smtp_DATA(self, arg: str) -> None:
        self.in_data = True
        self.intake._update_idle()
        try:
            await super().smtp_DATA(arg)
        finally:
            self.in_data = False
            self._data_recipients = 0
            if self.intake.draining:  # answered; no further transaction on this connection: we are stopping
                self.hang_up()
            self.intake._update_idle()

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            if status.startswith("354") and self.envelope is not None:
                self._data_recipients = len(self.envelope.rcpt_tos)
            elif self._data_recipients > 1 and "\r\n" not in status:
                status = "\r\n".join([status] * self._data_recipients)
                self._data_recipients = 0
        await super().push(status)


class _Handler:
    """aiosmtpd's hooks: RCPT says whether a mailbox takes the address, DATA stores and answers."""

    def __init__(self, intake: LmtpIntake) -> None:
        self.intake = intake

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        if self.intake.recipients.mailbox_for(address) is None:
            return f"550 5.1.1 <{address}>: no mailbox here takes this address"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        recipients: list[str] = list(envelope.rcpt_tos)
        boxes = {rcpt: self.intake.recipients.mailbox_for(rcpt) or "" for rcpt in recipients}
        data = _with_return_path(envelope.mail_from, bytes(envelope.original_content))
        digest = hashlib.sha256(data).hexdigest()
        raws = {
            box: RawMail(
                mailbox=box,
                source=f"lmtp://{box}/{digest[:16]}",
                data=data,
                source_key=f"lmtp/{box}/{digest}",
                nothing_to_tell=True,
            )
            for box in dict.fromkeys(boxes.values())
        }
        limit = self.intake.settings.answer_within_seconds
        try:
            # Shielded: a client that hangs up (or our deadline) does not take the mail out of its batch;
            # if it is committed after all, the MTA's retry finds its receipt.
            results = await asyncio.wait_for(asyncio.shield(self.intake.deliver(list(raws.values()))), limit)
        except TimeoutError:
            log.warning("LMTP delivery not committed within %gs; answering 451", limit)
            return _for_each(recipients, f"451 4.3.0 not stored within {limit:g}s; try again later")
        except Exception as exc:
            reason = type(exc).__name__
            return _for_each(recipients, f"451 4.3.0 not stored ({reason}); try again later")
        by_box = {result.raw.mailbox: result for result in results}
        return "\r\n".join(_reply(rcpt, by_box[boxes[rcpt]]) for rcpt in recipients)


def _with_return_path(mail_from: str | None, data: bytes) -> bytes:
    """The final delivery records the envelope sender (RFC 5321, 4.4), as Dovecot's LMTP does for IMAP mail;
    classify reads `Return-Path: <>` as a bounce. The MTA has already dropped any Return-Path it was sent."""
    sender = (mail_from or "").strip("<>")
    newline = b"\r\n" if b"\r\n" in data[:1000] else b"\n"
    return b"Return-Path: <" + sender.encode("utf-8", "surrogateescape") + b">" + newline + data


def _for_each(recipients: Sequence[str], reply: str) -> str:
    return "\r\n".join([reply] * len(recipients))


def _reply(recipient: str, result: Result) -> str:
    if result.outcome is Outcome.QUARANTINED:
        return f"250 2.0.0 <{recipient}> kept in quarantine ({result.quarantine_id})"
    if result.outcome is Outcome.DUPLICATE or result.seen_before:
        return f"250 2.0.0 <{recipient}> already stored ({result.ticket})"
    return f"250 2.0.0 <{recipient}> stored ({result.ticket})"
