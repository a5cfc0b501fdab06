"""CPU the main process spends per CRM lookup (mailbridge/crm.py against a local CRM in another process).

    .venv/bin/python bench/crm_lookup.py [--batches 20] [--batch-size 50] [--repeat 3]

Each batch asks about batch-size new senders (no cache hits: the worst case of a backlog from strangers).
The CRM (tests/support/crm_server.py) runs in a child process, so its threads do not count.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def serve(urls: multiprocessing.Queue[str]) -> None:
    from tests.support.crm_server import CrmServer

    server = CrmServer(everyone=lambda address: {"name": "Customer", "tier": "standard"}).start()
    urls.put(server.url())
    time.sleep(3600)


async def one_run(url: str, batches: int, batch_size: int, run: int) -> tuple[float, float]:
    from mailbridge.crm import Crm
    from mailbridge.routing_rules import CrmSettings

    crm = Crm(CrmSettings(url=url, timeout_seconds=30, cache_entries=1_000_000))
    await crm.look_up([f"warm-up-{run}@bench.example"])  # the session and its first connection
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in range(batches):
        answers = await crm.look_up([f"r{run}b{batch}s{n}@d{n % 7}.example" for n in range(batch_size)])
        if not all(answer.organisation for answer in answers.values()):
            raise SystemExit(f"a lookup failed: {next(a.problem for a in answers.values() if a.problem)}")
    lookups = batches * batch_size
    cpu, wall = (time.process_time() - cpu) / lookups, (time.perf_counter() - wall) / lookups
    await crm.aclose()
    return cpu * 1000, wall * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    urls: multiprocessing.Queue[str] = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(urls,), daemon=True)
    server.start()
    try:
        url = urls.get(timeout=30)
        runs = [asyncio.run(one_run(url, args.batches, args.batch_size, run)) for run in range(args.repeat)]
    finally:
        server.kill()
    cpu = [c for c, _ in runs]
    wall = [w for _, w in runs]
    print(
        f"{args.batches} batches of {args.batch_size} new senders, {args.repeat} runs: "
        f"CPU {statistics.median(cpu):.2f} ({min(cpu):.2f}-{max(cpu):.2f}) ms per lookup in the main process, "
        f"wall {statistics.median(wall):.2f} ({min(wall):.2f}-{max(wall):.2f}) ms per lookup"
    )


if __name__ == "__main__":
    main()
