"""The daemon's Prometheus metrics, in a registry of their own (nothing else in the process registers
into it, and tests can build one App after another).

Counters are counted in the daemon's main process, where the event is committed or reported:
- the intake: once per committed batch, from its results (`count_intake`). A batch that fails and is
  recorded again mail by mail returns its results once, from the attempt that committed; a mail
  fetched again after a crash (its receipt existed) counts as fetched, not as a new ticket again.
- the outbox: the sender's process reports over its pipe what each commit of outcomes recorded
  (`count_outbox`), so nothing is shared between processes (no multiprocess directory).
- SLA: after the check's transactions (`count_sla`).
Gauges that are a question to the database (outbox depth, age of its oldest mail) are read at scrape
time from the last probe; the mailboxes' connection state is read from memory.
"""

from __future__ import annotations

import importlib.metadata
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from mailbridge.ingest.ledger import SourceHealth
from mailbridge.models import Outcome, utcnow
from mailbridge.observability.health import CrmFailing, Probe

if TYPE_CHECKING:
    from mailbridge.notify.sender import OutboxTally
    from mailbridge.pipeline import Result
    from mailbridge.sla.check import CheckReport

# What became of a mail, as the intake counts it.
OPENED, REPLY, DUPLICATE, QUARANTINED, SEEN_BEFORE = "opened", "reply", "duplicate", "quarantined", "seen_before"


def intake_kind(result: Result) -> str:
    if result.seen_before:  # recorded by an earlier run (killed before the server was told)
        return SEEN_BEFORE
    if result.outcome is Outcome.STORED:
        return REPLY if result.reply else OPENED
    return DUPLICATE if result.outcome is Outcome.DUPLICATE else QUARANTINED


class Metrics:
    def __init__(self, mailboxes: Sequence[str], sending: Sequence[str]) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        Info("mailbridge", "The running version", registry=registry).info(
            {"version": importlib.metadata.version("mailbridge")}
        )
        by_box = ["mailbox"]
        self.fetched = Counter(
            "mailbridge_mails_fetched",
            "Mails taken from a mailbox and recorded, whatever became of them",
            by_box,
            registry=registry,
        )
        self.intake = {
            OPENED: Counter(
                "mailbridge_tickets_opened", "New tickets opened by incoming mail", by_box, registry=registry
            ),
            REPLY: Counter(
                "mailbridge_replies_threaded", "Incoming mails stored on an existing ticket", by_box, registry=registry
            ),
            DUPLICATE: Counter(
                "mailbridge_mails_duplicate", "Mails already stored (same mail again)", by_box, registry=registry
            ),
            QUARANTINED: Counter(
                "mailbridge_mails_quarantined", "Mails kept in quarantine with a reason", by_box, registry=registry
            ),
        }
        self.last_commit = Gauge(
            "mailbridge_intake_last_commit_timestamp_seconds",
            "When the intake last committed a batch",
            by_box,
            registry=registry,
        )
        self.sent = Counter(
            "mailbridge_mails_sent", "Outgoing mails the SMTP server accepted", by_box, registry=registry
        )
        self.smtp_failures = Counter(
            "mailbridge_smtp_failures",
            "Delivery attempts that failed: outcome=retry (tried again later) or failed (given up)",
            [*by_box, "outcome"],
            registry=registry,
        )
        self.sla_reminders = Counter(
            "mailbridge_sla_reminders", "SLA reminders queued, by the mailbox of the ticket", by_box, registry=registry
        )
        self.sla_breaches = Counter(
            "mailbridge_sla_breaches",
            "SLA targets breached (escalations queued), by the mailbox of the ticket",
            by_box,
            registry=registry,
        )
        self.state = StateCollector(sending)
        registry.register(self.state)
        self.configure(mailboxes, sending)

    def configure(self, mailboxes: Sequence[str], sending: Sequence[str]) -> None:
        """The configured mailboxes: at start, and again after a reload, which keeps the counters (a
        Prometheus counter only ever grows within a process); a removed mailbox's series stay as they were."""
        for box in mailboxes:  # every series from the start, so a rate() sees the first mail
            self.fetched.labels(box)
            for counter in (*self.intake.values(), self.sla_reminders, self.sla_breaches):
                counter.labels(box)
        for box in sending:
            self.sent.labels(box)
            for outcome in ("retry", "failed"):
                self.smtp_failures.labels(box, outcome)
        self.state.sending = sending

    def count_intake(self, results: Iterable[Result]) -> None:
        """One committed batch (its mails come from one mailbox, but nothing here relies on it)."""
        tally = Tally((result.raw.mailbox, intake_kind(result)) for result in results)
        fetched: Tally[str] = Tally()
        for (mailbox, kind), count in tally.items():
            fetched[mailbox] += count
            if kind != SEEN_BEFORE:
                self.intake[kind].labels(mailbox).inc(count)
        for mailbox, count in fetched.items():
            self.fetched.labels(mailbox).inc(count)
            self.last_commit.labels(mailbox).set_to_current_time()

    def count_outbox(self, tally: OutboxTally) -> None:
        """What one commit of the sender recorded (called on the thread that reads the sender's pipe)."""
        for (mailbox, outcome), count in tally.items():
            if outcome == "sent":
                self.sent.labels(mailbox).inc(count)
            else:
                self.smtp_failures.labels(mailbox, outcome).inc(count)

    def count_sla(self, report: CheckReport) -> None:
        for mailbox, count in report.reminders_by_mailbox.items():
            self.sla_reminders.labels(mailbox).inc(count)
        for mailbox, count in report.escalations_by_mailbox.items():
            self.sla_breaches.labels(mailbox).inc(count)


