#!/usr/bin/env python3
"""Instructions executed by `mailbridge ingest`, per process role, for the baseline and a variant: a
measure that the other work on a shared host does not change (CPU seconds do, by 15 % and more).

This VM exposes no hardware performance counters (`perf stat -e instructions` says "not supported"), so
the instructions are counted by Valgrind's cachegrind (`--cache-sim=no`, about 30 times slower than
native; every process of the tree is followed: the main process, the migration subprocess, the
forkserver and the parser workers). A forked worker's count includes what the forkserver had executed
before the fork; it is subtracted (the forkserver's own total, which grows by a few million instructions
per fork at most). The counts are the same from run to run within about 0.5 %.

Each mail count M (first M mails of the N corpus) is run for both configurations; the difference between
two values of M gives the cost per mail, apart from what a run costs once (start-up, the directory).

Usage::

    .venv/bin/python bench/count_instructions.py                          # routing=true, M = 400 and 2,000
    .venv/bin/python bench/count_instructions.py --mails 200 --mails 600 --variant routing=sparse
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
for _path in (str(BENCH_DIR.parent), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import run_bench  # noqa: E402

ROLES = ("main", "workers", "forkserver", "migration", "other")


@dataclass
class Count:
    """Instructions (millions) by role for one run, and how many parser workers wrote their counts."""

    mails: int
    variant: str
    by_role: dict[str, float] = field(default_factory=dict)
    workers: int = 0
    lost: int = 0  # processes that started but wrote no count (killed: their instructions are missing)

    @property
    def total(self) -> float:
        return sum(self.by_role.values())


def _role(command: str) -> str:
    if "-m mailbridge" in command:
        return "main"
    if "forkserver" in command:
        return "forkserver/worker"
    if "Database(" in command:
        return "migration"
    return "other"


def read_counts(out_dir: Path, mails: int, variant: str) -> Count:
    """Sum the cachegrind files of one run by role; a worker is a forkserver-command process other than the
    first one (the forkserver starts before its workers, so it has the smallest pid; pids do not wrap in a
    run)."""
    processes: list[tuple[int, str, int]] = []
    for path in out_dir.glob("cg.*"):
        text = path.read_text(errors="replace")
        command = re.search(r"^cmd: (.*)$", text, re.M)
        summary = re.search(r"^summary: (\d+)", text, re.M)
        if command and summary:
            processes.append((int(path.suffix[1:]), _role(command.group(1)), int(summary.group(1))))
    count = Count(mails, variant, dict.fromkeys(ROLES, 0.0))
    forked = sorted((pid, ir) for pid, role, ir in processes if role == "forkserver/worker")
    forkserver_ir = forked[0][1] if forked else 0
    for pid, role, ir in processes:
        if role == "forkserver/worker":
            if pid == forked[0][0]:
                count.by_role["forkserver"] += ir / 1e6
            else:
                count.workers += 1
                count.by_role["workers"] += (ir - forkserver_ir) / 1e6
        else:
            count.by_role[role] += ir / 1e6
    # Every process (exec'd or forked) writes a log; one that never finished has no "I   refs:" line in it.
    for log_file in out_dir.glob("vg.*.log"):
        if not re.search(r"I\s+refs:", log_file.read_text(errors="replace")):
            count.lost += 1
    return count


def run_one(python: str, corpus_dir: Path, work: Path, variant_text: str, mails: int) -> Count:
    variant = (
        run_bench.Variant(name="baseline", overrides={})
        if variant_text == "baseline"
        else run_bench.parse_variant(variant_text)
    )
    run_dir = work / f"{variant.name.replace('=', '-')}-{mails}"
    run_dir.mkdir()
    variant.overrides.setdefault("parsing.timeout_seconds", 600)  # 30 times slower under Valgrind
    config = run_bench.write_config(run_dir / "mailbridge.yaml", run_dir / "data", None, variant)
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--trace-children=yes",
        f"--cachegrind-out-file={run_dir}/cg.%p",
        f"--log-file={run_dir}/vg.%p.log",
        python,
        "-m",
        "mailbridge",
        "ingest",
        str(corpus_dir),
        "--json",
        "--config",
        str(config),
    ]
    done = subprocess.run(command, cwd=run_dir, capture_output=True, text=True)
    if done.returncode != 0:
        raise run_bench.BenchError(f"ingest under valgrind exited with {done.returncode}: {done.stderr[-2000:]}")
    summary = json.loads(done.stdout[done.stdout.index("{") : done.stdout.rindex("}") + 1])
    if summary.get("stored") != mails:
        raise run_bench.BenchError(f"ingest stored {summary.get('stored')} of {mails} mails")
    count = read_counts(run_dir, mails, variant.name)
    shutil.rmtree(run_dir / "data", ignore_errors=True)
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="corpus size N (generated if missing)")
    parser.add_argument("--mails", type=int, action="append", help="first M mails of the corpus (repeatable)")
    parser.add_argument("--variant", default="routing=true")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=run_bench.DEFAULT_CACHE)
    parser.add_argument("--python", default=str(BENCH_DIR.parent / ".venv" / "bin" / "python"))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (the counts do not depend on it)")
    parser.add_argument("--output", type=Path, help="JSON of the counts")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    mail_counts = sorted(set(args.mails or [400, 2000]))

    corpus = run_bench.ensure_corpus(args.cache_dir, args.count, args.seed)
    run_bench.remember_sample(corpus)  # the routing variants' rules come from the corpus's first mails
    files = corpus.files()
    with tempfile.TemporaryDirectory(prefix="mb-instructions-") as scratch:
        work = Path(scratch)
        jobs = []
        for mails in mail_counts:
            if mails > len(files):
                parser.error(f"--mails {mails} is more than the corpus's {len(files)}")
            subset = work / f"corpus-{mails}"
            subset.mkdir()
            for file in files[:mails]:
                (subset / file.name).symlink_to(file)
            jobs += [(subset, "baseline", mails), (subset, args.variant, mails)]
        run_bench.log(f"{len(jobs)} runs under valgrind, {args.jobs} at a time (minutes per 1,000 mails)")
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            counts = list(pool.map(lambda job: run_one(args.python, job[0], work, job[1], job[2]), jobs))

    print(f"{'mails':>6} {'variant':<16} {'workers':>5} " + " ".join(f"{r:>11}" for r in (*ROLES, "total")))
    for c in counts:
        cells = " ".join(f"{c.by_role[r]:11.0f}" for r in ROLES)
        lost = f"  ({c.lost} processes lost: counts low)" if c.lost else ""
        print(f"{c.mails:>6} {c.variant:<16} {c.workers:>5} {cells} {c.total:11.0f}{lost}")
    print("millions of instructions; workers net of the forkserver's count before the fork")
    if len(mail_counts) >= 2:
        low, high = mail_counts[0], mail_counts[-1]
        by = {(c.variant, c.mails): c for c in counts}
        print(f"per mail between M = {low} and {high} (thousands of instructions):")
        for name in ("baseline", by[(args.variant, high)].variant):
            a, b = by[(name, low)], by[(name, high)]
            per = {r: (b.by_role[r] - a.by_role[r]) / (high - low) * 1e3 for r in ("main", "workers")}
            print(f"  {name:<16} main {per['main']:7.0f}  workers {per['workers']:7.0f}")
    if args.output:
        args.output.write_text(json.dumps([c.__dict__ | {"total": c.total} for c in counts], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
