"""Business time for a million tickets: the SLA calendar's working spans laid end to end once, so that
the working time between two instants is two binary searches, done for all tickets at once (numpy).

`BusinessCalendar.between` walks the days between two instants, which is right for one ticket and
about ten seconds for a million. The timeline takes its spans from the same calendar (`working_spans`:
the working days, hours, holidays and DST rules are the calendar's own), so both always agree; a test
holds them to it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np

from mailbridge.sla.calendar import BusinessCalendar

Seconds = np.ndarray[Any, np.dtype[np.float64]]


class BusinessTimeline:
    """Working seconds elapsed at any instant (UNIX seconds) between `first` and `last`."""

    def __init__(self, calendar: BusinessCalendar, first: float, last: float) -> None:
        spans: list[tuple[float, float]] = []
        day = datetime.fromtimestamp(first, calendar.zone).date() - timedelta(days=1)
        end = datetime.fromtimestamp(last, calendar.zone).date() + timedelta(days=1)
        while day <= end:
            spans.extend(calendar.working_spans(day))
            day += timedelta(days=1)
        bounds = np.array(spans, dtype=float).reshape(-1, 2)
        self._starts = bounds[:, 0]
        self._lengths = bounds[:, 1] - bounds[:, 0]
        self._before = np.concatenate(([0.0], np.cumsum(self._lengths)[:-1]))  # working seconds before each span

    def at(self, instants: Seconds) -> Seconds:
        """Working seconds from the start of the timeline to each instant."""
        if not len(self._starts):  # a period of holidays and weekends
            return np.zeros_like(instants)
        index = np.searchsorted(self._starts, instants, side="right") - 1
        inside = index >= 0
        index = np.maximum(index, 0)
        elapsed = self._before[index] + np.minimum(instants - self._starts[index], self._lengths[index])
        return np.where(inside, elapsed, 0.0)

    def between(self, starts: Seconds, ends: Seconds) -> Seconds:
        """Working seconds from each start to its end (negative when the end comes first)."""
        return self.at(ends) - self.at(starts)
