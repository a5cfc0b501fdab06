"""Composition root: the only place that builds engines, pools and watchers and wires them together."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from mailbridge.agents import AgentDesk
from mailbridge.assignment import Assigner
from mailbridge.config import ImapMailbox, LmtpMailbox, MailboxConfig, MaildirMailbox, Settings
from mailbridge.customers import CustomerDirectory
from mailbridge.db import Database
from mailbridge.ingest.files import IMPORT_MAILBOX, read_paths
from mailbridge.ingest.imap import ImapWatcher
from mailbridge.ingest.ledger import Ledger
from mailbridge.ingest.maildir import MaildirWatcher
from mailbridge.ingest.parse_pool import ParsePool
from mailbridge.ingest.raw import RawMail
from mailbridge.leases import LeaseKeeper, LeaseLost, OneRunLeases, hold_data_dir, instance_name, leave
from mailbridge.models import Outcome, utcnow
from mailbridge.notify.acks import Acknowledger
from mailbridge.notify.render import Renderer
from mailbridge.notify.sender import OutboxSender, OutboxTally
from mailbridge.notify.sender_process import SenderProcess
from mailbridge.notify.sla_alerts import SlaAlerts
from mailbridge.notify.status import StatusMailer
from mailbridge.notify.writer import MailWriter
from mailbridge.oauth import TokenSources
from mailbridge.pipeline import Pipeline, Result
from mailbridge.routing import Router, RuleSet
from mailbridge.sla.check import CheckReport, SlaCheck
from mailbridge.sla.planner import SlaPlanner
from mailbridge.threading.resolve import Threader
from mailbridge.threading.ticket_refs import TicketRefs

if TYPE_CHECKING:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from mailbridge.crm import Crm
    from mailbridge.ingest.lmtp import LmtpIntake
    from mailbridge.observability.metrics import Metrics
    from mailbridge.observability.server import HttpEndpoint

log = logging.getLogger("mailbridge")

Watcher = ImapWatcher | MaildirWatcher


@dataclass
class IngestSummary:
    read: int = 0  # counted where the mails are read, independently of what became of them
    stored: int = 0  # new tickets
    replies: int = 0  # stored on an existing ticket
    duplicates: int = 0
    quarantined: int = 0

    def add(self, results: Iterable[Result]) -> None:
        counts = Counter((r.outcome, r.reply) for r in results)
        self.stored += counts[(Outcome.STORED, False)]
        self.replies += counts[(Outcome.STORED, True)]
        self.duplicates += counts[(Outcome.DUPLICATE, False)] + counts[(Outcome.DUPLICATE, True)]
        self.quarantined += counts[(Outcome.QUARANTINED, False)] + counts[(Outcome.QUARANTINED, True)]

    @property
    def accounted(self) -> int:
        return self.stored + self.replies + self.duplicates + self.quarantined

    def as_json(self) -> dict[str, int]:
        return {
            "read": self.read,
            "stored": self.stored,
            "replies": self.replies,
            "duplicates": self.duplicates,
            "quarantined": self.quarantined,
        }


class App:
    def __init__(self, settings: Settings, db: Database | None = None) -> None:
        self.settings = settings
        self.db = db or Database(settings.database_url)
        self._http_db: Database | None = None
        self._data_dir_lock: int | None = None  # `run`'s lock on the data directory (one daemon per data_dir)
        self._keeper: LeaseKeeper | None = None  # the running daemon's leases

    @cached_property
    def parser(self) -> ParsePool:
        # Built on first use: commands that only read the database never start worker processes.
        return ParsePool(
            workers=self.settings.parsing.workers,
            timeout=self.settings.parsing.timeout_seconds,
            blob_root=self.settings.storage_path / "blobs",
            fsync=self.settings.storage.fsync,
            max_message_bytes=self.settings.parsing.max_message_bytes,
            # The rules compiled here, as plain data: the workers route without the configuration's models.
            routing=RuleSet.of(self.settings.routing).for_workers() if self.settings.routing.rules else None,
            ticket_refs=TicketRefs(self.settings.tickets),
        )

    @cached_property
    def pipeline(self) -> Pipeline:
        return Pipeline(
            self.db,
            self.parser,
            self.settings.tickets,
            self.threader,
            self.answers,
            self.desk,
            self.router,
            Assigner(self.settings.routing.assignment, self.settings.agents),
            self.crm,
            self.metrics.count_intake if self.metrics else None,
        )

    @cached_property
    def metrics(self) -> Metrics | None:
        """The daemon's counters; only with the `http` section (nothing would serve them otherwise)."""
        if self.settings.http is None:
            return None
        from mailbridge.observability.metrics import Metrics

        return Metrics(*self._metric_mailboxes())

    def _metric_mailboxes(self) -> tuple[list[str], list[str]]:
        """Every mailbox, and those that send mail."""
        return (
            [box.name for box in self.settings.mailboxes],
            [box.name for box in self.settings.mailboxes if self.settings.can_send(box)],
        )

    async def _serve_http(self, keeper: LeaseKeeper) -> HttpEndpoint | None:
        if self.settings.http is None or self.metrics is None:
            return None
        from mailbridge.observability.health import LeasedMailboxes
        from mailbridge.observability.server import HttpEndpoint

        # A connection and thread of its own: a scrape never queues behind the intake's transactions.
        if self._http_db is None:  # kept across reloads, like the database itself
            self._http_db = Database(self.settings.database_url, fsync_each_commit=False)
        endpoint = HttpEndpoint(
            self.settings.http,
            self.metrics,
            self._http_db,
            LeasedMailboxes({watcher.name: watcher.ledger.health for watcher in self.watchers}, keeper.running),
            (lambda: crm.failing) if (crm := self.crm) is not None else None,
        )
        await endpoint.start()
        return endpoint

    @cached_property
    def crm(self) -> Crm | None:
        settings = self.settings.routing.customers.crm
        if settings is None:
            return None
        from mailbridge.crm import Crm  # aiohttp is imported only when a CRM is configured

        return Crm(settings)

    async def _close_crm(self) -> None:
        crm: Crm | None = self.__dict__.get("crm")  # only if it was built
        if crm is not None:
            await crm.aclose()

    @cached_property
    def router(self) -> Router:
        path = self.settings.routing.customers.directory
        return Router(self.settings.routing, CustomerDirectory.load(path) if path else None)

    @cached_property
    def desk(self) -> AgentDesk:
        return AgentDesk(
            self.settings,
            self.writer,
            self.answers.own_addresses,
            self.status_mailer,
            self.threader,
        )

    @cached_property
    def status_mailer(self) -> StatusMailer:
        return StatusMailer(self.settings, self.writer)

    @cached_property
    def threading_secret(self) -> bytes:
        """The config's secret, or one made on first start and kept (0600) in the data directory."""
        configured = self.settings.threading.secret
        if configured is not None:
            return configured.get_secret_value().encode()
        path = self.settings.data_dir / "threading.secret"
        if not path.exists():
            self.settings.data_dir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32))
        return path.read_text().strip().encode()

    @cached_property
    def threader(self) -> Threader:
        threading = self.settings.threading
        return Threader(
            self.threading_secret,
            self.settings.tickets,
            [agent.address for agent in self.settings.agents],
            threading.trusted_authserv_ids,
            threading.reopen_days,
        )

    @cached_property
    def renderer(self) -> Renderer:
        return Renderer(self.settings.templates.directory)

    @cached_property
    def answers(self) -> Acknowledger:
        return Acknowledger(self.settings, self.writer)

    @cached_property
    def writer(self) -> MailWriter:
        return MailWriter(self.settings, self.renderer, self.threading_secret)

    @cached_property
    def sender(self) -> OutboxSender:
        # Its own database thread (and connection): the small commit after each sent mail must not queue
        # behind the intake's batch transactions, nor hold them up.
        return OutboxSender(
            Database(self.settings.database_url, fsync_each_commit=False), self.settings, self.pipeline.outbox_ready
        )

    @cached_property
    def sla(self) -> SlaCheck:
        return SlaCheck(self.settings.sla, SlaPlanner(self.settings.sla), SlaAlerts(self.settings, self.writer))

    async def check_sla(self) -> CheckReport:
        """One SLA check (the scheduler's job); the sender is woken for the mails it queued."""
        report = CheckReport()
        steps = self.sla.steps(self.db, utcnow(), report)
        try:
            # One job per transaction: the intake's jobs on the same database thread get their turns.
            while await self.db.run(next, steps, False):
                pass
        finally:
            if self.metrics is not None:  # what the committed steps queued, also when a later one failed
                self.metrics.count_sla(report)
        if report.mails:
            self.pipeline.outbox_ready.set()
        return report

    def _start_sla_scheduler(self) -> AsyncIOScheduler | None:
        if not self.settings.sla.enabled:
            return None
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        scheduler = AsyncIOScheduler(timezone="UTC")
        # One check at a time; checks missed while one ran long are merged into the next.
        scheduler.add_job(
            self.check_sla,
            "interval",
            seconds=self.settings.sla.check_interval_seconds,
            next_run_time=datetime.now(UTC),
            max_instances=1,
            coalesce=True,
            id="sla-check",
        )
        scheduler.start()
        log.info("SLA checks every %gs", self.settings.sla.check_interval_seconds)
        return scheduler

    @property
    def sends_mail(self) -> bool:
        return any(self.settings.can_send(box) for box in self.settings.mailboxes)

    @cached_property
    def tokens(self) -> TokenSources:
        return TokenSources()

    @cached_property
    def watchers(self) -> list[Watcher]:
        watchers: list[Watcher] = []
        for box in self.settings.mailboxes:
            ledger = Ledger(self.db, box.name)
            if isinstance(box, ImapMailbox):
                tokens = self.tokens.get(box.oauth2, box.user, box.name) if box.oauth2 is not None else None
                watchers.append(ImapWatcher(box, self.pipeline, ledger, self.settings.fetch, tokens))
            elif isinstance(box, MaildirMailbox):
                watchers.append(MaildirWatcher(box, self.pipeline, ledger, self.settings.fetch))
        return watchers

    @cached_property
    def lmtp(self) -> LmtpIntake | None:
        if self.settings.lmtp is None:
            return None
        from mailbridge.ingest.lmtp import LmtpIntake  # aiosmtpd only when LMTP is configured

        return LmtpIntake(
            self.settings.lmtp,
            [box for box in self.settings.mailboxes if isinstance(box, LmtpMailbox)],
            self.pipeline,
            self.settings.fetch,
            self.settings.parsing.max_message_bytes,
            hostname=self.settings.outbox.domain,
        )

    def prepare(self, *, migrate_in_child: bool = False) -> None:
        """Create the data directories and bring the schema up to date (idempotent). A long-running
        command migrates in a child process, so that it does not keep Alembic in memory."""
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        (self.settings.storage_path / "blobs").mkdir(parents=True, exist_ok=True)
        if migrate_in_child:
            # The parser workers start while the child migrates (a new database: the first start), instead
            # of making the first mail wait for them.
            self.db.upgrade_in_child(meanwhile=self.parser.start if self.settings.mailboxes else None)
        self.db.upgrade()
        self.check()
        if self.settings.sla.enabled:
            with self.db.unit_of_work() as session:
                self.sla.planner.start(session, utcnow())
        if not self.db.is_sqlite and self.settings.threading.secret is None:
            log.warning(
                "threading.secret is not set: this instance signs its Message-IDs with a secret of its own data "
                "directory; several instances on one database must share one (set threading.secret or secret_file)"
            )
        for box in self.settings.mailboxes:
            if box.acknowledge and not self.settings.can_send(box):
                log.warning("mailbox %s: no smtp configured, so no acknowledgements are sent", box.name)
        if self.settings.agents and not self.settings.threading.trusted_authserv_ids:
            log.warning(
                "agents are recognised by their From address alone; set threading.trusted_authserv_ids so that "
                "only mail that passed DMARC at your own servers can act as an agent"
            )

    def check(self) -> None:
        """What the settings name must be usable (templates, the customer directory): at start-up, and for a
        new configuration before a reload applies it."""
        self.renderer.check(box.language for box in self.settings.mailboxes if self.settings.can_send(box))
        _ = self.router  # a customer directory that cannot be read stops start-up, not the first mail

    async def run(self, stop: asyncio.Event, started: Callable[[], None] | None = None) -> None:
        """The daemon: the mailboxes this instance holds the lease of, each on its own task, and the LMTP
        listener, until `stop`, then a bounded drain. With one instance on the database it holds every
        mailbox. `started` is called once everything runs (and the LMTP socket takes connections)."""
        if self._data_dir_lock is None:  # held until close(): across reloads, which keep data_dir
            self._data_dir_lock = hold_data_dir(self.settings.data_dir)
        keeper = self._keeper = self._lease_keeper()
        self.pipeline.fence = keeper.fence
        try:
            http = await self._serve_http(keeper)
        except BaseException:
            keeper.db.close()
            raise
        tasks = [asyncio.create_task(keeper.run(stop), name="leases")]
        if self.lmtp is not None:
            tasks.append(asyncio.create_task(self.lmtp.run(stop), name="lmtp"))
        log.info("mailbridge running with %d mailbox(es)", len(self.settings.mailboxes))
        sender = self._start_sender_process(self.metrics.count_outbox if self.metrics else None)
        if sender is not None:
            tasks.append(asyncio.create_task(self._wake_sender(sender, stop), name="outbox"))
        scheduler = self._start_sla_scheduler()
        stopper = asyncio.create_task(stop.wait())
        loop = asyncio.get_running_loop()
        grace = self.settings.shutdown_grace_seconds
        deadline = None  # the whole drain, sender included, fits in the grace period (systemd's stop timeout)
        try:
            if started is not None:
                await self._until_started(tasks, stopper)
                started()
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            crashed = [t for t in done if t is not stopper and t.exception() is not None]
            for task in crashed:
                log.error("task %s crashed", task.get_name(), exc_info=task.exception())
            stop.set()
            deadline = loop.time() + grace
            # The keeper lets each watcher finish the batch in hand (commit + IMAP flags) within the grace
            # period, then gives the leases back; anything not acknowledged on the server is fetched again.
            pending = [t for t in tasks if not t.done()]
            if pending:
                _, late = await asyncio.wait(pending, timeout=grace + 10)
                for task in late:  # nothing of this run may outlive it (a reload closes what it uses)
                    log.warning("%s did not stop within the grace period; cancelling it", task.get_name())
                    task.cancel()
                if late:
                    await asyncio.wait(late, timeout=5)
            crashed += [t for t in pending if t.done() and not t.cancelled() and t.exception() is not None]
            if crashed:
                raise RuntimeError(f"{len(crashed)} task(s) crashed; see the log")
        finally:
            stopper.cancel()
            if scheduler is not None:
                scheduler.shutdown(wait=False)
            if sender is not None:
                await sender.stop(grace if deadline is None else max(1.0, deadline - loop.time()))
            if http is not None:
                await http.stop()
            await self._close_crm()
            keeper.db.close()

    def _lease_keeper(self) -> LeaseKeeper:
        # Its own database thread and connection: a renewal must not queue behind the intake's batches.
        return LeaseKeeper(
            Database(self.settings.database_url, fsync_each_commit=False),
            self.settings.instances,
            instance_name(self.settings),
            {watcher.name: watcher.run for watcher in self.watchers},
            self.settings.shutdown_grace_seconds,
        )

    async def _until_started(self, tasks: list[asyncio.Task[None]], stopper: asyncio.Task[bool]) -> None:
        if self.lmtp is None:
            return
        listening = asyncio.create_task(self.lmtp.listening.wait())
        await asyncio.wait([listening, stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()

    def hand_over(self, settings: Settings) -> None:
        """A reload is about to stop this run and start one with `settings`: the leases of the mailboxes that
        stay, fetching from the same place, are kept across it (another instance cannot take them meanwhile);
        the others are given back."""
        keeper = self._keeper
        if keeper is None or instance_name(settings) != keeper.me:  # a new name: a new instance
            return
        before = {box.name: _mail_source(box) for box in self.settings.mailboxes}
        keeper.keep_at_stop = frozenset(
            box.name
            for box in settings.mailboxes
            if box.name in keeper.watchers and before.get(box.name) == _mail_source(box)
        )

    async def leave(self) -> None:
        """Give back every lease of this instance and say it is gone (a stop that came while a reload kept them)."""
        me = instance_name(self.settings)

        def leaving() -> None:
            with self.db.unit_of_work() as session:
                leave(session, me)

        await self.db.run(leaving)

    def reconfigure(self, settings: Settings) -> None:
        """Take new settings between two runs (nothing in flight): every part built from the settings is
        built again, from them, on first use. The database stays (a new one needs a restart), and so do the
        metrics, whose counters go on counting (the `http` section, too, needs a restart)."""
        if "parser" in self.__dict__:
            self.parser.close()
        if "sender" in self.__dict__:
            self.sender.db.close()
        metrics: Metrics | None = self.__dict__.get("metrics")
        for name, value in vars(App).items():
            if isinstance(value, cached_property):
                self.__dict__.pop(name, None)
        self.settings = settings
        if metrics is not None:
            metrics.configure(*self._metric_mailboxes())
            self.__dict__["metrics"] = metrics

    async def run_once(self) -> dict[str, str]:
        """Drain every mailbox once, deliver what is due in the outbox, and return (`mailbridge run --once`).
        A mailbox whose lease a running daemon holds is left to it: the result names those, with their holder."""
        leases = OneRunLeases(
            Database(self.settings.database_url, fsync_each_commit=False),
            self.settings.instances,
            f"{instance_name(self.settings)}:once:{os.getpid()}",  # never a daemon's name, even on its data_dir
        )
        try:
            busy = await leases.take([watcher.name for watcher in self.watchers])
            for name, holder in sorted(busy.items()):
                log.warning("mailbox %s: skipped, instance %s is fetching it", name, holder)
            self.pipeline.fence = leases.fence
            done = asyncio.Event()
            renewing = asyncio.create_task(leases.renew_until(done), name="leases")
            try:
                await self._drain_once([w for w in self.watchers if w.name in leases.held])
            finally:
                done.set()
                await renewing
                self.pipeline.fence = None
                await leases.release()
        finally:
            leases.db.close()
        return busy

    async def _drain_once(self, watchers: list[Watcher]) -> None:
        async def drain(watcher: Watcher) -> None:
            try:
                await watcher.run_once()
            except LeaseLost as exc:  # not renewed in time and taken over: what it had fetched is theirs now
                log.warning("mailbox %s: %s; left to the instance that took it", watcher.name, exc)

        sender = self._start_sender_process()
        if sender is None:
            try:
                await asyncio.gather(*(drain(w) for w in watchers))
            finally:
                await self._close_crm()
            if self.settings.sla.enabled:
                await self.check_sla()
            return
        # Acknowledgements go out while the mailboxes are drained, as in the daemon.
        drained = asyncio.Event()
        waking = asyncio.create_task(self._wake_sender(sender, drained), name="outbox")
        try:
            await asyncio.gather(*(drain(w) for w in watchers))
            if self.settings.sla.enabled:
                await self.check_sla()
        finally:
            await self._close_crm()
            drained.set()
            await waking
            await sender.finish()

    def _start_sender_process(self, on_report: Callable[[OutboxTally], None] | None = None) -> SenderProcess | None:
        if not self.sends_mail:
            return None
        sender = SenderProcess(self.settings, on_report)
        sender.start()
        return sender

    async def _wake_sender(self, sender: SenderProcess, stop: asyncio.Event) -> None:
        """Pass on every commit that put mail in the outbox, until `stop`."""
        ready = self.pipeline.outbox_ready
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                waiting = asyncio.ensure_future(ready.wait())
                await asyncio.wait([waiting, stopping], timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                if ready.is_set():
                    ready.clear()
                    sender.wake()
                if not sender.alive:
                    raise RuntimeError("the outbox sender process died; see the log")
        finally:
            stopping.cancel()

    async def ingest(self, paths: list[Path], mailbox: str = IMPORT_MAILBOX, notify: bool = True) -> IngestSummary:
        summary = IngestSummary()

        async def batches() -> AsyncGenerator[list[RawMail], None]:
            batch: list[RawMail] = []
            size = 0
            for raw in read_paths(paths, mailbox, quiet=None if notify else "imported with --no-notify"):
                summary.read += 1
                batch.append(raw)
                size += len(raw.data)
                if len(batch) >= self.settings.fetch.batch_size or size >= self.settings.fetch.batch_bytes:
                    yield batch
                    batch, size = [], 0
            yield batch

        async def committed(results: list[Result]) -> None:
            summary.add(results)

        try:
            await self.pipeline.process_stream(batches(), committed)
        finally:
            await self._close_crm()
        return summary

    async def retry_quarantined(self, quarantine_id: int) -> Result:
        try:
            return await self.pipeline.retry_quarantined(quarantine_id)
        finally:
            await self._close_crm()

    def close(self) -> None:
        if "parser" in self.__dict__:
            self.parser.close()
        if "sender" in self.__dict__:
            self.sender.db.close()
        if self._http_db is not None:
            self._http_db.close()
        if self._data_dir_lock is not None:
            os.close(self._data_dir_lock)
            self._data_dir_lock = None
        self.db.close()


def _mail_source(box: MailboxConfig) -> tuple[object, ...]:
    """Where a mailbox's mail comes from: a reload that changes it gives the mailbox's lease back."""
    if isinstance(box, ImapMailbox):
        return ("imap", box.host, box.port, box.user, box.folder)
    if isinstance(box, MaildirMailbox):
        return ("maildir", box.path)
    return ("lmtp",)


def build_app(settings: Settings) -> App:
    return App(settings)


def install_signal_handlers(stop: asyncio.Event, reload: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload.set)
