"""Shared pieces for tests against the real Dovecot: settings that point at it, sample mails, waiting."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select

from mailbridge.app import App, build_app
from mailbridge.config import load_settings
from mailbridge.models import Article, Ticket, TicketEvent
from tests.support.dovecot import Dovecot, MailUser

_counter = itertools.count(1)


def sample_mail(subject: str | None = None, sender: str = "klient@example.com", body: str = "Dzień dobry") -> bytes:
    n = next(_counter)
    msg = EmailMessage()
    msg["From"] = f"Klient {n} <{sender}>"
    msg["To"] = "support@helpdesk.example"
    msg["Subject"] = subject or f"Zgłoszenie {n}"
    msg["Date"] = format_datetime(__import__("datetime").datetime.now().astimezone())
    msg["Message-ID"] = make_msgid(domain="client.example")
    msg.set_content(f"{body} #{n}\n")
    return msg.as_bytes()


def append_many(server: Dovecot, user: MailUser, mails: list[bytes]) -> None:
    """APPEND over one connection: a login per mail (`Dovecot.append`) costs about 0.1 s."""
    with server.imap(user.name) as conn:
        for raw in mails:
            status, data = conn.append("INBOX", None, None, raw)
            assert status == "OK", data


def imap_box(server: Dovecot, user: MailUser, **extra: Any) -> dict[str, Any]:
    return {
        "name": user.name,
        "host": server.host,
        "port": server.port,
        "security": "none",
        "user": user.name,
        "password": user.password,
        "timeout": 10,
        **extra,
    }


def write_config(tmp_path: Path, boxes: list[dict[str, Any]], **top: Any) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "mailbridge.yaml"
    data = {
        "data_dir": str(tmp_path / "data"),
        "storage": {"fsync": False},
        "parsing": {"workers": 2},
        "fetch": {"reconnect_max_seconds": 1},
        "shutdown_grace_seconds": 5,
        "mailboxes": boxes,
        **top,
    }
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


@contextlib.asynccontextmanager
async def daemon(app: App) -> AsyncIterator[asyncio.Event]:
    """`app.run` on this loop until the block ends (then stopped, drained and closed)."""
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        app.close()


def make_app(tmp_path: Path, boxes: list[dict[str, Any]], **top: Any) -> App:
    app = build_app(load_settings(write_config(tmp_path, boxes, **top)))
    app.prepare()
    return app


async def deliver(app: App, tmp_path: Path, *mails: bytes) -> dict[str, int]:
    """Ingest `mails` into the mailbox "support" through the real pipeline, then send what it queued."""
    folder = tmp_path / f"in-{next(_counter)}"
    folder.mkdir()
    for index, raw in enumerate(mails):
        (folder / f"{index}.eml").write_bytes(raw)
    summary = await app.ingest([folder], mailbox="support")
    await app.sender.deliver_due()
    return summary.as_json()


def tickets(app: App) -> list[Ticket]:
    with app.db.reader() as session:
        return list(session.scalars(select(Ticket).order_by(Ticket.id)))


def articles(app: App, ticket_id: int) -> list[Article]:
    with app.db.reader() as session:
        return list(session.scalars(select(Article).where(Article.ticket_id == ticket_id).order_by(Article.id)))


def history(app: App, ticket_id: int) -> list[tuple[str, str | None, str | None]]:
    with app.db.reader() as session:
        events = session.scalars(select(TicketEvent).where(TicketEvent.ticket_id == ticket_id).order_by(TicketEvent.id))
        return [(e.kind, e.old, e.new) for e in events]


def new_user(server: Dovecot, prefix: str = "box") -> MailUser:
    return server.add_user(f"{prefix}{next(_counter)}", "pw-" + str(next(_counter)))


def count(app: App, sql: str) -> int:
    from sqlalchemy import text

    with app.db.reader() as session:
        return int(session.execute(text(sql)).scalar_one())


async def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """Seconds it took for `predicate` to hold; fails the test after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
    return time.monotonic() - start
