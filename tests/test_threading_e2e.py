"""Replies land on their ticket, whatever the mail client does; strangers never get into someone else's ticket.

Mail comes in through the real pipeline (`App.ingest` into a configured mailbox) and acknowledgements go
to a real SMTP server (aiosmtpd); replies are built from the acknowledgement the sink received, the way
Outlook, Gmail and Thunderbird build them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from mailbridge.app import App
from mailbridge.models import Ticket, TicketEvent
from tests.imap_env import articles, deliver, make_app, sample_mail, tickets
from tests.support.smtp_sink import Received, SmtpSink

SUPPORT = "support@helpdesk.example"
CUSTOMER = "anna.nowak@klient.example"
ATTACKER = "mallory@evil.example"


@pytest.fixture
def app(tmp_path: Path, sink: SmtpSink) -> Iterator[App]:
    application = make_app(
        tmp_path,
        [{"type": "maildir", "name": "support", "path": str(tmp_path / "md"), "address": SUPPORT}],
        smtp=sink.config(),
        outbox={"domain": "helpdesk.example", "first_retry_seconds": 0.2},
        threading={"trusted_authserv_ids": ["mx.helpdesk.example"]},
        agents=[{"address": "agent@helpdesk.example", "name": "Agata"}],
    )
    yield application
    application.close()


def reply(
    to: Received,
    body: str,
    *,
    sender: str = CUSTOMER,
    subject_prefix: str = "Re: ",
    in_reply_to: bool = True,
    references: bool = True,
    headers: str = "",
    subject: str | None = None,
) -> bytes:
    ack = to.message
    lines = [
        f"From: Anna Nowak <{sender}>",
        f"To: {SUPPORT}",
        f"Subject: {subject if subject is not None else subject_prefix + str(ack['Subject'])}",
        f"Message-ID: {make_msgid(domain='klient.example')}",
    ]
    if in_reply_to:
        lines.append(f"In-Reply-To: {ack['Message-ID']}")
    if references:
        lines.append(f"References: {ack.get('References', '')} {ack['Message-ID']}".replace("  ", " "))
    quoted = "\n".join("> " + line for line in (ack.get_body(("plain",)).get_content().splitlines()))  # type: ignore[union-attr]
    text = f"{body}\n\nOn Mon, 23 Nov 2026 at 10:00, Support <{SUPPORT}> wrote:\n{quoted}\n"
    return ("\r\n".join(lines) + "\r\n" + headers + "\r\n" + text.replace("\n", "\r\n")).encode()


def message_id_of(raw: bytes) -> str:
    return str(email_message(raw)["Message-ID"])


async def opened_ticket(app: App, tmp_path: Path, sink: SmtpSink) -> Received:
    await deliver(app, tmp_path, sample_mail("Drukarka nie drukuje", sender=CUSTOMER))
    [ack] = sink.received
    return ack


@pytest.mark.parametrize(
    ("client", "options"),
    [
        ("Outlook (RE:, In-Reply-To only)", {"subject_prefix": "RE: ", "references": False}),
        ("Gmail (Re:, References chain)", {}),
        ("Thunderbird, Polish (Odp:)", {"subject_prefix": "Odp: "}),
        ("German Outlook (AW:, [EXTERNAL] tag)", {"subject_prefix": "[EXTERNAL] AW: "}),
        ("Exchange Online (rewritten IDs, subject only)", {"in_reply_to": False, "references": False}),
        (
            "a gateway that drops the brackets (subject only)",
            {"in_reply_to": False, "references": False, "subject": "AW: MB-000001 Re: Drukarka nie drukuje"},
        ),
    ],
)
async def test_a_customer_reply_lands_on_the_same_ticket(
    app: App, tmp_path: Path, sink: SmtpSink, client: str, options: dict[str, Any]
) -> None:
    ack = await opened_ticket(app, tmp_path, sink)
    summary = await deliver(app, tmp_path, reply(ack, "Nadal nie działa, mimo restartu.", **options))
    assert summary["replies"] == 1 and summary["stored"] == 0, client
    [ticket] = tickets(app)
    _, second = articles(app, ticket.id)
    assert second.new_text == "Nadal nie działa, mimo restartu."
    assert "> " in second.text  # the whole mail is kept
    assert len(sink.received) == 1, "a reply gets no second acknowledgement"


async def test_sizes_and_counts_in_a_subject_are_not_ticket_references(
    app: App, tmp_path: Path, sink: SmtpSink
) -> None:
    """ "MB 2" in "Plik ma 25 MB 2 razy za duży" is a size, not ticket MB-000002: the new customer gets a
    ticket of their own and its acknowledgement, and ticket 2's customer does not land on ticket 2."""
    other = "jan.kowalski@firma.example"
    await deliver(app, tmp_path, sample_mail("Drukarka", sender=CUSTOMER), sample_mail("Skaner", sender=other))
    newcomer = "ewa@nowa.example"
    summary = await deliver(
        app,
        tmp_path,
        sample_mail("Plik ma 25 MB 2 razy za duży", sender=newcomer),
        sample_mail("Plik ma 25 MB 2 razy za duży", sender=other),
        sample_mail("mb-2 files missing, 10MB-3 too", sender=other),
    )
    assert summary["stored"] == 3 and summary["replies"] == 0
    _first, second, *new = tickets(app)
    assert len(articles(app, second.id)) == 1
    assert [(t.linked_ticket_id, t.triage_reason) for t in new] == [(None, None)] * 3
    assert any(newcomer in r.rcpt_tos for r in sink.received), "the new customer is acknowledged"


