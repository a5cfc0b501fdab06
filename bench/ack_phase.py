#!/usr/bin/env python3
"""The rendering half of the outbox benchmark: acknowledge N stored tickets through the code the pipeline
runs for each new ticket (`Acknowledger.classify`, `.plan`, `.enqueue`: the loop rules, the rate-limit
query, the Jinja sandbox render of subject, text and HTML, the signed Message-ID, the RFC 5322 bytes, the
outbox INSERT), one transaction per batch as the pipeline commits them.

The tickets were stored beforehand (`mailbridge ingest --no-notify`, not measured). Only the acknowledgement
needs each customer mail, and it reads nothing but its headers, so the mails are parsed from their header
blocks before the clock starts. Prints JSON: the count, the seconds (wall and CPU) of the timed loop, and the wall-clock
time it started (the end-to-end phase measures from there to the last mail at the SMTP sink).

    python bench/ack_phase.py --config run/mailbridge.yaml --corpus bench/out/cache/n10000-seed1 --mailbox support
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import select  # noqa: E402

from mailbridge.app import build_app  # noqa: E402
from mailbridge.config import load_settings  # noqa: E402
from mailbridge.ingest.mail import ParsedMail  # noqa: E402
from mailbridge.ingest.parse import parse  # noqa: E402
from mailbridge.ingest.raw import RawMail  # noqa: E402
from mailbridge.models import Article, Ticket, utcnow  # noqa: E402
from mailbridge.notify.acks import NewTicket  # noqa: E402


def header_block(path: Path) -> bytes:
    data = path.read_bytes()
    end = min((i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0), default=len(data))
    return data[:end] + b"\r\n\r\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True, help="the .eml files that were ingested")
    parser.add_argument("--mailbox", required=True)
    parser.add_argument("--batch", type=int, default=50, help="mails per transaction (the pipeline's batch)")
    args = parser.parse_args(argv)

    app = build_app(load_settings(args.config))
    answers = app.answers
    with app.db.reader() as session:
        stored = {
            message_id: (ticket_id, number or "", article_id)
            for message_id, ticket_id, number, article_id in session.execute(
                select(Article.message_id, Ticket.id, Ticket.number, Article.id).join(
                    Ticket, Ticket.id == Article.ticket_id
                )
            )
        }
    work: list[tuple[RawMail, ParsedMail, tuple[int, str, int]]] = []
    for path in sorted(args.corpus.glob("*.eml")):
        mail = parse(header_block(path))
        if mail.message_id not in stored:
            raise SystemExit(f"{path}: no stored ticket with Message-ID {mail.message_id}")
        work.append((RawMail(mailbox=args.mailbox, source=str(path), data=b""), mail, stored[mail.message_id]))

    started_epoch = time.time()
    started = time.perf_counter()
    cpu_started = time.process_time()
    acknowledged = 0
    for start in range(0, len(work), args.batch):
        batch = work[start : start + args.batch]
        now = utcnow()
        with app.db.unit_of_work() as session:
            plans = answers.plan(session, [(raw, mail, answers.classify(mail)) for raw, mail, _ in batch], now)
            tickets = [
                NewTicket(raw, mail, ticket_id, number, article_id, plan)
                for (raw, mail, (ticket_id, number, article_id)), plan in zip(batch, plans, strict=True)
                if plan.to
            ]
            acknowledged += len(answers.enqueue(session, tickets, now))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    app.close()
    report = {"count": len(work), "acknowledged": acknowledged, "render_s": elapsed, "cpu_s": cpu}
    print(json.dumps({**report, "started": started_epoch}))
    return 0 if acknowledged == len(work) else 1


if __name__ == "__main__":
    sys.exit(main())
