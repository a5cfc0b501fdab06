"""The routing rule language, validated once at start-up (part of the configuration).

    routing:
      triage_threshold: 0.95
      default_queue: general          # no rule matched (leave out: such tickets go to triage)
      rules:
        - name: invoices
          when:                       # every condition must hold
            text: {any: ["faktur*", invoice]}      # subject or body; "*" = any ending (fakturę, faktury)
            sender_domain: [klient.example]
          then: {queue: accounting, priority: P3, tags: [billing]}
          confidence: 0.97            # how sure this rule is (default 1.0)

Keywords match whole words, case- and diacritic-insensitively ("faktura" matches "FAKTURA", "fąktura");
a keyword ending in "*" matches any ending; a keyword of several words matches them in a row. A keyword
without letters or digits ("!!!", ":-(") is looked for as written, anywhere in the text, not as a word
("!!!" matches "pilne!!!!"); white space in it matches any white space.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Keywords(_Strict):
    any: list[str] = Field(default_factory=list)
    all: list[str] = Field(default_factory=list)
    regex: str | None = None

    @model_validator(mode="after")
    def _something(self) -> Keywords:
        if not (self.any or self.all or self.regex):
            raise ValueError("give any, all or regex")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} is not valid: {exc}") from None
        # The engine's folding decides what a keyword is (imported here: routing.py imports this module).
        from mailbridge.routing import check_keyword

        for word in (*self.any, *self.all):
            if not word.strip(" *"):
                raise ValueError("a keyword cannot be empty")
            check_keyword(word)
        return self


class HeaderCondition(Keywords):
    name: str = Field(min_length=1)


class Conditions(_Strict):
    subject: Keywords | None = None
    body: Keywords | None = None
    text: Keywords | None = None  # subject or body
    header: HeaderCondition | None = None
    sender: list[str] | None = None  # addresses
    sender_domain: list[str] | None = None
    mailbox: list[str] | None = None  # the mailbox (channel) names
    recipient: list[str] | None = None  # To/Cc addresses
    has_attachments: bool | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> Conditions:
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise ValueError("when: needs at least one condition")
        return self


class Actions(_Strict):
    queue: str | None = Field(default=None, pattern=r"^[\w.-]+$")
    priority: Literal["P1", "P2", "P3", "P4"] | None = None
    owner: str | None = None
    tags: list[str] = Field(default_factory=list)
    triage: bool = False  # a known exception: always a human's decision

    @model_validator(mode="after")
    def _something(self) -> Actions:
        if not (self.queue or self.priority or self.owner or self.tags or self.triage):
            raise ValueError("then: needs at least one of queue, priority, owner, tags, triage")
        return self


class Rule(_Strict):
    name: str = Field(min_length=1)
    when: Conditions
    then: Actions
    confidence: float = Field(default=1.0, gt=0, le=1)


Priority = Literal["P1", "P2", "P3", "P4"]


def _enterprise_first() -> dict[str, Priority]:
    return {"enterprise": "P1"}


CRM_PLACEHOLDERS = ("address", "domain")


class CrmFields(_Strict):
    """Where the CRM's JSON keeps each fact: a dotted path (owner.email, properties.tier; a number picks a
    list item: contacts.0.email)."""

    # The customer inside the answer (e.g. results); default: the answer itself. A list: its first item.
    record: str | None = None
    name: str = Field(default="name", min_length=1)
    tier: str | None = "tier"
    account_manager: str | None = "account_manager"


class CrmSettings(_Strict):
    """An HTTP lookup of who the customer is (see mailbridge/crm.py), for senders the directory does not know."""

    # {address} (the sender's address) and {domain} (its domain) are filled in, URL-encoded.
    url: str
    timeout_seconds: float = Field(default=2.0, gt=0, le=60)  # for all the lookups of a batch together
    cache_seconds: float = Field(default=3600.0, ge=0)  # how long an answer is believed
    negative_cache_seconds: float = Field(default=300.0, ge=0)  # ... and a "not known" (404, empty answer)
    cache_entries: int = Field(default=10_000, ge=1)
    # After a failure (timeout, refused, 5xx …) the CRM is left alone this long: a CRM that is down costs
    # one timeout per pause, not one per batch.
    pause_after_failure_seconds: float = Field(default=30.0, ge=0)
    max_connections: int = Field(default=10, ge=1, le=100)
    headers: dict[str, str] = Field(default_factory=dict)  # sent with every request; secrets go in token*
    token: SecretStr | None = None
    token_env: str | None = None
    token_file: Path | None = None
    token_header: str = Field(default="Authorization", min_length=1)
    token_scheme: str = "Bearer"  # the header is "Bearer <token>"; "" sends the token alone (X-Api-Key style)
    ca_file: Path | None = None  # trust this CA bundle instead of the system's (an internal CA)
    fields: CrmFields = CrmFields()

    @field_validator("url")
    @classmethod
    def _url_template(cls, url: str) -> str:
        names = []
        try:
            parsed = list(string.Formatter().parse(url))
        except ValueError as exc:
            raise ValueError(f"not a valid template ({exc}); use {{address}} or {{domain}}") from None
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if name not in CRM_PLACEHOLDERS or spec or conversion:
                shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
                raise ValueError(f"unknown placeholder {shown}; use {{address}} or {{domain}}")
            names.append(name)
        if not names:
            raise ValueError("the URL names no customer: put {address} or {domain} in it")
        parts = urlsplit(url.format(address="a", domain="d"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return url

    @model_validator(mode="after")
    def _resolve(self) -> CrmSettings:
        # config.py is the one reader of the environment and of secret files; imported here, at validation
        # time, because config.py imports this module.
        from mailbridge.config import _is_loopback, _read_secret

        token = _read_secret(self.token, self.token_env, self.token_file, "token")
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("the token is empty")
        if token is not None and any(c in token.get_secret_value() for c in "\r\n\0"):
            raise ValueError("the token has a line break in it")
        object.__setattr__(self, "token", token)
        for name, value in (*self.headers.items(), (self.token_header, self.token_scheme)):
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name) or any(c in value for c in "\r\n\0"):
                raise ValueError(f"header {name!r} is not a valid HTTP header name and value")
        host = urlsplit(self.url.format(address="a", domain="d")).hostname or ""
        if token is not None and self.url.startswith("http://") and not _is_loopback(host):
            raise ValueError("a token is only sent over https:// (or plain http to 127.0.0.1 / localhost)")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"ca_file {self.ca_file} does not exist")
        if token is not None and self.token_header.lower() in {h.lower() for h in self.headers}:
            raise ValueError(f"headers has {self.token_header}, which the token fills: give one or the other")
        return self


class CustomerSettings(_Strict):
    directory: Path | None = None  # YAML or CSV of organisations (see mailbridge/customers.py)
    # Asked for senders the directory does not know; on failure the ticket is routed by the rules alone and flagged.
    crm: CrmSettings | None = None
    # A customer's tier sets at least this priority (a rule may ask for more urgency, never less).
    tier_priority: dict[str, Priority] = Field(default_factory=lambda: _enterprise_first())
    account_manager_owns: bool = True  # the organisation's account manager owns its tickets (unless a rule says)


class AssignmentSettings(_Strict):
    # Tickets without an owner (from a rule or the account manager) go to the queue's agents:
    # round_robin takes turns, least_open picks the agent with the fewest tickets not yet closed.
    strategy: Literal["none", "round_robin", "least_open"] = "none"


class RoutingSettings(_Strict):
    triage_threshold: float = Field(default=0.95, ge=0, le=1)
    default_queue: str | None = Field(default=None, pattern=r"^[\w.-]+$")
    triage_queue: str = Field(default="triage", pattern=r"^[\w.-]+$")
    rules: list[Rule] = Field(default_factory=list)
    rules_file: Path | None = None  # more rules, after the inline ones (a YAML list of rules)
    customers: CustomerSettings = CustomerSettings()
    assignment: AssignmentSettings = AssignmentSettings()

    @model_validator(mode="after")
    def _unique(self) -> RoutingSettings:
        names = [r.name for r in self.rules]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ValueError(f"rule names must be unique; repeated: {', '.join(doubled)}")
        return self