async def test_exchange_rewritten_in_reply_to_still_threads_by_the_customers_own_message_id(
    app: App, tmp_path: Path, sink: SmtpSink
) -> None:
    original = sample_mail("Faktura", sender=CUSTOMER, body="Proszę o korektę faktury 12/2026.")
    await deliver(app, tmp_path, original)
    own_id = message_id_of(original)
    follow_up = (
        f"From: Anna <{CUSTOMER}>\r\nTo: {SUPPORT}\r\nSubject: Faktura - uzupełnienie\r\n"
        f"Message-ID: {make_msgid(domain='klient.example')}\r\n"
        f"In-Reply-To: <AM6PR0502MB1234.rewritten@eurprd05.prod.outlook.com>\r\n"
        f"References: {own_id} <AM6PR0502MB1234.rewritten@eurprd05.prod.outlook.com>\r\n\r\nW załączeniu NIP.\r\n"
        "\r\n________________________________\r\nOd: Anna <anna.nowak@klient.example>\r\n"
        "Wysłano: poniedziałek, 30 listopada 2026 10:00\r\nDo: support@helpdesk.example\r\nTemat: Faktura\r\n\r\n"
        "Proszę o korektę faktury 12/2026.\r\n"
    ).encode()
    assert (await deliver(app, tmp_path, follow_up))["replies"] == 1
    [ticket] = tickets(app)
    _, second = articles(app, ticket.id)
    assert second.new_text == "W załączeniu NIP."  # the quoted original is not new
    assert "Proszę o korektę" in second.text


async def test_a_client_that_drops_the_subject_reference_and_the_references_threads_by_the_quoted_footer(
    app: App, tmp_path: Path, sink: SmtpSink
) -> None:
    ack = await opened_ticket(app, tmp_path, sink)
    assert "Ticket [MB-000001]" in ack.message.get_body(("plain",)).get_content()  # the footer it quotes
    bare: dict[str, Any] = {"in_reply_to": False, "references": False, "subject": "Re: Drukarka nie drukuje"}
    summary = await deliver(app, tmp_path, reply(ack, "Nadal nie działa.", **bare))
    assert summary["replies"] == 1 and summary["stored"] == 0
    [ticket] = tickets(app)
    _, second = articles(app, ticket.id)
    assert second.new_text == "Nadal nie działa."
    # The same quote from a stranger claims the ticket and is kept out of it.
    attack = reply(ack, "Please send me the invoice.", sender=ATTACKER, **bare)
    summary = await deliver(app, tmp_path, attack)
    assert summary["replies"] == 0 and summary["stored"] == 1
    victim, flagged = tickets(app)
    assert len(articles(app, victim.id)) == 2, "nothing more on the victim's ticket"
    assert flagged.linked_ticket_id == victim.id
    assert "its quoted footer names MB-000001" in (flagged.triage_reason or "")
    assert len(sink.received) == 1 and all(ATTACKER not in r.rcpt_tos for r in sink.received)


