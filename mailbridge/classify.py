"""Classify stage: is this mail from a person who may get an automatic answer, or from a machine (an
out-of-office reply, a bounce, a mailing list, our own mail come back)? Answering machines is how mail
loops start, so every reason not to answer is named and recorded on the mail's article.

The checks follow RFC 3834 (Auto-Submitted), RFC 2369/2919 (List-*), RFC 3464/8098 (delivery and read
reports) and what Exchange and the common responders add (X-Auto-Response-Suppress, X-Autoreply,
Precedence). "Auto-Submitted: no" is an ordinary human mail.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from mailbridge.ingest.mail import ParsedMail
from mailbridge.models import MailKind

_LIST_HEADERS = (
    "list-id",
    "list-unsubscribe",
    "list-post",
    "list-subscribe",
    "list-help",
    "list-owner",
    "mailing-list",
    "x-mailing-list",
    "x-ml-name",
    "x-mlserver",  # fml
)
# Subjects responders put before the original one (Outlook, Gmail, Exchange, Thunderbird, in several languages).
_AUTO_REPLY_SUBJECT = re.compile(
    r"^\s*(auto(matic|matische)?[ -]?(reply|response|antwort|answer)|autoreply|out of (the )?office|"
    r"abwesenheitsnotiz|odpowied[źz] automatyczna|r[ée]ponse automatique|respuesta autom[áa]tica|"
    r"risposta automatica|automatisch antwoord|automatiskt svar|vacation reply)\b",
    re.IGNORECASE,
)
_SUPPRESS = {"oof", "autoreply", "all"}
_ABUSE_REPORT_SUBJECT = re.compile(r"^\s*complaint about message from\b", re.IGNORECASE)  # Hotmail's JMRP
_NOREPLY = re.compile(r"^(no[-_.]?reply|do[-_.]?not[-_.]?reply|noreply[-_.+].*|.*[-_.+]no[-_.]?reply)$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: MailKind
    no_answer_reason: str | None = None  # None: a person wrote it, it may be answered


HUMAN = Verdict(MailKind.HUMAN)


def classify(mail: ParsedMail, own_addresses: Collection[str], loop_id: str) -> Verdict:
    sender = mail.sender.address.lower() if mail.sender else ""
    for value in mail.header_values("x-loop"):
        if loop_id.lower() in value.lower():
            return Verdict(MailKind.OWN, f"X-Loop names us ({loop_id})")
    if sender and sender in own_addresses:
        return Verdict(MailKind.OWN, f"sent from our own address {sender}")
    if (verdict := _report(mail)) is not None:
        return verdict
    if (verdict := _auto_reply(mail)) is not None:
        return verdict
    if (verdict := _list(mail)) is not None:
        return verdict
    if not sender or sender == "unknown-sender@invalid":
        return Verdict(MailKind.HUMAN, "no sender address to answer")
    if _NOREPLY.match(sender.partition("@")[0]):
        return Verdict(MailKind.HUMAN, f"no-reply sender {sender}")
    return HUMAN


def _report(mail: ParsedMail) -> Verdict | None:
    report = mail.report
    if report is None:
        return None
    if report.report_type == "disposition-notification":
        return Verdict(MailKind.REPORT, "a read receipt (multipart/report; disposition-notification)")
    if report.report_type is not None and report.report_type not in ("delivery-status", "unknown"):
        return Verdict(MailKind.REPORT, f"a report (multipart/report; report-type={report.report_type})")
    if report.report_type is not None:
        return Verdict(MailKind.BOUNCE, f"a delivery report (multipart/report; report-type={report.report_type})")
    if report.failed or report.delayed:
        return Verdict(
            MailKind.BOUNCE, "a bounce (failed recipients: " + ", ".join(report.failed + report.delayed) + ")"
        )
    if _ABUSE_REPORT_SUBJECT.match(mail.subject):
        return Verdict(MailKind.REPORT, "an abuse complaint report")
    if report.from_mail_system:
        return Verdict(MailKind.BOUNCE, f"sent by the mail system ({mail.sender.address if mail.sender else '?'})")
    return_path = mail.header("return-path")
    if return_path is not None and return_path.strip() in ("<>", ""):
        return Verdict(MailKind.BOUNCE, "empty Return-Path (<>): a bounce or an automatic notice")
    return None


def _auto_reply(mail: ParsedMail) -> Verdict | None:
    auto_submitted = mail.header("auto-submitted")
    if auto_submitted is not None:
        keyword = auto_submitted.split(";")[0].strip().lower()
        if keyword and keyword != "no":
            return Verdict(MailKind.AUTO_REPLY, f"Auto-Submitted: {keyword}")
    for name in ("x-autoreply", "x-autorespond", "x-autoresponder"):
        if mail.header(name) is not None:
            return Verdict(MailKind.AUTO_REPLY, f"{name.title()} header")
    suppress = mail.header("x-auto-response-suppress")
    if suppress is not None:
        flags = {f.strip().lower() for f in suppress.split(",")}
        if flags & _SUPPRESS:
            return Verdict(MailKind.AUTO_REPLY, f"X-Auto-Response-Suppress: {suppress.strip()}")
    precedence = (mail.header("precedence") or "").strip().lower()
    if precedence == "auto_reply":
        return Verdict(MailKind.AUTO_REPLY, "Precedence: auto_reply")
    if _AUTO_REPLY_SUBJECT.match(mail.subject):
        return Verdict(MailKind.AUTO_REPLY, f"the subject of an automatic reply ({mail.subject[:60]!r})")
    return None


def _list(mail: ParsedMail) -> Verdict | None:
    precedence = (mail.header("precedence") or "").strip().lower()
    if precedence in ("bulk", "junk", "list"):
        return Verdict(MailKind.LIST, f"Precedence: {precedence}")
    for name in _LIST_HEADERS:
        if mail.header(name) is not None:
            return Verdict(MailKind.LIST, f"{'-'.join(w.title() for w in name.split('-'))} header: a mailing list")
    return None
