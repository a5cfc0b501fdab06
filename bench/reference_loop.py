#!/usr/bin/env python3
"""How fast is this host today? The intake issue's own yardstick, measured beside mailbridge.

Issue 3 states its target (>= 500 mails/s) against two figures of "this 2-core machine": a plain
"fetch one, parse, insert, commit" loop over this stack reaches about 280 mails/s, batched fetching with
parsing on both cores about 800. The shared host's speed has varied by a third between days (the same
commit measured 526 and 314 mails/s), so a figure of ours means little without the yardstick measured
in the same minutes. This script measures the first yardstick, as its words describe it, on the same
Dovecot, corpus and disk as `run_bench.py`'s `imap` benchmark, interleaved with `mailbridge run --once`:

* the plain loop (``--loop``, run as a subprocess so its CPU is counted alike): aioimaplib, one
  ``UID FETCH n BODY.PEEK[]`` per mail; mail-parser's ``parse_from_bytes``; one INSERT of the headers,
  text body and raw bytes into a SQLite table (WAL, synchronous=FULL: the durability mailbridge's
  default has); one commit per mail. No threading, no attachments to disk, no IMAP move.
* mailbridge: `run_bench.py`'s `imap` run (baseline configuration) on a fresh copy of the same INBOX.

The ratio (mailbridge / plain loop) is what carries from day to day; the loop's figure against the
issue's 280 says how this host compares with the machine the issue describes.

Usage::

    .venv/bin/python bench/reference_loop.py --count 2000 --repeat 1        # quick
    .venv/bin/python bench/reference_loop.py                                  # N = 10,000, 3 runs each
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent

import run_bench  # noqa: E402  # beside this script (sys.path[0]); it puts the project root on sys.path

DEFAULT_OUTPUT = BENCH_DIR / "results" / "reference-loop.json"
ISSUE_PLAIN_LOOP_MAILS_PER_S = 280.0
_FETCHED_UID = re.compile(rb"UID (\d+)")


async def plain_loop(host: str, port: int, user: str, password: str, database: Path) -> int:
    """Fetch one, parse, insert, commit — the simplest correct intake over this stack."""
    import aioimaplib
    import mailparser
    from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, Text, create_engine, event, insert

    engine = create_engine(f"sqlite:///{database}")

    @event.listens_for(engine, "connect")
    def _durable(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=FULL")

    metadata = MetaData()
    mails = Table(
        "mails",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("uid", Integer, nullable=False, unique=True),
        Column("message_id", String),
        Column("sender", String),
        Column("subject", String),
        Column("body", Text),
        Column("attachments", Integer),
        Column("raw", LargeBinary),
    )
    metadata.create_all(engine)

    client = aioimaplib.IMAP4(host=host, port=port, timeout=60)
    await client.wait_hello_from_server()
    await client.login(user, password)
    await client.select("INBOX")
    search = await client.uid_search("ALL")
    uids = [int(uid) for uid in search.lines[0].split()]
    stored = 0
    for uid in uids:
        response = await client.uid("fetch", str(uid), "(UID BODY.PEEK[])")
        raw = bytes(next(line for line in response.lines if isinstance(line, bytearray)))
        fetched_uid = _FETCHED_UID.search(bytes(response.lines[0]))
        if fetched_uid is None or int(fetched_uid.group(1)) != uid:
            raise RuntimeError(f"UID FETCH {uid} answered {response.lines[0]!r}")
        mail = mailparser.parse_from_bytes(raw)
        with engine.begin() as connection:
            connection.execute(
                insert(mails).values(
                    uid=uid,
                    message_id=mail.message_id,
                    sender=str(mail.from_),
                    subject=mail.subject,
                    body=mail.body,
                    attachments=len(mail.attachments),
                    raw=raw,
                )
            )
        stored += 1
    await client.logout()
    engine.dispose()
    return stored


def run_loop(bench: run_bench.Bench, corpus: run_bench.Corpus, repeat: int) -> run_bench.RunResult:
    run_dir = bench._run_dir("plain-loop")
    load = os.getloadavg()[0]
    user = bench.fresh_user(corpus.files())
    server = bench.server
    try:
        cpu_before = run_bench.dovecot_cpu_s(server)
        cmd = [bench.python, str(Path(__file__).resolve()), "--loop", server.host, str(server.port), user]
        cmd += [run_bench.PASSWORD, str(run_dir / "plain.db")]
        m = run_bench.measure(cmd, cwd=run_dir, log_dir=run_dir)
        time.sleep(0.2)  # let Dovecot's master reap the imap process, so its CPU time is counted
        dovecot_cpu = run_bench.dovecot_cpu_s(server) - cpu_before
        if m.returncode != 0:
            raise run_bench.BenchError(f"the plain loop exited with {m.returncode}:\n{run_bench._tail(m.stderr_path)}")
        stored = int(m.stdout.split()[-1])
        if stored != corpus.count:
            raise run_bench.BenchError(f"the plain loop stored {stored} mails, expected {corpus.count}")
    finally:
        (run_dir / "plain.db").unlink(missing_ok=True)
        for suffix in ("-wal", "-shm"):
            (run_dir / f"plain.db{suffix}").unlink(missing_ok=True)
        bench.drop_user(user)
    return bench._result(
        "plain-loop",
        run_bench.Variant("plain loop", {}),
        repeat,
        corpus,
        m,
        dovecot_cpu_s=dovecot_cpu,
        extra={"loadavg_1m": load},
    )


def _median(runs: list[run_bench.RunResult], key: str) -> float:
    return statistics.median(getattr(run, key) for run in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved")
    parser.add_argument("--no-mailbridge", action="store_true", help="only the plain loop")
    parser.add_argument("--cache-dir", type=Path, default=run_bench.DEFAULT_CACHE)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--loop", nargs=5, metavar=("HOST", "PORT", "USER", "PASSWORD", "DB"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loop:
        host, port, user, password, database = args.loop
        print(asyncio.run(plain_loop(host, int(port), user, password, Path(database))))
        return 0

    bench_args = run_bench.build_parser().parse_args(["--cache-dir", str(args.cache_dir)])
    corpus = run_bench.ensure_corpus(args.cache_dir, args.count, args.seed)
    baseline = run_bench.Variant("baseline", {})
    loops: list[run_bench.RunResult] = []
    ours: list[run_bench.RunResult] = []
    with tempfile.TemporaryDirectory(prefix="mb-reference-") as scratch:
        bench = run_bench.Bench(bench_args, Path(scratch))
        try:
            for repeat in range(1, args.repeat + 1):
                run_bench.log(f"N={args.count} plain loop run {repeat}/{args.repeat} ...")
                loops.append(run_loop(bench, corpus, repeat))
                run_bench.log(f"  {loops[-1].mails_per_s:.0f} mails/s, CPU {loops[-1].cpu_s:.1f} s")
                if not args.no_mailbridge:
                    run_bench.log(f"N={args.count} mailbridge run --once run {repeat}/{args.repeat} ...")
                    ours.append(bench.run_imap(corpus, baseline, repeat))
                    run_bench.log(
                        f"  {ours[-1].intake_mails_per_s:.0f} mails/s to the last ticket, CPU {ours[-1].cpu_s:.1f} s"
                    )
        finally:
            bench.close()
    loop_rate = _median(loops, "mails_per_s")
    result: dict[str, Any] = {
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": run_bench.environment(),
        "count": args.count,
        "plain_loop": {"runs": [asdict(r) for r in loops], "summary": run_bench.summarize_runs(loops)},
        "host_vs_issue": loop_rate / ISSUE_PLAIN_LOOP_MAILS_PER_S,
    }
    print(
        f"plain loop: {loop_rate:.0f} mails/s (median of {len(loops)}); the issue's machine: 280 "
        f"-> this host runs at {loop_rate / ISSUE_PLAIN_LOOP_MAILS_PER_S:.2f}x"
    )
    if ours:
        ours_rate = statistics.median(r.intake_mails_per_s or 0.0 for r in ours)
        result["mailbridge"] = {"runs": [asdict(r) for r in ours], "summary": run_bench.summarize_runs(ours)}
        result["mailbridge_vs_plain_loop"] = ours_rate / loop_rate
        print(
            f"mailbridge: {ours_rate:.0f} mails/s to the last ticket = {ours_rate / loop_rate:.2f}x the plain "
            f"loop; at the issue's 280 that is {ours_rate / loop_rate * ISSUE_PLAIN_LOOP_MAILS_PER_S:.0f} mails/s"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
