#!/usr/bin/env python3
"""End-to-end throughput and memory benchmark of mailbridge.

Two benchmarks, each run as a real ``python -m mailbridge ...`` subprocess on a fresh data directory:

* ``imap``: a private Dovecot (``tests/support/dovecot.py``) with a fresh user whose INBOX holds the
  N generated mails (written straight into the Maildir before the first login, which is much faster
  than N APPENDs); ``mailbridge run --once`` drains it: fetch, parse, store, commit, MOVE to
  ``Processed``.  Afterwards ``mailbridge status`` must show N stored and an empty INBOX.
* ``ingest``: ``mailbridge ingest CACHE_DIR --json`` over the same N mails as ``.eml`` files.

Measured per run: wall time of the subprocess (interpreter start to exit), mails/s and MB/s of raw
mail bytes, peak RSS of the whole process tree (main process + forkserver + parser workers; the sum of
``VmRSS`` sampled every 50 ms) and of the main process alone, the kernel's ``ru_maxrss`` (largest
single process, not sampled), and CPU seconds of mailbridge (and of Dovecot for ``imap``).

Usage (see bench/README.md)::

    .venv/bin/python bench/run_bench.py --count 1000 --repeat 1
    .venv/bin/python bench/run_bench.py --variant storage.fsync=false --variant parsing.workers=1
    .venv/bin/python bench/run_bench.py --memory-check
"""

from __future__ import annotations

