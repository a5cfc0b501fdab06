"""The daemon under a service manager: systemd is told when it is ready, reloading and stopping, and is fed the
watchdog from the event loop (sd_notify); SIGHUP reloads the configuration.

A reload validates the new file first (the settings, then what they name: templates, the customer
directory, the routing rules); on any error it is logged and the running configuration stays. A valid one
is applied like a short, in-process restart: the mailboxes finish the batch in hand and stop, the LMTP
socket is closed after answering what it holds, the outbox sender finishes its mails, and everything is
started again from the new settings. Two things outlive a reload: the leases of the mailboxes that stay
(another instance cannot take them in between; a removed mailbox's lease is given back) and the metrics'
counters (a Prometheus counter never goes back within a process). Only where the data lives (data_dir,
database, storage) needs a real restart: those keys keep their old values, with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable

import sdnotify

from mailbridge.app import App
from mailbridge.config import ConfigError, Settings
from mailbridge.logs import setup_logging

log = logging.getLogger("mailbridge.service")

# Where the data is: changed only by a restart (a reload keeps the old values and says so).
# What a reload keeps as it was: the data and where it lives, and the listening sockets (a new address that
# cannot be bound would otherwise end the daemon after the old one was already closed).
RESTART_ONLY = ("data_dir", "database", "storage", "http", "lmtp")


class Notifier:
    """sd_notify(3): datagrams to $NOTIFY_SOCKET (sdnotify sends them; an '@' name is an abstract socket).
    Without systemd (no NOTIFY_SOCKET) every call does nothing."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._systemd = sdnotify.SystemdNotifier() if self.enabled else None  # it reads NOTIFY_SOCKET
        self.watchdog_interval = (
            _watchdog_interval(os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID"))
            if self.enabled
            else None
        )

    def send(self, *fields: str) -> None:
        if self._systemd is not None:
            self._systemd.notify("\n".join(fields))

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (Type=notify-reload) tell this reload from an earlier one.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: finishing the mail in hand")

    async def feed_watchdog(self) -> None:
        """WATCHDOG=1 at half the interval systemd gave, from the event loop: if the loop hangs, the pings
        stop and systemd restarts the service."""
        if self.watchdog_interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval / 2)


def _watchdog_interval(usec: str | None, pid: str | None) -> float | None:
    """sd_watchdog_enabled(3): WATCHDOG_USEC, for this process only if WATCHDOG_PID names it (or is unset)."""
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000


async def serve(
    app: App,
    stop: asyncio.Event,
    reload: asyncio.Event,
    load_settings: Callable[[], Settings],
    notifier: Notifier,
) -> None:
    """Run the daemon until `stop`; each `reload` (SIGHUP) applies a new configuration if it is valid."""
    feeding = asyncio.create_task(notifier.feed_watchdog(), name="watchdog")
    try:
        while True:
            generation = asyncio.Event()  # stops this run: at `stop`, or to apply a reload
            running = asyncio.create_task(app.run(generation, started=lambda: notifier.ready(_status(app))))
            settings = await _until_stop_or_valid_reload(app, running, stop, reload, load_settings)
            if settings is None:
                if not running.done():
                    notifier.stopping()
                    generation.set()
                await running
                return
            notifier.reloading()
            log.info("reloading the configuration: stopping the mailboxes to start them with it")
            app.hand_over(settings)
            generation.set()
            await running
            if stop.is_set():  # SIGTERM while the old run drained: stop, do not start the new one
                notifier.stopping()
                await app.leave()  # the leases kept for the new run are given back at once
                return
            app.reconfigure(settings)
            setup_logging(settings.logging.level, settings.logging.format)
            app.prepare()
            log.info("configuration reloaded")
    finally:
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding


async def _until_stop_or_valid_reload(
    app: App,
    running: asyncio.Task[None],
    stop: asyncio.Event,
    reload: asyncio.Event,
    load_settings: Callable[[], Settings],
) -> Settings | None:
    """The new settings once a reload brings valid ones; None when the daemon is to stop (or its run ended)."""
    while True:
        stopping = asyncio.ensure_future(stop.wait())
        reloading = asyncio.ensure_future(reload.wait())
        try:
            await asyncio.wait([running, stopping, reloading], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            reloading.cancel()
        if stop.is_set() or running.done():
            return None
        reload.clear()
        settings = validated(app, load_settings)
        if settings is not None:
            return settings


def validated(app: App, load_settings: Callable[[], Settings]) -> Settings | None:
    """The new settings if they and everything they name can be used; else None, with the reason logged."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        log.error("configuration not reloaded; the running one stays:\n%s", exc)
        return None
    kept = [key for key in RESTART_ONLY if getattr(settings, key) != getattr(app.settings, key)]
    if kept:
        log.warning("%s changed; that takes a restart, and until then the old value stays", ", ".join(kept))
        settings = settings.model_copy(update={key: getattr(app.settings, key) for key in kept})
    try:
        App(settings, db=app.db).check()
    except Exception as exc:  # anything the new configuration names that cannot be used
        log.error("configuration not reloaded; the running one stays: %s", exc)
        return None
    return settings


def _status(app: App) -> str:
    lmtp = f", LMTP on {app.settings.lmtp.listen}" if app.settings.lmtp is not None else ""
    return f"running: {len(app.settings.mailboxes)} mailbox(es){lmtp}"
