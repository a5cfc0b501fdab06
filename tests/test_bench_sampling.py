"""The benchmark's process sampler finds a measured process's tree through /proc's children lists; it must
find the same processes, parents and CPU ticks as a scan of all of /proc."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run_bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("run_bench", BENCH / "run_bench.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["run_bench"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_the_tree_from_the_children_lists_is_the_tree_a_scan_of_proc_finds() -> None:
    run_bench = _run_bench()
    if not run_bench._HAVE_CHILDREN_LISTS:
        pytest.skip("this kernel has no /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)")
    # A shell with two children, one of which has a child of its own.
    tree = subprocess.Popen(["sh", "-c", "sleep 30 & (sleep 30 & wait) & wait"])
    try:
        deadline = time.monotonic() + 10
        while len(run_bench._scan_proc_tree(tree.pid)[0]) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        walked_parents: dict[int, int] = {}
        scanned_parents: dict[int, int] = {}
        walked, walked_ticks = run_bench._read_proc_tree(tree.pid, walked_parents)
        scanned, scanned_ticks = run_bench._scan_proc_tree(tree.pid, scanned_parents)
    finally:
        for pid in reversed(run_bench._scan_proc_tree(tree.pid)[0]):  # the sleeps first, then the shells
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        tree.wait()
    assert len(scanned) == 4
    assert sorted(walked) == sorted(scanned)
    assert walked[0] == tree.pid
    assert walked_parents == scanned_parents
    assert walked_ticks.keys() == scanned_ticks.keys()
