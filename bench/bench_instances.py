#!/usr/bin/env python3
"""Several instances on one PostgreSQL: throughput with one and with two daemons, and intake latency under IDLE.

Everything is real: a private PostgreSQL cluster (tests/support/postgres.py), a private Dovecot with four
users (mailboxes), an aiosmtpd sink, and `python -m mailbridge run` daemons as subprocesses, each with its
own data directory (as on its own machine), all on one database. The daemons are started on empty
mailboxes and the benchmark waits until the leases are spread (each of K daemons holds 4/K mailboxes).

* ``throughput``: N generated mails (bench/generate_mails.py), N/4 per mailbox, are put into the four
  Maildirs at once (a burst, seen through IDLE); measured from then to the last ticket committed
  (`intake`) and to the last acknowledgement recorded as sent (`end to end`), from the database's
  timestamps. Run with 1 and with 2 daemons, interleaved; scaling = two / one.
* ``latency``: mails are APPENDed at a steady offered rate (default 50 mails/s, round robin over the four
  mailboxes) for a while; for each mail: APPEND done -> its article visible in the database (committed;
  polled every 10 ms) -> its acknowledgement at the SMTP sink (polled every 5 ms). p50 / p99 / max.

Targets (issue 7): two instances >= 1.6x one on four mailboxes; latency p99 < 1 s at 50 mails/s.

Usage::

    .venv/bin/python bench/bench_instances.py --count 400 --latency-seconds 5 --repeat 1   # smoke
    .venv/bin/python bench/bench_instances.py            # N = 10,000, 3 interleaved runs, 60 s of latency
"""

from __future__ import annotations

