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
from typing import TYPE_CHECKING

from mailbridge.ingest.mail import ParsedMail

if TYPE_CHECKING:  # not imported at run time: the parser workers route without pydantic and PyYAML
    from mailbridge.customers import CrmAnswer, CustomerDirectory, Organisation
    from mailbridge.routing_rules import CustomerSettings, Keywords, RoutingSettings, Rule

_WORD = re.compile(r"\w+")
# Letters NFKD does not take apart.
_PLAIN = str.maketrans({"ł": "l", "Ł": "l", "ø": "o", "đ": "d", "ß": "ss", "æ": "ae", "œ": "oe"})


def words(text: str) -> list[str]:
    """Lower-case words without diacritics: 'Fakturę' -> 'fakture'."""
    return _WORD.findall(folded(text))


def folded(text: str) -> str:
    """`fold`, fast: what `words` splits into words, and what a keyword without words is looked for in."""
    if text.isascii():  # nothing to take apart: a third of all mail, and every keyword we compile
        return text.lower()
    return text.translate(_FOLDED)


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

    def __init__(self, text_words: Sequence[str], folded_text: str = "") -> None:
        self.words = text_words
        self.unique = set(text_words)
        self.folded = folded_text  # the whole text folded: where keywords without words are looked for
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
    parts: tuple[str, ...]  # its words; none for a keyword of punctuation only ("!!!", ":-(")
    prefix: bool  # the last part may have any ending
    shown: str  # for `rules explain`
    # A keyword without words is looked for as it is written (folded), anywhere: "!!!" is in "pilne!!!!".
    literal: re.Pattern[str] | None = None

    @classmethod
    def of(cls, text: str) -> _Keyword:
        prefix = text.rstrip().endswith("*")
        parts = tuple(words(text.rstrip(" *")))
        if parts:
            return cls(parts, prefix, " ".join(parts) + ("*" if prefix else ""))
        # Runs of white space in it match any run of white space (a line break in the mail, say).
        pieces = folded(text.strip(" *")).split()
        if not pieces:
            raise ValueError(f"keyword {text!r} has nothing to look for (only spaces, asterisks or accents)")
        return cls((), False, " ".join(pieces), re.compile(r"\s+".join(re.escape(piece) for piece in pieces)))

    def found_in(self, index: TextIndex) -> bool:
        if self.literal is not None:
            return self.literal.search(index.folded) is not None
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


