"""build_report: the one entry point. Reads the period's tickets (read-only, narrow rows) and returns a
frozen Report.

Which tickets count where:
* tickets opened in the period (created_at in it) are the period's tickets: response and resolution
  times, SLA compliance, reopens, triage, auto-closed, opened per queue/mailbox/owner, each as of now;
* closed per queue/mailbox/owner counts the tickets closed in the period, whenever they were opened;
* the backlog is now: every ticket not closed, by status and by age.
The period is whole days in the SLA calendar's time zone, the last day included.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
from sqlalchemy.orm import Session

from mailbridge.models import TicketStatus
from mailbridge.reporting import sql
from mailbridge.reporting.business import BusinessTimeline, Seconds
from mailbridge.reporting.model import Bin, Compliance, Count, Day, Flow, QueueSla, Report, Stats, TimeStats
from mailbridge.sla.plan import Policy, policy_for
from mailbridge.sla.settings import SlaSettings

NO_QUEUE = "(no queue)"
UNASSIGNED = "(unassigned)"
AGE_BUCKETS = (("under 1 day", 1), ("1-3 days", 3), ("3-7 days", 7), ("7-30 days", 30), ("over 30 days", None))
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
HISTOGRAM = (
    ("< 15 min", 15 * MINUTE),
    ("15-30 min", 30 * MINUTE),
    ("30-60 min", HOUR),
    ("1-2 h", 2 * HOUR),
    ("2-4 h", 4 * HOUR),
    ("4-8 h", 8 * HOUR),
    ("8-24 h", DAY),
    ("1-3 days", 3 * DAY),
    ("3+ days", None),
)


def build_report(
    session: Session,
    sla: SlaSettings,
    triage_queue: str,
    since: date,
    until: date,
    queue: str | None = None,
    now: datetime | None = None,
) -> Report:
    """The report for the days `since` … `until` (both included), optionally for one queue."""
    if until < since:
        raise ValueError(f"the period ends ({until}) before it starts ({since})")
    now = now or datetime.now(UTC)
    calendar = sla.calendar.build()
    start = datetime.combine(since, time(0), calendar.zone).astimezone(UTC)
    end = datetime.combine(until + timedelta(days=1), time(0), calendar.zone).astimezone(UTC)
    groups = sql.opened_groups(session, start, end, queue, now, triage_queue)
    instants = sql.opened_instants(session, start, end, queue)
    closed = sql.closed_groups(session, start, end, queue)
    by_queue, by_mailbox, by_owner = _flows(groups, closed)
    sla_by_queue = _compliance(groups, sla)
    created, answered, done = instants[:, 0], instants[:, 1], instants[:, 2]
    timeline = BusinessTimeline(calendar, float(created.min(initial=now.timestamp())), now.timestamp())
    first_response, (wall, business) = _times(timeline, created, answered)
    resolution, _ = _times(timeline, created, done)
    backlog = sql.backlog(session, queue, _age_bounds(now))
    return Report(
        since=since,
        until=until,
        queue=queue,
        timezone=str(calendar.zone),
        generated_at=now,
        opened=len(created),
        closed=sum(closed.values()),
        first_response=first_response,
        resolution=resolution,
        sla_first_response=sum((q.first_response for q in sla_by_queue), Compliance()),
        sla_resolution=sum((q.resolution for q in sla_by_queue), Compliance()),
        sla_by_queue=sla_by_queue,
        by_queue=by_queue,
        by_mailbox=by_mailbox,
        by_owner=by_owner,
        backlog_by_status=_by_status(backlog),
        backlog_by_age=_by_age(backlog),
        **_reopens(sql.reopened(session, start, end, queue)),
        triaged=_flagged(groups, sql.TRIAGED),
        auto_closed=_flagged(groups, sql.AUTO_CLOSED),
        days=_days(since, until, calendar.zone, created, sql.closed_per_hour(session, start, end, queue)),
        first_response_histogram=_histogram(wall, business),
    )


def _reopens(rows: Sequence[Any]) -> dict[str, int]:
    """Tickets that came back to open, at all, from closed, from waiting (a ticket may do both)."""
    return {
        "reopened": len({ticket for ticket, _ in rows}),
        "reopened_after_close": len({ticket for ticket, old in rows if old == TicketStatus.CLOSED}),
        "reopened_after_waiting": len({ticket for ticket, old in rows if old != TicketStatus.CLOSED}),
    }


def _flows(opened: Counter[Any], closed: Counter[Any]) -> tuple[tuple[Flow, ...], ...]:
    """Opened and closed per queue, per mailbox and per owner, busiest first."""
    names: tuple[Callable[[Any], str], ...] = (
        lambda key: key[0] or NO_QUEUE,
        lambda key: key[1],
        lambda key: key[2] or UNASSIGNED,
    )
    tables = []
    for name in names:
        opened_by: Counter[str] = Counter()
        closed_by: Counter[str] = Counter()
        for key, n in opened.items():
            opened_by[name(key)] += n
        for key, n in closed.items():
            closed_by[name(key)] += n
        rows = [Flow(k, opened_by[k], closed_by[k]) for k in opened_by.keys() | closed_by.keys()]
        tables.append(tuple(sorted(rows, key=lambda f: (-f.opened, -f.closed, f.name))))
    return tuple(tables)


def _compliance(groups: Counter[Any], sla: SlaSettings) -> tuple[QueueSla, ...]:
    """Met / breached / running per queue and target, over the tickets whose policy has that target
    (the policy the planner chose: the ticket's SLA priority, queue and tier)."""
    policies: dict[tuple[Any, ...], Policy | None] = {}
    found: dict[str, list[Compliance]] = {}
    for (queue, _, _, priority, tier, flags), n in groups.items():
        if priority is None:
            continue  # no SLA was planned for it
        key = (priority, queue, tier)
        if key not in policies:
            policies[key] = policy_for(sla, priority, queue, tier)
        policy = policies[key]
        if policy is None:
            continue
        mine = found.setdefault(queue or NO_QUEUE, [Compliance(), Compliance()])
        if policy.first_response is not None:
            mine[0] += _judge(flags, sql.FR_MET, sql.FR_BREACHED, n)
        if policy.resolution is not None:
            mine[1] += _judge(flags, sql.RES_MET, sql.RES_BREACHED, n)
    return tuple(QueueSla(q, fr, res) for q, (fr, res) in sorted(found.items()))


def _judge(flags: int, met: int, breached: int, n: int) -> Compliance:
    if flags & met:
        return Compliance(met=n)
    return Compliance(breached=n) if flags & breached else Compliance(running=n)


def _flagged(groups: Counter[Any], bit: int) -> int:
    return sum(n for key, n in groups.items() if key[5] & bit)


def _times(timeline: BusinessTimeline, starts: Seconds, ends: Seconds) -> tuple[TimeStats, tuple[Seconds, Seconds]]:
    """Statistics of the wall-clock and business durations from each start to its end, where there is
    an end; and both durations, sorted."""
    done = ~np.isnan(ends)
    wall = np.sort(ends[done] - starts[done])
    business = np.sort(timeline.between(starts[done], ends[done]))
    return TimeStats(Stats.of(wall), Stats.of(business)), (wall, business)


def _histogram(wall: Seconds, business: Seconds) -> tuple[Bin, ...]:
    """First responses per bin of HISTOGRAM, from sorted durations."""
    bounds = [below for _, below in HISTOGRAM if below is not None]
    wall_counts = np.diff(np.searchsorted(wall, bounds), prepend=0, append=len(wall))
    business_counts = np.diff(np.searchsorted(business, bounds), prepend=0, append=len(business))
    return tuple(
        Bin(label, below, int(w), int(b))
        for (label, below), w, b in zip(HISTOGRAM, wall_counts, business_counts, strict=True)
    )


def _days(since: date, until: date, zone: ZoneInfo, created: Seconds, closed_hours: Counter[int]) -> tuple[Day, ...]:
    """Opened and closed per day of the calendar's zone, every day of the period. Counted per UTC hour
    and each hour given to the day it starts in: exact for zones whose offset is whole hours."""
    hours, counts = np.unique((created // HOUR).astype(np.int64), return_counts=True)
    opened = _per_day(Counter(dict(zip(hours.tolist(), counts.tolist(), strict=True))), zone)
    closed = _per_day(closed_hours, zone)
    days = []
    day = since
    while day <= until:
        days.append(Day(day, opened.get(day, 0), closed.get(day, 0)))
        day += timedelta(days=1)
    return tuple(days)


def _per_day(per_hour: Counter[int], zone: ZoneInfo) -> Counter[date]:
    per_day: Counter[date] = Counter()
    for hour, n in per_hour.items():
        per_day[datetime.fromtimestamp(hour * HOUR, zone).date()] += n
    return per_day


def _age_bounds(now: datetime) -> list[datetime]:
    return [now - timedelta(days=days) for _, days in AGE_BUCKETS if days is not None]


def _by_status(rows: Sequence[Any]) -> tuple[Count, ...]:
    counts: Counter[str] = Counter()
    for status, _, n in rows:
        counts[status] += n
    return tuple(Count(s, n) for s, n in sorted(counts.items()))


def _by_age(rows: Sequence[Any]) -> tuple[Count, ...]:
    counts: Counter[int] = Counter()
    for _, bucket, n in rows:
        counts[bucket] += n
    return tuple(Count(label, counts[i]) for i, (label, _) in enumerate(AGE_BUCKETS))
