"""The commands an admin uses, run as the admin runs them."""

from __future__ import annotations

import hashlib
import json
import mailbox
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mailbridge.blobstore import BlobStore
from mailbridge.cli import app
from tests.imap_env import sample_mail
from tests.support import database

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures" / "emails"
sys.path.insert(0, str(FIXTURES))
import make_huge  # noqa: E402

runner = CliRunner()


def cli(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if "--json" in args else result.stdout


def test_ingest_files_dirs_mbox_and_maildir_reconcile(tmp_path: Path, config_file: Path) -> None:
    eml = tmp_path / "one.eml"
    eml.write_bytes(sample_mail("single file"))
    folder = tmp_path / "dir"
    folder.mkdir()
    for n in range(3):
        (folder / f"{n}.eml").write_bytes(sample_mail(f"in a directory {n}"))
    box = mailbox.mbox(tmp_path / "archive.mbox")
    for n in range(4):
        box.add(sample_mail(f"from an mbox {n}"))
    box.flush()
    maildir = mailbox.Maildir(tmp_path / "Maildir")
    for n in range(2):
        maildir.add(sample_mail(f"from a maildir {n}"))
    summary = cli(
        "ingest",
        str(eml),
        str(folder),
        str(tmp_path / "archive.mbox"),
        str(tmp_path / "Maildir"),
        "--json",
        "--config",
        str(config_file),
    )
    assert summary == {"read": 10, "stored": 10, "replies": 0, "duplicates": 0, "quarantined": 0}
    # The same archive again: every mail is recognised, nothing is stored twice.
    again = cli("ingest", str(folder), str(tmp_path / "archive.mbox"), "--json", "--config", str(config_file))
    assert again == {"read": 7, "stored": 0, "replies": 0, "duplicates": 7, "quarantined": 0}
    tickets = cli("tickets", "list", "--json", "--config", str(config_file))
    assert len(tickets) == 10
    assert {t["subject"] for t in tickets} >= {"single file", "from an mbox 3", "from a maildir 1"}
    status = cli("status", "--json", "--config", str(config_file))
    assert status["crm"] is None  # none configured
    boxes = status["mailboxes"]
    assert boxes == [{**boxes[0], "mailbox": "import", "read": 17, "stored": 10, "duplicates": 7}]


def test_ingest_text_summary_and_missing_path(tmp_path: Path, config_file: Path) -> None:
    (tmp_path / "a.eml").write_bytes(sample_mail())
    out = cli("ingest", str(tmp_path / "a.eml"), "--config", str(config_file))
    assert "read 1 = stored 1 + replies 0 + duplicates 0 + quarantined 0" in out
    result = runner.invoke(app, ["ingest", str(tmp_path / "missing.eml"), "--config", str(config_file)])
    assert result.exit_code == 2 and "no such file" in result.output


def test_parse_json_has_every_field() -> None:
    data = cli("parse", str(FIXTURES / "related_inline_image.eml"), "--json")
    for key in (
        "subject",
        "from",
        "to",
        "cc",
        "reply_to",
        "date",
        "message_id",
        "in_reply_to",
        "references",
        "text",
        "html",
        "attachments",
        "defects",
    ):
        assert key in data
    assert data["from"]["address"] == "marketing@firma.example"
    [image] = data["attachments"]
    assert image["inline"] and image["content_id"] == "logo@x" and image["content_type"] == "image/png"
    assert set(image) == {"filename", "content_type", "size", "sha256", "content_id", "inline"}
    assert "cid:logo@x" in data["html"]


def test_html_is_sanitised_and_text_derived(tmp_path: Path) -> None:
    data = cli("parse", str(FIXTURES / "html_only.eml"), "--json")
    assert data["html"] and "<script" not in data["html"] and "onclick" not in data["html"]
    assert "<table" in data["html"]
    assert data["text"] and "<td" not in data["text"] and "<script" not in data["text"]
    assert "alert(" not in data["text"]
    assert "Katarzyna Lewandowska" in data["text"]


def test_parse_of_a_non_mail_fails_clearly(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01\x02 not a mail")
    result = runner.invoke(app, ["parse", str(junk), "--json"])
    assert result.exit_code == 1 and "no header lines found" in result.output


def test_tickets_show_lists_articles_and_attachments(config_file: Path) -> None:
    cli("ingest", str(FIXTURES / "nested_rfc822.eml"), "--config", str(config_file))
    [ticket] = cli("tickets", "list", "--json", "--config", str(config_file))
    assert ticket["number"] == "MB-000001" and ticket["status"] == "new" and ticket["articles"] == 1
    detail = cli("tickets", "show", "MB-000001", "--json", "--config", str(config_file))
    [article] = detail["articles"]
    assert article["direction"] == "inbound"
    assert [a["content_type"] for a in article["attachments"]] == ["message/rfc822"]
    human = cli("tickets", "show", "MB-000001", "--config", str(config_file))
    assert "MB-000001" in human and "message/rfc822" in human
    missing = runner.invoke(app, ["tickets", "show", "MB-999999", "--config", str(config_file)])
    assert missing.exit_code == 1 and "no ticket" in missing.output


def test_huge_attachment_is_stored_whole(tmp_path: Path, config_file: Path) -> None:
    raw = make_huge.huge_attachment_mail()
    (tmp_path / "huge.eml").write_bytes(raw)
    assert cli("ingest", str(tmp_path / "huge.eml"), "--json", "--config", str(config_file))["stored"] == 1
    [article] = cli("tickets", "show", "MB-000001", "--json", "--config", str(config_file))["articles"]
    [part] = article["attachments"]
    assert part["size"] == 8 * 1024 * 1024
    blob = BlobStore(tmp_path / "data" / "storage" / "blobs").path(part["sha256"])
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == part["sha256"]


def test_pathological_mail_is_quarantined_after_the_time_limit_and_retried(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    settings = {"data_dir": str(tmp_path / "data"), "storage": {"fsync": False}, "parsing": {"timeout_seconds": 1}}
    config.write_text(yaml.safe_dump(settings))
    slow = tmp_path / "slow.eml"
    slow.write_bytes(make_huge.many_links_mail())
    normal = tmp_path / "normal.eml"
    normal.write_bytes(sample_mail("arrives with the slow one"))
    started = time.monotonic()
    summary = cli("ingest", str(slow), str(normal), "--json", "--config", str(config))
    assert time.monotonic() - started < 30
    assert summary == {"read": 2, "stored": 1, "replies": 0, "duplicates": 0, "quarantined": 1}
    [item] = cli("quarantine", "list", "--json", "--config", str(config))
    assert "longer than 1 s" in item["reason"] and item["source"] == str(slow)
    raw = runner.invoke(app, ["quarantine", "show", str(item["id"]), "--raw", "--config", str(config)])
    assert raw.stdout_bytes == slow.read_bytes()

    # The fix: a longer time limit. Retrying turns the quarantined mail into a ticket.
    settings["parsing"] = {"timeout_seconds": 60}
    config.write_text(yaml.safe_dump(settings))
    out = cli("quarantine", "retry", str(item["id"]), "--config", str(config))
    assert out.startswith(f"{item['id']}: stored: ticket MB-")
    assert cli("quarantine", "list", "--json", "--config", str(config)) == []
    assert len(cli("quarantine", "list", "--all", "--json", "--config", str(config))) == 1
    assert cli("status", "--json", "--config", str(config))["mailboxes"][0]["stored"] == 2


def test_quarantine_retry_of_a_still_broken_mail_keeps_it(tmp_path: Path, config_file: Path) -> None:
    junk = tmp_path / "junk.eml"
    junk.write_bytes(b"\x00\x01 not a mail\r\n")
    cli("ingest", str(junk), "--config", str(config_file))
    [item] = cli("quarantine", "list", "--json", "--config", str(config_file))
    result = runner.invoke(app, ["quarantine", "retry", str(item["id"]), "--config", str(config_file)])
    assert result.exit_code == 1 and "still quarantined" in result.output
    assert len(cli("quarantine", "list", "--json", "--config", str(config_file))) == 1
    shown = cli("quarantine", "show", str(item["id"]), "--config", str(config_file))
    assert "no header lines found" in shown


def test_demo_turns_dropped_mail_into_tickets_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailbridge", "demo", "--data-dir", str(data_dir), "--fixtures", str(FIXTURES)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MAILBRIDGE_CONFIG": ""},
        cwd=tmp_path,
    )
    config = data_dir / "mailbridge.yaml"
    expected = len(list(FIXTURES.glob("*.eml")))
    try:
        wait_for(lambda: config.exists() and _tickets(config) == expected, 60)
        (data_dir / "demo-inbox" / "new" / "dropped.eml").write_bytes(sample_mail("dropped into the demo"))
        wait_for(lambda: _tickets(config) == expected + 1, 15)
        wait_for(lambda: any(b"dropped into the demo" in mail for mail in _sent(data_dir)), 15)
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0, output
    assert "drop an .eml file here" in output
    assert list((data_dir / "demo-inbox" / "new").iterdir()) == []
    assert len(list((data_dir / "demo-inbox" / ".Processed" / "cur").iterdir())) == expected + 1
    # As the README says: the pre-filled mails' acknowledgements (a backlog, acknowledged on purpose) and the
    # dropped one's are in sent/.
    sent = _sent(data_dir)
    assert sum(b"dropped into the demo" in mail for mail in sent) == 1
    assert len(sent) > 1


def _sent(data_dir: Path) -> list[bytes]:
    return [path.read_bytes() for path in (data_dir / "sent").glob("*.eml")]


def _tickets(config: Path) -> int:
    result = subprocess.run(
        [sys.executable, "-m", "mailbridge", "tickets", "list", "--json", "--limit", "1000", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    return len(json.loads(result.stdout)) if result.returncode == 0 else -1


def wait_for(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.2)


def test_a_mail_that_cannot_be_stored_is_quarantined_and_the_rest_of_its_batch_is_not(
    tmp_path: Path, config_file: Path
) -> None:
    cli("db", "upgrade", "--config", str(config_file))
    db = tmp_path / "data" / "mailbridge.db"
    # Stands in for any fault of ours while storing one mail (a bug, a constraint nobody foresaw).
    if database.is_postgresql():
        database.execute(
            db,
            "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.subject = 'poison' THEN RAISE EXCEPTION 'poisoned article'; END IF; RETURN NEW; END $$",
            "CREATE TRIGGER poison BEFORE INSERT ON articles FOR EACH ROW EXECUTE FUNCTION poison()",
        )
    else:
        database.execute(
            db,
            "CREATE TRIGGER poison BEFORE INSERT ON articles WHEN NEW.subject = 'poison' "
            "BEGIN SELECT RAISE(ABORT, 'poisoned article'); END",
        )
    for name, subject in (("a", "fine 1"), ("b", "poison"), ("c", "fine 2")):
        (tmp_path / f"{name}.eml").write_bytes(sample_mail(subject))
    (tmp_path / "d.eml").write_bytes((tmp_path / "b.eml").read_bytes())  # the same mail twice in one batch
    paths = [str(tmp_path / f"{n}.eml") for n in "abcd"]
    summary = cli("ingest", *paths, "--json", "--config", str(config_file))
    assert summary == {"read": 4, "stored": 2, "replies": 0, "duplicates": 0, "quarantined": 2}
    item, copy = cli("quarantine", "list", "--json", "--config", str(config_file))
    assert item["stage"] == "store" and item["retryable"] and "poisoned article" in item["reason"]
    assert copy["source"].endswith("d.eml") and "poisoned article" in copy["reason"]

    database.execute(db, "DROP TRIGGER poison ON articles" if database.is_postgresql() else "DROP TRIGGER poison")
    retried = cli("quarantine", "retry", "--all-retryable", "--config", str(config_file))
    assert retried.count(": stored: ticket") == 1 and retried.count(": duplicate: ticket") == 1
    assert {t["subject"] for t in cli("tickets", "list", "--json", "--config", str(config_file))} == {
        "fine 1",
        "poison",
        "fine 2",
    }


def test_escape_sequences_from_a_mail_never_reach_the_terminal(tmp_path: Path, config_file: Path) -> None:
    hostile = sample_mail("=?utf-8?q?Pilne_=1B]0;pwned=07=1B[2J_=C2=9B31m?=", body="tekst \x1b[31mczerwony")
    (tmp_path / "x.eml").write_bytes(hostile)
    cli("ingest", str(tmp_path / "x.eml"), "--config", str(config_file))
    listing = cli("tickets", "list", "--config", str(config_file))
    shown = cli("tickets", "show", "MB-000001", "--config", str(config_file))
    as_json = runner.invoke(app, ["tickets", "show", "MB-000001", "--json", "--config", str(config_file)]).stdout
    for out in (listing, shown, as_json):
        assert "\x1b" not in out and "\x9b" not in out and "\x07" not in out
    assert json.loads(as_json)["subject"].startswith("Pilne \x1b]0;pwned")  # the data itself is kept as sent


def test_one_contact_per_address_named_by_the_first_mail_that_gives_a_name(tmp_path: Path, config_file: Path) -> None:
    (tmp_path / "a.eml").write_bytes(b"From: jan@example.com\nSubject: a\nMessage-ID: <a@x>\n\nno name\n")
    cli("ingest", str(tmp_path / "a.eml"), "--config", str(config_file))
    (tmp_path / "b.eml").write_bytes(b"From: Jan Nowak <JAN@example.com>\nSubject: b\nMessage-ID: <b@x>\n\nhi\n")
    (tmp_path / "c.eml").write_bytes(b"From: Someone Else <jan@example.com>\nSubject: c\nMessage-ID: <c@x>\n\nhi\n")
    cli("ingest", str(tmp_path / "b.eml"), "--config", str(config_file))
    cli("ingest", str(tmp_path / "c.eml"), "--config", str(config_file))
    db = tmp_path / "data" / "mailbridge.db"
    assert database.rows(db, "select address, name from contacts") == [("jan@example.com", "Jan Nowak")]
    assert database.scalar(db, "select count(distinct customer_id) from tickets") == 1


def test_outbox_commands_and_why_a_mail_got_no_answer(tmp_path: Path) -> None:
    """An admin without SMTP at hand: acknowledgements go to a directory; outbox list/show/retry."""
    sent_dir = tmp_path / "sent"
    config = tmp_path / "mailbridge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "storage": {"fsync": False},
                "outbox": {"deliver_to_directory": str(sent_dir), "domain": "helpdesk.example"},
                "mailboxes": [
                    {
                        "type": "maildir",
                        "name": "support",
                        "path": str(tmp_path / "md"),
                        "address": "s@helpdesk.example",
                    }
                ],
            }
        )
    )
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "1.eml").write_bytes(sample_mail("Drukarka", sender="anna@example.com"))
    (folder / "2.eml").write_bytes(
        b"From: Anna <anna@example.com>\nSubject: Out of office\nAuto-Submitted: auto-replied\n\nBack Monday.\n"
    )
    cli("ingest", str(folder), "--mailbox", "support", "--config", str(config))
    [pending] = cli("outbox", "list", "--json", "--config", str(config))
    assert pending["status"] == "pending" and pending["to"] == "anna@example.com"
    assert pending["subject"] == "[MB-000001] Re: Drukarka"
    raw = runner.invoke(app, ["outbox", "show", str(pending["id"]), "--raw", "--config", str(config)]).stdout_bytes
    assert b"Auto-Submitted: auto-replied" in raw and b"Subject: [MB-000001] Re: Drukarka" in raw
    cli("run", "--once", "--config", str(config))  # delivers the outbox
    [sent] = cli("outbox", "list", "--json", "--status", "sent", "--config", str(config))
    assert [p.read_bytes() for p in sent_dir.glob("*.eml")] == [raw]
    assert "no automatic answer: Auto-Submitted: auto-replied" in cli(
        "tickets", "show", "MB-000002", "--config", str(config)
    )
    refused = runner.invoke(app, ["outbox", "retry", str(sent["id"]), "--config", str(config)])
    assert refused.exit_code == 1 and "already sent" in refused.output
    missing = runner.invoke(app, ["outbox", "retry", "--config", str(config)])
    assert missing.exit_code == 2
    cli("ingest", str(folder / "1.eml"), "--mailbox", "support", "--no-notify", "--config", str(config))
    assert len(cli("outbox", "list", "--json", "--config", str(config))) == 1  # a duplicate, and no answer anyway
