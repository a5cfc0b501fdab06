"""End to end against a real Dovecot on 127.0.0.1: what a help desk relies on from the intake."""

from __future__ import annotations

import asyncio
import email
import hashlib
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailbridge.app import App
from mailbridge.blobstore import BlobStore
from mailbridge.ingest import imap
from mailbridge.ingest.imap_client import ImapConnection
from tests.imap_env import append_many, count, daemon, make_app, new_user, sample_mail, wait_until
from tests.support.dovecot import Dovecot

pytestmark = pytest.mark.skipif(not Dovecot.available(), reason="dovecot is not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    dovecot = Dovecot.start(tmp_path_factory.mktemp("dovecot"))
    yield dovecot
    dovecot.stop()


@pytest.fixture(scope="module")
def server_without_idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    dovecot = Dovecot.start(tmp_path_factory.mktemp("dovecot-noidle"), idle=False)
    yield dovecot
    dovecot.stop()


async def test_every_mail_becomes_one_ticket_and_is_moved(server: Dovecot, tmp_path: Path) -> None:
    user = new_user(server)
    mails = [sample_mail() for _ in range(3)]
    server.append(mails[0], user=user.name)
    server.append(mails[1], flags=r"\Seen", user=user.name)  # already opened in Outlook: still a ticket
    server.append(mails[2], user=user.name)
    on_server = [hashlib.sha256(raw).hexdigest() for raw in server.fetch_all(user=user.name)]
    app = make_app(tmp_path, [{**_box(server, user)}])
    try:
        await app.run_once()
        assert count(app, "select count(*) from tickets") == 3
        assert count(app, "select count(*) from tickets where number like 'MB-0000%' and status = 'new'") == 3
        assert server.uids("INBOX", user=user.name) == []
        assert len(server.uids("Processed", user=user.name)) == 3
        # The raw bytes are kept exactly as the server had them.
        blobs = app.settings.storage_path / "blobs"
        for sha in on_server:
            assert hashlib.sha256(BlobStore(blobs).path(sha).read_bytes()).hexdigest() == sha
        assert count(app, "select count(*) from articles where raw_sha256 in ('" + "','".join(on_server) + "')") == 3
        assert count(app, "select count(*) from contacts where address = 'klient@example.com'") == 1
        # A second pass finds nothing new.
        await app.run_once()
        assert count(app, "select count(*) from tickets") == 3
    finally:
        app.close()


async def test_during_a_backlog_the_server_is_told_of_stored_mail_in_groups(
    server: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Moving mail 50 at a time costs Dovecot 2.5 times the CPU of 200 at a time; the rest goes at the end.
    monkeypatch.setattr(imap, "TELL_SERVER_EVERY", 30)
    moved: list[int] = []
    real_move = ImapConnection.move

    async def move(self: ImapConnection, uids: list[int], folder: str) -> None:
        moved.append(len(uids))
        await real_move(self, uids, folder)

    monkeypatch.setattr(ImapConnection, "move", move)
    user = new_user(server)
    append_many(server, user, [sample_mail() for _ in range(95)])
    app = make_app(tmp_path, [_box(server, user)], fetch={"batch_size": 10})
    try:
        await app.run_once()
        assert moved == [30, 30, 30, 5]
        assert count(app, "select count(*) from tickets") == 95
        assert count(app, "select count(*) from receipts where not server_done") == 0
        assert server.uids("INBOX", user=user.name) == []
        assert len(server.uids("Processed", user=user.name)) == 95
    finally:
        app.close()


async def test_flag_seen_mode_keeps_mail_and_imports_only_new(server: Dovecot, tmp_path: Path) -> None:
    user = new_user(server)
    server.append(sample_mail(), user=user.name)
    app = make_app(tmp_path, [_box(server, user, after_store="flag_seen")])
    try:
        await app.run_once()
        server.append(sample_mail(), user=user.name)
        await app.run_once()
        assert count(app, "select count(*) from tickets") == 2
        flags = server.flags("INBOX", user=user.name)
        assert len(flags) == 2 and all("\\Seen" in f for f in flags.values())
    finally:
        app.close()


async def test_folders_with_non_ascii_names(server: Dovecot, tmp_path: Path) -> None:
    user = new_user(server)
    server.append(sample_mail(), user=user.name)
    server.append(b"not a mail at all\r\n\r\n", user=user.name)
    box = _box(server, user, after_store={"move": "Obsłużone"}, quarantine_folder="Błędne")
    app = make_app(tmp_path, [box])
    try:
        await app.run_once()
        assert len(server.uids("Obsłużone", user=user.name)) == 1
        assert len(server.uids("Błędne", user=user.name)) == 1
        assert server.uids("INBOX", user=user.name) == []
    finally:
        app.close()


async def test_delete_mode_expunges_after_storing(server: Dovecot, tmp_path: Path) -> None:
    user = new_user(server)
    server.append(sample_mail(), user=user.name)
    app = make_app(tmp_path, [_box(server, user, after_store="delete")])
    try:
        await app.run_once()
        assert count(app, "select count(*) from tickets") == 1
        assert server.uids("INBOX", user=user.name) == []
        assert "Processed" not in server.folders(user=user.name)
    finally:
        app.close()


async def test_existing_mail_skip_imports_only_what_arrives_later(server: Dovecot, tmp_path: Path) -> None:
    user = new_user(server)
    server.append(sample_mail("old backlog"), user=user.name)
    app = make_app(tmp_path, [_box(server, user, existing_mail="skip")])
    try:
        await app.run_once()
        assert count(app, "select count(*) from tickets") == 0
        assert len(server.uids("INBOX", user=user.name)) == 1  # left alone
        server.append(sample_mail("new"), user=user.name)
        await app.run_once()
        assert count(app, "select count(*) from tickets where subject = 'new'") == 1
        assert count(app, "select count(*) from tickets") == 1
    finally:
        app.close()


async def test_existing_mail_since_date(server: Dovecot, tmp_path: Path) -> None:
    user = new_user(server)
    old = datetime.now().astimezone() - timedelta(days=40)
    server.append(sample_mail("from last month"), user=user.name, internaldate=old)
    server.append(sample_mail("from this week"), user=user.name)
    since = (date.today() - timedelta(days=7)).isoformat()
    app = make_app(tmp_path, [_box(server, user, existing_mail={"since": since})])
    try:
        await app.run_once()
        assert count(app, "select count(*) from tickets") == 1
        assert count(app, "select count(*) from tickets where subject = 'from this week'") == 1
    finally:
        app.close()


async def test_idle_new_mail_is_a_ticket_within_two_seconds(
    server: Dovecot, tmp_path: Path, report: Callable[[str], None]
) -> None:
    user = new_user(server)
    app = make_app(tmp_path, [_box(server, user, poll_interval=600)])  # polling alone would take 10 min
    async with daemon(app):
        await wait_until(lambda: count(app, "select count(*) from mailbox_state where connected") == 1, 10)
        await asyncio.sleep(0.3)  # let the watcher enter IDLE
        server.append(sample_mail("idle test"), user=user.name)
        took = await wait_until(lambda: count(app, "select count(*) from tickets") == 1, 2.0)
        report(f"IDLE: ticket committed {took:.2f} s after APPEND")


async def test_polling_when_the_server_has_no_idle(server_without_idle: Dovecot, tmp_path: Path) -> None:
    server = server_without_idle
    assert "IDLE" not in server.capabilities()
    user = new_user(server)
    app = make_app(tmp_path, [_box(server, user, poll_interval=0.5)])
    async with daemon(app):
        await wait_until(lambda: count(app, "select count(*) from mailbox_state where connected") == 1, 10)
        server.append(sample_mail("poll test"), user=user.name)
        await wait_until(lambda: count(app, "select count(*) from tickets") == 1, 5)


async def test_uidvalidity_change_creates_no_second_ticket(server: Dovecot, tmp_path: Path) -> None:
    user = new_user(server)
    for _ in range(3):
        server.append(sample_mail(), user=user.name)
    app = make_app(tmp_path, [_box(server, user, after_store="flag_seen")])
    try:
        await app.run_once()
        before = server.uidvalidity(user=user.name)
        server.reset_uidvalidity(user=user.name)
        assert server.uidvalidity(user=user.name) != before
        server.append(sample_mail("after the reset"), user=user.name)
        await app.run_once()
        assert count(app, "select count(*) from tickets") == 4
        assert count(app, "select count(*) from receipts where outcome = 'duplicate'") == 3
    finally:
        app.close()


async def test_same_mail_in_two_mailboxes_is_one_ticket(server: Dovecot, tmp_path: Path) -> None:
    first, second = new_user(server), new_user(server)
    mail = sample_mail("sent to support@ and sales@")
    server.append(b"Delivered-To: first@example\r\n" + mail, user=first.name)
    server.append(b"Delivered-To: second@example\r\n" + mail, user=second.name)
    app = make_app(tmp_path, [_box(server, first), _box(server, second)])
    try:
        await app.run_once()
        assert count(app, "select count(*) from tickets") == 1
        assert count(app, "select count(*) from receipts") == 2
        assert server.uids("INBOX", user=first.name) == server.uids("INBOX", user=second.name) == []
    finally:
        app.close()


async def test_unparseable_mail_is_quarantined_and_moved_not_deleted(server: Dovecot, tmp_path: Path) -> None:
    user = new_user(server)
    garbage = b"\x00\x01 this is not a mail at all\r\n\r\n"
    server.append(garbage, user=user.name)
    server.append(sample_mail(), user=user.name)
    app = make_app(tmp_path, [_box(server, user)])
    try:
        await app.run_once()
        assert count(app, "select count(*) from tickets") == 1
        assert count(app, "select count(*) from quarantine") == 1
        assert len(server.uids("Quarantine", user=user.name)) == 1
        assert server.uids("INBOX", user=user.name) == []
        with app.db.reader() as session:
            from mailbridge.models import QuarantinedMail

            item = session.query(QuarantinedMail).one()
            assert item.raw == server.fetch_all("Quarantine", user=user.name)[0]
            assert "header" in item.reason
    finally:
        app.close()


async def test_a_failing_mailbox_never_stalls_the_others(server: Dovecot, tmp_path: Path) -> None:
    good, bad = new_user(server), new_user(server)
    server.append(sample_mail(), user=good.name)
    app = make_app(tmp_path, [_box(server, good), {**_box(server, bad), "password": "wrong"}])
    async with daemon(app):
        await wait_until(lambda: count(app, "select count(*) from tickets") == 1, 10)
        await wait_until(
            lambda: (
                count(
                    app,
                    f"select count(*) from mailbox_state where mailbox = '{bad.name}' and last_error like '%refused%'",
                )
                == 1
            ),
            10,
        )
        server.append(sample_mail(), user=good.name)
        await wait_until(lambda: count(app, "select count(*) from tickets") == 2, 5)
        # What `mailbridge status` shows an admin for the two mailboxes, once the fetch has counted the folder.
        from mailbridge.queries import mailbox_status

        def status() -> dict[str, dict[str, Any]]:
            with app.db.reader() as session:
                return {row["mailbox"]: row for row in mailbox_status(session, app.settings)}

        await wait_until(lambda: status()[good.name]["in_folder"] == 0, 5)
        rows = status()
        assert rows[good.name]["connected"] and rows[good.name]["stored"] == 2 and not rows[good.name]["last_error"]
        assert rows[good.name]["waiting"] == rows[good.name]["missing"] == 0 and rows[good.name]["last_fetch_at"]
        assert not rows[bad.name]["connected"] and "refused" in rows[bad.name]["last_error"]
        assert "wrong" not in rows[bad.name]["last_error"]  # the password is never echoed


async def test_a_broken_maildir_never_stalls_the_other_mailboxes(server: Dovecot, tmp_path: Path) -> None:
    from mailbridge.queries import mailbox_status

    def status() -> dict[str, dict[str, object]]:
        with app.db.reader() as session:
            return {row["mailbox"]: row for row in mailbox_status(session, app.settings)}

    user = new_user(server)
    server.append(sample_mail("over imap"), user=user.name)
    blocked = tmp_path / "blocked-maildir"
    blocked.write_text("a file where the Maildir should be")
    healthy = tmp_path / "healthy-maildir"
    (healthy / "new").mkdir(parents=True)
    (healthy / "new" / "1.local").write_bytes(sample_mail("from a maildir"))
    app = make_app(
        tmp_path,
        [
            _box(server, user),
            {"type": "maildir", "name": "blocked", "path": str(blocked)},
            {"type": "maildir", "name": "local", "path": str(healthy)},
        ],
    )
    async with daemon(app):
        await wait_until(lambda: count(app, "select count(*) from tickets") == 2, 10)
        await wait_until(lambda: bool(status()["blocked"]["last_error"]), 10)
        server.append(sample_mail("later over imap"), user=user.name)
        (healthy / "new" / "2.local").write_bytes(sample_mail("later from a maildir"))
        await wait_until(lambda: count(app, "select count(*) from tickets") == 4, 10)
        rows = status()
        assert not rows["blocked"]["connected"]
        assert "blocked-maildir" in str(rows["blocked"]["last_error"])
        assert rows[user.name]["connected"] and rows["local"]["connected"]
        # Once the path is fixed, the mailbox comes back on its own (back-off capped at 1 s here).
        blocked.unlink()
        (blocked / "new").mkdir(parents=True)
        (blocked / "new" / "1.blocked").write_bytes(sample_mail("from the mended maildir"))
        await wait_until(lambda: count(app, "select count(*) from tickets") == 5, 10)
        await wait_until(lambda: status()["blocked"]["last_error"] is None, 5)
        assert status()["blocked"]["connected"]


def _status(app: App) -> dict[str, dict[str, Any]]:
    from mailbridge.queries import mailbox_status

    with app.db.reader() as session:
        return {row["mailbox"]: row for row in mailbox_status(session, app.settings)}


async def test_status_reconciles_the_receipts_with_the_folder_on_the_server(server: Dovecot, tmp_path: Path) -> None:
    user = new_user(server)
    first = sample_mail("the first mail")
    server.append(first, user=user.name)
    app = make_app(tmp_path, [_box(server, user)], fetch={"batch_size": 5})
    try:
        await app.run_once()
        row = _status(app)[user.name]
        assert (row["read"], row["stored"], row["in_folder"], row["waiting"], row["missing"]) == (1, 1, 0, 0, 0)

        # While the daemon is not running: a reply on that ticket, the first mail once more (a duplicate),
        # something that is not a mail (quarantined), and a backlog of new mail.
        reply = email.message_from_bytes(sample_mail("Re: the first mail"))
        reply["In-Reply-To"] = email.message_from_bytes(first)["Message-ID"]
        server.append(reply.as_bytes(), user=user.name)
        server.append(first, user=user.name)
        server.append(b"\x00\x01 this is not a mail at all\r\n\r\n", user=user.name)
        backlog = 200
        append_many(server, user, [sample_mail(body="Dzień dobry. " * 100) for _ in range(backlog)])
        appended = 1 + 3 + backlog
        app.close()
        # The daemon starts and is stopped part-way through the backlog.
        app = make_app(tmp_path, [_box(server, user)], fetch={"batch_size": 5})
        async with daemon(app) as stop:
            await wait_until(lambda: count(app, "select count(*) from tickets") > 1, 20, interval=0.005)
            stop.set()
        app = make_app(tmp_path, [_box(server, user)], fetch={"batch_size": 5})
        row = _status(app)[user.name]
        left_on_server = len(server.uids("INBOX", user=user.name))
        assert 0 < row["waiting"] == left_on_server == row["in_folder"], "stopped too late to prove anything"
        assert row["read"] == row["stored"] + row["replies"] + row["duplicates"] + row["quarantined"]
        assert row["read"] + row["waiting"] == appended and row["missing"] == 0
        assert (row["replies"], row["duplicates"], row["quarantined"]) == (1, 1, 1)
        assert row["last_fetch_at"]

        await app.run_once()  # drained: nothing waits, and every mail the server had is accounted for
        row = _status(app)[user.name]
        assert (row["in_folder"], row["waiting"], row["missing"]) == (0, 0, 0)
        assert (row["read"], row["stored"], row["replies"], row["duplicates"], row["quarantined"]) == (
            appended,
            1 + backlog,
            1,
            1,
            1,
        )
        assert row["awaiting_server_update"] == 0
    finally:
        app.close()


async def test_status_shows_a_mail_that_the_intake_passed_over(server: Dovecot, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mailbridge.cli import app as cli

    user = new_user(server)
    for n in range(3):
        server.append(sample_mail(f"kept in the folder {n}"), user=user.name)
    app = make_app(tmp_path, [_box(server, user, after_store="flag_seen")])
    try:
        await app.run_once()
        assert _status(app)[user.name]["in_folder"] == 3 and _status(app)[user.name]["missing"] == 0
        # As if the intake had skipped the middle mail: it is in the folder, with no receipt, behind the
        # high-water mark, so no fetch would ever import it.
        middle = server.uids("INBOX", user=user.name)[1]
        with app.db.unit_of_work() as session:
            from sqlalchemy import delete

            from mailbridge.models import Receipt

            session.execute(delete(Receipt).where(Receipt.uid == middle))
        await app.run_once()
        row = _status(app)[user.name]
        assert (row["in_folder"], row["waiting"], row["missing"], row["read"]) == (3, 0, 1, 2)
    finally:
        app.close()
    result = CliRunner().invoke(cli, ["status", "--config", str(tmp_path / "mailbridge.yaml")])
    assert result.exit_code == 1
    assert f"error: {user.name}: 1 mail(s) in the folder have no receipt" in result.output


async def test_reconnects_after_a_server_restart(tmp_path: Path) -> None:
    server = Dovecot.start(tmp_path / "dovecot")
    try:
        user = new_user(server)
        app = make_app(tmp_path, [_box(server, user, poll_interval=600)])
        async with daemon(app):
            await wait_until(lambda: count(app, "select count(*) from mailbox_state where connected") == 1, 10)
            server.restart()
            server.append(sample_mail("after restart"), user=user.name)
            await wait_until(lambda: count(app, "select count(*) from tickets") == 1, 15)
    finally:
        server.stop()


async def test_dropped_connection_mid_fetch_loses_nothing(server: Dovecot, tmp_path: Path) -> None:
    user = new_user(server)
    total = 400
    for _ in range(total):
        server.append(sample_mail(body="x" * 3000), user=user.name)
    app = make_app(tmp_path, [_box(server, user)], fetch={"batch_size": 20, "reconnect_max_seconds": 1})
    async with daemon(app):
        await wait_until(lambda: count(app, "select count(*) from tickets") > 0, 20, interval=0.01)
        server.kill_connections()
        assert count(app, "select count(*) from tickets") < total, "the import finished before the drop"
        await wait_until(lambda: count(app, "select count(*) from tickets") == total, 60)
        await wait_until(lambda: len(server.uids("Processed", user=user.name)) == total, 20)
    assert count(app, "select count(distinct dedup_key) from articles") == total
    assert server.uids("INBOX", user=user.name) == []


def _box(server: Dovecot, user: object, **extra: object) -> dict[str, object]:
    from tests.imap_env import imap_box

    return imap_box(server, user, **extra)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    dovecot = Dovecot.start(tmp_path_factory.mktemp("dovecot-tls"), tls=True)
    yield dovecot
    dovecot.stop()


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_tls_and_starttls_with_a_private_ca(tls_server: Dovecot, tmp_path: Path, security: str) -> None:
    user = new_user(tls_server)
    tls_server.append(sample_mail(f"over {security}"), user=user.name)
    port = tls_server.tls_port if security == "tls" else tls_server.port
    box = {**_box(tls_server, user), "security": security, "port": port, "ca_file": str(tls_server.ca_file)}
    app = make_app(tmp_path, [box])
    try:
        await app.run_once()
        assert count(app, f"select count(*) from tickets where subject = 'over {security}'") == 1
    finally:
        app.close()


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_untrusted_certificate_is_an_error_not_a_ticket(
    tls_server: Dovecot, tmp_path: Path, security: str
) -> None:
    user = new_user(tls_server)
    tls_server.append(sample_mail(), user=user.name)
    port = tls_server.tls_port if security == "tls" else tls_server.port
    app = make_app(tmp_path, [{**_box(tls_server, user), "security": security, "port": port}])
    try:
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            await app.run_once()
        assert count(app, "select count(*) from tickets") == 0
        assert count(app, "select count(*) from mailbox_state where last_error like '%CERTIFICATE%'") == 1
        assert len(tls_server.uids("INBOX", user=user.name)) == 1
    finally:
        app.close()
