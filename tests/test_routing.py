"""Routing rules: the rule language, confidence and triage, the rules commands, and routing in intake."""

from __future__ import annotations

import pickle
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mailbridge.cli import app as cli
from mailbridge.config import ConfigError, load_settings
from mailbridge.ingest.parse import parse
from mailbridge.routing import Router, fold, words
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


def test_words_fold_character_by_character_as_the_whole_text_would() -> None:
    # words() folds each character on its own (a cached table); fold() normalises the whole text at once.
    # Every character of the planes that have decompositions, side by side and between combining marks:
    every = [chr(c) for c in (*range(0x20000), *range(0x2F800, 0x2FA20)) if not 0xD800 <= c < 0xE000]
    for start in range(0, len(every), 4096):
        chunk = every[start : start + 4096]
        for text in ("".join(chunk), "\u0301".join(chunk)):
            assert words(text) == re.findall(r"\w+", fold(text))
    assert words("ﬁle ½ Ǆ İstanbul СЧЁТ") == re.findall(r"\w+", fold("ﬁle ½ Ǆ İstanbul СЧЁТ"))


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
        # Without letters or digits: as written, anywhere (no word boundaries), white space as any.
        (["!!!"], "Pilne!!!!", True),
        (["!!!"], "Pilne! ! !", False),
        ([":-("], "drukarka nie działa :-(", True),
        (["?? !!"], "co??\n!!", True),
        (["!!!*"], "Pilne!!!", True),
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


def test_the_workers_decision_without_explanations_is_the_explained_one() -> None:
    # The parser workers skip the reasons (`explain=False`) and, for a rule that asks for nothing but one of
    # some words, trust the word index; every kind of condition must decide the same either way.
    rules = [
        {"name": "words", "when": {"text": {"any": ["faktur*", "invoice", "vpn"]}}, "then": {"queue": "a"}},
        {"name": "phrase", "when": {"body": {"any": ["umowa ramowa", "rachunek*"]}}, "then": {"queue": "b"}},
        {"name": "both", "when": {"subject": {"any": ["awari*"], "all": ["serwer*"]}}, "then": {"priority": "P1"}},
        {"name": "pair", "when": {"text": {"all": ["faktur*", "korekt*"]}}, "then": {"tags": ["fix"]}},
        {"name": "pattern", "when": {"text": {"any": ["srv"], "regex": r"\bSRV-\d{3}\b"}}, "then": {"tags": ["s"]}},
        {"name": "header", "when": {"header": {"name": "X-Priority", "any": ["1"]}}, "then": {"priority": "P2"}},
        {"name": "vip", "when": {"text": {"any": ["pilne"]}, "sender_domain": ["vip.example"]}, "then": {"owner": "o"}},
        {"name": "sender", "when": {"sender": ["Jan@Klient.example"]}, "then": {"tags": ["jan"]}},
        {
            "name": "channel",
            "when": {"mailbox": ["sales"], "recipient": ["SALES@helpdesk.example"]},
            "then": {"queue": "c"},
        },
        {"name": "files", "when": {"text": {"any": ["skan"]}, "has_attachments": True}, "then": {"queue": "d"}},
        {"name": "human", "when": {"text": {"any": ["reklamac*"]}}, "then": {"triage": True}, "confidence": 0.8},
    ]
    mails = [
        mail("Faktura 12/2026"),
        mail("Faktura 13/2026", "prośba o korektę"),
        mail("Awaria serwera", "Dotyczy SRV-123, pilne.", sender="a@dzial.vip.example", headers="X-Priority: 1\n"),
        mail("Awaria", "srv bez numeru; nasza umowa ramowa"),
        mail("Re: skan", "Reklamacja, w załączeniu skan", sender="Jan@klient.example"),
        mail("Pytanie", "rachunki za VPN", sender="x@sales.example"),
        mail("Nic", "zupełnie nic"),
    ]
    routing = router(*rules, default_queue="general")
    # What a parser worker routes with: the rules compiled by the daemon, without the settings (pickled).
    worker = Router(pickle.loads(pickle.dumps(routing.rule_set.for_workers())))
    for routed in mails:
        for mailbox in ("support", "sales"):
            explained = routing.by_rules(routed, mailbox)
            assert routing.by_rules(routed, mailbox, explain=False) == replace(explained, matched=())
            assert worker.by_rules(routed, mailbox, explain=False) == replace(explained, matched=())
    assert {m.rule.name for m in routing.by_rules(mails[2], "support").matched} == {"both", "pattern", "header", "vip"}
    assert {m.rule.name for m in routing.by_rules(mails[1], "support").matched} == {"words", "pair", "sender"}


