"""What the parse stage hands on: plain frozen values, cheap to import and to pickle between processes.

The daemon's main process only ever sees these; the parsing libraries live in the worker processes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import Any, TypeVar

T = TypeVar("T")


def pickled_by_fields(cls: type[T]) -> type[T]:
    """Pickle a frozen slots dataclass as its class and its field values, unpickled by calling the class.

    What `dataclass(slots=True)` gives such a class instead is a Python `__getstate__`/`__setstate__` pair
    that calls `fields()` for every object and sets each field through `object.__setattr__`: the parse
    results of every mail (ParsedMail, its addresses and parts) cross from a worker to the daemon, and
    pickling them took 33 µs per mail in the worker and unpickling 40 µs in the daemon's main process
    (15 and 22 µs this way). The values are the same objects; every field is an `__init__` argument."""
    assert all(f.init for f in fields(cls))  # type: ignore[arg-type]
    values: Callable[[T], tuple[Any, ...]] = operator.attrgetter(*(f.name for f in fields(cls)))  # type: ignore[arg-type]

    def reduce(self: T) -> tuple[type[T], tuple[Any, ...]]:
        return cls, values(self)

    cls.__reduce__ = reduce  # type: ignore[assignment,method-assign]
    return cls


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Address:
    name: str
    address: str

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "address": self.address}


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Part:
    """An attachment or inline image. `payload` is dropped once the bytes are in the blob store."""

    filename: str
    content_type: str
    size: int
    sha256: str
    content_id: str | None
    inline: bool
    payload: bytes | None = field(default=None, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "filename": self.filename,
            "content_type": self.content_type,
            "size": self.size,
            "sha256": self.sha256,
            "content_id": self.content_id,
            "inline": self.inline,
        }


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """A mail that reports on another mail: a bounce, a delay notice, a read receipt, an abuse report."""

    report_type: str | None  # multipart/report's report-type (delivery-status, disposition-notification …)
    from_mail_system: bool  # sent by MAILER-DAEMON, postmaster …
    failed: tuple[str, ...]  # recipients that failed for good
    delayed: tuple[str, ...]  # recipients the mail system is still trying
    returned_message_ids: tuple[str, ...]  # the mail(s) it is about

    def as_json(self) -> dict[str, Any]:
        return {
            "report_type": self.report_type,
            "from_mail_system": self.from_mail_system,
            "failed": list(self.failed),
            "delayed": list(self.delayed),
            "returned_message_ids": list(self.returned_message_ids),
        }


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class ParsedMail:
    subject: str
    sender: Address | None
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    reply_to: tuple[Address, ...]
    date: datetime | None
    message_id: str | None
    in_reply_to: str | None
    references: tuple[str, ...]
    text: str
    html: str | None
    attachments: tuple[Part, ...]
    body_parts: int  # leaf parts that became text or html; with the attachments, every leaf of the mail
    defects: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]  # lower-cased names, decoded values, in order
    raw_sha256: str
    raw_size: int
    dedup_key: str
    report: DeliveryReport | None = None
    new_text: str | None = None  # a reply's text without the quoted history and signature; None: not a reply
    routing: Any = None  # the routing rules' Decision, made on the parser worker (None: not routed there)

    def header(self, name: str) -> str | None:
        """The first header of that (lower-case) name."""
        return next((value for key, value in self.headers if key == name), None)

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def routed(self, decision: Any) -> ParsedMail:
        return replace(self, routing=decision)

    def without_payloads(self) -> ParsedMail:
        return replace(self, attachments=tuple(replace(p, payload=None) for p in self.attachments))

    def as_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "from": self.sender.as_json() if self.sender else None,
            "to": [a.as_json() for a in self.to],
            "cc": [a.as_json() for a in self.cc],
            "reply_to": [a.as_json() for a in self.reply_to],
            "date": self.date.isoformat() if self.date else None,
            "message_id": self.message_id,
            "in_reply_to": self.in_reply_to,
            "references": list(self.references),
            "text": self.text,
            "html": self.html,
            "attachments": [p.as_json() for p in self.attachments],
            "body_parts": self.body_parts,
            "defects": list(self.defects),
            "sha256": self.raw_sha256,
            "size": self.raw_size,
            "report": self.report.as_json() if self.report else None,
            "new_text": self.new_text,
        }


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class ParseFailure:
    """Why a mail could not be parsed (or its parts not stored); it goes to quarantine with its raw bytes."""

    stage: str  # "parse": the mail is at fault; "store"/"internal": we are, and a retry may succeed
    reason: str

    @property
    def retryable(self) -> bool:
        return self.stage != "parse"


Parsed = ParsedMail | ParseFailure


def too_slow(timeout: float) -> ParseFailure:
    return ParseFailure("parse", f"parsing took longer than {timeout:g} s and was stopped")
