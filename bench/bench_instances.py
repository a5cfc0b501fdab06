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
import email.parser
import email.policy
import itertools
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for _path in (str(ROOT), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from run_bench import (  # noqa: E402
    _CLK_TCK,
    DEFAULT_CACHE,
    BenchError,
    _read_proc_tree,
    dovecot_cpu_s,
    ensure_corpus,
    environment,
    log,
)
from sqlalchemy import create_engine, func, select, text  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from mailbridge.models import OutboxMail, OutboxStatus, Receipt  # noqa: E402
from tests.support.dovecot import Dovecot  # noqa: E402
from tests.support.postgres import PostgresCluster  # noqa: E402
from tests.support.postgres import unavailable_reason as postgres_unavailable  # noqa: E402
from tests.support.smtp_sink import SmtpSink  # noqa: E402

MAILBOXES = 4
PASSWORD = "bench-secret"
DEFAULT_OUTPUT = BENCH_DIR / "results" / "instances.json"
SECRET = "bench-instances-shared-secret-0123456789"


# Production settings for the benchmark's server: the test suite's cluster runs without durability, but
# a commit here must survive a power cut, as SQLite's (synchronous=FULL) does in `bench/run_bench.py`.
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
_latency_runs = itertools.count(1)  # each latency run its own directory
GAP_SECONDS = 30.0  # an article id not visible this long after a larger one is taken as never coming
STATEMENTS = {"shared_preload_libraries": "pg_stat_statements", "pg_stat_statements.track": "top"}


class Setup:
    """The servers shared by every run: PostgreSQL, Dovecot, the SMTP sink."""

    def __init__(self, work: Path, *, durable: bool = True, statements: bool = False) -> None:
        reason = postgres_unavailable() or Dovecot.unavailable_reason()
        if reason:
            raise BenchError(reason)
        self.work = work
        self.statements = statements
        self.postgres = PostgresCluster.start({**(DURABLE if durable else {}), **(STATEMENTS if statements else {})})
        self.dovecot = Dovecot.start(work / "dovecot")
        self.sink = SmtpSink().start()
        self._users = 0

    def close(self) -> None:
        self.sink.stop()
        self.dovecot.stop()
        self.postgres.stop()

    def postmaster_pid(self) -> int:
        return int((self.postgres.data_dir / "postmaster.pid").read_text().split()[0])

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

    def __init__(self, setup: Setup, instances: int, label: str, pin: bool, backend: str = "postgresql") -> None:
        self.setup = setup
        self.dir = setup.work / label
        self.dir.mkdir(parents=True)
        self.backend = backend
        # SQLite: the same scenario on one file (WAL, synchronous=FULL), for comparison with PostgreSQL.
        self.url = setup.postgres.create_database() if backend == "postgresql" else f"sqlite:///{self.dir}/mb.db"
        self.engine: Engine = create_engine(self.url)
        self.users = setup.new_users()
        self.daemons: list[subprocess.Popen[bytes]] = []
        self._seen_ticks: dict[tuple[int, int], int] = {}  # (pid, start time) -> last CPU ticks seen
        self._ticks_lock = threading.Lock()
        self._sampling_done = threading.Event()
        self._sampler = threading.Thread(target=self._sample_daemons, name="cpu-sampler", daemon=True)
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
        self._sampler.start()
        try:
            share = MAILBOXES // instances
            self.wait(lambda: sorted(self.holders().values()) == [share] * instances, 90, "leases spread")
            # Mail put in before a mailbox's first fetch would be its backlog, which gets no acknowledgement.
            first_fetches = "select count(*) from mailbox_state where last_fetch_at is not null"
            self.wait(lambda: self.scalar(first_fetches) == MAILBOXES, 60, "a first fetch of every mailbox")
        except BaseException:
            self.close()  # no daemon left behind
            raise
        if backend == "postgresql" and setup.statements:
            with self.engine.begin() as connection:
                connection.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
                connection.execute(text("SELECT pg_stat_statements_reset()"))

    def warm_up(self, files: Sequence[Path]) -> int:
        """One mail per mailbox before the clock: each daemon starts its parser worker on the first mail
        it parses (an interpreter and the parser's imports, about a CPU-second), which a daemon that has been
        running for a while has long done. Returns how many receipts the warm-up left."""
        mails = prepared_mails(files, MAILBOXES, prefix="warmup")
        paths = []
        for index, (_, raw) in enumerate(mails):
            path = self.dir / f"warmup-{index}.eml"
            path.write_bytes(raw)
            paths.append(path)
        drop_into_maildirs(self.setup.dovecot, self.users, paths)
        self.wait(lambda: self.scalar("select count(*) from receipts") >= MAILBOXES, 120, "the warm-up mails")
        self.wait(lambda: self.scalar("select count(*) from outbox where status = 'pending'") == 0, 120, "warm acks")
        return MAILBOXES

    def _sample_daemons(self) -> None:
        """Keep the last CPU ticks of every process the daemons' trees had: a parser worker is recycled every
        40 tasks, and a process that has ended is gone from /proc with all it spent. Counting only the live
        ones left out, in a one-instance run of 1,000 mails, the worker that had parsed 900 of them."""
        while not self._sampling_done.wait(0.2):
            self._tree_ticks_now()

    def _tree_ticks_now(self) -> dict[tuple[int, int], int]:
        with self._ticks_lock:
            for daemon in self.daemons:
                self._seen_ticks.update(_read_proc_tree(daemon.pid)[1])
            return dict(self._seen_ticks)

    def cpu_snapshot(self) -> dict[str, Any]:
        """CPU ticks so far of the daemons' process trees (main, parser workers, sender; those that have
        ended too) and of the servers."""
        daemons = self._tree_ticks_now()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "daemons": daemons,
            "postgresql": _read_proc_tree(self.setup.postmaster_pid())[1],
            "dovecot_s": dovecot_cpu_s(self.setup.dovecot),
            "bench_s": usage.ru_utime + usage.ru_stime,
        }

    def statements(self, limit: int = 15) -> list[dict[str, Any]]:
        """The statements that took the server longest (pg_stat_statements), with `--statements`."""
        if self.backend != "postgresql" or not self.setup.statements:
            return []
        rows = self.rows(
            "select calls, total_exec_time, rows, left(regexp_replace(query, '\\s+', ' ', 'g'), 200)"
            " from pg_stat_statements order by total_exec_time desc limit :limit",
            limit=limit,
        )
        return [{"calls": c, "ms": round(ms, 1), "rows": r, "query": q} for c, ms, r, q in rows]

    def holders(self) -> dict[str, int]:
        try:
            # A fresh database and daemons just started: every lease held is current (and SQLite has no now()).
            rows = self.rows("select holder, count(*) from mailbox_leases where holder is not null group by holder")
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
        self._sampling_done.set()
        if self._sampler.is_alive():
            self._sampler.join()
        for daemon in self.daemons:
            daemon.send_signal(signal.SIGTERM)
        for daemon in self.daemons:
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        self.engine.dispose()
        if self.backend == "postgresql":
            self.setup.postgres.drop_database(self.url.rsplit("/", 1)[1])


