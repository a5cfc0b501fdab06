#!/usr/bin/env python3
"""SLA check benchmark: one check over N open tickets (default 100,000) on SQLite.

The database is built once per run of this script: the schema by the real migrations
(``python -m mailbridge db upgrade``), the tickets, contacts, articles and histories with executemany
straight into SQLite (not through the pipeline, which would take minutes), then the timers by the real
SLA planner. Cases, each measured on a fresh copy of its database:

* ``steady``: every ticket planned, every timer due so far already done; nothing new. What the daemon
  does every ``check_interval_seconds`` most of the time.
* ``due``: the same, but ``--due-share`` of the tickets (1 %) have a reminder or escalation due now: the
  check renders and queues that many mails (and raises priorities where the policy says so).
* ``import``: the first check after a big import (``mailbridge ingest`` while the daemon was down):
  N tickets created in the last minutes, none planned; the check plans N tickets.
* ``replan``: the planner re-reads the whole history (its cursor set back to 0) and plans N tickets
  whose timers exist, some done: the worst case of planning.
* ``settings``: the first check after the SLA settings changed (their digest in ``sla_cursor`` differs):
  every open ticket is planned again (here under the same targets, so nothing moves and nothing is sent).

Each case is measured in two ways, in fresh processes, with the clock pinned (time-machine, ticking) to
``--at`` so that business hours, holidays and due shares are the same in every run:

* ``check``: in a fresh interpreter, the App is built and prepared as the daemon does at start-up (not
  timed), then ``App.check_sla()`` -- the very coroutine APScheduler calls -- is timed.
* ``cli``: ``mailbridge sla check --config ...`` as a whole subprocess (start-up, imports and all).

Reported: median (min-max) over ``--repeat`` runs, peak RSS (``ru_maxrss`` of the process), and the
check's report, which is verified: the right number of tickets planned and of mails queued, each
(ticket, template) at most once.

    .venv/bin/python bench/bench_sla.py                      # N = 100,000, 5 runs of each case
    .venv/bin/python bench/bench_sla.py --tickets 10000 --repeat 3
    .venv/bin/python bench/bench_sla.py --profile due        # cProfile of one check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASES = ("steady", "due", "import", "replan", "settings")
MODES = ("check", "cli")
# A Tuesday, 11:00 in Warsaw: within working hours, and Independence Day (11 November) a week before.
DEFAULT_AT = "2026-11-17T10:00:00+00:00"
QUEUES = ("general", "it", "accounting", "sales", "logistics", "hr", "legal", "complaints")
QUEUE_WEIGHTS = (30, 25, 15, 10, 8, 5, 4, 3)
PRIORITIES = ("P1", "P2", "P3", "P4")
PRIORITY_WEIGHTS = (5, 20, 60, 15)
AGENTS = 40
SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"  # how SQLAlchemy stores a DateTime in SQLite

_SENTENCE = (
    "faktura drukarka logowanie hasło konto zamówienie dostawa reklamacja umowa serwer poczta invoice printer "
    "login password account order delivery complaint contract server mail error nie działa od rana prosimy o "
    "pilną pomoc the system does not respond since this morning please"
)
WORDS = _SENTENCE.split()


def sqlite_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(SQLITE_TIME)


def sla_config() -> dict[str, Any]:
    """Policies like the example configuration: business hours in Warsaw with Polish holidays."""
    return {
        "calendar": {
            "timezone": "Europe/Warsaw",
            "working_days": ["mon", "tue", "wed", "thu", "fri"],
            "working_hours": ["08:00-16:00"],
            "holidays": "PL",
            "extra_holidays": ["2026-12-31"],
        },
        "policies": {
            "P1": {"first_response": "1h", "resolution": "8h", "business_hours": False},
            "P2": {"first_response": "4h", "resolution": "16h"},
            "P3": {"first_response": "8h", "resolution": "40h", "raise_priority": True},
            "P4": {"first_response": "16h", "resolution": "80h"},
        },
        "overrides": [
            {"tier": "enterprise", "first_response": "2h"},
            {"queue": "accounting", "priority": "P3", "resolution": "24h"},
        ],
        "reminders": [0.75],
        "pause_while": ["waiting_customer"],
        "escalation_contacts": {
            **{q: [f"lead.{q}@helpdesk.example"] for q in QUEUES[:4]},
            "*": ["head@helpdesk.example"],
        },
        "check_interval_seconds": 60,
    }


def agents() -> list[dict[str, Any]]:
    return [
        {
            "address": f"agent{n:02d}@helpdesk.example",
            "name": f"Agent {n:02d}",
            "queues": sorted({QUEUES[n % len(QUEUES)], QUEUES[(n * 3 + 1) % len(QUEUES)]}),
        }
        for n in range(AGENTS)
    ]


def write_config(path: Path, data_dir: Path) -> Path:
    config = {
        "data_dir": str(data_dir),
        "mailboxes": [
            {
                "type": "maildir",
                "name": "support",
                "path": str(data_dir.parent / "maildir"),
                "address": "support@helpdesk.example",
            }
        ],
        # Never contacted: the check only queues mail; a daemon's sender would deliver it.
        "smtp": {"host": "127.0.0.1", "port": 2525, "security": "none"},
        "outbox": {"domain": "helpdesk.example"},
        "agents": agents(),
        "routing": {"default_queue": "general"},
        "logging": {"level": "WARNING"},
        "sla": sla_config(),
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# --- the data ----------------------------------------------------------------------------------------


@dataclass
class History:
    """What one ticket went through before `at`."""

    status: str
    events: list[tuple[datetime, str, str, str | None, str | None]]  # at, actor, kind, old, new
    first_response_at: datetime | None
    answered: bool


def history_of(rng: random.Random, created: datetime, at: datetime, customer: str, agent: str) -> History:
    """A realistic life so far of an open ticket: answered or not, waiting on the customer (or a third
    party) for a while, reopened by the customer's answer; an agent sometimes changes the priority."""
    age = at - created
    events: list[tuple[datetime, str, str, str | None, str | None]] = [(created, customer, "created", None, "new")]
    roll = rng.random()
    if roll < 0.25:
        return History("new", events, None, False)
    answered_at = created + age * (0.3 * rng.random())
    events.append((answered_at, agent, "first_response", None, None))
    events.append((answered_at, agent, "status", "new", "open"))
    status = "open"
    if rng.random() < 0.05:
        events.append((answered_at, agent, "priority", None, rng.choice(PRIORITIES[:3])))
    if roll < 0.70:
        if rng.random() < 0.2:  # waited on the customer, who answered
            waited = created + age * (0.3 + 0.3 * rng.random())
            events.append((waited, agent, "status", "open", "waiting_customer"))
            events.append((created + age * (0.65 + 0.3 * rng.random()), customer, "status", "waiting_customer", "open"))
        return History(status, events, answered_at, True)
    waiting = "waiting_customer" if roll < 0.92 else "waiting_third_party"
    events.append((created + age * (0.3 + 0.6 * rng.random()), agent, "status", "open", waiting))
    return History(waiting, events, answered_at, True)


