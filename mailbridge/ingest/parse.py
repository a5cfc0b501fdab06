"""Parse stage: raw RFC 5322 bytes -> ParsedMail.

mail-parser reads the headers (RFC 2047, address lists, dates, defects). The MIME tree is walked here,
because mail-parser skips nameless application/octet-stream parts and images inside multipart/related:
every leaf part of a mail ends up as body text, body HTML, an attachment or an inline image.
"""

from __future__ import annotations

import binascii
import email.header
import email.message
import email.utils
import functools
import hashlib
import logging
import mimetypes
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import charset_normalizer
import nh3
import pybase64
from mailparser.dates import parse_mail_date
from mailparser.utils import get_addresses

from mailbridge.ingest.html_text import html_to_text
from mailbridge.ingest.mail import Address, ParsedMail, Part
from mailbridge.ingest.mime_parser import message_from_bytes as read_mime
from mailbridge.ingest.reports import read_report
from mailbridge.threading.reply_text import new_text
from mailbridge.threading.ticket_refs import TicketRefs

# mail-parser logs a warning for every part type it does not know; we handle those parts ourselves.
logging.getLogger("mailparser").setLevel(logging.CRITICAL)

_SINGLE_BYTE_WESTERN = {"us-ascii", "ascii", "iso-8859-1", "latin1", "latin-1", "windows-1252", "cp1252"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\udc80-\udcff]")  # raw 8-bit header bytes, as the stdlib hands them out
_MSGID = re.compile(r"<([^<>\s]+)>")
_ENCODED_WORD = re.compile(r"=\?[^?]+\?[bBqQ]\?[^?]*\?=")
HTML_URL_SCHEMES = {"http", "https", "mailto", "tel", "cid", "ftp"}


class ParseError(Exception):
    """The bytes are not a mail we can read (not even its headers)."""


def parse(raw: bytes, ticket_refs: TicketRefs | None = None) -> ParsedMail:
    """Parse one mail. Raises ParseError only when nothing usable can be read. With `ticket_refs`, a mail
    that names one of our tickets (subject, quoted footer) counts as a reply, as it does for threading."""
    if not raw.strip():
        raise ParseError("empty message: no headers, no body")
    defects: list[str] = []
    raw_sha, raw_size = hashlib.sha256(raw).hexdigest(), len(raw)  # of the bytes as received
    if raw.startswith(b"\xef\xbb\xbf"):  # Windows tools save .eml files with a UTF-8 byte order mark
        raw = raw[3:]
        defects.append("ByteOrderMark: removed a UTF-8 BOM before the headers")
    view = _read_headers(raw, defects)
    if view is None:
        # Mails saved from a client or an mbox often start with a line that is not a header
        # ("From sender date", "---- Original message ----"); the headers follow it.
        stripped = _skip_leading_non_header_lines(raw)
        view = _read_headers(stripped, defects) if stripped is not None else None
        if view is None:
            raise ParseError("no header lines found: this does not look like an e-mail message")
        defects.append("LeadingGarbage: skipped lines before the first header")
    message = view.message

    walker = _PartWalker(defects)
    walker.walk(message)

    # Line endings follow the transport (CRLF over IMAP, LF in files); the text does not.
    text = "\n\n".join(t for t in walker.texts if t.strip()).replace("\r\n", "\n")
    html_source = "\n".join(walker.htmls).replace("\r\n", "\n")
    html = nh3.clean(html_source, url_schemes=HTML_URL_SCHEMES) if html_source.strip() else None
    if not text and html_source:
        text = html_to_text(html_source)

    headers = tuple((name.lower(), decode_header_value(value)) for name, value in message.items())
    message_id = _first_msgid(message.get("Message-ID"))
    sender = _first(view.addresses("from"))
    subject = _one_line(decode_header_value(message.get("Subject", "")))
    return ParsedMail(
        subject=subject,
        sender=sender,
        to=view.addresses("to"),
        cc=view.addresses("cc"),
        reply_to=view.addresses("reply-to"),
        date=view.date,
        message_id=message_id,
        in_reply_to=_first_msgid(message.get("In-Reply-To")),
        references=_references(message.get("In-Reply-To"), message.get("References")),
        text=text,
        html=html,
        attachments=tuple(walker.parts),
        body_parts=len(walker.texts) + len(walker.htmls),
        defects=tuple(defects),
        headers=headers,
        raw_sha256=raw_sha,
        raw_size=raw_size,
        dedup_key=dedup_key(message, message_id, text, html_source or None, walker.parts),
        report=read_report(message, sender.address if sender else None),
        new_text=new_text(text) if _looks_like_a_reply(message, subject, text, ticket_refs) else None,
    )


