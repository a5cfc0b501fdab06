"""Who the customer is, from a CRM over HTTP: a real HTTP server on 127.0.0.1 (tests/support/crm_server.py),
mails through the whole pipeline (`App.ingest`), and the configuration checked at start-up."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select
from typer.testing import CliRunner

from mailbridge.app import App
from mailbridge.cli import app as cli
from mailbridge.config import ConfigError, load_settings
from mailbridge.models import Ticket
from mailbridge.routing_rules import CrmSettings
from tests.imap_env import count, imap_box, make_app, new_user, sample_mail, wait_until, write_config
from tests.support import database as test_database
from tests.support.crm_server import crm_server
from tests.support.dovecot import Dovecot, free_port

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
TOKEN = "crm-token-5b0e7c1d9a"  # would be a leak if it showed up anywhere but the request header
NORTHWIND = {"name": "Northwind", "tier": "Enterprise", "account_manager": "Ola@Helpdesk.example"}
RULES = [
    {
        "name": "invoices",
        "when": {"text": {"any": ["faktur*", "invoice*"]}},
        "then": {"queue": "accounting", "priority": "P3"},
    }
]


def routing(crm: dict[str, Any], **customers: Any) -> dict[str, Any]:
    return {"rules": RULES, "default_queue": "general", "customers": {"crm": crm, **customers}}


def crm_app(tmp_path: Path, crm: dict[str, Any], **customers: Any) -> App:
    box = {"type": "maildir", "name": "support", "path": str(tmp_path / "md"), "acknowledge": False}
    return make_app(tmp_path, [box], routing=routing(crm, **customers))


async def ingest(app: App, folder: Path, *mails: tuple[str, str]) -> None:
    """(subject, sender) mails as one batch."""
    folder.mkdir(parents=True)
    for n, (subject, sender) in enumerate(mails):
        (folder / f"{n}.eml").write_bytes(sample_mail(subject, sender=sender))
    summary = await app.ingest([folder], mailbox="support")
    assert summary.stored == len(mails)


def tickets(app: App) -> dict[str, Ticket]:
    with app.db.reader() as session:
        return {t.subject: t for t in session.scalars(select(Ticket))}


async def test_an_enterprise_customer_from_the_crm_gets_p1_and_its_account_manager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TEST_CRM_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)  # every logger: the token must not be in any log line
    customers = {"cfo@northwind.example": NORTHWIND, "jan+faktury@fabrikam.example": {"name": "Fabrikam"}}
    with crm_server(customers=customers) as server:
        app = crm_app(tmp_path, {"url": server.url(), "token_env": "TEST_CRM_TOKEN"})
        try:
            await ingest(
                app,
                tmp_path / "in",
                ("Invoice 7/2026", "CFO@Northwind.example"),
                ("Invoice 8/2026", "someone@elsewhere.example"),
                ("Invoice 9/2026", "jan+faktury@fabrikam.example"),  # "+" reaches the CRM as a "+"
            )
            found = tickets(app)
        finally:
            app.close()
        paths = sorted(r.path for r in server.requests)
        headers = [r.headers.get("authorization") for r in server.requests]
    northwind = found["Invoice 7/2026"]
    assert (northwind.queue, northwind.priority, northwind.owner) == ("accounting", "P1", "ola@helpdesk.example")
    assert (northwind.organisation, northwind.tier, northwind.triage_reason) == ("Northwind", "enterprise", None)
    assert "customer Northwind from the CRM" in (northwind.routing_reason or "")
    stranger = found["Invoice 8/2026"]  # 404: not a customer the CRM knows; nothing to flag
    assert (stranger.priority, stranger.owner, stranger.organisation, stranger.triage_reason) == (
        "P3",
        None,
        None,
        None,
    )
    assert found["Invoice 9/2026"].organisation == "Fabrikam"
    assert paths == [
        "/customers?email=cfo@northwind.example",
        "/customers?email=jan%2Bfaktury@fabrikam.example",
        "/customers?email=someone@elsewhere.example",
    ]
    assert headers == [f"Bearer {TOKEN}"] * 3
    assert caplog.records and all(TOKEN not in r.getMessage() for r in caplog.records)
    assert TOKEN not in caplog.text and TOKEN not in "".join(capfd.readouterr())


async def test_answers_are_cached_and_each_asked_once_per_batch(tmp_path: Path) -> None:
    with crm_server(customers={"northwind.example": NORTHWIND}) as server:
        app = crm_app(tmp_path, {"url": server.url("/domains/{domain}")})
        try:
            await ingest(
                app,
                tmp_path / "first",
                ("Pytanie 1", "anna@northwind.example"),
                ("Pytanie 2", "jan@northwind.example"),  # the same domain: the same request
                ("Pytanie 3", "x@unknown.example"),
                ("Pytanie 4", "x@unknown.example"),
            )
            asked_in_first_batch = len(server.requests)
            await ingest(
                app,
                tmp_path / "second",
                ("Pytanie 5", "piotr@northwind.example"),  # cached answer
                ("Pytanie 6", "y@unknown.example"),  # cached "not known"
            )
            found = tickets(app)
        finally:
            app.close()
    assert asked_in_first_batch == 2 and len(server.requests) == 2
    assert sorted(r.path for r in server.requests) == ["/domains/northwind.example", "/domains/unknown.example"]
    assert found["Pytanie 5"].priority == "P1" and found["Pytanie 5"].organisation == "Northwind"
    assert found["Pytanie 6"].organisation is None and found["Pytanie 6"].triage_reason is None


async def test_a_crm_that_is_down_routes_by_the_rules_alone_flags_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailbridge.crm")
    port = free_port()  # nothing listens there: connection refused
    app = crm_app(
        tmp_path, {"url": f"http://127.0.0.1:{port}/customers?email={{address}}", "pause_after_failure_seconds": 1}
    )
    try:
        await ingest(app, tmp_path / "a", ("Invoice 1", "cfo@northwind.example"), ("Hello", "b@b.example"))
        await ingest(app, tmp_path / "b", ("Invoice 2", "cfo@northwind.example"))  # the breaker: not asked
        down = tickets(app)
        await asyncio.sleep(1.1)
        with crm_server(customers={"cfo@northwind.example": NORTHWIND}, listen_port=port) as server:
            await ingest(app, tmp_path / "c", ("Invoice 3", "cfo@northwind.example"))
            back = tickets(app)["Invoice 3"]
            asked = len(server.requests)
        with app.db.reader() as session:
            number = session.scalars(select(Ticket.number).where(Ticket.subject == "Invoice 1")).one()
    finally:
        app.close()
    first, second, hello = down["Invoice 1"], down["Invoice 2"], down["Hello"]
    assert (first.queue, first.priority, first.owner, first.organisation) == ("accounting", "P3", None, None)
    assert (hello.queue, hello.priority) == ("general", None)
    for ticket in (first, hello):
        assert (ticket.triage_reason or "").startswith(
            "customer unknown: the CRM cannot be reached (ClientConnectorError: Cannot connect to host 127.0.0.1"
        )
        assert (ticket.triage_reason or "").endswith("; routed by the rules alone")
    assert second.queue == "accounting"
    assert "customer unknown: the CRM was not asked: failing since" in (second.triage_reason or "")
    warnings = [r for r in caplog.records if r.name == "mailbridge.crm" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "routed by the rules alone" in warnings[0].getMessage()
    assert (back.priority, back.owner, back.triage_reason, asked) == ("P1", "ola@helpdesk.example", None, 1)
    assert any("answers again" in r.getMessage() and "1 lookups skipped" in r.getMessage() for r in caplog.records)
    # What a human sees.
    shown = runner.invoke(cli, ["tickets", "show", number, "--config", str(tmp_path / "mailbridge.yaml")])
    assert shown.exit_code == 0, shown.output
    assert "TRIAGE: customer unknown: the CRM cannot be reached" in shown.output
    assert "routing: queue accounting" in shown.output and "; customer unknown: the CRM" in shown.output


async def test_status_shows_when_the_crm_last_answered_and_failed_and_the_tickets_it_left_flagged(
    tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens there: connection refused
    app = crm_app(
        tmp_path, {"url": f"http://127.0.0.1:{port}/customers?email={{address}}", "pause_after_failure_seconds": 1}
    )
    config = str(tmp_path / "mailbridge.yaml")

    def status() -> tuple[str, dict[str, Any]]:
        # Another process's view: from the database alone.
        text = runner.invoke(cli, ["status", "--config", config])
        shown = runner.invoke(cli, ["status", "--json", "--config", config])
        assert text.exit_code == 0 and shown.exit_code == 0, text.output + shown.output
        return text.stdout, json.loads(shown.stdout)["crm"]

    try:
        _, before = status()
        assert before["flagged_tickets"] == 0 and before["last_success_at"] is None and not before["failing"]
        await ingest(app, tmp_path / "a", ("Invoice 1", "cfo@northwind.example"), ("Hello", "b@b.example"))
        await ingest(app, tmp_path / "b", ("Invoice 2", "cfo@northwind.example"))  # the breaker: not asked
        text, down = status()
        assert down["failing"] and down["last_success_at"] is None and down["flagged_tickets"] == 3
        assert (down["last_problem"] or "").startswith("the CRM cannot be reached (ClientConnectorError")
        assert "CRM: FAILING; last answer never; last failure " in text
        assert "3 ticket(s) flagged because the CRM could not say who the customer is" in text
        await asyncio.sleep(1.1)
        with crm_server(customers={"cfo@northwind.example": NORTHWIND}, listen_port=port):
            await ingest(app, tmp_path / "c", ("Invoice 3", "cfo@northwind.example"))
        text, back = status()
    finally:
        app.close()
    assert not back["failing"] and back["flagged_tickets"] == 3
    assert back["last_success_at"] > back["last_failure_at"] == down["last_failure_at"]
    assert f"CRM: ok; last answer {back['last_success_at']}; last failure {down['last_failure_at']}" in text


async def test_a_slow_crm_costs_at_most_its_timeout_without_holding_the_loop_or_the_database(tmp_path: Path) -> None:
    database = tmp_path / "data" / "mailbridge.db"
    writer_free: list[tuple[float, bool]] = []  # (when, whether another writer could write)

    one_at_a_time = threading.Lock()  # the server's threads would otherwise take each other's turn

    asked_at: list[float] = []

    def database_is_free() -> None:
        # While the CRM is being asked, no transaction is open: another writer gets its turn at once.
        asked_at.append(time.monotonic())
        with one_at_a_time:
            _try_to_write(database, writer_free)

    beats: list[tuple[float, float]] = []  # (when, how long since the last beat)

    async def heartbeat(stop: asyncio.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.02)
            now = time.monotonic()
            beats.append((now, now - last))
            last = now

    with crm_server(customers={"cfo@northwind.example": NORTHWIND}, delay_seconds=20) as server:
        server.during_request = database_is_free
        app = crm_app(tmp_path, {"url": server.url(), "timeout_seconds": 0.5})
        stop = asyncio.Event()
        beating = asyncio.create_task(heartbeat(stop))
        try:
            started = time.monotonic()
            await ingest(app, tmp_path / "in", *((f"Invoice {n}", f"user{n}@northwind.example") for n in range(8)))
            took = time.monotonic() - started
            found = tickets(app)
        finally:
            stop.set()
            await beating
            app.close()
    assert len(server.requests) == 8
    # Checks made while the client still waited (a busy machine may run some after its timeout).
    in_time = [free for when, free in writer_free if when < min(asked_at) + 0.3]
    assert in_time and all(in_time), writer_free
    assert took < 10, f"ingest took {took:.1f}s: the 0.5s timeout was not honoured (the CRM waits 20s)"
    # While the lookups wait for the CRM, the loop goes on (IMAP IDLE would be served).
    waiting = [gap for when, gap in beats if min(asked_at) < when < min(asked_at) + 0.4]
    assert waiting and max(waiting) < 0.2, f"the event loop stalled for {max(waiting, default=0):.2f}s"
    for ticket in found.values():
        assert ticket.queue == "accounting" and ticket.priority == "P3"
        assert ticket.triage_reason == "customer unknown: the CRM gave no answer within 0.5s; routed by the rules alone"


def _try_to_write(database: Path, writer_free: list[tuple[float, bool]]) -> None:
    """Take the intake's writer lock and SQLite's write lock without waiting; note whether both were free.
    On PostgreSQL, which has no database-wide write lock: whether any other session has a transaction open."""
    if test_database.is_postgresql():
        open_elsewhere = test_database.scalar(
            database,
            "select count(*) from pg_stat_activity where datname = current_database()"
            " and pid <> pg_backend_pid() and xact_start is not null",
        )
        writer_free.append((time.monotonic(), open_elsewhere == 0))
        return
    descriptor = os.open(f"{database}.writer-lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        connection = sqlite3.connect(database, timeout=0)
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.rollback()
            writer_free.append((time.monotonic(), True))
        except sqlite3.OperationalError:
            writer_free.append((time.monotonic(), False))
        finally:
            connection.close()
    except BlockingIOError:
        writer_free.append((time.monotonic(), False))
    finally:
        os.close(descriptor)


async def test_one_deadline_for_all_the_senders_of_a_batch() -> None:
    from mailbridge.crm import Crm

    with crm_server(delay_seconds=20) as server:
        crm = Crm(CrmSettings(url=server.url(), timeout_seconds=0.5))
        started = time.monotonic()
        answers = await crm.look_up([f"user{n}@slow.example" for n in range(10)])
        took = time.monotonic() - started
        await crm.aclose()
    # Asked one after another, ten lookups would take 5s; together they share the 0.5s.
    assert took < 3, f"10 lookups took {took:.1f}s"
    assert {a.problem for a in answers.values()} == {"the CRM gave no answer within 0.5s"}


@pytest.mark.parametrize(
    ("server_options", "problem", "breaker"),
    [
        ({"status": 503}, "the CRM answered HTTP 503 Service Unavailable", True),
        ({"status": 401}, "the CRM answered HTTP 401 Unauthorized", True),
        ({"body": b"<html>maintenance</html>"}, "the CRM's answer is not JSON", True),
        ({"body": b'{"id": 7, "tier": "enterprise"}'}, "the CRM's answer has no name (field 'name')", False),
        ({"body": b'["just", "words"]'}, "the CRM's answer is not a customer record but str", False),
    ],
)
async def test_bad_answers_flag_the_ticket(
    tmp_path: Path, server_options: dict[str, Any], problem: str, breaker: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mailbridge.crm")
    with crm_server(**server_options) as server:
        app = crm_app(tmp_path, {"url": server.url()})
        try:
            await ingest(app, tmp_path / "a", ("Invoice 1", "a@x.example"))
            await ingest(app, tmp_path / "b", ("Invoice 2", "b@x.example"))
            found = tickets(app)
        finally:
            app.close()
    assert found["Invoice 1"].triage_reason == f"customer unknown: {problem}; routed by the rules alone"
    assert found["Invoice 1"].queue == "accounting" and found["Invoice 1"].priority == "P3"
    # The CRM failing is left alone for a while (one warning); one unusable answer is not the CRM failing.
    assert len(server.requests) == (1 if breaker else 2)
    assert len([r for r in caplog.records if r.name == "mailbridge.crm"]) == (1 if breaker else 0)


async def test_fields_are_found_by_their_paths(tmp_path: Path) -> None:
    answer = {
        "results": [
            {"properties": {"company": "Fabrikam", "segment": "ENTERPRISE"}, "owner": {"email": "Max@h.example"}}
        ]
    }
    with crm_server(customers={"it@fabrikam.example": answer, "x@empty.example": {"results": []}}) as server:
        crm_config = {
            "url": server.url(),
            "fields": {
                "record": "results",
                "name": "properties.company",
                "tier": "properties.segment",
                "account_manager": "owner.email",
            },
        }
        app = crm_app(tmp_path, crm_config)
        try:
            await ingest(app, tmp_path / "in", ("Awaria", "it@fabrikam.example"), ("Pytanie", "x@empty.example"))
            found = tickets(app)
        finally:
            app.close()
    fabrikam = found["Awaria"]
    assert (fabrikam.organisation, fabrikam.tier, fabrikam.priority, fabrikam.owner) == (
        "Fabrikam",
        "enterprise",
        "P1",
        "max@h.example",
    )
    assert (found["Pytanie"].organisation, found["Pytanie"].triage_reason) == (None, None)  # an empty list: not known


async def test_the_directory_is_asked_first(tmp_path: Path) -> None:
    directory = tmp_path / "customers.yaml"
    directory.write_text(yaml.safe_dump([{"name": "Contoso", "domains": ["contoso.example"], "tier": "standard"}]))
    with crm_server(customers={"boss@contoso.example": NORTHWIND}) as server:
        app = crm_app(tmp_path, {"url": server.url()}, directory=str(directory))
        try:
            await ingest(app, tmp_path / "in", ("Invoice 1", "boss@contoso.example"))
            found = tickets(app)["Invoice 1"]
        finally:
            app.close()
    assert server.requests == []
    assert (found.organisation, found.tier, found.priority) == ("Contoso", "standard", "P3")
    assert "customer Contoso from the directory" in (found.routing_reason or "")


def test_rules_explain_shows_the_crm_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_CRM_TOKEN", TOKEN)
    mail = tmp_path / "mail.eml"
    mail.write_bytes(sample_mail("Invoice 12", sender="cfo@northwind.example"))
    with crm_server(customers={"cfo@northwind.example": NORTHWIND}) as server:
        config = write_config(tmp_path, [], routing=routing({"url": server.url(), "token_env": "TEST_CRM_TOKEN"}))
        result = runner.invoke(cli, ["rules", "explain", str(mail), "--config", str(config)])
        as_json = runner.invoke(cli, ["rules", "explain", str(mail), "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert "queue accounting  priority P1  owner ola@helpdesk.example" in result.output
    assert "customer: Northwind (tier enterprise, account manager ola@helpdesk.example; from the CRM)" in result.output
    assert '"customer_source": "CRM"' in as_json.output and TOKEN not in result.output + as_json.output
    with crm_server(status=500) as broken:
        config = write_config(tmp_path, [], routing=routing({"url": broken.url()}))
        failed = runner.invoke(cli, ["rules", "explain", str(mail), "--config", str(config)])
    assert failed.exit_code == 0, failed.output
    assert "TRIAGE: customer unknown: the CRM answered HTTP 500 Internal Server Error" in failed.output


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://crm.example/api?email={email}", "unknown placeholder {email}; use {address} or {domain}"),
        ("https://crm.example/api?email={address!r}", "unknown placeholder {address!r}"),
        ("https://crm.example/api?email={address", "not a valid template"),
        ("https://crm.example/api/customers", "the URL names no customer: put {address} or {domain} in it"),
        ("ftp://crm.example/{address}", "must be an http:// or https:// URL with a host"),
    ],
)
def test_a_bad_url_template_stops_start_up_naming_the_key(tmp_path: Path, url: str, message: str) -> None:
    path = write_config(tmp_path, [], routing=routing({"url": url}))
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert f"routing.customers.crm.url: {message}" in str(error.value)


def test_the_token_is_checked_and_sent_only_over_https(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def error(crm: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as raised:
            load_settings(write_config(tmp_path, [], routing=routing(crm)))
        return str(raised.value)

    plain = {"url": "http://crm.example/c?email={address}", "token": TOKEN}
    assert "routing.customers.crm: a token is only sent over https://" in error(plain)
    assert "token_env names the environment variable NOT_SET_ANYWHERE" in error(
        {"url": "https://crm.example/c?email={address}", "token_env": "NOT_SET_ANYWHERE"}
    )
    (tmp_path / "empty.token").write_text("\n")
    assert "routing.customers.crm: the token is empty" in error(
        {"url": "https://crm.example/{domain}", "token_file": "empty.token"}
    )
    assert "routing.customers.crm: header 'X Api' is not a valid HTTP header" in error(
        {"url": "https://crm.example/{domain}", "headers": {"X Api": "1"}}
    )
    assert "header 'Accept' is not a valid HTTP header" in error(
        {"url": "https://crm.example/{domain}", "headers": {"Accept": "a\r\nX-Injected: 1"}}
    )
    (tmp_path / "crm.token").write_text(TOKEN + "\n")
    settings = load_settings(
        write_config(tmp_path, [], routing=routing({"url": "https://crm.example/{domain}", "token_file": "crm.token"}))
    )
    crm = settings.routing.customers.crm
    assert crm is not None and crm.token is not None and crm.token.get_secret_value() == TOKEN
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.model_dump())


def test_the_example_crm_settings_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commented-out crm block of the example config, switched on, is a valid configuration."""
    monkeypatch.setenv("MAILBRIDGE_CRM_TOKEN", TOKEN)
    lines = (ROOT / "config" / "mailbridge.example.yaml").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# crm:")
    indent = lines[start].index("#")
    block = []
    for line in lines[start:]:
        if not line.strip().startswith("#") or line.index("#") != indent:
            break
        block.append(line[indent + 2 :])
    crm = CrmSettings.model_validate(yaml.safe_load("\n".join(block))["crm"])
    assert crm.url == "https://crm.example.com/api/customers?email={address}"
    assert crm.token is not None and crm.fields.account_manager == "account_manager"


