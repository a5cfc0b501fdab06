"""Parsing on every core, with a time limit per mail.

MIME parsing is CPU work: done in the event loop it would starve IMAP IDLE, and done in one process it
would leave the second core idle during a backlog. Pebble kills a worker whose mail takes longer than
the limit (HTML with thousands of links, a decompression bomb) and starts a fresh one.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

from pebble import ProcessExpired, ProcessPool

from mailbridge.blobstore import BlobStore
from mailbridge.ingest.parse import ParsedMail, ParseError, parse


class StashError(Exception):
    """The parsed mail could not be written to the blob store (disk full, permissions)."""


@dataclass(frozen=True, slots=True)
class ParseFailure:
    stage: str  # "parse": the mail is at fault; "store": we are, and a retry may succeed
    reason: str

    @property
    def retryable(self) -> bool:
        return self.stage != "parse"


_stores: dict[tuple[str, bool], BlobStore] = {}


def parse_and_stash(raw: bytes, blob_root: str, fsync: bool) -> ParsedMail:
    """Worker side: parse, write the raw mail and its attachments to the blob store, return metadata."""
    mail = parse(raw)
    store = _stores.get((blob_root, fsync))
    if store is None:  # one per worker process, so it remembers which directories exist
        store = _stores[(blob_root, fsync)] = BlobStore(Path(blob_root), fsync=fsync)
    try:
        store.put(raw, mail.raw_sha256)
        for part in mail.attachments:
            assert part.payload is not None
            store.put(part.payload, part.sha256)
    except OSError as exc:
        raise StashError(f"cannot write to the blob store: {exc}") from None
    return mail.without_payloads()


class ParsePool:
    def __init__(self, *, workers: int, timeout: float, blob_root: Path, fsync: bool, max_message_bytes: int) -> None:
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._blob_root = str(blob_root)
        self._fsync = fsync
        # forkserver: the daemon has threads (the database thread) and a running loop; forking it is unsafe.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["mailbridge.ingest.parse_pool"])
        self._pool = ProcessPool(max_workers=workers, context=context)

    async def parse(self, raw: bytes) -> ParsedMail | ParseFailure:
        if len(raw) > self.max_message_bytes:
            return ParseFailure("parse", f"message of {len(raw)} bytes is larger than parsing.max_message_bytes")
        future = self._pool.schedule(parse_and_stash, args=(raw, self._blob_root, self._fsync), timeout=self.timeout)
        try:
            return await asyncio.wrap_future(future)
        except ParseError as exc:
            return ParseFailure("parse", str(exc))
        except FutureTimeout:
            return ParseFailure("parse", f"parsing took longer than {self.timeout:g} s and was stopped")
        except StashError as exc:
            return ParseFailure("store", str(exc))
        except ProcessExpired as exc:
            return ParseFailure("parse", f"the parser process died on this mail (exit code {exc.exitcode})")
        except Exception as exc:  # a bug of ours or mail-parser's: keep the mail, let a fixed version retry
            return ParseFailure("internal", f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        self._pool.close()
        self._pool.join(timeout=5)
        if self._pool.active:  # a worker still busy with a pathological mail: do not wait for it
            self._pool.stop()
            self._pool.join(timeout=5)
