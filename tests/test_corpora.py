"""Real-world mail written by other projects (../shared/corpora) through our own commands.

Every mail must end as a ticket or in quarantine with its raw bytes: zero crashes, zero silent drops,
and no MIME leaf part lost.
"""

from __future__ import annotations

import email
import hashlib
import json
import mailbox
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailbridge.blobstore import BlobStore
from mailbridge.cli import app
from mailbridge.ingest.files import NOT_MAIL_SUFFIXES
from mailbridge.ingest.parse import message_from_bytes as fast_message_from_bytes
from tests.conftest import CORPORA
from tests.support import database
from tests.support.mime import mime_tree

pytestmark = pytest.mark.skipif(not CORPORA.is_dir(), reason="../shared/corpora is not present")

# Bodies without headers (reply-parser inputs): not mails, so they are not fed to intake here.
BODY_ONLY_SETS = {"replies-github", "replies-zapier"}


def corpus_files() -> list[Path]:
    files: list[Path] = []
    for path in sorted(CORPORA.rglob("*")):
        rel = path.relative_to(CORPORA)
        if not path.is_file() or rel.parts[0] in BODY_ONLY_SETS or len(rel.parts) < 2:
            continue
        if path.suffix.lower() in NOT_MAIL_SUFFIXES or path.name.startswith("."):
            continue
        if rel.parts[0] == "replies-talon" and "standard_replies" in rel.parts and path.suffix != ".eml":
            continue  # expected reply texts, not mails
        if rel.parts[0] == "replies-talon" and "stripped" in rel.parts:
            continue
        files.append(path)
    return files


def mails_in(path: Path) -> list[bytes]:
    if path.read_bytes()[:5] == b"From ":
        box = mailbox.mbox(path, create=False)
        return [box.get_bytes(key) for key in box.iterkeys()]
    return [path.read_bytes()]


