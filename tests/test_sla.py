"""SLA arithmetic (business hours, holidays, DST, pauses) and the check that fires reminders and
escalations exactly once, with a controllable clock (time-machine)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import time_machine
from pydantic import ValidationError
from sqlalchemy import func, select, update

from mailbridge.app import App
from mailbridge.config import Settings
from mailbridge.db import Database
from mailbridge.models import OutboxMail, SlaCursor, SlaTimer, Ticket, TicketEvent, TicketStatus
from mailbridge.queries import ticket_detail
from mailbridge.sla.calendar import BusinessCalendar
from mailbridge.sla.plan import FIRST_RESPONSE, RESOLUTION, Policy, plan, policy_for
from mailbridge.sla.settings import CalendarSettings, SlaSettings, parse_duration
from tests.imap_env import make_app, sample_mail

WARSAW = ZoneInfo("Europe/Warsaw")
HOUR = 3600.0


def local(*args: int) -> datetime:
    return datetime(*args, tzinfo=WARSAW)  # type: ignore[misc]


@pytest.fixture(scope="module")
def office() -> BusinessCalendar:
    """Mon–Fri 08:00–16:00 in Warsaw, Polish public holidays."""
    return CalendarSettings(timezone="Europe/Warsaw", working_hours=["08:00-16:00"], holidays="PL").build()


# --- business time ---------------------------------------------------------------------------------


def test_a_target_crosses_the_weekend(office: BusinessCalendar) -> None:
    friday = local(2026, 11, 6, 15, 0)
    assert office.add(friday, 4 * HOUR) == local(2026, 11, 9, 11, 0)  # 1 h on Friday, 3 h on Monday
    assert office.between(friday, local(2026, 11, 9, 11, 0)) == 4 * HOUR


def test_polish_public_holidays_are_not_working_days(office: BusinessCalendar) -> None:
    # 11 November (Independence Day) is a Wednesday in 2026.
    assert office.add(local(2026, 11, 10, 14, 0), 4 * HOUR) == local(2026, 11, 12, 10, 0)
    # Christmas Eve is a public holiday in Poland from 2025 on; 25 and 26 December too.
    assert office.add(local(2026, 12, 23, 15, 0), 2 * HOUR) == local(2026, 12, 28, 9, 0)
    assert office.is_holiday(date(2026, 12, 24)) and not office.is_holiday(date(2026, 12, 23))


def test_mail_outside_working_hours_starts_the_clock_next_morning(office: BusinessCalendar) -> None:
    evening = local(2026, 11, 17, 22, 30)
    assert office.add(evening, 30 * 60) == local(2026, 11, 18, 8, 30)
    assert office.between(evening, local(2026, 11, 18, 8, 0)) == 0


def test_working_hours_keep_their_length_across_dst(office: BusinessCalendar) -> None:
    # Summer time ends on Sunday 25 October 2026: Friday is UTC+2, Monday UTC+1.
    friday = local(2026, 10, 23, 15, 0)
    monday = office.add(friday, 2 * HOUR)
    assert monday == local(2026, 10, 26, 9, 0)
    assert monday.astimezone(UTC).hour == 8 and friday.astimezone(UTC).hour == 13


def test_a_round_the_clock_calendar_has_a_25_hour_day_when_dst_ends() -> None:
    always_warsaw = CalendarSettings(timezone="Europe/Warsaw", working_days=list(_DAYS), working_hours=["00:00-24:00"])
    clock = always_warsaw.build()
    assert clock.between(local(2026, 10, 25, 0, 0), local(2026, 10, 26, 0, 0)) == 25 * HOUR
    assert clock.between(local(2026, 3, 29, 0, 0), local(2026, 3, 30, 0, 0)) == 23 * HOUR


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def test_add_and_between_agree(office: BusinessCalendar) -> None:
    start = local(2026, 12, 18, 11, 17)
    for hours in (0.25, 3, 7.9, 8, 13, 40, 120):
        end = office.add(start, hours * HOUR)
        assert office.between(start, end) == pytest.approx(hours * HOUR)


def test_several_spans_a_day_and_no_working_time_at_all() -> None:
    split = BusinessCalendar("UTC", range(5), ((time(9), time(12)), (time(13), time(17))))
    monday = datetime(2026, 11, 16, 11, 0, tzinfo=UTC)
    assert split.add(monday, 2 * HOUR) == datetime(2026, 11, 16, 14, 0, tzinfo=UTC)  # lunch does not count
    with pytest.raises(ValueError, match="working day"):
        BusinessCalendar("UTC", (), ((time(9), time(17)),))


# --- the configuration ---------------------------------------------------------------------------


def test_durations_and_their_errors() -> None:
    assert parse_duration("1h30m") == 5400 and parse_duration("45m") == 2700 and parse_duration(20) == 20
    for bad in ("2d", "soon", "", "0m", "-1h"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.mark.parametrize(
    ("sla", "message"),
    [
        ({"policies": {"P2": {"first_response": "2 days"}}}, "not a duration"),
        ({"calendar": {"timezone": "Europe/Warsa"}}, "unknown time zone"),
        ({"calendar": {"working_hours": ["16:00-08:00"]}}, "end must come after"),
        ({"calendar": {"holidays": "XX"}}, "no public holidays known"),
        ({"reminders": [75]}, "between 0 and 1"),
        ({"overrides": [{"first_response": "1h"}]}, "names a queue"),
        ({"policies": {"P9": {"first_response": "1h"}}}, "P9"),
    ],
)
def test_a_bad_sla_config_names_what_is_wrong(sla: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings.model_validate({"sla": sla})


def test_overrides_apply_in_order() -> None:
    settings = SlaSettings.model_validate(
        {
            "policies": {"P2": {"first_response": "4h", "resolution": "16h"}, "P1": {"first_response": "1h"}},
            "overrides": [
                {"tier": "enterprise", "first_response": "2h"},
                {"queue": "accounting", "priority": "P2", "resolution": "24h", "business_hours": False},
            ],
        }
    )
    plain = policy_for(settings, "P2", "general", None)
    assert plain == Policy("P2", 4 * HOUR, 16 * HOUR, True, False)
    both = policy_for(settings, "P2", "accounting", "enterprise")
    assert both is not None
    assert (both.first_response, both.resolution, both.business_hours) == (2 * HOUR, 24 * HOUR, False)
    assert both.name == "P2 + tier enterprise + queue accounting"
    assert policy_for(settings, "P4", "general", None) is None  # no policy, no SLA


# --- plans from a ticket's history ---------------------------------------------------------------


POLICY = Policy("P2", first_response=4 * HOUR, resolution=16 * HOUR, business_hours=True, raise_priority=False)


def test_waiting_on_the_customer_stops_the_clock(office: BusinessCalendar) -> None:
    created = local(2026, 11, 16, 9, 0)  # Monday
    changes = [(local(2026, 11, 16, 10, 0), TicketStatus.WAITING_CUSTOMER), (local(2026, 11, 17, 9, 0), "open")]
    result = plan(POLICY, office, created, changes, None, [0.75], ["waiting_customer"])
    # 1 h ran on Monday; the other 3 h from Tuesday 09:00.
    assert result.first_response_due == local(2026, 11, 17, 12, 0)
    timers = {(t.target, t.share): t.fire_at for t in result.timers}
    assert timers[(FIRST_RESPONSE, 0.75)] == local(2026, 11, 17, 11, 0)
    assert result.paused_since is None


def test_a_waiting_ticket_has_no_reminder_scheduled(office: BusinessCalendar) -> None:
    created = local(2026, 11, 16, 9, 0)
    result = plan(
        POLICY, office, created, [(local(2026, 11, 16, 10, 0), "waiting_customer")], None, [0.75], ["waiting_customer"]
    )
    assert result.paused_since == local(2026, 11, 16, 10, 0)
    assert all(t.fire_at is None for t in result.timers)
    assert result.first_response_due is None


def test_waiting_on_a_third_party_does_not_stop_the_clock_unless_configured(office: BusinessCalendar) -> None:
    created = local(2026, 11, 16, 9, 0)
    changes = [(local(2026, 11, 16, 10, 0), "waiting_third_party")]
    running = plan(POLICY, office, created, changes, None, [0.75], ["waiting_customer"])
    assert running.first_response_due == local(2026, 11, 16, 13, 0)
    paused = plan(POLICY, office, created, changes, None, [0.75], ["waiting_customer", "waiting_third_party"])
    assert paused.first_response_due is None


def test_met_targets_schedule_nothing_and_a_reopened_ticket_runs_on(office: BusinessCalendar) -> None:
    created = local(2026, 11, 16, 9, 0)
    answered = local(2026, 11, 16, 10, 0)
    closed = [(local(2026, 11, 16, 12, 0), "closed")]
    result = plan(POLICY, office, created, closed, answered, [0.75], ["waiting_customer"])
    assert all(t.fire_at is None for t in result.timers)
    reopened = [*closed, (local(2026, 11, 18, 8, 0), "open")]
    again = plan(POLICY, office, created, reopened, answered, [0.75], ["waiting_customer"])
    # 3 h before closing, 13 h more from Wednesday 08:00: Wednesday 8 h, Thursday 5 h.
    assert again.resolution_due == local(2026, 11, 19, 13, 0)
    assert {t.target for t in again.timers if t.fire_at is not None} == {RESOLUTION}


# --- the check: reminders and escalations, once --------------------------------------------------

SUPPORT = "support@helpdesk.example"
OWNER = "agata@helpdesk.example"
LEAD = "lead@helpdesk.example"
T0 = datetime(2026, 11, 16, 9, 0, tzinfo=UTC)  # a Monday


def _sla_app(
    tmp_path: Path, started: datetime = T0 - timedelta(hours=1), database_url: str | None = None, **sla: object
) -> App:
    with time_machine.travel(started, tick=False):  # SLAs apply from the first start with policies
        return _make_sla_app(tmp_path, database_url, **sla)


def _make_sla_app(tmp_path: Path, database_url: str | None = None, **sla: object) -> App:
    return make_app(
        tmp_path,
        [{"type": "maildir", "name": "support", "path": str(tmp_path / "md"), "address": SUPPORT}],
        outbox={"domain": "helpdesk.example", "deliver_to_directory": str(tmp_path / "sent")},
        agents=[{"address": OWNER, "name": "Agata", "queues": ["general"]}],
        routing={"default_queue": "general"},
        sla={
            "policies": {"P3": {"first_response": "4h", "resolution": "40h", "raise_priority": True}},
            "calendar": {"timezone": "UTC", "working_hours": ["08:00-16:00"]},
            "escalation_contacts": {"*": [LEAD]},
            **sla,
        },
        **({"database": {"url": database_url}} if database_url else {}),
    )


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    application = _sla_app(tmp_path)
    yield application
    application.close()


def _ingest(app: App, tmp_path: Path, name: str) -> None:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "1.eml").write_bytes(sample_mail("Nie działa logowanie"))
    asyncio.run(app.ingest([folder], mailbox="support"))


def _sla_mails(app: App) -> list[tuple[str, list[str]]]:
    with app.db.reader() as session:
        rows = session.execute(
            select(OutboxMail.template, OutboxMail.recipients)
            .where(OutboxMail.template.like("sla_%"))
            .order_by(OutboxMail.id)
        )
        return [(template, list(recipients)) for template, recipients in rows]


def _check_at(app: App, when: datetime) -> None:
    with time_machine.travel(when, tick=False):
        app.sla.run(app.db, datetime.now(UTC))


def test_one_reminder_at_75_percent_and_one_escalation_at_the_breach(app: App, tmp_path: Path) -> None:
    with time_machine.travel(T0, tick=False):
        _ingest(app, tmp_path, "a")
    _check_at(app, T0 + timedelta(hours=2, minutes=59))
    assert _sla_mails(app) == []
    with app.db.reader() as session:
        ticket = session.scalars(select(Ticket)).one()
    assert ticket.sla_policy == "P3" and ticket.first_response_due_at == T0 + timedelta(hours=4)
    _check_at(app, T0 + timedelta(hours=3))
    _check_at(app, T0 + timedelta(hours=3, minutes=30))  # checked again: nothing new
    assert _sla_mails(app) == [("sla_reminder", [OWNER])]  # nobody owns it: the queue's agents
    _check_at(app, T0 + timedelta(hours=4))
    _check_at(app, T0 + timedelta(hours=5))
    assert _sla_mails(app) == [("sla_reminder", [OWNER]), ("sla_escalation", [LEAD])]
    with app.db.reader() as session:
        ticket = session.scalars(select(Ticket)).one()
        kinds = session.scalars(select(TicketEvent.kind).where(TicketEvent.actor == "sla").order_by(TicketEvent.id))
        assert list(kinds) == ["sla_reminder", "sla_breach", "priority"]
    assert ticket.priority == "P2" and ticket.sla_priority == "P3"  # raised, but the targets stay
    with app.db.reader() as session:
        detail = ticket_detail(session, "MB-000001")
    assert detail is not None and detail["sla"] == {
        "policy": "P3",
        "first_response_due": (T0 + timedelta(hours=4)).isoformat(),
        "first_response_at": None,
        # 40 h of 08-16 days from Monday 09:00: 7 + 8 + 8 + 8 + 8 h this week, the last hour next Monday.
        "resolution_due": datetime(2026, 11, 23, 9, 0, tzinfo=UTC).isoformat(),
        "paused_since": None,
    }


def test_a_reply_from_the_agent_cancels_the_first_response_reminder(app: App, tmp_path: Path) -> None:
    with time_machine.travel(T0, tick=False):
        _ingest(app, tmp_path, "a")
    _check_at(app, T0 + timedelta(minutes=5))
    with app.db.unit_of_work() as session:
        ticket = session.scalars(select(Ticket)).one()
        ticket.first_response_at = T0 + timedelta(hours=1)
        session.add(TicketEvent(ticket_id=ticket.id, at=T0 + timedelta(hours=1), actor=OWNER, kind="first_response"))
    _check_at(app, T0 + timedelta(hours=6))
    assert _sla_mails(app) == []
    with app.db.reader() as session:
        pending = session.scalars(select(SlaTimer).where(SlaTimer.fire_at.is_not(None), SlaTimer.done_at.is_(None)))
        assert {t.target for t in pending} == {RESOLUTION}


def test_after_downtime_past_the_deadline_only_the_escalation_goes(app: App, tmp_path: Path) -> None:
    with time_machine.travel(T0, tick=False):
        _ingest(app, tmp_path, "a")
    _check_at(app, T0 + timedelta(hours=7))
    assert [template for template, _ in _sla_mails(app)] == ["sla_escalation"]


def test_two_instances_checking_at_once_send_each_mail_once(app: App, tmp_path: Path) -> None:
    with time_machine.travel(T0, tick=False):
        for n in range(20):
            _ingest(app, tmp_path, f"m{n}")
    other = _sla_app(tmp_path)  # a second daemon on the same database
    try:
        for moment in (T0 + timedelta(hours=3), T0 + timedelta(hours=4)):
            with time_machine.travel(moment, tick=False):
                now = datetime.now(UTC)
                threads = [threading.Thread(target=a.sla.run, args=(a.db, now)) for a in (app, other, app, other)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
    finally:
        other.close()
    with app.db.reader() as session:
        per_ticket = session.execute(
            select(OutboxMail.ticket_id, OutboxMail.template, func.count())
            .where(OutboxMail.template.like("sla_%"))
            .group_by(OutboxMail.ticket_id, OutboxMail.template)
        ).all()
    assert len(per_ticket) == 40 and all(n == 1 for *_, n in per_ticket)


_BOTH_TARGETS = {"P3": {"first_response": "4h", "resolution": "5h", "raise_priority": True}}


def _raises(app: App) -> list[tuple[int, str | None, str | None]]:
    with app.db.reader() as session:
        rows = session.execute(
            select(TicketEvent.ticket_id, TicketEvent.old, TicketEvent.new)
            .where(TicketEvent.actor == "sla", TicketEvent.kind == "priority")
            .order_by(TicketEvent.id)
        )
        return [tuple(row) for row in rows]


def _priorities(app: App) -> list[str | None]:
    with app.db.reader() as session:
        return list(session.scalars(select(Ticket.priority).order_by(Ticket.id)))


def test_a_ticket_breaching_both_targets_at_once_is_raised_one_step(tmp_path: Path) -> None:
    app = _sla_app(tmp_path, policies=_BOTH_TARGETS)
    try:
        with time_machine.travel(T0, tick=False):
            _ingest(app, tmp_path, "a")
        _check_at(app, T0 + timedelta(hours=7))  # down past both deadlines: they fire in one check
        assert [t for t, _ in _sla_mails(app)] == ["sla_escalation", "sla_escalation"]
        assert _priorities(app) == ["P2"] and _raises(app) == [(1, "P3", "P2")]
    finally:
        app.close()


def test_the_second_breach_raises_nothing_also_after_a_restart(tmp_path: Path) -> None:
    app = _sla_app(tmp_path, policies=_BOTH_TARGETS)
    try:
        with time_machine.travel(T0, tick=False):
            _ingest(app, tmp_path, "a")
        _check_at(app, T0 + timedelta(hours=4))  # first response breached: P3 -> P2
        assert _priorities(app) == ["P2"]
    finally:
        app.close()
    restarted = _sla_app(tmp_path, policies=_BOTH_TARGETS)
    try:
        _check_at(restarted, T0 + timedelta(hours=5))  # resolution breached: escalated, not raised again
        _check_at(restarted, T0 + timedelta(hours=6))
        assert [t for t, _ in _sla_mails(restarted)] == ["sla_reminder", "sla_escalation", "sla_escalation"]
        assert _priorities(restarted) == ["P2"] and _raises(restarted) == [(1, "P3", "P2")]
    finally:
        restarted.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_instances_raise_each_ticket_once(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    app = _sla_app(tmp_path, database_url=url, policies=_BOTH_TARGETS)
    other = _sla_app(tmp_path, database_url=url, policies=_BOTH_TARGETS)  # a second daemon, same database
    try:
        with time_machine.travel(T0, tick=False):
            for n in range(20):
                _ingest(app, tmp_path, f"m{n}")
        for moment in (T0 + timedelta(hours=4), T0 + timedelta(hours=5), T0 + timedelta(hours=7)):
            with time_machine.travel(moment, tick=False):
                now = datetime.now(UTC)
                threads = [threading.Thread(target=a.sla.run, args=(a.db, now)) for a in (app, other, app, other)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
        assert _priorities(app) == ["P2"] * 20
        assert sorted(_raises(app)) == [(n, "P3", "P2") for n in range(1, 21)]
    finally:
        other.close()
        app.close()


def test_tickets_from_before_the_sla_was_configured_get_none(tmp_path: Path) -> None:
    plain = make_app(tmp_path, [{"type": "maildir", "name": "support", "path": str(tmp_path / "md")}])
    with time_machine.travel(T0, tick=False):
        _ingest(plain, tmp_path, "old")
    plain.close()
    application = _sla_app(tmp_path, started=T0 + timedelta(minutes=30))
    try:
        with time_machine.travel(T0 + timedelta(hours=1), tick=False):
            _ingest(application, tmp_path, "new")
        _check_at(application, T0 + timedelta(hours=1, minutes=1))
        _check_at(application, T0 + timedelta(hours=30))
        with application.db.reader() as session:
            policies = dict(session.execute(select(Ticket.id, Ticket.sla_policy)).all())
        assert policies == {1: None, 2: "P3"}
        assert [t for t, _ in _sla_mails(application)] == ["sla_escalation"]
    finally:
        application.close()


# --- the calendar's index agrees with walking the days ------------------------------------------------


def _walk_between(calendar: BusinessCalendar, start: datetime, end: datetime) -> float:
    """The definition, day by day: the working spans of each local day between the two instants."""
    total = 0.0
    day = start.astimezone(calendar.zone).date() - timedelta(days=1)
    while day <= end.astimezone(calendar.zone).date():
        if day.weekday() in calendar.working_days and not calendar.is_holiday(day):
            for begin, finish in calendar.working_hours:
                lo = datetime.combine(day, begin, calendar.zone)
                hi = datetime.combine(
                    day + timedelta(days=1) if finish is None else day, finish or time(0), calendar.zone
                )
                total += max(0.0, (min(hi, end) - max(lo, start)).total_seconds())
        day += timedelta(days=1)
    return total


def test_the_indexed_calendar_agrees_with_walking_the_days(office: BusinessCalendar) -> None:
    import random

    rng = random.Random(7)
    split = BusinessCalendar("Europe/Warsaw", range(6), ((time(7, 30), time(12)), (time(12, 45), time(18))), "PL")
    for calendar in (office, split):
        for _ in range(300):
            # A year and a half around today, DST changes and Polish holidays included.
            start = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.uniform(0, 540 * 86400))
            seconds = rng.choice((0.5, 900.0, 2 * HOUR, 7.5 * HOUR, 40 * HOUR, 400 * HOUR)) * rng.uniform(0.5, 1.5)
            end = calendar.add(start, seconds)
            assert end >= start
            assert _walk_between(calendar, start, end) == pytest.approx(seconds, abs=1e-3)
            later = start + timedelta(seconds=rng.uniform(0, 30 * 86400))
            assert calendar.between(start, later) == pytest.approx(_walk_between(calendar, start, later), abs=1e-3)
            assert calendar.between(later, start) == pytest.approx(-calendar.between(start, later), abs=1e-6)


def test_a_calendar_without_working_time_ahead_says_so() -> None:
    start = date(2026, 11, 16)
    closed = BusinessCalendar(
        "UTC", range(5), ((time(9), time(17)),), None, None, (start + timedelta(days=n) for n in range(1200))
    )
    with pytest.raises(ValueError, match=r"no 1\.0 working hours within"):
        closed.add(datetime(2026, 11, 16, 10, tzinfo=UTC), HOUR)


# --- planning again, and batches ---------------------------------------------------------------------


def test_reading_the_history_again_changes_nothing_and_sends_nothing_again(app: App, tmp_path: Path) -> None:
    with time_machine.travel(T0, tick=False):
        _ingest(app, tmp_path, "a")
        _ingest(app, tmp_path, "b")
    _check_at(app, T0 + timedelta(hours=3))

    def timers() -> list[tuple[int, str, float, datetime | None, datetime | None]]:
        with app.db.reader() as session:
            rows = session.execute(
                select(
                    SlaTimer.ticket_id, SlaTimer.target, SlaTimer.share, SlaTimer.fire_at, SlaTimer.done_at
                ).order_by(SlaTimer.id)
            )
            return [tuple(row) for row in rows]  # type: ignore[misc]

    before = timers()
    assert sum(1 for *_, done in before if done is not None) == 2  # the two reminders
    with app.db.unit_of_work() as session:
        session.execute(update(SlaCursor).values(last_event_id=0, last_xact_id=0))  # as if the history were new
    with time_machine.travel(T0 + timedelta(hours=3, minutes=1), tick=False):
        report = app.sla.run(app.db, datetime.now(UTC))
    assert report.planned_tickets == 2 and report.mails == 0
    assert timers() == before
    assert [t for t, _ in _sla_mails(app)] == ["sla_reminder", "sla_reminder"]


@pytest.mark.postgresql_only("SQLite has one writer at a time: its event ids are in commit order")
def test_an_event_committed_after_a_newer_one_is_still_planned(app: App, tmp_path: Path) -> None:
    """PostgreSQL numbers an event when it is inserted: a transaction that commits late leaves an event
    with a smaller id than one the planner has read already. A cursor on the id alone skipped it for ever."""
    with time_machine.travel(T0, tick=False):
        _ingest(app, tmp_path, "a")
        _ingest(app, tmp_path, "b")
    _check_at(app, T0 + timedelta(minutes=5))
    with app.db.reader() as session:
        first, second = session.scalars(select(Ticket.id).order_by(Ticket.id)).all()

    def priority(ticket_id: int, value: str) -> TicketEvent:
        return TicketEvent(ticket_id=ticket_id, at=T0 + timedelta(minutes=6), actor=OWNER, kind="priority", new=value)

    elsewhere = Database(app.settings.database_url)  # another daemon, or an agent's command
    try:
        with elsewhere.unit_of_work() as late:
            late_event = priority(first, "P1")
            late.add(late_event)
            late.flush()  # the smaller id, not yet committed ...
            with app.db.unit_of_work() as early:
                early_event = priority(second, "P2")
                early.add(early_event)  # ... a bigger one, committed at once
                early.flush()
            assert early_event.id > late_event.id
            _check_at(app, T0 + timedelta(minutes=10))  # the planner runs while the first is in flight
    finally:
        elsewhere.close()
    _check_at(app, T0 + timedelta(minutes=15))
    with app.db.reader() as session:
        planned = {ticket: value for ticket, value in session.execute(select(Ticket.id, Ticket.sla_priority))}
    assert planned == {first: "P1", second: "P2"}


def test_each_mail_of_a_batch_quotes_its_own_ticket(app: App, tmp_path: Path) -> None:
    with time_machine.travel(T0, tick=False):
        for n, words in enumerate(("drukarka nie drukuje", "faktura się nie zgadza", "hasło wygasło")):
            folder = tmp_path / f"m{n}"
            folder.mkdir()
            (folder / "1.eml").write_bytes(sample_mail(f"Sprawa {n}", sender=f"klient{n}@firma.example", body=words))
            asyncio.run(app.ingest([folder], mailbox="support"))
    _check_at(app, T0 + timedelta(hours=3))
    with app.db.reader() as session:
        rows = session.execute(
            select(Ticket.subject, OutboxMail.raw)
            .join(Ticket, Ticket.id == OutboxMail.ticket_id)
            .where(OutboxMail.template == "sla_reminder")
        ).all()
    assert len(rows) == 3
    for subject, raw in rows:
        n = int(subject.split()[-1])
        message = email.message_from_bytes(raw, policy=email.policy.default)
        body = message.get_body(("plain",))
        assert body is not None
        text = body.get_content()  # type: ignore[attr-defined]
        assert f"klient{n}@firma.example" in text
        assert ("drukarka nie drukuje", "faktura się nie zgadza", "hasło wygasło")[n] in text
        assert str(message["Subject"]).endswith(f"Sprawa {n}")


def test_the_cli_runs_one_check(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mailbridge.cli import app as cli

    application = _sla_app(tmp_path)
    with time_machine.travel(T0, tick=False):
        _ingest(application, tmp_path, "a")
    application.close()
    config = str(tmp_path / "mailbridge.yaml")
    with time_machine.travel(T0 + timedelta(hours=3), tick=False):
        result = CliRunner().invoke(cli, ["sla", "check", "--config", config, "--json"])
        again = CliRunner().invoke(cli, ["sla", "check", "--config", config])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "planned_tickets": 1,
        "reminders": 1,
        "escalations": 0,
        "skipped": 0,
        "settings_changed": False,
        "replanned_open_tickets": 0,
        "moved": 0,
        "without_policy": 0,
        "beyond_calendar": 0,
    }
    assert again.exit_code == 0 and "queued 0 reminder(s) and 0 escalation(s)" in again.stdout
    plain = make_app(tmp_path / "plain", [])
    plain.close()
    refused = CliRunner().invoke(cli, ["sla", "check", "--config", str(tmp_path / "plain" / "mailbridge.yaml")])
    assert refused.exit_code == 2 and "no SLA policies configured" in refused.output


# --- the SLA settings change: open tickets follow them --------------------------------------------


def _restart(app: App, tmp_path: Path, **sla: object) -> App:
    app.close()
    return _sla_app(tmp_path, **sla)


def _ticket(app: App) -> Ticket:
    with app.db.reader() as session:
        return session.scalars(select(Ticket)).one()


def test_stricter_targets_after_a_restart_move_the_open_tickets_deadlines(tmp_path: Path) -> None:
    app = _sla_app(tmp_path)
    try:
        with time_machine.travel(T0, tick=False):
            _ingest(app, tmp_path, "a")
        _check_at(app, T0 + timedelta(hours=1))
        assert _ticket(app).first_response_due_at == T0 + timedelta(hours=4)
        app = _restart(app, tmp_path, policies={"P3": {"first_response": "2h", "resolution": "40h"}})
        with time_machine.travel(T0 + timedelta(hours=1, minutes=1), tick=False):
            report = app.sla.run(app.db, datetime.now(UTC))
        assert (report.settings_changed, report.replanned_open, report.moved) == (True, 1, 1)
        assert _ticket(app).first_response_due_at == T0 + timedelta(hours=2)
        assert _sla_mails(app) == []
        _check_at(app, T0 + timedelta(hours=1, minutes=30))  # 75 % of the new 2 h
        _check_at(app, T0 + timedelta(hours=2))
        _check_at(app, T0 + timedelta(hours=4))  # the old deadline: nothing more
        assert _sla_mails(app) == [("sla_reminder", [OWNER]), ("sla_escalation", [LEAD])]
        with time_machine.travel(T0 + timedelta(hours=4), tick=False):
            again = app.sla.run(app.db, datetime.now(UTC))
        assert not again.settings_changed  # planned under these settings once, not at every check
    finally:
        app.close()


def test_looser_targets_move_the_deadline_and_send_nothing_twice(tmp_path: Path) -> None:
    app = _sla_app(tmp_path)
    try:
        with time_machine.travel(T0, tick=False):
            _ingest(app, tmp_path, "a")
        _check_at(app, T0 + timedelta(hours=3, minutes=30))  # the 75 % reminder of 4 h went out
        app = _restart(app, tmp_path, policies={"P3": {"first_response": "6h", "resolution": "40h"}})
        _check_at(app, T0 + timedelta(hours=4))  # the old deadline: no escalation
        _check_at(app, T0 + timedelta(hours=5))  # 75 % of 6 h: that reminder was sent already
        assert _sla_mails(app) == [("sla_reminder", [OWNER])]
        _check_at(app, T0 + timedelta(hours=6))
        assert _sla_mails(app) == [("sla_reminder", [OWNER]), ("sla_escalation", [LEAD])]
        assert _ticket(app).first_response_due_at == T0 + timedelta(hours=6)
    finally:
        app.close()


def test_a_policy_removed_from_the_settings_stops_the_open_tickets_timers(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mailbridge.cli import app as cli

    app = _sla_app(tmp_path)
    with time_machine.travel(T0, tick=False):
        _ingest(app, tmp_path, "a")
    _check_at(app, T0 + timedelta(hours=1))
    app = _restart(app, tmp_path, policies={"P1": {"first_response": "1h"}})  # nothing for P3 any more
    app.close()
    config = str(tmp_path / "mailbridge.yaml")
    with time_machine.travel(T0 + timedelta(hours=2), tick=False):
        result = CliRunner().invoke(cli, ["sla", "check", "--config", config])
    assert result.exit_code == 0, result.output
    assert "the SLA settings changed: 1 open ticket(s) planned again under them, 1 with new deadlines" in result.stdout
    assert "1 have no SLA policy any more" in result.stdout
    app = _sla_app(tmp_path, policies={"P1": {"first_response": "1h"}})
    try:
        _check_at(app, T0 + timedelta(hours=50))  # long past both old deadlines
        assert _sla_mails(app) == []
        ticket = _ticket(app)
        assert (ticket.sla_policy, ticket.first_response_due_at, ticket.resolution_due_at) == (None, None, None)
        with app.db.reader() as session:
            assert session.scalar(select(func.count()).where(SlaTimer.fire_at.is_not(None))) == 0
    finally:
        app.close()


def test_a_holiday_added_later_moves_the_open_tickets_deadline(tmp_path: Path) -> None:
    app = _sla_app(tmp_path)
    try:
        with time_machine.travel(T0, tick=False):
            _ingest(app, tmp_path, "a")
        _check_at(app, T0 + timedelta(hours=1))
        # 40 h of 08-16 days from Monday 09:00 end next Monday 09:00; with Friday off, Tuesday 09:00.
        assert _ticket(app).resolution_due_at == datetime(2026, 11, 23, 9, tzinfo=UTC)
        calendar = {"timezone": "UTC", "working_hours": ["08:00-16:00"], "extra_holidays": [date(2026, 11, 20)]}
        app = _restart(app, tmp_path, calendar=calendar)
        _check_at(app, T0 + timedelta(hours=2))
        assert _ticket(app).resolution_due_at == datetime(2026, 11, 24, 9, tzinfo=UTC)
    finally:
        app.close()


def test_a_calendar_with_hardly_any_working_time_gives_no_deadline_instead_of_crashing(tmp_path: Path) -> None:
    app = _sla_app(tmp_path)
    try:
        with time_machine.travel(T0, tick=False):
            _ingest(app, tmp_path, "a")
        _check_at(app, T0 + timedelta(hours=1))
        # One minute a day: 40 h take 2,400 working days, beyond the three years a deadline is looked for.
        app = _restart(app, tmp_path, calendar={"timezone": "UTC", "working_hours": ["08:00-08:01"]})
        with time_machine.travel(T0 + timedelta(hours=2), tick=False):
            report = app.sla.run(app.db, datetime.now(UTC))
            _ingest(app, tmp_path, "b")  # a new ticket under that calendar is planned without a crash too
            later = app.sla.run(app.db, datetime.now(UTC))
        assert (report.settings_changed, report.unreachable) == (True, 1)
        assert later.planned_tickets == 1
        with app.db.reader() as session:
            tickets = session.scalars(select(Ticket).order_by(Ticket.id)).all()
            assert [t.resolution_due_at for t in tickets] == [None, None]
            # The first response (4 h) still fits: 240 working days ahead.
            assert all(t.first_response_due_at is not None for t in tickets)
    finally:
        app.close()


def test_the_daemons_check_lets_the_intake_take_turns(
    app: App, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mailbridge.sla.check

    with time_machine.travel(T0, tick=False):
        for n in range(3):
            _ingest(app, tmp_path, f"m{n}")
    monkeypatch.setattr(mailbridge.sla.check, "_PLAN_BATCH", 1)  # a planning of several transactions

    def intake_job() -> tuple[int, int]:
        """Stands for an intake batch: where was the SLA planner when it got the database thread?"""
        with app.db.reader() as session:
            cursor = session.scalars(select(SlaCursor.last_event_id)).one()
            return cursor, session.scalars(select(func.max(TicketEvent.id))).one()

    async def check_beside_the_intake() -> tuple[tuple[int, int], int]:
        check = asyncio.create_task(app.check_sla())
        await asyncio.sleep(0)  # the check has handed its first transaction to the database thread
        seen = await app.db.run(intake_job)
        return seen, (await check).planned_tickets

    with time_machine.travel(T0 + timedelta(minutes=5), tick=False):
        (cursor, newest), planned = asyncio.run(check_beside_the_intake())
    assert 0 < cursor < newest  # it ran between two of the check's transactions
    assert planned == 3