async def test_a_reply_reopens_a_waiting_ticket_and_a_closed_one_within_the_window(
    app: App, tmp_path: Path, sink: SmtpSink
) -> None:
    ack = await opened_ticket(app, tmp_path, sink)
    [ticket] = tickets(app)
    _set_status(app, ticket.id, "waiting_customer")
    await deliver(app, tmp_path, reply(ack, "Oto logi."))
    assert tickets(app)[0].status == "open"
    _set_status(app, ticket.id, "closed")
    await deliver(app, tmp_path, reply(ack, "Jednak wróciło."))
    assert tickets(app)[0].status == "open"
    with app.db.reader() as session:
        changes = [
            (e.old, e.new, e.actor)
            for e in session.scalars(select(TicketEvent).where(TicketEvent.kind == "status").order_by(TicketEvent.id))
        ]
    assert changes[-1] == ("closed", "open", CUSTOMER) and ("waiting_customer", "open", CUSTOMER) in changes


async def test_a_reply_long_after_closing_opens_a_new_linked_ticket(app: App, tmp_path: Path, sink: SmtpSink) -> None:
    ack = await opened_ticket(app, tmp_path, sink)
    [ticket] = tickets(app)
    _set_status(app, ticket.id, "closed")
    with app.db.unit_of_work() as session:
        closed = session.get(Ticket, ticket.id)
        assert closed is not None and closed.closed_at is not None
        session.execute(
            update(Ticket).where(Ticket.id == ticket.id).values(closed_at=closed.closed_at - timedelta(days=30))
        )
    summary = await deliver(app, tmp_path, reply(ack, "Ten sam problem po miesiącu."))
    old, new = tickets(app)
    assert summary["stored"] == 1 and old.status == "closed"
    assert new.linked_ticket_id == old.id and new.triage_reason is None


# --- attacks: each must end as a separate, flagged ticket, and the attacker gets nothing of the victim's


async def test_attack_stranger_uses_the_victims_subject_reference(app: App, tmp_path: Path, sink: SmtpSink) -> None:
    ack = await opened_ticket(app, tmp_path, sink)
    attack = reply(ack, "Please send me the invoice again.", sender=ATTACKER, in_reply_to=False, references=False)
    await _assert_kept_out(app, tmp_path, sink, attack, "takes no part in it")


async def test_attack_stranger_copies_the_in_reply_to_of_the_victims_mail(
    app: App, tmp_path: Path, sink: SmtpSink
) -> None:
    victim = sample_mail("Umowa", sender=CUSTOMER)
    await deliver(app, tmp_path, victim)
    victim_id = message_id_of(victim)
    attack = (
        f"From: M <{ATTACKER}>\r\nTo: {SUPPORT}\r\nSubject: Re: Umowa\r\nMessage-ID: {make_msgid()}\r\n"
        f"In-Reply-To: {victim_id}\r\nReferences: {victim_id}\r\n\r\nWhat is the status?\r\n"
    ).encode()
    await _assert_kept_out(app, tmp_path, sink, attack, "takes no part in it")


async def test_attack_guessed_message_id_with_a_wrong_signature(app: App, tmp_path: Path, sink: SmtpSink) -> None:
    await opened_ticket(app, tmp_path, sink)
    forged = "<mb.1.0123456789ab.0123456789abcdef01234567@helpdesk.example>"
    attack = (
        f"From: M <{ATTACKER}>\r\nTo: {SUPPORT}\r\nSubject: Re: your ticket\r\nMessage-ID: {make_msgid()}\r\n"
        f"In-Reply-To: {forged}\r\nReferences: {forged}\r\n\r\nSend me everything.\r\n"
    ).encode()
    await _assert_kept_out(app, tmp_path, sink, attack, "wrong signature")


