"""The schema: migrations apply from scratch, twice, and describe exactly the models."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from mailbridge.db import MIGRATIONS, SCHEMA_HEAD, Database, MigrationError
from mailbridge.models import Base


def test_schema_head_constant_is_alembics_head() -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == SCHEMA_HEAD


def test_migrations_create_the_models_schema_and_are_idempotent(database_url: str) -> None:
    db = Database(database_url)
    db.upgrade()
    db.upgrade()
    assert db.schema_revision() == SCHEMA_HEAD
    with db.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == [], f"models and migrations differ: {diff}"
    db.close()


def test_the_daemon_migrates_in_a_child_and_never_imports_alembic(tmp_path: Path) -> None:
    # A process of its own: this test process has imported Alembic long ago.
    script = (
        "import sys; from mailbridge.db import Database; db = Database(sys.argv[1]); db.upgrade_in_child(); "
        "db.upgrade(); loaded = {m.split('.')[0] for m in sys.modules}; "
        "print(db.schema_revision(), sorted(loaded & {'alembic', 'mako'}))"
    )
    url = f"sqlite:///{tmp_path / 'x.db'}"
    out = subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True, check=True).stdout
    assert out.split() == [SCHEMA_HEAD, "[]"]
    db = Database(url)
    with db.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == [], f"models and migrations differ: {diff}"
    db.close()


def test_start_up_work_runs_while_the_child_migrates(database_url: str, tmp_path: Path) -> None:
    # The daemon starts its parser workers meanwhile: the migration must be running, not waiting for it.
    (tmp_path / "data").mkdir(exist_ok=True)
    db = Database(database_url)
    revisions_seen: list[str | None] = []

    def meanwhile() -> None:
        probe = Database(database_url)
        deadline = time.monotonic() + 60
        while probe.schema_revision() != SCHEMA_HEAD and time.monotonic() < deadline:
            time.sleep(0.02)
        revisions_seen.append(probe.schema_revision())
        probe.close()

    db.upgrade_in_child(meanwhile=meanwhile)
    assert revisions_seen == [SCHEMA_HEAD]
    db.close()


def test_a_failing_start_up_step_still_lets_the_migration_finish(database_url: str, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir(exist_ok=True)
    db = Database(database_url)

    def fails() -> None:
        raise RuntimeError("no parser workers")

    with pytest.raises(RuntimeError, match="no parser workers"):
        db.upgrade_in_child(meanwhile=fails)
    assert db.schema_revision() == SCHEMA_HEAD  # waited for: no child left behind half-way
    db.close()


def test_a_migration_that_fails_in_the_child_says_why(tmp_path: Path) -> None:
    (tmp_path / "x.db").write_bytes(b"this is not an SQLite database" * 100)
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(MigrationError, match="file is not a database"):
        db.upgrade_in_child()
    db.close()


@pytest.mark.sqlite_only("SQLite's journal mode")
def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    db.upgrade()
    with db.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    db.close()


@pytest.mark.postgresql_only("PostgreSQL's synchronous_commit")
def test_only_the_connections_for_small_marks_commit_without_waiting_for_the_flush(postgres_url: str) -> None:
    # The test cluster turns synchronous_commit off for speed; this database gets production's setting back.
    setup = Database(postgres_url)
    with setup.engine.connect() as connection:
        database = connection.exec_driver_sql("SELECT current_database()").scalar()
        connection.exec_driver_sql(f'ALTER DATABASE "{database}" SET synchronous_commit = on')
        connection.commit()
    setup.close()
    flushed, unflushed = Database(postgres_url), Database(postgres_url, fsync_each_commit=False)
    try:
        for db, expected in ((flushed, "on"), (unflushed, "off")):
            with db.unit_of_work() as session:  # also after a commit: the setting is the session's
                assert session.connection().exec_driver_sql("SHOW synchronous_commit").scalar() == expected
            with db.reader() as session:
                assert session.connection().exec_driver_sql("SHOW synchronous_commit").scalar() == expected
    finally:
        flushed.close()
        unflushed.close()


@pytest.mark.postgresql_only("a server connection that is dropped")
def test_a_connection_dropped_while_idle_is_replaced_before_it_is_used(postgres_url: str) -> None:
    import psycopg

    db = Database(postgres_url, ping_after_idle_seconds=0.2)
    try:
        with db.unit_of_work() as session:
            dropped = session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with psycopg.connect(postgres_url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as other:
            assert other.execute("SELECT pg_terminate_backend(%s)", (dropped,)).fetchone() == (True,)
        time.sleep(0.3)  # idle for longer than the threshold: asked before use, and replaced
        with db.unit_of_work() as session:
            assert session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar() != dropped
    finally:
        db.close()


def test_a_write_that_read_first_waits_for_another_writer(database_url: str) -> None:
    """Another process commits between this transaction's first read and its first write: it must wait
    and succeed, not fail with 'database is locked' (SQLITE_BUSY_SNAPSHOT)."""
    import threading

    from sqlalchemy import text

    first, second = Database(database_url), Database(database_url)
    first.upgrade()
    insert = "INSERT INTO contacts (address, name, created_at) VALUES (:a, '', '2026-01-01')"
    holding = threading.Event()
    errors: list[BaseException] = []

    def read_then_write() -> None:
        holding.wait(5)
        try:
            with second.unit_of_work() as session:
                session.execute(text("SELECT count(*) FROM contacts")).scalar()
                session.execute(text(insert), {"a": "b@x"})
        except BaseException as exc:
            errors.append(exc)

    reader_writer = threading.Thread(target=read_then_write)
    reader_writer.start()
    with first.unit_of_work() as session:
        session.execute(text(insert), {"a": "a@x"})
        holding.set()
        reader_writer.join(0.5)  # let the other transaction start and read meanwhile
    reader_writer.join(10)
    assert not errors, errors
    with second.reader() as session:
        assert session.execute(text("SELECT count(*) FROM contacts")).scalar() == 2
    first.close()
    second.close()


async def test_migration_0009_marks_the_replies_among_older_receipts(tmp_path: Path) -> None:
    """Receipts from before 0009 had no `reply`: the upgrade tells them apart by their ticket's earlier articles."""
    import email

    from alembic import command

    from tests.imap_env import make_app, sample_mail

    first = sample_mail("Drukarka")
    reply = email.message_from_bytes(sample_mail("Re: Drukarka"))
    reply["In-Reply-To"] = email.message_from_bytes(first)["Message-ID"]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "1.eml").write_bytes(first)
    (tmp_path / "in" / "2.eml").write_bytes(reply.as_bytes())
    (tmp_path / "in" / "3.eml").write_bytes(sample_mail("Something else"))
    app = make_app(tmp_path, [])
    try:
        summary = await app.ingest([tmp_path / "in"], notify=False)
        assert (summary.stored, summary.replies) == (2, 1)
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with app.db.engine.begin() as connection:
            cfg.attributes["connection"] = connection
            command.downgrade(cfg, "0008")
        app.db.upgrade()
        with app.db.engine.connect() as connection:
            rows = connection.exec_driver_sql("select outcome, reply from receipts order by id").all()
        assert sorted(rows) == [("stored", False), ("stored", False), ("stored", True)]
    finally:
        app.close()


