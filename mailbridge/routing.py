"""Route stage: a new ticket's queue, priority, owner and tags, from the rules in the configuration, with
a confidence. Rules are tried in order; the first that sets a queue decides it, and later matches add what
is still unset (priority, owner, tags). Other matching rules that point to a different queue lower the
confidence; below the threshold, or when a rule says `triage`, the ticket goes to the triage queue, flagged,
with the candidate queues and why — a human decides what the rules cannot."""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mailbridge.customers import CustomerDirectory, Organisation
from mailbridge.ingest.mail import ParsedMail
from mailbridge.routing_rules import Keywords, RoutingSettings, Rule

_WORD = re.compile(r"\w+")
# Letters NFKD does not take apart.
_PLAIN = str.maketrans({"ł": "l", "Ł": "l", "ø": "o", "đ": "d", "ß": "ss", "æ": "ae", "œ": "oe"})


def words(text: str) -> list[str]:
    """Lower-case words without diacritics: 'Fakturę' -> 'fakture'."""
    if text.isascii():  # nothing to take apart: a third of all mail, and every keyword we compile
        return _WORD.findall(text.lower())
    return _WORD.findall(text.translate(_FOLDED))


def fold(text: str) -> str:
    """The definition of what `words` sees: ł -> l, case folded, NFKD, combining marks dropped."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_PLAIN).casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


class _FoldedCharacters(dict[int, str]):
    """`fold` character by character, remembered, for `str.translate`: four times faster than `fold`, and
    the same: case folding and the NFKD decomposition are per character, and the only thing NFKD does across
    characters (reordering combining marks) concerns marks that `fold` drops anyway."""

    LIMIT = 20_000  # characters remembered; a mail of every script cannot grow a worker without bound

    def __missing__(self, ordinal: int) -> str:
        folded = fold(chr(ordinal))
        if len(self) < self.LIMIT:
            self[ordinal] = folded
        return folded


_FOLDED = _FoldedCharacters()


class TextIndex:
    """A text's words, indexed once so that each keyword is a lookup: 200 rules cost no more than a few."""

    def __init__(self, text_words: Sequence[str]) -> None:
        self.words = text_words
        self.unique = set(text_words)
        self._sorted: list[str] | None = None
        self._positions: dict[str, list[int]] | None = None

    def has_prefix(self, prefix: str) -> bool:
        if self._sorted is None:
            self._sorted = sorted(self.unique)
        at = bisect.bisect_left(self._sorted, prefix)
        return at < len(self._sorted) and self._sorted[at].startswith(prefix)

    def positions(self, word: str) -> list[int]:
        if self._positions is None:
            self._positions = {}
            for position, w in enumerate(self.words):
                self._positions.setdefault(w, []).append(position)
        return self._positions.get(word, [])


@dataclass(frozen=True, slots=True)
class _Keyword:
    parts: tuple[str, ...]
    prefix: bool  # the last part may have any ending

    @classmethod
    def of(cls, text: str) -> _Keyword:
        prefix = text.rstrip().endswith("*")
        return cls(tuple(words(text.rstrip(" *"))), prefix)

    def found_in(self, index: TextIndex) -> bool:
        first, n = self.parts[0], len(self.parts)
        if n == 1:
            return index.has_prefix(first) if self.prefix else first in index.unique
        if first not in index.unique:
            return False
        text = index.words
        for start in index.positions(first):
            if start + n > len(text):
                break
            if all(text[start + i] == self.parts[i] for i in range(1, n - 1)):
                last = text[start + n - 1]
                if last == self.parts[-1] or (self.prefix and last.startswith(self.parts[-1])):
                    return True
        return False


@dataclass(frozen=True, slots=True)
class RuleMatch:
    rule: Rule
    why: list[str]


@dataclass(frozen=True, slots=True)
class Decision:
    queue: str | None
    priority: str | None = None
    owner: str | None = None
    tags: tuple[str, ...] = ()
    confidence: float = 1.0
    triage_reason: str | None = None
    candidates: tuple[str, ...] = ()
    matched: tuple[RuleMatch, ...] = field(default=(), repr=False)  # for explaining; not sent between processes
    organisation: Organisation | None = None
    rule_names: tuple[str, ...] = ()

    def portable(self) -> Decision:
        """Without the rule objects (cheap to send from a parser worker)."""
        return replace(self, matched=())

    @property
    def summary(self) -> str:
        rules = ", ".join(self.rule_names) or "none"
        return f"queue {self.queue} (confidence {self.confidence:.2f}; rules: {rules})"


