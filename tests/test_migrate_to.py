"""`mailbridge db migrate-to URL`: an SQLite installation moved to PostgreSQL, then used there."""

from __future__ import annotations

import email
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from mailbridge.cli import app
from mailbridge.config import DATABASE_URL_ENV
from tests.imap_env import sample_mail

runner = CliRunner()
SLA = {
    "policies": {"P3": {"first_response": "4h", "resolution": "40h"}},
    "calendar": {"timezone": "UTC", "working_hours": ["08:00-16:00"]},
}


def cli(*args: str, code: int = 0) -> Any:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return json.loads(result.stdout) if "--json" in args and code == 0 else result.output


def config(tmp_path: Path, name: str, **top: Any) -> Path:
    path = tmp_path / name
    data = {"data_dir": str(tmp_path / "data"), "storage": {"fsync": False}, "sla": SLA, **top}
    path.write_text(yaml.safe_dump(data))
    return path


def what_an_admin_sees(config_file: Path) -> dict[str, Any]:
    today = datetime.now(UTC).date().isoformat()
    return {
        "tickets": cli("tickets", "list", "--json", "--config", str(config_file)),
        "first": cli("tickets", "show", "MB-000001", "--json", "--config", str(config_file)),
        "merged": cli("tickets", "show", "MB-000003", "--json", "--config", str(config_file)),
        "quarantine": cli("quarantine", "list", "--json", "--config", str(config_file)),
        "status": cli("status", "--json", "--config", str(config_file)),
        "report": {
            key: value
            for key, value in json.loads(
                cli("report", "--since", today, "--until", today, "--format", "json", "--config", str(config_file))
            ).items()
            if not key.startswith("generated")  # when it was made
        },
    }


def test_an_sqlite_installation_moves_to_postgresql_and_goes_on_there(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)  # the installation being moved is on SQLite
    on_sqlite = config(tmp_path, "sqlite.yaml")
    first = sample_mail("Drukarka nie drukuje", sender="anna@klient.example")
    reply = email.message_from_bytes(sample_mail("Re: Drukarka nie drukuje", sender="anna@klient.example"))
    reply["In-Reply-To"] = email.message_from_bytes(first)["Message-ID"]
    mails = {
        "1.eml": first,
        "2.eml": reply.as_bytes(),
        "3.eml": sample_mail("Faktura", sender="jan@firma.example"),
        "4.eml": sample_mail("Faktura, jeszcze raz", sender="jan@firma.example"),
        "5.eml": b"\x00\x01 not a mail at all",
    }
    for name, raw in mails.items():
        (tmp_path / name).write_bytes(raw)
    summary = cli("ingest", *(str(tmp_path / name) for name in mails), "--json", "--config", str(on_sqlite))
    assert (summary["stored"], summary["replies"], summary["quarantined"]) == (3, 1, 1)
    cli("tickets", "merge", "MB-000002", "MB-000003", "--config", str(on_sqlite))  # a ticket that points at another
    cli("tickets", "status", "MB-000001", "waiting", "--config", str(on_sqlite))
    assert "planned 3 ticket(s)" in cli("sla", "check", "--config", str(on_sqlite))
    before = what_an_admin_sees(on_sqlite)

    out = cli("db", "migrate-to", postgres_url, "--config", str(on_sqlite))
    assert "tickets" in out and "3 rows" in out and "ticket_events" in out
    assert "stay where they are" in out and str(tmp_path / "data" / "storage") in out.replace("\n", "")

    on_postgresql = config(tmp_path, "postgresql.yaml", database={"url": postgres_url})
    assert what_an_admin_sees(on_postgresql) == before
    with create_engine(postgres_url).connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM articles")).scalar() == 4
        assert connection.execute(text("SELECT count(*) FROM ticket_events WHERE xact_id IS NULL")).scalar() == 0

    # It goes on from where it was: a reply lands on its ticket, new rows get new ids, the SLA plans them.
    answer = email.message_from_bytes(sample_mail("Re: Drukarka nie drukuje", sender="anna@klient.example"))
    answer["References"] = email.message_from_bytes(first)["Message-ID"]
    (tmp_path / "6.eml").write_bytes(answer.as_bytes())
    (tmp_path / "7.eml").write_bytes(sample_mail("Nowy problem", sender="ewa@klient.example"))
    summary = cli("ingest", str(tmp_path / "6.eml"), str(tmp_path / "7.eml"), "--json", "--config", str(on_postgresql))
    assert (summary["stored"], summary["replies"]) == (1, 1)
    shown = cli("tickets", "show", "MB-000001", "--json", "--config", str(on_postgresql))
    assert len(shown["articles"]) == 3 and shown["status"] == "open"  # the customer's answer reopened it
    assert [t["number"] for t in cli("tickets", "list", "--json", "--config", str(on_postgresql))].count(
        "MB-000004"
    ) == 1
    assert "planned 2 ticket(s)" in cli("sla", "check", "--config", str(on_postgresql))  # MB-000001 and the new one

    # Once filled, the target is refused: nothing is copied twice.
    refused = cli("db", "migrate-to", postgres_url, "--config", str(on_sqlite), code=1)
    assert "not empty" in refused and "tickets (4 rows)" in refused


def test_migrate_to_refuses_what_it_cannot_copy_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    on_sqlite = config(tmp_path, "sqlite.yaml")
    assert "not a database URL" in cli("db", "migrate-to", "no url here", "--config", str(on_sqlite), code=2)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert "must be a PostgreSQL database" in cli("db", "migrate-to", other, "--config", str(on_sqlite), code=2)
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql+psycopg://mb:secret@127.0.0.1:1/mb")
    refused = cli("db", "migrate-to", "postgresql+psycopg://x@127.0.0.1:1/y", "--config", str(on_sqlite), code=2)
    assert "not SQLite" in refused and "secret" not in refused
