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
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from mailbridge.db import chunked
from mailbridge.models import SlaCursor, SlaTimer, Ticket, TicketEvent
from mailbridge.sla.calendar import BusinessCalendar
from mailbridge.sla.plan import Plan, plan, policy_for
from mailbridge.sla.settings import SlaSettings

SLA_ACTOR = "sla"  # events the SLA itself writes (a breach, the priority it raised)
_CURSOR = "events"
# What can move a deadline: a new ticket, a status change, the first answer, an agent's new priority.
_PLANNED_KINDS = ("created", "status", "first_response", "priority")


@dataclass
class PlannerReport:
    events: int = 0
    tickets: int = 0


class SlaPlanner:
    def __init__(self, settings: SlaSettings) -> None:
        self.settings = settings
        self.calendar: BusinessCalendar = settings.calendar.build()

    def catch_up(self, session: Session, now: datetime, limit: int = 5000) -> PlannerReport:
        """Plan from the events recorded since the last call, at most `limit` of them (call again while
        it returns `limit`)."""
        cursor = self.start(session, now)
        rows = session.execute(
            select(TicketEvent.id, TicketEvent.ticket_id, TicketEvent.kind, TicketEvent.actor, TicketEvent.new)
            .where(TicketEvent.id > cursor.last_event_id)
            .order_by(TicketEvent.id)
            .limit(limit)
        ).all()
        if not rows:
            return PlannerReport()
        touched: dict[int, bool] = {}  # ticket → its creation is in this batch
        new_priority: dict[int, str] = {}
        for _, ticket_id, kind, actor, new in rows:
            if kind not in _PLANNED_KINDS:
                continue
            touched[ticket_id] = touched.get(ticket_id, False) or kind == "created"
            if kind == "priority" and actor != SLA_ACTOR and new:
                new_priority[ticket_id] = new
        cursor.last_event_id = rows[-1][0]
        self._replan(session, touched, new_priority, cursor.started_at)
        return PlannerReport(events=len(rows), tickets=len(touched))

    def start(self, session: Session, now: datetime) -> SlaCursor:
        """SLAs apply from the first start with policies on (idempotent)."""
        cursor = session.get(SlaCursor, _CURSOR)
        if cursor is None:
            # The first start with SLA policies: what happened before is not planned.
            newest = session.scalar(select(func.max(TicketEvent.id))) or 0
            cursor = SlaCursor(name=_CURSOR, last_event_id=newest, started_at=now)
            session.add(cursor)
            session.flush()
        return cursor

    def _replan(
        self, session: Session, touched: dict[int, bool], new_priority: dict[int, str], since: datetime
    ) -> None:
        for chunk in chunked(sorted(touched)):
            tickets = session.execute(
                select(
                    Ticket.id,
                    Ticket.created_at,
                    Ticket.priority,
                    Ticket.sla_priority,
                    Ticket.queue,
                    Ticket.tier,
                    Ticket.first_response_at,
                ).where(Ticket.id.in_(chunk), Ticket.created_at >= since)
            ).all()
            changes = self._status_changes(session, [t.id for t in tickets])
            updates: list[dict[str, Any]] = []
            plans: dict[int, Plan] = {}
            for t in tickets:
                priority = new_priority.get(t.id) or t.sla_priority or t.priority or self.settings.default_priority
                policy = policy_for(self.settings, priority, t.queue, t.tier)
                row: dict[str, Any] = {
                    "id": t.id,
                    "sla_priority": priority,
                    "sla_policy": None,
                    "first_response_due_at": None,
                    "resolution_due_at": None,
                    "sla_paused_at": None,
                }
                if policy is not None:
                    planned = plan(
                        policy,
                        self.calendar,
                        t.created_at,
                        changes.get(t.id, ()),
                        t.first_response_at,
                        self.settings.reminders,
                        self.settings.pause_while,
                    )
                    plans[t.id] = planned
                    row.update(
                        sla_policy=policy.name,
                        first_response_due_at=planned.first_response_due,
                        resolution_due_at=planned.resolution_due,
                        sla_paused_at=planned.paused_since,
                    )
                updates.append(row)
            if updates:
                # Bulk UPDATE by primary key: one executemany.
                session.execute(update(Ticket), updates)
            self._write_timers(session, [t.id for t in tickets], plans, fresh={i for i in chunk if touched[i]})

    def _status_changes(self, session: Session, ticket_ids: Sequence[int]) -> dict[int, list[tuple[datetime, str]]]:
        found: dict[int, list[tuple[datetime, str]]] = defaultdict(list)
        if not ticket_ids:
            return found
        rows = session.execute(
            select(TicketEvent.ticket_id, TicketEvent.at, TicketEvent.new)
            .where(TicketEvent.ticket_id.in_(ticket_ids), TicketEvent.kind == "status")
            .order_by(TicketEvent.id)
        )
        for ticket_id, at, new in rows:
            found[ticket_id].append((at, new or ""))
        return found

    def _write_timers(
        self, session: Session, ticket_ids: Sequence[int], plans: dict[int, Plan], fresh: set[int]
    ) -> None:
        """Timers not yet done follow the plan; done ones stay done (each fires once)."""
        existing: dict[tuple[int, str, float], tuple[int, bool]] = {}
        # A ticket created in this batch has no timers yet: no need to look.
        look = [i for i in ticket_ids if i not in fresh]
        if look:
            for timer_id, ticket_id, target, share, done_at in session.execute(
                select(SlaTimer.id, SlaTimer.ticket_id, SlaTimer.target, SlaTimer.share, SlaTimer.done_at).where(
                    SlaTimer.ticket_id.in_(look)
                )
            ):
                existing[(ticket_id, target, share)] = (timer_id, done_at is not None)
        new: list[dict[str, Any]] = []
        moved: list[dict[str, Any]] = []
        planned_keys: set[tuple[int, str, float]] = set()
        for ticket_id, planned in plans.items():
            for timer in planned.timers:
                key = (ticket_id, timer.target, timer.share)
                planned_keys.add(key)
                if key not in existing:
                    new.append(
                        {"ticket_id": ticket_id, "target": timer.target, "share": timer.share, "fire_at": timer.fire_at}
                    )
                elif not existing[key][1]:
                    moved.append({"id": existing[key][0], "fire_at": timer.fire_at})
        # Timers the plan no longer has (another policy, a target removed) stop, but are kept.
        moved += [
            {"id": timer_id, "fire_at": None}
            for key, (timer_id, done) in existing.items()
            if not done and key not in planned_keys
        ]
        if new:
            session.execute(insert(SlaTimer), new)
        if moved:
            session.execute(update(SlaTimer), moved)
