"""The outbox sender in a process of its own. SMTP sessions and the commit after each sent mail cost about
a millisecond of CPU per mail; on the daemon's main process that competes with IMAP and the intake's
database work for one core (and one GIL), on its own process it uses the second core.

The daemon talks to it over a pipe: "wake" after a commit that put mail in the outbox, "finish" (deliver
what is due, then exit: `run --once`) or "stop" (finish the mails in hand, then exit). When the daemon
dies, the pipe breaks and the sender stops as if told "stop": the mails it is sending are recorded, the
rest of its claim is given back, and it exits (killed after ORPHAN_SECONDS if that hangs). Dying with the
daemon instead would leave mails the SMTP server had accepted unrecorded, and another instance (or the
restarted daemon) would send them again; next to a restarted daemon the claims keep the two apart.

With `on_report` (the daemon's /metrics), the sender sends back over the same pipe what each commit of
outcomes recorded (mails sent, to retry, failed), after that commit: the counters live in the daemon,
which serves them, and a mail is counted once however often its batch is claimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from mailbridge.config import Settings

if TYPE_CHECKING:
    from mailbridge.db import Database
    from mailbridge.notify.sender import OutboxTally

log = logging.getLogger("mailbridge.outbox")

WAKE, FINISH, STOP = "wake", "finish", "stop"
ORPHAN_SECONDS = 15.0  # an orphaned sender that has not finished its mails in flight by then is gone anyway


class SenderProcess:
    def __init__(self, settings: Settings, on_report: Callable[[OutboxTally], None] | None = None) -> None:
        context = multiprocessing.get_context("forkserver")  # the daemon has threads: no plain fork
        self._conn, child_end = context.Pipe()
        self._process = context.Process(
            target=_main, args=(settings, child_end, on_report is not None), name="mailbridge-outbox", daemon=True
        )
        self._child_end = child_end
        self._on_report = on_report
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self._process.start()
        self._child_end.close()
        if self._on_report is not None:
            self._reader = threading.Thread(target=self._read_reports, name="outbox-reports", daemon=True)
            self._reader.start()

    def _read_reports(self) -> None:
        assert self._on_report is not None
        while True:
            try:
                tally = self._conn.recv()
            except (EOFError, OSError):  # the sender has exited
                return
            self._on_report(Counter(tally))

    def wake(self) -> None:
        self._send(WAKE)

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    async def finish(self, timeout: float | None = None) -> None:
        """Deliver everything due, then exit (`run --once`)."""
        await self._end(FINISH, timeout)

    async def stop(self, timeout: float) -> None:
        """Finish the mails in hand and exit; killed if it takes longer than `timeout`."""
        await self._end(STOP, timeout)

    async def _end(self, command: str, timeout: float | None) -> None:
        self._send(command)
        await asyncio.get_running_loop().run_in_executor(None, self._process.join, timeout)
        if self._process.is_alive():
            log.warning("the outbox sender did not stop in time; killing it (mails in flight are sent again)")
            self._process.kill()
            self._process.join()
        if self._reader is not None:  # the last reports, then EOF: the sender is gone
            await asyncio.get_running_loop().run_in_executor(None, self._reader.join, 5)
        self._conn.close()

    def _send(self, command: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # already gone: its exit is reported by _end
            self._conn.send(command)


def _main(settings: Settings, conn: Connection, report: bool) -> None:
    # Ctrl-C and systemd's SIGTERM reach the whole process group; the daemon decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # At the daemon's own priority. At niceness 10 (the intake first during a backlog) the sender got a tenth
    # of a busy core's time: acknowledgements at 50 mails/s reached the SMTP server 15-17 s after their commit
    # (p50, host load 10-13; 0.2-2.4 s at the same priority in the same minutes, bench/bench_instances.py).
    # It needs under a millisecond of CPU per mail, so it takes little from the intake (acks on: -14 %).
    from mailbridge.db import Database
    from mailbridge.logs import setup_logging

    setup_logging(settings.logging.level, settings.logging.format)
    log.info("outbox sender running (pid %d)", os.getpid())
    db = Database(settings.database_url, fsync_each_commit=False)
    try:
        asyncio.run(_serve(db, settings, conn, report))
    finally:
        db.close()


async def _serve(db: Database, settings: Settings, conn: Connection, report: bool) -> None:
    from mailbridge.notify.sender import OutboxSender

    def send_report(tally: OutboxTally) -> None:
        with contextlib.suppress(OSError, ValueError):  # the daemon is gone: the pipe reader exits us
            conn.send(dict(tally))

    loop = asyncio.get_running_loop()
    sender = OutboxSender(db, settings, asyncio.Event(), send_report if report else None)
    done = asyncio.Event()
    ending: list[str] = []

    def listen() -> None:
        while True:
            try:
                command = conn.recv()
            except (EOFError, OSError):  # the daemon is gone (killed): finish what is in flight, then go
                log.warning("the daemon is gone; recording the mails in flight and exiting")
                deadline = threading.Timer(ORPHAN_SECONDS, os._exit, args=(1,))
                deadline.daemon = True
                deadline.start()
                command = STOP
            if command == WAKE:
                loop.call_soon_threadsafe(sender.ready.set)
            else:
                ending.append(command)
                loop.call_soon_threadsafe(done.set)
                return

    threading.Thread(target=listen, name="outbox-pipe", daemon=True).start()
    await sender.run(done)
    if ending and ending[0] == FINISH:
        await sender.deliver_due()
