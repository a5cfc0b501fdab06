"""The shipped templates render in every shipped language, and what they produce is safe to send."""

from __future__ import annotations

import base64
import email
import email.policy
import itertools
import re
from email.message import EmailMessage

import pytest

from mailbridge.ingest.mail import Address
from mailbridge.models import TicketStatus
from mailbridge.notify.render import (
    TEMPLATES,
    Envelope,
    Renderer,
    compose,
    header_safe,
    sendable,
    status_context,
)
from mailbridge.threading.message_ids import make_message_id


def context(language: str) -> dict[str, object]:
    return {
        "ticket": {
            "id": 7,
            "number": "MB-000007",
            "reference": "[MB-000007]",
            "subject": "Drukarka <b>",
            "status": "open",
        },
        "customer": {"name": 'Zofia "<script>" Żak', "address": "zofia@example.com"},
        "mailbox": {"name": "support", "address": "support@helpdesk.example", "from_name": "Pomoc"},
        "original": {"subject": "Drukarka <b>", "date": None, "message_id": "q1@example.com"},
        "status": status_context(TicketStatus.OPEN, TicketStatus.CLOSED, language),
        "agent": {"name": "Agata <admin>", "address": "agata@helpdesk.example"},
        "reply": "Proszę zrestartować drukarkę MB-000007.\nPozdrawiam <b>",
        "reference_example": "MB-000123",
        "problems": ["#assign nobody <b>: no agent has that name or address"],
        "alert": {
            "target": "first_response",
            "target_label": "first response",
            "share_percent": 75,
            "breach": False,
            "due_at": "2026-11-16 13:00 (Europe/Warsaw)",
            "left": "59 min",
            "overdue": "",
            "policy": "P2 + tier enterprise",
            "priority": "P2",
            "queue": "accounting <b>",
            "owner": "agata@helpdesk.example",
            "first_response": True,
        },
        "last_message": "Drukarka nie drukuje <b>",
    }


@pytest.mark.parametrize("language", ["en", "pl"])
@pytest.mark.parametrize("name", TEMPLATES)
def test_shipped_templates_render_and_compose(language: str, name: str) -> None:
    renderer = Renderer()
    renderer.check([language])
    rendered = renderer.render(name, language, context(language))
    assert "\n" not in rendered.subject
    if name == "agent_unmatched":
        assert "MB-000123" in rendered.text
    else:
        assert "[MB-000007]" in rendered.subject
        assert "MB-000007" in rendered.text and "MB-000007" in rendered.html
    assert "<script>" not in rendered.html and "<b>" not in rendered.html  # autoescaped
    if name == "status_changed":
        label = "Zamknięte" if language == "pl" else "Closed"
        assert label in rendered.text and label in rendered.subject
    raw = compose(
        rendered,
        Envelope(
            Address("Pomoc", "support@helpdesk.example"),
            [Address('Zofia "<script>" Żak', "zofia@example.com")],
            message_id=make_message_id(7, b"test-secret-0123456789", "helpdesk.example"),
            loop_id="mailbridge@helpdesk.example",
        ),
    )
    assert raw.isascii() and b"\r\n\r\n" in raw and all(len(line) <= 998 for line in raw.split(b"\r\n"))
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage) and not message.defects
    assert message["Subject"] == rendered.subject
    assert message["To"].addresses[0].display_name == 'Zofia "<script>" Żak'
    body = message.get_body(("plain",))
    assert body is not None and body.get_content().replace("\r\n", "\n") == rendered.text.replace("\r\n", "\n")


def test_header_values_are_one_line() -> None:
    assert header_safe("a\r\nBcc: x@y\u2028z\x00") == "a Bcc: x@y z"


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        ("anna@example.com", True),
        ("a.b+tag@mail.example.co.uk", True),
        ("root@localhost", False),
        ("jdöe@mächine.example", False),  # needs SMTPUTF8
        ("a@b@c.example", False),
        ("x" * 250 + "@example.com", False),
    ],
)
def test_sendable_addresses(address: str, ok: bool) -> None:
    assert sendable(Address("", address)) is ok


@pytest.mark.parametrize(
    "subject",
    [
        "[MB-000123] Re: Faktura nr 12/2026 – pilne, proszę o korektę dokumentu sprzedaży i przesłanie duplikatu",
        "[MB-000124] Re: Счёт-фактура № 17 — не пришла оплата по договору поставки оборудования 😀" * 2,
        "ż",
        "a" * 44 + "ę" * 3,  # a two-byte character where a word fills up
        "[MB-000123] SLA reminder: first response due 2026-11-17 12:00 (Europe/Warsaw) – Nie działa logowanie do"
        " systemu faktur od rana, prosimy o pilną pomoc",
        "Zażółć gęślą jaźń",
        "😀" * 60,
        "a–b",
        "x" * 200 + "ł",
    ],
)
def test_a_non_ascii_subject_is_encoded_in_short_lines_of_whole_characters(subject: str) -> None:
    rendered = Renderer().render("ack", "en", context("en"))
    raw = compose(
        type(rendered)(subject=subject, text=rendered.text, html=rendered.html),
        Envelope(Address("Pomoc", "support@helpdesk.example"), [Address("", "zofia@example.com")]),
    )
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    start = head.index("\r\nSubject: ") + 2
    lines = head[start:].split("\r\n")
    lines = [lines[0], *(line for line in itertools.takewhile(lambda line: line.startswith(" "), lines[1:]))]
    assert all(len(line) <= 76 for line in lines), lines  # RFC 2047 section 2
    for word in re.findall(r"=\?utf-8\?b\?([^?]*)\?=", "".join(lines)):
        base64.b64decode(word).decode("utf-8")  # each word holds whole characters
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["Subject"] == subject and not message.defects
