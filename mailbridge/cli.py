"""Command line: each command loads the settings once, builds the App and calls one thing on it."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from sqlalchemy.engine import make_url

from mailbridge.config import CONFIG_ENV, ConfigError, Settings, load_settings
from mailbridge.customers import DirectoryError
from mailbridge.db import Database, MigrationError
from mailbridge.logs import LogFormat, setup_logging
from mailbridge.quarantine import list_quarantined

if TYPE_CHECKING:
    from mailbridge.app import App

app = typer.Typer(help="mailbridge: e-mail to tickets, nothing lost, nothing twice.", no_args_is_help=True)
tickets_app = typer.Typer(help="Look at tickets.", no_args_is_help=True)
quarantine_app = typer.Typer(
    help="Mail that could not be parsed or stored, kept with its raw bytes.", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema, and the move from SQLite to PostgreSQL.", no_args_is_help=True)
app.add_typer(tickets_app, name="tickets")
app.add_typer(quarantine_app, name="quarantine")
rules_app = typer.Typer(help="Routing rules: explain one mail, test a labelled folder.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")
outbox_app = typer.Typer(help="Outgoing mail: acknowledgements and notifications.", no_args_is_help=True)
app.add_typer(outbox_app, name="outbox")
app.add_typer(db_app, name="db")
sla_app = typer.Typer(help="Service levels: deadlines, reminders and escalations.", no_args_is_help=True)
app.add_typer(sla_app, name="sla")
auth_app = typer.Typer(help="OAuth2 sign-in for mailboxes at Microsoft 365 and Google.", no_args_is_help=True)
app.add_typer(auth_app, name="auth")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar=CONFIG_ENV, help="YAML configuration file.", show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def main() -> None:
    app()


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _with_log_format(settings: Settings, log_format: LogFormat | None) -> Settings:
    """The settings with `--log-format` in them, so that the sender's process and a reload log alike."""
    if log_format is None:
        return settings
    return settings.model_copy(update={"logging": settings.logging.model_copy(update={"format": log_format})})


@contextmanager
def _app(
    config: Path | None, *, migrate: bool = True, log_format: LogFormat | None = None, long_running: bool = False
) -> Iterator[App]:
    # Imported here: the App brings in the whole pipeline (a second of start-up on a busy machine), which
    # commands that only read the database (`report`) do without.
    from mailbridge.app import build_app
    from mailbridge.notify.render import TemplateProblem

    settings = _with_log_format(_settings(config), log_format)
    setup_logging(settings.logging.level, settings.logging.format)
    application = build_app(settings)
    try:
        if migrate:
            try:
                application.prepare(migrate_in_child=long_running)
            except (TemplateProblem, DirectoryError, MigrationError) as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2) from None
        yield application
    finally:
        application.close()


@contextmanager
def _database(config: Path | None) -> Iterator[tuple[Settings, Database]]:
    """The settings and the database, brought up to date, without the rest of the App: for commands that
    only read."""
    settings = _settings(config)
    setup_logging(settings.logging.level, settings.logging.format)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url)
    try:
        db.upgrade()
        yield settings, db
    finally:
        db.close()


# Mail is written by strangers: escape sequences in a subject must not drive the admin's terminal.
_TERMINAL_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _say(text: str) -> None:
    typer.echo(_TERMINAL_CONTROL.sub("\ufffd", text))


