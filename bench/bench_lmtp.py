"""LMTP intake, end to end: `python -m mailbridge run` on a fresh data directory, C connections of a real
LMTP client (smtplib.LMTP, as an MTA would hold them) delivering N generated mails over the unix socket.

Reported: mails/s from the first MAIL to the last 250 (every 250 means committed, with the default storage
settings: fsync on, SQLite synchronous=FULL), and the time from the end of DATA to the reply (= the commit
latency an MTA sees), p50 / p99. Checked: N tickets, every reply 250.

    .venv/bin/python bench/bench_lmtp.py --count 2000 --connections 4 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import smtplib
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_mails import generate

RECIPIENT = "support@helpdesk.example"


def run_once(mails: list[bytes], connections: int, work: Path, extra: dict[str, object]) -> dict[str, float]:
    socket_path = work / "lmtp.sock"
    config = work / "mailbridge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(work / "data"),
                **extra,
                "lmtp": {"listen": f"unix:{socket_path}"},
                "mailboxes": [{"name": "support", "type": "lmtp", "recipients": [RECIPIENT], "acknowledge": False}],
            }
        )
    )
    log = (work / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "mailbridge", "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MAILBRIDGE_CONFIG": ""},
    )
    try:
        deadline = time.monotonic() + 60
        while not socket_path.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start; see {work / 'daemon.log'}")
            time.sleep(0.05)
        chunks = [mails[i::connections] for i in range(connections)]

        def deliver(chunk: list[bytes]) -> list[float]:
            waits: list[float] = []
            client = smtplib.LMTP(str(socket_path), timeout=120)
            client.ehlo()
            for raw in chunk:
                client.mail("klient@example.com")
                client.rcpt(RECIPIENT)
                # smtplib.data() sends the message and the final dot, then waits for the reply: time that.
                client.putcmd("data")
                code, _ = client.getreply()
                assert code == 354
                client.send(smtplib.quotedata(raw.decode("latin-1")).encode("latin-1") + b"\r\n.\r\n")
                sent = time.perf_counter()
                code, text = client.getreply()
                waits.append(time.perf_counter() - sent)
                assert code == 250, text
            client.quit()
            return waits

        started = time.perf_counter()
        with ThreadPoolExecutor(connections) as pool:
            waits = [w for chunk in pool.map(deliver, chunks) for w in chunk]
        elapsed = time.perf_counter() - started
        with sqlite3.connect(work / "data" / "mailbridge.db") as conn:
            tickets = conn.execute("select count(*) from tickets").fetchone()[0]
        if tickets != len(mails):
            raise RuntimeError(f"{tickets} tickets for {len(mails)} mails")
        waits.sort()
        return {
            "mails_per_s": len(mails) / elapsed,
            "reply_p50_ms": 1000 * waits[len(waits) // 2],
            "reply_p99_ms": 1000 * waits[min(len(waits) - 1, int(len(waits) * 0.99))],
        }
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the runs and medians here")
    parser.add_argument(
        "--config", type=json.loads, default={}, help='top-level config keys as JSON: {"storage": {"fsync": false}}'
    )
    args = parser.parse_args(argv)
    # On the wire, lines end in CRLF (the MTA converts them); the generator writes LF.
    mails = [re.sub(rb"(?<!\r)\n", b"\r\n", raw) for raw in generate(args.count)]
    runs = []
    for n in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="mailbridge-lmtp-bench-") as work:
            result = run_once(mails, args.connections, Path(work), args.config)
        runs.append(result)
        print(f"run {n + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()), flush=True)
    medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    spans = {key: (min(run[key] for run in runs), max(run[key] for run in runs)) for key in runs[0]}
    print(
        f"LMTP, {args.count} mails over {args.connections} connections, {args.repeat} run(s): "
        + ", ".join(f"{k} {medians[k]:.1f} ({spans[k][0]:.1f}-{spans[k][1]:.1f})" for k in medians)
    )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