import argparse
import contextlib
import email.parser
import email.policy
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for _path in (str(ROOT), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from run_bench import DEFAULT_CACHE, BenchError, ensure_corpus, environment, log  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from tests.support.dovecot import Dovecot  # noqa: E402
from tests.support.postgres import PostgresCluster  # noqa: E402
from tests.support.postgres import unavailable_reason as postgres_unavailable  # noqa: E402
from tests.support.smtp_sink import SmtpSink  # noqa: E402

MAILBOXES = 4
PASSWORD = "bench-secret"
DEFAULT_OUTPUT = BENCH_DIR / "results" / "instances.json"
SECRET = "bench-instances-shared-secret-0123456789"


class Setup:
    """The servers shared by every run: PostgreSQL, Dovecot, the SMTP sink."""

    def __init__(self, work: Path) -> None:
        reason = postgres_unavailable() or Dovecot.unavailable_reason()
        if reason:
            raise BenchError(reason)
        self.work = work
        self.postgres = PostgresCluster.start()
        self.dovecot = Dovecot.start(work / "dovecot")
        self.sink = SmtpSink().start()
        self._users = 0

    def close(self) -> None:
        self.sink.stop()
        self.dovecot.stop()
        self.postgres.stop()

    def new_users(self) -> list[str]:
        names = []
        for _ in range(MAILBOXES):
            self._users += 1
            name = f"inst{self._users}"
            self.dovecot.add_user(name, PASSWORD)
            self.dovecot.uids("INBOX", user=name)  # the first login creates the Maildir
            names.append(name)
        return names


class Run:
    """One database, four fresh mailboxes and K daemons on them."""

    def __init__(self, setup: Setup, instances: int, label: str, pin: bool) -> None:
        self.setup = setup
        self.dir = setup.work / label
        self.dir.mkdir(parents=True)
        self.url = setup.postgres.create_database()
        self.engine: Engine = create_engine(self.url)
        self.users = setup.new_users()
        self.daemons: list[subprocess.Popen[bytes]] = []
        setup.sink.handler.received.clear()
        boxes = [
            {
                "name": user,
                "host": setup.dovecot.host,
                "port": setup.dovecot.port,
                "security": "none",
                "user": user,
                "password": PASSWORD,
                "address": f"support-{user}@bench.example",
                "rate_limit": {"per_hour": 10_000_000, "per_day": 10_000_000},
            }
            for user in self.users
        ]
        for index in range(instances):
            name = f"i{index + 1}"
            config = self.dir / f"{name}.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "data_dir": str(self.dir / f"data-{name}"),
                        "database": {"url": self.url},
                        "threading": {"secret": SECRET},
                        "smtp": setup.sink.config(),
                        "outbox": {"domain": "bench.example"},
                        "instances": {"name": name},
                        "mailboxes": boxes,
                        **({"parsing": {"workers": 1}} if pin else {}),
                    }
                )
            )
            core = index % (os.cpu_count() or 1)
            with (self.dir / f"{name}.log").open("ab") as out:
                self.daemons.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "mailbridge", "run", "--config", str(config)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=ROOT,
                        # The daemon, its parser worker and its sender on one core of their own.
                        preexec_fn=(lambda core=core: os.sched_setaffinity(0, {core})) if pin else None,
                    )
                )
        share = MAILBOXES // instances
        self.wait(lambda: sorted(self.holders().values()) == [share] * instances, 90, "leases spread")
        # Mail put in before a mailbox's first fetch would be its backlog, which gets no acknowledgement.
        first_fetches = "select count(*) from mailbox_state where last_fetch_at is not null"
        self.wait(lambda: self.scalar(first_fetches) == MAILBOXES, 60, "a first fetch of every mailbox")

    def holders(self) -> dict[str, int]:
        try:
            rows = self.rows("select holder, count(*) from mailbox_leases where expires_at > now() group by holder")
        except Exception:  # the first daemon has not created the tables yet
            return {}
        return {holder: n for holder, n in rows if holder}

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as connection:
            return list(connection.execute(text(sql), params).all())

    def scalar(self, sql: str) -> Any:
        with self.engine.connect() as connection:
            return connection.execute(text(sql)).scalar()

    def wait(self, condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for daemon in self.daemons:
                if daemon.poll() is not None:
                    raise BenchError(f"a daemon exited ({daemon.returncode}) while waiting for {what}; see {self.dir}")
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: not within {timeout:.0f} s; see {self.dir}")
            time.sleep(0.1)

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.send_signal(signal.SIGTERM)
        for daemon in self.daemons:
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        self.engine.dispose()
        self.setup.postgres.drop_database(self.url.rsplit("/", 1)[1])


def drop_into_maildirs(dovecot: Dovecot, users: Sequence[str], files: Sequence[Path]) -> None:
    """Give each mailbox its share of the mails at once: linked into Maildir/new (tmp first, as an MDA does)."""
    for index, src in enumerate(files):
        user = users[index % len(users)]
        maildir = dovecot.mail_root / user / "Maildir"
        name = f"{int(time.time())}.M{index}P{os.getpid()}.bench,S={src.stat().st_size}"
        tmp = maildir / "tmp" / name
        try:
            os.link(src, tmp)
        except OSError:
            tmp.write_bytes(src.read_bytes())
        if dovecot.is_root:
            os.chown(tmp, dovecot.mail_uid, dovecot.mail_gid)
        os.rename(tmp, maildir / "new" / name)


def throughput(setup: Setup, files: Sequence[Path], instances: int, label: str, pin: bool) -> dict[str, Any]:
    run = Run(setup, instances, label, pin)
    try:
        count = len(files)
        started_wall = time.time()
        drop_into_maildirs(setup.dovecot, run.users, files)
        # Every mail has a receipt (a ticket, a reply, a duplicate or quarantined); machine mail gets no answer.
        run.wait(lambda: run.scalar("select count(*) from receipts") >= count, 1800, f"{count} receipts")
        run.wait(lambda: run.scalar("select count(*) from outbox where status = 'pending'") == 0, 600, "acks sent")
        last_receipt, last_sent, acks = run.rows(
            "select extract(epoch from max(r.created_at)), (select extract(epoch from max(sent_at)) from outbox),"
            " (select count(*) from outbox where status = 'sent') from receipts r"
        )[0]
        per_instance = dict(run.rows("select mailbox, count(*) from receipts group by mailbox"))
        intake_s, end_to_end_s = float(last_receipt) - started_wall, float(last_sent) - started_wall
        result = {
            "instances": instances,
            "mails": count,
            "acknowledgements": acks,
            "intake_s": round(intake_s, 2),
            "intake_mails_per_s": round(count / intake_s, 1),
            "end_to_end_s": round(end_to_end_s, 2),
            "end_to_end_mails_per_s": round(count / end_to_end_s, 1),
            "per_mailbox": per_instance,
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        }
        log(f"{label}: {result['end_to_end_mails_per_s']} mails/s end to end, {result['intake_mails_per_s']} intake")
        return result
    finally:
        run.close()


def latency(
    setup: Setup, files: Sequence[Path], instances: int, rate: float, seconds: float, pin: bool
) -> dict[str, Any]:
    run = Run(setup, instances, f"latency-{instances}", pin)
    headers = email.parser.BytesHeaderParser(policy=email.policy.default)
    appended: dict[str, float] = {}
    committed: dict[str, float] = {}
    acked: dict[str, float] = {}
    done = threading.Event()

    def watch_database() -> None:
        last = 0
        while not done.is_set():
            rows = run.rows("select id, message_id from articles where id > :last order by id", last=last)
            now = time.time()
            for article_id, message_id in rows:
                committed.setdefault(_bare(message_id), now)
                last = article_id
            time.sleep(0.01)

    def watch_sink() -> None:
        seen = 0
        while not done.is_set():
            received = setup.sink.handler.received
            now = time.time()
            for item in received[seen:]:
                acked.setdefault(_bare(str(item.message["In-Reply-To"])), now)
            seen = len(received)
            time.sleep(0.005)

    watchers = [threading.Thread(target=watch_database), threading.Thread(target=watch_sink)]
    for watcher in watchers:
        watcher.start()
    total = int(rate * seconds)
    try:
        with contextlib.ExitStack() as stack:
            sessions = {user: stack.enter_context(setup.dovecot.imap(user)) for user in run.users}
            start = time.monotonic()
            for index in range(total):
                raw = files[index % len(files)].read_bytes()
                message_id = str(headers.parsebytes(raw)["Message-ID"]).strip()
                # The corpus repeats for long runs: each mail gets a Message-ID of its own.
                fresh = f"<lat{index}.{message_id.strip('<>')}>"
                raw = raw.replace(message_id.encode(), fresh.encode(), 1)
                pause = start + index / rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                status, data = sessions[run.users[index % MAILBOXES]].append("INBOX", None, None, raw)
                if status != "OK":
                    raise BenchError(f"APPEND refused: {data!r}")
                appended[_bare(fresh)] = time.time()
            offered = total / (time.monotonic() - start)
        run.wait(lambda: run.scalar("select count(*) from receipts") >= total, 300, "every mail recorded")
        run.wait(lambda: run.scalar("select count(*) from outbox where status = 'pending'") == 0, 300, "acks sent")
        time.sleep(0.1)  # the watchers' last poll
    finally:
        done.set()
        for watcher in watchers:
            watcher.join()
        run.close()
    # Machine mail in the corpus (bounces, lists, auto-replies) is stored without an answer; a few are
    # quarantined (no article): each figure counts the mails it applies to.
    to_commit = [committed[m] - appended[m] for m in appended if m in committed]
    to_ack = [acked[m] - appended[m] for m in appended if m in acked]
    result = {
        "instances": instances,
        "mails": total,
        "committed": len(to_commit),
        "acknowledged": len(to_ack),
        "offered_mails_per_s": round(offered, 1),
        "append_to_commit_s": percentiles(to_commit),
        "append_to_ack_s": percentiles(to_ack),
    }
    if offered < 0.9 * rate:
        log(f"WARNING: the loader reached only {offered:.0f} of {rate:g} mails/s (a busy host): not the target's load")
    log(
        f"latency at {offered:.0f} mails/s, {instances} instance(s): commit p50 {result['append_to_commit_s']['p50']}"
        f" p99 {result['append_to_commit_s']['p99']}; ack p50 {result['append_to_ack_s']['p50']}"
        f" p99 {result['append_to_ack_s']['p99']}"
    )
    return result


def _bare(message_id: str | None) -> str:
    return (message_id or "").strip().strip("<>")


def percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    cut = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50": round(cut[49], 3), "p99": round(cut[98], 3), "max": round(ordered[-1], 3)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000, help="mails per throughput run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs of each (interleaved)")
    parser.add_argument("--rate", type=float, default=50.0, help="offered load of the latency run, mails/s")
    parser.add_argument("--latency-seconds", type=float, default=60.0)
    parser.add_argument("--latency-instances", type=int, default=2, choices=(1, 2, 4))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="each instance on a core of its own (taskset), one parser worker each: on a host with few cores, "
        "two instances get twice the CPU of one, as on two machines",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    args = parser.parse_args(argv)
    corpus = ensure_corpus(args.cache, args.count, args.seed)
    files = corpus.files()
    env = environment()
    work = Path(tempfile.mkdtemp(prefix="mb-instances-"))
    setup = Setup(work)
    try:
        runs: dict[str, list[dict[str, Any]]] = {"one": [], "two": []}
        for repeat in range(args.repeat):
            for key, instances in (("one", 1), ("two", 2)) if repeat % 2 == 0 else (("two", 2), ("one", 1)):
                runs[key].append(throughput(setup, files, instances, f"{key}-{repeat}", args.pin))
        latencies = latency(setup, files, args.latency_instances, args.rate, args.latency_seconds, args.pin)
    finally:
        setup.close()
        if args.keep:
            log(f"logs and configs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    one = statistics.median(r["end_to_end_mails_per_s"] for r in runs["one"])
    two = statistics.median(r["end_to_end_mails_per_s"] for r in runs["two"])
    summary = {
        "one_instance_mails_per_s_median": one,
        "two_instances_mails_per_s_median": two,
        "scaling": round(two / one, 2),
        "latency": latencies,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "environment": env,
                "args": {**vars(args), "cache": str(args.cache), "output": str(args.output)},
                "throughput": runs,
                "summary": summary,
            },
            indent=2,
        )
        + "\n"
    )
    log(f"one instance {one} mails/s, two {two} mails/s: x{summary['scaling']}; results in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