def cpu_seconds(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, float]:
    """CPU seconds between two snapshots. The daemons' trees are sampled through the run (`Run._seen_ticks`),
    so a process that ended in between counts up to its last sample (at most 0.2 s before it ended); the
    servers' processes (PostgreSQL backends, Dovecot) live through a run."""

    def ticks(key: str) -> float:
        old, new = before[key], after[key]
        return sum(value - old.get(pid, 0) for pid, value in new.items()) / _CLK_TCK

    return {
        "daemons": round(ticks("daemons"), 1),
        "postgresql": round(ticks("postgresql"), 1),
        "dovecot": round(after["dovecot_s"] - before["dovecot_s"], 1),
        "bench": round(after["bench_s"] - before["bench_s"], 1),  # the SMTP sink, the loader and the polling
    }


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


def throughput(
    setup: Setup, files: Sequence[Path], instances: int, label: str, pin: bool, backend: str = "postgresql"
) -> dict[str, Any]:
    run = Run(setup, instances, label, pin, backend)
    try:
        count = len(files)
        warm = run.warm_up(files)
        cpu_before = run.cpu_snapshot()
        started_wall = time.time()
        drop_into_maildirs(setup.dovecot, run.users, files)
        # Every mail has a receipt (a ticket, a reply, a duplicate or quarantined); machine mail gets no answer.
        run.wait(lambda: run.scalar("select count(*) from receipts") >= count + warm, 1800, f"{count} receipts")
        run.wait(lambda: run.scalar("select count(*) from outbox where status = 'pending'") == 0, 600, "acks sent")
        # Through the models' column types: the same datetimes from either backend.
        with run.engine.connect() as connection:
            last_receipt = connection.scalar(select(func.max(Receipt.created_at)))
            last_sent = connection.scalar(select(func.max(OutboxMail.sent_at)))
            acks = connection.scalar(
                select(func.count()).select_from(OutboxMail).where(OutboxMail.status == OutboxStatus.SENT)
            )
        assert last_receipt is not None and last_sent is not None
        cpu = cpu_seconds(cpu_before, run.cpu_snapshot())
        per_instance = dict(run.rows("select mailbox, count(*) from receipts group by mailbox"))
        intake_s = last_receipt.timestamp() - started_wall
        end_to_end_s = last_sent.timestamp() - started_wall
        result = {
            "backend": backend,
            "instances": instances,
            "mails": count,
            "acknowledgements": acks,
            "intake_s": round(intake_s, 2),
            "intake_mails_per_s": round(count / intake_s, 1),
            "end_to_end_s": round(end_to_end_s, 2),
            "end_to_end_mails_per_s": round(count / end_to_end_s, 1),
            "per_mailbox": per_instance,
            # CPU seconds from the drop to the last acknowledgement (plus the polling until it was seen)
            "cpu_s": cpu,
            "daemon_cpu_ms_per_mail": round(1000 * cpu["daemons"] / count, 2),
            # Everything on the host that the run kept busy: daemons, PostgreSQL, Dovecot, sink and loader.
            "all_cpu_ms_per_mail": round(1000 * sum(cpu.values()) / count, 2),
            "cores_busy": round(sum(cpu.values()) / end_to_end_s, 2),
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "statements": run.statements(),
        }
        log(
            f"{label}: {result['end_to_end_mails_per_s']} mails/s end to end, {result['intake_mails_per_s']} intake;"
            f" CPU s {cpu}; load {result['loadavg_after'][0]}"
        )
        return result
    finally:
        run.close()


