"""Which SLA applies to a ticket, and where its deadlines and reminders fall: pure functions of the
ticket's history, so the same history always gives the same plan (after a restart, on another instance).

The clock runs from the ticket's creation, stops while the ticket waits on the customer (or whatever
`pause_while` says) and while it is closed, and runs again when it is reopened. A target is met by the
first agent answer (first response) or by closing the ticket (resolution).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from mailbridge.models import TicketStatus
from mailbridge.sla.calendar import BusinessCalendar, CalendarError
from mailbridge.sla.settings import SlaSettings

FIRST_RESPONSE = "first_response"
RESOLUTION = "resolution"
TARGETS = (FIRST_RESPONSE, RESOLUTION)
BREACH = 1.0  # the share of a target at which it is breached


@dataclass(frozen=True, slots=True)
class Policy:
    name: str  # for people: "P2", "P2 + tier enterprise"
    first_response: float | None  # seconds on the policy's clock
    resolution: float | None
    business_hours: bool
    raise_priority: bool

    def target(self, which: str) -> float | None:
        return self.first_response if which == FIRST_RESPONSE else self.resolution


def policy_for(settings: SlaSettings, priority: str, queue: str | None, tier: str | None) -> Policy | None:
    """The priority's policy with every matching override applied in order; None when no target applies."""
    base = settings.policies.get(priority)  # type: ignore[call-overload]
    values: dict[str, object] = {"first_response": None, "resolution": None, "business_hours": True}
    values["raise_priority"] = False
    names = [priority]
    layers = [base] if base is not None else []
    for override in settings.overrides:
        if (
            (override.queue is None or override.queue == queue)
            and (override.tier is None or override.tier == tier)
            and (override.priority is None or override.priority == priority)
        ):
            layers.append(override)
            names.append(" ".join(f"{k} {v}" for k, v in (("queue", override.queue), ("tier", override.tier)) if v))
    for layer in layers:
        for key in values:
            given = getattr(layer, key)
            if given is not None:
                values[key] = given
    if values["first_response"] is None and values["resolution"] is None:
        return None
    return Policy(
        name=" + ".join(n for n in names if n),
        first_response=values["first_response"],  # type: ignore[arg-type]
        resolution=values["resolution"],  # type: ignore[arg-type]
        business_hours=bool(values["business_hours"]),
        raise_priority=bool(values["raise_priority"]),
    )


@dataclass(frozen=True, slots=True)
class Timer:
    target: str
    share: float  # BREACH for the escalation
    fire_at: datetime | None  # None: not scheduled (the clock is stopped, or the target is met)


@dataclass(frozen=True, slots=True)
class Plan:
    first_response_due: datetime | None
    resolution_due: datetime | None
    paused_since: datetime | None  # the clock is stopped since then
    timers: tuple[Timer, ...]
    # Targets with no deadline because the calendar has too little working time ahead to reach them.
    unreachable: tuple[str, ...] = ()


def running_spans(
    created_at: datetime, changes: Sequence[tuple[datetime, str]], pause_while: Collection[str]
) -> list[tuple[datetime, datetime | None]]:
    """When the clock ran: [start, end) spans, the last one open (end None) if it runs now."""
    stopped = {*pause_while, TicketStatus.CLOSED}
    spans: list[tuple[datetime, datetime | None]] = []
    start: datetime | None = created_at
    for at, status in sorted(changes, key=lambda change: change[0]):
        if start is not None and status in stopped:
            spans.append((start, max(at, start)))
            start = None
        elif start is None and status not in stopped:
            start = at
    if start is not None:
        spans.append((start, None))
    return spans


def moment(
    clock: BusinessCalendar, spans: Sequence[tuple[datetime, datetime | None]], seconds: float
) -> datetime | None:
    """When `seconds` of clock time will have run; None if the clock is stopped before it gets there."""
    used = 0.0
    for start, end in spans:
        if end is None:
            return clock.add(start, seconds - used)
        length = clock.between(start, end)
        if used + length >= seconds:
            return clock.add(start, seconds - used)
        used += length
    return None


def plan(
    policy: Policy,
    calendar: BusinessCalendar,
    created_at: datetime,
    changes: Sequence[tuple[datetime, str]],
    first_response_at: datetime | None,
    reminders: Sequence[float],
    pause_while: Collection[str],
) -> Plan:
    """Deadlines and reminder times for a ticket created at `created_at` whose status changed as
    `changes` says (at, new status)."""
    clock = calendar if policy.business_hours else BusinessCalendar.always()
    spans = running_spans(created_at, changes, pause_while)
    closed = bool(changes) and max(changes, key=lambda change: change[0])[1] == TicketStatus.CLOSED
    met = {FIRST_RESPONSE: first_response_at is not None, RESOLUTION: closed}
    dues: dict[str, datetime | None] = {}
    timers: list[Timer] = []
    unreachable: list[str] = []
    for which in TARGETS:
        target = policy.target(which)
        if target is None:
            dues[which] = None
            continue
        try:
            dues[which] = moment(clock, spans, target)
            fire_at = {
                share: None if met[which] else dues[which] if share == BREACH else moment(clock, spans, target * share)
                for share in (*reminders, BREACH)
            }
        except CalendarError:  # e.g. a calendar changed to a few minutes a day: no deadline, rather than none at all
            dues[which] = None
            fire_at = dict.fromkeys((*reminders, BREACH))
            unreachable.append(which)
        timers += [Timer(which, share, at) for share, at in fire_at.items()]
    open_span = spans[-1][1] is None if spans else False
    paused_since = None if open_span else (spans[-1][1] if spans else created_at)
    return Plan(dues[FIRST_RESPONSE], dues[RESOLUTION], paused_since, tuple(timers), tuple(unreachable))
