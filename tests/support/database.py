"""The database of a test's mailbridge config, on whichever backend the run uses.

Tests that look at the rows a daemon or a CLI command wrote name the SQLite file of the config's data
directory; on a ``--database-backend=postgresql`` run the config's database is the one in
``MAILBRIDGE_DATABASE_URL`` (set per test by conftest), and these helpers read that one instead.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.pool import NullPool

from mailbridge.config import DATABASE_URL_ENV


def url_of(sqlite_file: Path) -> str:
    return os.environ.get(DATABASE_URL_ENV) or f"sqlite:///{sqlite_file}"


def is_postgresql() -> bool:
    return url_of(Path("x")).startswith("postgresql")


@functools.cache
def _engine(url: str) -> Engine:
    # No pool: a test's database is dropped at its end, and a pooled connection would outlive it.
    options = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    return create_engine(url, poolclass=NullPool, **options)


def rows(sqlite_file: Path, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with _engine(url_of(sqlite_file)).connect() as connection:
        return [tuple(row) for row in connection.execute(text(sql), params)]


def scalar(sqlite_file: Path, sql: str, **params: Any) -> Any:
    with _engine(url_of(sqlite_file)).connect() as connection:
        return connection.execute(text(sql), params).scalar()


def execute(sqlite_file: Path, *statements: str) -> None:
    with _engine(url_of(sqlite_file)).begin() as connection:
        for statement in statements:
            connection.execute(text(statement))


def count_or_zero(sqlite_file: Path, table: str) -> int:
    """Rows in a table the daemon may not have created yet (it migrates at start)."""
    if not is_postgresql() and not sqlite_file.exists():
        return 0
    try:
        return int(scalar(sqlite_file, f"select count(*) from {table}"))
    except (OperationalError, ProgrammingError):  # the schema is not there yet
        return 0