import argparse
import contextlib
import email
import email.header
import email.message
import email.utils
import hashlib
import json
import os
import platform
import pstats
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for _path in (str(ROOT), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from generate_mails import generate  # noqa: E402

from tests.support.crm_server import CrmServer  # noqa: E402
from tests.support.dovecot import Dovecot  # noqa: E402
from tests.support.smtp_sink import SmtpSink  # noqa: E402

DEFAULT_CACHE = BENCH_DIR / "out" / "cache"
DEFAULT_OUTPUT = BENCH_DIR / "results" / "latest.json"
DEFAULT_MEMORY_OUTPUT = BENCH_DIR / "results" / "memory-check.json"
MEMORY_CHECK_COUNTS = (2000, 10000)
# Finished runs' data directories are kept while this much space is left (a run at N = 10,000 writes ~1 GB).
FREE_SPACE_RESERVE = 8 * 2**30
BENCHMARKS = ("imap", "ingest", "outbox")
SUPPORT_ADDRESS = "support@bench.example"
# The variant key `acks=true`: the mailbox acknowledges every new ticket (backlog included) through the
# outbox to the benchmark's SMTP sink, with no rate limit in the way.
ACKS_KEY = "acks"
# The variant key `replies=true`: half of the mails are replies to the other half (threading's cost).
REPLIES_KEY = "replies"
# The variant key `routing=true`: 200 keyword rules and a 50,000-organisation customer directory.
# `routing=sparse`: 200 rules of which a mail matches one to three, as in a real rule set (same directory).
ROUTING_KEY = "routing"
ROUTING_SPARSE = "sparse"
ROUTING_RULES, DIRECTORY_SIZE = 200, 50_000
# The variant key `crm=MS`: every sender is looked up in a local CRM (tests/support/crm_server.py) that takes
# MS milliseconds per answer; a third of the domains are enterprise customers.
CRM_KEY = "crm"
MAILBOX_NAME = "support"
PASSWORD = "bench-secret"
SAMPLE_INTERVAL = 0.05
PSS_EVERY = 5  # read PSS on every 5th sample (250 ms)
RUN_TIMEOUT = 1800.0
CORPUS_MARKER = ".corpus.json"  # a dot file: `mailbridge ingest` skips it

# Figures summarised as min/median/max, with how to print them.
FIGURES: dict[str, str] = {
    "wall_s": "{:.2f}",
    "mails_per_s": "{:.0f}",
    "mb_per_s": "{:.2f}",
    "peak_rss_tree_mib": "{:.0f}",
    "peak_rss_main_mib": "{:.0f}",
    "maxrss_single_mib": "{:.0f}",
    "peak_pss_tree_mib": "{:.0f}",
    "cpu_s": "{:.1f}",
    "cpu_main_s": "{:.1f}",
    "dovecot_cpu_s": "{:.1f}",
    "intake_mails_per_s": "{:.0f}",
    "render_mails_per_s": "{:.0f}",
    "deliver_mails_per_s": "{:.0f}",
    "sequential_mails_per_s": "{:.0f}",
}


class BenchError(RuntimeError):
    """A run failed or did not import what it should have: the figures would be meaningless."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------ corpus


@dataclass(frozen=True)
class Corpus:
    path: Path
    count: int
    seed: int
    total_bytes: int

    def files(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.suffix == ".eml")


def _generator_fingerprint() -> str:
    return hashlib.sha256((BENCH_DIR / "generate_mails.py").read_bytes()).hexdigest()[:16]


def ensure_corpus(cache_root: Path, count: int, seed: int) -> Corpus:
    """The N mails as ``000001.eml`` ... in ``cache_root/n<N>-seed<S>``; generated once, then reused."""
    path = cache_root / f"n{count}-seed{seed}"
    marker = path / CORPUS_MARKER
    fingerprint = _generator_fingerprint()
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads(marker.read_text())
        if (
            meta.get("count") == count
            and meta.get("seed") == seed
            and meta.get("generator") == fingerprint
            and sum(1 for p in path.iterdir() if p.suffix == ".eml") == count
        ):
            log(f"reusing {count} cached mails in {path} ({meta['total_bytes'] / 1e6:.1f} MB)")
            return Corpus(path, count, seed, int(meta["total_bytes"]))
    log(f"generating {count} mails (seed {seed}) into {path} ...")
    started = time.perf_counter()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    width = max(6, len(str(count)))
    total = 0
    for index, raw in enumerate(generate(count, seed), start=1):
        (tmp / f"{index:0{width}d}.eml").write_bytes(raw)
        total += len(raw)
    (tmp / CORPUS_MARKER).write_text(
        json.dumps({"count": count, "seed": seed, "total_bytes": total, "generator": fingerprint})
    )
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    log(f"generated {count} mails, {total / 1e6:.1f} MB, in {time.perf_counter() - started:.1f} s")
    return Corpus(path, count, seed, total)


def ensure_reply_corpus(base: Corpus) -> Corpus:
    """The same N mails, every second one made a reply to the one before it: its sender, "Re: [MB-…] "
    and the subject, In-Reply-To and References. In a fresh database mail 2k opens ticket k + 1, so the
    subject tags name the right tickets."""
    path = base.path.with_name(base.path.name + "-replies")
    marker = path / CORPUS_MARKER
    fingerprint = f"{_generator_fingerprint()}-replies-1"
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads(marker.read_text())
        if meta.get("generator") == fingerprint and meta.get("count") == base.count:
            log(f"reusing {base.count} cached mails with replies in {path}")
            return Corpus(path, base.count, base.seed, int(meta["total_bytes"]))
    log(f"making every second mail of {base.path.name} a reply ...")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = base.files()
    total = 0
    parent: email.message.Message | None = None
    for index, file in enumerate(files):
        raw = file.read_bytes()
        if index % 2 == 0:
            parent = email.message_from_bytes(raw)
        else:
            assert parent is not None
            message = email.message_from_bytes(raw)
            for name in ("From", "Subject", "In-Reply-To", "References"):
                del message[name]
            message["From"] = str(parent["From"])
            message["Subject"] = f"Re: [MB-{index // 2 + 1:06d}] {parent['Subject']}"
            message["In-Reply-To"] = str(parent["Message-ID"])
            message["References"] = str(parent["Message-ID"])
            raw = message.as_bytes()
        (tmp / file.name).write_bytes(raw)
        total += len(raw)
    (tmp / CORPUS_MARKER).write_text(json.dumps({"count": base.count, "total_bytes": total, "generator": fingerprint}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return Corpus(path, base.count, base.seed, total)


# ------------------------------------------------------------------------------------ measurement


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read_proc_tree(
    root: int, parents: dict[int, int] | None = None, system: dict[tuple[int, int], int] | None = None
) -> tuple[list[int], dict[tuple[int, int], int]]:
    """``root`` and its live descendants, and their CPU ticks by (pid, start time); ``parents`` (if given)
    gets each descendant's parent, ``system`` (if given) the ticks spent in the kernel.

    The tree is walked through each thread's `children` list, not found by a scan of all of /proc: with
    the other builds on a shared host that was 100-300 processes, ~2.5 ms of CPU per sample, 20 samples a
    second for each measured process, in the process (and under the GIL) of the benchmark's SMTP sink."""
    if not _HAVE_CHILDREN_LISTS:
        return _scan_proc_tree(root, parents, system)
    tree, ticks, todo = [], {}, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                stat = handle.read()
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:  # gone meanwhile
            continue
        # after "comm)": state ppid ... utime(11) stime(12) ... starttime(19)
        fields = stat.rsplit(b")", 1)[1].split()
        tree.append(pid)
        key = (pid, int(fields[19]))
        ticks[key] = int(fields[11]) + int(fields[12])
        if system is not None:
            system[key] = int(fields[12])
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/children", "rb") as handle:
                    children = [int(child) for child in handle.read().split()]
            except OSError:
                continue
            todo.extend(children)
            if parents is not None:
                parents.update(dict.fromkeys(children, pid))
    return tree, ticks


def _scan_proc_tree(
    root: int, parents: dict[int, int] | None = None, system: dict[tuple[int, int], int] | None = None
) -> tuple[list[int], dict[tuple[int, int], int]]:
    """`_read_proc_tree` for a kernel without `children` lists (CONFIG_PROC_CHILDREN): one scan of /proc."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, tuple[int, int]] = {}
    kernel: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[1].split()
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = (int(fields[19]), int(fields[11]) + int(fields[12]))
        kernel[pid] = int(fields[12])
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        for child in children.get(pid, ()):
            todo.append(child)
            if parents is not None:
                parents[child] = pid
    if system is not None:
        system.update({(pid, ticks[pid][0]): kernel[pid] for pid in tree if pid in ticks})
    return tree, {(pid, ticks[pid][0]): ticks[pid][1] for pid in tree if pid in ticks}


_HAVE_CHILDREN_LISTS = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _thread_ticks(pid: int) -> dict[tuple[int, str], int]:
    """CPU ticks of each thread of ``pid`` by (thread id, name); Python 3.11 does not name its threads for the
    kernel, so the name is "main thread" or "other threads" unless something named it."""
    ticks: dict[tuple[int, str], int] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{pid}/task/{entry}/stat", "rb") as handle:
                    stat = handle.read()
                name = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="replace")
                if int(entry) == pid:
                    name = "main thread"
                elif name.startswith("python"):
                    name = "other threads"
                fields = stat.rsplit(b")", 1)[1].split()
                ticks[(int(entry), name)] = int(fields[11]) + int(fields[12])
    return ticks


def _vm_rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0  # gone, or a zombie (no VmRSS line)


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
            for line in handle:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _label(pid: int, root: int) -> str:
    if pid == root:
        return "main"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return "forkserver/worker" if b"forkserver" in cmdline else cmdline.split(b"\0")[0].decode(errors="replace")


ROLES_SPLIT = ("main", "forkserver", "worker")  # roles whose kernel CPU time `cpu_by_role_s` shows apart


class RssSampler(threading.Thread):
    """Samples VmRSS and CPU time of a process and its descendants every ``interval`` seconds.

    Keeps the peak of the summed VmRSS, the peak of the main process alone, and the last CPU time seen
    of every process that was ever part of the tree (short-lived workers included).
    """

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL) -> None:
        super().__init__(name=f"rss-{pid}", daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_tree_kib = 0
        self.peak_main_kib = 0
        self.peak_pss_tree_kib = 0
        self.peak_breakdown: list[tuple[str, int]] = []  # (process, VmRSS KiB) at the peak of the tree sum
        self.max_processes = 0
        self.samples = 0
        self._cpu_ticks: dict[tuple[int, int], int] = {}
        # Of those, the ticks in the kernel: file creation (ext4 inode allocation after the previous run's
        # data was deleted), page faults, syncfs; they vary from run to run whatever mailbridge does.
        self._system_ticks: dict[tuple[int, int], int] = {}
        self._roles: dict[tuple[int, int], str] = {}  # main, forkserver, worker or another process's name
        self._main_threads: dict[tuple[int, str], int] = {}  # the main process's CPU ticks by thread
        self._main_key: tuple[int, int] | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def sample(self) -> None:
        parents: dict[int, int] = {}
        tree, ticks = _read_proc_tree(self.pid, parents, self._system_ticks)
        sizes = [_vm_rss_kib(pid) for pid in tree]
        main = sizes[0] if sizes else 0
        if main == 0:  # the main process has exited (zombie) or not yet exec'd anything
            return
        self.samples += 1
        self.peak_main_kib = max(self.peak_main_kib, main)
        if sum(sizes) > self.peak_tree_kib:
            self.peak_tree_kib = sum(sizes)
            self.peak_breakdown = [(_label(pid, self.pid), size) for pid, size in zip(tree, sizes, strict=True)]
        if self.samples % PSS_EVERY == 1:  # PSS (shared pages split between processes) costs ~1 ms/process
            self.peak_pss_tree_kib = max(self.peak_pss_tree_kib, sum(_pss_kib(pid) for pid in tree))
        self.max_processes = max(self.max_processes, sum(1 for s in sizes if s))
        self._cpu_ticks.update(ticks)
        self._main_threads.update(_thread_ticks(self.pid))
        for key in ticks:
            if key not in self._roles:
                self._roles[key] = self._role(key[0], parents)
        if self._main_key is None:
            self._main_key = next((key for key in ticks if key[0] == self.pid), None)

    def _role(self, pid: int, parents: dict[int, int]) -> str:
        if pid == self.pid:
            return "main"
        label = _label(pid, self.pid)
        if label == "forkserver/worker":  # a worker is the forkserver's child
            return "worker" if parents.get(pid) != self.pid else "forkserver"
        return Path(label).name or "?"  # gone before its command line was read

    @property
    def cpu_by_role_s(self) -> dict[str, float]:
        """CPU seconds by kind of process (the parser workers added up) and, as "<role> sys", the part of
        them spent in the kernel; how many workers there were."""
        seconds: dict[str, float] = {}
        system: dict[str, float] = {}
        for key, ticks in self._cpu_ticks.items():
            role = self._roles.get(key, "?")
            seconds[role] = seconds.get(role, 0.0) + ticks / _CLK_TCK
            system[role] = system.get(role, 0.0) + self._system_ticks.get(key, 0) / _CLK_TCK
        result = {role: round(value, 2) for role, value in sorted(seconds.items())}
        result |= {f"{role} sys": round(value, 2) for role, value in sorted(system.items()) if role in ROLES_SPLIT}
        result["workers_started"] = sum(1 for role in self._roles.values() if role == "worker")
        # The main process's threads by name (the event loop, the database thread, Pebble's threads).
        threads: dict[str, float] = {}
        for (_, name), ticks in self._main_threads.items():
            threads[name] = threads.get(name, 0.0) + ticks / _CLK_TCK
        result |= {f"main/{name}": round(value, 2) for name, value in sorted(threads.items()) if value >= 0.05}
        return result

    @property
    def cpu_tree_s(self) -> float:
        return sum(self._cpu_ticks.values()) / _CLK_TCK

    @property
    def cpu_main_s(self) -> float:
        return self._cpu_ticks.get(self._main_key, 0) / _CLK_TCK if self._main_key else 0.0

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


@dataclass
class Measurement:
    returncode: int
    wall_s: float
    cpu_s: float
    cpu_main_s: float
    peak_rss_tree_mib: float
    peak_rss_main_mib: float
    maxrss_single_mib: float
    peak_pss_tree_mib: float
    peak_breakdown_mib: dict[str, float]
    cpu_by_role_s: dict[str, float]
    processes: int
    samples: int
    stdout: str
    stderr_path: str
    started_epoch: float = 0.0  # wall-clock time of the spawn, to place database timestamps on the run


def measure(cmd: Sequence[str], *, cwd: Path, log_dir: Path, timeout: float = RUN_TIMEOUT) -> Measurement:
    """Run ``cmd``, sampling the RSS of its process tree; wall time from spawn to exit."""
    # What earlier runs (or the corpus set-up) left unwritten is written out first: the daemon's syncfs
    # would otherwise pay for it, and a run's figure would depend on what ran before it.
    os.sync()
    out_path, err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBRIDGE_")}
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        started_epoch = time.time()
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, start_new_session=True
        )
        sampler = RssSampler(proc.pid)
        sampler.start()

        def kill() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(timeout, kill)
        watchdog.start()
        try:
            # wait4 instead of proc.wait(): it also gives the child's rusage (CPU time, ru_maxrss).
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            watchdog.cancel()
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
    # Parser workers that outlived the main process would be a bug; do not leave them behind.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return Measurement(
        returncode=proc.returncode,
        wall_s=wall,
        # The sampled tree CPU misses at most one interval per process; the main process's own
        # rusage (which includes whatever children it reaped) is exact, so take the larger.
        cpu_s=max(sampler.cpu_tree_s, usage.ru_utime + usage.ru_stime),
        cpu_main_s=sampler.cpu_main_s,
        peak_rss_tree_mib=sampler.peak_tree_kib / 1024,
        peak_rss_main_mib=sampler.peak_main_kib / 1024,
        maxrss_single_mib=usage.ru_maxrss / 1024,
        peak_pss_tree_mib=sampler.peak_pss_tree_kib / 1024,
        peak_breakdown_mib={
            f"{i}:{name}": round(kib / 1024, 1) for i, (name, kib) in enumerate(sampler.peak_breakdown)
        },
        cpu_by_role_s=sampler.cpu_by_role_s,
        processes=sampler.max_processes,
        samples=sampler.samples,
        stdout=out_path.read_text(errors="replace"),
        stderr_path=str(err_path),
        started_epoch=started_epoch,
    )


def _tail(path: str | Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    return ""


def _cpu_ticks(pid: int, *, children: bool) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    # fields[11:13] = utime, stime; [13:15] = cutime, cstime (of waited-for children)
    return int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if children else 0)


def dovecot_cpu_s(server: Dovecot) -> float:
    """CPU seconds used so far by the Dovecot instance (live processes + reaped children of the master)."""
    master = server._proc.pid if server._proc is not None else None
    ticks = sum(_cpu_ticks(pid, children=pid == master) for pid in server.pids())
    return ticks / _CLK_TCK


# -------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]


def parse_variant(text: str) -> Variant:
    """``storage.fsync=false`` or ``storage.fsync=false,parsing.workers=1`` (values are YAML)."""
    overrides: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise argparse.ArgumentTypeError(f"--variant expects KEY=VALUE[,KEY=VALUE...], got {text!r}")
        overrides[key] = yaml.safe_load(value)
    return Variant(name=text, overrides=overrides)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        node = data.setdefault(part, {})
        if not isinstance(node, dict):
            raise BenchError(f"cannot set {key}: {part} is not a mapping")
        data = node
    data[parts[-1]] = value


def write_config(
    path: Path, data_dir: Path, mailbox: dict[str, Any] | None, variant: Variant, sink: SmtpSink | None = None
) -> Path:
    config: dict[str, Any] = {
        "data_dir": str(data_dir),
        "storage": {"fsync": True},
        "mailboxes": [mailbox] if mailbox else [],
    }
    for key, value in variant.overrides.items():
        if key == REPLIES_KEY:
            continue
        if key == ROUTING_KEY:
            if value not in (True, False, ROUTING_SPARSE):
                raise BenchError(f"routing={value!r}: use true, false or {ROUTING_SPARSE}")
            if value:
                config["routing"] = routing_config(path.parent, sparse=value == ROUTING_SPARSE)
            continue
        if key == CRM_KEY:
            customers = config.setdefault("routing", {}).setdefault("customers", {})
            customers["crm"] = {"url": crm_server(float(value)).url(), "timeout_seconds": 5}
            continue
        if key == ACKS_KEY:
            if value and mailbox is not None:
                if sink is None:
                    raise BenchError("acks=true needs the SMTP sink")
                mailbox.update(answering(sink, config))
            continue
        _set_dotted(config, key, value)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


_CRM_SERVERS: dict[float, CrmServer] = {}


def crm_server(latency_ms: float) -> CrmServer:
    """One local CRM per latency, for the whole benchmark run (stopped by Bench.close)."""
    if latency_ms not in _CRM_SERVERS:

        def customer(address: str) -> dict[str, Any]:
            domain = address.rpartition("@")[2]
            tier = "enterprise" if zlib.crc32(domain.encode()) % 3 == 0 else "standard"
            return {"name": f"Customer {domain}", "tier": tier, "account_manager": "am@helpdesk.example"}

        server = CrmServer(everyone=customer, delay_seconds=latency_ms / 1000).start()
        log(f"CRM (http.server) on 127.0.0.1:{server.port}, {latency_ms:g} ms per answer")
        _CRM_SERVERS[latency_ms] = server
    return _CRM_SERVERS[latency_ms]


def answering(sink: SmtpSink, config: dict[str, Any]) -> dict[str, Any]:
    """Mailbox keys (and the top-level smtp/outbox) for acknowledging every new ticket to the sink."""
    config["smtp"] = sink.config()
    config["outbox"] = {"domain": "bench.example"}
    return {
        "address": SUPPORT_ADDRESS,
        "acknowledge_backlog": True,
        "rate_limit": {"per_hour": 10_000_000, "per_day": 10_000_000},
    }


def routing_config(directory: Path, sparse: bool = False) -> dict[str, Any]:
    """200 rules over words that occur in the generated mails, and a 50,000-entry customer directory that
    also knows the generated senders' domains (some of them enterprise customers)."""
    rules = sparse_rules() if sparse else keyword_rules()
    rules_file = directory / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rules, sort_keys=False))
    customers = directory / "customers.csv"
    with customers.open("w") as handle:
        handle.write("name,domains,addresses,tier,account_manager\n")
        for index in range(DIRECTORY_SIZE):
            tier = "enterprise" if index % 10 == 0 else "standard"
            handle.write(f"Org {index},org{index}.example,,{tier},am{index % 50}@helpdesk.example\n")
        for index, domain in enumerate(_sample_domains()):
            handle.write(f"Sender {index},{domain},,{'enterprise' if index % 3 == 0 else 'standard'},\n")
    return {"rules_file": str(rules_file), "customers": {"directory": str(customers)}, "default_queue": "general"}


