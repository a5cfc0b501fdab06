"""Our Message-IDs carry a signature: <mb.TICKET.NONCE.HMAC@domain>. A reply that names one proves that its
sender received a mail of ours about that ticket; a guessed or altered one fails the check."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

_OURS = re.compile(r"^mb\.(\d{1,18})\.([0-9a-f]{12})\.([0-9a-f]{24})@", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class OurMessageId:
    ticket_id: int
    valid: bool  # False: it looks like ours, but the signature is wrong (guessed or altered)


def make_message_id(ticket_id: int | None, secret: bytes, domain: str) -> str:
    ticket = ticket_id or 0
    nonce = secrets.token_hex(6)
    return f"mb.{ticket}.{nonce}.{_sign(secret, ticket, nonce)}@{domain}"


def read_message_id(message_id: str, secret: bytes) -> OurMessageId | None:
    """None if it is not one of ours at all."""
    match = _OURS.match(message_id.strip().strip("<>"))
    if match is None:
        return None
    ticket, nonce, signature = int(match.group(1)), match.group(2).lower(), match.group(3).lower()
    return OurMessageId(ticket, hmac.compare_digest(_sign(secret, ticket, nonce), signature))


def _sign(secret: bytes, ticket: int, nonce: str) -> str:
    return hmac.new(secret, f"{ticket}.{nonce}".encode(), hashlib.sha256).hexdigest()[:24]
