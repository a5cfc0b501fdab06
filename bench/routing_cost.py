#!/usr/bin/env python3
"""What routing costs, piece by piece, in one process: steadier than the end-to-end benchmark on a shared
host, because it counts CPU time of the routing code alone.

For the rules of `run_bench.py --variant routing=true` and `routing=sparse` (the same generated rules,
rules file and customer directory), over the first M mails of the benchmark corpus, parsed beforehand:

* the parser workers' share: `Router.by_rules(..., explain=False)` per mail (CPU ms; median and range of
  the rounds), the rules matching a mail, and the decision's pickled size (it travels to the main process);
  what a worker gets at its start (the compiled `RuleSet.for_workers()`, pickled) and what unpickling it
  and indexing the rules costs (every recycled worker does it);
* the main process's share: loading the customer directory (CPU s, and the RSS it adds) and
  `Router.with_customer` per mail.

Usage::

    .venv/bin/python bench/routing_cost.py                 # N = 2,000 corpus, first 1,000 mails
    .venv/bin/python bench/routing_cost.py --mails 500 --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
for _path in (str(BENCH_DIR.parent), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import run_bench  # noqa: E402

from mailbridge.customers import CustomerDirectory  # noqa: E402
from mailbridge.ingest.mail import ParsedMail  # noqa: E402
from mailbridge.ingest.parse import parse  # noqa: E402
from mailbridge.routing import Router, RuleSet  # noqa: E402
from mailbridge.routing_rules import RoutingSettings, Rule  # noqa: E402


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_per_mail_ms(rounds: int, work: Any, mails: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.process_time()
        work()
        times.append((time.process_time() - started) / mails * 1e3)
    return times


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def router_settings(rules: list[Rule], config: dict[str, Any]) -> RoutingSettings:
    return RoutingSettings(rules=rules, default_queue=config["default_queue"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="corpus size N (generated if missing)")
    parser.add_argument("--mails", type=int, default=1000, help="mails routed per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=run_bench.DEFAULT_CACHE)
    args = parser.parse_args()

    corpus = run_bench.ensure_corpus(args.cache_dir, args.count, args.seed)
    run_bench.remember_sample(corpus)
    mails: list[ParsedMail] = [parse(f.read_bytes()).without_payloads() for f in corpus.files()[: args.mails]]
    with tempfile.TemporaryDirectory(prefix="mb-routing-cost-") as scratch:
        for variant in ("true", "sparse"):
            directory = Path(scratch) / variant
            directory.mkdir()
            config = run_bench.routing_config(directory, sparse=variant == "sparse")
            rules = [Rule.model_validate(r) for r in yaml.safe_load(Path(config["rules_file"]).read_text())]
            router = Router(router_settings(rules, config))
            decisions = [router.by_rules(m, "support", explain=False) for m in mails]
            workers = cpu_per_mail_ms(
                args.rounds, lambda r=router: [r.by_rules(m, "support", explain=False) for m in mails], len(mails)
            )
            matched = statistics.mean(len(d.rule_names) for d in decisions)
            triage = sum(d.queue == "triage" for d in decisions) / len(decisions)
            size = statistics.mean(len(pickle.dumps(d, pickle.HIGHEST_PROTOCOL)) for d in decisions)
            shipped = pickle.dumps(RuleSet.of(router_settings(rules, config)).for_workers())
            starts = cpu_per_mail_ms(args.rounds, lambda s=shipped: Router(pickle.loads(s)), 1)
            print(
                f"routing={variant}: {len(rules)} rules, {matched:.1f} matching a mail, {triage:.0%} to triage; "
                f"by_rules {spread(workers)} CPU ms per mail (median (min-max) of {args.rounds} rounds, "
                f"{len(mails)} mails); decision {size:.0f} bytes pickled; a worker's rules {len(shipped):,} bytes "
                f"pickled, {spread(starts, '{:.1f}')} CPU ms to unpickle and index"
            )
        gc.collect()
        before = rss_mib()
        started = time.process_time()
        customers = CustomerDirectory.load(Path(config["customers"]["directory"]))
        load_s = time.process_time() - started
        added = rss_mib() - before
        loads = []
        for _ in range(3):
            started = time.process_time()
            CustomerDirectory.load(Path(config["customers"]["directory"]))
            loads.append(time.process_time() - started)
        lookup = Router(RoutingSettings(), customers)
        pairs = list(zip(decisions, mails, strict=True))
        lookups = cpu_per_mail_ms(args.rounds, lambda: [lookup.with_customer(d, m) for d, m in pairs], len(mails))
        print(
            f"customer directory: {len(customers):,} organisations, loaded in {load_s:.3f} CPU s "
            f"(again: {spread(loads)}), +{added:.1f} MiB RSS; with_customer {spread(lookups)} CPU ms per mail"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
