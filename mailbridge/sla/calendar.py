"""Business time: how long a ticket has been on the clock, and when a target in business hours falls.

Working hours are wall-clock times in the calendar's zone, converted to UTC day by day, so a DST change
needs no special case: the day simply has one hour more or less on the clock where its hours cross the
change (a 24-hour calendar), and 08:00–16:00 stays eight hours where they do not. Holidays are whole
local days (a country's public holidays from the `holidays` package, plus the admin's own dates).
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import holidays as public_holidays

# Far enough for any real target (a year of an eight-hour week is ~400 h); a calendar with no working
# time at all would otherwise walk forever.
_MAX_DAYS = 3 * 366
_PAD_DAYS = 64  # indexed beyond the days asked for: deadlines lie days or weeks after their start


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
        self._index: _SpanIndex | None = None

    @classmethod
    def always(cls) -> BusinessCalendar:
        """Wall-clock time: every hour of every day counts."""
        return _WALL_CLOCK

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
        a, b = start.timestamp(), end.timestamp()
        index = self._index_for(min(a, b), max(a, b))
        return index.elapsed(b) - index.elapsed(a)

    def add(self, start: datetime, seconds: float) -> datetime:
        """The instant at which `seconds` of working time have passed since `start` (start itself when
        seconds <= 0)."""
        if seconds <= 0:
            return start
        a = start.timestamp()
        index = self._index_for(a, a)
        target = index.elapsed(a) + seconds
        while not index.through or index.through[-1] < target:
            horizon = self._local_date(a) + timedelta(days=_MAX_DAYS)
            if index.last >= horizon:
                raise self._too_far(start, seconds)
            index = self._cover(index.first, min(horizon, index.last + timedelta(days=_PAD_DAYS)))
            target = index.elapsed(a) + seconds
        span = bisect.bisect_left(index.through, target)
        end = index.starts[span] + (target - index.before[span])
        # The index may reach further than asked (it widens generously): the limit still holds.
        if end - a > (_MAX_DAYS - 2) * 86400 and (self._local_date(end) - self._local_date(a)).days >= _MAX_DAYS:
            raise self._too_far(start, seconds)
        return datetime.fromtimestamp(end, UTC)

    @staticmethod
    def _too_far(start: datetime, seconds: float) -> CalendarError:
        return CalendarError(f"no {seconds / 3600:.1f} working hours within {_MAX_DAYS} days of {start:%Y-%m-%d}")

    def _index_for(self, earliest: float, latest: float) -> _SpanIndex:
        index = self._index
        if index is not None and index.low <= earliest and latest < index.high:
            return index
        return self._cover(self._local_date(earliest), self._local_date(latest))

    def _cover(self, first: date, last: date) -> _SpanIndex:
        """Index the working spans of every local day from `first` to `last` at least, widening what is
        indexed already (by half again, so a run over many tickets rebuilds it a few times at most)."""
        old = self._index
        if old is not None:
            size = timedelta(days=max(_PAD_DAYS, (old.last - old.first).days // 2))
            first = min(first, old.first - size if first < old.first else old.first)
            last = max(last, old.last + size if last > old.last else old.last)
        else:
            first, last = first - timedelta(days=_PAD_DAYS), last + timedelta(days=_PAD_DAYS)
        starts: list[float] = []
        ends: list[float] = []
        before: list[float] = []
        through: list[float] = []
        total = 0.0
        day = first
        while day <= last:
            for lo, hi in self._day(day):
                starts.append(lo)
                ends.append(hi)
                before.append(total)
                total += hi - lo
                through.append(total)
            day += timedelta(days=1)
        index = _SpanIndex(
            first,
            last,
            datetime.combine(first, time(0), self.zone).timestamp(),
            datetime.combine(last + timedelta(days=1), time(0), self.zone).timestamp(),
            starts,
            ends,
            before,
            through,
        )
        self._index = index  # replaced whole: a reader on another thread sees the old or the new one
        return index


@dataclass(frozen=True, slots=True)
class _SpanIndex:
    """The working spans of the local days first..last in time order, with the working seconds before
    and through each, so that "how much working time by t" and its inverse are binary searches instead
    of walks day by day (a check plans thousands of tickets, each a handful of deadlines)."""

    first: date
    last: date
    low: float  # first's local midnight, as a UTC timestamp
    high: float  # the local midnight after last
    starts: list[float]
    ends: list[float]
    before: list[float]  # working seconds in the index before span i
    through: list[float]  # ... before its end

    def elapsed(self, instant: float) -> float:
        """Working seconds from the start of the index to `instant` (which lies within the index)."""
        span = bisect.bisect_right(self.starts, instant) - 1
        if span < 0:
            return 0.0
        return self.before[span] + min(instant, self.ends[span]) - self.starts[span]


class _WallClock(BusinessCalendar):
    """Every second counts: plain arithmetic, no spans to index."""

    def __init__(self) -> None:
        super().__init__("UTC", range(7), ((time(0), None),))

    def between(self, start: datetime, end: datetime) -> float:
        return (end - start).total_seconds()

    def add(self, start: datetime, seconds: float) -> datetime:
        return start if seconds <= 0 else (start + timedelta(seconds=seconds)).astimezone(UTC)


_WALL_CLOCK = _WallClock()
