"""The SLA planner: reads the ticket history (ticket_events) from where it stopped, and for every
ticket whose history moved on, recomputes its deadlines and reminder times (plan.py) and writes them to
the ticket and its timers.

Reading the history rather than being called from each place that changes a ticket keeps one owner
of SLA state, and makes it exact: a pause starts at the recorded instant of the status change, however
late the planner runs. Its cursor moves in the same transaction as the plans it wrote.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from mailbridge.db import chunked
from mailbridge.models import SlaCursor, SlaTimer, Ticket, TicketEvent
from mailbridge.sla.calendar import BusinessCalendar
from mailbridge.sla.plan import Plan, Policy, plan, policy_for
from mailbridge.sla.settings import SlaSettings

SLA_ACTOR = "sla"  # events the SLA itself writes (a breach, the priority it raised)
_CURSOR = "events"
# What can move a deadline: a new ticket, a status change, the first answer, an agent's new priority.
_PLANNED_KINDS = ("created", "status", "first_response", "priority")
_PLANNED_COLUMNS = ("sla_priority", "sla_policy", "first_response_due_at", "resolution_due_at", "sla_paused_at")


@dataclass
class PlannerReport:
    events: int = 0
    tickets: set[int] = field(default_factory=set)  # planned (again)


class SlaPlanner:
    """Reads and writes with Core statements on the session's connection: plain rows, without the ORM's
    bookkeeping, which cost more than the planning itself when a big import is planned."""

    def __init__(self, settings: SlaSettings) -> None:
        self.settings = settings
        self.calendar: BusinessCalendar = settings.calendar.build()
        self._policies: dict[tuple[str, str | None, str | None], Policy | None] = {}

    def catch_up(self, session: Session, now: datetime, limit: int = 5000, up_to: int | None = None) -> PlannerReport:
        """Plan from the events recorded since the last call, at most `limit` of them (call again while
        it returns `limit`), and none after the event `up_to` (below it every event is committed:
        `Database.quiet_point`)."""
        cursor = self.start(session, now)
        newer = TicketEvent.id > cursor.last_event_id
        rows = (
            session.connection()
            .execute(
                select(TicketEvent.id, TicketEvent.ticket_id, TicketEvent.kind, TicketEvent.actor, TicketEvent.new)
                .where(newer if up_to is None else newer & (TicketEvent.id <= up_to))
                .order_by(TicketEvent.id)
                .limit(limit)
            )
            .all()
        )
        if not rows:
            return PlannerReport()
        touched: set[int] = set()
        new_priority: dict[int, str] = {}
        for _, ticket_id, kind, actor, new in rows:
            if kind not in _PLANNED_KINDS:
                continue
            touched.add(ticket_id)
            if kind == "priority" and actor != SLA_ACTOR and new:
                new_priority[ticket_id] = new
        cursor.last_event_id = rows[-1][0]
        planned = self._replan(session, touched, new_priority, cursor.started_at)
        return PlannerReport(events=len(rows), tickets=planned)

    def policy(self, priority: str, queue: str | None, tier: str | None) -> Policy | None:
        """policy_for, remembered: a check plans thousands of tickets with a handful of combinations."""
        key = (priority, queue, tier)
        if key not in self._policies:
            self._policies[key] = policy_for(self.settings, priority, queue, tier)
        return self._policies[key]

    def start(self, session: Session, now: datetime) -> SlaCursor:
        """SLAs apply from the first start with policies on (idempotent)."""
        # Locked (PostgreSQL): a second instance plans after this one commits, from the moved cursor, instead
        # of planning the same events at once and failing on the unique timer key. SQLite: BEGIN IMMEDIATE.
        cursor = session.get(SlaCursor, _CURSOR, with_for_update=True)
        if cursor is None:
            # The first start with SLA policies: what happened before is not planned.
            newest = session.scalar(select(func.max(TicketEvent.id))) or 0
            cursor = SlaCursor(name=_CURSOR, last_event_id=newest, started_at=now)
            session.add(cursor)
            session.flush()
        return cursor

    def _replan(self, session: Session, touched: set[int], new_priority: dict[int, str], since: datetime) -> set[int]:
        """Plan the tickets again; only what changed is written (a ticket's timers and deadlines are
        usually where they were)."""
        planned: set[int] = set()
        tickets_table = Ticket.__table__
        assert isinstance(tickets_table, Table)
        for chunk in chunked(sorted(touched)):
            tickets = (
                session.connection()
                .execute(
                    select(
                        Ticket.id,
                        Ticket.created_at,
                        Ticket.priority,
                        Ticket.sla_priority,
                        Ticket.queue,
                        Ticket.tier,
                        Ticket.first_response_at,
                        Ticket.sla_policy,
                        Ticket.first_response_due_at,
                        Ticket.resolution_due_at,
                        Ticket.sla_paused_at,
                    ).where(Ticket.id.in_(chunk), Ticket.created_at >= since)
                )
                .all()
            )
            changes = self._status_changes(session, [t.id for t in tickets])
            updates: list[dict[str, Any]] = []
            plans: dict[int, Plan] = {}
            for t in tickets:
                priority = new_priority.get(t.id) or t.sla_priority or t.priority or self.settings.default_priority
                policy = self.policy(priority, t.queue, t.tier)
                row: dict[str, Any] = {
                    "ticket_id": t.id,
                    "new_sla_priority": priority,
                    "new_sla_policy": None,
                    "new_first_response_due_at": None,
                    "new_resolution_due_at": None,
                    "new_sla_paused_at": None,
                }
                if policy is not None:
                    planned_now = plan(
                        policy,
                        self.calendar,
                        t.created_at,
                        changes.get(t.id, ()),
                        t.first_response_at,
                        self.settings.reminders,
                        self.settings.pause_while,
                    )
                    plans[t.id] = planned_now
                    row.update(
                        new_sla_policy=policy.name,
                        new_first_response_due_at=planned_now.first_response_due,
                        new_resolution_due_at=planned_now.resolution_due,
                        new_sla_paused_at=planned_now.paused_since,
                    )
                current = (t.sla_priority, t.sla_policy, t.first_response_due_at, t.resolution_due_at, t.sla_paused_at)
                if current != tuple(row[f"new_{c}"] for c in _PLANNED_COLUMNS):
                    updates.append(row)
            if updates:
                session.connection().execute(
                    update(tickets_table)
                    .where(tickets_table.c.id == bindparam("ticket_id"))
                    .values({c: bindparam(f"new_{c}") for c in _PLANNED_COLUMNS}),
                    updates,
                )
            self._write_timers(session, [t.id for t in tickets], plans)
            planned.update(t.id for t in tickets)
        return planned

    def _status_changes(self, session: Session, ticket_ids: Sequence[int]) -> dict[int, list[tuple[datetime, str]]]:
        found: dict[int, list[tuple[datetime, str]]] = defaultdict(list)
        if not ticket_ids:
            return found
        rows = session.connection().execute(
            select(TicketEvent.ticket_id, TicketEvent.at, TicketEvent.new)
            .where(TicketEvent.ticket_id.in_(ticket_ids), TicketEvent.kind == "status")
            .order_by(TicketEvent.id)
        )
        for ticket_id, at, new in rows:
            found[ticket_id].append((at, new or ""))
        return found

    def _write_timers(self, session: Session, ticket_ids: Sequence[int], plans: dict[int, Plan]) -> None:
        """Timers not yet done follow the plan; done ones stay done (each fires once)."""
        existing: dict[tuple[int, str, float], tuple[int, bool, datetime | None]] = {}
        if ticket_ids:
            for timer_id, ticket_id, target, share, fire_at, done_at in session.connection().execute(
                select(
                    SlaTimer.id, SlaTimer.ticket_id, SlaTimer.target, SlaTimer.share, SlaTimer.fire_at, SlaTimer.done_at
                ).where(SlaTimer.ticket_id.in_(ticket_ids))
            ):
                existing[(ticket_id, target, share)] = (timer_id, done_at is not None, fire_at)
        new: list[dict[str, Any]] = []
        moved: list[dict[str, Any]] = []
        planned_keys: set[tuple[int, str, float]] = set()
        for ticket_id, planned in plans.items():
            for timer in planned.timers:
                key = (ticket_id, timer.target, timer.share)
                planned_keys.add(key)
                found = existing.get(key)
                if found is None:
                    new.append(
                        {"ticket_id": ticket_id, "target": timer.target, "share": timer.share, "fire_at": timer.fire_at}
                    )
                elif not found[1] and found[2] != timer.fire_at:
                    moved.append({"timer_id": found[0], "new_fire_at": timer.fire_at})
        # Timers the plan no longer has (another policy, a target removed) stop, but are kept.
        moved += [
            {"timer_id": timer_id, "new_fire_at": None}
            for key, (timer_id, done, fire_at) in existing.items()
            if not done and fire_at is not None and key not in planned_keys
        ]
        timers = SlaTimer.__table__
        assert isinstance(timers, Table)
        if new:
            session.connection().execute(insert(timers), new)
        if moved:
            session.connection().execute(
                update(timers).where(timers.c.id == bindparam("timer_id")).values(fire_at=bindparam("new_fire_at")),
                moved,
            )
