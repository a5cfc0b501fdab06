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
a keyword ending in "*" matches any ending; a keyword of several words matches them in a row.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
        for word in (*self.any, *self.all):
            if not word.strip(" *"):
                raise ValueError("a keyword cannot be empty")
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


class CustomerSettings(_Strict):
    directory: Path | None = None  # YAML or CSV of organisations (see mailbridge/customers.py)
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
