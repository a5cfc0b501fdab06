"""RawMail: the bytes of one mail and where they came from, as every source hands them to the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field

BACKLOG = "already in the mailbox before its first run (acknowledge_backlog is off)"


@dataclass(frozen=True, slots=True)
class RawMail:
    mailbox: str  # the configured mailbox (the channel), or "import" for `mailbridge ingest`
    source: str  # for humans and logs: imap://support/INBOX;UIDVALIDITY=7;UID=42, a file path …
    data: bytes = field(repr=False)
    # Unique per mail at its source, so a mail fetched again after a crash is recognised; None for imports.
    source_key: str | None = None
    uidvalidity: int | None = None
    uid: int | None = None
    # Why this mail must get no automatic answer whatever it is ("imported with --no-notify", a backlog).
    quiet: str | None = None
    # Nothing is done at the source after the commit: the LMTP reply that follows it is all the MTA is told
    # (and a delivery retried after a lost reply finds its receipt).
    nothing_to_tell: bool = False
