"""Business time: how long a ticket has been on the clock, and when a target in business hours falls.

Working hours are wall-clock times in the calendar's zone, converted to UTC day by day, so a DST change
needs no special case: the day simply has one hour more or less on the clock where its hours cross the
change (a 24-hour calendar), and 08:00–16:00 stays eight hours where they do not. Holidays are whole
local days (a country's public holidays from the `holidays` package, plus the admin's own dates).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import holidays as public_holidays

# Far enough for any real target (a year of an eight-hour week is ~400 h); a calendar with no working
# time at all would otherwise walk forever.
_MAX_DAYS = 3 * 366


class CalendarError(ValueError):
    pass


class BusinessCalendar:
    """Working time as a function of UTC instants (aware datetimes). Seconds are floats."""

    def __init__(
        self,
        timezone: str = "UTC",
        working_days: Collection[int] = (0, 1, 2, 3, 4),  # Monday = 0
        working_hours: Sequence[tuple[time, time | None]] = ((time(9), time(17)),),  # None: midnight
        holiday_country: str | None = None,
        holiday_subdivision: str | None = None,
        extra_holidays: Iterable[date] = (),
    ) -> None:
        self.zone = ZoneInfo(timezone)
        self.working_days = frozenset(working_days)
        self.working_hours = tuple(sorted(working_hours, key=lambda span: span[0]))
        self.extra_holidays = frozenset(extra_holidays)
        self._public = (
            public_holidays.country_holidays(holiday_country, subdiv=holiday_subdivision) if holiday_country else None
        )
        if not self.working_days or not self.working_hours:
            raise CalendarError("a business calendar needs at least one working day and one span of hours")

    @classmethod
    def always(cls) -> BusinessCalendar:
        """Wall-clock time: every hour of every day counts."""
        return cls("UTC", range(7), ((time(0), None),))

    def is_holiday(self, day: date) -> bool:
        return day in self.extra_holidays or (self._public is not None and day in self._public)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - calendars live as long as the daemon
    def _day(self, day: date) -> tuple[tuple[float, float], ...]:
        """The working spans of a local day, as UTC epoch seconds."""
        if day.weekday() not in self.working_days or self.is_holiday(day):
            return ()
        spans = []
        for start, end in self.working_hours:
            begin = datetime.combine(day, start, self.zone)
            finish = (
                datetime.combine(day + timedelta(days=1), time(0), self.zone)
                if end is None
                else datetime.combine(day, end, self.zone)
            )
            spans.append((begin.timestamp(), finish.timestamp()))
        return tuple(spans)

    def working_spans(self, day: date) -> tuple[tuple[float, float], ...]:
        """The working spans of a local day as UTC epoch seconds: what `between` and `add` sum up."""
        return self._day(day)

    def _local_date(self, instant: float) -> date:
        return datetime.fromtimestamp(instant, self.zone).date()

    def between(self, start: datetime, end: datetime) -> float:
        """Working seconds in [start, end); negative when end is before start."""
        if end < start:
            return -self.between(end, start)
        a, b = start.timestamp(), end.timestamp()
        total = 0.0
        day = self._local_date(a)
        last = self._local_date(b)
        while day <= last:
            for lo, hi in self._day(day):
                total += max(0.0, min(hi, b) - max(lo, a))
            day += timedelta(days=1)
        return total

    def add(self, start: datetime, seconds: float) -> datetime:
        """The instant at which `seconds` of working time have passed since `start` (start itself when
        seconds <= 0)."""
        if seconds <= 0:
            return start
        remaining = seconds
        a = start.timestamp()
        day = self._local_date(a)
        for _ in range(_MAX_DAYS):
            for lo, hi in self._day(day):
                lo = max(lo, a)
                if hi <= lo:
                    continue
                if hi - lo >= remaining:
                    return datetime.fromtimestamp(lo + remaining, UTC)
                remaining -= hi - lo
            day += timedelta(days=1)
        raise CalendarError(f"no {seconds / 3600:.1f} working hours within {_MAX_DAYS} days of {start:%Y-%m-%d}")