class Router:
    def __init__(self, settings: RoutingSettings, directory: CustomerDirectory | None = None) -> None:
        self.settings = settings
        self.directory = directory
        self._keywords: dict[int, dict[str, tuple[list[_Keyword], list[_Keyword], re.Pattern[str] | None]]] = {}
        for index, rule in enumerate(settings.rules):
            compiled = {}
            for where in ("subject", "body", "text", "header"):
                condition: Keywords | None = getattr(rule.when, where)
                if condition is not None:
                    compiled[where] = (
                        [_Keyword.of(k) for k in condition.any],
                        [_Keyword.of(k) for k in condition.all],
                        re.compile(condition.regex, re.IGNORECASE) if condition.regex else None,
                    )
            self._keywords[index] = compiled
        self._gates = _Gates(settings.rules, self._keywords)

    def route(self, mail: ParsedMail, mailbox: str) -> Decision:
        return self.with_customer(self.by_rules(mail, mailbox), mail)

    def by_rules(self, mail: ParsedMail, mailbox: str) -> Decision:
        """The rules' decision (CPU work: the parser workers do it, beside parsing)."""
        if not self.settings.rules:  # no rules: nothing to be unsure about
            return Decision(self.settings.default_queue)
        view = _MailView(mail, mailbox)
        candidates = self._gates.candidates(view)
        matches = [
            m for i, rule in enumerate(self.settings.rules) if i in candidates and (m := self._match(i, rule, view))
        ]
        return replace(self._decide(matches), rule_names=tuple(m.rule.name for m in matches))

    def with_customer(self, decision: Decision, mail: ParsedMail) -> Decision:
        """The customer's organisation: its tier sets at least its priority, its account manager the owner."""
        if self.directory is None or mail.sender is None:
            return decision
        organisation = self.directory.find(mail.sender.address)
        if organisation is None:
            return decision
        customers = self.settings.customers
        priority = decision.priority
        tier_priority = customers.tier_priority.get(organisation.tier or "")
        if tier_priority is not None and (priority is None or tier_priority < priority):
            priority = tier_priority  # "P1" < "P2": the more urgent one
        owner = decision.owner or (organisation.account_manager if customers.account_manager_owns else None)
        return replace(decision, priority=priority, owner=owner, organisation=organisation)

    def _decide(self, matches: list[RuleMatch]) -> Decision:
        settings = self.settings
        queue = priority = owner = None
        tags: list[str] = []
        winner: RuleMatch | None = None
        for match in matches:
            then = match.rule.then
            if then.queue and queue is None:
                queue, winner = then.queue, match
            priority = priority or then.priority
            owner = owner or then.owner
            tags += [t for t in then.tags if t not in tags]
        if winner is None and not any(m.rule.then.triage for m in matches):
            if settings.default_queue:  # no rule names a queue: the default one
                return Decision(settings.default_queue, priority, owner, tuple(tags), 1.0, matched=tuple(matches))
            return Decision(
                settings.triage_queue,
                priority,
                owner,
                tuple(tags),
                0.0,
                "no routing rule decides this mail",
                matched=tuple(matches),
            )
        confidence = winner.rule.confidence if winner else 0.0
        candidates = list(dict.fromkeys(m.rule.then.queue for m in matches if m.rule.then.queue))
        conflicting = [m for m in matches if m.rule.then.queue and m.rule.then.queue != queue]
        for other in conflicting:
            confidence *= 1 - other.rule.confidence / 2
        why: list[str] = []
        if any(m.rule.then.triage for m in matches):
            why.append("rule " + ", ".join(m.rule.name for m in matches if m.rule.then.triage) + " asks for a human")
        if conflicting:
            why.append(
                "rules disagree: "
                + "; ".join(f"{m.rule.name} -> {m.rule.then.queue}" for m in [winner, *conflicting] if m is not None)
            )
        if confidence < settings.triage_threshold and not why:
            why.append(f"rule {winner.rule.name if winner else '?'} is only {confidence:.2f} sure")
        if why:
            return Decision(
                settings.triage_queue,
                priority,
                owner,
                tuple(tags),
                round(confidence, 4),
                f"routing unsure (confidence {confidence:.2f} < {settings.triage_threshold}): "
                + "; ".join(why)
                + f"; candidates: {', '.join(candidates) or 'none'}",
                tuple(candidates),
                tuple(matches),
            )
        return Decision(
            queue, priority, owner, tuple(tags), round(confidence, 4), None, tuple(candidates), tuple(matches)
        )

    def _match(self, index: int, rule: Rule, view: _MailView) -> RuleMatch | None:
        when = rule.when
        why: list[str] = []
        for where, (any_of, all_of, regex) in self._keywords[index].items():
            if where == "header":
                assert when.header is not None
                texts = view.header_words(when.header.name)
                raw = view.header_text(when.header.name)
                label = f"header {when.header.name}"
            else:
                texts = view.words(where)
                raw = view.text(where)
                label = where
            hit = _keywords_hold(any_of, all_of, regex, texts, raw)
            if hit is None:
                return None
            why.append(f"{label} has {hit}")
        sender = view.sender
        if when.sender is not None:
            if sender not in {s.lower() for s in when.sender}:
                return None
            why.append(f"sender {sender}")
        if when.sender_domain is not None:
            domain = sender.rpartition("@")[2]
            if not any(domain == d.lower() or domain.endswith("." + d.lower()) for d in when.sender_domain):
                return None
            why.append(f"sender domain {domain}")
        if when.mailbox is not None:
            if view.mailbox not in when.mailbox:
                return None
            why.append(f"mailbox {view.mailbox}")
        if when.recipient is not None:
            hits = view.recipients & {r.lower() for r in when.recipient}
            if not hits:
                return None
            why.append(f"sent to {', '.join(sorted(hits))}")
        if when.has_attachments is not None:
            if bool(view.mail.attachments) != when.has_attachments:
                return None
            why.append("attachments" if when.has_attachments else "no attachments")
        return RuleMatch(rule, why)