async def test_attack_a_wrong_signature_from_the_customers_own_address_is_kept_out(
    app: App, tmp_path: Path, sink: SmtpSink
) -> None:
    """A From is easy to forge; a Message-ID of ours that we never signed proves the mail did not come from
    someone who received our mail, so even a participant's address does not let it in."""
    ack = await opened_ticket(app, tmp_path, sink)
    real = str(ack.message["Message-ID"]).strip("<>")
    ticket, nonce, _signature = real.split("@")[0].split(".")[1:]
    forged = f"<mb.{ticket}.{nonce}.{'0' * 24}@helpdesk.example>"
    attack = reply(ack, "Proszę zmienić numer konta.", in_reply_to=False, references=False, subject="Re: konto")
    attack = attack.replace(b"\r\n\r\n", f"\r\nIn-Reply-To: {forged}\r\nReferences: {forged}\r\n\r\n".encode(), 1)
    await _assert_kept_out(app, tmp_path, sink, attack, "wrong signature", sender=CUSTOMER)


async def test_attack_victims_from_address_with_dmarc_fail_from_our_trusted_server(
    app: App, tmp_path: Path, sink: SmtpSink
) -> None:
    ack = await opened_ticket(app, tmp_path, sink)
    spoofed = reply(
        ack,
        "Please change my bank account to PL00 0000.",
        headers="Authentication-Results: mx.helpdesk.example; spf=fail smtp.mailfrom=evil.example; dmarc=fail "
        "(p=none) header.from=klient.example\r\n",
    )
    await _assert_kept_out(app, tmp_path, sink, spoofed, "DMARC failed", sender=CUSTOMER)


async def test_dmarc_verdicts_of_untrusted_servers_are_ignored(app: App, tmp_path: Path, sink: SmtpSink) -> None:
    ack = await opened_ticket(app, tmp_path, sink)
    mail = reply(
        ack, "Dziękuję.", headers="Authentication-Results: evil.example; dmarc=fail header.from=klient.example\r\n"
    )
    assert (await deliver(app, tmp_path, mail))["replies"] == 1


async def _assert_kept_out(
    app: App, tmp_path: Path, sink: SmtpSink, attack: bytes, why: str, sender: str = ATTACKER
) -> None:
    before = len(sink.received)
    summary = await deliver(app, tmp_path, attack)
    assert summary["replies"] == 0 and summary["stored"] == 1
    victim, flagged = tickets(app)
    assert len(articles(app, victim.id)) == 1, "nothing was added to the victim's ticket"
    assert flagged.linked_ticket_id == victim.id
    assert flagged.triage_reason is not None and why in flagged.triage_reason
    assert len(sink.received) == before, "nothing is sent to the sender of a flagged mail"
    assert all(sender not in r.rcpt_tos for r in sink.received[before:])


def _set_status(app: App, ticket_id: int, status: str) -> None:
    from mailbridge.lifecycle import change_status
    from mailbridge.models import utcnow

    with app.db.unit_of_work() as session:
        ticket = session.get(Ticket, ticket_id)
        assert ticket is not None
        change_status(session, ticket, status, "agent@helpdesk.example", utcnow())


# --- agents work by e-mail

AGENT = "agent@helpdesk.example"


AGENT_PASSED_DMARC = (
    "Authentication-Results: mx.helpdesk.example; dkim=pass; spf=pass; dmarc=pass header.from=helpdesk.example"
)


