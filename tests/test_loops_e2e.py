"""No mail loops through people either: an agent's out-of-office is not an agent's answer, and a customer's
out-of-office does not reopen a ticket. Mail comes in through the real pipeline (`App.ingest` into a
configured mailbox), our mails go to a real SMTP server (aiosmtpd) on 127.0.0.1, and the automatic replies
are built from what the sink received."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from email.utils import make_msgid
from pathlib import Path

import pytest
from sqlalchemy import select

from mailbridge.app import App
from mailbridge.lifecycle import change_status
from mailbridge.models import OutboxMail, QuarantinedMail, Ticket, utcnow
from tests.imap_env import articles, deliver, history, make_app, sample_mail, tickets
from tests.support.smtp_sink import Received, SmtpSink
from tests.test_threading_e2e import reply

SUPPORT = "support@helpdesk.example"
CUSTOMER = "anna.nowak@klient.example"
AGENT = "agata@helpdesk.example"
FIRST_RESPONSE_SECONDS = 1


@pytest.fixture
def app(tmp_path: Path, sink: SmtpSink) -> Iterator[App]:
    application = make_app(
        tmp_path,
        [{"type": "maildir", "name": "support", "path": str(tmp_path / "md"), "address": SUPPORT}],
        smtp=sink.config(),
        outbox={"domain": "helpdesk.example", "first_retry_seconds": 0.2},
        agents=[{"address": AGENT, "name": "Agata", "queues": ["general"]}],
        routing={"default_queue": "general"},
        sla={"policies": {"P3": {"first_response": f"{FIRST_RESPONSE_SECONDS}s", "business_hours": False}}},
    )
    yield application
    application.close()


def out_of_office(sender: str, answering: Received | None, body: str = "I am out of the office until Monday.") -> bytes:
    """What Exchange sends back (RFC 3834 headers), in reply to `answering` (or to nothing we know)."""
    subject = f"Automatic reply: {answering.message['Subject']}" if answering else "Automatic reply: Holiday"
    threading = (
        f"In-Reply-To: <{answering.message_id}>\r\nReferences: <{answering.message_id}>\r\n" if answering else ""
    )
    return (
        f"From: Someone <{sender}>\r\nTo: {SUPPORT}\r\nSubject: {subject}\r\n"
        f"Message-ID: {make_msgid(domain='responder.example')}\r\n{threading}"
        "Auto-Submitted: auto-replied\r\nX-Auto-Response-Suppress: All\r\n\r\n"
        f"{body}\r\n"
    ).encode()


async def sla_reminder(app: App, sink: SmtpSink) -> Received:
    """Let the ticket's first-response clock run past 75 % and have the SLA check mail the agent."""
    await asyncio.sleep(FIRST_RESPONSE_SECONDS)
    report = await app.check_sla()
    assert report.mails >= 1
    await app.sender.deliver_due()
    reminder = next(r for r in sink.received if r.rcpt_tos == [AGENT])
    assert reminder.message["Auto-Submitted"] == "auto-generated"
    return reminder


@pytest.mark.parametrize("answering", ["sla_reminder", "acknowledgement"])
async def test_an_agents_out_of_office_is_kept_on_the_ticket_and_relayed_to_nobody(
    app: App, tmp_path: Path, sink: SmtpSink, answering: str
) -> None:
    await deliver(app, tmp_path, sample_mail("Drukarka nie drukuje", sender=CUSTOMER))
    [ack] = sink.received
    ours = await sla_reminder(app, sink) if answering == "sla_reminder" else ack
    sent_before = len(sink.received)
    [ticket] = tickets(app)
    events_before = history(app, ticket.id)
    # An autoresponder that quotes the mail: a "#status closed" at the top must not act as a command either.
    summary = await deliver(app, tmp_path, out_of_office(AGENT, ours, body="#status closed\nBack on Monday."))
    assert summary["replies"] == 1 and summary["quarantined"] == 0
    [after] = tickets(app)
    assert after.status == ticket.status == "new"
    assert after.first_response_at is None
    assert len(sink.received) == sent_before, "nothing is sent to the customer (or anyone) for an out-of-office"
    assert all(CUSTOMER not in r.rcpt_tos for r in sink.received[1:])
    with app.db.reader() as session:
        relayed = session.scalars(select(OutboxMail).where(OutboxMail.template == "agent_reply")).all()
    assert relayed == []
    *_, oof = articles(app, ticket.id)
    assert (oof.kind, oof.direction) == ("auto_reply", "inbound")
    assert oof.no_answer_reason == "Auto-Submitted: auto-replied"
    new_events = history(app, ticket.id)[len(events_before) :]
    assert [kind for kind, _, _ in new_events] == ["reply"], "no status change, no first response"


async def test_an_agents_out_of_office_that_answers_no_ticket_is_kept_without_an_explanation(
    app: App, tmp_path: Path, sink: SmtpSink
) -> None:
    summary = await deliver(app, tmp_path, out_of_office(AGENT, None))
    assert summary["quarantined"] == 1 and tickets(app) == []
    assert sink.received == [], "an explanation to an autoresponder would be answered again"
    with app.db.reader() as session:
        [kept] = session.scalars(select(QuarantinedMail)).all()
    assert kept.reason.startswith("an agent's automatic mail (Auto-Submitted: auto-replied)")


async def test_explanations_to_an_agent_respect_the_rate_limit(app: App, tmp_path: Path, sink: SmtpSink) -> None:
    lonely = [
        f"From: Agata <{AGENT}>\r\nTo: {SUPPORT}\r\nSubject: Pytanie {n}\r\nMessage-ID: {make_msgid()}\r\n\r\nHej\r\n"
        for n in range(5)
    ]
    await deliver(app, tmp_path, *(m.encode() for m in lonely[:2]))
    await deliver(app, tmp_path, *(m.encode() for m in lonely[2:]))
    assert [r.rcpt_tos for r in sink.received] == [[AGENT]] * 3  # per_hour: 3 by default
    with app.db.reader() as session:
        reasons = [q.reason for q in session.scalars(select(QuarantinedMail).order_by(QuarantinedMail.id))]
    assert len(reasons) == 5
    assert all("rate limit: 3 automatic mails to agata@helpdesk.example" in r for r in reasons[3:])


@pytest.mark.parametrize("status", ["waiting_customer", "waiting_third_party", "closed"])
async def test_a_customers_out_of_office_does_not_reopen_a_waiting_or_closed_ticket(
    app: App, tmp_path: Path, sink: SmtpSink, status: str
) -> None:
    await deliver(app, tmp_path, sample_mail("Faktura", sender=CUSTOMER))
    [ack] = sink.received
    [ticket] = tickets(app)
    with app.db.unit_of_work() as session:
        held = session.get(Ticket, ticket.id)
        assert held is not None
        change_status(session, held, status, AGENT, utcnow())
    summary = await deliver(app, tmp_path, out_of_office(CUSTOMER, ack))
    assert summary["replies"] == 1 and summary["stored"] == 0, "recorded on the ticket, not a new one"
    [after] = tickets(app)
    assert after.status == status
    *_, oof = articles(app, ticket.id)
    assert (oof.kind, oof.no_answer_reason) == ("auto_reply", "Auto-Submitted: auto-replied")
    assert len(sink.received) == 1, "no answer to an out-of-office"
    assert history(app, ticket.id)[-1][0] == "reply"
    # The ticket could reopen (a closed one is within the reopen window): the customer's own answer does.
    await deliver(app, tmp_path, reply(ack, "Jestem z powrotem, oto NIP.", sender=CUSTOMER))
    assert tickets(app)[0].status == "open"
