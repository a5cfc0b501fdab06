"""The whole conversation through a real Dovecot and a real SMTP server: the customer writes, gets the
acknowledgement, answers it; an agent answers; the ticket waits and the customer's answer reopens it."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from mailbridge.models import Article, Ticket
from tests.imap_env import imap_box, make_app, new_user, sample_mail
from tests.support.dovecot import Dovecot
from tests.support.smtp_sink import SmtpSink
from tests.test_threading_e2e import AGENT, CUSTOMER, SUPPORT, _set_status, agent_mail, reply

pytestmark = pytest.mark.skipif(not Dovecot.available(), reason="dovecot is not installed")


async def test_a_conversation_through_dovecot(tmp_path: Path, sink: SmtpSink) -> None:
    server = Dovecot.start(tmp_path / "dovecot")
    try:
        user = new_user(server)
        app = make_app(
            tmp_path,
            [imap_box(server, user, address=SUPPORT, existing_mail="import", acknowledge_backlog=True)],
            smtp=sink.config(),
            outbox={"domain": "helpdesk.example"},
            threading={"trusted_authserv_ids": ["mx.helpdesk.example"]},
            agents=[{"address": AGENT, "name": "Agata"}],
        )
        try:
            first = sample_mail("Nie działa VPN", sender=CUSTOMER)
            server.append(first, user=user.name)
            await app.run_once()
            [ack] = sink.received
            server.append(reply(ack, "Dodam, że od wczoraj.", subject_prefix="RE: ", references=False), user=user.name)
            await app.run_once()
            server.append(agent_mail(first, "Proszę zrestartować klienta VPN."), user=user.name)
            await app.run_once()
            relayed = sink.received[-1]
            assert (
                relayed.rcpt_tos == [CUSTOMER] and "zrestartować" in relayed.message.get_body(("plain",)).get_content()
            )
            with app.db.reader() as session:
                [ticket] = session.scalars(select(Ticket)).all()
            _set_status(app, ticket.id, "waiting_customer")
            server.append(reply(relayed, "Zrestartowałam, działa."), user=user.name)
            await app.run_once()
            with app.db.reader() as session:
                [ticket] = session.scalars(select(Ticket)).all()
                directions = [a.direction for a in session.scalars(select(Article).order_by(Article.id))]
            assert ticket.status == "open"
            assert directions == ["inbound", "inbound", "outbound", "inbound"]
            assert server.uids("INBOX", user=user.name) == []  # every mail processed on the server
        finally:
            app.close()
    finally:
        server.stop()
