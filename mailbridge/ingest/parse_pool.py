"""Parsing on every core, with a time limit per mail.

MIME parsing is CPU work: done in the event loop it would starve IMAP IDLE, and done in one process it
would leave the second core idle during a backlog. Mails travel to the workers in chunks (one task per
mail costs the main process as much as recording the mail). Inside a worker each mail gets a soft time
limit (SIGALRM); Pebble kills a worker whose chunk overruns anyway (a C extension that never returns to
the interpreter, a decompression bomb), and that chunk is then parsed one mail per task to find the
culprit, which is quarantined.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import signal
from collections.abc import Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pebble import ProcessExpired, ProcessPool

from mailbridge.blobstore import BlobStore
from mailbridge.ingest.parse import ParsedMail, ParseError, parse

CHUNK = 8  # mails per task: enough to amortise the task overhead, few enough to keep both cores busy


class StashError(Exception):
    """The parsed mail could not be written to the blob store (disk full, permissions)."""


class _SoftTimeout(Exception):
    pass


@dataclass(frozen=True, slots=True)
class ParseFailure:
    stage: str  # "parse": the mail is at fault; "store"/"internal": we are, and a retry may succeed
    reason: str

    @property
    def retryable(self) -> bool:
        return self.stage != "parse"


Parsed = ParsedMail | ParseFailure

# --- worker side ----------------------------------------------------------------------------------

_stores: dict[str, BlobStore] = {}


def _store(blob_root: str) -> BlobStore:
    store = _stores.get(blob_root)
    if store is None:  # one per worker process, so it remembers which directories exist
        store = _stores[blob_root] = BlobStore(Path(blob_root))
    return store


def parse_and_stash(raw: bytes, blob_root: str) -> ParsedMail:
    """Parse, write the raw mail and its attachments to the blob store, return the metadata."""
    mail = parse(raw)
    store = _store(blob_root)
    try:
        store.put(raw, mail.raw_sha256)
        for part in mail.attachments:
            assert part.payload is not None
            store.put(part.payload, part.sha256)
    except OSError as exc:
        raise StashError(f"cannot write to the blob store: {exc}") from None
    return mail.without_payloads()


def parse_chunk(raws: Sequence[bytes], blob_root: str, fsync: bool, timeout: float) -> list[Parsed]:
    results: list[Parsed] = []
    for raw in raws:
        try:
            with _soft_limit(timeout):
                results.append(parse_and_stash(raw, blob_root))
        except _SoftTimeout:
            results.append(_too_slow(timeout))
        except Exception as exc:
            results.append(_failure(exc))
    if fsync:
        # Durable before the worker answers, hence before the commit and the IMAP move that follow.
        try:
            _store(blob_root).sync()
        except OSError as exc:
            failed = ParseFailure("store", f"cannot sync the blob store: {exc}")
            results = [failed if isinstance(r, ParsedMail) else r for r in results]
    return results


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


def _too_slow(timeout: float) -> ParseFailure:
    return ParseFailure("parse", f"parsing took longer than {timeout:g} s and was stopped")


def _failure(exc: BaseException) -> ParseFailure:
    if isinstance(exc, ParseError):
        return ParseFailure("parse", str(exc))
    if isinstance(exc, StashError):
        return ParseFailure("store", str(exc))
    if isinstance(exc, RecursionError):
        return ParseFailure("parse", "MIME structure nested too deeply to parse")
    # A bug of ours or of a library: keep the mail, let a fixed version retry it.
    return ParseFailure("internal", f"{type(exc).__name__}: {exc}")


# --- daemon side ----------------------------------------------------------------------------------


class ParsePool:
    def __init__(self, *, workers: int, timeout: float, blob_root: Path, fsync: bool, max_message_bytes: int) -> None:
        self.workers = workers
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._blob_root = str(blob_root)
        self._fsync = fsync
        # forkserver: the daemon has threads (the database thread) and a running loop; forking it is unsafe.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["mailbridge.ingest.parse_pool"])
        self._pool = ProcessPool(max_workers=workers, context=context)

    async def parse(self, raw: bytes) -> Parsed:
        return (await self.parse_many([raw]))[0]

    async def parse_many(self, raws: Sequence[bytes]) -> list[Parsed]:
        """Parse mails on the workers, in chunks spread over every worker; results in input order."""
        results: list[Parsed | None] = [None] * len(raws)
        todo: list[int] = []
        for index, raw in enumerate(raws):
            if len(raw) > self.max_message_bytes:
                results[index] = ParseFailure(
                    "parse", f"message of {len(raw)} bytes is larger than parsing.max_message_bytes"
                )
            else:
                todo.append(index)
        size = max(1, min(CHUNK, math.ceil(len(todo) / self.workers)))
        chunks = [todo[start : start + size] for start in range(0, len(todo), size)]
        done = await asyncio.gather(*(self._parse_chunk([raws[i] for i in chunk]) for chunk in chunks))
        for chunk, parsed in zip(chunks, done, strict=True):
            for index, result in zip(chunk, parsed, strict=True):
                results[index] = result
        return [r for r in results if r is not None]

    async def _parse_chunk(self, raws: list[bytes]) -> list[Parsed]:
        # The hard limit is the backstop for what SIGALRM cannot interrupt.
        hard_limit = self.timeout * (len(raws) + 1)
        future = self._pool.schedule(
            parse_chunk, args=(raws, self._blob_root, self._fsync, self.timeout), timeout=hard_limit
        )
        try:
            return await asyncio.wrap_future(future)
        except (FutureTimeout, ProcessExpired) as exc:
            if len(raws) > 1:  # find the mail that did it; the others are parsed normally
                singles = await asyncio.gather(*(self._parse_chunk([raw]) for raw in raws))
                return [result for single in singles for result in single]
            if isinstance(exc, ProcessExpired):
                return [ParseFailure("parse", f"the parser process died on this mail (exit code {exc.exitcode})")]
            return [_too_slow(self.timeout)]

    def close(self) -> None:
        self._pool.close()
        self._pool.join(timeout=5)
        if self._pool.active:  # a worker still busy with a pathological mail: do not wait for it
            self._pool.stop()
            self._pool.join(timeout=5)