def text_of(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def fill(db_path: Path, count: int, at: datetime, *, imported: bool, seed: int) -> None:
    """N open tickets with their customers, articles and history. `imported`: all created in the few
    minutes before `at` (a big `mailbridge ingest`), with nothing but their creation."""
    rng = random.Random(seed)
    connection = sqlite3.connect(db_path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=OFF")
    customers = max(1, count // 4)
    connection.executemany(
        "INSERT INTO contacts (id, address, name, created_at) VALUES (?, ?, ?, ?)",
        (
            (i, f"klient{i}@firma{i % 5000}.example", f"Klient {i}", sqlite_time(at - timedelta(days=400)))
            for i in range(1, customers + 1)
        ),
    )
    agent_addresses = [a["address"] for a in agents()]
    tickets: list[tuple[Any, ...]] = []
    articles: list[tuple[Any, ...]] = []
    events: list[tuple[Any, ...]] = []
    for ticket_id in range(1, count + 1):
        if imported:
            created = at - timedelta(seconds=180 * (count - ticket_id) / count + 5)
        else:
            # Open tickets are mostly young: an exponential age with a mean of five days, at most 60.
            created = at - timedelta(days=min(60.0, rng.expovariate(1 / 5)), seconds=60)
        customer_id = rng.randint(1, customers)
        customer = f"klient{customer_id}@firma{customer_id % 5000}.example"
        owner = rng.choice(agent_addresses) if not imported and rng.random() < 0.6 else None
        life = (
            History("new", [(created, customer, "created", None, "new")], None, False)
            if imported
            else history_of(rng, created, at, customer, owner or rng.choice(agent_addresses))
        )
        subject = text_of(rng, 5)
        tier = rng.choices((None, "business", "enterprise"), (60, 30, 10))[0]
        tickets.append(
            (
                ticket_id,
                f"MB-{ticket_id:06d}",
                life.status,
                subject,
                customer_id,
                "support",
                sqlite_time(created),
                sqlite_time(max(e[0] for e in life.events)),
                None if life.first_response_at is None else sqlite_time(life.first_response_at),
                owner,
                rng.choices(PRIORITIES, PRIORITY_WEIGHTS)[0],
                rng.choices(QUEUES, QUEUE_WEIGHTS)[0],
                "[]",
                f"firma{customer_id % 5000}" if tier else None,
                tier,
            )
        )
        article_id = len(articles) + 1
        articles.append(
            (
                article_id,
                ticket_id,
                "inbound",
                "support",
                f"<{ticket_id}.{seed}@firma.example>",
                subject,
                f"Klient {customer_id}",
                customer,
                text_of(rng, 60),
                sqlite_time(created),
            )
        )
        for moment, actor, kind, old, new in life.events:
            events.append(
                (ticket_id, sqlite_time(moment), actor, kind, old, new, article_id if kind == "created" else None)
            )
        if life.answered:
            articles.append(
                (
                    len(articles) + 1,
                    ticket_id,
                    "outbound",
                    "support",
                    None,
                    "Re: " + subject,
                    "",
                    owner or agent_addresses[0],
                    text_of(rng, 40),
                    sqlite_time(life.events[1][0]),
                )
            )
    connection.executemany(
        "INSERT INTO tickets (id, number, status, subject, customer_id, mailbox, created_at, updated_at,"
        " first_response_at, owner, priority, queue, tags, organisation, tier) VALUES"
        " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        tickets,
    )
    connection.executemany(
        "INSERT INTO articles (id, ticket_id, direction, mailbox, message_id, subject, from_name, from_address,"
        ' text, created_at, "references", "to", cc, reply_to, raw_sha256, raw_size, defects, kind)'
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '[]', '[]', '[]', '[]', '', 0, '[]', 'human')",
        articles,
    )
    # The history in time order, as the daemon writes it.
    events.sort(key=lambda e: e[1])
    connection.executemany(
        "INSERT INTO ticket_events (ticket_id, at, actor, kind, old, new, article_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
        events,
    )
    # SLAs apply to all of them: the policies were configured long before.
    connection.execute(
        "INSERT OR REPLACE INTO sla_cursor (name, last_event_id, started_at) VALUES ('events', 0, ?)",
        (sqlite_time(at - timedelta(days=365)),),
    )
    connection.commit()
    connection.close()


def planned_under(db_path: Path, config: Path, digest: str | None = None) -> None:
    """Mark the open tickets as planned under `config`'s SLA settings (or `digest`), as a daemon that has
    been running with them has done."""
    from mailbridge.config import load_settings
    from mailbridge.sla.planner import settings_digest

    connection = sqlite3.connect(db_path)
    connection.execute(
        "UPDATE sla_cursor SET settings_digest = ?", (digest or settings_digest(load_settings(config).sla),)
    )
    connection.commit()
    connection.close()


def plan_all(config: Path, at: datetime) -> int:
    """The timers of every ticket, by the real planner (not timed; the `replan` case times it)."""
    from mailbridge.app import build_app
    from mailbridge.config import load_settings

    app = build_app(load_settings(config))
    planned = 0
    try:
        while True:
            with app.db.unit_of_work() as session:
                report = app.sla.planner.catch_up(session, at, limit=5000)
            planned += len(report.tickets)
            if report.events < 5000:
                return planned
    finally:
        app.close()


def settle(db_path: Path, at: datetime, keep_due: Sequence[int]) -> None:
    """As if the daemon had checked until `at`: every timer due so far is done (with its history event),
    except the most recent due timer of each ticket in `keep_due`, which is due now."""
    now = sqlite_time(at)
    connection = sqlite3.connect(db_path)
    connection.execute("CREATE TEMP TABLE keep (ticket_id INTEGER PRIMARY KEY)")
    connection.executemany("INSERT INTO keep VALUES (?)", ((t,) for t in keep_due))
    connection.execute(
        "CREATE TEMP TABLE left_due AS SELECT id FROM (SELECT s.id, row_number() OVER"
        " (PARTITION BY s.ticket_id ORDER BY s.fire_at DESC, s.share DESC) AS n FROM sla_timers s"
        " JOIN keep k ON k.ticket_id = s.ticket_id WHERE s.done_at IS NULL AND s.fire_at <= ?) WHERE n = 1",
        (now,),
    )
    connection.execute(
        "UPDATE sla_timers SET done_at = fire_at, outcome = 'sent before the benchmark'"
        " WHERE done_at IS NULL AND fire_at <= ? AND id NOT IN (SELECT id FROM left_due)",
        (now,),
    )
    connection.execute(
        "INSERT INTO ticket_events (ticket_id, at, actor, kind, new) SELECT ticket_id, done_at, 'sla',"
        " CASE WHEN share < 1 THEN 'sla_reminder' ELSE 'sla_breach' END, target FROM sla_timers"
        " WHERE done_at IS NOT NULL ORDER BY done_at"
    )
    connection.execute("UPDATE sla_cursor SET last_event_id = (SELECT max(id) FROM ticket_events)")
    connection.commit()
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()


def tickets_with_due_timers(db_path: Path, at: datetime) -> list[int]:
    connection = sqlite3.connect(db_path)
    try:
        rows = connection.execute(
            "SELECT DISTINCT ticket_id FROM sla_timers WHERE done_at IS NULL AND fire_at <= ? ORDER BY ticket_id",
            (sqlite_time(at),),
        ).fetchall()
    finally:
        connection.close()
    return [r[0] for r in rows]


def checkpoint(db_path: Path) -> None:
    connection = sqlite3.connect(db_path)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()


@dataclass
class Scenario:
    name: str
    db: Path
    expect_planned: int
    expect_mails: int | None  # None: at most one per timer, not known in advance


def build_scenarios(
    work: Path, count: int, at: datetime, due_share: float, seed: int, cases: Sequence[str]
) -> dict[str, Scenario]:
    scenarios: dict[str, Scenario] = {}
    build = work / "build"
    config = write_config(work / "build.yaml", build)

    def fresh_schema() -> Path:
        shutil.rmtree(build, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "mailbridge", "db", "upgrade", "--config", str(config)],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        db = build / "mailbridge.db"
        connection = sqlite3.connect(db)
        connection.execute("DELETE FROM sla_cursor")
        connection.commit()
        connection.close()
        return db

    if "import" in cases:
        started = time.perf_counter()
        db = fresh_schema()
        fill(db, count, at, imported=True, seed=seed)
        planned_under(db, config)
        checkpoint(db)
        target = work / "import.db"
        shutil.copy(db, target)
        scenarios["import"] = Scenario("import", target, count, 0)
        print(f"built 'import' in {time.perf_counter() - started:.1f} s", flush=True)
    if {"steady", "due", "replan", "settings"} & set(cases):
        started = time.perf_counter()
        db = fresh_schema()
        fill(db, count, at, imported=False, seed=seed)
        planned_under(db, config)
        filled = time.perf_counter()
        planned = plan_all(config, at)
        print(
            f"history filled in {filled - started:.1f} s, "
            f"{planned} tickets planned in {time.perf_counter() - filled:.1f} s",
            flush=True,
        )
        due = tickets_with_due_timers(db, at)
        chosen = sorted(random.Random(seed).sample(due, min(len(due), round(count * due_share))))
        base = work / "planned.db"
        shutil.copy(db, base)
        if "due" in cases:
            settle(db, at, chosen)
            shutil.copy(db, work / "due.db")
            scenarios["due"] = Scenario("due", work / "due.db", 0, len(chosen))
            shutil.copy(base, db)
        settle(db, at, [])
        if "steady" in cases:
            shutil.copy(db, work / "steady.db")
            scenarios["steady"] = Scenario("steady", work / "steady.db", 0, 0)
        if "settings" in cases:
            shutil.copy(db, work / "settings.db")
            planned_under(work / "settings.db", config, digest="the settings before")
            scenarios["settings"] = Scenario("settings", work / "settings.db", 0, 0)
        if "replan" in cases:
            connection = sqlite3.connect(db)
            connection.execute("UPDATE sla_cursor SET last_event_id = 0")
            connection.commit()
            connection.close()
            shutil.copy(db, work / "replan.db")
            scenarios["replan"] = Scenario("replan", work / "replan.db", count, 0)
        print(
            f"built the planned cases in {time.perf_counter() - started:.1f} s "
            f"({len(due)} tickets had timers due, {len(chosen)} left due)",
            flush=True,
        )
    shutil.rmtree(build, ignore_errors=True)
    return scenarios


# --- measuring ---------------------------------------------------------------------------------------


@dataclass
class Run:
    case: str
    mode: str
    seconds: float
    maxrss_mib: float
    report: dict[str, int]
    cpu_seconds: float  # user + system, all threads: what the check costs when the machine is shared


@dataclass
class Summary:
    case: str
    mode: str
    runs: list[Run] = field(default_factory=list)

    def seconds(self) -> list[float]:
        return [r.seconds for r in self.runs]


def in_process(config: Path, at: str, profile: Path | None) -> None:
    """The `check` mode, in its own interpreter: start-up as the daemon's (untimed), then one check."""
    import time_machine

    from mailbridge.app import build_app
    from mailbridge.config import load_settings

    with time_machine.travel(datetime.fromisoformat(at), tick=True):
        app = build_app(load_settings(config))
        app.prepare()
        try:
            if profile is not None:
                import cProfile
                import pstats

                profiler = cProfile.Profile()
                started, cpu = time.perf_counter(), time.process_time()
                # cProfile sees one thread: run on this one what check_sla() hands to the database thread.
                profiler.enable()
                report = app.sla.run(app.db, datetime.now(UTC))
                profiler.disable()
                seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
                with profile.open("w") as out:
                    stats = pstats.Stats(profiler, stream=out)
                    stats.sort_stats("cumulative").print_stats(45)
                    stats.sort_stats("tottime").print_stats(25)
            else:
                started, cpu = time.perf_counter(), time.process_time()
                report = asyncio.run(app.check_sla())
                seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        finally:
            app.close()
    # Not `asdict`: it rebuilds the per-mailbox Counters from (key, value) pairs, i.e. counts the pairs.
    fields = {name: getattr(report, name) for name in report.__dataclass_fields__}
    fields = {name: dict(value) if isinstance(value, dict) else value for name, value in fields.items()}
    result = {"seconds": seconds, "cpu_seconds": cpu, "report": fields}
    print(json.dumps(result))


CLI_UNDER_CLOCK = (
    "import sys, datetime, time_machine\n"
    "from mailbridge.cli import main\n"
    "with time_machine.travel(datetime.datetime.fromisoformat(sys.argv.pop(1)), tick=True):\n"
    "    sys.argv[0] = 'mailbridge'\n"
    "    main()\n"
)


def measure(scenario: Scenario, mode: str, run_dir: Path, at: str) -> Run:
    shutil.rmtree(run_dir, ignore_errors=True)
    data = run_dir / "data"
    data.mkdir(parents=True)
    shutil.copy(scenario.db, data / "mailbridge.db")
    config = write_config(run_dir / "mailbridge.yaml", data)
    if mode == "check":
        command = [sys.executable, str(Path(__file__).resolve()), "--in-process", str(config), "--at", at]
    else:
        command = [sys.executable, "-c", CLI_UNDER_CLOCK, at, "sla", "check", "--config", str(config), "--json"]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err)
        # wait4: the peak RSS of this very process (ru_maxrss), not of all children so far.
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if process.returncode != 0:
        raise SystemExit(f"{scenario.name}/{mode} failed ({process.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout[stdout.index("{") :])
    rss = usage.ru_maxrss / 1024
    if mode == "check":
        run = Run(scenario.name, mode, result["seconds"], rss, result["report"], result["cpu_seconds"])
    else:
        run = Run(scenario.name, mode, wall, rss, result, usage.ru_utime + usage.ru_stime)
    verify(scenario, data / "mailbridge.db", run, at)
    return run


def verify(scenario: Scenario, db_path: Path, run: Run, at: str) -> None:
    report = run.report
    mails = report["reminders"] + report["escalations"]
    if report["planned_tickets"] != scenario.expect_planned:
        raise SystemExit(
            f"{scenario.name}: planned {report['planned_tickets']} tickets, expected {scenario.expect_planned}"
        )
    if scenario.expect_mails is not None and mails != scenario.expect_mails:
        raise SystemExit(f"{scenario.name}: queued {mails} mails, expected {scenario.expect_mails}")
    replanned = report.get("replanned_open", report.get("replanned_open_tickets", 0))
    if (scenario.name == "settings") != bool(replanned) or report.get("moved", 0):
        raise SystemExit(f"{scenario.name}: {replanned} open tickets planned again for the settings, {report}")
    connection = sqlite3.connect(db_path)
    try:
        queued = connection.execute("SELECT count(*) FROM outbox WHERE template LIKE 'sla_%'").fetchone()[0]
        doubled = connection.execute(
            "SELECT count(*) FROM (SELECT ticket_id, template FROM outbox WHERE template LIKE 'sla_%'"
            " GROUP BY ticket_id, template HAVING count(*) > 1)"
        ).fetchone()[0]
        due_left = connection.execute(
            "SELECT count(*) FROM sla_timers WHERE done_at IS NULL AND fire_at <= ?",
            (sqlite_time(datetime.fromisoformat(at)),),
        ).fetchone()[0]
    finally:
        connection.close()
    if queued != mails or doubled:
        raise SystemExit(f"{scenario.name}: {queued} SLA mails in the outbox for {mails} reported, {doubled} doubled")
    if due_left:
        raise SystemExit(f"{scenario.name}: {due_left} timers still due after the check")


def interleaved(scenarios: dict[str, Scenario], modes: Sequence[str], repeat: int) -> Iterator[tuple[Scenario, str]]:
    for _ in range(repeat):
        for scenario in scenarios.values():
            for mode in modes:
                yield scenario, mode


def describe(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def _build_key(args: argparse.Namespace) -> dict[str, Any]:
    return {"tickets": args.tickets, "at": args.at, "seed": args.seed, "due_share": args.due_share}


def load_scenarios(work: Path, args: argparse.Namespace, cases: Sequence[str]) -> dict[str, Scenario]:
    """The databases, built in a child process: the parent stays small, so a child's peak RSS (which
    Linux carries over from the parent at fork) is its own."""
    index = work / "scenarios.json"
    if index.exists():
        built = json.loads(index.read_text())
        known = {
            s["name"]: Scenario(s["name"], Path(s["db"]), s["expect_planned"], s["expect_mails"])
            for s in built["scenarios"]
        }
        if built["args"] == _build_key(args) and all(c in known for c in cases):
            print(f"reusing the databases in {work}", flush=True)
            return {c: known[c] for c in cases}
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--build",
            str(work),
            "--tickets",
            str(args.tickets),
            "--at",
            args.at,
            "--seed",
            str(args.seed),
            "--due-share",
            str(args.due_share),
            "--cases",
            ",".join(cases),
        ],
        check=True,
        cwd=ROOT,
    )
    built = json.loads(index.read_text())
    return {
        s["name"]: Scenario(s["name"], Path(s["db"]), s["expect_planned"], s["expect_mails"])
        for s in built["scenarios"]
    }


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tickets", type=int, default=100_000)
    parser.add_argument(
        "--due-share", type=float, default=0.01, help="share of tickets with a timer due now (due case)"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--at", default=DEFAULT_AT, help="the moment of the check (ISO 8601, with offset)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results" / "sla.json")
    parser.add_argument("--profile", metavar="CASE", help="one check of CASE under cProfile instead of the runs")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--work", type=Path, help="scratch directory; the databases built there before are reused (implies --keep)"
    )
    parser.add_argument("--in-process", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_process is not None:
        in_process(args.in_process, args.at, args.profile_to)
        return 0
    if args.build is not None:
        built = build_scenarios(
            args.build, args.tickets, datetime.fromisoformat(args.at), args.due_share, args.seed, args.cases.split(",")
        )
        (args.build / "scenarios.json").write_text(
            json.dumps({"args": _build_key(args), "scenarios": [asdict(s) for s in built.values()]}, default=str)
        )
        return 0
    cases = [c for c in args.cases.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    if args.profile:
        cases = [args.profile]
    unknown = [c for c in cases if c not in CASES] + [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown case or mode: {', '.join(unknown)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="mailbridge-sla-bench-"))
    keep = args.keep or args.work is not None
    try:
        scenarios = load_scenarios(work, args, cases)
        if args.profile:
            scenario = scenarios[args.profile]
            target = BENCH_DIR / "results" / f"profile-sla-{args.profile}-n{args.tickets}.txt"
            run_dir = work / "run"
            shutil.rmtree(run_dir, ignore_errors=True)
            data = run_dir / "data"
            data.mkdir(parents=True)
            shutil.copy(scenario.db, data / "mailbridge.db")
            config = write_config(run_dir / "mailbridge.yaml", data)
            subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--in-process",
                    str(config),
                    "--at",
                    args.at,
                    "--profile-to",
                    str(target),
                ],
                check=True,
                cwd=ROOT,
            )
            print(f"profile written to {target}")
            return 0
        summaries = {(c, m): Summary(c, m) for c in scenarios for m in modes}
        for scenario, mode in interleaved(scenarios, modes, args.repeat):
            run = measure(scenario, mode, work / "run", args.at)
            summaries[(scenario.name, mode)].runs.append(run)
            print(
                f"  {scenario.name:7} {mode:5} {run.seconds:6.2f} s  CPU {run.cpu_seconds:6.2f} s"
                f"  {run.maxrss_mib:5.0f} MiB  {run.report}",
                flush=True,
            )
        print()
        print(f"N = {args.tickets:,} open tickets, check at {args.at}, median (min–max) of {args.repeat}")
        print("| case | mode | wall s | CPU s | peak RSS | planned | reminders | escalations |")
        print("|---|---|---|---|---|---|---|---|")
        for s in summaries.values():
            last = s.runs[-1].report
            print(
                f"| {s.case} | {s.mode} | {describe(s.seconds())} | {describe([r.cpu_seconds for r in s.runs])}"
                f" | {max(r.maxrss_mib for r in s.runs):.0f} MiB"
                f" | {last['planned_tickets']} | {last['reminders']} | {last['escalations']} |"
            )
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            json.dumps(
                {
                    "git_commit": git_commit(),
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
                    "tickets": args.tickets,
                    "due_share": args.due_share,
                    "at": args.at,
                    "summaries": [
                        {
                            "case": s.case,
                            "mode": s.mode,
                            "median_s": statistics.median(s.seconds()),
                            "min_s": min(s.seconds()),
                            "max_s": max(s.seconds()),
                            "runs": [asdict(r) for r in s.runs],
                        }
                        for s in summaries.values()
                    ],
                },
                indent=2,
            )
        )
        print(f"details: {args.output}")
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
