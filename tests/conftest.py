from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from mailbridge.config import DATABASE_URL_ENV
from tests.support.postgres import PostgresCluster
from tests.support.postgres import unavailable_reason as postgres_unavailable_reason
from tests.support.smtp_sink import SmtpSink

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"

# The whole suite runs on either backend: `pytest --database-backend=postgresql` (or this variable).
BACKEND_ENV = "MAILBRIDGE_TEST_DATABASE"
BACKENDS = ("sqlite", "postgresql")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--database-backend",
        choices=BACKENDS,
        default=None,
        help=f"the database every test's mailbridge config uses (default: ${BACKEND_ENV}, else sqlite)",
    )


def database_backend_of(config: pytest.Config) -> str:
    chosen = config.getoption("--database-backend") or os.environ.get(BACKEND_ENV) or "sqlite"
    if chosen not in BACKENDS:
        raise pytest.UsageError(f"{BACKEND_ENV}={chosen}: must be one of {', '.join(BACKENDS)}")
    return str(chosen)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sqlite_only(reason): tests SQLite's own machinery; skipped on --database-backend=postgresql"
    )
    config.addinivalue_line(
        "markers", "postgresql_only(reason): a case that cannot arise on SQLite; run with --database-backend=postgresql"
    )
    if database_backend_of(config) == "postgresql" and (reason := postgres_unavailable_reason()):
        # Asked for explicitly: a missing server is an error, not a suite of skips that looks green.
        raise pytest.UsageError(f"--database-backend=postgresql: {reason}")


def pytest_report_header(config: pytest.Config) -> str:
    return f"database backend: {database_backend_of(config)}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    other = "postgresql_only" if database_backend_of(config) == "sqlite" else "sqlite_only"
    for item in items:
        if marker := item.get_closest_marker(other):
            why = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
            label = "PostgreSQL" if other == "postgresql_only" else "SQLite"
            item.add_marker(pytest.mark.skip(reason=f"{label} only: {why}"))


@pytest.fixture(autouse=True)
def database_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """On PostgreSQL, every test with a temp dir (where its mailbridge config lives) gets a new empty database,
    passed as MAILBRIDGE_DATABASE_URL: load_settings() and the daemons a test starts all pick it up."""
    backend = database_backend_of(request.config)
    if backend != "postgresql" or "tmp_path" not in request.fixturenames:
        yield backend
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    url = cluster.create_database()
    monkeypatch.setenv(DATABASE_URL_ENV, url)
    yield backend
    cluster.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture
def another_installation(
    database_backend: str, request: pytest.FixtureRequest
) -> Iterator[Callable[[], contextlib.AbstractContextManager[None]]]:
    """For a test with a second installation (another data_dir): settings loaded inside
    `with another_installation():` get a database of their own on PostgreSQL too (on SQLite, the data_dir
    gives it one already)."""
    created: list[str] = []

    @contextlib.contextmanager
    def own_database() -> Iterator[None]:
        if database_backend != "postgresql":
            yield
            return
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        created.append(url := cluster.create_database())
        previous = os.environ[DATABASE_URL_ENV]
        os.environ[DATABASE_URL_ENV] = url
        try:
            yield
        finally:
            os.environ[DATABASE_URL_ENV] = previous

    yield own_database
    if created:
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        for url in created:
            cluster.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture
def database_url(database_backend: str, tmp_path: Path) -> str:
    """The database of this test on the chosen backend: the one a config with data_dir tmp_path/data uses
    (for tests that open a `Database` themselves)."""
    return os.environ.get(DATABASE_URL_ENV) or f"sqlite:///{tmp_path / 'data' / 'mailbridge.db'}"


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
