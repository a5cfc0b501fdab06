"""Routing rules: the rule language, confidence and triage, the rules commands, and routing in intake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mailbridge.cli import app as cli
from mailbridge.config import ConfigError, load_settings
from mailbridge.ingest.parse import parse
from mailbridge.routing import Router, words
from mailbridge.routing_rules import RoutingSettings

ROOT = Path(__file__).resolve().parents[1]
ROUTING = ROOT / "fixtures" / "routing"
runner = CliRunner()


def mail(subject: str, body: str = "", sender: str = "jan@klient.example", headers: str = "") -> Any:
    raw = f"From: {sender}\nTo: support@helpdesk.example\nSubject: {subject}\n{headers}\n{body}\n"
    return parse(raw.encode())


def router(*rules: dict[str, Any], **options: Any) -> Router:
    return Router(RoutingSettings.model_validate({"rules": list(rules), **options}))


def test_words_are_lower_case_without_diacritics() -> None:
    assert words("Fakturę, ŁÓDŹ i Gdańsk-Oliwa!") == ["fakture", "lodz", "i", "gdansk", "oliwa"]


@pytest.mark.parametrize(
    ("keywords", "text", "hit"),
    [
        (["faktura"], "FAKTURA nr 1", True),
        (["faktura"], "fakturę proszę", False),  # a whole word, unless the rule says otherwise
        (["faktur*"], "fakturę proszę", True),
        (["faktur*"], "Fąktury", True),
        (["vat"], "prywatny", False),  # word boundaries
        (["umowa ramowa"], "nasza umowa ramowa z 2024", True),
        (["umowa ramowa"], "umowa, nie ramowa", False),
    ],
)
def test_keywords(keywords: list[str], text: str, hit: bool) -> None:
    rule = {"name": "r", "when": {"text": {"any": keywords}}, "then": {"queue": "q"}}
    assert (router(rule).route(mail(text), "support").queue == "q") is hit


def test_all_regex_header_sender_domain_mailbox_recipient_attachments() -> None:
    rule = {
        "name": "r",
        "when": {
            "subject": {"all": ["awaria", "serwer*"]},
            "body": {"regex": r"\bSRV-\d{3}\b"},
            "header": {"name": "X-Priority", "any": ["1"]},
            "sender_domain": ["klient.example"],
            "mailbox": ["support"],
            "recipient": ["support@helpdesk.example"],
            "has_attachments": False,
        },
        "then": {"queue": "ops", "priority": "P1"},
    }
    routed = router(rule).route(
        mail("Awaria serwera", "Dotyczy SRV-123.", sender="a@dzial.klient.example", headers="X-Priority: 1\n"),
        "support",
    )
    assert (routed.queue, routed.priority, routed.confidence) == ("ops", "P1", 1.0)
    assert router(rule).route(mail("Awaria serwera", "Dotyczy SRV-123."), "other").queue == "triage"


def test_first_queue_wins_later_matches_fill_in_and_conflicts_send_to_triage() -> None:
    rules = [
        {"name": "vip", "when": {"sender_domain": ["vip.example"]}, "then": {"priority": "P1", "tags": ["vip"]}},
        {"name": "billing", "when": {"text": {"any": ["faktur*"]}}, "then": {"queue": "accounting", "priority": "P3"}},
        {"name": "legal", "when": {"text": {"any": ["umow*"]}}, "then": {"queue": "legal"}},
    ]
    simple = router(*rules).route(mail("Faktura", sender="a@vip.example"), "support")
    assert (simple.queue, simple.priority, simple.tags, simple.triage_reason) == ("accounting", "P1", ("vip",), None)
    unsure = router(*rules).route(mail("Faktura niezgodna z umową"), "support")
    assert unsure.queue == "triage" and unsure.confidence == 0.5
    assert unsure.candidates == ("accounting", "legal")
    assert unsure.triage_reason is not None and "billing -> accounting; legal -> legal" in unsure.triage_reason


def test_a_rule_that_is_not_sure_or_asks_for_a_human() -> None:
    unsure = {"name": "maybe", "when": {"text": {"any": ["pomoc"]}}, "then": {"queue": "it"}, "confidence": 0.8}
    assert router(unsure).route(mail("Pomoc"), "s").queue == "triage"
    assert router(unsure, triage_threshold=0.7).route(mail("Pomoc"), "s").queue == "it"
    human = {"name": "complaint", "when": {"text": {"any": ["reklamac*"]}}, "then": {"triage": True}}
    decided = router(human).route(mail("Reklamacja"), "s")
    assert decided.queue == "triage" and "complaint asks for a human" in (decided.triage_reason or "")


def test_default_queue_and_no_rules() -> None:
    rule = {"name": "it", "when": {"text": {"any": ["vpn"]}}, "then": {"queue": "it"}}
    assert router(rule, default_queue="general").route(mail("Hello"), "s").queue == "general"
    assert router(rule).route(mail("Hello"), "s").triage_reason == "no routing rule decides this mail"
    assert Router(RoutingSettings()).route(mail("Hello"), "s").triage_reason is None


def test_a_bad_rule_stops_start_up_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "mailbridge.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "routing": {
                    "rules": [
                        {"name": "ok", "when": {"text": {"any": ["a"]}}, "then": {"queue": "q"}},
                        {"name": "broken", "when": {"text": {"regex": "(unclosed"}}, "then": {"queue": "q"}},
                    ]
                }
            }
        )
    )
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert "routing.rules[1] (broken).when.text" in str(error.value) and "not valid" in str(error.value)


def test_rules_test_over_the_labelled_fixtures() -> None:
    config = str(ROUTING / "mailbridge.yaml")
    result = runner.invoke(
        cli, ["rules", "test", str(ROUTING), "--expect", str(ROUTING / "labels.csv"), "--config", config]
    )
    assert result.exit_code == 0, result.output
    assert "12/12 routed as expected: accuracy 100.0%" in result.output
    explained = runner.invoke(cli, ["rules", "explain", str(ROUTING / "faktura_spor.eml"), "--config", config])
    assert "queue triage" in explained.output and "candidates: accounting, legal" in explained.output


def test_rules_test_reports_what_is_wrong(tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("file,expected_queue\nfaktura_spor.eml,accounting\nvpn_down.eml,it\n")
    config = str(ROUTING / "mailbridge.yaml")
    result = runner.invoke(cli, ["rules", "test", str(ROUTING), "--expect", str(labels), "--config", config, "--json"])
    assert result.exit_code == 1
    assert '"accuracy": 0.5' in result.output and '"got": "triage"' in result.output


async def test_new_tickets_are_routed_in_intake(tmp_path: Path) -> None:
    from sqlalchemy import select

    from mailbridge.models import Ticket
    from tests.imap_env import make_app

    app = make_app(
        tmp_path,
        [{"type": "maildir", "name": "support", "path": str(tmp_path / "md"), "acknowledge": False}],
        routing={"rules_file": str(ROUTING / "rules.yaml")},
    )
    try:
        summary = await app.ingest(
            [ROUTING / "faktura_korekta.eml", ROUTING / "faktura_spor.eml", ROUTING / "vpn_down.eml"], mailbox="support"
        )
        with app.db.reader() as session:
            tickets = {t.subject: t for t in session.scalars(select(Ticket))}
    finally:
        app.close()
    assert summary.stored == 3
    billing = tickets["Faktura nr 12/2026 – prośba o korektę"]
    assert (billing.queue, billing.priority, billing.tags, billing.triage_reason) == (
        "accounting",
        "P3",
        ["billing"],
        None,
    )
    exception = tickets["Faktura 45/2026"]
    assert exception.queue == "triage" and "candidates: accounting, legal" in (exception.triage_reason or "")
    assert tickets["VPN nie działa"].queue == "it"