@dataclass(slots=True)
class _HeaderView:
    """Header fields read with mail-parser's address and date parsers (they recover from forensic-grade
    breakage). Its whole-message MailParser is not used: it re-encodes every attachment and parses every
    Received header, which costs a third of our parse time for nothing we keep."""

    message: email.message.Message
    defects: list[str]

    def addresses(self, name: str) -> tuple[Address, ...]:
        raw = self.message.get(name)
        reasons: tuple[Any, ...] = ()
        try:
            # Raw 8-bit bytes are decoded first (mail-parser would keep them as escapes), and encoded
            # words are left for mail-parser, which decodes them in their lexical context.
            text = _decode_8bit(raw) if raw is not None else None
            pairs, reasons = _read_addresses(text) if text is not None else ((), ())
        except Exception:  # mail-parser's recovery is best effort; the stdlib parser is the fallback
            pairs = tuple(email.utils.getaddresses([str(raw)]))
        self.defects.extend(f"AddressHeaderDefect: {name}: {reason}" for reason in reasons)
        found = _addresses(pairs)
        if not found and raw:
            # An unbalanced quote or a missing ">" hides the address from a strict parser;
            # a reply to nobody is worse than a leniently read sender.
            found = _lenient_addresses(decode_header_value(raw))
        return found

    @property
    def date(self) -> datetime | None:
        raw = self.message.get("Date")
        if raw is None:
            return None
        try:
            result = parse_mail_date(str(raw))
        except Exception:
            return None
        if result.value is None:
            self.defects.append("DateHeaderDefect: the Date header cannot be read")
        return _date(result.value)


