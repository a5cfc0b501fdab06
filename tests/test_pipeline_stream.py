"""The pipeline's stream of batches (`Pipeline.process_stream`), as every source drives it: the source's
`committed` step (the IMAP move) runs after each commit, in commit order and one at a time, while the
next batch is already being recorded; and a failing `committed` stops the stream with its error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from mailbridge.app import App
from mailbridge.ingest.raw import RawMail
from mailbridge.pipeline import Result
from tests.imap_env import count, make_app, sample_mail, wait_until

BATCHES = 4
PER_BATCH = 3


def _batches() -> list[list[RawMail]]:
    return [
        [
            RawMail(mailbox="support", source=f"test:{b}/{i}", data=sample_mail(), source_key=f"support/1/{b * 10 + i}")
            for i in range(PER_BATCH)
        ]
        for b in range(BATCHES)
    ]


async def _stream(batches: list[list[RawMail]]) -> AsyncGenerator[list[RawMail], None]:
    for batch in batches:
        yield batch


def _app(tmp_path: Path) -> App:
    return make_app(tmp_path, [{"type": "maildir", "name": "support", "path": str(tmp_path / "maildir")}])


def _stored(app: App) -> int:
    return count(app, "select count(*) from receipts")


async def test_the_next_batch_is_recorded_while_the_source_is_told_of_the_last_in_commit_order(
    tmp_path: Path,
) -> None:
    app = _app(tmp_path)
    batches = _batches()
    told: list[list[str | None]] = []
    running = 0

    async def committed(results: list[Result]) -> None:
        nonlocal running
        running += 1
        assert running == 1, "two batches' committed steps ran at once"
        index = len(told)
        told.append([r.raw.source_key for r in results])
        assert _stored(app) >= (index + 1) * PER_BATCH  # after its own commit
        if index + 1 < BATCHES:
            # Held until the next batch is committed: with the move awaited before the next batch is
            # recorded, this would never happen.
            await wait_until(lambda: _stored(app) >= (index + 2) * PER_BATCH, timeout=20)
        running -= 1

    try:
        await app.pipeline.process_stream(_stream(batches), committed, depth=2)
    finally:
        app.close()
    assert told == [[raw.source_key for raw in batch] for batch in batches]


async def test_a_failing_committed_step_stops_the_stream_with_its_error(tmp_path: Path) -> None:
    app = _app(tmp_path)
    calls = 0

    async def committed(results: list[Result]) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        if calls == 1:
            raise RuntimeError("the server refused the move")

    try:
        with pytest.raises(RuntimeError, match="refused the move"):
            await app.pipeline.process_stream(_stream(_batches()), committed, depth=2)
        stored = _stored(app)
    finally:
        app.close()
    assert calls == 1  # nothing is told of later batches once one step failed
    assert PER_BATCH <= stored < BATCHES * PER_BATCH  # recorded mail stays recorded; the stream stopped
