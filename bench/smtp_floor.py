#!/usr/bin/env python3
"""The outbox's delivery floor: the same rendered acknowledgements sent by bare aiosmtplib and by our
sender, to the benchmark's SMTP sink, in CPU per mail.

Input: an SQLite database whose outbox holds the N pending acknowledgements (`--prepare DIR` makes one:
`mailbridge ingest --no-notify` of the corpus, then `bench/ack_phase.py`, as the outbox benchmark does).
Every case runs in a process of its own, so its CPU is its own; the sink (`tests/support/smtp_sink.py`,
the aiosmtpd handler run_bench uses) runs in another process and reports its CPU between the cases.

* `bare-K`: aiosmtplib alone, K reused sessions, `SMTP.sendmail(from, recipients, raw bytes)` for each
  mail, nothing recorded: the floor for any SMTP client on this stack.
* `sender-K[@LABEL]`: `OutboxSender.deliver_due()` on a fresh copy of the database (claims, SMTP, the
  outcome committed before a connection sends its next mail, the tallies over a pipe as the sender
  process reports them), logging set up as in the sender process. `--code LABEL=DIR` runs another tree's
  `mailbridge/` (e.g. `git archive BASE mailbridge | tar -x -C DIR`), for interleaved before/after runs.

Rounds are interleaved (every case once per round); the table shows the median (min-max) per case.

    python bench/smtp_floor.py --prepare /tmp/obx --corpus bench/out/cache/n10000-seed1
    python bench/smtp_floor.py --database /tmp/obx/data/mailbridge.db --cases bare-1,bare-4,sender-4 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- the sink, in a process of its own ----------------------------------------------------------------


def serve_sink() -> int:
    """Start the sink; answer "stats" (mails received, CPU s) and "quit" on stdin."""
    sys.path.insert(0, str(ROOT))
    from tests.support.smtp_sink import SmtpSink

    sink = SmtpSink().start()
    print(json.dumps({"port": sink.port}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "stats":
            received = sink.received
            print(json.dumps({"received": len(received), "cpu_s": cpu_seconds()}), flush=True)
            sink.clear()  # keeps its memory flat over many rounds; counted before
        elif command == "quit":
            break
    sink.stop()
    return 0


class SinkProcess:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-sink"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.port = int(json.loads(self._line())["port"])

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit("the sink exited")
        return line

    def stats(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write("stats\n")
        self.process.stdin.flush()
        return dict(json.loads(self._line()))

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        self.process.wait(timeout=30)


# ---- bare aiosmtplib ----------------------------------------------------------------------------------


def load_mails(database: Path) -> list[tuple[str, list[str], bytes]]:
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT envelope_from, recipients, raw FROM outbox ORDER BY id").fetchall()
    return [(sender, json.loads(recipients), bytes(raw)) for sender, recipients, raw in rows]


def run_bare(database: Path, port: int, sessions: int) -> dict[str, Any]:
    import aiosmtplib

    mails = load_mails(database)

    async def deliver() -> None:
        queue = iter(mails)

        async def session() -> None:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5)
            await client.connect()
            for sender, recipients, raw in queue:
                await client.sendmail(sender, recipients, raw)
            await client.quit()

        await asyncio.gather(*(session() for _ in range(sessions)))

    started, cpu = time.perf_counter(), cpu_seconds()
    asyncio.run(deliver())
    return {"mails": len(mails), "wall_s": time.perf_counter() - started, "cpu_s": cpu_seconds() - cpu}


# ---- our sender ---------------------------------------------------------------------------------------


def run_sender(data_dir: Path, port: int, connections: int, code: Path | None) -> dict[str, Any]:
    sys.path.insert(0, str(code or ROOT))
    import multiprocessing

    import yaml
    from sqlalchemy import event

    from mailbridge.config import load_settings
    from mailbridge.db import Database
    from mailbridge.logs import setup_logging
    from mailbridge.notify.sender import OutboxSender

    config = data_dir / "mailbridge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(data_dir),
                "mailboxes": [
                    {
                        "type": "maildir",
                        "name": "support",
                        "path": str(data_dir / "maildir"),
                        "address": "support@bench.example",
                    }
                ],
                "smtp": {"host": "127.0.0.1", "port": port, "security": "none", "timeout": 5},
                "outbox": {"domain": "bench.example", "connections": connections},
            }
        )
    )
    settings = load_settings(config)
    setup_logging(settings.logging.level, settings.logging.format)
    # As in the sender process: its tallies go over a pipe, read by a thread of the daemon (here: of
    # another process, so that reading them is not counted as the sender's CPU).
    reports, child_end = multiprocessing.Pipe()
    reader = multiprocessing.Process(target=_drain, args=(reports, child_end))
    reader.start()
    reports.close()
    db = Database(settings.database_url, fsync_each_commit=False)
    commits = [0]
    event.listen(db.engine, "commit", lambda _connection: commits.__setitem__(0, commits[0] + 1))

    def send_report(tally: Any) -> None:
        child_end.send(dict(tally))

    sender = OutboxSender(db, settings, asyncio.Event(), send_report)
    started, cpu = time.perf_counter(), cpu_seconds()
    tried = asyncio.run(sender.deliver_due())
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    threads = thread_cpu_seconds()
    db.close()
    child_end.close()
    reader.join()
    with sqlite3.connect(settings.database_url.removeprefix("sqlite:///")) as check:
        sent = check.execute("SELECT count(*) FROM outbox WHERE status = 'sent'").fetchone()[0]
    return {"mails": tried, "sent": sent, "wall_s": wall, "cpu_s": cpu, "commits": commits[0], "threads": threads}


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds of each live thread of this process, by Python thread name (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds: dict[str, float] = {}
    for thread in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        name = "db" if thread.name.startswith("db") else thread.name
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def _drain(connection: Any, writer: Any) -> None:
    writer.close()  # the forked copy: EOF comes once the sender closes its end
    try:
        while True:
            connection.recv()
    except EOFError:
        return


# ---- the driver ---------------------------------------------------------------------------------------


def prepare(directory: Path, corpus: Path) -> Path:
    """A data directory whose outbox holds an acknowledgement for every mail of the corpus."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "mailbridge.yaml"
    config.write_text(
        f"""data_dir: {directory / "data"}
storage: {{fsync: false}}
mailboxes:
- type: maildir
  name: support
  path: {directory / "maildir"}
  address: support@bench.example
  acknowledge_backlog: true
  rate_limit: {{per_hour: 10000000, per_day: 10000000}}
smtp: {{host: 127.0.0.1, port: 25, security: none}}
outbox: {{domain: bench.example}}
"""
    )
    python = sys.executable
    ingest = [python, "-m", "mailbridge", "ingest", str(corpus), "--mailbox", "support", "--no-notify"]
    subprocess.run([*ingest, "--config", str(config)], cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
    acks = [python, str(BENCH_DIR / "ack_phase.py"), "--config", str(config), "--corpus", str(corpus)]
    subprocess.run([*acks, "--mailbox", "support"], cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
    database = directory / "data" / "mailbridge.db"
    with sqlite3.connect(database) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return database


def run_case(
    case: str, database: Path, sink: SinkProcess, codes: dict[str, Path], profile: Path | None = None
) -> dict[str, Any]:
    kind, _, rest = case.partition("-")
    count, _, label = rest.partition("@")
    args = [sys.executable, __file__, f"--run-{kind}", "--port", str(sink.port), "--sessions", count]
    if profile is not None:  # py-spy's collapsed stacks of every thread (the CPU figures then include it)
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        args = [py_spy, "record", "--threads", "-r", "250", "-f", "raw", "-o", str(profile), "--", *args]
    scratch: Path | None = None
    if kind == "bare":
        args += ["--database", str(database)]
    else:
        scratch = Path(tempfile.mkdtemp(prefix="smtp-floor-"))
        (scratch / "data").mkdir()
        shutil.copy(database, scratch / "data" / "mailbridge.db")
        for name in ("threading.secret",):
            if (database.parent / name).exists():
                shutil.copy(database.parent / name, scratch / "data" / name)
        args += ["--data-dir", str(scratch / "data")]
        if label:
            args += ["--code", str(codes[label])]
    before = sink.stats()
    try:
        done = subprocess.run(args, capture_output=True, text=True, check=False)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    after = sink.stats()
    if done.returncode != 0:
        raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
    result = dict(json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1]))
    result["sink_received"] = after["received"]
    result["sink_cpu_s"] = after["cpu_s"] - before["cpu_s"]
    if result["sink_received"] != result["mails"]:
        raise SystemExit(f"{case}: the sink received {result['sink_received']} of {result['mails']} mails")
    return result


