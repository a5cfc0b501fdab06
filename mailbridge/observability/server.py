"""/healthz and /metrics, served by aiohttp on the daemon's own event loop.

On the loop, not in a thread of prometheus-client's own server: what the answers read (the mailboxes'
connection state, the CRM's breaker) belongs to the loop, so it is read without locks, and the server
starts and stops with the daemon's tasks. A scrape costs the loop about a millisecond (rendering the text);
the only slow part, the database read, runs on a database thread and connection of its own, so a scrape
neither waits behind the intake's transactions nor holds them up.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from mailbridge.config import HttpSettings
from mailbridge.db import Database
from mailbridge.ingest.ledger import SourceHealth
from mailbridge.models import utcnow
from mailbridge.observability.health import CrmFailing, OutboxSnapshot, Probe, assess, read_outbox
from mailbridge.observability.metrics import Metrics

log = logging.getLogger("mailbridge.http")


class HttpListenError(Exception):
    """The endpoint cannot listen where `http.listen` says (address in use, no such address …)."""


class HttpEndpoint:
    def __init__(
        self,
        settings: HttpSettings,
        metrics: Metrics,
        db: Database,
        mailboxes: Mapping[str, SourceHealth],
        crm_failing: CrmFailing | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.db = db
        self.mailboxes = mailboxes
        self.crm_failing = crm_failing
        metrics.state.mailboxes = mailboxes
        metrics.state.crm_failing = crm_failing
        self._probing: asyncio.Future[OutboxSnapshot] | None = None
        self._runner: web.AppRunner | None = None
        self._prometheus = make_aiohttp_handler(metrics.registry)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.settings.host, self.settings.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise HttpListenError(f"http.listen {self.settings.listen}: {exc.strerror or exc}") from None
        self._runner = runner
        log.info("serving /healthz and /metrics on http://%s", self.settings.listen)
        if not self.settings.local:
            log.warning(
                "http.listen %s is not a loopback address: /healthz and /metrics have no authentication",
                self.settings.listen,
            )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def probe(self) -> Probe:
        """Read the outbox on the endpoint's database thread, within the timeout. Scrapes that arrive while
        a read is under way share it, so a database that hangs costs one stuck thread, not one per scrape."""
        if self._probing is None or self._probing.done():
            self._probing = asyncio.ensure_future(self.db.run(read_outbox, self.db))
            # Retrieved here too: a read that ends in an error after its scrape timed out is not logged as lost.
            self._probing.add_done_callback(lambda done: done.cancelled() or done.exception())
        timeout = self.settings.database_timeout_seconds
        try:
            outbox = await asyncio.wait_for(asyncio.shield(self._probing), timeout)
        except TimeoutError:
            probe = Probe(utcnow(), None, f"no answer within {timeout:g} s")
        except Exception as exc:
            probe = Probe(utcnow(), None, f"{type(exc).__name__}: {exc}"[:500])
        else:
            probe = Probe(utcnow(), outbox)
        self.metrics.state.probe = probe
        return probe

    async def _healthz(self, request: web.Request) -> web.Response:
        healthy, body = assess(self.settings, self.mailboxes, await self.probe(), self.crm_failing)
        return web.Response(
            status=200 if healthy else 503,
            text=json.dumps(body, indent=2) + "\n",
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        await self.probe()
        return await self._prometheus(request)
