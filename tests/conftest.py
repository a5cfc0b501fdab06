from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.postgres import PostgresCluster
from tests.support.postgres import unavailable_reason as postgres_unavailable_reason
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


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster on 127.0.0.1 for the whole run (skips when the server is missing)."""
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = PostgresCluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """The URL of a new empty database on the private cluster, dropped after the test."""
    url = postgres_cluster.create_database()
    yield url
    postgres_cluster.drop_database(url.rsplit("/", 1)[1])
