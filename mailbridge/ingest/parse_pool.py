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
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TYPE_CHECKING

from pebble import ProcessExpired, ProcessPool

from mailbridge.ingest.mail import Parsed, ParseFailure, too_slow

if TYPE_CHECKING:
    from mailbridge.routing import RuleSet
    from mailbridge.threading.ticket_refs import TicketRefs

CHUNK = 25  # mails per task: amortises the task overhead and the syncfs; batches still spread over workers
MAX_TASKS_PER_WORKER = 40
WORKER_MODULE = "mailbridge.ingest.parse_worker"


def _init_worker(routing: RuleSet | None = None, ticket_refs: TicketRefs | None = None) -> None:
    from mailbridge.ingest.parse_worker import ignore_stop_signals, set_up_routing, set_up_ticket_refs

    ignore_stop_signals()
    set_up_routing(routing)
    set_up_ticket_refs(ticket_refs)


class ParserStopped(Exception):
    """A parser process was stopped from outside (not by its mail): record nothing, fetch again later."""


def _parse_chunk_in_worker(
    raws: Sequence[bytes], blob_root: str, fsync: bool, timeout: float, mailboxes: Sequence[str] | None
) -> list[Parsed]:
    # Imported here, in the worker (the forkserver preloads it), not in the daemon's main process.
    from mailbridge.ingest.parse_worker import parse_chunk

    return parse_chunk(raws, blob_root, fsync, timeout, mailboxes)


def _started() -> None:
    pass


class ParsePool:
    def __init__(
        self,
        *,
        workers: int,
        timeout: float,
        blob_root: Path,
        fsync: bool,
        max_message_bytes: int,
        routing: RuleSet | None = None,  # the workers route what they parse (`RuleSet.for_workers`)
        ticket_refs: TicketRefs | None = None,  # mail naming one of our tickets is a reply: its new text is found
    ) -> None:
        self.workers = workers
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._blob_root = str(blob_root)
        self._fsync = fsync
        # forkserver: the daemon has threads (the database thread) and a running loop; forking it is unsafe.
        context = multiprocessing.get_context("forkserver")
        # The routing module (light: no pydantic) is preloaded once in the forkserver instead of imported
        # again by every recycled worker.
        routing = routing if routing is not None and routing.rules else None
        context.set_forkserver_preload([WORKER_MODULE, *(["mailbridge.routing"] if routing else [])])
        # Recycling workers now and then caps their memory high-water mark (CPython keeps freed arenas).
        self._pool = ProcessPool(
            max_workers=workers,
            max_tasks=MAX_TASKS_PER_WORKER,
            initializer=_init_worker,
            initargs=(routing, ticket_refs),
            context=context,
        )

    def start(self) -> None:
        """Start the worker processes now rather than with the first mail. This blocks while the forkserver
        imports the parsing libraries (a few tenths of a second), so the daemon calls it while its schema
        migration runs in a child process on the other core."""
        self._pool.schedule(_started)

    async def parse(self, raw: bytes, mailbox: str | None = None) -> Parsed:
        return (await self.parse_many([raw], None if mailbox is None else [mailbox]))[0]

    async def parse_many(self, raws: Sequence[bytes], mailboxes: Sequence[str] | None = None) -> list[Parsed]:
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
        done = await asyncio.gather(
            *(
                self._parse_chunk(
                    [raws[i] for i in chunk], None if mailboxes is None else [mailboxes[i] for i in chunk]
                )
                for chunk in chunks
            )
        )
        for chunk, parsed in zip(chunks, done, strict=True):
            for index, result in zip(chunk, parsed, strict=True):
                results[index] = result
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    async def _parse_chunk(self, raws: list[bytes], mailboxes: list[str] | None = None) -> list[Parsed]:
        # The hard limit is the backstop for what SIGALRM cannot interrupt.
        hard_limit = self.timeout * (len(raws) + 1)
        future = self._pool.schedule(
            _parse_chunk_in_worker,
            args=(raws, self._blob_root, self._fsync, self.timeout, mailboxes),
            timeout=hard_limit,
        )
        try:
            return await asyncio.wrap_future(future)
        except (FutureTimeout, ProcessExpired) as exc:
            if isinstance(exc, ProcessExpired) and exc.exitcode in (-signal.SIGTERM, -signal.SIGINT):
                raise ParserStopped(f"parser process stopped by signal {-exc.exitcode}") from None
            if len(raws) > 1:  # find the mail that did it; the others are parsed normally
                singles = await asyncio.gather(
                    *(
                        self._parse_chunk([raw], None if mailboxes is None else [mailboxes[i]])
                        for i, raw in enumerate(raws)
                    )
                )
                return [result for single in singles for result in single]
            if isinstance(exc, ProcessExpired):
                return [ParseFailure("parse", f"the parser process died on this mail (exit code {exc.exitcode})")]
            return [too_slow(self.timeout)]

    def close(self) -> None:
        self._pool.close()
        try:
            self._pool.join(timeout=5)
        except TimeoutError:  # a worker still busy with a pathological mail: do not wait for it
            self._pool.stop()
            self._pool.join()
