"""The parse pool's worker processes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from mailbridge.ingest.mail import ParsedMail
from mailbridge.ingest.parse_pool import ParsePool


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found.update(int(child) for child in (task / "children").read_text().split())
    except OSError:  # a process or thread that ended meanwhile
        pass
    return found


def _grandchildren() -> set[int]:
    return {grandchild for child in _children(os.getpid()) for grandchild in _children(child)}


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_the_workers_start_before_the_first_mail_when_asked(tmp_path: Path) -> None:
    # The daemon starts them while its first migration runs, so the first mail does not wait for the
    # forkserver to import the parsing libraries.
    # Earlier tests may have left a forkserver (one per process) and servers with children of their own:
    # this pool's workers are the grandchildren that appear after start().
    before = _grandchildren()
    pool = ParsePool(workers=2, timeout=10, blob_root=tmp_path / "blobs", fsync=False, max_message_bytes=10**7)
    try:
        pool.start()
        deadline = time.monotonic() + 30
        workers: set[int] = set()
        while time.monotonic() < deadline:
            workers = _grandchildren() - before
            if len(workers) >= 2:
                break
            time.sleep(0.05)
        assert len(workers) == 2, "the forkserver should have forked both workers without any mail to parse"
        raw = b"From: a@example.com\r\nSubject: hello\r\nMessage-ID: <1@example.com>\r\n\r\nbody\r\n"
        [parsed] = asyncio.run(pool.parse_many([raw]))
        assert isinstance(parsed, ParsedMail) and parsed.subject == "hello"
    finally:
        pool.close()