def check_keyword(text: str) -> None:
    """Raise ValueError when the keyword could match nothing (or everything): the configuration's check."""
    _Keyword.of(text)


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
    # For explaining (`by_rules(explain=True)`); left empty on the parser workers: the rule objects and the
    # reasons they matched would cost more to build and to send to the main process than the rest.
    matched: tuple[RuleMatch, ...] = field(default=(), repr=False)
    organisation: Organisation | None = None
    rule_names: tuple[str, ...] = ()
    customer_source: str | None = None  # where the organisation comes from: directory or CRM
    customer_problem: str | None = None  # why the CRM could not say who the customer is

    @property
    def summary(self) -> str:
        rules = ", ".join(self.rule_names) or "none"
        summary = f"queue {self.queue} (confidence {self.confidence:.2f}; rules: {rules})"
        if self.organisation is not None:
            summary += f"; customer {self.organisation.name} from the {self.customer_source}"
        elif self.customer_problem is not None:
            summary += f"; customer unknown: {self.customer_problem}"
        return summary


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The rules compiled, and what decides with them, as plain data: what the parser workers get (pickled
    once per worker) instead of the settings, so that they neither import the configuration's models
    (pydantic: 0.2 CPU s and 12 MiB more in every worker) nor compile the rules again."""

    rules: tuple[_CompiledRule, ...]
    default_queue: str | None
    triage_queue: str
    triage_threshold: float

    @classmethod
    def of(cls, settings: RoutingSettings) -> RuleSet:
        return cls(
            tuple(_CompiledRule.of(rule) for rule in settings.rules),
            settings.default_queue,
            settings.triage_queue,
            settings.triage_threshold,
        )

    def for_workers(self) -> RuleSet:
        """Without the rules as configured (only `rules explain` shows them)."""
        return replace(self, rules=tuple(replace(rule, rule=None) for rule in self.rules))


class Router:
    # Decisions remembered (a few kB each at most: a worker's memory stays bounded whatever the mail).
    DECISIONS_LIMIT = 2_000

    def __init__(self, settings: RoutingSettings | RuleSet, directory: CustomerDirectory | None = None) -> None:
        """From the settings, or (in a parser worker) from the rules compiled by the daemon (then without
        customers: the main process looks them up)."""
        self._customers: CustomerSettings | None = None
        if isinstance(settings, RuleSet):
            self.rule_set = settings
        else:
            self.rule_set, self._customers = RuleSet.of(settings), settings.customers
        self.directory = directory
        self._rules = self.rule_set.rules
        self._gates = _Gates(self._rules)
        self._proven = {index for index, rule in enumerate(self._rules) if rule.proven}
        # The decision by the rules that hold (their indexes in order), remembered: it depends on nothing else,
        # and mail that matches the same rules is common (a topic's mails, a customer's, the same words).
        self._decisions: dict[tuple[int, ...], Decision] = {}

    def route(self, mail: ParsedMail, mailbox: str, crm: CrmAnswer | None = None) -> Decision:
        return self.with_customer(self.by_rules(mail, mailbox), mail, crm)

    def by_rules(self, mail: ParsedMail, mailbox: str, explain: bool = True) -> Decision:
        """The rules' decision (CPU work: the parser workers do it, beside parsing). Without `explain` the
        decision is the same but carries no matches and why they matched (which only `rules explain` shows)."""
        if not self._rules:  # no rules: nothing to be unsure about
            return Decision(self.rule_set.default_queue)
        view = _MailView(mail, mailbox)
        candidates = sorted(self._gates.candidates(view))  # in the rules' order: the first queue wins
        rules = self._rules
        if not explain:
            proven = self._proven
            holding = tuple(i for i in candidates if i in proven or rules[i].holds(view))
            decision = self._decisions.get(holding)
            if decision is None:
                decision = self._decide([rules[i] for i in holding], ())
                if len(self._decisions) < self.DECISIONS_LIMIT:
                    self._decisions[holding] = decision
            return decision
        matches = [(rules[i], m) for i in candidates if (m := rules[i].match(view))]
        return self._decide([rule for rule, _ in matches], tuple(m for _, m in matches))

    def knows(self, address: str) -> bool:
        """The directory knows this sender (then the CRM is not asked)."""
        return self.directory is not None and self.directory.find(address) is not None

    def with_customer(self, decision: Decision, mail: ParsedMail, crm: CrmAnswer | None = None) -> Decision:
        """The customer's organisation: its tier sets at least its priority, its account manager the owner.
        The directory is asked first (what the admins wrote down on purpose wins), then the CRM's answer
        `crm`, looked up beforehand. When the CRM could not say, the rules alone decide and the ticket is
        flagged: a human checks who the customer is."""
        if mail.sender is None:
            return decision
        organisation = self.directory.find(mail.sender.address) if self.directory is not None else None
        source = "directory"
        if organisation is None and crm is not None:
            if crm.problem is not None:
                flag = f"customer unknown: {crm.problem}; routed by the rules alone"
                triage = f"{decision.triage_reason}; {flag}" if decision.triage_reason else flag
                return replace(decision, triage_reason=triage, customer_problem=crm.problem)
            organisation, source = crm.organisation, "CRM"
        customers = self._customers
        if organisation is None or customers is None:
            return decision
        priority = decision.priority
        tier_priority = customers.tier_priority.get(organisation.tier or "")
        if tier_priority is not None and (priority is None or tier_priority < priority):
            priority = tier_priority  # "P1" < "P2": the more urgent one
        owner = decision.owner or (organisation.account_manager if customers.account_manager_owns else None)
        return replace(decision, priority=priority, owner=owner, organisation=organisation, customer_source=source)

    def _decide(self, rules: Sequence[_CompiledRule], matched: tuple[RuleMatch, ...]) -> Decision:
        settings = self.rule_set
        # One pass over the matching rules (there can be dozens): the first queue wins, the first priority
        # and owner count, tags and queues in order without repeats, every later queue that differs conflicts.
        winner: _CompiledRule | None = None
        priority = owner = None
        tags_in_order: dict[str, None] = {}
        queues: dict[str, None] = {}
        triage: list[str] = []
        conflicting: list[_CompiledRule] = []
        for rule in rules:
            if rule.queue:
                if winner is None:
                    winner = rule
                elif rule.queue != winner.queue:
                    conflicting.append(rule)
                queues[rule.queue] = None
            if rule.priority and priority is None:
                priority = rule.priority
            if rule.owner and owner is None:
                owner = rule.owner
            for tag in rule.tags:
                tags_in_order[tag] = None
            if rule.triage:
                triage.append(rule.name)
        names = tuple(rule.name for rule in rules)
        tags = tuple(tags_in_order)
        queue = winner.queue if winner else None
        if winner is None and not triage:
            if settings.default_queue:  # no rule names a queue: the default one
                return Decision(settings.default_queue, priority, owner, tags, 1.0, matched=matched, rule_names=names)
            return Decision(
                settings.triage_queue,
                priority,
                owner,
                tags,
                0.0,
                "no routing rule decides this mail",
                matched=matched,
                rule_names=names,
            )
        confidence = winner.confidence if winner else 0.0
        candidates = tuple(queues)
        for other in conflicting:
            confidence *= 1 - other.confidence / 2
        why: list[str] = []
        if triage:
            why.append("rule " + ", ".join(triage) + " asks for a human")
        if conflicting:
            why.append("rules disagree: " + "; ".join(r.points_to for r in [winner, *conflicting] if r is not None))
        if confidence < settings.triage_threshold and not why:
            why.append(f"rule {winner.name if winner else '?'} is only {confidence:.2f} sure")
        if why:
            return Decision(
                settings.triage_queue,
                priority,
                owner,
                tags,
                round(confidence, 4),
                f"routing unsure (confidence {confidence:.2f} < {settings.triage_threshold}): "
                + "; ".join(why)
                + f"; candidates: {', '.join(candidates) or 'none'}",
                candidates,
                matched,
                rule_names=names,
            )
        confidence = round(confidence, 4)
        return Decision(queue, priority, owner, tags, confidence, None, candidates, matched, rule_names=names)


@dataclass(frozen=True, slots=True)
class _TextCondition:
    where: str  # subject, body, text or header
    header: str | None  # the header's name (where == "header")
    any_of: tuple[_Keyword, ...]
    all_of: tuple[_Keyword, ...]
    regex: re.Pattern[str] | None

    @property
    def label(self) -> str:
        return f"header {self.header}" if self.header is not None else self.where


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    """A rule with its keywords split into words and its address lists lower-cased, once."""

    rule: Rule | None  # as configured, for `rules explain`; None in the parser workers' copy
    texts: tuple[_TextCondition, ...]
    senders: frozenset[str] | None
    sender_domains: tuple[str, ...] | None
    recipients: frozenset[str] | None
    mailboxes: frozenset[str] | None
    has_attachments: bool | None
    # The field whose `any` keywords the gates have already found when they pick this rule (single words):
    gated: str | None
    # Picked by the gates, this rule holds: it asks for nothing but one of those words.
    proven: bool
    # What it decides, read once from the settings:
    name: str
    queue: str | None
    priority: str | None
    owner: str | None
    tags: tuple[str, ...]
    triage: bool
    confidence: float
    points_to: str  # "name -> queue", for the triage reason when rules disagree

    @classmethod
    def of(cls, rule: Rule) -> _CompiledRule:
        when = rule.when
        texts = []
        for where in ("subject", "body", "text", "header"):
            condition: Keywords | None = getattr(when, where)
            if condition is not None:
                texts.append(
                    _TextCondition(
                        where,
                        when.header.name if when.header is not None and where == "header" else None,
                        tuple(_Keyword.of(k) for k in condition.any),
                        tuple(_Keyword.of(k) for k in condition.all),
                        re.compile(condition.regex, re.IGNORECASE) if condition.regex else None,
                    )
                )
        gate = _Gates.gate(texts)
        gated_any = gate is not None and gate[1] is gate[0].any_of and all(len(k.parts) == 1 for k in gate[1])
        gated = gate[0].where if gate is not None and gated_any else None
        return cls(
            rule,
            tuple(texts),
            frozenset(s.lower() for s in when.sender) if when.sender is not None else None,
            tuple(d.lower() for d in when.sender_domain) if when.sender_domain is not None else None,
            frozenset(r.lower() for r in when.recipient) if when.recipient is not None else None,
            frozenset(when.mailbox) if when.mailbox is not None else None,
            when.has_attachments,
            gated,
            (
                gated is not None
                and all(c.where == gated and not c.all_of and c.regex is None for c in texts)
                and (when.sender, when.sender_domain, when.mailbox, when.recipient, when.has_attachments)
                == (None, None, None, None, None)
            ),
            rule.name,
            rule.then.queue,
            rule.then.priority,
            rule.then.owner,
            tuple(rule.then.tags),
            rule.then.triage,
            rule.confidence,
            f"{rule.name} -> {rule.then.queue}",
        )

    def holds(self, view: _MailView) -> bool:
        """Whether every condition holds, for a rule the gates picked (the parser workers' path)."""
        for condition in self.texts:
            if condition.any_of or condition.all_of:
                text = view.words(condition.where, condition.header)
                if (
                    condition.any_of
                    and condition.where != self.gated
                    and not any(k.found_in(text) for k in condition.any_of)
                ):
                    return False
                if condition.all_of and not all(k.found_in(text) for k in condition.all_of):
                    return False
            if condition.regex is not None and not condition.regex.search(view.text(condition.where, condition.header)):
                return False
        return self._envelope(view, None)

    def match(self, view: _MailView) -> RuleMatch | None:
        """`holds`, with why, for `rules explain`."""
        if self.rule is None:
            raise ValueError("a parser worker's copy of the rules cannot explain")
        why: list[str] = []
        for condition in self.texts:
            words_ = view.words(condition.where, condition.header)
            hit = _keywords_hold(
                condition.any_of,
                condition.all_of,
                condition.regex,
                words_,
                view.text(condition.where, condition.header),
            )
            if hit is None:
                return None
            why.append(f"{condition.label} has {hit}")
        return RuleMatch(self.rule, why) if self._envelope(view, why) else None

    def _envelope(self, view: _MailView, why: list[str] | None) -> bool:
        """Sender, mailbox, recipients, attachments; `why` (if any) gets what held."""
        sender = view.sender
        if self.senders is not None:
            if sender not in self.senders:
                return False
            if why is not None:
                why.append(f"sender {sender}")
        if self.sender_domains is not None:
            domain = sender.rpartition("@")[2]
            if not any(domain == d or domain.endswith("." + d) for d in self.sender_domains):
                return False
            if why is not None:
                why.append(f"sender domain {domain}")
        if self.mailboxes is not None:
            if view.mailbox not in self.mailboxes:
                return False
            if why is not None:
                why.append(f"mailbox {view.mailbox}")
        if self.recipients is not None:
            hits = view.recipients & self.recipients
            if not hits:
                return False
            if why is not None:
                why.append(f"sent to {', '.join(sorted(hits))}")
        if self.has_attachments is not None:
            if bool(view.mail.attachments) != self.has_attachments:
                return False
            if why is not None:
                why.append("attachments" if self.has_attachments else "no attachments")
        return True


class _Gates:
    """Most rules need one of a few words: an inverted index from words (and word beginnings) to those rules
    finds the handful worth checking, so 200 rules cost about what 5 do."""

    FIELDS = ("text", "subject", "body")

    def __init__(self, rules: Sequence[_CompiledRule]) -> None:
        self.always: set[int] = set()
        self.exact: dict[str, dict[str, set[int]]] = {f: {} for f in self.FIELDS}
        # Word beginnings by their first `shortest` letters: one lookup per word of the mail finds the few
        # beginnings it might have.
        self.prefix: dict[str, dict[str, list[tuple[str, set[int]]]]] = {f: {} for f in self.FIELDS}
        self.shortest: dict[str, int] = {}
        beginnings: dict[str, dict[str, set[int]]] = {f: {} for f in self.FIELDS}
        for index, rule in enumerate(rules):
            gate = self.gate(rule.texts)
            if gate is None:
                self.always.add(index)
                continue
            condition, needed = gate
            for keyword in needed:
                first = keyword.parts[0]
                if keyword.prefix and len(keyword.parts) == 1:
                    beginnings[condition.where].setdefault(first, set()).add(index)
                else:
                    self.exact[condition.where].setdefault(first, set()).add(index)
        for field_name, by_beginning in beginnings.items():
            if by_beginning:
                shortest = self.shortest[field_name] = min(len(b) for b in by_beginning)
                for beginning, indexes in sorted(by_beginning.items()):
                    self.prefix[field_name].setdefault(beginning[:shortest], []).append((beginning, indexes))
        # What each word of a mail gates, remembered per field: mail reuses its words (a language has few
        # common ones, a help desk's mail even fewer), so after the first mails most words are a set lookup.
        self._seen: dict[str, set[str]] = {f: set() for f in self.FIELDS}  # words whose rules are known
        self._gating: dict[str, dict[str, frozenset[int]]] = {f: {} for f in self.FIELDS}  # those that pick rules

    @classmethod
    def gate(cls, texts: Sequence[_TextCondition]) -> tuple[_TextCondition, tuple[_Keyword, ...]] | None:
        """Keywords a rule needs one of, and their condition: its `any` keywords, else the first of its `all`
        ones with words (on the text, subject or body); None: the rule is checked for every mail. A keyword
        without words ("!!!") is not in the index: `any` keywords with one of those cannot gate the rule."""
        for wanted in ("any_of", "all_of"):
            for where in cls.FIELDS:
                for condition in texts:
                    if condition.where != where:
                        continue
                    keywords: tuple[_Keyword, ...] = getattr(condition, wanted)
                    if wanted == "any_of" and keywords and all(k.parts for k in keywords):
                        return condition, keywords
                    if wanted == "all_of" and (with_words := [k for k in keywords if k.parts]):
                        return condition, (with_words[0],)
        return None

    SEEN_LIMIT = 100_000  # words remembered per field: a worker's memory stays bounded whatever the mail

    def candidates(self, view: _MailView) -> set[int]:
        found = set(self.always)
        for field_name in self.FIELDS:
            if not self.exact[field_name] and not self.prefix[field_name]:
                continue
            unique = view.words(field_name).unique
            seen, gating = self._seen[field_name], self._gating[field_name]
            for word in unique - seen:
                rules = self._rules_of(field_name, word)
                if len(seen) < self.SEEN_LIMIT:
                    seen.add(word)
                    if rules:
                        gating[word] = rules
                elif rules:  # not remembered: counted here
                    found |= rules
            for word in unique & gating.keys():
                found |= gating[word]
        return found

    def _rules_of(self, field_name: str, word: str) -> frozenset[int]:
        """The rules this word of the field picks: as a keyword, or by one of its word beginnings."""
        rules = set(self.exact[field_name].get(word, ()))
        prefix = self.prefix[field_name]
        if prefix:
            for beginning, indexes in prefix.get(word[: self.shortest[field_name]], ()):
                if word.startswith(beginning):
                    rules |= indexes
        return frozenset(rules)


def _keywords_hold(
    any_of: Sequence[_Keyword],
    all_of: Sequence[_Keyword],
    regex: re.Pattern[str] | None,
    text: TextIndex,
    raw: str,
) -> str | None:
    found = [k for k in any_of if k.found_in(text)]
    if any_of and not found:
        return None
    if all_of and not all(k.found_in(text) for k in all_of):
        return None
    if regex is not None and not regex.search(raw):
        return None
    shown = [k.shown for k in (found or all_of)]
    return ", ".join(f'"{s}"' for s in shown) or f"/{regex.pattern if regex else ''}/"


class _MailView:
    """The parts of a mail the conditions look at, each normalised once."""

    def __init__(self, mail: ParsedMail, mailbox: str) -> None:
        self.mail = mail
        self.mailbox = mailbox
        self.sender = mail.sender.address.lower() if mail.sender else ""
        self.recipients = {a.address.lower() for a in (*mail.to, *mail.cc)}
        self._texts: dict[tuple[str, str | None], str] = {}
        self._words: dict[tuple[str, str | None], TextIndex] = {}

    def text(self, where: str, header: str | None = None) -> str:
        key = (where, header)
        if key not in self._texts:
            if header is not None:
                text = "\n".join(self.mail.header_values(header.lower()))
            elif where == "subject":
                text = self.mail.subject
            elif where == "body":
                text = self.mail.new_text if self.mail.new_text is not None else self.mail.text
            else:
                text = f"{self.mail.subject}\n{self.text('body')}"
            self._texts[key] = text
        return self._texts[key]

    def words(self, where: str, header: str | None = None) -> TextIndex:
        key = (where, header)
        if key not in self._words:
            text = folded(self.text(where, header))
            self._words[key] = TextIndex(_WORD.findall(text), text)
        return self._words[key]