def agent_mail(answering: bytes, body: str, *, subject: str | None = None, authenticated: bool = True) -> bytes:
    """An agent's reply to the customer's mail (from the shared mailbox), quoting it; checked by our MX."""
    original = email_message(answering)
    lines = [
        *([AGENT_PASSED_DMARC] if authenticated else []),
        f"From: Agata <{AGENT}>",
        f"To: {SUPPORT}",
        f"Subject: {subject if subject is not None else 'Re: ' + str(original['Subject'])}",
        f"Message-ID: {make_msgid(domain='helpdesk.example')}",
        f"In-Reply-To: {original['Message-ID']}",
        f"References: {original['Message-ID']}",
    ]
    quoted = "\n".join("> " + line for line in str(original.get_payload()).splitlines())
    text = f"{body}\n\nOn Mon, 23 Nov 2026, Anna Nowak <{CUSTOMER}> wrote:\n{quoted}\n"
    return ("\r\n".join(lines) + "\r\n\r\n" + text.replace("\n", "\r\n")).encode()


def email_message(raw: bytes) -> Any:
    import email

    return email.message_from_bytes(raw)


async def test_an_agents_reply_reaches_the_customer_and_the_customers_answer_comes_back(
    app: App, tmp_path: Path, sink: SmtpSink
) -> None:
    customer_mail = sample_mail("Drukarka nie drukuje", sender=CUSTOMER)
    await deliver(app, tmp_path, customer_mail)
    summary = await deliver(app, tmp_path, agent_mail(customer_mail, "Proszę wyłączyć i włączyć drukarkę."))
    assert summary["replies"] == 1
    _ack, relayed = sink.received
    message = relayed.message
    assert relayed.rcpt_tos == [CUSTOMER] and relayed.mail_from == SUPPORT
    assert message["From"].addresses[0].display_name == "Agata (Support)"
    assert message["From"].addresses[0].addr_spec == SUPPORT
    assert message["Subject"] == "[MB-000001] Re: Drukarka nie drukuje"
    assert message["In-Reply-To"] == email_message(customer_mail)["Message-ID"]
    assert "Auto-Submitted" not in message
    text = message.get_body(("plain",)).get_content()
    assert "Proszę wyłączyć i włączyć drukarkę." in text and "> " not in text  # the agent's quote is not sent
    [ticket] = tickets(app)
    assert ticket.status == "open" and ticket.first_response_at is not None
    assert [a.direction for a in articles(app, ticket.id)] == ["inbound", "outbound"]
    # The customer answers the relayed mail: proven by our signature, on the same ticket.
    back = await deliver(app, tmp_path, reply(relayed, "Pomogło, dziękuję!"))
    assert back["replies"] == 1 and len(tickets(app)) == 1


async def test_agent_commands_note_status_assign_priority(app: App, tmp_path: Path, sink: SmtpSink) -> None:
    customer_mail = sample_mail("Faktura", sender=CUSTOMER)
    await deliver(app, tmp_path, customer_mail)
    note = agent_mail(customer_mail, "#note\nKlient VIP, sprawdzić umowę.")
    await deliver(app, tmp_path, note)
    assert len(sink.received) == 1, "a note is never sent"
    await deliver(
        app,
        tmp_path,
        agent_mail(customer_mail, "#status waiting\n#assign agent@helpdesk.example\n#priority P2\nProszę o NIP."),
    )
    [ticket] = tickets(app)
    assert (ticket.status, ticket.owner, ticket.priority) == ("waiting_customer", AGENT, "P2")
    directions = [a.direction for a in articles(app, ticket.id)]
    assert directions == ["inbound", "note", "outbound"]
    relayed = sink.received[-1]
    text = relayed.message.get_body(("plain",)).get_content()
    assert "Proszę o NIP." in text and "#status" not in text and "#priority" not in text
    assert message_id_of(customer_mail) in relayed.message["References"]
    assert message_id_of(note) not in relayed.message["References"], "nothing of an internal note goes out"