def keyword_rules() -> list[dict[str, Any]]:
    """`routing=true`: every rule looks for five words of the subjects in the whole text. The generated
    bodies are drawn from a few dozen sentences per language, so a mail matches about 40 of these rules
    and nearly every mail goes to triage: the worst case for the rules' cost, not a realistic rule set."""
    rng = random.Random(7)
    subjects = [set(re.findall(r"[^\W\d_]{5,}", s.lower())) for s in _sample_subjects()]
    frequency: dict[str, int] = {}
    for found in subjects:
        for word in found:
            frequency[word] = frequency.get(word, 0) + 1
    # Real rule sets are specific: most keywords are rare words (a mail matches a rule or two), a few
    # broad rules use common ones.
    rare = sorted(w for w, n in frequency.items() if n <= max(1, len(subjects) // 100)) or ["faktura", "umowa"]
    common = sorted(w for w, n in frequency.items() if n > max(1, len(subjects) // 100)) or ["awaria"]
    rules = []
    for index in range(ROUTING_RULES):
        pool = common if index % 20 == 0 else rare
        keywords = []
        for _ in range(5):
            word = rng.choice(pool)
            keywords.append(word[: max(4, len(word) - 2)] + "*" if rng.random() < 0.3 else word)
        rules.append(
            {
                "name": f"rule{index:03d}",
                "when": {"text": {"any": keywords}},
                "then": {"queue": f"queue{index % 20}", "tags": [f"t{index % 7}"]},
            }
        )
    return rules


def sparse_rules() -> list[dict[str, Any]]:
    """`routing=sparse`: 200 rules as a real help desk has them, each about one topic, so that a mail
    matches one to three. Topic rules look at the subject (the generated bodies are random sentences,
    unrelated to the subject, which real bodies are not), a few rules add a priority for the senders'
    domains, and the rest are about topics that this corpus does not contain, with keywords and word
    beginnings on the whole text: they cost their lookups but do not match."""
    rng = random.Random(11)
    subjects = [set(re.findall(r"[^\W\d_]{5,}", s.lower())) for s in _sample_subjects()]
    frequency: dict[str, int] = {}
    for found in subjects:
        for word in found:
            frequency[word] = frequency.get(word, 0) + 1
    # A topic: the two most frequent words of a subject among those that few subjects share (a subject
    # template's own words, not the department or city filled in, nor words that every template has).
    limit = max(2, len(subjects) // 15)
    topics: dict[tuple[str, ...], None] = {}
    for found in subjects:
        own = sorted((w for w in found if frequency[w] <= limit), key=lambda w: (-frequency[w], w))[:2]
        if own:
            topics[tuple(sorted(own))] = None
    rules: list[dict[str, Any]] = []
    for index, words in enumerate(list(topics)[:120]):
        keywords = [w[: max(5, len(w) - 2)] + "*" if rng.random() < 0.3 else w for w in words]
        rules.append(
            {
                "name": f"topic{index:03d}",
                "when": {"subject": {"all": keywords}},
                "then": {"queue": f"queue{index % 20}", "tags": [f"t{index % 7}"]},
            }
        )
    for index, domain in enumerate(_sample_domains()[:20]):
        rules.append({"name": f"customer{index:03d}", "when": {"sender_domain": [domain]}, "then": {"priority": "P2"}})
    letters = "abcdefghijklmnoprstuwyząćęłńóśźż"
    index = 0
    while len(rules) < ROUTING_RULES:
        keywords = []
        for _ in range(5):
            word = "".join(rng.choice(letters) for _ in range(rng.randint(6, 10)))
            keywords.append(word[:5] + "*" if rng.random() < 0.3 else word)
        rules.append(
            {
                "name": f"other{index:03d}",
                "when": {"text": {"any": keywords}},
                "then": {"queue": f"queue{index % 20}"},
            }
        )
        index += 1
    return rules


def _sample_subjects() -> list[str]:
    return [subject for subject, _ in _SAMPLE]


def _sample_domains() -> list[str]:
    return sorted({domain for _, domain in _SAMPLE})


_SAMPLE: list[tuple[str, str]] = []


def remember_sample(corpus: Corpus, count: int = 500) -> None:
    """Subjects and sender domains of the first mails, for the routing variant's rules and directory."""
    if _SAMPLE:
        return
    for file in corpus.files()[:count]:
        message = email.message_from_bytes(file.read_bytes())
        subject = str(email.header.make_header(email.header.decode_header(str(message.get("Subject", "")))))
        domain = email.utils.parseaddr(str(message.get("From", "")))[1].rpartition("@")[2].lower()
        _SAMPLE.append((subject, domain))


def mailbox_entry(server: Dovecot, user: str) -> dict[str, Any]:
    return {
        "name": MAILBOX_NAME,
        "host": server.host,
        "port": server.port,
        "security": "none",
        "user": user,
        "password": PASSWORD,
        "folder": "INBOX",
    }


# ------------------------------------------------------------------------------------- the runs


@dataclass
class RunResult:
    benchmark: str
    variant: str
    repeat: int
    count: int
    total_bytes: int
    wall_s: float
    mails_per_s: float
    mb_per_s: float
    peak_rss_tree_mib: float
    peak_rss_main_mib: float
    maxrss_single_mib: float
    peak_pss_tree_mib: float
    cpu_s: float
    cpu_main_s: float
    processes: int
    samples: int
    dovecot_cpu_s: float | None = None
    setup_s: float | None = None
    # Mails per second until the last ticket was stored; differs from mails_per_s when the command also
    # delivers acknowledgements after the mailbox is drained.
    intake_mails_per_s: float | None = None
    # outbox: N / the render phase (ack_phase's timed loop), N / the delivery phase (`run --once`), and
    # N / (render + delivery) one after the other; mails_per_s is both at once, as in the daemon.
    render_mails_per_s: float | None = None
    deliver_mails_per_s: float | None = None
    sequential_mails_per_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def compile_bytecode(python: str, cwd: Path) -> str:
    """Compile the measured mailbridge's modules to bytecode once, before any run: an installed package has
    it (pip compiles at install; Python writes it at the first import otherwise). Where
    PYTHONDONTWRITEBYTECODE is set, as on this workplace's machines, a checkout's modules would be compiled
    from source again by every command, about 0.9 s of each start of `mailbridge run`. Returns the
    package directory compiled."""
    where = subprocess.run(
        [python, "-c", "import mailbridge, os; print(os.path.dirname(mailbridge.__file__))"],
        cwd=cwd,  # as the runs import it (cwd, PYTHONPATH)
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    subprocess.run([python, "-m", "compileall", "-q", where], cwd=cwd, capture_output=True, check=True)
    return where


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.python: str = args.python
        self._server: Dovecot | None = None
        self._sink: SmtpSink | None = None
        self._users = 0
        self._runs = 0
        self.kept_failed = False
        # Data directories of finished runs, deleted at the end (see `_cleanup`).
        self._finished_data: list[Path] = []
        self.bytecode_compiled = compile_bytecode(self.python, work)

    # --- Dovecot -------------------------------------------------------------------------------

    @property
    def server(self) -> Dovecot:
        if self._server is None:
            reason = Dovecot.unavailable_reason()
            if reason is not None:
                raise BenchError(f"cannot run the IMAP benchmark: {reason}")
            self._server = Dovecot.start(self.work / "dovecot")
            log(f"dovecot running on {self._server.host}:{self._server.port} (base {self._server.base_dir})")
        return self._server

    @property
    def sink(self) -> SmtpSink:
        if self._sink is None:
            self._sink = SmtpSink().start()
            log(f"SMTP sink (aiosmtpd) on {self._sink.host}:{self._sink.port}")
        return self._sink

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._sink is not None:
            self._sink.stop()
            self._sink = None
        for latency, crm in list(_CRM_SERVERS.items()):
            log(f"CRM ({latency:g} ms) answered {len(crm.requests)} lookups")
            crm.stop()
            del _CRM_SERVERS[latency]

    def fresh_user(self, files: Sequence[Path]) -> str:
        """A new IMAP user whose INBOX holds ``files``, put into Maildir/new before the first login."""
        server = self.server
        self._users += 1
        name = f"bench{self._users}"
        home = server.mail_root / name
        maildir = home / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        uid, gid = server.mail_uid, server.mail_gid
        chown = server.is_root  # mail processes run as mail_uid/mail_gid: they must own the files
        stamp = int(time.time())
        link = not self.args.copy_mails
        for index, src in enumerate(files, start=1):
            # Named as Dovecot names the mail it delivers itself (LDA, LMTP, APPEND): S=<size> spares it a
            # stat() per mail, W=<size with CRLF line ends> reading the whole mail to answer RFC822.SIZE.
            # Without W= the first size listing of a 10,000-mail folder cost Dovecot about 0.8 s.
            data = src.read_bytes()
            size, vsize = len(data), len(data) + data.count(b"\n") - data.count(b"\r\n")
            dst = maildir / "new" / f"{stamp}.M{index}P{os.getpid()}.mbbench,S={size},W={vsize}"
            if link:
                try:
                    os.link(src, dst)  # same file system: no copy (Dovecot never rewrites a Maildir file)
                except OSError:
                    link = False
            if not link:
                shutil.copyfile(src, dst)
            if chown:
                os.chown(dst, uid, gid)
        if chown:
            for path in (home, maildir, *(maildir / s for s in ("cur", "new", "tmp"))):
                os.chown(path, uid, gid)
        for path in (maildir, *(maildir / s for s in ("cur", "new", "tmp"))):
            path.chmod(0o700)
        server.add_user(name, PASSWORD)  # first login: Dovecot scans new/ and assigns UIDs
        seen = len(server.uids("INBOX", user=name))
        if seen != len(files):
            raise BenchError(f"dovecot sees {seen} mails in the INBOX of {name}, expected {len(files)}")
        return name

    def drop_user(self, name: str) -> None:
        if self._server is not None:
            shutil.rmtree(self._server.mail_root / name, ignore_errors=True)

    # --- helpers -----------------------------------------------------------------------------------

    def _run_dir(self, label: str) -> Path:
        self._runs += 1
        path = self.work / f"run{self._runs:03d}-{label}"
        path.mkdir(parents=True)
        return path

    def _mailbridge(self, *args: str, profile: Path | None = None) -> list[str]:
        prefix = [self.python]
        if profile is not None and profile.suffix == ".prof":
            prefix = [self.python, "-m", "cProfile", "-o", str(profile)]
        elif profile is not None:  # py-spy: every thread and the parser workers, collapsed stacks
            py_spy = shutil.which("py-spy") or str(Path(self.python).with_name("py-spy"))
            prefix = [
                py_spy,
                "record",
                "--subprocesses",
                "--threads",
                "--nonblocking",
                "--format",
                "raw",
                "--rate",
                "200",
                "--output",
                str(profile),
                "--",
                self.python,
            ]
        return [*prefix, "-m", "mailbridge", *args]

    def _status(self, config: Path, cwd: Path) -> list[dict[str, Any]]:
        out = subprocess.run(
            self._mailbridge("status", "--json", "--config", str(config)),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if out.returncode != 0:
            raise BenchError(f"mailbridge status failed ({out.returncode}):\n{out.stderr[-3000:]}")
        status = json.loads(out.stdout)
        # {"mailboxes": [...], "crm": ...} since the CRM's health is shown; a plain list of rows before.
        rows: list[dict[str, Any]] = status["mailboxes"] if isinstance(status, dict) else status
        return rows

    @staticmethod
    def _row(rows: list[dict[str, Any]], mailbox: str) -> dict[str, Any]:
        for row in rows:
            if row.get("mailbox") == mailbox:
                return row
        raise BenchError(f"mailbridge status has no row for mailbox {mailbox!r}: {rows}")

    def _cleanup(self, run_dir: Path, *, failed: bool) -> None:
        if failed and self.args.keep_failed:
            self.kept_failed = True
            log(f"keeping {run_dir} for inspection")
            return
        if not self.args.keep:
            # Not deleted now: the next run would create its files among thousands of inodes freed seconds
            # before, and ext4 without a journal (this VM's root file system) checks every free inode it
            # considers for a recent deletion (`recently_deleted`: 60 s, 300 s while the inode table is
            # unwritten) and skips it; at N = 2,000 that put 0.8 CPU-s more into the parser workers' kernel
            # time (+25 %) of a run right after a deletion. The daemon in production deletes nothing.
            self._finished_data.append(run_dir / "data")
            self._make_room()

    def _make_room(self) -> None:
        """Delete finished runs' data only when the scratch file system runs short of space."""
        while self._finished_data:
            free = shutil.disk_usage(self.work).free
            if free >= FREE_SPACE_RESERVE:
                return
            oldest = self._finished_data.pop(0)
            log(f"only {free / 2**30:.1f} GiB free: deleting {oldest} (the next run may be slower, see _cleanup)")
            shutil.rmtree(oldest, ignore_errors=True)

    def delete_finished_data(self) -> None:
        for path in self._finished_data:
            shutil.rmtree(path, ignore_errors=True)
        self._finished_data.clear()

    @staticmethod
    def _result(
        benchmark: str,
        variant: Variant,
        repeat: int,
        corpus: Corpus,
        m: Measurement,
        *,
        extra: dict[str, Any],
        **figures: Any,
    ) -> RunResult:
        return RunResult(
            benchmark=benchmark,
            variant=variant.name,
            repeat=repeat,
            count=corpus.count,
            total_bytes=corpus.total_bytes,
            wall_s=m.wall_s,
            mails_per_s=corpus.count / m.wall_s,
            mb_per_s=corpus.total_bytes / m.wall_s / 1e6,
            peak_rss_tree_mib=m.peak_rss_tree_mib,
            peak_rss_main_mib=m.peak_rss_main_mib,
            maxrss_single_mib=m.maxrss_single_mib,
            peak_pss_tree_mib=m.peak_pss_tree_mib,
            cpu_s=m.cpu_s,
            cpu_main_s=m.cpu_main_s,
            processes=m.processes,
            samples=m.samples,
            extra={**extra, "peak_rss_breakdown_mib": m.peak_breakdown_mib, "cpu_by_role_s": m.cpu_by_role_s},
            **figures,
        )

    # --- the benchmarks ------------------------------------------------------------------------

    def run_imap(self, corpus: Corpus, variant: Variant, repeat: int, *, profile: Path | None = None) -> RunResult:
        remember_sample(corpus)
        replies = bool(variant.overrides.get(REPLIES_KEY))
        if replies:
            corpus = ensure_reply_corpus(corpus)
        run_dir = self._run_dir("imap")
        load = os.getloadavg()[0]
        started = time.perf_counter()
        user = self.fresh_user(corpus.files())
        setup = time.perf_counter() - started
        server = self.server
        acks = bool(variant.overrides.get(ACKS_KEY))
        sink = self.sink if acks else None
        config = write_config(run_dir / "mailbridge.yaml", run_dir / "data", mailbox_entry(server, user), variant, sink)
        received_before = len(sink.received) if sink else 0
        failed = True
        try:
            cpu_before = dovecot_cpu_s(server)
            m = measure(
                self._mailbridge("run", "--once", "--config", str(config), profile=profile),
                cwd=run_dir,
                log_dir=run_dir,
            )
            time.sleep(0.2)  # let the master reap the imap process, so its CPU time is counted
            dovecot_cpu = dovecot_cpu_s(server) - cpu_before
            if m.returncode != 0:
                raise BenchError(f"mailbridge run --once exited with {m.returncode}:\n{_tail(m.stderr_path)}")
            row = self._row(self._status(config, run_dir), MAILBOX_NAME)
            inbox = len(server.uids("INBOX", user=user))
            processed = len(server.uids("Processed", user=user))
            # `status` counts replies apart from new tickets (an older mailbridge under --python counts them as stored)
            imported = row["stored"] + row.get("replies", 0)
            if imported != corpus.count or row["in_folder"] != 0 or inbox != 0 or processed != corpus.count:
                raise BenchError(
                    f"IMAP run did not import everything: status stored={row['stored']} replies={row.get('replies')} "
                    f"duplicates="
                    f"{row['duplicates']} quarantined={row['quarantined']} in_folder={row['in_folder']} "
                    f"(expected stored + replies = {corpus.count}, in_folder=0); "
                    f"dovecot INBOX={inbox} Processed={processed}"
                    f"\n{_tail(m.stderr_path)}"
                )
            if sink is not None:
                self._check_delivered(sink, received_before, corpus.count, m)
            intake = corpus.count / max(0.001, _last_ticket_epoch(run_dir / "data" / "mailbridge.db") - m.started_epoch)
            if replies:
                _check_threaded(run_dir / "data" / "mailbridge.db", corpus.count)
            if CRM_KEY in variant.overrides:
                _check_crm(run_dir / "data" / "mailbridge.db")
            failed = False
        finally:
            self._cleanup(run_dir, failed=failed)
            if not failed or not self.args.keep_failed:
                self.drop_user(user)
        return self._result(
            "imap",
            variant,
            repeat,
            corpus,
            m,
            dovecot_cpu_s=dovecot_cpu,
            setup_s=setup,
            intake_mails_per_s=intake,
            extra={"loadavg_1m": load},
        )

    def run_ingest(self, corpus: Corpus, variant: Variant, repeat: int, *, profile: Path | None = None) -> RunResult:
        run_dir = self._run_dir("ingest")
        load = os.getloadavg()[0]
        config = write_config(run_dir / "mailbridge.yaml", run_dir / "data", None, variant)
        failed = True
        try:
            m = measure(
                self._mailbridge("ingest", str(corpus.path), "--json", "--config", str(config), profile=profile),
                cwd=run_dir,
                log_dir=run_dir,
            )
            if m.returncode != 0:
                raise BenchError(f"mailbridge ingest exited with {m.returncode}:\n{_tail(m.stderr_path)}")
            try:  # under py-spy, its own messages surround the JSON
                summary = json.loads(m.stdout[m.stdout.index("{") : m.stdout.rindex("}") + 1])
            except ValueError:
                raise BenchError(f"mailbridge ingest printed no JSON: {m.stdout[-2000:]!r}") from None
            if summary.get("read") != corpus.count or summary.get("stored") != corpus.count:
                raise BenchError(
                    f"ingest did not store every mail: {summary} (expected {corpus.count} read and stored)"
                )
            row = self._row(self._status(config, run_dir), "import")
            if row["stored"] != corpus.count:
                raise BenchError(f"status after ingest shows stored={row['stored']}, expected {corpus.count}")
            if CRM_KEY in variant.overrides:
                _check_crm(run_dir / "data" / "mailbridge.db")
            failed = False
        finally:
            self._cleanup(run_dir, failed=failed)
        return self._result("ingest", variant, repeat, corpus, m, extra={"loadavg_1m": load})

    def run_outbox(self, corpus: Corpus, variant: Variant, repeat: int, *, profile: Path | None = None) -> RunResult:
        """N acknowledgements rendered into the outbox and delivered to the SMTP sink, in three measured
        phases on N tickets stored beforehand (`ingest --no-notify`, not measured):

        1. render: `bench/ack_phase.py` runs the pipeline's acknowledgement code (loop rules, rate-limit
           query, Jinja sandbox render, signed Message-ID, RFC 5322 bytes, outbox INSERT), 50 per transaction;
        2. deliver: `mailbridge run --once` sends the N queued mails to the sink over reused sessions;
        3. end to end, as the daemon works: the outbox is emptied, `mailbridge run` (with its sender
           process) is started, and ack_phase renders N again while the sender delivers; timed from the
           first render to the N-th mail accepted by the sink. This is the figure in `mails_per_s`.
        """
        run_dir = self._run_dir("outbox")
        load = os.getloadavg()[0]
        sink = self.sink
        mailbox = {"type": "maildir", "name": MAILBOX_NAME, "path": str(run_dir / "maildir")}
        config_data: dict[str, Any] = {}
        mailbox.update(answering(sink, config_data))
        # The daemon's own intake wakes its sender after each commit; mail queued by another process is
        # found by polling, so poll about as often.
        config_data["outbox"]["poll_seconds"] = 0.05
        config = write_config(run_dir / "mailbridge.yaml", run_dir / "data", mailbox, variant, sink)
        data = yaml.safe_load(config.read_text())
        data.update(config_data)
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        ack_phase = [self.python, str(BENCH_DIR / "ack_phase.py"), "--config", str(config)]
        ack_phase += ["--corpus", str(corpus.path), "--mailbox", MAILBOX_NAME]
        failed = True
        try:
            started = time.perf_counter()
            setup = subprocess.run(
                [
                    *self._mailbridge("ingest", str(corpus.path), "--mailbox", MAILBOX_NAME, "--no-notify", "--json"),
                    "--config",
                    str(config),
                ],
                cwd=run_dir,
                capture_output=True,
                text=True,
                check=False,
            )
            setup_s = time.perf_counter() - started
            if setup.returncode != 0:
                raise BenchError(f"ingest before the outbox run failed:\n{setup.stderr[-3000:]}")
            rendering = measure(ack_phase, cwd=run_dir, log_dir=_phase_dir(run_dir, "render"))
            render_s = _rendered(rendering, corpus.count)
            render_cpu_s = float(json.loads(rendering.stdout)["cpu_s"])
            received_before = len(sink.received)
            delivering = measure(
                self._mailbridge("run", "--once", "--config", str(config), profile=profile),
                cwd=run_dir,
                log_dir=_phase_dir(run_dir, "deliver"),
            )
            if delivering.returncode != 0:
                raise BenchError(
                    f"mailbridge run --once exited with {delivering.returncode}:\n{_tail(delivering.stderr_path)}"
                )
            sent_bytes = self._check_delivered(sink, received_before, corpus.count, delivering)
            both = self._render_while_the_daemon_sends(run_dir, config, ack_phase, corpus.count)
            failed = False
        finally:
            self._cleanup(run_dir, failed=failed)
        m = both.rendering
        result = self._result(
            "outbox",
            variant,
            repeat,
            corpus,
            m,
            setup_s=setup_s,
            extra={
                "loadavg_1m": load,
                "render_s": render_s,
                "render_cpu_s": render_cpu_s,  # the timed loop alone: about the CPU cost of N acknowledgements
                "deliver_wall_s": delivering.wall_s,
                "deliver_cpu_s": delivering.cpu_s,  # run --once's whole tree, start-up included
                "render_phase_peak_rss_tree_mib": rendering.peak_rss_tree_mib,
                "deliver_phase_peak_rss_tree_mib": delivering.peak_rss_tree_mib,
                "end_to_end_daemon_peak_rss_tree_mib": both.daemon_peak_rss_tree_mib,
                "end_to_end_render_peak_rss_tree_mib": m.peak_rss_tree_mib,
            },
        )
        # The headline: end to end, both processes at work (their peaks added: an upper bound).
        result.wall_s = both.seconds
        result.mails_per_s = corpus.count / both.seconds
        result.mb_per_s = sent_bytes / both.seconds / 1e6
        result.total_bytes = sent_bytes
        result.peak_rss_tree_mib = m.peak_rss_tree_mib + both.daemon_peak_rss_tree_mib
        result.peak_rss_main_mib = max(m.peak_rss_main_mib, both.daemon_peak_rss_main_mib)
        result.cpu_s = m.cpu_s + both.daemon_cpu_s
        result.render_mails_per_s = corpus.count / render_s
        result.deliver_mails_per_s = corpus.count / delivering.wall_s
        result.sequential_mails_per_s = corpus.count / (render_s + delivering.wall_s)
        return result

    def _render_while_the_daemon_sends(
        self, run_dir: Path, config: Path, ack_phase: list[str], count: int
    ) -> _EndToEnd:
        with sqlite3.connect(run_dir / "data" / "mailbridge.db") as db:
            db.execute("delete from outbox")
        sink = self.sink
        target = sink.count + count
        log_dir = _phase_dir(run_dir, "daemon")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBRIDGE_")}
        with (log_dir / "stderr.txt").open("wb") as err:
            daemon = subprocess.Popen(
                self._mailbridge("run", "--config", str(config)),
                cwd=run_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        sampler = RssSampler(daemon.pid)
        sampler.start()
        try:
            deadline = time.monotonic() + 60
            while b"outbox sender running" not in (log_dir / "stderr.txt").read_bytes():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"the daemon did not start its sender:\n{_tail(log_dir / 'stderr.txt')}")
                time.sleep(0.05)
            arrived: list[float] = []

            def watch() -> None:
                limit = time.monotonic() + RUN_TIMEOUT
                while sink.count < target and time.monotonic() < limit:  # no copy of 20,000 records each time
                    time.sleep(0.01)
                arrived.append(time.time())

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            rendering = measure(ack_phase, cwd=run_dir, log_dir=_phase_dir(run_dir, "render-while-sending"))
            _rendered(rendering, count)
            watcher.join()
            if sink.count < target:
                raise BenchError(f"the daemon delivered {sink.count - target + count} of {count} mails")
            first_render = json.loads(rendering.stdout)["started"]
            return _EndToEnd(
                seconds=arrived[0] - first_render,
                rendering=rendering,
                daemon_peak_rss_tree_mib=sampler.peak_tree_kib / 1024,
                daemon_peak_rss_main_mib=sampler.peak_main_kib / 1024,
                daemon_cpu_s=sampler.cpu_tree_s,
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()
            sampler.stop()

    def _check_delivered(self, sink: SmtpSink, before: int, expected: int, m: Measurement) -> int:
        received = sink.received[before:]
        distinct = {r.message_id for r in received}
        if len(received) != expected or len(distinct) != expected:
            raise BenchError(
                f"the sink received {len(received)} mails ({len(distinct)} distinct), expected {expected}"
                f"\n{_tail(m.stderr_path)}"
            )
        return sum(len(r.data) for r in received)

    def startup(self, benchmark: str, variant: Variant) -> Measurement:
        """The same command with nothing to do: interpreter, imports, migrations, login (time and RSS)."""
        run_dir = self._run_dir(f"startup-{benchmark}")
        empty = run_dir / "empty"
        empty.mkdir()
        if benchmark in ("imap", "outbox"):
            user = self.fresh_user([])
            config = write_config(
                run_dir / "mailbridge.yaml",
                run_dir / "data",
                mailbox_entry(self.server, user),
                variant,
                self.sink if variant.overrides.get(ACKS_KEY) else None,
            )
            cmd = self._mailbridge("run", "--once", "--config", str(config))
        else:
            config = write_config(run_dir / "mailbridge.yaml", run_dir / "data", None, variant)
            cmd = self._mailbridge("ingest", str(empty), "--json", "--config", str(config))
        m = measure(cmd, cwd=run_dir, log_dir=run_dir)
        if m.returncode != 0:
            raise BenchError(f"{benchmark} with nothing to do exited with {m.returncode}:\n{_tail(m.stderr_path)}")
        self._cleanup(run_dir, failed=False)
        if benchmark in ("imap", "outbox"):
            self.drop_user(user)
        return m


@dataclass
class _EndToEnd:
    seconds: float  # first render to the N-th mail at the sink
    rendering: Measurement
    daemon_peak_rss_tree_mib: float
    daemon_peak_rss_main_mib: float
    daemon_cpu_s: float


def _phase_dir(run_dir: Path, phase: str) -> Path:
    path = run_dir / phase
    path.mkdir(parents=True, exist_ok=True)
    return path


def _rendered(m: Measurement, count: int) -> float:
    """Seconds of ack_phase's timed loop, after checking that it acknowledged all N."""
    try:
        report = json.loads(m.stdout)
    except ValueError:
        report = {}
    if m.returncode != 0 or report.get("acknowledged") != count:
        raise BenchError(f"ack_phase acknowledged {report.get('acknowledged')} of {count}:\n{_tail(m.stderr_path)}")
    return float(report["render_s"])


# ------------------------------------------------------------------------------------- reporting


def _check_threaded(db: Path, count: int) -> None:
    with sqlite3.connect(db) as conn:
        tickets = conn.execute("select count(*) from tickets").fetchone()[0]
        articles = conn.execute("select count(*) from articles").fetchone()[0]
    if tickets != (count + 1) // 2 or articles != count:
        raise BenchError(f"threading went wrong: {tickets} tickets and {articles} articles for {count} mails")


def _check_crm(db: Path) -> None:
    """Every new ticket got its customer from the CRM, none was flagged for an unanswered lookup."""
    with sqlite3.connect(db) as conn:
        tickets, known, flagged = conn.execute(
            "select count(*), count(organisation), sum(triage_reason like '%customer unknown%') from tickets"
        ).fetchone()
    if known != tickets or flagged:
        raise BenchError(f"CRM lookups went wrong: {known} of {tickets} tickets have a customer, {flagged} flagged")


def _last_ticket_epoch(db: Path) -> float:
    with sqlite3.connect(db) as conn:
        value = conn.execute(
            "select max(coalesce(a.created_at, t.created_at)) from tickets t left join articles a on a.ticket_id = t.id"
        ).fetchone()[0]
    stamp = datetime.fromisoformat(str(value))
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize_runs(runs: Sequence[RunResult]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for figure in FIGURES:
        values = [getattr(r, figure) for r in runs if getattr(r, figure) is not None]
        if values:
            summary[figure] = summarize(values)
    return summary


def _fmt(stats: dict[str, float] | None, pattern: str) -> str:
    if not stats:
        return "-"
    med = pattern.format(stats["median"])
    if stats["min"] == stats["max"]:
        return med
    return f"{med} ({pattern.format(stats['min'])}–{pattern.format(stats['max'])})"


def print_table(groups: list[dict[str, Any]]) -> None:
    """One line per (count, variant, benchmark): median (min–max)."""
    columns = [
        ("N", None),
        ("bench", None),
        ("variant", None),
        ("runs", None),
        ("mails/s", "mails_per_s"),
        ("to last ticket mails/s", "intake_mails_per_s"),
        ("render/s", "render_mails_per_s"),
        ("deliver/s", "deliver_mails_per_s"),
        ("render then deliver /s", "sequential_mails_per_s"),
        ("MB/s", "mb_per_s"),
        ("wall s", "wall_s"),
        ("peak RSS tree MiB", "peak_rss_tree_mib"),
        ("peak RSS main MiB", "peak_rss_main_mib"),
        ("peak PSS tree MiB", "peak_pss_tree_mib"),
        ("CPU s tree", "cpu_s"),
        ("CPU s main", "cpu_main_s"),
        ("dovecot CPU s", "dovecot_cpu_s"),
        ("startup s", None),
    ]
    rows: list[list[str]] = []
    for group in groups:
        summary = group["summary"]
        cells = [
            str(group["count"]),
            group["benchmark"],
            group["variant"],
            str(len(group["runs"])),
        ]
        for _title, figure in columns[4:-1]:
            assert figure is not None
            cells.append(_fmt(summary.get(figure), FIGURES[figure]))
        startup = group.get("startup_s")
        cells.append("-" if startup is None else f"{startup:.2f}")
        rows.append(cells)
    titles = [title for title, _ in columns]
    widths = [max(len(t), *(len(r[i]) for r in rows)) if rows else len(t) for i, t in enumerate(titles)]
    print()
    print("  ".join(t.ljust(w) for t, w in zip(titles, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print(
        "\nmedian (min–max); MB = 10^6 bytes of raw mail; RSS in MiB (tree = sum of VmRSS over main process, "
        "forkserver and parser workers, sampled every 50 ms)"
    )


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return ""
    return out.stdout.strip()


def environment() -> dict[str, Any]:
    dirty = _git("status", "--porcelain", "--", "mailbridge")
    load = os.getloadavg()
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "git_commit": _git("rev-parse", "HEAD"),
        "mailbridge_uncommitted_changes": bool(dirty),
        "uid": os.geteuid(),
    }


# ------------------------------------------------------------------------------------------- main


def _run_all(
    bench: Bench, args: argparse.Namespace, counts: Sequence[int], variants: Sequence[Variant]
) -> list[dict[str, Any]]:
    groups: dict[tuple[int, str, str], dict[str, Any]] = {}
    for count in counts:
        corpus = ensure_corpus(args.cache_dir, count, args.seed)
        for variant in variants:
            for benchmark in args.benchmarks:
                groups[(count, variant.name, benchmark)] = {
                    "count": count,
                    "seed": args.seed,
                    "total_bytes": corpus.total_bytes,
                    "benchmark": benchmark,
                    "variant": variant.name,
                    "overrides": variant.overrides,
                    "runs": [],
                }
        if args.startup:
            for variant in variants:
                for benchmark in args.benchmarks:
                    m = bench.startup(benchmark, variant)
                    wall = m.wall_s
                    groups[(count, variant.name, benchmark)].update(
                        startup_s=wall,
                        startup_peak_rss_tree_mib=m.peak_rss_tree_mib,
                        startup_peak_rss_main_mib=m.peak_rss_main_mib,
                    )
                    log(
                        f"startup {benchmark:6s} [{variant.name}]: {wall:.2f} s, peak RSS "
                        f"{m.peak_rss_tree_mib:.0f} MiB with nothing to do"
                    )
        # Repeats are interleaved (r1: all variants, r2: all variants ...) so slow drifts of a noisy
        # machine hit every variant alike.
        for repeat in range(1, args.repeat + 1):
            for variant in variants:
                for benchmark in args.benchmarks:
                    runner = {"imap": bench.run_imap, "ingest": bench.run_ingest, "outbox": bench.run_outbox}[benchmark]
                    log(f"N={count} {benchmark} [{variant.name}] run {repeat}/{args.repeat} ...")
                    result = runner(corpus, variant, repeat)
                    groups[(count, variant.name, benchmark)]["runs"].append(asdict(result))
                    extra = f", dovecot CPU {result.dovecot_cpu_s:.1f} s" if result.dovecot_cpu_s is not None else ""
                    if result.intake_mails_per_s is not None:
                        extra += f", {result.intake_mails_per_s:.0f} mails/s to the last ticket"
                    if roles := result.extra.get("cpu_by_role_s"):
                        extra += ", CPU s by process " + " ".join(f"{k} {v:g}" for k, v in roles.items())
                    log(
                        f"  {result.wall_s:.2f} s: {result.mails_per_s:.0f} mails/s, {result.mb_per_s:.2f} MB/s, "
                        f"peak RSS tree {result.peak_rss_tree_mib:.0f} MiB / main {result.peak_rss_main_mib:.0f} "
                        f"MiB ({result.processes} processes), CPU {result.cpu_s:.1f} s "
                        f"(main {result.cpu_main_s:.1f} s){extra}"
                    )
    out: list[dict[str, Any]] = []
    for group in groups.values():
        group["summary"] = summarize_runs([RunResult(**r) for r in group["runs"]])
        out.append(group)
    return out


def _profile(bench: Bench, args: argparse.Namespace, variants: Sequence[Variant]) -> None:
    corpus = ensure_corpus(args.cache_dir, args.count, args.seed)
    out_dir = args.output.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        for benchmark in args.benchmarks:
            suffix = ".prof" if args.profiler == "cprofile" else ".txt"
            prof = out_dir / f"profile-{benchmark}-{_slug(variant.name)}-n{args.count}{suffix}"
            runner = {"imap": bench.run_imap, "ingest": bench.run_ingest, "outbox": bench.run_outbox}[benchmark]
            log(f"profiling {benchmark} [{variant.name}] with {args.profiler} -> {prof}")
            result = runner(corpus, variant, 1, profile=prof)
            log(f"  {result.wall_s:.2f} s under the profiler ({result.mails_per_s:.0f} mails/s)")
            if args.profiler == "cprofile":
                stats = pstats.Stats(str(prof))
                stats.sort_stats("cumulative").print_stats(35)
                stats.sort_stats("tottime").print_stats(25)
            else:
                print_collapsed_summary(prof)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def _short_root(frame: str) -> str:
    if not frame.startswith("process"):
        return frame
    pid, _, cmdline = frame.partition(":")
    words = cmdline.strip('"').split()
    kind = "parser worker" if "forkserver" in cmdline else " ".join(w for w in words[1:5] if not w.startswith("/"))
    return f"{pid} ({kind})"


def print_collapsed_summary(path: Path, top: int = 30) -> None:
    """Summarise py-spy's collapsed stacks: samples per process/thread, and the hottest functions."""
    per_root: dict[str, int] = {}
    self_time: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        # With --subprocesses --threads the first frames are "process ..." and "thread ...".
        roots = [f for f in frames[:2] if f.startswith(("process", "thread"))]
        # 'process 123:"python -m mailbridge run ..."' -> 'process 123 (python -m mailbridge run)'
        label = " / ".join(_short_root(f) for f in roots) or "?"
        per_root[label] = per_root.get(label, 0) + count
        code = frames[len(roots) :]
        if code:
            self_time[code[-1]] = self_time.get(code[-1], 0) + count
        for frame in set(code):
            inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        print(f"no samples in {path}")
        return
    print(f"\n{total} samples in {path}\n\nby process / thread:")
    for name, count in sorted(per_root.items(), key=lambda kv: -kv[1]):
        print(f"  {100 * count / total:5.1f}%  {name[:150]}")
    print("\nself time (leaf frames):")
    for name, count in sorted(self_time.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {100 * count / total:5.1f}%  {name[:150]}")
    print("\ninclusive time:")
    for name, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {100 * count / total:5.1f}%  {name[:150]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark mailbridge end to end (IMAP via a private Dovecot, and file ingest).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--count", type=int, default=10000, help="number of mails")
    parser.add_argument("--seed", type=int, default=1, help="generator seed")
    parser.add_argument(
        "--repeat", type=int, default=None, help="runs per benchmark and variant (default 3; 1 for --memory-check)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="a config variant compared with the baseline, e.g. storage.fsync=false (repeatable; values are YAML)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="run only the given --variant configurations")
    parser.add_argument(
        "--benchmarks", default=",".join(BENCHMARKS), help="comma-separated subset of: " + ", ".join(BENCHMARKS)
    )
    parser.add_argument(
        "--memory-check",
        action="store_true",
        help=f"run N={' and N='.join(map(str, MEMORY_CHECK_COUNTS))} and compare peak RSS",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one run per benchmark under a profiler (see --profiler); prints the hot spots",
    )
    parser.add_argument(
        "--profiler",
        choices=("cprofile", "py-spy"),
        default="cprofile",
        help="for --profile: cProfile (main thread of the main process only) or py-spy (all threads and "
        "the parser workers; pip install py-spy)",
    )
    parser.add_argument(
        "--no-startup",
        dest="startup",
        action="store_false",
        help="skip measuring the start-up time (the command with nothing to do)",
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where generated mails are kept")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"JSON results (default {DEFAULT_OUTPUT.relative_to(ROOT)}, "
        f"or {DEFAULT_MEMORY_OUTPUT.relative_to(ROOT)} with --memory-check)",
    )
    parser.add_argument("--tmp-dir", type=Path, default=None, help="parent of the scratch directory")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs mailbridge")
    parser.add_argument(
        "--copy-mails", action="store_true", help="copy the mails into the Maildir instead of hard-linking them"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data directories of the runs")
    parser.add_argument("--keep-failed", action="store_true", help="keep data and mailbox of a failed run")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    unknown = sorted(set(args.benchmarks) - set(BENCHMARKS))
    if unknown or not args.benchmarks:
        parser.error(f"--benchmarks: unknown {unknown}; choose from {', '.join(BENCHMARKS)}")
    if args.repeat is None:
        args.repeat = 1 if (args.memory_check or args.profile) else 3
    if args.repeat < 1 or args.count < 1:
        parser.error("--repeat and --count must be at least 1")
    if args.output is None:
        args.output = DEFAULT_MEMORY_OUTPUT if args.memory_check else DEFAULT_OUTPUT
    variants: list[Variant] = [] if args.no_baseline else [Variant("baseline", {})]
    variants += args.variant
    if not variants:
        parser.error("--no-baseline needs at least one --variant")
    args.cache_dir = args.cache_dir.resolve()

    work = Path(tempfile.mkdtemp(prefix="mb-bench-", dir=args.tmp_dir))
    work.chmod(0o755)
    bench = Bench(args, work)
    started = datetime.now(UTC)
    try:
        if args.profile:
            _profile(bench, args, variants)
            return 0
        counts = MEMORY_CHECK_COUNTS if args.memory_check else (args.count,)
        meta = {**environment(), "bytecode_compiled": bench.bytecode_compiled}
        groups = _run_all(bench, args, counts, variants)
    except BenchError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.close()
        bench.delete_finished_data()
        if not args.keep and not bench.kept_failed:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"scratch directory kept: {work}")

    print_table(groups)
    if args.memory_check:
        _print_memory_check(groups)
    results = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "memory-check" if args.memory_check else "throughput",
        "repeat": args.repeat,
        "environment": {
            **meta,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            # Others may commit while a long run is going; if these differ, the runs saw different code.
            "git_commit_at_end": _git("rev-parse", "HEAD"),
            "mailbridge_uncommitted_changes_at_end": bool(_git("status", "--porcelain", "--", "mailbridge")),
        },
        "groups": groups,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    log(f"results written to {args.output}")
    return 0


def _print_memory_check(groups: list[dict[str, Any]]) -> None:
    print("\nmemory check: peak RSS (median) by N")
    by_key: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for group in groups:
        by_key.setdefault((group["benchmark"], group["variant"]), {})[group["count"]] = group["summary"]
    for (benchmark, variant), per_count in by_key.items():
        counts = sorted(per_count)
        parts = []
        for count in counts:
            s = per_count[count]
            parts.append(
                f"N={count}: tree {s['peak_rss_tree_mib']['median']:.0f} MiB, "
                f"main {s['peak_rss_main_mib']['median']:.0f} MiB"
            )
        low, high = per_count[counts[0]], per_count[counts[-1]]
        ratio = high["peak_rss_tree_mib"]["median"] / low["peak_rss_tree_mib"]["median"]
        print(
            f"  {benchmark:6s} [{variant}]: " + "; ".join(parts) + f"; tree ratio {ratio:.2f}x for "
            f"{counts[-1] / counts[0]:.0f}x the mails"
        )


if __name__ == "__main__":
    sys.exit(main())