def summary(values: list[float], scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    scaled = [v * scale for v in values]
    median = statistics.median(scaled)
    return f"{fmt.format(median)} ({fmt.format(min(scaled))}-{fmt.format(max(scaled))})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", type=Path, help="make a data directory with the queued acknowledgements")
    parser.add_argument("--corpus", type=Path, default=BENCH_DIR / "out" / "cache" / "n10000-seed1")
    parser.add_argument("--database", type=Path, help="an SQLite database with the pending outbox")
    parser.add_argument("--cases", default="bare-1,bare-4,sender-4", help="bare-K, sender-K, sender-K@LABEL")
    parser.add_argument("--code", action="append", default=[], help="LABEL=DIR: another tree's mailbridge/")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, help="JSON with every run")
    parser.add_argument("--profile", type=Path, help="py-spy: write DIR/CASE-ROUND.txt (collapsed stacks)")
    # The cases' own processes:
    parser.add_argument("--serve-sink", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-sender", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sessions", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve_sink:
        return serve_sink()
    if args.run_bare:
        print(json.dumps(run_bare(args.database, args.port, args.sessions)))
        return 0
    if args.run_sender:
        code = Path(args.code[0]) if args.code else None
        print(json.dumps(run_sender(args.data_dir, args.port, args.sessions, code)))
        return 0
    if args.prepare:
        print(prepare(args.prepare.resolve(), args.corpus.resolve()))
        return 0
    if args.database is None:
        parser.error("--database (or --prepare) is required")
    codes = {label: Path(directory).resolve() for label, _, directory in (c.partition("=") for c in args.code)}
    cases = args.cases.split(",")
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in cases}
    sink = SinkProcess()
    try:
        for round_number in range(args.rounds):
            for case in cases:
                profile = args.profile / f"{case}-{round_number + 1}.txt" if args.profile else None
                result = run_case(case, args.database.resolve(), sink, codes, profile)
                result["loadavg_1m"] = os.getloadavg()[0]
                runs[case].append(result)
                mails = result["mails"]
                print(
                    f"round {round_number + 1} {case}: {mails / result['wall_s']:.0f} mails/s, client "
                    f"{result['cpu_s'] / mails * 1000:.3f} ms CPU/mail, sink {result['sink_cpu_s'] / mails * 1000:.3f}"
                    f" ms CPU/mail, commits {result.get('commits', '-')}, threads {result.get('threads', '-')},"
                    f" load {result['loadavg_1m']:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        sink.close()
    print("| case | mails/s | client CPU ms/mail | sink CPU ms/mail | commits |")
    print("|---|---|---|---|---|")
    for case, results in runs.items():
        rate = summary([r["mails"] / r["wall_s"] for r in results], fmt="{:.0f}")
        client = summary([r["cpu_s"] / r["mails"] for r in results], 1000)
        sink_cpu = summary([r["sink_cpu_s"] / r["mails"] for r in results], 1000)
        commits = summary([float(r["commits"]) for r in results], fmt="{:.0f}") if "commits" in results[0] else "-"
        print(f"| {case} | {rate} | {client} | {sink_cpu} | {commits} |")
    if args.output:
        args.output.write_text(json.dumps({"cases": runs, "rounds": args.rounds}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