def latency(
    setup: Setup,
    files: Sequence[Path],
    instances: int,
    rate: float,
    seconds: float,
    pin: bool,
    backend: str = "postgresql",
) -> dict[str, Any]:
    run = Run(setup, instances, f"latency-{instances}-{backend}-{next(_latency_runs)}", pin, backend)
    total = int(rate * seconds)
    mails = prepared_mails(files, total)  # before the clock: the loader only sends
    appended: dict[str, float] = {}
    committed: dict[str, float] = {}
    acked: dict[str, float] = {}
    done = threading.Event()
    failures: list[BaseException] = []

    def watch_database() -> None:
        # On PostgreSQL ids are handed out at INSERT, not at commit: with two instances a smaller id can
        # become visible after a larger one. Look again from the oldest id not seen yet (a gap), until the
        # gap is older than GAP_SECONDS (an id that never comes: a rolled-back INSERT). Reading back a fixed
        # window of 1,000 ids every 10 ms cost the bench and PostgreSQL a third of a core, on the cores
        # the daemons are measured on.
        seen: set[int] = set()
        gaps: dict[int, float] = {}  # id not seen yet, below the newest seen -> when the gap was noticed
        newest = 0
        while not done.is_set():
            floor = min(gaps, default=newest + 1) - 1
            rows = run.rows("select id, message_id from articles where id > :floor", floor=floor)
            now = time.time()
            for article_id, message_id in rows:
                committed.setdefault(_bare(message_id), now)
                seen.add(article_id)
                gaps.pop(article_id, None)
                if article_id > newest:
                    gaps.update(dict.fromkeys((i for i in range(newest + 1, article_id) if i not in seen), now))
                    newest = article_id
            for gap in [g for g, since in gaps.items() if now - since > GAP_SECONDS]:
                del gaps[gap]
            time.sleep(0.01)

    def watch_sink() -> None:
        seen = 0
        while not done.is_set():
            # The sink appends from its own thread: take the new ones once, and count only those taken.
            batch = setup.sink.handler.received[seen:]
            now = time.time()
            for item in batch:
                acked.setdefault(_bare(str(item.message["In-Reply-To"])), now)
            seen += len(batch)
            time.sleep(0.005)

    def load(user: str, start: float) -> None:
        # One IMAP session per mailbox, as separate senders' MTAs would deliver: a slow APPEND to one
        # mailbox does not hold back the schedule of the others.
        try:
            with setup.dovecot.imap(user) as session:
                for index in range(run.users.index(user), total, MAILBOXES):
                    message_id, raw = mails[index]
                    pause = start + index / rate - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    status, data = session.append("INBOX", None, None, raw)
                    if status != "OK":
                        raise BenchError(f"APPEND refused: {data!r}")
                    appended[message_id] = time.time()
        except BaseException as exc:
            failures.append(exc)

    try:
        warm = run.warm_up(files)
    except BaseException:
        run.close()
        raise
    watchers = [threading.Thread(target=watch_database), threading.Thread(target=watch_sink)]
    for watcher in watchers:
        watcher.start()
    try:
        cpu_before = run.cpu_snapshot()
        start = time.monotonic() + 0.5  # every loader logged in
        loaders = [threading.Thread(target=load, args=(user, start)) for user in run.users]
        for loader in loaders:
            loader.start()
        for loader in loaders:
            loader.join()
        if failures:
            raise BenchError(f"the loader failed: {failures[0]!r}")
        offered = total / max(time.monotonic() - start, 1e-9)
        run.wait(lambda: run.scalar("select count(*) from receipts") >= total + warm, 300, "every mail recorded")
        run.wait(lambda: run.scalar("select count(*) from outbox where status = 'pending'") == 0, 300, "acks sent")
        time.sleep(0.1)  # the watchers' last poll
        cpu = cpu_seconds(cpu_before, run.cpu_snapshot())
        statements = run.statements()
        # Why a mail got no acknowledgement, from the database: tells a missed one from one never due.
        sent = run.scalar("select count(*) from outbox where status = 'sent'")
        unanswered = dict(
            run.rows(
                "select substr(coalesce(no_answer_reason, '(answered or a reply)'), 1, 60), count(*)"
                " from articles group by 1"
            )
        )
    finally:
        done.set()
        for watcher in watchers:
            watcher.join()
        run.close()
    # Machine mail in the corpus (bounces, lists, auto-replies) is stored without an answer; a few are
    # quarantined (no article): each figure counts the mails it applies to.
    to_commit = [committed[m] - appended[m] for m in appended if m in committed]
    to_ack = [acked[m] - appended[m] for m in appended if m in acked]
    # The acknowledgement's own share: from its ticket's commit (seen by the poll) to the sink.
    commit_to_ack = [acked[m] - committed[m] for m in appended if m in acked and m in committed]
    result = {
        "backend": backend,
        "instances": instances,
        "mails": total,
        "committed": len(to_commit),
        "acknowledged": len(to_ack),
        "acknowledgements_sent": sent,
        "articles_by_no_answer_reason": unanswered,
        "offered_mails_per_s": round(offered, 1),
        "append_to_commit_s": percentiles(to_commit),
        "append_to_ack_s": percentiles(to_ack),
        "commit_to_ack_s": percentiles(commit_to_ack),
        "cpu_s": cpu,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "statements": statements,
    }
    if offered < 0.9 * rate:
        log(f"WARNING: the loader reached only {offered:.0f} of {rate:g} mails/s (a busy host): not the target's load")
    log(
        f"latency at {offered:.0f} mails/s, {instances} instance(s), {backend}: commit p50"
        f" {result['append_to_commit_s']['p50']} p99 {result['append_to_commit_s']['p99']}; ack p50"
        f" {result['append_to_ack_s']['p50']} p99 {result['append_to_ack_s']['p99']} (from the commit: p50"
        f" {result['commit_to_ack_s']['p50']} p99 {result['commit_to_ack_s']['p99']}); CPU s {cpu}"
    )
    return result


