"""The new text of a reply: our shortcut to mail-parser-reply's latest reply gives what the library gives."""

from __future__ import annotations

import random

from mailbridge.threading.reply_text import _PARSER, latest_reply, new_text

_PIECES = [
    "Dzień dobry,\ndrukarka nadal nie działa.",
    "Hello,\n\nthe invoice is attached.",
    "Здравствуйте!\nПринтер снова не печатает.",
    "",
    "   ",
    "> quoted line\n> another quoted line",
    "On Mon, 1 Dec 2026 at 10:00, Jan Kowalski <jan@example.pl> wrote:",
    "W dniu 01.12.2026 o 10:00 Jan Kowalski <jan@example.pl> napisał:",
    "Am 01.12.2026 um 10:00 schrieb Hans Müller <hans@example.de>:",
    "-----Original Message-----\nFrom: Support <support@example.com>\nSent: Monday\nTo: Jan\nSubject: Re: MB-000123",
    "From: Support <support@example.com>\nSent: Monday, December 1, 2026 10:00\nTo: jan@example.pl",
    "Od: Pomoc <pomoc@example.pl>\nWysłano: poniedziałek\nDo: jan@example.pl\nTemat: Re: Drukarka",
    "________________________________\nFrom: someone",
    "-- \nJan Kowalski\ntel. 123 456 789",
    "Best regards,\nJan",
    "Pozdrawiam\nJan",
    "Sent from my iPhone",
    "This e-mail and any attachments are confidential. If you received this mail in error, delete it.",
    "wrote: in the middle of a line",
]


def _random_text(rng: random.Random) -> str:
    pieces = [rng.choice(_PIECES) for _ in range(rng.randint(1, 7))]
    sep = rng.choice(["\n", "\n\n", "\r\n", "\r\n\r\n", "\n \n"])
    return sep.join(pieces) + rng.choice(["", "\n", " \n\n"])


def test_latest_reply_is_the_librarys_latest_reply() -> None:
    rng = random.Random(20261201)
    shortened = 0
    for _ in range(3000):
        text = _random_text(rng)
        expected = _PARSER.parse_reply(text=text)
        assert latest_reply(text) == expected, text
        shortened += expected is not None and expected.strip() != text.strip()
    assert shortened > 1000  # the texts do have quoted histories and headers the library splits at


def test_new_text_drops_the_quoted_history() -> None:
    text = "Nadal nie działa.\n\nW dniu 01.12.2026 o 10:00 Pomoc <pomoc@example.pl> napisał:\n> Proszę o restart."
    assert new_text(text) == "Nadal nie działa."
