"""Delivers the outbox: claims due mails, hands them to the SMTP server (or a directory), and records each
outcome in its own commit before that connection sends the next mail, so a crash repeats at most the mails
in flight (one per connection), each with its fixed Message-ID.

Temporary failures (4xx, connection trouble) are retried with exponential backoff until the mail's
`deliver_until`; permanent ones (5xx) fail the mail at once. A server that cannot be reached is left alone
until its own backoff ends, so an outage costs one attempt, not one per waiting mail.

Several instances share the outbox: a sender claims the mails it is about to send (`claimed_by`,
`claimed_until`, taken with FOR UPDATE SKIP LOCKED on PostgreSQL, so two senders never claim one mail),
starts no mail in the second half of its claim, and gives back what it did not send. Another instance's
sender takes a claimed mail only once the claim has run out (its holder died mid-way, or its commit was
late); the late holder's outcomes then leave the new holder's claim alone (see `_Recorder._write`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

import aiosmtplib
from sqlalchemy import Table, and_, bindparam, or_, select, update

from mailbridge.config import OutboxSettings, Settings, SmtpServer
from mailbridge.db import Database, claim_rows
from mailbridge.leases import instance_name
from mailbridge.models import OutboxMail, OutboxStatus, db_text, utcnow
from mailbridge.oauth import SASL_ERROR_ACK, OAuthError, TokenSource, TokenSources, sasl_initial_response

log = logging.getLogger("mailbridge.outbox")

CLAIM_SIZE = 200
# A send must be over, and its outcome committed, this long before its claim runs out and another sender
# may claim the mail: a send cut off at that point is recorded for a retry (at most it repeats, as a crash
# in flight does).
CLAIM_MARGIN_SECONDS = 5.0
# An SMTP session is used for at most this long, then closed and opened again (with a fresh login).
SESSION_MAX_SECONDS = 300.0
# How long a commit of outcomes waits for the other connections' outcomes (see `_Recorder`).
GROUP_WAIT_SECONDS = 0.002

# What one commit recorded: (mailbox, "sent" | "retry" | "failed") -> mails. "retry": not sent this time,
# tried again later; "failed": given up (refused for good, or past its deadline).
OutboxTally = Counter[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Due:
    id: int
    mailbox: str
    message_id: str
    envelope_from: str
    recipients: list[str]
    raw: bytes
    attempts: int
    deliver_until: datetime
    send_by: float  # monotonic: not started after this, so it ends before the claim runs out


class DeliveryError(Exception):
    def __init__(self, message: str, *, permanent: bool, server_trouble: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.server_trouble = server_trouble  # the server, not this mail: back off the whole server


class Transport(Protocol):
    async def send(self, mail: Due) -> str | None:
        """Deliver or raise DeliveryError; returns a note (e.g. recipients refused) or None."""
        ...

    async def close(self) -> None: ...


class SmtpTransport:
    """One SMTP session, opened on first use and kept for the mails that follow."""

    def __init__(self, server: SmtpServer, tokens: TokenSource | None = None) -> None:
        self.server = server
        self.tokens = tokens  # auth: oauth2
        self._client: aiosmtplib.SMTP | None = None
        self._opened_at = 0.0

    async def _connected(self) -> aiosmtplib.SMTP:
        if self._client is not None and self._client.is_connected:
            if time.monotonic() - self._opened_at < SESSION_MAX_SECONDS:
                return self._client
            await self.close()  # a fresh login now and then: a token that expired meanwhile, server limits
        server = self.server
        client = aiosmtplib.SMTP(
            hostname=server.host,
            port=server.port,
            use_tls=server.security == "tls",
            start_tls=server.security == "starttls",
            tls_context=server.ssl_context() if server.security != "none" else None,
            timeout=server.timeout,
        )
        try:
            await client.connect()
            if server.auth == "oauth2":
                await self._login_with_token(client)
            elif server.user:
                await client.login(server.user, server.secret or "")
        except OAuthError as exc:
            await _quietly_close(client)
            raise DeliveryError(str(exc), permanent=False, server_trouble=True) from None
        except aiosmtplib.SMTPAuthenticationError as exc:
            await _quietly_close(client)
            raise DeliveryError(
                f"SMTP login refused by {server.host}: {exc.code} {exc.message}", permanent=False, server_trouble=True
            ) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            await _quietly_close(client)
            raise DeliveryError(
                f"cannot connect to {server.host}:{server.port}: {_describe(exc)}", permanent=False, server_trouble=True
            ) from None
        self._client = client
        self._opened_at = time.monotonic()
        return client

    async def _login_with_token(self, client: aiosmtplib.SMTP) -> None:
        """AUTH XOAUTH2 / OAUTHBEARER; a refused token is renewed once and tried again (the server may know
        that it was revoked)."""
        assert self.tokens is not None
        token = await self.tokens.token()
        try:
            await self._authenticate(client, token.value)
        except aiosmtplib.SMTPAuthenticationError:
            log.info("SMTP server %s refused the access token; renewing it", self.server.host)
            token = await self.tokens.token(force_refresh=True)
            await self._authenticate(client, token.value)

    async def _authenticate(self, client: aiosmtplib.SMTP, token: str) -> None:
        server = self.server
        assert server.oauth2 is not None and server.user is not None and server.port is not None
        if server.oauth2.mechanism == "xoauth2":
            await client.auth_xoauth2(server.user, token)
            return
        # aiosmtplib has no OAUTHBEARER of its own.
        if client.is_ehlo_or_helo_needed:
            await client.ehlo()
        initial = sasl_initial_response("oauthbearer", server.user, token, server.host, server.port)
        response = await client.execute_command(b"AUTH", b"OAUTHBEARER", initial.encode("ascii"))
        if response.code == 334:  # the error as a challenge: acknowledge it to get the final reply
            response = await client.execute_command(SASL_ERROR_ACK["oauthbearer"].encode("ascii"))
        if response.code != 235:
            raise aiosmtplib.SMTPAuthenticationError(response.code, response.message)

    async def send(self, mail: Due) -> str | None:
        kept = self._client if self._client is not None and self._client.is_connected else None
        client = await self._connected()
        try:
            refused, _ = await client.sendmail(mail.envelope_from, mail.recipients, mail.raw)
        except aiosmtplib.SMTPServerDisconnected as exc:
            await self._drop()
            if client is not kept:
                raise DeliveryError(
                    f"connection to {self.server.host} lost: {_describe(exc)}", permanent=False, server_trouble=True
                ) from None
            # A kept session that the server closed while it idled (its timeout, a restart) before we noticed:
            # a new session now, not a back-off. Had the server taken the mail before the drop, it goes twice
            # with the same Message-ID, as the retry later would have sent it.
            log.info("SMTP session to %s was closed by the server; sending on a new one", self.server.host)
            return await self.send(mail)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            raise DeliveryError(f"recipients refused: {detail}", permanent=all(c >= 500 for c in codes)) from None
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code >= 500:
                raise DeliveryError(f"refused: {exc.code} {exc.message}", permanent=True) from None
            await self._drop()
            raise DeliveryError(f"deferred: {exc.code} {exc.message}", permanent=False) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            await self._drop()
            raise DeliveryError(
                f"connection to {self.server.host} lost: {_describe(exc)}", permanent=False, server_trouble=True
            ) from None
        if refused:
            return "some recipients refused: " + "; ".join(f"{a}: {r.code} {r.message}" for a, r in refused.items())
        return None

    async def _drop(self) -> None:
        if self._client is not None:
            await _quietly_close(self._client)
            self._client = None

    async def close(self) -> None:
        if self._client is not None and self._client.is_connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.quit(), timeout=5)
        await self._drop()


class DirectoryTransport:
    """Writes each mail as `<Message-ID>.eml` (the demo, or a dry run): the file appears whole or not at all."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def send(self, mail: Due) -> str | None:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", mail.message_id)[:200] + ".eml"
        try:
            await asyncio.to_thread(_write_atomically, self.directory / name, mail.raw)
        except OSError as exc:
            raise DeliveryError(f"cannot write to {self.directory}: {exc.strerror}", permanent=False) from None
        return None

    async def close(self) -> None:
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class OutboxSender:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        ready: asyncio.Event,
        recorded: Callable[[OutboxTally], None] | None = None,
    ) -> None:
        self.db = db
        self.settings: OutboxSettings = settings.outbox
        self.ready = ready
        self.recorded = recorded  # told what each commit of outcomes recorded (the daemon's metrics)
        self._tokens = TokenSources()  # XOAUTH2 logins; the token cache files are shared with the daemon
        self._servers: dict[str, SmtpServer | Path] = {}
        for box in settings.mailboxes:
            route = settings.outbox.deliver_to_directory or settings.smtp_for(box)
            if route is not None:
                self._servers[box.name] = route
        self._server_retry_at: dict[str, float] = {}  # server key -> monotonic time it may be tried again
        self._server_failures: dict[str, int] = {}
        self._in_flight: set[int] = set()
        self._idle_sessions: dict[str, list[Transport]] = {}  # server key -> sessions no worker is using
        self.name = f"{instance_name(settings)}/outbox:{os.getpid()}"

    async def run(self, stop: asyncio.Event) -> None:
        """The daemon's sender task: deliver what is due, then wait for new mail, a retry, or stop.

        The SMTP sessions stay open from one wake to the next while mail keeps coming: at a steady trickle
        each wake has one or two mails, and a session per wake (connect, EHLO, QUIT) cost more than the mails.
        They are closed once a wait ends without news (`poll_seconds`, well inside any server's idle timeout)."""
        try:
            while not stop.is_set():
                # Cleared before the round, not after it: a wake for mail committed after the round's last
                # claim looked must start another round, not wait for the next poll.
                self.ready.clear()
                try:
                    await self.deliver_due(stop, keep_sessions=True)
                except Exception:
                    log.exception("delivering the outbox failed; trying again shortly")
                waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.ready.wait())]
                done, _ = await asyncio.wait(waiters, timeout=self._idle_wait(), return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
                if not done:
                    await self._close_sessions()
        finally:
            await self._close_sessions()

    def _idle_wait(self) -> float:
        wait = self.settings.poll_seconds
        now = time.monotonic()
        for retry_at in self._server_retry_at.values():
            wait = min(wait, max(0.05, retry_at - now))
        return wait

    async def deliver_due(self, stop: asyncio.Event | None = None, *, keep_sessions: bool = False) -> int:
        """Deliver every mail that is due now (round after round of claims); returns how many were tried.
        The SMTP sessions are closed at the end unless `keep_sessions` (the daemon's sender task)."""
        tried = 0
        try:
            while stop is None or not stop.is_set():
                if not any(self._server_ready(mailbox) for mailbox in self._servers):
                    return tried  # every server is in its back-off: nothing to claim yet
                due = await self.db.run(self._claim)
                due = [mail for mail in due if self._server_ready(mail.mailbox)]
                if not due:
                    return tried
                tried += len(due)
                await self._deliver(due, stop)
            return tried
        finally:
            if not keep_sessions:
                await self._close_sessions()

    def _session(self, key: str, mailbox: str) -> Transport:
        """An open session to this server left by an earlier round, or a new one (opened on first use)."""
        idle = self._idle_sessions.get(key)
        return idle.pop() if idle else self._transport(mailbox)

    async def _close_sessions(self) -> None:
        sessions, self._idle_sessions = self._idle_sessions, {}
        for transports in sessions.values():
            for transport in transports:
                await transport.close()

    async def _deliver(self, due: Sequence[Due], stop: asyncio.Event | None) -> None:
        queue: asyncio.Queue[Due] = asyncio.Queue()
        for mail in due:
            queue.put_nowait(mail)
            self._in_flight.add(mail.id)
        recorder = _Recorder(self.db, self.settings, self.name, self.recorded)
        committer = asyncio.create_task(recorder.run(), name="outbox-recorder")
        try:
            workers = min(self.settings.connections, len(due))
            await asyncio.gather(*(self._worker(queue, recorder, stop) for _ in range(workers)))
        finally:
            await recorder.close()
            await committer
            await self.db.run(recorder.release)
            self._in_flight.difference_update(mail.id for mail in due)
            unsent = [mail.id for mail in due if mail.id not in recorder.recorded]
            if unsent:  # stopped, its server in back-off, or its claim too old: free for any sender now
                await self.db.run(self._unclaim, unsent)

    async def _worker(self, queue: asyncio.Queue[Due], recorder: _Recorder, stop: asyncio.Event | None) -> None:
        transports: dict[str, Transport] = {}
        recorder.sending()
        try:
            while not queue.empty() and (stop is None or not stop.is_set()):
                mail = queue.get_nowait()
                key = self._server_key(mail.mailbox)
                if key is None or not self._server_ready(mail.mailbox):
                    continue  # its server is in backoff: the mail stays due for later
                if time.monotonic() > mail.send_by:
                    continue  # the claim may run out while it is sent: claimed again, by us or another
                transport = transports.get(key) or transports.setdefault(key, self._session(key, mail.mailbox))
                # Each SMTP step has its own timeout, so a slow server can stretch one send past the claim.
                claim_left = mail.send_by + self.settings.claim_seconds / 2 - CLAIM_MARGIN_SECONDS - time.monotonic()
                try:
                    async with asyncio.timeout(max(claim_left, 0.0)):
                        note = await transport.send(mail)
                except TimeoutError:
                    transports.pop(key, None)
                    await transport.close()
                    error = "not sent before its claim ran out; tried again later"
                    await recorder.record(_Result(mail, sent=False, error=error, permanent=False))
                    continue
                except DeliveryError as exc:
                    if exc.server_trouble:
                        self._server_down(key, str(exc))
                    await recorder.record(_Result(mail, sent=False, error=str(exc), permanent=exc.permanent))
                    continue
                self._server_failures.pop(key, None)
                # Recorded (committed) before this connection sends the next mail.
                await recorder.record(_Result(mail, sent=True, error=note))
        finally:
            recorder.done_sending()
            # Kept for the next round (a session that failed was dropped above or closed itself).
            for key, transport in transports.items():
                self._idle_sessions.setdefault(key, []).append(transport)

    def _server_key(self, mailbox: str) -> str | None:
        route = self._servers.get(mailbox)
        if route is None:
            return None
        if isinstance(route, Path):
            return f"dir:{route}"
        return f"smtp:{route.host}:{route.port}:{route.user or ''}:{route.auth}"

    def _transport(self, mailbox: str) -> Transport:
        route = self._servers[mailbox]
        if isinstance(route, Path):
            return DirectoryTransport(route)
        if route.auth == "oauth2":
            assert route.oauth2 is not None and route.user is not None
            return SmtpTransport(route, self._tokens.get(route.oauth2, route.user, mailbox))
        return SmtpTransport(route)

    def _server_ready(self, mailbox: str) -> bool:
        key = self._server_key(mailbox)
        return key is not None and self._server_retry_at.get(key, 0.0) <= time.monotonic()

    def _server_down(self, key: str, error: str) -> None:
        failures = self._server_failures.get(key, 0) + 1
        self._server_failures[key] = failures
        delay = min(self.settings.first_retry_seconds * 2 ** (failures - 1), self.settings.max_retry_seconds)
        self._server_retry_at[key] = time.monotonic() + delay
        log.warning("outgoing mail server %s unavailable (%s); next try in %.0f s", key, error, delay)

    def _claim(self) -> list[Due]:
        """Take due mails nobody else has claimed (or whose claim ran out), for `outbox.claim_seconds`."""
        now = utcnow()
        claimed_at = time.monotonic()
        columns = (
            OutboxMail.id,
            OutboxMail.mailbox,
            OutboxMail.message_id,
            OutboxMail.envelope_from,
            OutboxMail.recipients,
            OutboxMail.raw,
            OutboxMail.attempts,
            OutboxMail.deliver_until,
        )
        send_by = claimed_at + self.settings.claim_seconds / 2
        with self.db.unit_of_work() as session:
            rows = session.execute(
                claim_rows(
                    select(*columns)
                    .where(
                        OutboxMail.status == OutboxStatus.PENDING,
                        OutboxMail.next_attempt_at <= now,
                        or_(OutboxMail.claimed_until.is_(None), OutboxMail.claimed_until <= now),
                    )
                    .order_by(OutboxMail.next_attempt_at, OutboxMail.id)
                    .limit(CLAIM_SIZE + len(self._in_flight))
                )
            )
            due = [
                Due(row_id, mailbox, message_id, sender, list(recipients), raw, attempts, until, send_by)
                for row_id, mailbox, message_id, sender, recipients, raw, attempts, until in rows
                if row_id not in self._in_flight
            ][:CLAIM_SIZE]
            if due:
                session.execute(
                    update(OutboxMail)
                    .where(OutboxMail.id.in_([mail.id for mail in due]))
                    .values(claimed_by=self.name, claimed_until=now + timedelta(seconds=self.settings.claim_seconds))
                )
        return due

    def _unclaim(self, ids: list[int]) -> None:
        with self.db.unit_of_work() as session:
            session.execute(
                update(OutboxMail)
                .where(OutboxMail.id.in_(ids), OutboxMail.claimed_by == self.name)
                .values(claimed_by=None, claimed_until=None)
            )


@dataclass(frozen=True, slots=True)
class _Result:
    mail: Due
    sent: bool
    error: str | None = None
    permanent: bool = False


class _SentAlready(Exception):
    """A "sent" mark found its mail already sent: the commit is redone mail by mail."""


def _note(result: _Result) -> str | None:
    return None if result.error is None else db_text(result.error, 2000)


class _Recorder:
    """Group commit: the outcomes of all connections that finish while one commit runs go into the next.

    A commit also waits, for at most GROUP_WAIT_SECONDS after its first outcome, until every connection
    still sending has an outcome in it. Committing at the first outcome made a commit for every 1.5 mails
    at 4 connections, and the commits cost the sender process as much CPU as its SMTP dialogues; with the
    wait the connections fall into step, about one commit for all four (bench/smtp_floor.py: 2,700
    commits instead of 7,000 for 10,000 mails, a third less CPU per mail, and faster, too: 5 ms waits
    cut the CPU a little more but cost throughput). Each connection still waits for the commit of its
    mail's outcome before it sends the next one."""

    def __init__(
        self,
        db: Database,
        settings: OutboxSettings,
        holder: str,
        recorded: Callable[[OutboxTally], None] | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.holder = holder  # our sender's name: the claims it holds carry it in `claimed_by`
        self.on_commit = recorded  # the daemon's metrics: what each commit recorded
        self._writer = db.held_writer()  # used on the database thread only
        self._pending: list[tuple[_Result, asyncio.Future[None]]] = []
        self.recorded: set[int] = set()  # the mails whose outcome is committed
        self._wakeup = asyncio.Event()
        self._closed = False
        self._sending = 0  # connections that may still record an outcome
        self._timer: asyncio.TimerHandle | None = None  # ends the wait for the other connections' outcomes
        self._waited = False

    def sending(self) -> None:
        """A connection starts: the commits wait for its outcomes too."""
        self._sending += 1

    def done_sending(self) -> None:
        self._sending -= 1
        self._wakeup.set()

    async def record(self, result: _Result) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self._pending:
            self._timer = loop.call_later(GROUP_WAIT_SECONDS, self._wait_over)
        self._pending.append((result, future))
        self._wakeup.set()
        await future

    async def close(self) -> None:
        self._closed = True
        self._wakeup.set()

    def _wait_over(self) -> None:
        self._waited = True
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._pending and not (self._closed or self._waited or len(self._pending) >= self._sending):
                continue  # the other connections' outcomes are due any moment (or the timer ends the wait)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._waited = False
            items, self._pending = self._pending, []
            if items:
                try:
                    tally = await self.db.run(self._write, [result for result, _ in items])
                except Exception as exc:
                    for _, future in items:
                        future.set_exception(exc)
                else:
                    for result, future in items:
                        self.recorded.add(result.mail.id)
                        future.set_result(None)
                    if self.on_commit is not None:  # counted once it is committed, never before
                        self.on_commit(tally)
            if self._closed and not self._pending:
                return

    def _write(self, results: list[_Result]) -> OutboxTally:
        """Record the outcomes in one commit (what each connection waits for) and return what it recorded.

        A late outcome must not undo another sender's work: this commit can come after our claim ran out
        (a slow commit, a stalled database) and another sender claimed the mail. "sent" is recorded whoever
        holds the claim now, as long as the mail is not already sent or bounced: the server has accepted it,
        so the mail must never go out again (the other sender's own outcome then finds it sent and is
        dropped). "retry" and "failed" are recorded only while the mail is still pending and claimed by us:
        otherwise the mail belongs to its new holder (or is done), and writing our retry would clear the
        new holder's claim for a third sender, or put a sent mail back into the queue.

        On a held Core connection: a commit carries one to a few mails, and an ORM session, a pool checkout
        or an expanding `IN` list rendered anew cost more than the statements do. The "sent" marks go in one
        executemany; only when its row count shows that one of them was sent already (by the sender that
        took the claim over) is the commit redone mail by mail, to count and log each."""
        try:
            return self._write_outcomes(results, sent_together=True)
        except _SentAlready:  # rolled back
            return self._write_outcomes(results, sent_together=False)

    def _write_outcomes(self, results: list[_Result], *, sent_together: bool) -> OutboxTally:
        now = utcnow()
        tally: OutboxTally = Counter()
        sent = [result for result in results if result.sent] if sent_together else []
        with self._writer.transaction() as connection:
            if sent:
                marks = [{"b_id": r.mail.id, "b_now": now, "b_error": _note(r)} for r in sent]
                if connection.execute(_MARK_SENT, marks).rowcount != len(sent):
                    raise _SentAlready
                for result in sent:
                    self._count(tally, result, "sent", applied=True)
            for result in results:
                if result.sent and sent_together:
                    continue
                if result.sent:
                    params = {"b_id": result.mail.id, "b_now": now, "b_error": _note(result)}
                    applied = connection.execute(_MARK_SENT, params).rowcount == 1
                    self._count(tally, result, "sent", applied=applied)
                    continue
                values = self._retry_values(result, now)
                params = {"b_id": result.mail.id, "b_holder": self.holder, **values}
                applied = connection.execute(_MARK_UNSENT, params).rowcount == 1
                outcome = "failed" if values["b_status"] == OutboxStatus.FAILED else "retry"
                self._count(tally, result, outcome, applied=applied)
        return tally

    def release(self) -> None:
        """Let the connection of the outcome commits go (on the database thread, after the last one)."""
        self._writer.close()

    @staticmethod
    def _count(tally: OutboxTally, result: _Result, outcome: str, *, applied: bool) -> None:
        if applied:
            tally[(result.mail.mailbox, outcome)] += 1
        elif outcome == "sent":
            log.info("outbox mail %s was sent again; it was already recorded sent", result.mail.message_id)
        else:
            log.warning(
                "outbox mail %s: its claim passed to another sender before this outcome (%s) was recorded; "
                "left to that sender",
                result.mail.message_id,
                outcome,
            )

    def _retry_values(self, result: _Result, now: datetime) -> dict[str, object]:
        mail = result.mail
        attempts = mail.attempts + 1
        delay = min(self.settings.first_retry_seconds * 2**mail.attempts, self.settings.max_retry_seconds)
        retry_at = now + timedelta(seconds=delay)
        error = db_text(result.error or "unknown error", 2000)
        if result.permanent or retry_at > mail.deliver_until:
            why = "refused for good" if result.permanent else f"still failing after {attempts} attempts"
            log.error("outbox mail %s to %s failed (%s): %s", mail.message_id, ", ".join(mail.recipients), why, error)
            return {"b_status": OutboxStatus.FAILED, "b_error": error, "b_next": now}
        log.warning("outbox mail %s not sent (%s); retry in %.0f s", mail.message_id, error, delay)
        return {"b_status": OutboxStatus.PENDING, "b_error": error, "b_next": retry_at}


_OUTBOX = OutboxMail.__table__
assert isinstance(_OUTBOX, Table)
# Pending, or failed by another sender's attempt after ours got in. Said as two inequalities: an IN on
# status would lead SQLite (no ANALYZE statistics) to scan the due index instead of looking the id up by
# primary key, and a NOT IN list is an "expanding" parameter, which executemany does not take.
_NOT_SENT_YET = and_(_OUTBOX.c.status != OutboxStatus.SENT, _OUTBOX.c.status != OutboxStatus.BOUNCED)
# Built once: the recorder runs them for every commit.
_MARK_SENT = (
    update(_OUTBOX)
    .where(_OUTBOX.c.id == bindparam("b_id"), _NOT_SENT_YET)
    .values(
        status=OutboxStatus.SENT,
        sent_at=bindparam("b_now"),
        attempts=_OUTBOX.c.attempts + 1,
        last_error=bindparam("b_error"),  # None, or a note such as some recipients refused
        claimed_by=None,
        claimed_until=None,
    )
)
_MARK_UNSENT = (
    update(_OUTBOX)
    .where(
        _OUTBOX.c.id == bindparam("b_id"),
        _OUTBOX.c.status == OutboxStatus.PENDING,
        _OUTBOX.c.claimed_by == bindparam("b_holder"),
    )
    .values(
        status=bindparam("b_status"),
        attempts=_OUTBOX.c.attempts + 1,
        last_error=bindparam("b_error"),
        next_attempt_at=bindparam("b_next"),
        claimed_by=None,
        claimed_until=None,
    )
)


async def _quietly_close(client: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(Exception):
        client.close()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
