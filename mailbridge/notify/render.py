"""Templates -> a complete mail: subject, text part and HTML part from Jinja2, in a sandbox (an admin's
template cannot reach Python internals), HTML autoescaped; header values made safe before they are set.

Templates live in `<directory>/<language>/<name>.subject.txt|.txt|.html`; an admin's directory (config
`templates.directory`) overrides the shipped ones file by file.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email import base64mime
from email.header import Header
from email.utils import format_datetime, formataddr
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import ChoiceLoader, FileSystemLoader, StrictUndefined, Template, TemplateError, TemplateNotFound
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mailbridge.ingest.mail import Address
from mailbridge.models import TicketStatus, utcnow


def _shipped_templates() -> Path:
    """An installed wheel carries them as `mailbridge/templates` (see setup.py); a source checkout or an
    editable install has them in the repository's top-level `templates/`."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "templates"
    return installed if installed.is_dir() else package.parent / "templates"


SHIPPED_TEMPLATES = _shipped_templates()
TEMPLATES = (
    "ack",
    "status_changed",
    "closed",
    "agent_reply",
    "agent_unmatched",
    "agent_commands_refused",
    "sla_reminder",
    "sla_escalation",
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_MAX_SUBJECT = 500
_MAX_REFERENCES = 20
_FOLD_AT = 78  # RFC 5322 section 2.1.1: lines of at most 78 characters
_ENCODED_LINE = 76  # RFC 2047 section 2: a line with an encoded-word is at most 76 characters
_ENCODED_CHROME = len("=?utf-8?b??=")

STATUS_LABELS: dict[str, dict[str, str]] = {
    "en": {
        TicketStatus.NEW: "New",
        TicketStatus.OPEN: "Open",
        TicketStatus.WAITING_CUSTOMER: "Waiting for your reply",
        TicketStatus.WAITING_THIRD_PARTY: "Waiting for a third party",
        TicketStatus.CLOSED: "Closed",
    },
    "pl": {
        TicketStatus.NEW: "Nowe",
        TicketStatus.OPEN: "W realizacji",
        TicketStatus.WAITING_CUSTOMER: "Czeka na Twoją odpowiedź",
        TicketStatus.WAITING_THIRD_PARTY: "Czeka na stronę trzecią",
        TicketStatus.CLOSED: "Zamknięte",
    },
}


def status_context(old: str, new: str, language: str) -> dict[str, str]:
    """The `status` value of the status_changed template: the statuses and their labels in that language."""
    labels = STATUS_LABELS.get(language, STATUS_LABELS["en"])
    return {"old": old, "new": new, "old_label": labels.get(old, old), "new_label": labels.get(new, new)}


class TemplateProblem(Exception):
    """A template is missing or does not render; the message names the file."""


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    text: str
    html: str


class Renderer:
    def __init__(self, override: Path | None = None, shipped: Path = SHIPPED_TEMPLATES) -> None:
        loaders = [FileSystemLoader(str(d)) for d in (override, shipped) if d is not None]
        # Templates are checked at start-up and kept compiled: no stat() of three files per mail to see
        # whether one changed (an edited template takes effect, checked, at the next start).
        options: dict[str, Any] = {"loader": ChoiceLoader(loaders), "undefined": StrictUndefined, "auto_reload": False}
        self._text = ImmutableSandboxedEnvironment(autoescape=False, keep_trailing_newline=True, **options)
        self._html = ImmutableSandboxedEnvironment(autoescape=True, **options)
        self._compiled: dict[tuple[str, str], tuple[Template, Template, Template]] = {}

    def check(self, languages: Iterable[str], names: Sequence[str] = TEMPLATES) -> None:
        """At start-up: every template every mailbox needs exists and compiles."""
        for language in sorted(set(languages)):
            for name in names:
                for suffix, env in ((".subject.txt", self._text), (".txt", self._text), (".html", self._html)):
                    path = f"{language}/{name}{suffix}"
                    try:
                        env.get_template(path)
                    except TemplateNotFound:
                        raise TemplateProblem(f"template {path} not found (language {language!r})") from None
                    except TemplateError as exc:
                        raise TemplateProblem(f"template {path}: {exc}") from None

    def render(self, name: str, language: str, context: dict[str, Any]) -> Rendered:
        try:
            subject, text, html = (template.render(context) for template in self._templates(name, language))
        except TemplateError as exc:
            raise TemplateProblem(f"template {language}/{name}: {exc}") from None
        return Rendered(subject=header_safe(subject)[:_MAX_SUBJECT], text=text, html=html)

    def _templates(self, name: str, language: str) -> tuple[Template, Template, Template]:
        key = (name, language)
        if key not in self._compiled:
            self._compiled[key] = (
                self._text.get_template(f"{language}/{name}.subject.txt"),
                self._text.get_template(f"{language}/{name}.txt"),
                self._html.get_template(f"{language}/{name}.html"),
            )
        return self._compiled[key]


def header_safe(value: str) -> str:
    """One line: a value that reaches a header can never start another header."""
    return " ".join(_CONTROL.sub(" ", value).split())


@dataclass(frozen=True, slots=True)
class Envelope:
    sender: Address
    to: Sequence[Address]
    cc: Sequence[Address] = ()
    message_id: str = ""
    in_reply_to: str | None = None
    references: Sequence[str] = ()
    loop_id: str = ""
    # RFC 3834: "auto-replied" answers a mail (an acknowledgement), "auto-generated" is not an answer
    # (a status mail, an SLA reminder); None: a person's mail (an agent's relayed answer).
    auto_submitted: str | None = "auto-replied"

    @property
    def recipients(self) -> list[str]:
        return list(dict.fromkeys(a.address for a in (*self.to, *self.cc)))


@dataclass(frozen=True, slots=True)
class FileToSend:
    filename: str
    content_type: str
    data: bytes = field(repr=False)


def compose(rendered: Rendered, envelope: Envelope, files: Sequence[FileToSend] = ()) -> bytes:
    """RFC 5322 bytes: CRLF line ends, non-ASCII header text RFC 2047-encoded and folded, a text and an
    HTML alternative in quoted-printable UTF-8.

    Assembled from the standard library's encoders (formataddr, Header, binascii's QP) rather than with
    EmailMessage: its policy machinery costs 1.7 ms per mail, more than the rest of intake together."""
    headers = [
        ("From", _addresses([envelope.sender])),
        ("To", _addresses(envelope.to)),
        *([("Cc", _addresses(envelope.cc))] if envelope.cc else []),
        ("Subject", _encoded("Subject", rendered.subject)),
        ("Date", format_datetime(utcnow())),
        ("Message-ID", f"<{header_safe(envelope.message_id)}>"),
    ]
    if envelope.in_reply_to:
        headers.append(("In-Reply-To", f"<{_msgid(envelope.in_reply_to)}>"))
    references = [_msgid(r) for r in envelope.references if r and _msgid(r)][-_MAX_REFERENCES:]
    if references:
        headers.append(("References", "\r\n ".join(f"<{r}>" for r in references)))
    if envelope.auto_submitted:
        # RFC 3834: responders must not answer this; Exchange: no out-of-office back to us.
        headers += [("Auto-Submitted", envelope.auto_submitted), ("X-Auto-Response-Suppress", "All")]
        if envelope.auto_submitted == "auto-replied":
            headers.append(("Precedence", "auto_reply"))
    headers.append(("X-Loop", header_safe(envelope.loop_id)))
    alternative = _multipart("alternative", [_text_part("plain", rendered.text), _text_part("html", rendered.html)])
    body = _multipart("mixed", [alternative, *(_file_part(f) for f in files)]) if files else alternative
    head = "".join(f"{name}: {value}\r\n" for name, value in [*headers, ("MIME-Version", "1.0")]).encode("ascii")
    return head + body


def _multipart(subtype: str, parts: Sequence[bytes]) -> bytes:
    """A multipart entity: its Content-Type line, a blank line, the parts between boundaries."""
    boundary = f"=_mb_{secrets.token_hex(12)}"
    delimiter = f"--{boundary}\r\n".encode()
    head = f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode()
    return head + b"".join(delimiter + part + b"\r\n" for part in parts) + f"--{boundary}--\r\n".encode()


def _file_part(file: FileToSend) -> bytes:
    name = header_safe(file.filename) or "attachment"
    ctype = (
        header_safe(file.content_type)
        if re.fullmatch(r"[\w.+-]+/[\w.+-]+", file.content_type)
        else "application/octet-stream"
    )
    if name.isascii() and '"' not in name and "\\" not in name:
        disposition = f'attachment; filename="{name}"'
    else:  # RFC 2231
        disposition = f"attachment; filename*=utf-8''{quote(name, safe='')}"
    encoded = base64.encodebytes(file.data).replace(b"\n", b"\r\n")
    return (
        f"Content-Type: {ctype}\r\nContent-Disposition: {disposition}\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    ).encode() + encoded


def _addresses(addresses: Sequence[Address]) -> str:
    return ",\r\n ".join(formataddr((header_safe(a.name), header_safe(a.address)), charset="utf-8") for a in addresses)


def _encoded(name: str, value: str) -> str:
    text = header_safe(value)
    if text.isascii() and len(name) + 2 + len(text) <= _FOLD_AT:
        # What Header gives for a line that needs no folding (header_safe has left one space between
        # words, none at either end), without its ~25 µs of splitting and measuring: most subjects.
        return text
    if text.isascii():
        return Header(text, "us-ascii", maxlinelen=_FOLD_AT, header_name=name).encode(linesep="\r\n")
    # RFC 2047 encoded-words of whole characters, each line with one at most 76 characters long (the
    # first after "Name: "). Header(..., "utf-8") does the same but measures every prefix of every line
    # in both encodings: 1.2 ms for a 100-character Polish subject, the largest cost of an acknowledgement;
    # this takes 0.05 ms.
    first = (_ENCODED_LINE - len(name) - 2 - _ENCODED_CHROME) // 4 * 3
    rest = (_ENCODED_LINE - 1 - _ENCODED_CHROME) // 4 * 3
    chunks: list[str] = []
    start, size = 0, 0
    for index, character in enumerate(text):
        width = len(character.encode("utf-8"))
        if size + width > (rest if chunks else first):
            chunks.append(text[start:index])
            start, size = index, 0
        size += width
    chunks.append(text[start:])
    return "\r\n ".join(base64mime.header_encode(chunk, "utf-8") for chunk in chunks if chunk)


def _msgid(value: str) -> str:
    return header_safe(value).strip("<> ").replace(" ", "")


def _text_part(subtype: str, text: str) -> bytes:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").encode("utf-8")
    encoded = binascii.b2a_qp(lines, istext=True).replace(b"\n", b"\r\n")
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'.encode()
        + encoded
    )


_ADDR_SPEC = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


def sendable(address: Address) -> bool:
    """An address an SMTP server takes without SMTPUTF8 and that fits a header unchanged."""
    return len(address.address) <= 254 and _ADDR_SPEC.match(address.address) is not None
