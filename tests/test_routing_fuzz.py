"""The rule language fuzzed: every configuration that validates builds a router that routes any mail
without raising, decides the same with and without the word index, and finds a keyword written in the
mail as it is."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mailbridge.ingest.mail import Address, ParsedMail
from mailbridge.routing import Router, _MailView
from mailbridge.routing_rules import RoutingSettings

# Letters with and without diacritics, digits, punctuation, white space, the keyword's "*", combining
# marks, symbols that fold to letters (™, ½, ﬁ), and now and then anything at all.
_PIECES = st.one_of(
    st.sampled_from(list("aąbcćeęfkłnńoósśtuzżźAĄŁŻ019_!?.,:;-()[]*#@$%&+=/\\'\" \t\n")),
    st.sampled_from(["\u0301", "\u0328", "™", "½", "ﬁ", "ß", "İ", "ǅ", "…", "€", "—", "\u200b", "＊", "²"]),
    st.characters(codec="utf-8", exclude_categories=("Cs",)),
)
_TEXT = st.lists(_PIECES, max_size=12).map("".join)
_KEYWORD = st.lists(_PIECES, min_size=1, max_size=8).map("".join)
_REGEX = st.sampled_from([r"\bSRV-\d+", "!{3}", "", "^$", r"(?i)faktur", "ł", r"\s"])


@st.composite
def _keywords(draw: st.DrawFn) -> dict[str, Any]:
    found: dict[str, Any] = {"any": draw(st.lists(_KEYWORD, min_size=1, max_size=3))}
    if draw(st.booleans()):
        found["all"] = draw(st.lists(_KEYWORD, min_size=1, max_size=2))
    if draw(st.integers(0, 3)) == 0:
        found["regex"] = draw(_REGEX)
    if draw(st.integers(0, 5)) == 0:
        del found["any"]  # all and/or regex alone
        found.setdefault("regex", draw(_REGEX))
    return found


@st.composite
def _rule(draw: st.DrawFn) -> dict[str, Any]:
    when: dict[str, Any] = {}
    for where in ("subject", "body", "text"):
        if draw(st.booleans()):
            when[where] = draw(_keywords())
    if draw(st.integers(0, 3)) == 0:
        when["header"] = {"name": draw(st.sampled_from(["X-Priority", "Subject", "x-y"])), **draw(_keywords())}
    if draw(st.integers(0, 3)) == 0:
        when["sender_domain"] = draw(st.lists(st.sampled_from(["klient.example", "vip.example", "EXAMPLE"])))
    if draw(st.integers(0, 4)) == 0:
        when["mailbox"] = draw(st.lists(st.sampled_from(["support", "sales"])))
    if draw(st.integers(0, 4)) == 0:
        when["has_attachments"] = draw(st.booleans())
    if not when:
        when["text"] = draw(_keywords())
    then: dict[str, Any] = {}
    if draw(st.integers(0, 3)):
        then["queue"] = draw(st.sampled_from(["a", "b", "c.d"]))
    if draw(st.booleans()):
        then["priority"] = draw(st.sampled_from(["P1", "P3"]))
    if draw(st.integers(0, 5)) == 0:
        then["triage"] = True
    if draw(st.integers(0, 5)) == 0 or not then:
        then["tags"] = ["t"]
    return {
        "name": "",  # numbered by _rules
        "when": when,
        "then": then,
        "confidence": draw(st.sampled_from([1.0, 0.9, 0.5])),
    }


def _mail(subject: str, body: str, sender: str = "jan@klient.example", priority: str = "1") -> ParsedMail:
    return ParsedMail(
        subject=subject,
        sender=Address("Jan", sender),
        to=(Address("", "support@helpdesk.example"),),
        cc=(),
        reply_to=(),
        date=None,
        message_id=None,
        in_reply_to=None,
        references=(),
        text=body,
        html=None,
        attachments=(),
        body_parts=1,
        defects=(),
        headers=(("x-priority", priority), ("subject", subject)),
        raw_sha256=hashlib.sha256(f"{subject}{body}".encode()).hexdigest(),
        raw_size=len(subject) + len(body),
        dedup_key="k",
    )


def _router(rules: list[dict[str, Any]], default_queue: str | None) -> Router:
    try:
        routing = RoutingSettings.model_validate({"rules": rules, "default_queue": default_queue})
    except ValidationError:
        assume(False)  # not a configuration start-up would get to
        raise
    return Router(routing)  # what start-up builds (in the daemon and on each parser worker)


_SLOW = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


_RULES = st.lists(_rule(), min_size=1, max_size=4).map(
    lambda rules: [{**rule, "name": f"rule{n}"} for n, rule in enumerate(rules)]
)


@_SLOW
@given(
    rules=_RULES,
    default_queue=st.sampled_from([None, "general"]),
    subject=_TEXT,
    body=_TEXT,
)
def test_a_configuration_that_validates_routes_any_mail(
    rules: list[dict[str, Any]], default_queue: str | None, subject: str, body: str
) -> None:
    routing = _router(rules, default_queue)
    for mail in (_mail(subject, body), _mail(body, subject, "x@dzial.vip.example", "2")):
        for mailbox in ("support", "sales"):
            explained = routing.by_rules(mail, mailbox)
            assert routing.by_rules(mail, mailbox, explain=False) == replace(explained, matched=())
            # The word index only saves work: checking every rule decides the same.
            view = _MailView(mail, mailbox)
            every = [(rule, m) for rule in routing._rules if (m := rule.match(view))]
            assert explained == routing._decide([r for r, _ in every], tuple(m for _, m in every))
            routing.route(mail, mailbox)


@_SLOW
@given(keyword=_KEYWORD, before=_TEXT, after=_TEXT)
def test_a_keyword_written_in_the_mail_is_found(keyword: str, before: str, after: str) -> None:
    routing = _router([{"name": "r", "when": {"body": {"any": [keyword]}}, "then": {"queue": "hit"}}], "general")
    assert routing.route(_mail("", f"{before} {keyword} {after}"), "support").queue == "hit"