def test_the_gates_decide_the_same_with_their_words_remembered_or_not() -> None:
    # The gates remember what each word picks; a word seen before, one seen first, and one the full memory
    # no longer keeps must pick the same rules.
    rules = [
        {"name": "exact", "when": {"text": {"any": ["faktura", "umowa ramowa"]}}, "then": {"queue": "a"}},
        {"name": "beginning", "when": {"text": {"any": ["faktur*", "rachun*"]}}, "then": {"queue": "b"}},
        {"name": "short", "when": {"subject": {"any": ["vpn*"]}}, "then": {"tags": ["net"]}},
        {"name": "all", "when": {"body": {"all": ["serwer*", "awaria"]}}, "then": {"priority": "P1"}},
    ]
    mails = [
        mail("Faktura 12/2026", "rachunki i faktury"),
        mail("VPNy nie działają", "awaria, serwery stoją; umowa ramowa"),
        mail("fakturowanie", "nic innego"),
        mail("Pytanie", "zupełnie nic"),
    ]
    fresh = [router(*rules, default_queue="general").by_rules(m, "support", explain=False) for m in mails]
    remembering = router(*rules, default_queue="general")
    forgetting = router(*rules, default_queue="general")
    forgetting._gates.SEEN_LIMIT = 3
    for _ in range(2):  # the second time round, the words are remembered (as far as the limit lets them)
        assert [remembering.by_rules(m, "support", explain=False) for m in mails] == fresh
        assert [forgetting.by_rules(m, "support", explain=False) for m in mails] == fresh
    assert len(forgetting._gates._seen["text"]) == 3
    assert [d.queue for d in fresh] == ["triage", "a", "b", "general"]
    assert [d.rule_names for d in fresh] == [("exact", "beginning"), ("exact", "short", "all"), ("beginning",), ()]


def test_a_remembered_decision_is_the_one_the_rules_make() -> None:
    # The parser workers remember the decision for each set of rules that hold; mail matching the same rules
    # gets the same decision, other mail its own, and a full memory changes nothing but the work.
    rules = [
        {"name": "billing", "when": {"text": {"any": ["faktur*"]}}, "then": {"queue": "billing", "tags": ["b"]}},
        {"name": "network", "when": {"text": {"any": ["vpn"]}}, "then": {"queue": "network"}},
        {"name": "urgent", "when": {"subject": {"any": ["pilne"]}}, "then": {"priority": "P1"}},
        {"name": "vip", "when": {"sender_domain": ["vip.example"]}, "then": {"owner": "o@helpdesk.example"}},
    ]
    mails = [
        mail("Faktura 12/2026", "prośba o korektę"),
        mail("Pilne: VPN", "nie działa VPN", sender="a@vip.example"),
        mail("Druga faktura", "i jeszcze faktury"),  # the same rule as the first: its decision again
        mail("VPN i faktura", "pilne"),  # two queues: triage
        mail("Pilne: VPN", "nie działa VPN"),  # as the second, but not from vip.example
        mail("Nic", "zupełnie nic"),
    ]
    explained = [replace(router(*rules, default_queue="general").by_rules(m, "support"), matched=()) for m in mails]
    remembering = router(*rules, default_queue="general")
    forgetting = router(*rules, default_queue="general")
    forgetting.DECISIONS_LIMIT = 2
    for _ in range(2):
        assert [remembering.by_rules(m, "support", explain=False) for m in mails] == explained
        assert [forgetting.by_rules(m, "support", explain=False) for m in mails] == explained
    assert len(remembering._decisions) == 5 and len(forgetting._decisions) == 2
    again = remembering.by_rules(mails[2], "support", explain=False)
    assert again is remembering.by_rules(mails[0], "support", explain=False)
    assert [d.queue for d in explained] == ["billing", "network", "billing", "triage", "network", "general"]
    assert explained[1].owner == "o@helpdesk.example" and explained[4].owner is None


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


