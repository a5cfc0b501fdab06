"""Fetch stage for a local Maildir: the demo mailbox, or mail an MTA delivers into a directory.

Stored mail is moved to the `.Processed` subfolder and quarantined mail to `.Quarantine` (Maildir++),
after the commit, just as the IMAP watcher moves mail on the server. Mail that was already in the Maildir
when the mailbox was first seen is a backlog, as in IMAP: no acknowledgement unless `acknowledge_backlog`.
A Maildir has no UIDs, so "already there" is told by the file's mtime (when it was written) against the
moment the mailbox was first seen, until the first drain has completed; a restart in between keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from mailbridge.config import FetchSettings, MaildirMailbox
from mailbridge.ingest.imap_client import wait_for_stop
from mailbridge.ingest.ledger import FolderCount, Ledger
from mailbridge.ingest.raw import BACKLOG, RawMail
from mailbridge.leases import LeaseLost
from mailbridge.models import Outcome
from mailbridge.pipeline import Pipeline, Result

log = logging.getLogger("mailbridge.maildir")

PROCESSED = ".Processed"
QUARANTINE = ".Quarantine"


def ensure_maildir(path: Path) -> None:
    for sub in ("new", "cur", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)


class MaildirWatcher:
    def __init__(self, box: MaildirMailbox, pipeline: Pipeline, ledger: Ledger, fetch: FetchSettings) -> None:
        self.box = box
        self.pipeline = pipeline
        self.ledger = ledger
        self.settings = fetch

    @property
    def name(self) -> str:
        return self.box.name

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._watch(stop)
        finally:
            with contextlib.suppress(Exception):
                await self.ledger.disconnected()

    async def _watch(self, stop: asyncio.Event) -> None:
        delay = 1.0
        healthy = False
        while not stop.is_set():
            try:
                if not healthy:  # at start, or after a failure: reachable again, so `status` drops the error
                    ensure_maildir(self.box.path)
                    await self.ledger.connected()
                    healthy = True
                await self.run_once(stop)
                delay = 1.0
            except LeaseLost as exc:  # another instance fetches this mailbox now
                log.warning("maildir %s: %s; stopping", self.name, exc)
                return
            except Exception as exc:  # this mailbox backs off and retries; the others go on regardless
                expected = isinstance(exc, OSError)  # permission denied, a file where a folder should be …
                log.warning("maildir %s: %s; retrying in %.0f s", self.name, exc, delay, exc_info=not expected)
                with contextlib.suppress(Exception):  # the database may be what failed
                    await self.ledger.failed(f"{type(exc).__name__}: {exc}")
                healthy = False
                await wait_for_stop(stop, delay)
                delay = min(delay * 2, self.settings.reconnect_max_seconds)
                continue
            await wait_for_stop(stop, self.box.poll_interval)

    async def run_once(self, stop: asyncio.Event | None = None) -> None:
        ensure_maildir(self.box.path)
        cutoff = await self.ledger.backlog_cutoff()
        files = self._waiting()
        known = await self.ledger.outcomes([_key(self.name, f) for f in files])
        # Stored before a crash but not yet moved: just move them now.
        await self._move([(f, known[_key(self.name, f)]) for f in files if _key(self.name, f) in known])
        fresh = [f for f in files if _key(self.name, f) not in known]
        size = self.settings.batch_size
        path_of = {_key(self.name, f): f for f in fresh}

        async def batches() -> AsyncGenerator[list[RawMail], None]:
            for start in range(0, len(fresh), size):
                if stop is not None and stop.is_set():
                    return  # the batches in hand are still finished
                yield [self._raw(f, cutoff) for f in fresh[start : start + size]]

        async def committed(results: list[Result]) -> None:
            await self._move([(path_of[r.raw.source_key or ""], r.outcome) for r in results])

        await self.pipeline.process_stream(batches(), committed)
        if cutoff is not None and not (stop is not None and stop.is_set()):
            await self.ledger.initial_import_done()
        await self.ledger.fetched(await self._count_folder())

    async def _count_folder(self) -> FolderCount:
        """What is left in new/ and cur/ after a pass, against our receipts: a file without one is waiting
        (every pass takes every file without a receipt, so none is ever passed over for good)."""
        files = self._waiting()
        known = await self.ledger.outcomes([_key(self.name, f) for f in files]) if files else {}
        return FolderCount(in_folder=len(files), waiting=len(files) - len(known), missing=0, left_by_existing_mail=0)

    def _waiting(self) -> list[Path]:
        files: list[Path] = []
        for sub in ("new", "cur"):
            files += [p for p in (self.box.path / sub).iterdir() if p.is_file() and not p.name.startswith(".")]
        return sorted(files, key=lambda p: p.name)

    def _raw(self, path: Path, backlog_cutoff: datetime | None) -> RawMail:
        backlog = backlog_cutoff is not None and _written_at(path) <= backlog_cutoff
        return RawMail(
            mailbox=self.name,
            source=f"maildir://{self.name}/{path.name}",
            data=path.read_bytes(),
            source_key=_key(self.name, path),
            quiet=BACKLOG if backlog and not self.box.acknowledge_backlog else None,
        )

    async def _move(self, items: Sequence[tuple[Path, Outcome]]) -> None:
        keys = []
        for path, outcome in items:
            folder = self.box.path / (QUARANTINE if outcome is Outcome.QUARANTINED else PROCESSED)
            ensure_maildir(folder)
            target = folder / "cur" / (path.name if ":2," in path.name else f"{path.name}:2,S")
            if path.exists():
                os.replace(path, target)
            keys.append(_key(self.name, path))
        await self.pipeline.mark_server_done(keys)


def _key(mailbox: str, path: Path) -> str:
    # The unique part of a Maildir name is everything before the ":2,flags" info suffix.
    return f"{mailbox}/{path.name.split(':', 1)[0]}"


def _written_at(path: Path) -> datetime:
    # Delivery writes the file in tmp/ and renames it into new/: a rename keeps the mtime of the write.
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)
