"""/healthz and /metrics of `mailbridge run`, end to end: the daemon as a process against the private
Dovecot and the SMTP sink, scraped over HTTP and parsed with prometheus-client's own parser."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.crash_env import start_daemon
from tests.imap_env import append_many, imap_box, new_user, sample_mail, write_config
from tests.support.dovecot import Dovecot, free_port
from tests.support.smtp_sink import SmtpSink

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Dovecot.available(), reason="dovecot is not installed")]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Endpoint:
    def __init__(self, port: int, daemon: subprocess.Popen[bytes], log: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.daemon = daemon
        self.log = log

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def health(self) -> tuple[int, dict[str, Any]]:
        status, body = self.get("/healthz")
        return status, json.loads(body)

    def metrics(self) -> Samples:
        status, body = self.get("/metrics")
        assert status == 200
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.daemon.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{what}: not within {timeout} s\n{self.log.read_text()[-3000:]}"
            time.sleep(0.1)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Dovecot]:
    dovecot = Dovecot.start(tmp_path / "dovecot")
    yield dovecot
    dovecot.stop()


@pytest.fixture
def endpoint(tmp_path: Path, server: Dovecot, sink: SmtpSink) -> Iterator[Endpoint]:
    port = free_port()
    boxes = [
        imap_box(server, new_user(server, "sales"), address="sales@helpdesk.example", poll_interval=1),
        imap_box(server, new_user(server, "help"), address="help@helpdesk.example", poll_interval=1),
    ]
    config = write_config(
        tmp_path,
        boxes,
        smtp=sink.config(),
        outbox={"first_retry_seconds": 0.5, "max_retry_seconds": 1, "poll_seconds": 0.2, "domain": "helpdesk.example"},
        http={
            "listen": f"127.0.0.1:{port}",
            "mailbox_failing_seconds": 1,
            "outbox_stuck_seconds": 3,
            "database_timeout_seconds": 5,
        },
    )
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, log)
    endpoint = Endpoint(port, daemon, log)
    try:
        endpoint.wait_for("the endpoint answers", lambda: _answers(endpoint))
        yield endpoint
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, log.read_text()[-3000:]


def _answers(endpoint: Endpoint) -> bool:
    try:
        endpoint.get("/healthz")
    except OSError:
        return False
    return True


def _connected(endpoint: Endpoint) -> bool:
    status, body = endpoint.health()
    return status == 200 and all(box["state"] == "connected" for box in body["checks"]["mailboxes"].values())


def test_metrics_count_each_mail_once_and_health_follows_the_servers(
    endpoint: Endpoint, server: Dovecot, sink: SmtpSink, report: Callable[[str], None]
) -> None:
    sales = next(name for name in server.users if name.startswith("sales"))
    help_ = next(name for name in server.users if name.startswith("help"))
    endpoint.wait_for("both mailboxes connected", lambda: _connected(endpoint))
    before = endpoint.metrics()
    assert value(before, "mailbridge_tickets_opened_total", mailbox=sales) == 0
    assert value(before, "mailbridge_outbox_depth", mailbox=sales) == 0
    assert value(before, "mailbridge_database_up") == 1
    assert ("process_resident_memory_bytes", ()) in before  # the process collector is there

    delivered = {sales: 7, help_: 4}
    for name, count in delivered.items():
        append_many(server, server.users[name], [sample_mail(sender=f"c{i}@{name}.example") for i in range(count)])
    endpoint.wait_for(
        "every mail fetched",
        lambda: all(
            value(endpoint.metrics(), "mailbridge_mails_fetched_total", mailbox=name) == count
            for name, count in delivered.items()
        ),
    )
    endpoint.wait_for("every acknowledgement sent", lambda: len(sink.received) == sum(delivered.values()))
    # The sender's process reports each commit of "sent" marks after it: the counters follow shortly.
    endpoint.wait_for(
        "the sent mails counted",
        lambda: all(
            value(endpoint.metrics(), "mailbridge_mails_sent_total", mailbox=name) >= count
            for name, count in delivered.items()
        ),
    )
    after = endpoint.metrics()
    for name, count in delivered.items():
        assert value(after, "mailbridge_tickets_opened_total", mailbox=name) == count
        assert value(after, "mailbridge_replies_threaded_total", mailbox=name) == 0
        assert value(after, "mailbridge_mails_quarantined_total", mailbox=name) == 0
        assert value(after, "mailbridge_mails_sent_total", mailbox=name) == count
        assert value(after, "mailbridge_outbox_depth", mailbox=name) == 0
        assert value(after, "mailbridge_outbox_oldest_age_seconds", mailbox=name) == 0
        assert value(after, "mailbridge_smtp_failures_total", mailbox=name, outcome="retry") == 0
        assert value(after, "mailbridge_mailbox_up", mailbox=name) == 1
    status, body = endpoint.health()
    assert status == 200 and body["status"] == "ok" and body["problems"] == []

    # IMAP down: 503 naming both mailboxes once they fail for longer than mailbox_failing_seconds.
    server.stop()
    endpoint.wait_for("503 while Dovecot is down", lambda: endpoint.health()[0] == 503)
    endpoint.wait_for(
        "both mailboxes named",
        lambda: all(any(f"mailbox {name}:" in p for p in endpoint.health()[1]["problems"]) for name in delivered),
    )
    status, body = endpoint.health()
    assert body["checks"]["mailboxes"][sales]["state"] == "failing" and body["checks"]["mailboxes"][sales]["error"]
    assert body["checks"]["database"]["ok"] and body["checks"]["outbox"]["ok"]
    assert value(endpoint.metrics(), "mailbridge_mailbox_up", mailbox=sales) == 0
    server.restart()
    endpoint.wait_for("200 after Dovecot is back", lambda: _connected(endpoint))
    back = endpoint.metrics()
    for name in delivered:
        assert value(back, "mailbridge_mailbox_reconnects_total", mailbox=name) >= 1
        assert value(back, "mailbridge_mailbox_failures_total", mailbox=name) >= 1

    # SMTP down: the outbox grows, its oldest mail ages, and past outbox_stuck_seconds /healthz says so.
    port = sink.port
    sink.stop()
    append_many(server, server.users[sales], [sample_mail(sender=f"late{i}@example.com") for i in range(2)])
    endpoint.wait_for(
        "two mails waiting", lambda: value(endpoint.metrics(), "mailbridge_outbox_depth", mailbox=sales) == 2
    )
    first_age = value(endpoint.metrics(), "mailbridge_outbox_oldest_age_seconds", mailbox=sales)
    endpoint.wait_for(
        "a failed attempt counted",
        lambda: value(endpoint.metrics(), "mailbridge_smtp_failures_total", mailbox=sales, outcome="retry") >= 1,
    )
    endpoint.wait_for("503: the outbox is stuck", lambda: endpoint.health()[0] == 503, timeout=30)
    status, body = endpoint.health()
    assert [p for p in body["problems"] if p.startswith("outbox: stuck")], body
    assert not [p for p in body["problems"] if p.startswith("mailbox")], body
    assert body["checks"]["outbox"]["unsent"] == 2 and body["checks"]["outbox"]["oldest_age_seconds"] > 3
    stuck = endpoint.metrics()
    assert value(stuck, "mailbridge_outbox_oldest_age_seconds", mailbox=sales) > max(first_age, 3)
    assert value(stuck, "mailbridge_tickets_opened_total", mailbox=sales) == delivered[sales] + 2

    restarted = SmtpSink(port).start()
    try:
        endpoint.wait_for("the outbox drained", lambda: len(restarted.received) == 2)
        endpoint.wait_for("200 again", lambda: endpoint.health()[0] == 200)
        endpoint.wait_for(
            "the two counted as sent",
            lambda: value(endpoint.metrics(), "mailbridge_mails_sent_total", mailbox=sales) >= delivered[sales] + 2,
        )
        final = endpoint.metrics()
        assert value(final, "mailbridge_outbox_depth", mailbox=sales) == 0
        assert value(final, "mailbridge_mails_sent_total", mailbox=sales) == delivered[sales] + 2
        report(
            f"/metrics: {len(final)} samples; oldest unsent mail aged to "
            f"{value(stuck, 'mailbridge_outbox_oldest_age_seconds', mailbox=sales):.1f} s while SMTP was down"
        )
    finally:
        restarted.stop()