class StateCollector:
    """Read at scrape time: the mailboxes' connections (memory), the last database probe, the CRM."""

    def __init__(self, sending: Sequence[str]) -> None:
        self.sending = sending
        self.mailboxes: Mapping[str, SourceHealth] = {}
        self.crm_failing: CrmFailing | None = None
        self.probe: Probe | None = None

    def describe(self) -> list[Metric]:
        return []  # names vary with the configuration; nothing else registers into this registry

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("mailbridge_mailbox_up", "1 while the mailbox's session works", labels=["mailbox"])
        reconnects = CounterMetricFamily(
            "mailbridge_mailbox_reconnects", "Sessions opened after the first (IMAP reconnects)", labels=["mailbox"]
        )
        failures = CounterMetricFamily(
            "mailbridge_mailbox_failures", "Connection or command failures of the mailbox", labels=["mailbox"]
        )
        for name, health in self.mailboxes.items():
            if health.state == "standby":  # another instance holds its lease: not ours to report
                continue
            up.add_metric([name], 1.0 if health.state == "connected" else 0.0)
            reconnects.add_metric([name], max(0, health.sessions - 1))
            failures.add_metric([name], health.failures)
        yield from (up, reconnects, failures)
        probe = self.probe
        if probe is not None:
            yield GaugeMetricFamily(
                "mailbridge_database_up",
                "1 if the last database check answered",
                value=0.0 if probe.outbox is None else 1.0,
            )
        if probe is not None and probe.outbox is not None:  # unknown when the database does not answer
            depth = GaugeMetricFamily("mailbridge_outbox_depth", "Unsent mails in the outbox", labels=["mailbox"])
            age = GaugeMetricFamily(
                "mailbridge_outbox_oldest_age_seconds", "Age of the oldest unsent mail (0: none)", labels=["mailbox"]
            )
            now = utcnow()
            for name in sorted({*self.sending, *probe.outbox.depth}):
                depth.add_metric([name], probe.outbox.depth.get(name, 0))
                age.add_metric([name], probe.outbox.oldest_age(now, name))
            yield from (depth, age)
        if self.crm_failing is not None:
            yield GaugeMetricFamily(
                "mailbridge_crm_up", "0 while CRM lookups fail", value=float(not self.crm_failing())
            )
