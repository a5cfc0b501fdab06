"""A private, throw-away PostgreSQL cluster for integration tests.

Like the Dovecot of :mod:`tests.support.dovecot`, the test-suite starts the server itself: ``initdb`` and
``pg_ctl`` on a data directory in a temp dir, listening on 127.0.0.1 on a free port, with trust
authentication and durability switched off (tests need speed, not crash safety of the test server).
Nothing of a system-wide PostgreSQL (systemd unit, /etc/postgresql, /var/run/postgresql) is used.

Typical use::

    cluster = PostgresCluster.start()
    try:
        url = cluster.create_database()  # postgresql+psycopg://postgres@127.0.0.1:PORT/mb_...
        ...
    finally:
        cluster.stop()

``initdb`` refuses to run as root, so as root the server runs as the ``postgres`` user that Debian's
package creates, and its directory lives below ``/tmp`` (pytest's ``tmp_path`` parents are mode 0700).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.dovecot import free_port

SUPERUSER = "postgres"


def _bin_dir() -> Path | None:
    """The directory of Debian's ``initdb``/``pg_ctl`` (not on PATH there), newest version first."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if Path(candidate, "initdb").exists() and Path(candidate, "pg_ctl").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _server_user() -> str | None:
    """Who runs the server: ourselves, or ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    return "postgres"


def unavailable_reason() -> str | None:
    """Why no cluster can be started here, or None when it can."""
    if _bin_dir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found; scripts/install-test-deps.sh installs them"
    if os.geteuid() == 0 and _server_user() is None:
        return "running as root and there is no 'postgres' user to run the server as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[test]')"
    return None


@dataclass
class PostgresCluster:
    """A running private cluster; :meth:`stop` removes it with its data."""

    base_dir: Path
    port: int
    host: str = "127.0.0.1"
    _databases: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @classmethod
    def start(cls, settings: Mapping[str, str] | None = None) -> PostgresCluster:
        """`settings`: server settings (``-c name=value``) on top of the test defaults, which they override
        (a benchmark turns durability back on, or loads pg_stat_statements)."""
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        bin_dir = _bin_dir()
        assert bin_dir is not None
        user = _server_user()
        base_dir = Path(tempfile.mkdtemp(prefix="mb-postgres-", dir="/tmp"))
        base_dir.chmod(0o755)
        if user:
            entry = pwd.getpwnam(user)
            os.chown(base_dir, entry.pw_uid, entry.pw_gid)
        cluster = cls(base_dir=base_dir, port=free_port())
        run = _runner(user)
        run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(cluster.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ]
        )
        defaults = {
            "listen_addresses": "127.0.0.1",
            "port": str(cluster.port),
            "unix_socket_directories": str(cluster.base_dir),
            "max_connections": "300",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "64MB",
        }
        options = " ".join(f"-c {name}={value}" for name, value in {**defaults, **(settings or {})}.items())
        run(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(cluster.data_dir),
                "-l",
                str(cluster.base_dir / "server.log"),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        return cluster

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of one database of this cluster (psycopg 3 driver)."""
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = name or f"mb_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self._dsn(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        self._databases.append(name)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self._dsn(), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        with contextlib.suppress(ValueError):
            self._databases.remove(name)

    def log(self) -> str:
        path = self.base_dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        bin_dir = _bin_dir()
        if bin_dir is not None and self.data_dir.exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                _runner(_server_user())(
                    [str(bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"]
                )
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def _dsn(self) -> str:
        return f"host={self.host} port={self.port} user={SUPERUSER} dbname=postgres connect_timeout=10"


def _runner(user: str | None) -> Callable[[list[str]], None]:
    def run(command: list[str]) -> None:
        started = time.monotonic()
        result = subprocess.run(command, user=user, capture_output=True, text=True, cwd="/tmp", check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"{Path(command[0]).name} failed ({result.returncode}) after {time.monotonic() - started:.1f} s:\n"
                f"{result.stdout}\n{result.stderr}"
            )

    return run