class _Gates:
    """Most rules need one of a few words: an inverted index from words (and word beginnings) to those rules
    finds the handful worth checking, so 200 rules cost about what 5 do."""

    FIELDS = ("text", "subject", "body")

    def __init__(self, rules: Sequence[Rule], keywords: dict[int, dict[str, Any]]) -> None:
        self.always: set[int] = set()
        self.exact: dict[str, dict[str, set[int]]] = {f: {} for f in self.FIELDS}
        self.prefix: dict[str, dict[str, set[int]]] = {f: {} for f in self.FIELDS}
        self.prefix_lengths: dict[str, set[int]] = {f: set() for f in self.FIELDS}
        for index in range(len(rules)):
            gate = next(
                ((f, keywords[index][f][0]) for f in self.FIELDS if f in keywords[index] and keywords[index][f][0]),
                None,
            )
            if gate is None:
                self.always.add(index)
                continue
            field_name, any_of = gate
            for keyword in any_of:
                first = keyword.parts[0]
                if keyword.prefix and len(keyword.parts) == 1:
                    self.prefix[field_name].setdefault(first, set()).add(index)
                    self.prefix_lengths[field_name].add(len(first))
                else:
                    self.exact[field_name].setdefault(first, set()).add(index)

    def candidates(self, view: _MailView) -> set[int]:
        found = set(self.always)
        for field_name in self.FIELDS:
            exact, prefix, lengths = self.exact[field_name], self.prefix[field_name], self.prefix_lengths[field_name]
            if not exact and not prefix:
                continue
            for word in view.words(field_name).unique:
                if word in exact:
                    found |= exact[word]
                for length in lengths:
                    if len(word) >= length and (hit := prefix.get(word[:length])):
                        found |= hit
        return found


def _keywords_hold(
    any_of: list[_Keyword], all_of: list[_Keyword], regex: re.Pattern[str] | None, text: TextIndex, raw: str
) -> str | None:
    found = [k for k in any_of if k.found_in(text)]
    if any_of and not found:
        return None
    if all_of and not all(k.found_in(text) for k in all_of):
        return None
    if regex is not None and not regex.search(raw):
        return None
    shown = [" ".join(k.parts) + ("*" if k.prefix else "") for k in (found or all_of)]
    return ", ".join(f'"{s}"' for s in shown) or f"/{regex.pattern if regex else ''}/"


class _MailView:
    """The parts of a mail the conditions look at, each normalised once."""

    def __init__(self, mail: ParsedMail, mailbox: str) -> None:
        self.mail = mail
        self.mailbox = mailbox
        self.sender = mail.sender.address.lower() if mail.sender else ""
        self.recipients = {a.address.lower() for a in (*mail.to, *mail.cc)}
        self._words: dict[str, TextIndex] = {}

    def text(self, where: str) -> str:
        if where == "subject":
            return self.mail.subject
        if where == "body":
            return self.mail.new_text if self.mail.new_text is not None else self.mail.text
        return f"{self.mail.subject}\n{self.text('body')}"

    def words(self, where: str) -> TextIndex:
        if where not in self._words:
            self._words[where] = TextIndex(words(self.text(where)))
        return self._words[where]

    def header_text(self, name: str) -> str:
        return "\n".join(self.mail.header_values(name.lower()))

    def header_words(self, name: str) -> TextIndex:
        return TextIndex(words(self.header_text(name)))