def _read_addresses(text: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """mail-parser's reading of an address header: (name, address) pairs and its diagnostics' reasons.
    Remembered per worker (~0.15 ms a header): most mails of a help desk go to the same few addresses, and
    customers write again from theirs. A long list of recipients is read every time (the cache stays small).
    A header of one plain address is read by a regex: what mail-parser makes of it is the obvious pair."""
    plain = _PLAIN_ADDRESS_HEADER.fullmatch(text)
    if plain is not None:
        return ((plain["name"] or "", plain["angle"] or plain["bare"]),), ()
    simple = _simple_mailboxes(text)
    if simple is not None:
        return simple, ()
    return _read_short_addresses(text) if len(text) <= 1000 else _read_any_addresses(text)


# One mailbox in its plainest form, `local@domain`, `<local@domain>` or `Words Of A Name <local@domain>`:
# ASCII letters and digits, single spaces between the name's words, dot-atoms without empty atoms, domain
# labels without a hyphen at either end. mail-parser reads such a header as (name, address) with no
# diagnostics (tests/test_parse_addresses.py checks that against it on random headers); it took ~0.12 ms a
# header for that, which the cache above misses for every new sender.
_NAME_WORD = r"[A-Za-z0-9]+"
_LOCAL_ATOM = r"[A-Za-z0-9_+-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ADDR = rf"{_LOCAL_ATOM}(?:\.{_LOCAL_ATOM})*@{_LABEL}(?:\.{_LABEL})*"
_PLAIN_ADDRESS_HEADER = re.compile(
    rf"(?:(?P<name>{_NAME_WORD}(?: {_NAME_WORD})*) )?<(?P<angle>{_ADDR})>|(?P<bare>{_ADDR})", re.ASCII
)


# The other common forms, also read without mail-parser (it took ~0.5 ms a header for them, a tenth of a
# parser worker's time on the bench corpus): a list of plain mailboxes, and a name written only in encoded
# words (`=?utf-8?q?Zofia_W=C3=B3jcik?= <z.wojcik@example.com>`, the way Polish and Russian names travel),
# folded or not. The encoded words (75 characters at most) must decode strictly (a known charset, valid
# base64 or Q) to a name of letters and digits with single spaces, hyphens or apostrophes between them;
# anything else goes to mail-parser. tests/test_parse_addresses.py compares the results with mail-parser's
# on random headers.
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_STRICT_ENCODED_WORD = r"=\?[A-Za-z0-9_-]+\?[bBqQ]\?[A-Za-z0-9+/=_.!*-]*\?="
_ENCODED_NAME_MAILBOX = re.compile(
    rf"(?P<words>{_STRICT_ENCODED_WORD}(?:[ \t]+{_STRICT_ENCODED_WORD})*)[ \t]+<(?P<angle>{_ADDR})>", re.ASCII
)
_ENCODED_WORD_PARTS = re.compile(r"=\?([A-Za-z0-9_-]+)\?([bBqQ])\?([^?]*)\?=")
_Q_TEXT = re.compile(r"(?:[^=]|=[0-9A-Fa-f]{2})*")
_SIMPLE_NAME = re.compile(r"[^\W_]+(?:[ '-][^\W_]+)*")


def _simple_mailboxes(text: str) -> tuple[tuple[str, str], ...] | None:
    """The (name, address) pairs of a header in one of the common forms above, or None."""
    pairs: list[tuple[str, str]] = []
    for item in _FOLD.sub("", text).split(","):
        item = item.strip(" \t")
        plain = _PLAIN_ADDRESS_HEADER.fullmatch(item)
        if plain is not None:
            pairs.append((plain["name"] or "", plain["angle"] or plain["bare"]))
            continue
        encoded = _ENCODED_NAME_MAILBOX.fullmatch(item)
        name = _strictly_decoded(encoded["words"]) if encoded is not None else None
        if encoded is None or name is None:
            return None
        pairs.append((name, encoded["angle"]))
    return tuple(pairs)


def _strictly_decoded(words: str) -> str | None:
    """Encoded words (RFC 2047; the blanks between them do not count) as the name they spell, or None when
    any of them does not decode cleanly or the name is not one of plain words."""
    name = ""
    for word in _ENCODED_WORD_PARTS.finditer(words):
        charset, encoding, encoded = word.groups()
        if len(word.group()) > 75:  # longer than RFC 2047 allows: mail-parser says so
            return None
        try:
            if encoding in "bB":
                data = pybase64.b64decode(encoded, validate=True)
            elif _Q_TEXT.fullmatch(encoded):  # every "=" an escape of two hex digits
                data = binascii.a2b_qp(encoded.encode("ascii"), header=True)
            else:
                return None
            name += data.decode(charset)
        except (LookupError, ValueError):  # an unknown charset, bad base64, bytes the charset does not have
            return None
    return name if _SIMPLE_NAME.fullmatch(name) else None


def _read_any_addresses(text: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    diagnostics: list[dict[str, Any]] = []
    pairs = get_addresses(text, defects=diagnostics, decode_names=True)
    return tuple(pairs), tuple(d.get("reason") for d in diagnostics)


_read_short_addresses = functools.lru_cache(maxsize=256)(_read_any_addresses)  # ~0.2 MB: the peak RSS is tight


def _looks_like_a_reply(
    message: email.message.Message, subject: str, text: str, ticket_refs: TicketRefs | None
) -> bool:
    """Whether to look for the quoted history (mail-parser-reply, ~0.3 ms): in every mail that answers
    another one, by the same signs threading goes by (it names a mail, or one of our tickets in its subject
    or in a quoted footer of ours); a new mail keeps its whole text, at the cost of two regex searches."""
    if message.get("In-Reply-To") or message.get("References"):
        return True
    if ticket_refs is None:
        return False
    return ticket_refs.in_subject(subject) is not None or ticket_refs.in_footer(text) is not None


def _read_headers(raw: bytes, defects: list[str]) -> _HeaderView | None:
    try:
        message = message_from_bytes(raw)
    except RecursionError:
        raise ParseError("MIME nesting too deep to parse") from None
    if not message.keys():
        return None
    return _HeaderView(message, defects)


# Eight or more lines made only of base64 characters (40 or more each, each ended by LF or CRLF): an
# encoded attachment. A MIME boundary starts with "--" and a header line holds a colon, so no such run can
# contain either. (Written plainly, a run is `^(?:L\r?\n){7,}L(?=\r?\n)` in MULTILINE mode, L = 40 or
# more base64 characters; the tests compare the two.) A regular expression spends about 3 ns on every byte
# of an attachment to find them; here every byte is classified once by `bytes.translate` (a table lookup),
# and the lines of a run, which encoders write all of one length, are compared with a template a whole
# stretch at a time (memcmp); only the lines where the length changes (the last one) are looked at alone.
_BASE64_CHARACTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_B, _CR, _LF = ord("a"), ord("\r"), ord("\n")
_CLASSES = bytes(_B if c in _BASE64_CHARACTERS else c if c in (_CR, _LF) else ord(".") for c in range(256))
_RUN_MIN_LINE = 40
_RUN_MIN_LINES = 8
_RUN_START = b"\n" + b"a" * _RUN_MIN_LINE
_RUN_TOKEN = re.compile("\x00mb([0-9]+)\x00")


def shorten_base64_runs(raw: bytes) -> tuple[bytes, list[bytes]]:
    """Each run of base64 lines replaced by the token line "\\x00mb<index>\\x00"; the runs, by index."""
    classes = raw.translate(_CLASSES)
    runs: list[bytes] = []
    pieces: list[bytes] = []
    copied = 0  # raw[:copied] is in pieces
    line = 0 if classes.startswith(_RUN_START[1:]) else _next_candidate(classes, 0)
    while line >= 0:
        end, count = _base64_lines(classes, line)
        if count >= _RUN_MIN_LINES:
            pieces += (raw[copied:line], b"\x00mb%d\x00" % len(runs))
            runs.append(raw[line:end])
            copied = end
        line = _next_candidate(classes, max(end, line + 1))
    if not runs:
        return raw, runs
    pieces.append(raw[copied:])
    return b"".join(pieces), runs


def _next_candidate(classes: bytes, start: int) -> int:
    """The next line start from `start` on (not at it) that begins with 40 base64 characters, or -1."""
    found = classes.find(_RUN_START, start - 1 if start else 0)
    return -1 if found < 0 else found + 1


def _base64_lines(classes: bytes, line: int) -> tuple[int, int]:
    """The base64 lines from `line` on, one after another: where the last one's characters end (`line`
    when there is none) and how many there are."""
    count, end = 0, line
    while True:
        newline = classes.find(b"\n", line)
        if newline < 0:
            return end, count  # a last line without its line end is not one of them
        stop = newline - 1 if newline > line and classes[newline - 1] == _CR else newline
        length = stop - line
        if length < _RUN_MIN_LINE or classes.count(b"a", line, stop) != length:
            return end, count
        # This line, and the lines after it that are as long with the same line end.
        unit = newline + 1 - line
        same = _same_lines(classes, line, classes[line : newline + 1])
        count += same
        line += same * unit
        end = line - (unit - length)


_STRETCH = 1 << 16  # bytes compared at once: a template this long per line length stays in the cache
_templates: dict[bytes, bytes] = {}


def _same_lines(classes: bytes, line: int, unit: bytes) -> int:
    """How many lines from `line` on are exactly `unit` (one line's classes with its line end)."""
    if len(unit) > _STRETCH // 16:  # not what encoders write: such lines are looked at one by one
        return 1
    template = _templates.get(unit)
    if template is None:
        if len(_templates) >= 16:  # a few line lengths in practice; at most 1 MB of templates
            _templates.clear()
        template = _templates[unit] = unit * max(1, _STRETCH // len(unit))
    per_template = len(template) // len(unit)
    same = 0
    # `startswith` at an offset compares in place (memcmp), without copying the stretch.
    while classes.startswith(template, line):
        same += per_template
        line += len(template)
    # Fewer than a template's lines match from here: the most that do, by halving.
    low, high = 0, min(per_template, (len(classes) - line) // len(unit)) + 1
    while high - low > 1:
        middle = (low + high) // 2
        if classes.startswith(template[: middle * len(unit)], line):
            low = middle
        else:
            high = middle
    return same + low


def message_from_bytes(raw: bytes) -> email.message.Message:
    """`email.message_from_bytes`, twice as fast on mails with attachments.

    The stdlib parser handles a body line by line in Python, and a 1 MB attachment is 13,000 lines.
    Each run of base64 lines is swapped for one short token line before parsing and put back into the
    payload afterwards, so the parser sees the same structure and every payload is the same string.
    The token holds a NUL byte, so a mail that has one is parsed the plain way; so is any mail where a
    token did not come back exactly once (it landed somewhere other than a payload)."""
    if b"\x00" in raw:
        return read_mime(raw)
    shortened, runs = shorten_base64_runs(raw)
    message = read_mime(shortened)
    if not runs:
        return message
    restored = 0

    def unstash(match: re.Match[str]) -> str:
        nonlocal restored
        restored += 1
        return runs[int(match.group(1))].decode("ascii")

    for part in message.walk():
        # The stored payload itself: get_payload() would re-decode 8-bit text on the way out.
        payload = part._payload  # type: ignore[attr-defined]
        if isinstance(payload, str) and "\x00" in payload:
            part._payload = _RUN_TOKEN.sub(unstash, payload)  # type: ignore[attr-defined]
        for edge in ("preamble", "epilogue"):
            value = getattr(part, edge)
            if value and "\x00" in value:
                setattr(part, edge, _RUN_TOKEN.sub(unstash, value))
    if restored != len(runs) or any("\x00" in str(value) for value in message.values()):
        return read_mime(raw)
    return message


_HEADER_LINE = re.compile(rb"^[!-9;-~]+:")


def _skip_leading_non_header_lines(raw: bytes, max_lines: int = 3) -> bytes | None:
    lines = raw.splitlines(keepends=True)
    for skip in range(1, min(max_lines, len(lines) - 1) + 1):
        if _HEADER_LINE.match(lines[skip]) and _HEADER_LINE.match(lines[skip + 1] if skip + 1 < len(lines) else b""):
            return b"".join(lines[skip:])
    return None


def dedup_key(
    message: email.message.Message, message_id: str | None, text: str, html: str | None, parts: Sequence[Part]
) -> str:
    """Equal for the same mail delivered to two mailboxes (headers differ: Received, Delivered-To; line
    endings may too). Message-ID alone is not enough: some mailers reuse one for different mails, and we
    must never drop a real mail as a duplicate. The author's own headers and the decoded content (text,
    HTML before sanitising, so an nh3 upgrade changes no key; each part's hash) make it specific, and are
    all at hand once the mail is parsed."""
    digest = hashlib.sha256()
    for name in ("From", "Date", "Subject"):
        digest.update(str(message.get(name, "")).encode("utf-8", "surrogateescape") + b"\0")
    digest.update((message_id or "").encode("utf-8", "surrogateescape") + b"\0")
    digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    digest.update((html or "").encode("utf-8", "surrogatepass") + b"\0")
    for part in parts:
        digest.update(f"{part.content_type}:{part.sha256}\0".encode())
    return digest.hexdigest()


class _PartWalker:
    """Sorts every leaf of the MIME tree into body text, body HTML or an attachment."""

    def __init__(self, defects: list[str]) -> None:
        self.texts: list[str] = []
        self.htmls: list[str] = []
        self.parts: list[Part] = []
        self.defects = defects

    def walk(self, part: email.message.Message, *, in_related: bool = False) -> None:
        ctype = part.get_content_type()
        self.defects.extend(f"{type(d).__name__}: {ctype}" for d in part.defects)
        disposition = part.get_content_disposition()
        if part.is_multipart() and not ctype.startswith("message/"):
            children = part.get_payload()
            if isinstance(children, list):
                for child in children:
                    if isinstance(child, email.message.Message):
                        self.walk(child, in_related=in_related or ctype == "multipart/related")
                return
        filename = _filename(part)
        if ctype in ("text/plain", "text/html") and disposition != "attachment" and not filename:
            body = decode_text(_payload_bytes(part), part.get_content_charset(), self.defects)
            (self.texts if ctype == "text/plain" else self.htmls).append(body)
            return
        self.parts.append(self._attachment(part, ctype, disposition, filename, in_related))

    def _attachment(
        self,
        part: email.message.Message,
        ctype: str,
        disposition: str | None,
        filename: str | None,
        in_related: bool,
    ) -> Part:
        payload = _payload_bytes(part)
        content_id = _content_id(part.get("Content-ID"))
        inline = disposition == "inline" or (in_related and content_id is not None and disposition is None)
        name = safe_filename(filename or "") or _fallback_name(part, ctype, content_id, len(self.parts) + 1)
        return Part(
            filename=name,
            content_type=ctype,
            size=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
            content_id=content_id,
            inline=inline,
            payload=payload,
        )


def _payload_bytes(part: email.message.Message) -> bytes:
    if part.get_content_type().startswith("message/") or part.is_multipart():
        # An attached mail, a delivery status, a digest: keep it whole, as it was on the wire.
        inner = part.get_payload()
        chunks = inner if isinstance(inner, list) else [inner]
        return b"".join(_as_bytes(c) for c in chunks)
    decoded = _base64_payload(part) if _is_base64(part) else None
    if decoded is not None:
        return decoded
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload
    return _as_bytes(part.get_payload())


def _is_base64(part: email.message.Message) -> bool:
    return str(part.get("content-transfer-encoding", "")).lower() == "base64"


def _base64_payload(part: email.message.Message) -> bytes | None:
    """A base64 body decoded by pybase64 (SIMD, ~40x faster than the stdlib's `a2b_base64`, which was a
    tenth of a parser worker's time), or None to leave the body to the stdlib. Only well-formed base64 is
    taken: ASCII, whole 4-character groups, "=" only as the last one or two characters, nothing but the
    alphabet (`validate=True` refuses the rest). There the stdlib's first try (`decode_b`: the lines
    joined, then strict decoding) succeeds without a defect, and both give the same bytes; anything else
    (a missing padding, stray characters) goes the stdlib's way, with its recovery and its defects."""
    text = part._payload  # type: ignore[attr-defined]  # what get_payload(decode=True) starts from
    if not isinstance(text, str) or not text.isascii():
        return None
    joined = text.encode("ascii").translate(None, b"\r\n")  # = b"".join(lines): bytes split only at CR/LF
    size = len(joined)
    if size % 4 or joined.find(b"=", 0, size - 2) != -1 or (size and joined[-2] == 61 and joined[-1] != 61):
        return None
    try:
        return pybase64.b64decode(joined, validate=True)
    except ValueError:  # binascii.Error: not base64 after all
        return None


def _as_bytes(obj: Any) -> bytes:
    if isinstance(obj, bytes):
        return obj
    if isinstance(obj, email.message.Message):
        try:
            return obj.as_bytes()
        except Exception:  # the stdlib generator trips over some broken headers; keep the text instead
            return obj.as_string().encode("utf-8", "surrogateescape")
    return str(obj or "").encode("utf-8", "surrogateescape")


def decode_text(payload: bytes, declared: str | None, defects: list[str]) -> str:
    """Bytes of a text part -> str, never mojibake when the declared charset is wrong or missing."""
    if not payload:
        return ""
    charset = (declared or "").strip().lower() or None
    non_ascii = not payload.isascii()
    if non_ascii and (charset is None or charset in _SINGLE_BYTE_WESTERN):
        # Valid multi-byte UTF-8 almost never happens by chance in Latin-1 text; mislabelled UTF-8 is common.
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            if charset is not None:
                defects.append(f"CharsetMismatch: declared {charset}, decoded as utf-8")
            return text
    if charset is not None and not (non_ascii and charset in ("us-ascii", "ascii")):
        try:
            return payload.decode(_codec_alias(charset))
        except (LookupError, UnicodeError):
            defects.append(f"CharsetDecodeDefect: declared {charset} does not decode this text")
    if not non_ascii:
        return payload.decode("ascii")
    if len(payload) < 64:
        # Too short for charset-normalizer's statistics (a 9-byte KOI8-R subject comes out as katakana).
        charset = _guess_short(payload)
        defects.append(f"CharsetGuessed: decoded as {charset}")
        return payload.decode(charset, "replace")
    best = charset_normalizer.from_bytes(payload).best()
    if best is not None:
        defects.append(f"CharsetGuessed: decoded as {best.encoding}")
        return str(best)
    defects.append("CharsetDecodeDefect: undecodable bytes replaced")
    return payload.decode("utf-8", "replace")


_SHORT_TEXT_CHARSETS = ("cp1252", "iso-8859-2", "cp1251", "koi8-r")  # western, central European, Cyrillic


def _guess_short(payload: bytes) -> str:
    """Pick the legacy charset under which a short text reads most like words. Real text is mostly
    lower-case letters; a wrong charset yields capitals and symbols ("ÔÅÓÔ" for "тест"), runs of accented
    Latin letters ("Ïðèâåò" for "Привет") or words that mix Latin and Cyrillic ("Zaїуіж" for "Zażółć")."""

    def score(charset: str) -> float:
        text = payload.decode(charset, "replace")
        letters = [ch for ch in text if ch.isalpha()]
        lower = sum(1 for ch in letters if ch.islower())
        junk = sum(1 for ch in text if not ch.isascii() and not ch.isalpha())
        accented = sum(1 for ch in letters if not ch.isascii() and "LATIN" in unicodedata.name(ch, ""))
        mixed_words = sum(
            1
            for word in text.split()
            if any(ch.isascii() and ch.isalpha() for ch in word)
            and any("CYRILLIC" in unicodedata.name(ch, "") for ch in word)
        )
        return lower - 2 * junk - 2 * max(0.0, accented - 0.5 * len(letters)) - 3 * mixed_words

    return max(_SHORT_TEXT_CHARSETS, key=score)  # ties keep the earlier, more common charset


def _codec_alias(charset: str) -> str:
    # Outlook and friends write names Python does not know.
    return {"ks_c_5601-1987": "cp949", "x-user-defined": "cp1252", "unicode-1-1-utf-7": "utf-7"}.get(charset, charset)


def _decode_8bit(value: Any) -> str:
    """A header value as str with raw 8-bit bytes decoded, but RFC 2047 encoded words left alone."""
    if isinstance(value, email.header.Header):
        # compat32 wraps a header with raw 8-bit bytes in a Header whose chunks are those bytes.
        value = "".join(
            _decode_chunk(chunk, charset) if isinstance(chunk, bytes) else chunk
            for chunk, charset in email.header.decode_header(value)
        )
    text = str(value)
    if not text.isascii() and _SURROGATE.search(text):
        text = decode_text(text.encode("ascii", "surrogateescape"), None, [])
    return text


def decode_header_value(value: Any) -> str:
    """A header value as text: RFC 2047 words decoded, raw 8-bit bytes decoded by guess."""
    if value is None:
        return ""
    text = _decode_8bit(value)
    if "=?" in text and _ENCODED_WORD.search(text):
        text = _decode_encoded_words(text)
    return text


def _decode_encoded_words(text: str) -> str:
    try:
        pieces = email.header.decode_header(text)
    except Exception:  # a malformed encoded word: show it as it was sent
        return text
    return "".join(chunk if isinstance(chunk, str) else _decode_chunk(chunk, charset) for chunk, charset in pieces)


def _decode_chunk(chunk: bytes, charset: str | None) -> str:
    # "unknown-8bit" is what the stdlib calls raw 8-bit header bytes: guess them like an undeclared body.
    if charset and charset.lower() != "unknown-8bit":
        try:
            return chunk.decode(_codec_alias(charset.lower()))
        except (LookupError, UnicodeError):
            pass
    return decode_text(chunk, None, [])


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _filename(part: email.message.Message) -> str | None:
    # Without "name" in either header there is no filename= or name= parameter (RFC 2231's filename*= and
    # name*0*= included): most body parts, whose parameters the stdlib would otherwise parse twice.
    if not any("name" in str(part.get(header, "")).lower() for header in ("content-disposition", "content-type")):
        return None
    try:
        name = part.get_filename()
    except Exception:  # a broken RFC 2231 continuation raises from the stdlib
        name = None
    if name is None:
        param = part.get_param("name", header="content-type")
        name = email.utils.collapse_rfc2231_value(param) if isinstance(param, tuple) else param
    if not name:
        return None
    return decode_header_value(name)


def safe_filename(name: str, max_bytes: int = 200) -> str:
    """A name safe to show and to use on any file system: no directories, no control characters."""
    name = unicodedata.normalize("NFC", name)
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = _CONTROL.sub("", name).strip().lstrip(".").strip()
    if name in ("", ".", ".."):
        return ""
    if len(name.encode("utf-8")) > max_bytes:
        stem, dot, ext = name.rpartition(".")
        ext = ext if dot and len(ext) <= 10 else ""
        stem = stem if ext else name
        budget = max_bytes - len(ext.encode("utf-8")) - 1
        stem = stem.encode("utf-8")[:budget].decode("utf-8", "ignore")
        name = f"{stem}.{ext}" if ext else stem
    return name


def _fallback_name(part: email.message.Message, ctype: str, content_id: str | None, index: int) -> str:
    if ctype == "message/rfc822":
        inner = part.get_payload()
        subject = ""
        if isinstance(inner, list) and inner and isinstance(inner[0], email.message.Message):
            subject = _one_line(decode_header_value(inner[0].get("Subject", "")))
        return (safe_filename(subject)[:80] or f"attached-message-{index}") + ".eml"
    if ctype == "application/ms-tnef":
        return "winmail.dat"
    ext = mimetypes.guess_extension(ctype, strict=False) or ".bin"
    stem = safe_filename(content_id.split("@", 1)[0]) if content_id else ""
    return f"{stem or f'part-{index}'}{ext}"


def _content_id(value: Any) -> str | None:
    if not value:
        return None
    cid = str(value).strip().strip("<>").strip()
    return cid or None


def _first_msgid(value: Any) -> str | None:
    if not value:
        return None
    text = decode_header_value(value)
    match = _MSGID.search(text)
    if match:
        return match.group(1)
    token = text.strip().split()
    return token[0] if token else None


def _references(in_reply_to: Any, references: Any) -> tuple[str, ...]:
    """In-Reply-To first, then References newest first, deduplicated: the order threading tries them."""
    ids = [m for m in (_first_msgid(in_reply_to),) if m]
    ids += reversed(_MSGID.findall(decode_header_value(references or "")))
    return tuple(dict.fromkeys(ids))


def _addresses(pairs: Sequence[tuple[str, str]] | None) -> tuple[Address, ...]:
    out: list[Address] = []
    for name, address in pairs or ():
        address = (address or "").strip()
        if "@" not in address:
            continue
        out.append(Address(name=_one_line(decode_header_value(name or "")), address=address))
    return tuple(out)


# RFC 6531 allows UTF-8 in both halves; \w covers letters of every script.
_ADDR_SPEC = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")


def _lenient_addresses(text: str) -> tuple[Address, ...]:
    out: list[Address] = []
    for match in _ADDR_SPEC.finditer(text):
        name = text[: match.start()].strip().strip('"<> ,').strip() if not out else ""
        out.append(Address(name=_one_line(name), address=match.group(0)))
    return tuple(out)


def _first(items: tuple[Address, ...]) -> Address | None:
    return items[0] if items else None


def _date(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
