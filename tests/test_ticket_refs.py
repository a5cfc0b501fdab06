"""Ticket references in subjects and quoted footers: what our mails write and what clients and gateways make
of it is found; sizes, counts and other people's numbers are not."""

from __future__ import annotations

import pytest

from mailbridge.config import TicketSettings
from mailbridge.ingest.parse import parse
from mailbridge.threading.ticket_refs import TicketRefs

DEFAULT = TicketRefs(TicketSettings())


@pytest.mark.parametrize(
    ("subject", "number"),
    [
        ("[MB-000123] Re: Drukarka nie drukuje", 123),
        ("RE: [MB-000123] Re: Drukarka", 123),  # Outlook
        ("Re: [MB-000123] Re: Drukarka", 123),  # Gmail, Thunderbird
        ("Odp: [MB-000123] Re: Drukarka", 123),  # Thunderbird in Polish
        ("[EXTERNAL] AW: [MB-000123] Re: Drukarka", 123),  # German Outlook behind a tagging gateway
        ("SV: Fwd: [MB-000123] Re: Drukarka", 123),
        ("[EXTERNAL]AW:[MB-000123]Re:Drukarka", 123),
        ("Re: [ MB-000123 ] Drukarka", 123),
        ("Re: (MB-000123) Drukarka", 123),  # brackets rewritten
        ("Re: {MB-000123} Drukarka", 123),
        ("Re: (MB-000123] Drukarka", 123),
        ("Re: MB-000123 Re: Drukarka", 123),  # brackets dropped
        ("Re: MB#000123 Drukarka", 123),
        ("Re: MB: 000123 Drukarka", 123),
        ("Re: MB - 000123 Drukarka", 123),
        ("re: [mb-000123] drukarka", 123),
        ("Re: Drukarka [MB-000123]", 123),
        ("Re: [MB-123] wpisane ręcznie", 123),  # typed by hand, in brackets
        ("Re: (MB#7) wpisane ręcznie", 7),
        ("Re: [MB-1234567] Drukarka", 1234567),  # past the padded width
        ("Re: MB-1234567 Drukarka", 1234567),
        ("Re: [MB-000002] Fwd: [MB-000005]", 2),  # the first one
    ],
)
def test_the_subject_reference_is_found_through_what_clients_do_to_it(subject: str, number: int) -> None:
    assert DEFAULT.in_subject(subject) == number


@pytest.mark.parametrize(
    "subject",
    [
        "Plik ma 25 MB 2 razy za duży",
        "MB 2",
        "Re: MB 000123 Drukarka",  # no "-", "#" or ":" between them
        "mb-2 files",
        "Limit MB-25 na załącznik",  # not the width we write, not in brackets
        "10MB-3",
        "Obraz 10MB-000003",  # a size glued to the prefix
        "MB2",
        "MB-000123abc",
        "EMB-000123",
        "[MB-2 files]",
        "Załącznik (MB: 25)",
        "Re: MB-0001234567890",  # more digits than any ticket number
        "[HD-000123] someone else's helpdesk",
        "",
    ],
)
def test_sizes_counts_and_other_numbers_are_not_references(subject: str) -> None:
    assert DEFAULT.in_subject(subject) is None


def test_the_rule_follows_the_configured_prefix_and_width() -> None:
    refs = TicketRefs(TicketSettings(number_prefix="HD", number_digits=4))
    assert refs.in_subject("Re: [HD-0042] Drukarka") == 42
    assert refs.in_subject("AW: hd-0042 Drukarka") == 42
    assert refs.in_subject("Re: HD-42") is None
    assert refs.in_subject("Re: [MB-000042]") is None


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("Dzięki!\n\n> --\n> Ticket [MB-000001] · this is an automatic reply\n", 1),
        ("> Zgłoszenie [MB-000017] · aby odpowiedzieć, odpisz na tę wiadomość", 17),
        ("> Ticket [mb-000001]", 1),
        ("> Ticket [MB-1]", 1),  # delimited on both sides: any width
    ],
)
def test_the_footer_of_our_mails_is_found_in_the_quote(text: str, number: int) -> None:
    assert DEFAULT.in_footer(text) == number


@pytest.mark.parametrize(
    "text",
    [
        "Mam 25 MB 2 razy za dużo",
        "Plik MB-000001.zip",  # not the configured format: no brackets
        "[MB 000001]",
        "nothing here",
    ],
)
def test_other_text_has_no_footer_reference(text: str) -> None:
    assert DEFAULT.in_footer(text) is None


def test_the_footer_rule_follows_the_configured_reference_format() -> None:
    hashed = TicketRefs(TicketSettings(reference_format="Ticket#{number}"))
    assert hashed.in_footer("> Zgłoszenie Ticket#MB-000042 · odpisz") == 42
    assert hashed.in_footer("> Zgłoszenie [MB-000042]") is None
    assert hashed.in_footer("> Ticket#MB-42") is None  # not delimited after the number: the width we write
    assert hashed.in_subject("Re: Ticket#MB-000042 Drukarka") == 42
    spaced = TicketRefs(TicketSettings(reference_format="[Ticket {number}]"))
    assert spaced.in_footer("> [Ticket  MB-000042] · odpisz") == 42
    assert spaced.in_subject("Re: [Ticket MB-000042] Drukarka") == 42
    bare = TicketRefs(TicketSettings(reference_format="{number}"))
    assert bare.in_footer("> Ticket MB-000042 · odpisz") == 42
    assert bare.in_footer("> 10MB-000042") is None


def _mail(subject: str, body: str, headers: str = "") -> bytes:
    return (
        f"From: Anna <anna@klient.example>\r\nTo: support@helpdesk.example\r\nSubject: {subject}\r\n"
        f"Message-ID: <x1@klient.example>\r\n{headers}\r\n{body}"
    ).encode()


QUOTED_FOOTER = (
    "Nadal nie działa.\r\n\r\nOn Mon, Support wrote:\r\n> Dzień dobry\r\n> --\r\n> Ticket [MB-000001] · auto\r\n"
)


@pytest.mark.parametrize(
    ("raw", "is_reply"),
    [
        (_mail("Drukarka", "Dzień dobry,\r\n> cytat z gazety\r\n"), False),
        (_mail("Plik ma 25 MB 2 razy za duży", "W załączeniu.\r\n> cytat\r\n"), False),
        (_mail("Re: Drukarka", QUOTED_FOOTER), True),  # only the footer of ours in the quote
        (_mail("AW: MB-000001 Drukarka", "Nowe.\r\n\r\nOn Mon, Support wrote:\r\n> stare\r\n"), True),
        (_mail("Drukarka", "Nowe.\r\n\r\nOn Mon, Anna wrote:\r\n> stare\r\n", "In-Reply-To: <a@b>\r\n"), True),
        (_mail("Drukarka", "Nowe.\r\n\r\nOn Mon, Anna wrote:\r\n> stare\r\n", "References: <x@rewritten>\r\n"), True),
    ],
)
def test_the_parser_finds_the_new_text_of_every_mail_that_looks_like_a_reply(raw: bytes, is_reply: bool) -> None:
    mail = parse(raw, DEFAULT)
    assert (mail.new_text is not None) is is_reply
    if is_reply:
        assert mail.new_text is not None and ">" not in mail.new_text


def test_without_the_ticket_rule_only_reply_headers_count() -> None:
    assert parse(_mail("Re: Drukarka", QUOTED_FOOTER)).new_text is None