def prepared_mails(files: Sequence[Path], total: int, prefix: str = "lat") -> list[tuple[str, bytes]]:
    """`total` mails from the corpus (repeated for long runs), each with a Message-ID of its own."""
    headers = email.parser.BytesHeaderParser(policy=email.policy.default)
    mails = []
    for index in range(total):
        raw = files[index % len(files)].read_bytes()
        message_id = str(headers.parsebytes(raw)["Message-ID"]).strip()
        fresh = f"<{prefix}{index}.{message_id.strip('<>')}>"
        mails.append((_bare(fresh), raw.replace(message_id.encode(), fresh.encode(), 1)))
    return mails


def _bare(message_id: str | None) -> str:
    return (message_id or "").strip().strip("<>")


def percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    cut = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50": round(cut[49], 3), "p99": round(cut[98], 3), "max": round(ordered[-1], 3)}


def _interrupt(_signal: int, _frame: object) -> None:
    raise KeyboardInterrupt


VARIANTS = {"one": ("postgresql", 1), "two": ("postgresql", 2), "sqlite-one": ("sqlite", 1)}


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values), "runs": len(values)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000, help="mails per throughput run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs of each (interleaved); 0: none")
    parser.add_argument("--rate", type=float, default=50.0, help="offered load of the latency run, mails/s")
    parser.add_argument("--latency-seconds", type=float, default=60.0, help="0: no latency run")
    parser.add_argument("--latency-repeat", type=int, default=1, help="latency runs of each backend (interleaved)")
    parser.add_argument("--latency-instances", type=int, default=2, choices=(1, 2, 4))
    parser.add_argument(
        "--compare-sqlite",
        action="store_true",
        help="also run the same scenarios with one instance on SQLite (interleaved): what PostgreSQL costs",
    )
    parser.add_argument(
        "--no-durable",
        action="store_true",
        help="PostgreSQL without fsync / synchronous_commit (the test suite's settings) instead of production's",
    )
    parser.add_argument("--statements", action="store_true", help="pg_stat_statements: each run's top statements")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="instance k on core k (sched_setaffinity), one parser worker each; PostgreSQL, Dovecot and this "
        "script float: on a host with few cores, two instances get twice the CPU of one, as on two machines",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    args = parser.parse_args(argv)
    # Stopped with SIGTERM (or SIGINT in the background, where it is ignored): the daemons and servers are
    # stopped on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    corpus = ensure_corpus(args.cache, args.count, args.seed)
    files = corpus.files()
    env = environment()
    work = Path(tempfile.mkdtemp(prefix="mb-instances-"))
    setup = Setup(work, durable=not args.no_durable, statements=args.statements)
    variants = [key for key in VARIANTS if args.compare_sqlite or key != "sqlite-one"]
    backends = ["postgresql", "sqlite"] if args.compare_sqlite else ["postgresql"]
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in variants}
    latencies: dict[str, list[dict[str, Any]]] = {backend: [] for backend in backends}
    try:
        for repeat in range(args.repeat):
            # Rotated each repeat, so that a drift of the shared machine hits every variant alike.
            shift = repeat % len(variants)
            for key in variants[shift:] + variants[:shift]:
                backend, instances = VARIANTS[key]
                runs[key].append(throughput(setup, files, instances, f"{key}-{repeat}", args.pin, backend))
        if args.latency_seconds > 0:
            for repeat in range(args.latency_repeat):
                for backend in backends if repeat % 2 == 0 else backends[::-1]:
                    # SQLite: one instance (several daemons on one SQLite file queue on its writer lock).
                    instances = args.latency_instances if backend == "postgresql" else 1
                    latencies[backend].append(
                        latency(setup, files, instances, args.rate, args.latency_seconds, args.pin, backend)
                    )
    finally:
        setup.close()
        if args.keep:
            log(f"logs and configs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, Any] = {
        key: {
            "end_to_end_mails_per_s": spread([r["end_to_end_mails_per_s"] for r in results]),
            "intake_mails_per_s": spread([r["intake_mails_per_s"] for r in results]),
            "daemon_cpu_ms_per_mail": spread([r["daemon_cpu_ms_per_mail"] for r in results]),
            "postgresql_cpu_s": spread([r["cpu_s"]["postgresql"] for r in results]),
        }
        for key, results in runs.items()
        if results
    }
    if runs["one"] and runs["two"]:
        one = summary["one"]["end_to_end_mails_per_s"]["median"]
        two = summary["two"]["end_to_end_mails_per_s"]["median"]
        # Interleaved pairs (run k of each), so the ratio of each pair shows how steady the machine was.
        pairs = [
            b["end_to_end_mails_per_s"] / a["end_to_end_mails_per_s"]
            for a, b in zip(runs["one"], runs["two"], strict=True)
        ]
        # On one host the two daemons, PostgreSQL, Dovecot and the sink share its cores: two instances can at
        # best keep every core busy at their own CPU per mail, which bounds the scaling whatever the code does.
        cores = len(os.sched_getaffinity(0))
        ceilings = [
            (cores / (b["all_cpu_ms_per_mail"] / 1000)) / a["end_to_end_mails_per_s"]
            for a, b in zip(runs["one"], runs["two"], strict=True)
        ]
        summary["scaling"] = {
            "of_medians": round(two / one, 2),
            "per_pair": spread([round(x, 2) for x in pairs]),
            "cores": cores,
            "cores_busy": {key: spread([r["cores_busy"] for r in runs[key]]) for key in ("one", "two")},
            "cpu_bound_ceiling_per_pair": spread([round(x, 2) for x in ceilings]),
        }
        log(f"one instance {one} mails/s, two {two} mails/s: x{summary['scaling']['of_medians']}")
    for backend, results in latencies.items():
        if results:
            summary[f"latency_{backend}"] = {
                figure: {p: spread([r[figure][p] for r in results]) for p in ("p50", "p99")}
                for figure in ("append_to_commit_s", "append_to_ack_s", "commit_to_ack_s")
            } | {"offered_mails_per_s": spread([r["offered_mails_per_s"] for r in results])}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "environment": env,
                "args": {**vars(args), "cache": str(args.cache), "output": str(args.output)},
                "postgresql_settings": DURABLE if not args.no_durable else "test defaults (fsync off)",
                "throughput": runs,
                "latency": latencies,
                "summary": summary,
            },
            indent=2,
        )
        + "\n"
    )
    log(f"summary: {json.dumps(summary)}")
    log(f"results in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