async def test_an_unknown_assignee_is_refused_and_explained_to_the_agent(
    app: App, tmp_path: Path, sink: SmtpSink
) -> None:
    customer_mail = sample_mail("Faktura", sender=CUSTOMER)
    await deliver(app, tmp_path, customer_mail)
    await deliver(app, tmp_path, agent_mail(customer_mail, "#assign agata\nSprawdzam."))  # by name
    assert tickets(app)[0].owner == AGENT
    before = len(sink.received)
    await deliver(app, tmp_path, agent_mail(customer_mail, "#assign Agnieszka\nProszę o NIP."))
    [ticket] = tickets(app)
    assert ticket.owner == AGENT, "a name nobody has leaves the owner alone"
    new = sink.received[before:]
    explained = next(r for r in new if r.rcpt_tos == [AGENT])
    text = explained.message.get_body(("plain",)).get_content()
    assert "#assign agnieszka" in text and f"stays with {AGENT}" in text and "Agata <agent@helpdesk.example>" in text
    assert str(explained.message["Subject"]).startswith("[MB-000001] ")
    relayed = next(r for r in new if r.rcpt_tos == [CUSTOMER])  # the answer itself still goes out
    assert "Proszę o NIP." in relayed.message.get_body(("plain",)).get_content()


async def test_explanations_of_refused_commands_are_rate_limited_and_recorded(
    app: App, tmp_path: Path, sink: SmtpSink
) -> None:
    # An agent's script (or a loop) sending bad commands must not make us answer every mail: the
    # explanations count towards the per-address limit on automatic mails (3 an hour by default).
    customer_mail = sample_mail("Faktura", sender=CUSTOMER)
    await deliver(app, tmp_path, customer_mail)
    for n in range(4):
        await deliver(app, tmp_path, agent_mail(customer_mail, f"#assign Agnieszka\nOdpowiedź {n}."))
    explanations = [r for r in sink.received if r.rcpt_tos == [AGENT]]
    relayed = [
        r
        for r in sink.received
        if r.rcpt_tos == [CUSTOMER] and "Odpowiedź" in r.message.get_body(("plain",)).get_content()
    ]
    assert len(explanations) == 3 and len(relayed) == 4  # the answers themselves are never held back
    [ticket] = tickets(app)
    with app.db.reader() as session:
        refused = list(
            session.scalars(
                select(TicketEvent.new)
                .where(TicketEvent.ticket_id == ticket.id, TicketEvent.kind == "commands_refused")
                .order_by(TicketEvent.id)
            )
        )
    assert len(refused) == 4 and all("#assign agnieszka" in (r or "") for r in refused)
    assert all(f"(explained to {AGENT})" in (r or "") for r in refused[:3])
    assert f"no explanation sent: rate limit: 3 automatic mails to {AGENT} in the last hour" in (refused[3] or "")


async def test_an_agent_mail_that_answers_no_ticket_is_kept_and_explained(
    app: App, tmp_path: Path, sink: SmtpSink
) -> None:
    lonely = (
        f"{AGENT_PASSED_DMARC}\r\nFrom: Agata <{AGENT}>\r\nTo: {SUPPORT}\r\nSubject: Pytanie\r\n"
        f"Message-ID: {make_msgid()}\r\n\r\nHej\r\n"
    ).encode()
    summary = await deliver(app, tmp_path, lonely)
    assert summary == {"read": 1, "stored": 0, "replies": 0, "duplicates": 0, "quarantined": 1}
    assert tickets(app) == []
    [bounce_back] = sink.received
    assert bounce_back.rcpt_tos == [AGENT] and "Pytanie" in str(bounce_back.message["Subject"])


