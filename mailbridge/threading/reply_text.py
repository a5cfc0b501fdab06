"""What is new in a reply: the text without the quoted history and the signature, found by
mail-parser-reply (it knows the quote headers of many mail clients and languages, Polish and Russian
among them). The whole text is always kept beside it."""

from __future__ import annotations

import logging
import re

from mailparser_reply import EmailReplyParser

# Each language costs ~0.1 ms per mail; these are the ones our customers write in.
LANGUAGES = ["en", "pl", "ru", "de"]
_PARSER = EmailReplyParser(languages=LANGUAGES)
# Gmail in Polish ("W dniu 12.03.2026 o 10:00 Jan <jan@x.pl> napisał:") and others it misses: a line
# ending in ":" followed only by ">"-quoted lines is a quote header.
_TRAILING_QUOTE = re.compile(r"\n[^\n]*:[ \t]*\n(?:>[^\n]*(?:\n|$)|[ \t]*(?:\n|$))+\Z")

log = logging.getLogger("mailbridge.threading")


# Nothing is quoted and there is no signature: mail-parser-reply (~0.5 ms) would return the text as it is.
_QUOTE_HINT = re.compile(
    r"^\s*>|^-- ?$|^_{5,}|^-{5,}|wrote:|napisał|pisze:|написал|пишет:|schrieb|original message|"
    r"^\s*(from|von|od|от|de|envoyé|sent|wysłano|gesendet):",
    re.IGNORECASE | re.MULTILINE,
)


def new_text(text: str) -> str:
    if not text.strip():
        return ""
    if not _QUOTE_HINT.search(text):
        return text.strip()
    try:
        reply = _PARSER.parse_reply(text=text)
    except Exception:  # a parser bug must not cost the mail; the whole text is there anyway
        log.debug("mail-parser-reply failed", exc_info=True)
        reply = text
    reply = _TRAILING_QUOTE.sub("", reply.rstrip() + "\n")
    return reply.strip() or text.strip()
