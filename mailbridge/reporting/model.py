"""The report as a value: frozen, computed once, rendered as a table, JSON, CSV or HTML."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import numpy as np


def share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


@dataclass(frozen=True, slots=True)
class Stats:
    """Durations in seconds. The median of an even count is the mean of the middle two; p90 interpolates
    between the closest ranks (PostgreSQL's percentile_cont(0.9), numpy's default)."""

    count: int
    median: float | None
    mean: float | None
    p90: float | None
    max: float | None

    @classmethod
    def of(cls, values: np.ndarray[Any, Any]) -> Stats:
        if not len(values):
            return cls(0, None, None, None, None)
        median, p90 = np.percentile(values, [50, 90])
        return cls(len(values), float(median), float(np.mean(values)), float(p90), float(np.max(values)))


@dataclass(frozen=True, slots=True)
class TimeStats:
    wall: Stats  # every hour of every day
    business: Stats  # working hours of the SLA calendar


@dataclass(frozen=True, slots=True)
class Compliance:
    """Tickets whose SLA target was met, breached, or is still running (neither yet)."""

    met: int = 0
    breached: int = 0
    running: int = 0

    @property
    def rate(self) -> float | None:
        return share(self.met, self.met + self.breached)

    def __add__(self, other: Compliance) -> Compliance:
        return Compliance(self.met + other.met, self.breached + other.breached, self.running + other.running)


@dataclass(frozen=True, slots=True)
class Flow:
    """Tickets of one queue, mailbox or owner opened and closed in the period."""

    name: str
    opened: int
    closed: int


@dataclass(frozen=True, slots=True)
class QueueSla:
    queue: str
    first_response: Compliance
    resolution: Compliance


@dataclass(frozen=True, slots=True)
class Day:
    day: date  # in the SLA calendar's time zone
    opened: int
    closed: int


@dataclass(frozen=True, slots=True)
class Bin:
    """First responses that took less than `below` seconds (and at least the previous bin's)."""

    label: str
    below: float | None  # None: the open-ended last bin
    wall: int
    business: int


@dataclass(frozen=True, slots=True)
class Count:
    name: str
    tickets: int


@dataclass(frozen=True, slots=True)
class Report:
    since: date
    until: date  # the last day included
    queue: str | None  # only this queue, when given
    timezone: str
    generated_at: datetime
    opened: int
    closed: int
    first_response: TimeStats
    resolution: TimeStats
    sla_first_response: Compliance
    sla_resolution: Compliance
    sla_by_queue: tuple[QueueSla, ...]
    by_queue: tuple[Flow, ...]
    by_mailbox: tuple[Flow, ...]
    by_owner: tuple[Flow, ...]
    backlog_by_status: tuple[Count, ...]  # now, not at the end of the period
    backlog_by_age: tuple[Count, ...]
    reopened: int  # tickets opened in the period that came back to open at least once
    reopened_after_close: int
    reopened_after_waiting: int
    triaged: int
    auto_closed: int  # closed without any agent's answer
    days: tuple[Day, ...]
    first_response_histogram: tuple[Bin, ...]

    @property
    def reopen_rate(self) -> float | None:
        return share(self.reopened, self.opened)

    @property
    def triage_share(self) -> float | None:
        return share(self.triaged, self.opened)

    @property
    def auto_closed_share(self) -> float | None:
        return share(self.auto_closed, self.opened)
