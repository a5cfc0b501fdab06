"""SLA policies in the configuration, validated once at start-up.

sla:
  calendar:
    timezone: Europe/Warsaw
    working_days: [mon, tue, wed, thu, fri]
    working_hours: ["08:00-16:00"]
    holidays: PL                  # the country's public holidays (python-holidays)
    extra_holidays: [2026-12-31]
  policies:                       # per priority; durations in business hours unless business_hours: false
    P1: {first_response: 1h, resolution: 8h, business_hours: false, raise_priority: false}
    P2: {first_response: 4h, resolution: 16h}
    P3: {first_response: 8h, resolution: 40h}
  overrides:                      # applied in order to the tickets they match
    - {tier: enterprise, first_response: 2h}
    - {queue: accounting, priority: P3, resolution: 24h}
  reminders: [0.75]               # shares of each target at which the owner is reminded
  escalation_contacts: {accounting: [lead@firma.example], "*": [head@firma.example]}
"""

from __future__ import annotations

import re
from datetime import date, time
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from mailbridge.sla.calendar import BusinessCalendar

PRIORITIES = ("P1", "P2", "P3", "P4")
Priority = Literal["P1", "P2", "P3", "P4"]
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
Pausing = Literal["waiting_customer", "waiting_third_party"]
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?")
_HOURS = re.compile(r"^(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})$")


def parse_duration(value: Any) -> float:
    """ "4h", "1h30m", "90m", "20s" or a number of seconds → seconds. No days: in business hours a day
    is ambiguous (write 16h for two eight-hour working days)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        match = _DURATION.fullmatch(text)
        if not text or match is None or not any(match.groups()):
            raise ValueError(f"{value!r} is not a duration: write e.g. 30m, 4h, 1h30m (no days: 16h, not 2d)")
        hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if seconds <= 0:
        raise ValueError("a duration must be longer than zero")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CalendarSettings(_Strict):
    timezone: str = "UTC"
    working_days: list[Day] = Field(
        default_factory=lambda: list[Day](("mon", "tue", "wed", "thu", "fri")), min_length=1
    )
    working_hours: list[str] = Field(default_factory=lambda: ["09:00-17:00"], min_length=1)
    holidays: str | None = None  # an ISO country code: its public holidays are not working days
    holidays_subdivision: str | None = None  # a state or province, where holidays differ by region
    extra_holidays: list[date] = Field(default_factory=list)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use a name such as Europe/Warsaw)") from None
        return value

    @field_validator("working_hours")
    @classmethod
    def _spans(cls, value: list[str]) -> list[str]:
        for span in value:
            _parse_span(span)
        return value

    @model_validator(mode="after")
    def _known_country(self) -> CalendarSettings:
        if self.holidays is not None:
            try:
                self.build()
            except NotImplementedError:
                raise ValueError(f"no public holidays known for {self.holidays!r} (use a code such as PL)") from None
        return self

    def build(self) -> BusinessCalendar:
        return BusinessCalendar(
            self.timezone,
            [DAYS.index(day) for day in self.working_days],
            [_parse_span(span) for span in self.working_hours],
            self.holidays,
            self.holidays_subdivision,
            self.extra_holidays,
        )


def _parse_span(span: str) -> tuple[time, time | None]:
    match = _HOURS.match(span.strip())
    if match is None:
        raise ValueError(f"{span!r}: write working hours as HH:MM-HH:MM, e.g. 08:00-16:00")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2):
        raise ValueError(f"{span!r} is not a time of day")
    start, end = time(h1, m1), (None if h2 == 24 else time(h2, m2))
    if end is not None and end <= start:
        raise ValueError(f"{span!r}: the end must come after the start (24:00 for midnight)")
    return start, end


class Targets(_Strict):
    first_response: Duration | None = None
    resolution: Duration | None = None
    business_hours: bool | None = None  # False: wall-clock time, every hour of every day
    raise_priority: bool | None = None  # at a breach, raise the priority one step (P3 → P2)


class Override(Targets):
    """Targets for the tickets of a queue, a customer tier and/or a priority (all given must match)."""

    queue: str | None = None
    tier: str | None = None
    priority: Priority | None = None

    @model_validator(mode="after")
    def _says_which(self) -> Override:
        if self.queue is None and self.tier is None and self.priority is None:
            raise ValueError("an override names a queue, a tier and/or a priority")
        return self


class SlaSettings(_Strict):
    calendar: CalendarSettings = CalendarSettings()
    policies: dict[Priority, Targets] = Field(default_factory=dict)
    overrides: list[Override] = Field(default_factory=list)
    default_priority: Priority = "P3"  # for tickets the routing left without one
    reminders: list[float] = Field(default_factory=lambda: [0.75])
    # The clock stops while the ticket is in these statuses (it always stops while closed).
    pause_while: list[Pausing] = Field(default_factory=lambda: list[Pausing](("waiting_customer",)))
    escalation_contacts: dict[str, list[Annotated[str, Field(pattern=r"^[^@\s<>]+@[^@\s<>]+$")]]] = Field(
        default_factory=dict
    )
    check_interval_seconds: float = Field(default=60.0, gt=0, le=3600)

    @field_validator("reminders")
    @classmethod
    def _shares(cls, value: list[float]) -> list[float]:
        for share in value:
            if not 0 < share < 1:
                raise ValueError(f"{share}: a reminder is a share of the target between 0 and 1, e.g. 0.75")
        return sorted(set(value))

    @property
    def enabled(self) -> bool:
        return bool(self.policies)