async def test_triage_merge_and_status_from_the_cli(app: App, tmp_path: Path, sink: SmtpSink) -> None:
    """A stranger's follow-up is flagged; the admin finds it is the customer's colleague and merges it."""
    from typer.testing import CliRunner

    from mailbridge.cli import app as cli

    ack = await opened_ticket(app, tmp_path, sink)
    await deliver(
        app,
        tmp_path,
        reply(ack, "Piszę z drugiego adresu.", sender="anna@prywatny.example", references=False, in_reply_to=False),
    )
    victim, flagged = tickets(app)
    assert flagged.triage_reason is not None
    config = str(tmp_path / "mailbridge.yaml")
    runner = CliRunner()
    merged = runner.invoke(cli, ["tickets", "merge", victim.number or "", flagged.number or "", "--config", config])
    assert merged.exit_code == 0, merged.output
    status = runner.invoke(cli, ["tickets", "status", victim.number or "", "waiting", "--config", config])
    assert status.exit_code == 0 and "new -> waiting_customer" in status.output
    first, second = tickets(app)
    assert len(articles(app, first.id)) == 2 and articles(app, second.id) == []
    assert (second.status, second.linked_ticket_id, second.triage_reason) == ("closed", first.id, None)
    assert first.status == "waiting_customer"
    # The second address now takes part: its next mail with the subject reference lands on the ticket.
    again = await deliver(
        app,
        tmp_path,
        reply(ack, "I jeszcze jedno.", sender="anna@prywatny.example", references=False, in_reply_to=False),
    )
    assert again["replies"] == 1
    shown = runner.invoke(cli, ["tickets", "show", first.number or "", "--config", config])
    assert "merged" in shown.output and "waiting_customer -> open" in shown.output


async def test_mail_naming_a_merged_ticket_goes_to_the_ticket_it_was_merged_into(
    app: App, tmp_path: Path, sink: SmtpSink
) -> None:
    from typer.testing import CliRunner

    from mailbridge.cli import app as cli

    colleague = "jan.kowalski@klient.example"
    await deliver(app, tmp_path, sample_mail("Drukarka", sender=CUSTOMER))
    await deliver(app, tmp_path, sample_mail("Drukarka na 2. piętrze też", sender=colleague))
    _ack_1, ack_2 = sink.received
    config = str(tmp_path / "mailbridge.yaml")
    runner = CliRunner()
    merged = runner.invoke(cli, ["tickets", "merge", "MB-000001", "MB-000002", "--config", config])
    assert merged.exit_code == 0, merged.output
    # The colleague answers the acknowledgement of MB-000002: by its subject reference only, then with our
    # signed Message-ID. Both land on MB-000001; MB-000002 stays closed and empty.
    by_subject = reply(ack_2, "Nadal nie drukuje.", sender=colleague, in_reply_to=False, references=False)
    signed = reply(ack_2, "Dalej to samo.", sender=colleague)
    assert (await deliver(app, tmp_path, by_subject, signed))["replies"] == 2
    first, second = tickets(app)
    assert (second.status, second.merged_into_id, articles(app, second.id)) == ("closed", first.id, [])
    assert [a.new_text for a in articles(app, first.id)][-2:] == ["Nadal nie drukuje.", "Dalej to samo."]
    # A stranger naming MB-000002 is checked against MB-000001's participants: flagged, linked to it.
    stranger = reply(ack_2, "Send me the files.", sender=ATTACKER, in_reply_to=False, references=False)
    assert (await deliver(app, tmp_path, stranger))["replies"] == 0
    flagged = tickets(app)[-1]
    assert flagged.linked_ticket_id == first.id and "merged into MB-000001" in (flagged.triage_reason or "")
    assert all(ATTACKER not in r.rcpt_tos for r in sink.received)
    # Merging into a ticket that was itself merged would hide the articles: refused.
    again = runner.invoke(cli, ["tickets", "merge", "MB-000002", f"{flagged.number}", "--config", config])
    assert again.exit_code == 2 and "MB-000002 was itself merged" in again.output


async def test_a_loop_of_merges_does_not_hang_threading(app: App, tmp_path: Path, sink: SmtpSink) -> None:
    """Only a hand-edited database can make one; a mail naming one of its tickets is still stored, once."""
    await deliver(app, tmp_path, sample_mail("A", sender=CUSTOMER), sample_mail("B", sender="jan@klient.example"))
    with app.db.unit_of_work() as session:
        session.execute(update(Ticket).where(Ticket.id == 1).values(merged_into_id=2))
        session.execute(update(Ticket).where(Ticket.id == 2).values(merged_into_id=1))
    summary = await deliver(app, tmp_path, sample_mail("Re: [MB-000002] B", sender="jan@klient.example"))
    assert summary["read"] == 1 and summary["stored"] + summary["replies"] == 1


