"""Log lines a human can read: one line per event, with the message's facts as key=value pairs; or, for a
log collector, one JSON object per line (time, level, logger, message, mailbox and the message's facts)."""

from __future__ import annotations

import contextvars
import enum
import logging
import sys

from pythonjsonlogger.json import JsonFormatter

_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

# The mailbox the current task works for: set on each watcher's task, so every line it logs names it.
MAILBOX: contextvars.ContextVar[str | None] = contextvars.ContextVar("mailbox", default=None)


class LogFormat(enum.StrEnum):
    text = "text"
    json = "json"


def mailbox_context(name: str) -> contextvars.Context:
    """A context for a mailbox's task (`asyncio.create_task(..., context=...)`)."""
    context = contextvars.copy_context()
    context.run(MAILBOX.set, name)
    return context


class _MailboxField(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "mailbox", None) is None and (mailbox := MAILBOX.get()) is not None:
            record.mailbox = mailbox
        return True


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD and v is not None}
        if extras:
            line += " " + " ".join(f"{k}={_quote(v)}" for k, v in extras.items())
        return line


def _quote(value: object) -> str:
    text = str(value)
    return repr(text) if (" " in text or not text) else text


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is logged (test runners swap it)."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def setup_logging(level: str = "INFO", log_format: str = "text") -> None:
    handler = _CurrentStderr()
    handler.addFilter(_MailboxField())
    if LogFormat(log_format) is LogFormat.json:
        handler.setFormatter(
            JsonFormatter(
                ["levelname", "name", "message"],
                rename_fields={"levelname": "level", "name": "logger"},
                timestamp="time",  # ISO 8601, UTC
                json_ensure_ascii=False,
            )
        )
    else:
        handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aioimaplib logs every line it sends and receives at DEBUG, message bodies included.
    logging.getLogger("aioimaplib").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # msal logs its token requests and cache look-ups at DEBUG; nothing of a token belongs in our logs.
    logging.getLogger("msal").setLevel(logging.WARNING)
    # APScheduler logs each run of the SLA check; the check logs what it did itself.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # aiosmtpd (the LMTP server) logs every connection and recipient at INFO, and the mail's lines at DEBUG.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
