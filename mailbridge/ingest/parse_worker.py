"""The worker-process side of the parse pool: parse a chunk of mails, each under a soft time limit, and
write their raw bytes and attachments to the blob store. Imported only in the worker processes (and by
`mailbridge parse`), so the daemon's main process never loads the parsing libraries."""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailbridge.blobstore import BlobStore
from mailbridge.ingest.mail import Parsed, ParsedMail, ParseFailure, too_slow
from mailbridge.ingest.parse import ParseError, parse
from mailbridge.threading.ticket_refs import TicketRefs

if TYPE_CHECKING:
    from mailbridge.routing import RuleSet


class StashError(Exception):
    """The parsed mail could not be written to the blob store (disk full, permissions)."""


class _SoftTimeout(BaseException):
    # BaseException: the parsing code catches Exception in places to recover from broken input, and
    # must not recover from its own time limit.
    pass


_stores: dict[str, BlobStore] = {}


def _store(blob_root: str) -> BlobStore:
    store = _stores.get(blob_root)
    if store is None:  # one per worker process, so it remembers which directories exist
        store = _stores[blob_root] = BlobStore(Path(blob_root))
    return store


_ticket_refs: TicketRefs | None = None  # how our tickets are named (set up by the pool's initializer)


def set_up_ticket_refs(ticket_refs: TicketRefs | None) -> None:
    global _ticket_refs
    _ticket_refs = ticket_refs


def parse_and_stash(raw: bytes, blob_root: str) -> ParsedMail:
    """Parse, write the raw mail and its attachments to the blob store, return the metadata."""
    mail = parse(raw, _ticket_refs)
    store = _store(blob_root)
    try:
        store.put(raw, mail.raw_sha256)
        for part in mail.attachments:
            assert part.payload is not None
            store.put(part.payload, part.sha256)
    except OSError as exc:
        raise StashError(f"cannot write to the blob store: {exc}") from None
    return mail.without_payloads()


_router: Any = None  # this worker's routing rules (set up by the pool's initializer)


def set_up_routing(routing: RuleSet | None) -> None:
    """The routing rules, compiled by the daemon, for this worker: routing is CPU work too, and runs beside
    parsing."""
    global _router
    if routing is not None and routing.rules:
        from mailbridge.routing import Router

        _router = Router(routing)


def parse_chunk(
    raws: Sequence[bytes], blob_root: str, fsync: bool, timeout: float, mailboxes: Sequence[str] | None = None
) -> list[Parsed]:
    results: list[Parsed] = []
    for index, raw in enumerate(raws):
        result: Parsed
        try:
            with _soft_limit(timeout):
                result = parse_and_stash(raw, blob_root)
                if _router is not None and mailboxes is not None:
                    result = result.routed(_router.by_rules(result, mailboxes[index], explain=False))
        except _SoftTimeout:
            result = too_slow(timeout)
        except Exception as exc:
            result = _failure(exc)
        results.append(result)
    if fsync:
        # Durable before the worker answers, hence before the commit and the IMAP move that follow.
        try:
            _store(blob_root).sync()
        except OSError as exc:
            failed = ParseFailure("store", f"cannot sync the blob store: {exc}")
            results = [failed if isinstance(r, ParsedMail) else r for r in results]
    return results


def ignore_stop_signals() -> None:
    """Worker initializer: Ctrl-C and systemd's SIGTERM reach the whole process group, but only the
    daemon decides when to stop; it finishes the mails in hand and then closes the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextmanager
def _soft_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise _SoftTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _failure(exc: BaseException) -> ParseFailure:
    if isinstance(exc, ParseError):
        return ParseFailure("parse", str(exc))
    if isinstance(exc, StashError):
        return ParseFailure("store", str(exc))
    if isinstance(exc, RecursionError):
        return ParseFailure("parse", "MIME structure nested too deeply to parse")
    # A bug of ours or of a library: keep the mail, let a fixed version retry it.
    return ParseFailure("internal", f"{type(exc).__name__}: {exc}")
