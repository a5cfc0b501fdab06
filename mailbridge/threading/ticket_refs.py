"""Ticket references as our mails write them (`[MB-000123]`, from `tickets.reference_format`), found again in
the subject and in the quoted footer of a reply.

The subject rule accepts what we emit and what mail clients and gateways plausibly turn it into: prefixes
and tags around it (`Re:`, `AW:`, `[EXTERNAL]`) are simply other text; the brackets may be changed, spaced or
gone (`( MB-000123 )`, `MB-000123`); the "-" may become "#" or ":" or get spaces. It never accepts a bare
"MB" next to a number the way people write sizes and counts ("25 MB 2 razy", "10MB-3", "mb-2 files"): the
prefix must be joined to the number by "-", "#" or ":", and the number must either have the zero-padded
width we emit or sit in brackets right after the prefix (`[MB-123]`, typed by hand).

The footer rule is the configured reference format itself, as our templates render it.

Pure and cheap (a regular expression each): the parser workers use it to tell replies from new mail, the
thread stage to find the ticket a reply names.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parser workers use this module; they need not load pydantic for a type
    from mailbridge.config import TicketSettings

_SEPARATOR = r"\s*[-#:]\s*"
# In brackets a number of any width is taken, but not after ":", which is how sizes and counts are
# annotated ("Załącznik (MB: 25)").
_BRACKETED_SEPARATOR = r"\s*[-#]\s*"
_OPEN, _CLOSE = r"[\[({]", r"[\])}]"
_MAX_DIGITS = 12


class TicketRefs:
    def __init__(self, tickets: TicketSettings) -> None:
        prefix = re.escape(tickets.number_prefix)
        padded = rf"\d{{{tickets.number_digits},{_MAX_DIGITS}}}"
        self._subject = re.compile(
            rf"{_OPEN}\s*{prefix}{_BRACKETED_SEPARATOR}(?P<bracketed>\d{{1,{_MAX_DIGITS}}})\s*{_CLOSE}"
            rf"|(?<![A-Za-z0-9]){prefix}{_SEPARATOR}(?P<bare>{padded})(?![A-Za-z0-9])",
            re.IGNORECASE,
        )
        before, after = tickets.reference_format.split("{number}")
        # Delimiters on both sides make the number unambiguous at any width (a hand-typed "[MB-123]" or one
        # written before number_digits was raised); otherwise it must be as wide as we write it.
        digits = rf"\d{{1,{_MAX_DIGITS}}}" if before.strip() and after.strip() else padded
        self._footer = re.compile(
            (_literal(before) or r"(?<![A-Za-z0-9])")
            + rf"{prefix}-(?P<number>{digits})"
            + (_literal(after) or r"(?![0-9])"),
            re.IGNORECASE,
        )

    def in_subject(self, subject: str) -> int | None:
        """The ticket number the subject names, if it names one."""
        match = self._subject.search(subject)
        return int(match.group("bracketed") or match.group("bare")) if match else None

    def in_footer(self, text: str) -> int | None:
        """The ticket number of a footer of ours quoted in a mail's text."""
        match = self._footer.search(text)
        return int(match.group("number")) if match else None


def _literal(text: str) -> str:
    # Quoting and re-wrapping may change the spaces in the format's text, never its other characters.
    return r"\s+".join(re.escape(piece) for piece in re.split(r"\s+", text))