def _print_json(data: Any) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str)
    # json escapes C0 controls but not C1 (\x80-\x9f, e.g. CSI); escaping them keeps the JSON identical.
    typer.echo(re.sub(r"[\x7f-\x9f]", lambda m: f"\\u{ord(m.group()):04x}", text))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        _say("(none)")
        return
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    _say("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        _say("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _cell(value: Any) -> str:
    if isinstance(value, dict) and "address" in value:
        return value["address"]
    text = "" if value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _hide_password(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


@auth_app.command("login")
def auth_login(
    mailbox: Annotated[str, typer.Argument(help="The mailbox's name in the configuration.")],
    smtp: Annotated[bool, typer.Option("--smtp", help="Sign in for the mailbox's own smtp.oauth2 block.")] = False,
    config: ConfigOption = None,
) -> None:
    """The one-time consent (device-code flow): the refresh token goes into the configured token_cache."""
    from mailbridge.config import ImapMailbox
    from mailbridge.oauth import OAuthError, device_login

    settings = _settings(config)
    setup_logging(settings.logging.level)
    box = next((b for b in settings.mailboxes if b.name == mailbox), None)
    if box is None:
        typer.echo(f"error: no mailbox {mailbox!r} in the configuration", err=True)
        raise typer.Exit(2)
    server = settings.smtp_for(box) if smtp else None
    oauth = server.oauth2 if server is not None else box.oauth2 if isinstance(box, ImapMailbox) else None
    user = (server.user if server is not None else box.user if isinstance(box, ImapMailbox) else None) or ""
    if oauth is None:
        where = "its smtp" if smtp else "it"
        typer.echo(f"error: mailbox {mailbox} has no oauth2 block for {where}: nothing to sign in", err=True)
        raise typer.Exit(2)
    try:
        account = asyncio.run(device_login(oauth, user, mailbox, _say))
    except OAuthError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    where = f", stored in {oauth.token_cache}" if oauth.token_cache else ""
    _say(f"mailbox {mailbox}: signed in as {account}{where}")


@app.command()
def run(
    config: ConfigOption = None,
    once: Annotated[bool, typer.Option("--once", help="Drain every mailbox once, then exit.")] = False,
    log_format: Annotated[
        LogFormat | None,
        typer.Option("--log-format", help="text (readable) or json (one object per line); default: logging.format."),
    ] = None,
) -> None:
    """Run the daemon: fetch every configured mailbox (and take LMTP deliveries) until SIGTERM/SIGINT;
    SIGHUP reloads the configuration."""
    # Until the event loop takes over SIGTERM, a stop request during start-up simply exits:
    # nothing has been fetched yet, and the migrations run in a transaction. A reload asked for during
    # start-up is moot: the configuration is being read anyway.
    signal.signal(signal.SIGTERM, _exit_quietly)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with _app(config, log_format=log_format, long_running=True) as application:
        if not application.settings.mailboxes:
            typer.echo("warning: no mailboxes configured; nothing to fetch", err=True)
        if once:
            busy = asyncio.run(application.run_once())
            for name, holder in sorted(busy.items()):
                typer.echo(f"mailbox {name}: skipped, instance {holder} is fetching it", err=True)
            return
        from mailbridge.observability.server import HttpListenError

        try:
            asyncio.run(_run_daemon(application, lambda: _with_log_format(load_settings(config), log_format)))
        except HttpListenError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)


async def _run_daemon(application: App, reload_settings: Callable[[], Settings]) -> None:
    from mailbridge.app import install_signal_handlers
    from mailbridge.leases import InstanceBusy
    from mailbridge.service import Notifier, serve

    stop, reload = asyncio.Event(), asyncio.Event()
    install_signal_handlers(stop, reload)
    try:
        await serve(application, stop, reload, reload_settings, Notifier())
    except InstanceBusy as exc:
        typer.echo(f"error: {exc}; give each daemon its own data_dir", err=True)
        raise typer.Exit(2) from None


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="Where the demo keeps its database, mail and config.")] = Path(
        "mailbridge-demo"
    ),
    fixtures: Annotated[Path | None, typer.Option(help="Mails to pre-fill the demo mailbox with.")] = None,
) -> None:
    """Run the daemon on the embedded defaults: SQLite and a local Maildir that needs no mail server."""
    data_dir = data_dir.resolve()
    inbox = data_dir / "demo-inbox"
    config_path = data_dir / "mailbridge.yaml"
    first_run = not inbox.exists()
    from mailbridge.ingest.maildir import ensure_maildir

    ensure_maildir(inbox)
    if not config_path.exists():
        config_path.write_text(
            yaml.safe_dump(
                {
                    "data_dir": str(data_dir),
                    # No SMTP server in the demo: acknowledgements are written as files instead.
                    "outbox": {"deliver_to_directory": str(data_dir / "sent")},
                    "mailboxes": [
                        {
                            "type": "maildir",
                            "name": "demo",
                            "path": str(inbox),
                            "poll_interval": 0.5,
                            "address": "support@demo.invalid",
                            # The pre-filled mails are a backlog; the demo shows their acknowledgements.
                            "acknowledge_backlog": True,
                        }
                    ],
                },
                sort_keys=False,
            ),
            encoding="utf-8",
        )
    if first_run:
        source = fixtures or _find_fixtures()
        copied = 0
        if source is not None:
            for index, eml in enumerate(sorted(source.glob("*.eml")), start=1):
                shutil.copyfile(eml, inbox / "new" / f"demo{index:04d}.{eml.stem}")
                copied += 1
        _say(f"Pre-filled the demo mailbox with {copied} mail(s) from {source}.")
    _say(
        f"""
mailbridge demo
  config:     {config_path}
  database:   {data_dir / "mailbridge.db"}
  mailbox:    {inbox}/new   (drop an .eml file here and it becomes a ticket)
  sent mail:  {data_dir / "sent"}   (the acknowledgements, as .eml files)
  look with:  mailbridge --help, e.g.
              mailbridge tickets list --config {config_path}
              mailbridge status --config {config_path}
Press Ctrl-C to stop.
"""
    )
    run(config=config_path, once=False)