def test_a_keyword_without_letters_starts_up_and_is_explained(tmp_path: Path) -> None:
    # It used to pass validation and then crash start-up (an IndexError compiling the rules).
    rules = [
        {"name": "loud", "when": {"subject": {"any": ["!!!"]}}, "then": {"queue": "urgent"}},
        {"name": "sad", "when": {"text": {"all": [":-(", "drukar*"]}}, "then": {"tags": ["sad"]}},
    ]
    config = tmp_path / "mailbridge.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "routing": {"rules": rules}}))
    eml = tmp_path / "loud.eml"
    eml.write_bytes(b"From: jan@klient.example\nSubject: Drukarka!!!\n\nNie drukuje :-(\n")
    explained = runner.invoke(cli, ["rules", "explain", str(eml), "--config", str(config)])
    assert explained.exit_code == 0, explained.output
    assert "queue urgent" in explained.output
    assert 'subject has "!!!"' in explained.output and 'text has ":-(", "drukar*"' in explained.output


@pytest.mark.parametrize("keyword", ["\t", "\u0301", " * "])
def test_a_keyword_with_nothing_to_look_for_stops_start_up_with_its_rule(tmp_path: Path, keyword: str) -> None:
    path = tmp_path / "mailbridge.yaml"
    rule = {"name": "accents", "when": {"body": {"any": ["ok", keyword]}}, "then": {"queue": "q"}}
    path.write_text(yaml.safe_dump({"routing": {"rules": [rule]}}))
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert "routing.rules[0] (accents).when.body" in str(error.value)
    assert "nothing to look for" in str(error.value) or "cannot be empty" in str(error.value)


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


def test_customer_directory_yaml_and_csv(tmp_path: Path) -> None:
    from mailbridge.customers import CustomerDirectory, DirectoryError

    yaml_file = tmp_path / "customers.yaml"
    yaml_file.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Northwind",
                    "domains": ["northwind.example"],
                    "tier": "Enterprise",
                    "account_manager": "Ola@Helpdesk.example",
                },
                {"name": "Jan (freelancer)", "addresses": ["jan@gmail.example"], "tier": "standard"},
            ]
        )
    )
    directory = CustomerDirectory.load(yaml_file)
    assert directory.find("Anna@Northwind.example").name == "Northwind"  # type: ignore[union-attr]
    assert directory.find("x@mail.eu.northwind.example").tier == "enterprise"  # type: ignore[union-attr]
    assert directory.find("jan@gmail.example").name == "Jan (freelancer)"  # type: ignore[union-attr]
    assert directory.find("other@gmail.example") is None
    csv_file = tmp_path / "customers.csv"
    csv_file.write_text(
        "name,domains,addresses,tier,account_manager\nFabrikam,fabrikam.example; fab.example,,enterprise,\n"
    )
    assert CustomerDirectory.load(csv_file).find("a@fab.example").name == "Fabrikam"  # type: ignore[union-attr]
    broken = tmp_path / "broken.csv"
    broken.write_text("name,domains,addresses,tier,account_manager\nNoDomains,,,standard,\n")
    with pytest.raises(DirectoryError, match="entry 1 \\(NoDomains\\) has no domains and no addresses"):
        CustomerDirectory.load(broken)


def test_customer_directory_csv_columns_in_any_order_quoted_short_and_blank_rows(tmp_path: Path) -> None:
    from mailbridge.customers import CustomerDirectory, DirectoryError

    csv_file = tmp_path / "customers.csv"
    csv_file.write_text(
        "tier,name,domains,addresses,account_manager,notes\n"
        "\n"
        '"Enterprise ","Contoso, Ltd.","contoso.example; CONTOSO.example.org",,Ola@Helpdesk.example,vip,more\n'
        "standard,Short Row,short.example\n"
        ",Jan,,Jan@Gmail.example\n"
    )
    directory = CustomerDirectory.load(csv_file)
    contoso = directory.find("a@mail.contoso.example.org")
    assert contoso is not None and (contoso.name, contoso.tier, contoso.account_manager) == (
        "Contoso, Ltd.",
        "enterprise",
        "ola@helpdesk.example",
    )
    assert directory.find("b@contoso.example") is contoso
    short = directory.find("x@short.example")
    assert short is not None and (short.name, short.tier, short.account_manager) == ("Short Row", "standard", None)
    jan = directory.find("jan@gmail.example")
    assert jan is not None and (jan.name, jan.tier) == ("Jan", None)
    assert (len(directory), directory.find("other@gmail.example")) == (3, None)
    no_name = tmp_path / "no-name.csv"
    no_name.write_text("name,domains\nFirst,first.example\n\n,second.example\n")
    with pytest.raises(DirectoryError, match="entry 2 has no name"):  # blank lines are not entries
        CustomerDirectory.load(no_name)


