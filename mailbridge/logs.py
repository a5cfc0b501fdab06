"""Log lines a human can read: one line per event, with the message's facts as key=value pairs."""

from __future__ import annotations

import logging
import sys

_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


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


def setup_logging(level: str = "INFO") -> None:
    handler = _CurrentStderr()
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