def _find_fixtures() -> Path | None:
    for candidate in (
        Path.cwd() / "fixtures" / "emails",
        Path(__file__).resolve().parents[1] / "fixtures" / "emails",
    ):
        if candidate.is_dir():
            return candidate
    return None


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help=".eml files, directories, mbox files or Maildirs.")],
    config: ConfigOption = None,
    json_out: JsonOption = False,
    mailbox: Annotated[
        str,
        typer.Option(help="Channel name recorded on the tickets; a configured mailbox's name lets them be answered."),
    ] = "import",
    notify: Annotated[
        bool,
        typer.Option("--notify/--no-notify", help="Acknowledge new tickets (through the outbox) as the mailbox would."),
    ] = True,
) -> None:
    """Run the pipeline over local files and print a reconciliation:
    read = stored (new tickets) + replies (on existing tickets) + duplicates + quarantined."""
    for path in paths:
        if not path.exists():
            typer.echo(f"error: {path}: no such file or directory", err=True)
            raise typer.Exit(2)
    with _app(config, long_running=True) as application:
        summary = asyncio.run(application.ingest(paths, mailbox, notify))
    if json_out:
        _print_json(summary.as_json())
    else:
        _say(
            f"read {summary.read} = stored {summary.stored} + replies {summary.replies}"
            f" + duplicates {summary.duplicates} + quarantined {summary.quarantined}"
        )
    if summary.read != summary.accounted:
        typer.echo("error: the counts do not add up; some mail was not accounted for (a bug: please report)", err=True)
        raise typer.Exit(1)


