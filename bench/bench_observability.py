"""What the daemon's metrics cost: counting a committed batch (on the intake's path), rendering /metrics
(on the event loop) and the outbox read behind /metrics and /healthz (on its own database thread),
with an outbox of many sent and some unsent mails.

    .venv/bin/python bench/bench_observability.py [--sent 100000] [--unsent 5000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from prometheus_client import generate_latest
from sqlalchemy import Table, insert

from mailbridge.db import Database
from mailbridge.ingest.ledger import SourceHealth
from mailbridge.ingest.raw import RawMail
from mailbridge.models import OutboxMail, OutboxStatus, Outcome, utcnow
from mailbridge.observability.health import Probe, read_outbox
from mailbridge.observability.metrics import Metrics
from mailbridge.pipeline import Result

MAILBOXES = ("support", "sales", "billing", "abuse")


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float, float]:
    """Median, min and max in microseconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times), min(times), max(times)


def fill_outbox(db: Database, sent: int, unsent: int) -> None:
    table = OutboxMail.__table__
    assert isinstance(table, Table)
    now = utcnow()
    rows = []
    for index in range(sent + unsent):
        rows.append(
            {
                "template": "ack",
                "mailbox": MAILBOXES[index % len(MAILBOXES)],
                "message_id": f"<bench.{index}@example.com>",
                "envelope_from": "s@example.com",
                "recipients": ["c@example.com"],
                "recipient": "c@example.com",
                "raw": b"x" * 200,
                "status": OutboxStatus.SENT if index < sent else OutboxStatus.PENDING,
                "attempts": 1,
                "next_attempt_at": now,
                "deliver_until": now + timedelta(hours=48),
                "created_at": now - timedelta(seconds=sent + unsent - index),
            }
        )
    with db.unit_of_work() as session:
        for start in range(0, len(rows), 5000):
            session.execute(insert(table), rows[start : start + 5000])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sent", type=int, default=100_000)
    parser.add_argument("--unsent", type=int, default=5_000)
    args = parser.parse_args()

    metrics = Metrics(list(MAILBOXES), list(MAILBOXES))
    batch = [
        Result(RawMail(mailbox="support", source="bench", data=b""), Outcome.STORED, reply=index % 5 == 0)
        for index in range(50)
    ]
    median, low, high = timed(lambda: metrics.count_intake(batch), 5000)
    print(f"count_intake, a batch of 50:        median {median:7.1f} µs  (min {low:.1f}, max {high:.1f}; 5000 runs)")

    with tempfile.TemporaryDirectory() as tmp:
        db = Database(f"sqlite:///{Path(tmp) / 'bench.db'}", fsync_each_commit=False)
        db.upgrade()
        fill_outbox(db, args.sent, args.unsent)
        median, low, high = timed(lambda: read_outbox(db), 50)
        print(
            f"read_outbox, {args.sent} sent + {args.unsent} unsent: median {median / 1000:7.2f} ms  "
            f"(min {low / 1000:.2f}, max {high / 1000:.2f}; 50 runs)"
        )
        metrics.state.probe = Probe(utcnow(), read_outbox(db))
        metrics.state.mailboxes = {name: SourceHealth() for name in MAILBOXES}
        db.close()
    median, low, high = timed(lambda: generate_latest(metrics.registry), 500)
    size = len(generate_latest(metrics.registry))
    print(
        f"rendering /metrics ({size} bytes):  median {median / 1000:7.2f} ms  "
        f"(min {low / 1000:.2f}, max {high / 1000:.2f}; 500 runs)"
    )


if __name__ == "__main__":
    main()