def test_tickets_merged_before_0008_redirect_after_the_upgrade(database_url: str) -> None:
    from alembic import command
    from sqlalchemy import text

    db = Database(database_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with db.engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0007")
        connection.execute(
            text("INSERT INTO contacts (id, address, name, created_at) VALUES (1, 'a@x.example', '', '2026-01-01')")
        )
        for ticket, number, linked in ((1, "MB-000001", None), (2, "MB-000002", 1), (3, "MB-000003", 1)):
            connection.execute(
                text(
                    "INSERT INTO tickets (id, number, status, subject, customer_id, mailbox, created_at, updated_at,"
                    " tags, linked_ticket_id) VALUES (:id, :number, 'closed', '', 1, 'm', :at, :at, '[]', :linked)"
                ),
                {"id": ticket, "number": number, "linked": linked, "at": "2026-01-01"},
            )
        # 2 was merged into 1; 3 is only linked to it (a stranger's flagged follow-up, say).
        connection.execute(
            text(
                "INSERT INTO ticket_events (ticket_id, at, actor, kind, new)"
                " VALUES (2, '2026-01-01', 'cli', 'merged_into', 'MB-000001')"
            )
        )
    db.upgrade()
    with db.engine.connect() as connection:
        rows = connection.execute(text("SELECT id, merged_into_id FROM tickets ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [(1, None), (2, 1), (3, None)]
    db.close()
