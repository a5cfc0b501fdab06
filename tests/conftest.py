from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.smtp_sink import SmtpSink

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"


@pytest.fixture
def config_file(tmp_path: Path) -> Iterator[Path]:
    """A config with its own data directory and no mailboxes (what `ingest` and the CLI tests need)."""
    path = tmp_path / "mailbridge.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "storage": {"fsync": False}}))
    yield path


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Print a line into the test run's output even though output is captured (figures worth seeing in CI)."""

    def say(line: str) -> None:
        with capsys.disabled():
            print(f"\n  {line}", flush=True)

    return say


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 that records what it receives."""
    smtp = SmtpSink().start()
    yield smtp
    smtp.stop()
