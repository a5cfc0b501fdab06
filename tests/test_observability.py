"""The metrics' counting and the health verdict, without a daemon: what the e2e test cannot force."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from mailbridge import receipts
from mailbridge.config import ConfigError, HttpSettings, load_settings
from mailbridge.crm import Crm
from mailbridge.ingest.ledger import SourceHealth
from mailbridge.ingest.raw import RawMail
from mailbridge.models import OutboxMail, OutboxStatus, Outcome, utcnow
from mailbridge.notify import sender as sender_module
from mailbridge.notify.sender import OutboxSender, OutboxTally
from mailbridge.observability.health import LeasedMailboxes, OutboxSnapshot, Probe, assess
from mailbridge.observability.metrics import Metrics
from mailbridge.pipeline import Result
from mailbridge.routing_rules import CrmSettings
from tests.imap_env import make_app, sample_mail
from tests.support.crm_server import crm_server
from tests.support.dovecot import free_port
from tests.support.smtp_sink import SmtpSink

THRESHOLDS = HttpSettings(mailbox_failing_seconds=60, outbox_stuck_seconds=900)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def per_box(metrics: Metrics, name: str, mailbox: str) -> float:
    return samples(metrics)[(name, (("mailbox", mailbox),))]


def result(mailbox: str, outcome: Outcome, **extra: Any) -> Result:
    return Result(RawMail(mailbox=mailbox, source="test", data=b""), outcome, **extra)


def test_a_mail_fetched_again_after_a_crash_counts_as_fetched_not_as_a_new_ticket() -> None:
    metrics = Metrics(["a", "b"], [])
    metrics.count_intake(
        [
            result("a", Outcome.STORED),
            result("a", Outcome.STORED),
            result("a", Outcome.STORED, reply=True),
            result("a", Outcome.STORED, seen_before=True),  # its ticket was opened by the run that was killed
            result("a", Outcome.DUPLICATE),
            result("a", Outcome.QUARANTINED),
            result("b", Outcome.STORED),
        ]
    )
    assert per_box(metrics, "mailbridge_mails_fetched_total", "a") == 6
    assert per_box(metrics, "mailbridge_tickets_opened_total", "a") == 2
    assert per_box(metrics, "mailbridge_replies_threaded_total", "a") == 1
    assert per_box(metrics, "mailbridge_mails_duplicate_total", "a") == 1
    assert per_box(metrics, "mailbridge_mails_quarantined_total", "a") == 1
    assert per_box(metrics, "mailbridge_tickets_opened_total", "b") == 1
    assert per_box(metrics, "mailbridge_mails_quarantined_total", "b") == 0  # there from the start


async def test_a_batch_recorded_again_mail_by_mail_is_counted_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    for index in range(5):
        (inbox / f"{index}.eml").write_bytes(sample_mail(sender=f"c{index}@example.com"))
    app = make_app(tmp_path, [], http={"listen": "127.0.0.1:9478"}, fetch={"batch_size": 5})
    real_add = receipts.add
    failed: list[int] = []

    def fail_the_whole_batch_once(session: Any, new: list[receipts.NewReceipt]) -> None:
        if len(new) > 1 and not failed:  # inside the batch's transaction: it is rolled back
            failed.append(len(new))
            raise RuntimeError("injected: the batch's commit fails")
        real_add(session, new)

    monkeypatch.setattr(receipts, "add", fail_the_whole_batch_once)
    try:
        summary = await app.ingest([inbox], mailbox="support", notify=False)
    finally:
        app.close()
    assert failed == [5] and summary.stored == 5
    assert app.metrics is not None
    assert per_box(app.metrics, "mailbridge_mails_fetched_total", "support") == 5
    assert per_box(app.metrics, "mailbridge_tickets_opened_total", "support") == 5


async def test_the_sender_reports_what_each_commit_recorded(tmp_path: Path, sink: SmtpSink) -> None:
    sink.handler.refuse["gone@example.com"] = "550 5.1.1 No such user"
    sink.handler.refuse["busy@example.com"] = "451 4.3.0 Try again later"
    inbox = tmp_path / "in"
    inbox.mkdir()
    for sender in ("gone@example.com", "busy@example.com", "fine@example.com"):
        (inbox / f"{sender}.eml").write_bytes(sample_mail(sender=sender))
    box = {"type": "maildir", "name": "support", "path": str(tmp_path / "maildir"), "address": "s@helpdesk.example"}
    # The retry is not due again within the test: one pass, one attempt each (however slow the machine).
    app = make_app(tmp_path, [box], smtp=sink.config(), outbox={"first_retry_seconds": 60})
    tallies: list[OutboxTally] = []
    try:
        await app.ingest([inbox], mailbox="support")
        sender = OutboxSender(app.sender.db, app.settings, asyncio.Event(), tallies.append)
        await sender.deliver_due()
        metrics = Metrics(["support"], ["support"])
        for tally in tallies:
            metrics.count_outbox(tally)
    finally:
        app.close()
    assert sum(tallies, OutboxTally()) == {("support", "sent"): 1, ("support", "failed"): 1, ("support", "retry"): 1}
    found = samples(metrics)
    assert found[("mailbridge_mails_sent_total", (("mailbox", "support"),))] == 1
    assert found[("mailbridge_smtp_failures_total", (("mailbox", "support"), ("outcome", "failed")))] == 1
    assert found[("mailbridge_smtp_failures_total", (("mailbox", "support"), ("outcome", "retry")))] == 1


def healthy_probe(depth: int = 0, queued_seconds_ago: float = 0) -> Probe:
    now = utcnow()
    oldest = {"a": now - timedelta(seconds=queued_seconds_ago)} if depth else {}
    return Probe(now, OutboxSnapshot({"a": depth} if depth else {}, oldest))


def connected() -> SourceHealth:
    health = SourceHealth()
    health.opened()
    return health


def failing_for(seconds: float, error: str = "connection refused") -> SourceHealth:
    health = connected()
    health.failed(error)
    health.since = utcnow() - timedelta(seconds=seconds)
    return health


def test_a_mailbox_reconnecting_within_the_threshold_is_healthy_past_it_not() -> None:
    healthy, body = assess(THRESHOLDS, {"a": connected(), "b": failing_for(10)}, healthy_probe(), None)
    assert healthy and body["checks"]["mailboxes"]["b"]["state"] == "reconnecting"
    healthy, body = assess(THRESHOLDS, {"a": connected(), "b": failing_for(61)}, healthy_probe(), None)
    assert not healthy and body["status"] == "failing"
    [problem] = body["problems"]
    assert problem.startswith("mailbox b: failing since") and problem.endswith("connection refused")


def test_failures_keep_the_moment_the_trouble_began_and_a_fetch_ends_them() -> None:
    health = connected()
    health.failed("first")
    began = health.since
    health.failed("second")
    assert (health.state, health.since, health.error, health.failures) == ("failing", began, "second", 2)
    health.working()
    assert (health.state, health.error, health.sessions) == ("connected", None, 1)
    health.failed("down")
    health.opened()
    assert health.sessions == 2  # one reconnect


def test_a_mailbox_that_never_connects_is_unhealthy_after_the_threshold() -> None:
    never = SourceHealth()
    never.since = utcnow() - timedelta(seconds=61)
    healthy, body = assess(THRESHOLDS, {"a": never}, healthy_probe(), None)
    assert not healthy and body["problems"] == [
        f"mailbox a: not connected yet since {body['checks']['mailboxes']['a']['since']}: no session"
    ]


def test_a_mailbox_another_instance_holds_is_on_standby_not_down() -> None:
    # Two instances on four mailboxes: each runs two; the other two must not read as failing or down here.
    long_ago = utcnow() - timedelta(seconds=600)
    health = {name: SourceHealth(since=long_ago) for name in ("a", "b")}
    health["a"].opened()
    running: set[str] = {"a"}
    mailboxes = LeasedMailboxes(health, lambda: running)
    healthy, body = assess(THRESHOLDS, mailboxes, healthy_probe(), None)
    assert healthy, body["problems"]
    assert body["checks"]["mailboxes"]["b"]["state"] == "standby"
    metrics = Metrics(["a", "b"], [])
    metrics.state.mailboxes = mailboxes
    assert per_box(metrics, "mailbridge_mailbox_up", "a") == 1.0
    assert ("mailbridge_mailbox_up", (("mailbox", "b"),)) not in samples(metrics)
    # Once this instance takes b's lease and has not connected yet, it is its own again (and not up).
    running.add("b")
    assert per_box(metrics, "mailbridge_mailbox_up", "b") == 0.0
    healthy, body = assess(THRESHOLDS, mailboxes, healthy_probe(), None)
    assert not healthy and body["checks"]["mailboxes"]["b"]["state"] == "not connected yet"


def test_an_unanswering_database_and_a_stuck_outbox_are_named() -> None:
    healthy, body = assess(THRESHOLDS, {}, Probe(utcnow(), None, "no answer within 5 s"), None)
    assert not healthy and body["problems"] == ["database: no answer within 5 s"]
    healthy, body = assess(THRESHOLDS, {}, healthy_probe(depth=3, queued_seconds_ago=899), None)
    assert healthy and body["checks"]["outbox"]["unsent"] == 3
    healthy, body = assess(THRESHOLDS, {}, healthy_probe(depth=3, queued_seconds_ago=901), None)
    assert not healthy and body["problems"][0].startswith("outbox: stuck, the oldest unsent mail was queued 901 s ago")


def test_a_failing_crm_is_reported_but_mail_still_flows() -> None:
    since = utcnow()
    healthy, body = assess(THRESHOLDS, {}, healthy_probe(), lambda: (since, "HTTP 502"))
    assert healthy and body["checks"]["crm"] == {
        "ok": False,
        "since": since.isoformat(timespec="seconds"),
        "error": "HTTP 502",
    }


@pytest.mark.parametrize(
    ("listen", "host", "port"), [("127.0.0.1:9478", "127.0.0.1", 9478), ("[::1]:9100", "::1", 9100)]
)
def test_listen_address(tmp_path: Path, listen: str, host: str, port: int) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path), "http": {"listen": listen}}))
    http = load_settings(path).http
    assert http is not None and (http.host, http.port) == (host, port)


@pytest.mark.parametrize("listen", ["9478", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:http", ":9478"])
def test_a_bad_listen_address_names_the_key(tmp_path: Path, listen: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path), "http": {"listen": listen}}))
    with pytest.raises(ConfigError, match=r"http\.listen.*HOST:PORT"):
        load_settings(path)


def test_off_unless_configured(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path)}))
    assert load_settings(path).http is None


def test_run_refuses_to_start_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "http": {"listen": f"127.0.0.1:{port}"}}))
        done = subprocess.run(
            [sys.executable, "-m", "mailbridge", "run", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "MAILBRIDGE_CONFIG": ""},
        )
    assert done.returncode == 2, done.stderr
    assert f"error: http.listen 127.0.0.1:{port}:" in done.stderr


def test_sla_reminders_and_breaches_are_counted_by_the_daemons_check(tmp_path: Path) -> None:
    start = datetime(2026, 11, 16, 9, 0, tzinfo=UTC)  # a Monday, in working hours
    with time_machine.travel(start - timedelta(hours=1), tick=False):  # SLAs apply from the first start
        app = make_app(
            tmp_path,
            [{"type": "maildir", "name": "support", "path": str(tmp_path / "md"), "address": "s@helpdesk.example"}],
            outbox={"domain": "helpdesk.example", "deliver_to_directory": str(tmp_path / "sent")},
            agents=[{"address": "agata@helpdesk.example", "queues": ["general"]}],
            routing={"default_queue": "general"},
            sla={
                "policies": {"P3": {"first_response": "4h", "resolution": "40h"}},
                "calendar": {"timezone": "UTC", "working_hours": ["08:00-16:00"]},
                "escalation_contacts": {"*": ["lead@helpdesk.example"]},
            },
            http={"listen": "127.0.0.1:9478"},
        )
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "1.eml").write_bytes(sample_mail("Nie działa logowanie"))
    try:
        with time_machine.travel(start, tick=False):
            asyncio.run(app.ingest([inbox], mailbox="support"))
        for hours in (3, 3.5, 4, 5):  # the reminder at 75 %, checked again, the breach, checked again
            with time_machine.travel(start + timedelta(hours=hours), tick=False):
                asyncio.run(app.check_sla())
    finally:
        app.close()
    assert app.metrics is not None
    found = samples(app.metrics)
    assert found[("mailbridge_sla_reminders_total", (("mailbox", "support"),))] == 1
    assert found[("mailbridge_sla_breaches_total", (("mailbox", "support"),))] == 1


async def test_the_crm_reports_since_when_it_fails_until_it_answers_again(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there yet: connection refused
    crm = Crm(CrmSettings(url=f"http://127.0.0.1:{port}/c?email={{address}}", pause_after_failure_seconds=0.2))
    try:
        assert crm.failing is None
        await crm.look_up(["a@example.com"])
        failing = crm.failing
        assert failing is not None and "cannot be reached" in failing[1]
        await asyncio.sleep(0.3)
        with crm_server(customers={"b@example.com": {"name": "B"}}, listen_port=port):
            await crm.look_up(["b@example.com"])
        assert crm.failing is None
    finally:
        await crm.aclose()


async def test_a_send_that_would_outlast_its_claim_is_cut_off_and_retried(
    tmp_path: Path, sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another instance may claim the mail once the claim runs out: a send still going then could go twice.
    # Here the claim leaves ~1.5 s for the send and the server takes 3 s to answer the mail's data.
    monkeypatch.setattr(sender_module, "CLAIM_MARGIN_SECONDS", 28.5)
    sink.handler.delay = 3.0
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "a.eml").write_bytes(sample_mail(sender="customer@example.com"))
    box = {"type": "maildir", "name": "support", "path": str(tmp_path / "maildir"), "address": "s@helpdesk.example"}
    outbox = {"first_retry_seconds": 0.1, "max_retry_seconds": 1, "claim_seconds": 30}
    app = make_app(tmp_path, [box], smtp=sink.config(), outbox=outbox)
    tallies: list[OutboxTally] = []
    try:
        await app.ingest([inbox], mailbox="support")
        sender = OutboxSender(app.sender.db, app.settings, asyncio.Event(), tallies.append)
        await sender.deliver_due()
        assert sum(tallies, OutboxTally()) == {("support", "retry"): 1}
        with app.db.reader() as session:
            (mail,) = session.scalars(select(OutboxMail)).all()
            assert (mail.status, mail.attempts) == (OutboxStatus.PENDING, 1)
            assert mail.claimed_by is None and "claim ran out" in (mail.last_error or "")
        sink.handler.delay = 0.0
        await asyncio.sleep(0.2)
        await sender.deliver_due()
        with app.db.reader() as session:
            (mail,) = session.scalars(select(OutboxMail)).all()
            assert mail.status == OutboxStatus.SENT
    finally:
        app.close()
    # The cut-off one may have reached the server as well (as a mail in flight at a crash): same Message-ID.
    assert 1 <= len(sink.received) <= 2 and len({r.message_id for r in sink.received}) == 1
