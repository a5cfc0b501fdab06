"""Which mails may get an automatic answer: one sample per rule of the no-loop list."""

from __future__ import annotations

import pytest

from mailbridge.classify import classify
from mailbridge.ingest.parse import parse
from mailbridge.models import MailKind

OWN = {"support@helpdesk.example"}
LOOP_ID = "mailbridge@helpdesk.example"


def mail(headers: str = "", sender: str = "Jan Kowalski <jan@example.com>", body: str = "Dzień dobry\n") -> bytes:
    head = f"From: {sender}\nTo: support@helpdesk.example\nSubject: Pytanie\nMessage-ID: <q1@example.com>\n{headers}"
    return (head + "\n" + body).encode()


@pytest.mark.parametrize(
    ("headers", "kind", "reason"),
    [
        ("", MailKind.HUMAN, None),
        ("Auto-Submitted: no\n", MailKind.HUMAN, None),  # an ordinary human mail (RFC 3834)
        ("Auto-Submitted: auto-replied\n", MailKind.AUTO_REPLY, "Auto-Submitted: auto-replied"),
        ("Auto-Submitted: auto-generated; owner-email=x@y\n", MailKind.AUTO_REPLY, "Auto-Submitted: auto-generated"),
        ("Precedence: bulk\n", MailKind.LIST, "Precedence: bulk"),
        ("Precedence: junk\n", MailKind.LIST, "Precedence: junk"),
        ("Precedence: list\n", MailKind.LIST, "Precedence: list"),
        ("Precedence: auto_reply\n", MailKind.AUTO_REPLY, "Precedence: auto_reply"),
        ("List-Id: <users.lists.example.org>\n", MailKind.LIST, "List-Id header"),
        ("List-Unsubscribe: <mailto:leave@lists.example.org>\n", MailKind.LIST, "List-Unsubscribe header"),
        ("List-Post: <mailto:users@lists.example.org>\n", MailKind.LIST, "List-Post header"),
        ("X-Autoreply: yes\n", MailKind.AUTO_REPLY, "X-Autoreply header"),
        ("X-Autorespond: Out of office\n", MailKind.AUTO_REPLY, "X-Autorespond header"),
        ("X-Auto-Response-Suppress: OOF\n", MailKind.AUTO_REPLY, "X-Auto-Response-Suppress: OOF"),
        ("X-Auto-Response-Suppress: DR, AutoReply\n", MailKind.AUTO_REPLY, "X-Auto-Response-Suppress: DR, AutoReply"),
        ("X-Auto-Response-Suppress: All\n", MailKind.AUTO_REPLY, "X-Auto-Response-Suppress: All"),
        ("X-Auto-Response-Suppress: DR\n", MailKind.HUMAN, None),  # only delivery reports suppressed
        ("X-Loop: mailbridge@helpdesk.example\n", MailKind.OWN, "X-Loop names us"),
        ("X-Loop: someone-else@example.org\n", MailKind.HUMAN, None),
        ("Return-Path: <>\n", MailKind.BOUNCE, "empty Return-Path"),
    ],
)
def test_header_rules(headers: str, kind: MailKind, reason: str | None) -> None:
    verdict = classify(parse(mail(headers)), OWN, LOOP_ID)
    assert verdict.kind is kind
    if reason is None:
        assert verdict.no_answer_reason is None
    else:
        assert verdict.no_answer_reason is not None and reason in verdict.no_answer_reason


@pytest.mark.parametrize(
    ("sender", "kind", "reason"),
    [
        ("MAILER-DAEMON@mx.example.com", MailKind.BOUNCE, "mail system"),
        ("Mail Delivery System <postmaster@mx.example.com>", MailKind.BOUNCE, "mail system"),
        ("Support <SUPPORT@helpdesk.example>", MailKind.OWN, "our own address"),
        ("Sklep <noreply@shop.example>", MailKind.HUMAN, "no-reply sender"),
        ("Sklep <no-reply@shop.example>", MailKind.HUMAN, "no-reply sender"),
        ("Bank <do-not-reply@bank.example>", MailKind.HUMAN, "no-reply sender"),
        ("Bank <donotreply@bank.example>", MailKind.HUMAN, "no-reply sender"),
        ("Reply Man <reply@example.com>", MailKind.HUMAN, None),
        ("Nora <nora.eply@example.com>", MailKind.HUMAN, None),
    ],
)
def test_sender_rules(sender: str, kind: MailKind, reason: str | None) -> None:
    verdict = classify(parse(mail(sender=sender)), OWN, LOOP_ID)
    assert verdict.kind is kind
    assert (verdict.no_answer_reason is None) if reason is None else (reason in (verdict.no_answer_reason or ""))


def test_dsn_bounce_names_failed_recipient_and_returned_message() -> None:
    raw = (
        b"From: Mail Delivery System <MAILER-DAEMON@mx.example.com>\n"
        b"To: support@helpdesk.example\n"
        b"Subject: Undelivered Mail Returned to Sender\n"
        b"Message-ID: <bounce1@mx.example.com>\n"
        b"MIME-Version: 1.0\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\n\n'
        b"--b\nContent-Type: text/plain\n\nThis is the mail system. Your mail could not be delivered.\n"
        b"--b\nContent-Type: message/delivery-status\n\n"
        b"Reporting-MTA: dns; mx.example.com\n\n"
        b"Final-Recipient: rfc822; gone@example.com\nAction: failed\nStatus: 5.1.1\n"
        b"--b\nContent-Type: text/rfc822-headers\n\n"
        b"From: support@helpdesk.example\nTo: gone@example.com\nMessage-ID: <mb.7.abc@helpdesk.example>\n"
        b"--b--\n"
    )
    parsed = parse(raw)
    assert parsed.report is not None
    assert parsed.report.failed == ("gone@example.com",)
    assert parsed.report.returned_message_ids == ("mb.7.abc@helpdesk.example",)
    verdict = classify(parsed, OWN, LOOP_ID)
    assert verdict.kind is MailKind.BOUNCE
    assert "delivery-status" in (verdict.no_answer_reason or "")


def test_read_receipt_is_a_report() -> None:
    raw = (
        b"From: Jan <jan@example.com>\nTo: support@helpdesk.example\nSubject: Read: Pytanie\n"
        b'Content-Type: multipart/report; report-type=disposition-notification; boundary="b"\n\n'
        b"--b\nContent-Type: text/plain\n\nYour message was read.\n"
        b"--b\nContent-Type: message/disposition-notification\n\n"
        b"Final-Recipient: rfc822; jan@example.com\nDisposition: manual-action/MDN-sent-manually; displayed\n"
        b"--b--\n"
    )
    verdict = classify(parse(raw), OWN, LOOP_ID)
    assert verdict.kind is MailKind.REPORT
    assert "read receipt" in (verdict.no_answer_reason or "")


def test_an_ordinary_mail_that_mentions_delivery_is_not_a_bounce() -> None:
    raw = mail(body="Delivery failed? No, the parcel arrived. Message-ID: <x@y> was mine.\n")
    verdict = classify(parse(raw), OWN, LOOP_ID)
    assert verdict.kind is MailKind.HUMAN and verdict.no_answer_reason is None