def test_an_enterprise_customer_gets_p1_and_its_account_manager(tmp_path: Path) -> None:
    from mailbridge.customers import CustomerDirectory

    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Northwind",
                    "domains": ["northwind.example"],
                    "tier": "enterprise",
                    "account_manager": "ola@helpdesk.example",
                }
            ]
        )
    )
    rules = [
        {
            "name": "billing",
            "when": {"text": {"any": ["faktur*", "invoice*"]}},
            "then": {"queue": "accounting", "priority": "P3"},
        }
    ]
    routing = RoutingSettings.model_validate({"rules": rules})
    routed = Router(routing, CustomerDirectory.load(tmp_path / "c.yaml")).route(
        mail("Invoice question", sender="cfo@northwind.example"), "support"
    )
    assert (routed.queue, routed.priority, routed.owner) == ("accounting", "P1", "ola@helpdesk.example")
    other = Router(routing, CustomerDirectory.load(tmp_path / "c.yaml")).route(mail("Invoice question"), "support")
    assert (other.priority, other.owner, other.organisation) == ("P3", None, None)


@pytest.mark.parametrize(
    ("strategy", "expected"), [("round_robin", ["a", "b", "a", "b"]), ("least_open", ["b", "b", "a", "b"])]
)
async def test_assignment_among_the_queues_agents(tmp_path: Path, strategy: str, expected: list[str]) -> None:
    from sqlalchemy import select

    from mailbridge.models import Ticket
    from tests.imap_env import make_app, sample_mail

    app = make_app(
        tmp_path,
        [{"type": "maildir", "name": "support", "path": str(tmp_path / "md"), "acknowledge": False}],
        agents=[
            {"address": "a@helpdesk.example", "queues": ["it"]},
            {"address": "b@helpdesk.example", "queues": ["it"]},
            {"address": "c@helpdesk.example", "queues": ["accounting"]},
        ],
        routing={
            "rules": [{"name": "it", "when": {"text": {"any": ["vpn"]}}, "then": {"queue": "it"}}],
            "assignment": {"strategy": strategy},
        },
    )
    try:
        if strategy == "least_open":  # a already has two open tickets
            with app.db.unit_of_work() as session:
                seed = _contact(session)
                session.add_all(
                    [
                        Ticket(
                            number=f"X-{n}", customer_id=seed, mailbox="support", queue="it", owner="a@helpdesk.example"
                        )
                        for n in (1, 2)
                    ]
                )
        folder = tmp_path / "in"
        folder.mkdir()
        for n in range(4):
            (folder / f"{n}.eml").write_bytes(sample_mail(f"VPN {n}", sender=f"user{n}@klient.example"))
        await app.ingest([folder], mailbox="support")
        with app.db.reader() as session:
            owners = [
                t.owner for t in session.scalars(select(Ticket).where(Ticket.number.like("MB-%")).order_by(Ticket.id))
            ]
    finally:
        app.close()
    assert owners == [f"{x}@helpdesk.example" for x in expected]


def _contact(session: Any) -> int:
    from mailbridge.models import Contact

    contact = Contact(address="seed@klient.example", name="")
    session.add(contact)
    session.flush()
    return contact.id


def test_an_unreadable_customer_directory_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "mailbridge.yaml"
    path.write_text(
        yaml.safe_dump({"data_dir": str(tmp_path / "d"), "routing": {"customers": {"directory": "missing.csv"}}})
    )
    result = runner.invoke(cli, ["db", "upgrade", "--config", str(path)])
    assert result.exit_code == 2 and "missing.csv: cannot read the customer directory" in result.output
