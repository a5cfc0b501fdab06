"""Delivery reports: is this mail a bounce (or a read receipt, an abuse report), which of our mails does it
return, and which recipients failed. Runs in the parser workers, on the parsed MIME tree.

flufl.bounce (Mailman's bounce detector, 30-odd MTA formats) finds the failed recipients. It is run only on
mails that look like a report: its detectors scan whole bodies and cost ~20 ms on an ordinary mail with
attachments, against ~0.2 ms on a bounce.
"""

from __future__ import annotations

import email.header
import email.message
import email.utils
import logging
import re

from flufl.bounce import all_failures

from mailbridge.ingest.mail import DeliveryReport

# flufl.bounce logs a traceback when one of its detectors trips over a mail; we fall back quietly.
logging.getLogger("flufl.bounce").setLevel(logging.CRITICAL)

# Local parts of mail-system senders, compared without "-", "_" and "." (MAILER-DAEMON, post_master …).
REPORT_SENDERS = {"mailerdaemon", "maildaemon", "postmaster", "mdaemon", "maildeliverysystem", "maildeliverysubsystem"}
# Subjects under which mail systems send reports. They only decide whether flufl.bounce looks at the
# mail; it is a bounce when flufl.bounce finds failed recipients (or other evidence below says so).
_REPORT_SUBJECT = re.compile(
    r"undeliver|not (be )?delivered|delivery (status|fail|warning|notification|problem|report|delay)|"
    r"mail delivery|returned mail|failure notice|non[- ]?deliver|delivery has failed|could not send|"
    r"mail system error|message (delivery )?(failure|delay)|delivery delayed|permanent error|"
    r"unzustellbar|nie(dostarcz| można dostarczyć)|complaint about message",
    re.IGNORECASE,
)
_RETURNED_PARTS = {"message/rfc822", "text/rfc822-headers", "message/rfc822-headers"}
_MESSAGE_ID_LINE = re.compile(r"^message-id:\s*(<[^<>\s]+>)", re.IGNORECASE | re.MULTILINE)


def read_report(message: email.message.Message, sender: str | None) -> DeliveryReport | None:
    report_type = (
        str(message.get_param("report-type", "") or "").lower() or "unknown"
        if message.get_content_type() == "multipart/report"
        else None
    )
    types = {part.get_content_type() for part in message.walk()}
    return_path = message.get("Return-Path")
    from_mail_system = _is_mail_system(sender) or _is_mail_system(str(return_path or ""))
    looks_like_report = (
        report_type is not None
        or "message/delivery-status" in types
        or from_mail_system
        or (return_path is not None and str(return_path).strip() in ("<>", ""))
        or bool(_REPORT_SUBJECT.search(decode_header_text(message.get("Subject", ""))))
    )
    if not looks_like_report:
        return None
    if report_type is None and "message/delivery-status" in types:
        report_type = "delivery-status"
    failed: set[str] = set()
    delayed: set[str] = set()
    if report_type not in ("disposition-notification", "feedback-report"):
        try:
            temporary, permanent = all_failures(message)
        except Exception:  # a detector that trips over one mail must not lose it
            temporary, permanent = frozenset(), frozenset()
        failed = {_text(a) for a in permanent}
        delayed = {_text(a) for a in temporary} - failed
        if not failed and not delayed:
            failed = _quoted_dsn_failures(message)
    return DeliveryReport(
        report_type=report_type,
        from_mail_system=from_mail_system,
        failed=tuple(sorted(a for a in failed if a)),
        delayed=tuple(sorted(a for a in delayed if a)),
        returned_message_ids=_returned_message_ids(message),
    )


_DSN_RECIPIENT = re.compile(
    r"^[> \t]*Final-Recipient:\s*rfc822;\s*<?([^\s<>;]+@[^\s<>;]+)>?\s*$"
    r"(?:\n[> \t]*[A-Za-z-]+:.*$)*?\n[> \t]*Action:\s*failed",
    re.IGNORECASE | re.MULTILINE,
)


def _quoted_dsn_failures(message: email.message.Message) -> set[str]:
    """Failed recipients from delivery-status fields quoted in the text (a bounce forwarded as text),
    which flufl.bounce does not read."""
    found: set[str] = set()
    for part in message.walk():
        if part.get_content_type() == "text/plain":
            found.update(a.lower() for a in _DSN_RECIPIENT.findall(_part_text(part).replace("\r\n", "\n")))
    return found


def _is_mail_system(address: str | None) -> bool:
    local_part = (address or "").strip().strip("<>").partition("@")[0].lower()
    return re.sub(r"[-_.\\]", "", local_part) in REPORT_SENDERS


def decode_header_text(value: object) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(str(value))))
    except Exception:
        return str(value)


def _returned_message_ids(message: email.message.Message) -> tuple[str, ...]:
    """Message-IDs of the mail a report returns: from the attached original or its headers, or, for
    reports that quote it as text, from a "Message-ID:" line in the body."""
    own = _strip(message.get("Message-ID"))
    found: list[str] = []
    for part in message.walk():
        ctype = part.get_content_type()
        if ctype in _RETURNED_PARTS:
            payload = part.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else payload
            if isinstance(inner, email.message.Message):
                found.append(_strip(inner.get("Message-ID")) or "")
            else:
                found += [_strip(m) or "" for m in _MESSAGE_ID_LINE.findall(_part_text(part))]
        elif ctype == "text/plain" and part is not message:
            found += [_strip(m) or "" for m in _MESSAGE_ID_LINE.findall(_part_text(part))]
    if not found and not message.is_multipart():
        found = [_strip(m) or "" for m in _MESSAGE_ID_LINE.findall(_part_text(message))]
    return tuple(dict.fromkeys(m for m in found if m and m != own))


def _part_text(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload.decode("utf-8", "replace")
    return str(part.get_payload() or "")


def _strip(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    match = re.search(r"<([^<>\s]+)>", text)
    return match.group(1) if match else (text or None)


def _text(address: bytes | str) -> str:
    value = address.decode("utf-8", "replace") if isinstance(address, bytes) else address
    return value.strip().strip("<>").lower()
