"""Quarantine: a mail we could not parse or store is kept whole, with its raw bytes and the reason."""

from __future__ import annotations

import hashlib
import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailbridge.ingest.raw import RawMail
from mailbridge.models import QuarantinedMail, db_text

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*<?([^\s<>]+)>?", re.IGNORECASE | re.MULTILINE)


def quarantine(session: Session, raw: RawMail, *, stage: str, reason: str, retryable: bool) -> QuarantinedMail:
    match = _MESSAGE_ID.search(raw.data[:65536])  # best effort: the mail may be too broken to parse
    item = QuarantinedMail(
        mailbox=raw.mailbox,
        source=db_text(raw.source),
        stage=stage,
        reason=db_text(reason, 10_000),
        retryable=retryable,
        raw=raw.data,
        sha256=hashlib.sha256(raw.data).hexdigest(),
        size=len(raw.data),
        message_id=db_text(match.group(1).decode("utf-8", "replace"), 998) if match else None,
    )
    session.add(item)
    session.flush()
    return item


def list_quarantined(session: Session, *, include_resolved: bool = False) -> list[QuarantinedMail]:
    query = select(QuarantinedMail).order_by(QuarantinedMail.id)
    if not include_resolved:
        query = query.where(QuarantinedMail.resolved_at.is_(None))
    return list(session.scalars(query))