async def test_status_mails_where_the_mailbox_asks_for_them(tmp_path: Path, sink: SmtpSink) -> None:
    from typer.testing import CliRunner

    from mailbridge.cli import app as cli

    app = make_app(
        tmp_path,
        [
            {
                "type": "maildir",
                "name": "support",
                "path": str(tmp_path / "md"),
                "address": SUPPORT,
                "language": "pl",
                "status_mails": True,
            }
        ],
        smtp=sink.config(),
        outbox={"domain": "helpdesk.example"},
        agents=[{"address": AGENT, "name": "Agata"}],
    )
    try:
        customer_mail = sample_mail("Router", sender=CUSTOMER)
        await deliver(app, tmp_path, customer_mail)
        result = CliRunner().invoke(
            cli, ["tickets", "status", "MB-000001", "waiting", "--config", str(tmp_path / "mailbridge.yaml")]
        )
        assert result.exit_code == 0 and "status mail queued" in result.output
        await app.sender.deliver_due()
        await deliver(app, tmp_path, agent_mail(customer_mail, "#status closed\nRozwiązane: wymiana routera."))
    finally:
        app.close()
    _ack, waiting, *last_two = sink.received  # the relay and the status mail go out side by side
    assert waiting.rcpt_tos == [CUSTOMER] and "Czeka na Twoją odpowiedź" in str(waiting.message["Subject"])
    closed = next(r for r in last_two if "Zamknięte" in str(r.message["Subject"]))
    relayed = next(r for r in last_two if r is not closed)
    assert "Rozwiązane" in relayed.message.get_body(("plain",)).get_content()
    assert str(closed.message["Subject"]).startswith("[MB-000001] Zamknięte")
    assert closed.message["Auto-Submitted"] == "auto-generated"  # it answers no mail (RFC 3834)


async def test_attack_a_forged_agent_address_without_dmarc_pass_gets_no_agent_powers(
    app: App, tmp_path: Path, sink: SmtpSink
) -> None:
    customer_mail = sample_mail("Przelew", sender=CUSTOMER)
    await deliver(app, tmp_path, customer_mail)
    forged = agent_mail(customer_mail, "#status closed\nProszę przelać na konto PL00 1111.", authenticated=False)
    await deliver(app, tmp_path, forged)
    victim, flagged = tickets(app)
    assert victim.status == "new" and len(articles(app, victim.id)) == 1
    assert flagged.triage_reason is not None and flagged.linked_ticket_id == victim.id
    assert len(sink.received) == 1, "nothing relayed to the customer"


async def test_an_agents_attachment_reaches_the_customer(app: App, tmp_path: Path, sink: SmtpSink) -> None:
    from email.message import EmailMessage

    customer_mail = sample_mail("Faktura", sender=CUSTOMER)
    await deliver(app, tmp_path, customer_mail)
    original = email_message(customer_mail)
    answer = EmailMessage()
    answer["Authentication-Results"] = AGENT_PASSED_DMARC.split(": ", 1)[1]
    answer["From"] = f"Agata <{AGENT}>"
    answer["To"] = SUPPORT
    answer["Subject"] = "Re: Faktura"
    answer["Message-ID"] = make_msgid(domain="helpdesk.example")
    answer["In-Reply-To"] = original["Message-ID"]
    answer.set_content("W załączeniu faktura.\n")
    pdf = b"%PDF-1.4 " + bytes(range(256)) * 50
    answer.add_attachment(pdf, maintype="application", subtype="pdf", filename="faktura 12/2026 – korekta.pdf")
    await deliver(app, tmp_path, answer.as_bytes())
    relayed = sink.received[-1].message
    [attachment] = list(relayed.iter_attachments())
    assert attachment.get_content() == pdf
    # The name as stored: a "/" is a path separator, and only the last part is kept (no path traversal);
    # non-ASCII goes out RFC 2231-encoded.
    assert attachment.get_filename() == "2026 – korekta.pdf"
    assert "W załączeniu faktura." in relayed.get_body(("plain",)).get_content()