def test_addresses_are_url_encoded() -> None:
    from mailbridge.crm import Crm

    crm = Crm(CrmSettings(url="https://crm.example/c?email={address}&d={domain}"))
    assert (
        crm.url_for("Jan+Faktury@Firma.example")
        == "https://crm.example/c?email=jan%2Bfaktury@firma.example&d=firma.example"
    )
    assert crm.url_for("a&b=c@x.example").startswith("https://crm.example/c?email=a%26b%3Dc@x.example&")


@pytest.mark.skipif(not Dovecot.available(), reason="dovecot is not installed")
async def test_the_daemon_goes_on_through_a_slow_crm_and_uses_it_again_when_it_is_back(tmp_path: Path) -> None:
    """IMAP IDLE through Dovecot: a slow CRM costs one timeout, the mail is stored and moved, the next mail
    (noticed by IDLE) finds the CRM answering again."""
    server = Dovecot.start(tmp_path / "dovecot")
    try:
        user = new_user(server)
        with crm_server(customers={"cfo@northwind.example": NORTHWIND}, delay_seconds=20) as crm:
            crm_settings = {"url": crm.url(), "timeout_seconds": 1, "pause_after_failure_seconds": 0.5}
            app = make_app(tmp_path / "app", [imap_box(server, user)], routing=routing(crm_settings))
            stop = asyncio.Event()
            running = asyncio.create_task(app.run(stop))
            try:
                server.append(sample_mail("Invoice 1", sender="cfo@northwind.example"), user=user.name)
                await wait_until(lambda: count(app, "select count(*) from tickets") == 1, 60)
                crm.delay_seconds = 0
                await asyncio.sleep(0.6)  # past the pause after the failure
                server.append(sample_mail("Invoice 2", sender="cfo@northwind.example"), user=user.name)
                await wait_until(lambda: count(app, "select count(*) from tickets") == 2, 60)
                found = tickets(app)
            finally:
                stop.set()
                await asyncio.wait_for(running, 30)
                app.close()
        moved = len(server.uids("Processed", user=user.name))
    finally:
        server.stop()
    slow, back = found["Invoice 1"], found["Invoice 2"]
    assert (slow.queue, slow.priority, slow.owner) == ("accounting", "P3", None)
    assert slow.triage_reason == "customer unknown: the CRM gave no answer within 1s; routed by the rules alone"
    assert (back.priority, back.owner, back.triage_reason) == ("P1", "ola@helpdesk.example", None)
    assert moved == 2
