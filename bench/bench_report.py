#!/usr/bin/env python3
"""How long `mailbridge report` takes over a large history on SQLite.

A fresh data directory gets its schema from `mailbridge db upgrade`; then N tickets (default 1,000,000)
with their SLA deadlines, timers and history (~4 events a ticket) are written straight into it
(bench/report_history.py: INSERT … SELECT, about half a minute for a million). Then each case runs
`python -m mailbridge report …` as a subprocess, --repeat times, and the wall time of the whole command
(interpreter start, imports, migrations check, the queries, rendering) is reported as the median and
the min-max of the runs.

Target: a report over 1,000,000 tickets in under 10 s.

Usage:
    .venv/bin/python bench/bench_report.py                       # N = 1,000,000, 5 runs a case
    .venv/bin/python bench/bench_report.py --count 100000 --repeat 3
    .venv/bin/python bench/bench_report.py --compare-indexes     # then again without migration 0010's indexes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
import report_history  # noqa: E402

TARGET_SECONDS = 10.0
SLA = {
    "calendar": {"timezone": "Europe/Warsaw", "working_hours": ["08:00-16:00"], "holidays": "PL"},
    "policies": {"P3": {"first_response": "4h", "resolution": "40h", "business_hours": False}},
}
YEAR = ["--since", "2025-11-01", "--until", "2026-10-31"]
CASES: dict[str, list[str]] = {
    "year json": [*YEAR, "--format", "json"],
    "year table + html": [*YEAR, "--format", "table", "--html", "{dir}/report.html"],
    "year one queue csv": [*YEAR, "--queue", "billing", "--format", "csv"],
    "one month json": ["--since", "2026-03-01", "--until", "2026-03-31", "--format", "json"],
}
REPORT_INDEXES = (
    "ix_tickets_created_at",
    "ix_tickets_closed_at",
    "ix_tickets_status_created_at",
    "ix_ticket_events_kind_new_old",
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def mailbridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailbridge", *args], capture_output=True, text=True, check=False)


def prepare(directory: Path, count: int) -> Path:
    """A data directory with the schema and `count` tickets; returns its config file."""
    config = directory / "mailbridge.yaml"
    data = {"data_dir": str(directory / "data"), "storage": {"fsync": False}, "sla": SLA}
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    upgraded = mailbridge("db", "upgrade", "--config", str(config))
    if upgraded.returncode != 0:
        raise SystemExit(f"mailbridge db upgrade failed: {upgraded.stderr}")
    started = time.perf_counter()
    rows = report_history.fill(directory / "data" / "mailbridge.db", count)
    log(f"generated {rows} in {time.perf_counter() - started:.1f} s")
    return config


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_case(config: Path, args: list[str], repeat: int) -> dict[str, Any]:
    """Wall time, and CPU time (user + system: what other load on a shared machine changes least)."""
    seconds = []
    cpu = []
    output = ""
    for _ in range(repeat):
        started, cpu_before = time.perf_counter(), _children_cpu()
        result = mailbridge("report", *[a.format(dir=config.parent) for a in args], "--config", str(config))
        seconds.append(time.perf_counter() - started)
        cpu.append(_children_cpu() - cpu_before)
        if result.returncode != 0:
            raise SystemExit(f"mailbridge report {' '.join(args)} failed: {result.stderr}")
        output = result.stdout
    return {
        "args": args,
        "runs": [round(s, 3) for s in seconds],
        "median_s": round(statistics.median(seconds), 3),
        "min_s": round(min(seconds), 3),
        "max_s": round(max(seconds), 3),
        "cpu_runs": [round(c, 3) for c in cpu],
        "cpu_median_s": round(statistics.median(cpu), 3),
        "output": output,
    }


def check(results: dict[str, Any], count: int) -> None:
    """The report saw every ticket: the year's JSON counts all of them."""
    opened = json.loads(results["year json"]["output"])["opened"]
    if opened != count:
        raise SystemExit(f"the year's report counted {opened} tickets opened, not {count}")


def run_cases(config: Path, repeat: int, label: str) -> dict[str, Any]:
    results = {}
    for name, args in CASES.items():
        results[name] = time_case(config, args, repeat)
        r = results[name]
        log(
            f"{label:>16} | {name:<20} median {r['median_s']:6.2f} s  (min {r['min_s']:.2f}, max {r['max_s']:.2f})"
            f"  CPU {r['cpu_median_s']:.2f} s"
        )
    return results


def drop_report_indexes(database: Path) -> None:
    with sqlite3.connect(database) as connection:
        for index in REPORT_INDEXES:
            connection.execute(f"DROP INDEX IF EXISTS {index}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--compare-indexes", action="store_true", help="also time the cases without 0010's indexes")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results" / "report.json")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--reuse", type=Path, help="a directory kept by --keep: time again without generating")
    options = parser.parse_args()
    scratch = options.reuse or Path(tempfile.mkdtemp(prefix="mailbridge-report-bench-"))
    try:
        config = scratch / "mailbridge.yaml" if options.reuse else prepare(scratch, options.count)
        load_before = os.getloadavg()
        results = {"with indexes": run_cases(config, options.repeat, "with indexes")}
        check(results["with indexes"], options.count)
        if options.compare_indexes:
            drop_report_indexes(scratch / "data" / "mailbridge.db")
            results["without indexes"] = run_cases(config, options.repeat, "without indexes")
        summary = {
            "tickets": options.count,
            "repeat": options.repeat,
            "target_s": TARGET_SECONDS,
            "host": {
                "python": platform.python_version(),
                "sqlite": sqlite3.sqlite_version,
                "cpus": os.cpu_count(),
                # The machine is shared: its load average (1, 5, 15 min) says how much of it the runs had.
                "load_before": [round(x, 1) for x in load_before],
                "load_after": [round(x, 1) for x in os.getloadavg()],
            },
            "results": {
                label: {name: {k: v for k, v in r.items() if k != "output"} for name, r in cases.items()}
                for label, cases in results.items()
            },
        }
        options.output.parent.mkdir(parents=True, exist_ok=True)
        options.output.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        worst = max(r["median_s"] for r in results["with indexes"].values())
        verdict = "met" if worst < TARGET_SECONDS else "NOT met"
        log(f"slowest case median {worst:.2f} s: target < {TARGET_SECONDS:.0f} s {verdict}")
    finally:
        if options.keep or options.reuse:
            log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