def test_corpora_every_mail_is_a_ticket_or_quarantined(
    tmp_path: Path, config_file: Path, report: Callable[[str], None]
) -> None:
    files = corpus_files()
    expected_mails = [m for f in files for m in mails_in(f)]
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(map(str, files)))
    proc = subprocess.run(
        [sys.executable, "-m", "mailbridge", "ingest", "--config", str(config_file), "--json", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MAILBRIDGE_CONFIG": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["read"] == len(expected_mails)
    assert summary["read"] == summary["stored"] + summary["replies"] + summary["duplicates"] + summary["quarantined"]
    assert "Traceback" not in proc.stderr

    db = tmp_path / "data" / "mailbridge.db"
    tickets = database.scalar(db, "select count(*) from tickets")
    assert tickets == summary["stored"]
    quarantined = database.rows(db, "select source, raw, sha256, reason from quarantine")
    assert len(quarantined) == summary["quarantined"]
    wanted = {hashlib.sha256(m).hexdigest() for m in expected_mails}
    for source, raw, sha, _reason in quarantined:
        assert hashlib.sha256(raw).hexdigest() == sha and sha in wanted, source
    # Every stored mail's raw bytes are in the blob store, byte for byte.
    blobs = tmp_path / "data" / "storage" / "blobs"
    for (sha,) in database.rows(db, "select raw_sha256 from articles"):
        assert hashlib.sha256(BlobStore(blobs).path(sha).read_bytes()).hexdigest() == sha

    report(f"corpora: {len(files)} files, {summary}")
    for source, _raw, _sha, reason in quarantined:
        report(f"quarantined {Path(source).relative_to(CORPORA)}: {reason}")
    # Real mail sets (not the header-less oddities) must become tickets, not quarantine.
    assert summary["quarantined"] <= 0.01 * summary["read"], [q[0] for q in quarantined]


def test_corpora_no_mime_part_is_lost(tmp_path: Path, report: Callable[[str], None]) -> None:
    runner = CliRunner()
    checked = lost = from_mbox = 0
    failures: list[str] = []
    for path in corpus_files():
        mails = mails_in(path)
        is_mbox = path.read_bytes()[:5] == b"From "
        for index, raw in enumerate(mails):
            name = f"{path.relative_to(CORPORA)}" + (f" message {index + 1}" if is_mbox else "")
            mail_file = path
            if is_mbox:  # `mailbridge parse` takes one mail: each message of an mbox on its own
                mail_file = tmp_path / f"mbox-message-{checked}-{index}.eml"
                mail_file.write_bytes(raw)
            result = runner.invoke(app, ["parse", str(mail_file), "--json"])
            if result.exit_code != 0:
                continue  # not a mail at all (quarantined by ingest; see the test above)
            parsed = json.loads(result.stdout)
            leaves = _leaf_count(email.message_from_bytes(raw.removeprefix(b"\xef\xbb\xbf")))
            checked += 1
            from_mbox += is_mbox
            if parsed["body_parts"] + len(parsed["attachments"]) != leaves:
                lost += 1
                failures.append(
                    f"{name}: {leaves} leaves, got {parsed['body_parts']} body + "
                    f"{len(parsed['attachments'])} attachments"
                )
    report(
        f"checked {checked} corpus mails ({from_mbox} of them from mbox files) for lost MIME parts: {lost} lose a part"
    )
    assert checked > 400
    assert from_mbox > 100
    assert not failures, "\n".join(failures[:20])


def _leaf_count(part: email.message.Message) -> int:
    if part.is_multipart() and not part.get_content_type().startswith("message/"):
        payload = part.get_payload()
        return sum(_leaf_count(child) for child in payload) if isinstance(payload, list) else 1
    return 1


def test_corpora_fast_mime_reading_gives_the_stdlib_tree(report: Callable[[str], None]) -> None:
    """The base64 shortcut in `message_from_bytes` must not change a single payload, header or defect."""
    mails = [raw for path in corpus_files() for raw in mails_in(path)]
    differ = [
        i
        for i, raw in enumerate(mails)
        if mime_tree(fast_message_from_bytes(raw)) != mime_tree(email.message_from_bytes(raw))
    ]
    report(f"compared the MIME trees of {len(mails)} corpus mails: {len(differ)} differ")
    assert len(mails) > 400
    assert not differ


MACHINE_KINDS = {"bounce", "autoreply", "feedback-report", "mdn", "list"}


def labelled_mails() -> list[tuple[str, str, bytes]]:
    """(set/path, kind, raw bytes) for every mail the corpora's labels.json files describe."""
    found: list[tuple[str, str, bytes]] = []
    for labels_file in sorted(CORPORA.glob("*/labels.json")):
        labels = json.loads(labels_file.read_text(encoding="utf-8"))
        for rel, label in sorted(labels.items()):
            path = labels_file.parent / rel
            if path.is_file() and path.suffix.lower() not in NOT_MAIL_SUFFIXES:
                found += [(f"{labels_file.parent.name}/{rel}", label["kind"], raw) for raw in mails_in(path)]
    return found


async def test_corpora_loop_prevention_answers_people_only(tmp_path: Path, report: Callable[[str], None]) -> None:
    """Every bounce, auto-reply, report and list mail of the corpora goes through intake with acknowledgements
    on and a real SMTP server: none of them is answered, and ordinary mail is answered once per ticket."""
    from sqlalchemy import select

    from mailbridge.models import Article, OutboxMail
    from tests.imap_env import make_app
    from tests.support.smtp_sink import SmtpSink

    mails = labelled_mails()
    folder = tmp_path / "in"
    folder.mkdir()
    for index, (_, _, raw) in enumerate(mails):
        (folder / f"{index:05d}.eml").write_bytes(raw)
    sink = SmtpSink().start()
    app = make_app(
        tmp_path,
        [
            {
                "type": "maildir",
                "name": "support",
                "path": str(tmp_path / "maildir"),
                "address": "support@helpdesk.example",
                # Many corpus mails share a sender: the rate limit is not what is tested here.
                "rate_limit": {"per_hour": 100_000, "per_day": 100_000},
            }
        ],
        smtp=sink.config(),
        outbox={"domain": "helpdesk.example"},
    )
    try:
        await app.ingest([folder], mailbox="support")
        await app.sender.deliver_due()
        with app.db.reader() as session:
            articles = {a.raw_sha256: a for a in session.scalars(select(Article))}
            acked = Counter(session.scalars(select(OutboxMail.article_id)))
    finally:
        app.close()
        sink.stop()
    answered_machines: list[str] = []
    unanswered_people: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for name, kind, raw in mails:
        article = articles.get(hashlib.sha256(raw).hexdigest())
        if article is None:  # quarantined, or a duplicate of another file
            continue
        kinds[kind] += 1
        if kind in MACHINE_KINDS and acked[article.id]:
            answered_machines.append(f"{name} ({kind})")
        elif kind == "normal" and not acked[article.id]:
            unanswered_people[article.no_answer_reason or "(no reason recorded)"] += 1
    report(
        f"loop prevention over {sum(kinds.values())} corpus mails {dict(kinds)}: "
        f"{len(sink.received)} acknowledgements; "
        f"{len(answered_machines)} machine mails answered; normal mails not answered: {dict(unanswered_people)}"
    )
    assert kinds["bounce"] > 400 and kinds["list"] > 100 and kinds["normal"] > 150
    assert not answered_machines, "\n".join(answered_machines)
    assert max(acked.values()) == 1, "one acknowledgement per ticket"
    assert len(sink.received) == len(acked)
    assert "(no reason recorded)" not in unanswered_people


async def test_corpora_threads_land_on_their_ticket_and_strangers_are_kept_out(
    tmp_path: Path, report: Callable[[str], None]
) -> None:
    """notmuch's real mailing-list threads, in date order: a message whose References chain is intact and
    whose sender took part in the thread earlier lands on the thread's ticket; anyone else gets a linked,
    flagged ticket."""
    import email.utils

    from sqlalchemy import select

    from mailbridge.models import Article, Ticket
    from tests.imap_env import make_app

    root = CORPORA / "threads-notmuch"
    labels = json.loads((root / "labels.json").read_text(encoding="utf-8"))
    mails = []
    for rel, label in labels.items():
        raw = (root / rel).read_bytes()
        message = email.message_from_bytes(raw)
        date = email.utils.parsedate_to_datetime(message["Date"]) if message["Date"] else None
        people = {a.lower() for _, a in email.utils.getaddresses(message.get_all("To", []) + message.get_all("Cc", []))}
        sender = email.utils.parseaddr(message.get("From", ""))[1].lower()
        mails.append((date.timestamp() if date else 0.0, rel, label, raw, sender, people))
    mails.sort(key=lambda m: (m[0], m[1]))
    folder = tmp_path / "in"
    folder.mkdir()
    for index, (*_, raw, _sender, _people) in enumerate(mails):
        (folder / f"{index:05d}.eml").write_bytes(raw)
    app = make_app(tmp_path, [{"type": "maildir", "name": "lists", "path": str(tmp_path / "md"), "acknowledge": False}])
    try:
        summary = await app.ingest([folder], mailbox="lists")
        with app.db.reader() as session:
            ticket_of = {a.raw_sha256: a.ticket_id for a in session.scalars(select(Article))}
            flagged = {t.id: t.linked_ticket_id for t in session.scalars(select(Ticket)) if t.triage_reason}
    finally:
        app.close()
    # A chain is intact when every mail it names was seen, back to the thread's first mail (a mail that
    # names only mails nobody has starts a conversation of its own).
    rooted: set[str] = set()
    taking_part: dict[str, set[str]] = {}
    thread_ticket: dict[str, int] = {}
    followers = landed = strangers = kept_out = 0
    for _, _rel, label, raw, sender, people in mails:
        thread, ticket = label["thread"], ticket_of.get(hashlib.sha256(raw).hexdigest())
        if ticket is None:
            continue  # a duplicate of another file
        parents = [m for m in [*label["in_reply_to"], *label["references"]] if m]
        intact = bool(parents) and all(p in rooted for p in parents)
        if thread not in thread_ticket:
            thread_ticket[thread] = ticket
            rooted.add(label["message_id"])
        elif intact and sender in taking_part.get(thread, set()):
            followers += 1
            landed += ticket == thread_ticket[thread]
            rooted.add(label["message_id"])
        else:
            if intact:
                strangers += 1
                kept_out += ticket != thread_ticket[thread] and flagged.get(ticket) is not None
            continue  # a stranger's own mail does not make anyone a participant (a human triages it)
        taking_part.setdefault(thread, set()).update({sender, *people})
    report(
        f"threads: {summary.replies} replies stored on tickets; {landed}/{followers} follow-ups by participants "
        f"landed on their thread's ticket ({landed / max(1, followers):.1%}); {kept_out}/{strangers} follow-ups by "
        f"others became linked, flagged tickets"
    )
    assert followers > 80
    assert landed >= 0.99 * followers
    assert kept_out == strangers
