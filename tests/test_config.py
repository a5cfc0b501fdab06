"""Configuration: validated once, errors name the key, secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailbridge.cli import app
from mailbridge.config import DATABASE_URL_ENV, ConfigError, ImapMailbox, MaildirMailbox, MoveTo, load_settings

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_the_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILBRIDGE_SUPPORT_PASSWORD", "s3cret-from-env")
    monkeypatch.setenv("MAILBRIDGE_SMTP_PASSWORD", "smtp-s3cret")
    settings = load_settings(ROOT / "config" / "mailbridge.example.yaml")
    box = settings.mailboxes[0]
    assert isinstance(box, ImapMailbox)
    assert box.secret == "s3cret-from-env"
    assert box.after_store == MoveTo(move="Processed")
    assert "s3cret" not in repr(settings)
    smtp = settings.smtp_for(box)
    assert smtp is not None and smtp.port == 587 and smtp.security == "starttls" and smtp.secret == "smtp-s3cret"
    assert box.address == "support@example.com" and box.acknowledge and box.rate_limit.per_hour == 3


def test_defaults_without_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MAILBRIDGE_CONFIG", raising=False)
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    monkeypatch.setenv("MAILBRIDGE_DATA_DIR", str(tmp_path))
    settings = load_settings(None)
    assert settings.database_url == f"sqlite:///{tmp_path / 'mailbridge.db'}"
    assert settings.storage_path == tmp_path / "storage"
    assert settings.mailboxes == []


def test_the_database_url_from_the_environment_wins_and_its_password_is_never_shown(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = write(tmp_path, "database: {url: 'sqlite:////srv/elsewhere.db'}\n")
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql://mb:s3cret@db.example:5432/mailbridge")
    # psycopg 3 is what the postgresql extra installs; SQLAlchemy's default driver would be psycopg2.
    assert load_settings(config).database_url == "postgresql+psycopg://mb:s3cret@db.example:5432/mailbridge"
    shown = runner.invoke(app, ["check-config", str(config)])
    assert shown.exit_code == 0 and "postgresql+psycopg://mb:***@db.example:5432/mailbridge" in shown.output
    assert "s3cret" not in shown.output
    for url, expected in (
        ("mysql://mb:s3cret@db.example/mailbridge", "database 'mysql' is not supported"),
        ("mb:s3cret at db.example", "not a database URL"),
    ):
        monkeypatch.setenv(DATABASE_URL_ENV, url)
        with pytest.raises(ConfigError) as info:
            load_settings(config)
        assert f"database.url (from {DATABASE_URL_ENV}): {expected}" in str(info.value)
        assert "s3cret" not in str(info.value)


def test_mailbox_defaults_and_password_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    settings = load_settings(
        write(
            tmp_path,
            "mailboxes:\n"
            "  - {name: support, host: imap.example.com, user: u, password_file: pw}\n"
            "  - {name: local, type: maildir, path: md}\n",
        )
    )
    imap, maildir = settings.mailboxes
    assert isinstance(imap, ImapMailbox) and isinstance(maildir, MaildirMailbox)
    assert (imap.port, imap.security, imap.folder, imap.existing_mail) == (993, "tls", "INBOX", "import")
    assert imap.secret == "from-file"
    assert maildir.path == tmp_path / "md"  # relative to the config file


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("databse: {url: x}\n", "databse: unknown key"),
        ("fetch: {batch_size: 0}\n", "fetch.batch_size: Input should be greater than or equal to 1"),
        (
            "mailboxes:\n  - {name: sup, host: imap.example.com, security: none, user: u, password: p}\n",
            "mailboxes[0] (sup): security: none is only allowed for 127.0.0.1",
        ),
        (
            "mailboxes:\n  - {name: sup, host: h, user: u, password: p, after_store: archive}\n",
            "mailboxes[0] (sup).after_store: must be {move: FOLDER}, flag_seen or delete",
        ),
        (
            "mailboxes:\n  - {name: sup, host: h, user: u, password: p, existing_mail: {since: soon}}\n",
            "mailboxes[0] (sup).existing_mail: must be import, skip or {since: YYYY-MM-DD}",
        ),
        ("mailboxes:\n  - {name: sup, host: h, user: u}\n", "mailboxes[0] (sup): a password is required"),
        (
            "mailboxes:\n  - {name: sup, host: h, user: u, password_env: MB_TEST_UNSET_VARIABLE}\n",
            "password_env names the environment variable MB_TEST_UNSET_VARIABLE, which is not set",
        ),
        (
            "mailboxes:\n  - {name: a, host: h, user: u, password: p}\n  - {name: a, host: h, user: u, password: p}\n",
            "mailbox names must be unique; repeated: a",
        ),
        (
            "mailboxes:\n  - {name: sup, host: h, user: u, password: p, after_store: {move: inbox}}\n",
            "after_store.move is the watched folder 'INBOX': mail would be imported forever",
        ),
        ("- just a list\n", "the top level must be a mapping"),
        ("key: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, yaml_text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, yaml_text))
    assert expected in str(info.value)


def test_check_config_exits_2_and_never_prints_the_password(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "mailboxes:\n  - {name: sup, host: imap.example.com, security: none, user: u, password: hunter2-secret}\n",
    )
    result = runner.invoke(app, ["check-config", str(path)])
    assert result.exit_code == 2
    assert "security: none is only allowed" in result.output
    assert "hunter2" not in result.output


def test_daemon_does_not_start_on_a_bad_config(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--once", "--config", str(write(tmp_path, "mailboxes: 7\n"))])
    assert result.exit_code == 2
    assert "mailboxes" in result.output


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "cannot read the configuration" in result.output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "smtp: {host: smtp.example.com, security: none}\n",
            "smtp: security: none is only allowed for 127.0.0.1",
        ),
        ("smtp: {host: 127.0.0.1, security: none, user: u}\n", "smtp: user is set but no password"),
        (
            "smtp: {host: 127.0.0.1, security: none}\nmailboxes:\n  - {name: sup, host: h, user: u, password: p}\n",
            "mailbox sup: acknowledge is on but the mailbox has no address",
        ),
        (
            "mailboxes:\n  - {name: sup, host: h, user: u, password: p, rate_limit: {per_hour: -1}}\n",
            "mailboxes[0] (sup).rate_limit.per_hour",
        ),
        ("tickets: {reference_format: 'MB'}\n", "tickets.reference_format"),
        ("outbox: {retry_for_hours: 0}\n", "outbox.retry_for_hours"),
    ],
)
def test_outgoing_mail_settings_are_checked(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert message in str(error.value)


def test_missing_template_language_stops_start_up(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mailbridge.cli import app

    path = tmp_path / "mailbridge.yaml"
    path.write_text(
        f"data_dir: {tmp_path / 'data'}\n"
        f"outbox: {{deliver_to_directory: {tmp_path / 'sent'}}}\n"
        f"mailboxes:\n  - {{type: maildir, name: s, path: {tmp_path / 'md'}, address: s@x.example, language: de}}\n"
    )
    result = CliRunner().invoke(app, ["run", "--once", "--config", str(path)])
    assert result.exit_code == 2
    assert "template de/ack.subject.txt not found" in result.output