@app.command()
def status(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Per mailbox: connection, last error, last fetch; what was read (= stored + replies + duplicates +
    quarantined) and the folder as last counted on the server: mails waiting, mails missing (must be 0).
    With a CRM configured: when its lookup last answered and last failed, and how many new tickets were
    flagged because it could not say who the customer is. Exits 1 when a mail is missing."""
    from mailbridge.queries import crm_status, mailbox_status

    with _app(config) as application, application.db.reader() as session:
        rows = mailbox_status(session, application.settings)
        crm = crm_status(session, application.settings)
    if json_out:
        _print_json({"mailboxes": rows, "crm": crm})
    else:
        _table(
            rows,
            [
                "mailbox",
                "held_by",
                "connected",
                "read",
                "stored",
                "replies",
                "duplicates",
                "quarantined",
                "in_folder",
                "waiting",
                "missing",
                "awaiting_server_update",
                "last_fetch_at",
                "last_error",
            ],
        )
        for row in rows:
            if row["waiting"]:
                _say(
                    f"{row['mailbox']}: {row['waiting']} mail(s) in the folder to import"
                    f" (counted at the fetch of {row['last_fetch_at']})"
                )
        if crm is not None:
            _say(_crm_line(crm))
    missing = [row for row in rows if row["missing"]]
    for row in missing:
        typer.echo(
            f"error: {row['mailbox']}: {row['missing']} mail(s) in the folder have no receipt, yet the fetches have"
            f" passed them (counted at the fetch of {row['last_fetch_at']}); they will not be imported on their own"
            " (a bug: please report)",
            err=True,
        )
    if missing:
        raise typer.Exit(1)


def _crm_line(crm: dict[str, Any]) -> str:
    state = "FAILING" if crm["failing"] else "ok" if crm["last_success_at"] else "not asked yet"
    line = f"CRM: {state}; last answer {crm['last_success_at'] or 'never'}"
    if crm["last_failure_at"]:
        line += f"; last failure {crm['last_failure_at']} ({crm['last_problem']})"
    flagged = crm["flagged_tickets"]
    line += f"; {flagged} ticket(s) flagged because the CRM could not say who the customer is"
    return line + (f" (the last at {crm['last_flagged_at']})" if flagged else "")


@app.command("parse")
def parse_command(
    file: Annotated[Path, typer.Argument(help="One raw mail (.eml).", exists=True, dir_okay=False)],
    json_out: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Show what the parser makes of one mail (nothing is stored, no database is needed)."""
    settings = _settings(config)  # a bad config is still reported, as by every command
    from mailbridge.ingest.parse import ParseError, parse
    from mailbridge.threading.ticket_refs import TicketRefs

    try:
        mail = parse(file.read_bytes(), TicketRefs(settings.tickets))
    except ParseError as exc:
        typer.echo(f"error: {file}: {exc}", err=True)
        raise typer.Exit(1) from None
    data = mail.as_json()
    if json_out:
        _print_json(data)
        return
    sender = data["from"]
    _say(
        f"Subject: {data['subject']}\nFrom: {sender['name'] if sender else ''} <{sender['address'] if sender else ''}>"
    )
    _say(f"Date: {data['date']}\nMessage-ID: {data['message_id']}")
    for part in data["attachments"]:
        _say(f"Attachment: {part['filename']} ({part['content_type']}, {part['size']} bytes)")
    _say("")
    _say(data["text"])


@tickets_app.command("list")
def tickets_list(
    config: ConfigOption = None,
    json_out: JsonOption = False,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
) -> None:
    """List tickets, newest first."""
    from mailbridge.queries import ticket_rows

    with _app(config) as application, application.db.reader() as session:
        rows = ticket_rows(session, limit)
    if json_out:
        _print_json(rows)
    else:
        _table(rows, ["number", "status", "customer", "mailbox", "articles", "subject"])


@tickets_app.command("show")
def tickets_show(number: str, config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Show one ticket with its articles and attachments."""
    from mailbridge.queries import ticket_detail

    with _app(config) as application, application.db.reader() as session:
        detail = ticket_detail(session, number)
    if detail is None:
        typer.echo(f"error: no ticket {number}", err=True)
        raise typer.Exit(1)
    if json_out:
        _print_json(detail)
        return
    _say(f"{detail['number']}  [{detail['status']}]  {detail['subject']}")
    _say(f"customer: {detail['customer']['name']} <{detail['customer']['address']}>  via {detail['mailbox']}")
    _say(
        f"queue: {detail['queue'] or '-'}  priority: {detail['priority'] or '-'}  owner: {detail['owner'] or '-'}"
        + (f"  tags: {', '.join(detail['tags'])}" if detail["tags"] else "")
    )
    if detail["routing"]:
        _say(f"routing: {detail['routing']}")
    if detail["triage_reason"]:
        _say(f"TRIAGE: {detail['triage_reason']}")
    if detail["sla"]:
        sla = detail["sla"]
        _say(
            f"SLA {sla['policy']}: first response due {sla['first_response_due'] or '-'}"
            + (f" (answered {sla['first_response_at']})" if sla["first_response_at"] else "")
            + f"  resolution due {sla['resolution_due'] or '-'}"
            + (f"  clock stopped since {sla['paused_since']}" if sla["paused_since"] else "")
        )
    if detail["linked_ticket"]:
        _say(f"linked to: {detail['linked_ticket']}")
    _say("participants: " + ", ".join(f"{p['address']} ({p['role']})" for p in detail["participants"]))
    for article in detail["articles"]:
        _say(
            f"\n--- article {article['id']} ({article['direction']}) from {article['from']['address']}"
            f" at {article['date']}"
        )
        if article["kind"] != "human":
            _say(f"    kind: {article['kind']}")
        if article["no_answer_reason"]:
            _say(f"    no automatic answer: {article['no_answer_reason']}")
        for part in article["attachments"]:
            kind = "inline" if part["inline"] else "attachment"
            _say(f"    {kind}: {part['filename']} ({part['content_type']}, {part['size']} bytes)")
        if article["new_text"] is not None and article["new_text"] != article["text"].strip():
            _say(article["new_text"])
            _say("    [quoted history not shown: --json has the whole text]")
        else:
            _say(article["text"])
    _say("\n--- history")
    for event in detail["history"]:
        change = f" {event['old'] or ''} -> {event['new']}" if event["kind"] == "status" else ""
        _say(f"  {event['at']}  {event['actor']}: {event['kind']}{change}")


STATUS_NAMES = {
    "new": "new",
    "open": "open",
    "waiting": "waiting_customer",
    "waiting-third-party": "waiting_third_party",
    "closed": "closed",
}


@tickets_app.command("status")
def tickets_status(
    number: str,
    status: Annotated[str, typer.Argument(help="open, waiting (on the customer), waiting-third-party or closed.")],
    config: ConfigOption = None,
) -> None:
    """Change a ticket's status (recorded in its history)."""
    from sqlalchemy import select

    from mailbridge.lifecycle import change_status
    from mailbridge.models import Ticket, utcnow

    new = STATUS_NAMES.get(status.lower())
    if new is None:
        typer.echo(f"error: unknown status {status!r}; use one of {', '.join(STATUS_NAMES)}", err=True)
        raise typer.Exit(2)
    with _app(config) as application, application.db.unit_of_work() as session:
        ticket = session.scalars(select(Ticket).where(Ticket.number == number)).first()
        if ticket is None:
            typer.echo(f"error: no ticket {number}", err=True)
            raise typer.Exit(1)
        old = change_status(session, ticket, new, "cli", utcnow())
        mailed = old is not None and application.status_mailer.changed(session, ticket, old, new, utcnow())
    _say(
        (f"{number}: {old} -> {new}" if old else f"{number}: already {new}")
        + (" (status mail queued)" if mailed else "")
    )


@tickets_app.command("merge")
def tickets_merge(
    into: Annotated[str, typer.Argument(help="The ticket that stays, e.g. MB-000001.")],
    other: Annotated[str, typer.Argument(help="The ticket merged into it (closed and linked afterwards).")],
    config: ConfigOption = None,
) -> None:
    """Merge OTHER into INTO: its articles, participants and history move; OTHER is closed and linked."""
    from sqlalchemy import select

    from mailbridge.lifecycle import merge
    from mailbridge.models import Ticket, utcnow

    with _app(config) as application, application.db.unit_of_work() as session:
        found = {t.number: t for t in session.scalars(select(Ticket).where(Ticket.number.in_([into, other])))}
        missing = [n for n in (into, other) if n not in found]
        if missing:
            typer.echo(f"error: no ticket {', '.join(missing)}", err=True)
            raise typer.Exit(1)
        if into == other:
            typer.echo("error: a ticket cannot be merged into itself", err=True)
            raise typer.Exit(2)
        try:
            moved = merge(session, found[into], found[other], "cli", utcnow())
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    _say(f"{other} merged into {into}: {moved} article(s) moved; {other} is closed and links to {into}")


@quarantine_app.command("list")
def quarantine_list(
    config: ConfigOption = None,
    json_out: JsonOption = False,
    include_resolved: Annotated[bool, typer.Option("--all", help="Also those already retried successfully.")] = False,
) -> None:
    """Quarantined mails with the reason."""
    from mailbridge.queries import quarantine_row

    with _app(config) as application, application.db.reader() as session:
        rows = [quarantine_row(q) for q in list_quarantined(session, include_resolved=include_resolved)]
    if json_out:
        _print_json(rows)
    else:
        _table(rows, ["id", "mailbox", "stage", "size", "created_at", "source", "reason"])


@quarantine_app.command("show")
def quarantine_show(
    item_id: Annotated[int, typer.Argument(metavar="ID")],
    config: ConfigOption = None,
    json_out: JsonOption = False,
    raw: Annotated[bool, typer.Option("--raw", help="Write the raw bytes to stdout.")] = False,
) -> None:
    """One quarantined mail; --raw writes its original bytes."""
    from mailbridge.models import QuarantinedMail
    from mailbridge.queries import quarantine_row

    _show_one(config, QuarantinedMail, item_id, quarantine_row, "quarantined mail", json_out=json_out, raw=raw)


@quarantine_app.command("retry")
def quarantine_retry(
    item_ids: Annotated[list[int] | None, typer.Argument(metavar="[ID]...")] = None,
    config: ConfigOption = None,
    retryable: Annotated[
        bool, typer.Option("--all-retryable", help="Every unresolved one that failed by our fault, not the mail's.")
    ] = False,
) -> None:
    """Run the pipeline again on quarantined mails (after a fix); each becomes a ticket or stays."""
    from mailbridge.models import Outcome

    with _app(config) as application:
        ids = list(item_ids or [])
        if retryable:
            with application.db.reader() as session:
                ids += [q.id for q in list_quarantined(session) if q.retryable and q.id not in ids]
        if not ids:
            typer.echo("error: name the quarantined mails (IDs) or give --all-retryable", err=True)
            raise typer.Exit(2)
        still = 0
        for item_id in ids:
            try:
                result = asyncio.run(application.retry_quarantined(item_id))
            except KeyError as exc:
                typer.echo(f"error: {exc.args[0]}", err=True)
                still += 1
                continue
            if result.outcome is Outcome.QUARANTINED:
                typer.echo(f"{item_id}: still quarantined: {result.reason}", err=True)
                still += 1
            else:
                _say(f"{item_id}: {result.outcome.value}: ticket {result.ticket}")
    if still:
        raise typer.Exit(1)


@outbox_app.command("list")
def outbox_list(
    config: ConfigOption = None,
    json_out: JsonOption = False,
    status: Annotated[str | None, typer.Option(help="Only pending, sent, failed or bounced mails.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
) -> None:
    """Outgoing mails: what was sent, what waits for a retry (and why), what failed or bounced."""
    from mailbridge.queries import outbox_mails, outbox_row

    with _app(config) as application, application.db.reader() as session:
        rows = [outbox_row(m) for m in outbox_mails(session, status, limit)]
    if json_out:
        _print_json(rows)
    else:
        _table(rows, ["id", "status", "template", "to", "attempts", "created_at", "subject", "last_error"])


@outbox_app.command("show")
def outbox_show(
    mail_id: Annotated[int, typer.Argument(metavar="ID")],
    config: ConfigOption = None,
    json_out: JsonOption = False,
    raw: Annotated[bool, typer.Option("--raw", help="Write the mail as it is sent to stdout.")] = False,
) -> None:
    """One outgoing mail; --raw writes its bytes."""
    from mailbridge.models import OutboxMail
    from mailbridge.queries import outbox_row

    _show_one(config, OutboxMail, mail_id, outbox_row, "outgoing mail", json_out=json_out, raw=raw)


def _show_one(
    config: Path | None,
    table: Any,
    row_id: int,
    describe: Callable[[Any], dict[str, Any]],
    what: str,
    *,
    json_out: bool,
    raw: bool,
) -> None:
    """A row with a `raw` column: its fields, as JSON or lines, or (--raw) the bytes themselves."""
    with _app(config) as application, application.db.reader() as session:
        item = session.get(table, row_id)
        if item is None:
            typer.echo(f"error: no {what} with id {row_id}", err=True)
            raise typer.Exit(1)
        if raw:
            sys.stdout.buffer.write(item.raw)
            return
        row = describe(item)
    if json_out:
        _print_json(row)
    else:
        for key, value in row.items():
            _say(f"{key}: {value}")


@outbox_app.command("retry")
def outbox_retry(
    mail_ids: Annotated[list[int] | None, typer.Argument(metavar="[ID]...")] = None,
    config: ConfigOption = None,
    failed: Annotated[bool, typer.Option("--all-failed", help="Every mail marked failed.")] = False,
) -> None:
    """Send failed (or waiting) mails again now, with a fresh delivery deadline; the daemon delivers them."""
    from datetime import timedelta

    from mailbridge.models import OutboxStatus
    from mailbridge.queries import outbox_mails, retry_outbox

    with _app(config) as application:
        ids = list(mail_ids or [])
        with application.db.unit_of_work() as session:
            if failed:
                ids += [m.id for m in outbox_mails(session, OutboxStatus.FAILED, 1_000_000) if m.id not in ids]
            if not ids:
                typer.echo("error: name the outgoing mails (IDs) or give --all-failed", err=True)
                raise typer.Exit(2)
            hours = application.settings.outbox.retry_for_hours
            queued = retry_outbox(session, ids, timedelta(hours=hours))
    for mail_id in ids:
        if mail_id in queued:
            _say(f"{mail_id}: queued again")
        else:
            typer.echo(f"{mail_id}: not found, or already sent or bounced", err=True)
    if len(queued) != len(ids):
        raise typer.Exit(1)


@rules_app.command("explain")
def rules_explain(
    file: Annotated[Path, typer.Argument(help="The mail (.eml) to route.")],
    config: ConfigOption = None,
    mailbox: Annotated[str, typer.Option(help="The mailbox it came through.")] = "import",
    json_out: JsonOption = False,
) -> None:
    """Which routing rules match this mail, what they decide, and how sure the decision is."""
    from mailbridge.ingest.parse import ParseError, parse
    from mailbridge.threading.ticket_refs import TicketRefs

    settings = _settings(config)
    try:
        mail = parse(file.read_bytes(), TicketRefs(settings.tickets))
    except (OSError, ParseError) as exc:
        typer.echo(f"error: {file}: {exc}", err=True)
        raise typer.Exit(2) from None
    router = _router(settings)
    sender = mail.sender.address if mail.sender else None
    crm_answer = _ask_crm(settings, sender) if sender and not router.knows(sender) else None
    decision = router.route(mail, mailbox, crm_answer)
    if json_out:
        _print_json(_decision_json(decision))
        return
    _say(f"{file}: queue {decision.queue}  priority {decision.priority or '-'}  owner {decision.owner or '-'}")
    _say(f"confidence {decision.confidence:.2f} (threshold {settings.routing.triage_threshold})")
    if decision.organisation:
        org = decision.organisation
        _say(
            f"customer: {org.name} (tier {org.tier or '-'}, account manager {org.account_manager or '-'}; "
            f"from the {decision.customer_source})"
        )
    elif crm_answer is not None and crm_answer.problem is None:
        _say("customer: not known to the CRM")
    if decision.tags:
        _say("tags: " + ", ".join(decision.tags))
    if decision.triage_reason:
        _say(f"TRIAGE: {decision.triage_reason}")
    for match in decision.matched:
        then = match.rule.then.model_dump(exclude_defaults=True)
        _say(f"  rule {match.rule.name} (confidence {match.rule.confidence}): {'; '.join(match.why)} -> {then}")
    if not decision.matched:
        _say("  no rule matched")


@rules_app.command("test")
def rules_test(
    directory: Annotated[Path, typer.Argument(help="A folder of .eml files.")],
    expect: Annotated[Path, typer.Option("--expect", help="CSV: file name, expected queue (triage for a human).")],
    config: ConfigOption = None,
    mailbox: Annotated[str, typer.Option(help="The mailbox they came through.")] = "import",
    json_out: JsonOption = False,
) -> None:
    """Route a labelled folder of mails: accuracy and a confusion table, to change rules safely."""
    import csv
    from collections import Counter

    from mailbridge.ingest.parse import ParseError, parse
    from mailbridge.threading.ticket_refs import TicketRefs

    settings = _settings(config)
    router = _router(settings)
    ticket_refs = TicketRefs(settings.tickets)
    try:
        with expect.open(encoding="utf-8", newline="") as handle:
            rows = [r for r in csv.reader(handle) if r and not r[0].startswith("#")]
    except OSError as exc:
        typer.echo(f"error: {expect}: {exc.strerror}", err=True)
        raise typer.Exit(2) from None
    if rows and rows[0][0].strip().lower() in ("file", "filename", "name"):
        rows = rows[1:]
    confusion: Counter[tuple[str, str]] = Counter()
    wrong: list[dict[str, str]] = []
    for name, expected, *_ in rows:
        try:
            mail = parse((directory / name.strip()).read_bytes(), ticket_refs)
        except (OSError, ParseError) as exc:
            typer.echo(f"error: {directory / name}: {exc}", err=True)
            raise typer.Exit(2) from None
        got = router.route(mail, mailbox).queue or "-"
        confusion[(expected.strip(), got)] += 1
        if got != expected.strip():
            wrong.append({"file": name.strip(), "expected": expected.strip(), "got": got})
    total = sum(confusion.values())
    right = sum(n for (e, g), n in confusion.items() if e == g)
    accuracy = right / total if total else 0.0
    if json_out:
        _print_json(
            {
                "mails": total,
                "correct": right,
                "accuracy": accuracy,
                "confusion": [{"expected": e, "got": g, "mails": n} for (e, g), n in sorted(confusion.items())],
                "wrong": wrong,
            }
        )
    else:
        _say(f"{right}/{total} routed as expected: accuracy {accuracy:.1%}")
        queues = sorted({q for pair in confusion for q in pair})
        width = max([8, *(len(q) for q in queues)]) + 2
        first = max(width, len("expected \\ got") + 2)
        _say("expected \\ got".ljust(first) + "".join(q.ljust(width) for q in queues))
        for expected_queue in queues:
            counts = "".join(str(confusion[(expected_queue, g)] or ".").ljust(width) for g in queues)
            _say(expected_queue.ljust(first) + counts)
        for miss in wrong:
            _say(f"  {miss['file']}: expected {miss['expected']}, got {miss['got']}")
    if wrong:
        raise typer.Exit(1)


def _router(settings: Settings) -> Any:
    from mailbridge.customers import CustomerDirectory
    from mailbridge.routing import Router

    path = settings.routing.customers.directory
    try:
        return Router(settings.routing, CustomerDirectory.load(path) if path else None)
    except DirectoryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _ask_crm(settings: Settings, address: str) -> Any:
    """The CRM's answer for one sender (None without a CRM in the configuration)."""
    crm_settings = settings.routing.customers.crm
    if crm_settings is None:
        return None
    from mailbridge.crm import Crm

    async def ask() -> Any:
        crm = Crm(crm_settings)
        try:
            return (await crm.look_up([address]))[address.lower()]
        finally:
            await crm.aclose()

    return asyncio.run(ask())


def _decision_json(decision: Any) -> dict[str, Any]:
    return {
        "queue": decision.queue,
        "priority": decision.priority,
        "owner": decision.owner,
        "tags": list(decision.tags),
        "confidence": decision.confidence,
        "triage_reason": decision.triage_reason,
        "candidates": list(decision.candidates),
        "organisation": decision.organisation.name if decision.organisation else None,
        "tier": decision.organisation.tier if decision.organisation else None,
        "account_manager": decision.organisation.account_manager if decision.organisation else None,
        "customer_source": decision.customer_source,
        "customer_problem": decision.customer_problem,
        "matched": [{"rule": m.rule.name, "why": m.why, "confidence": m.rule.confidence} for m in decision.matched],
    }


def _day(value: str, option: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        typer.echo(f"error: {option} {value!r}: write a date as YYYY-MM-DD", err=True)
        raise typer.Exit(2) from None


@app.command()
def report(
    since: Annotated[str, typer.Option("--since", help="First day, YYYY-MM-DD (the SLA calendar's time zone).")],
    until: Annotated[str, typer.Option("--until", help="Last day included, YYYY-MM-DD.")],
    config: ConfigOption = None,
    queue: Annotated[str | None, typer.Option("--queue", help="Only this queue.")] = None,
    output_format: Annotated[str, typer.Option("--format", help="table, json or csv (on standard output).")] = "table",
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write a self-contained HTML report with charts here.")
    ] = None,
) -> None:
    """Help-desk report: response and resolution times, SLA compliance, throughput, backlog, reopens."""
    from mailbridge.reporting import build_report
    from mailbridge.reporting.render import as_csv, as_json_data, as_table

    if output_format not in ("table", "json", "csv"):
        typer.echo(f"error: --format {output_format!r}: use table, json or csv", err=True)
        raise typer.Exit(2)
    first, last = _day(since, "--since"), _day(until, "--until")
    if last < first:
        typer.echo(f"error: --until {last} is before --since {first}", err=True)
        raise typer.Exit(2)
    with _database(config) as (settings, db), db.reader() as session:
        result = build_report(session, settings.sla, settings.routing.triage_queue, first, last, queue)
    if html is not None:
        from mailbridge.reporting.html import as_html

        try:
            html.write_text(as_html(result), encoding="utf-8")
        except OSError as exc:
            typer.echo(f"error: {html}: {exc.strerror}", err=True)
            raise typer.Exit(1) from None
    if output_format == "json":
        _print_json(as_json_data(result))
    else:
        _say((as_csv if output_format == "csv" else as_table)(result).rstrip("\n"))


@sla_app.command("check")
def sla_check(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Run one SLA check now, as the daemon does every check_interval_seconds: plan the deadlines of
    tickets whose history moved on (and of every open ticket when the SLA settings changed), queue the
    reminders and escalations that are due (the daemon sends them). Safe beside a running daemon: each
    reminder and escalation is queued once."""
    with _app(config) as application:
        if not application.settings.sla.enabled:
            typer.echo("error: no SLA policies configured (sla.policies)", err=True)
            raise typer.Exit(2)
        report = asyncio.run(application.check_sla())
    row = {
        "planned_tickets": report.planned_tickets,
        "reminders": report.reminders,
        "escalations": report.escalations,
        "skipped": report.skipped,
        "settings_changed": report.settings_changed,
        "replanned_open_tickets": report.replanned_open,
        "moved": report.moved,
        "without_policy": report.without_policy,
        "beyond_calendar": report.unreachable,
    }
    if json_out:
        _print_json(row)
        return
    if report.settings_changed:
        _say(
            f"the SLA settings changed: {report.replanned_open} open ticket(s) planned again under them, "
            f"{report.moved} with new deadlines or reminders; {report.without_policy} have no SLA policy any more"
            + (
                f"; {report.unreachable} have a target beyond their calendar's working time (no deadline)"
                if report.unreachable
                else ""
            )
        )
    _say(
        f"planned {report.planned_tickets} ticket(s); queued {report.reminders} reminder(s) and "
        f"{report.escalations} escalation(s); {report.skipped} reminder(s) skipped (deadline already passed)"
    )


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Apply the database migrations (the daemon also does this at start)."""
    with _app(config) as application:
        _say(f"database at {_hide_password(application.settings.database_url)} is up to date")


@db_app.command("migrate-to")
def db_migrate_to(
    url: Annotated[str, typer.Argument(help="The empty PostgreSQL database: postgresql+psycopg://user:pw@host/name")],
    config: ConfigOption = None,
) -> None:
    """Copy this installation's SQLite database into an empty PostgreSQL database (stop the daemon first)."""
    from mailbridge.db_copy import CopyError, check_target_url, copy_database

    settings = _settings(config)
    setup_logging(settings.logging.level)
    if not settings.database_url.startswith("sqlite"):
        typer.echo("error: the configured database is not SQLite: migrate-to copies an SQLite installation", err=True)
        raise typer.Exit(2)
    try:
        check_target_url(url)
    except CopyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    source, target = Database(settings.database_url), Database(url)
    _say(f"copying {_hide_password(source.url)}")
    _say(f"     to {_hide_password(url)}")
    try:
        source.upgrade()
        summary = copy_database(source, target)
    except CopyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        source.close()
        target.close()
    width = max(len(name) for name in summary.rows)
    for name, rows in summary.rows.items():
        _say(f"  {name.ljust(width)}  {rows:>9} rows")
    _say(f"copied {summary.total} rows in {len(summary.rows)} tables; the counts agree on both sides.")
    _say(
        f"Raw mails and attachments are files in {settings.storage_path}, not rows: they stay where they are. "
        "Keep storage.path and data_dir (threading.secret) the same for the PostgreSQL installation."
    )
    _say("Next: set database.url (or MAILBRIDGE_DATABASE_URL) to the new URL and start the daemon.")


@app.command("check-config")
def check_config(
    file: Annotated[Path | None, typer.Argument(help="The YAML file to check (default: --config).")] = None,
    config: ConfigOption = None,
) -> None:
    """Validate a configuration file and print what it configures (secrets masked)."""
    file = file or config
    if file is None:
        typer.echo("error: name the file to check (or give --config / MAILBRIDGE_CONFIG)", err=True)
        raise typer.Exit(2)
    settings = _settings(file)
    _say(f"{file}: OK")
    _say(f"  database: {_hide_password(settings.database_url)}")
    _say(f"  storage:  {settings.storage_path}")
    if settings.lmtp is not None:
        _say(f"  lmtp:     {settings.lmtp.listen}")
    for box in settings.mailboxes:
        if box.type == "maildir":
            where = f"{box.path}"
        elif box.type == "lmtp":
            where = "for " + ", ".join(box.recipients)
        else:
            where = f"{box.user}@{box.host}:{box.port}/{box.folder} ({box.security})"
            if box.oauth2 is not None:
                where += f", OAuth2 {box.oauth2.provider} {box.oauth2.flow}"
        _say(f"  mailbox {box.name}: {box.type} {where}")
