"""The SLA check, run by the scheduler every `check_interval_seconds`: bring the plans up to date with the
ticket history, then fire every reminder and escalation that is due.

Each timer is marked done in the transaction that queues its mail, and a write transaction holds the
database's writer lock from its first statement (SQLite: BEGIN IMMEDIATE under the writer flock;
PostgreSQL: the due rows are locked with SKIP LOCKED), so two instances never send the same one, and a
restart neither forgets nor repeats one.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from mailbridge.db import Database, chunked
from mailbridge.models import SlaTimer, Ticket, TicketEvent
from mailbridge.notify.sla_alerts import Alert, SlaAlerts
from mailbridge.sla.plan import BREACH, FIRST_RESPONSE
from mailbridge.sla.planner import SLA_ACTOR, SlaPlanner
from mailbridge.sla.settings import PRIORITIES, SlaSettings

log = logging.getLogger("mailbridge.sla")

_PLAN_BATCH = 5000
_FIRE_BATCH = 500


@dataclass
class CheckReport:
    planned_tickets: int = 0
    reminders: int = 0
    escalations: int = 0
    skipped: int = 0
    # The SLA settings changed since the open tickets were planned: they were all planned again.
    settings_changed: bool = False
    replanned_open: int = 0
    moved: int = 0  # of those, the tickets whose policy, deadlines or reminders changed
    without_policy: int = 0  # ... to which no target applies any more
    unreachable: int = 0  # ... whose target lies beyond the calendar's horizon (no deadline)
    # The reminders and escalations again, by the mailbox of their ticket (the metrics are per mailbox).
    reminders_by_mailbox: Counter[str] = field(default_factory=Counter)
    escalations_by_mailbox: Counter[str] = field(default_factory=Counter)

    @property
    def mails(self) -> int:
        return self.reminders + self.escalations


class SlaCheck:
    def __init__(self, settings: SlaSettings, planner: SlaPlanner, alerts: SlaAlerts) -> None:
        self.settings = settings
        self.planner = planner
        self.alerts = alerts

    def run(self, db: Database, now: datetime) -> CheckReport:
        """One complete check, in transactions of bounded size (the intake's commits interleave)."""
        report = CheckReport()
        for _ in self.steps(db, now, report):
            pass
        return report

    def steps(self, db: Database, now: datetime, report: CheckReport) -> Iterator[bool]:
        """The check, one transaction per step (`report` is filled in as they go). The daemon runs each
        step as its own job on the database thread, so that the intake's batches take turns with a long
        check -- the planning after a big import -- instead of waiting for all of it."""
        with db.reader() as session:
            report.settings_changed = self.planner.settings_changed(session)
        if report.settings_changed:
            yield from self._replan_open(db, now, report)
        planned_tickets: set[int] = set()
        while True:
            with db.unit_of_work() as session:
                planned = self.planner.catch_up(session, now, limit=_PLAN_BATCH)
            planned_tickets |= planned.tickets
            report.planned_tickets = len(planned_tickets)
            yield True
            if planned.events < _PLAN_BATCH:
                break
        while True:
            with db.unit_of_work() as session:
                fired = self.fire_due(session, now, limit=_FIRE_BATCH)
            report.reminders += fired.reminders
            report.escalations += fired.escalations
            report.skipped += fired.skipped
            report.reminders_by_mailbox.update(fired.reminders_by_mailbox)
            report.escalations_by_mailbox.update(fired.escalations_by_mailbox)
            yield True
            if fired.reminders + fired.escalations + fired.skipped < _FIRE_BATCH:
                break
        if report.mails or report.skipped:
            log.info(
                "SLA check: %d reminder(s), %d escalation(s), %d skipped",
                report.reminders,
                report.escalations,
                report.skipped,
            )

    def _replan_open(self, db: Database, now: datetime, report: CheckReport) -> Iterator[bool]:
        """Every open ticket planned again under the changed settings, a transaction per step."""
        after = 0
        moved: set[int] = set()
        while True:
            with db.unit_of_work() as session:
                step = self.planner.replan_open(session, now, after, limit=_PLAN_BATCH)
            after = step.last_ticket_id
            report.replanned_open += len(step.tickets)
            moved |= step.moved
            report.without_policy += len(step.without_policy)
            report.unreachable += len(step.unreachable)
            yield True
            if len(step.tickets) < _PLAN_BATCH:
                break
        report.moved = len(moved)
        log.warning(
            "SLA settings differ from those the open tickets were planned under: %d open ticket(s) planned "
            "again, %d of them moved "
            "(%d with no policy any more, %d with a target beyond the calendar's horizon)",
            report.replanned_open,
            report.moved,
            report.without_policy,
            report.unreachable,
        )

    def fire_due(self, session: Session, now: datetime, limit: int = _FIRE_BATCH) -> CheckReport:
        """Fire up to `limit` due timers: their mails, history and priority changes, and their done marks,
        each written with one statement for the whole batch."""
        report = CheckReport()
        due = session.execute(
            select(SlaTimer.id, SlaTimer.target, SlaTimer.share, Ticket)
            .join(Ticket, Ticket.id == SlaTimer.ticket_id)
            .where(SlaTimer.done_at.is_(None), SlaTimer.fire_at <= now)
            .order_by(SlaTimer.fire_at, SlaTimer.id)
            .limit(limit)
            .with_for_update(of=SlaTimer, skip_locked=True)
        ).all()
        if not due:
            return report
        breached = {(ticket.id, target) for _, target, share, ticket in due if share >= BREACH}
        done: list[dict[str, Any]] = []
        alerts: list[tuple[int, Alert]] = []
        for timer_id, target, share, ticket in due:
            if share < BREACH and (ticket.id, target) in breached:
                # The daemon was down past the deadline: the escalation says it all.
                done.append(
                    {
                        "timer_id": timer_id,
                        "outcome": "skipped: the deadline passed before the reminder was due to be sent",
                    }
                )
                report.skipped += 1
                continue
            due_at = ticket.first_response_due_at if target == FIRST_RESPONSE else ticket.resolution_due_at
            alerts.append((timer_id, Alert(ticket, target, share, due_at or now)))
        outcomes = self.alerts.send(session, [alert for _, alert in alerts], now)
        events: list[dict[str, Any]] = []
        # A ticket's priority is raised at its first breach only: the second target's breach (or a breach
        # the daemon was down for, fired together with the other) leaves it. The history says which were
        # raised before, read with the tickets locked (PostgreSQL; SQLite has one writer), so a restart or
        # a second instance firing the ticket's other target at the same moment sees every earlier raise.
        priorities, raised_before = _lock_breached(
            session, sorted({a.ticket.id for _, a in alerts if a.share >= BREACH})
        )
        raised: dict[int, str | None] = dict.fromkeys(raised_before)
        for (timer_id, alert), outcome in zip(alerts, outcomes, strict=True):
            done.append({"timer_id": timer_id, "outcome": outcome})
            if alert.share >= BREACH:
                report.escalations += 1
                report.escalations_by_mailbox[alert.ticket.mailbox] += 1
                # As committed now: another instance may have changed it since the due timers were read.
                set_committed_value(alert.ticket, "priority", priorities.get(alert.ticket.id, alert.ticket.priority))
                events += self._breached(alert.ticket, alert.target, now, raised)
            else:
                report.reminders += 1
                report.reminders_by_mailbox[alert.ticket.mailbox] += 1
                events.append(_event(alert.ticket.id, now, "sla_reminder", None, alert.target))
        timers = SlaTimer.__table__
        assert isinstance(timers, Table)
        session.execute(
            update(timers)
            .where(timers.c.id == bindparam("timer_id"))
            .values(done_at=now, outcome=bindparam("outcome")),
            done,
        )
        if events:
            events_table = TicketEvent.__table__
            assert isinstance(events_table, Table)
            session.execute(insert(events_table), events)
        now_raised = [{"ticket_id": ticket_id, "raised": p} for ticket_id, p in raised.items() if p is not None]
        if now_raised:
            tickets = Ticket.__table__
            assert isinstance(tickets, Table)
            session.execute(
                update(tickets).where(tickets.c.id == bindparam("ticket_id")).values(priority=bindparam("raised")),
                now_raised,
            )
        return report

    def _breached(
        self, ticket: Ticket, target: str, now: datetime, raised: dict[int, str | None]
    ) -> list[dict[str, Any]]:
        """The breach in the history, and the priority raised one step if the policy says so and the ticket
        was not raised before (`raised`: the tickets raised before, None, or in this batch, to what)."""
        events = [_event(ticket.id, now, "sla_breach", None, target)]
        priority = ticket.sla_priority or ticket.priority or self.settings.default_priority
        policy = self.planner.policy(priority, ticket.queue, ticket.tier)
        current = ticket.priority or priority
        if policy is None or not policy.raise_priority or current == PRIORITIES[0] or ticket.id in raised:
            return events
        new = PRIORITIES[max(0, PRIORITIES.index(current) - 1)] if current in PRIORITIES else current
        events.append(_event(ticket.id, now, "priority", current, new))
        raised[ticket.id] = new
        # The ticket as loaded is kept in step (it is not flushed: the update above writes it).
        set_committed_value(ticket, "priority", new)
        log.info("%s breached its %s target: priority raised %s -> %s", ticket.number, target, current, new)
        return events


def _lock_breached(session: Session, ticket_ids: list[int]) -> tuple[dict[int, str | None], set[int]]:
    """The tickets' priorities, locked (in id order: two instances never wait on each other in a circle),
    and those of them whose priority an SLA breach has raised already."""
    priorities: dict[int, str | None] = {}
    raised: set[int] = set()
    for chunk in chunked(ticket_ids):
        rows = session.execute(
            select(Ticket.id, Ticket.priority).where(Ticket.id.in_(chunk)).order_by(Ticket.id).with_for_update()
        )
        priorities.update((ticket_id, priority) for ticket_id, priority in rows)
        raised.update(
            session.scalars(
                select(TicketEvent.ticket_id).where(
                    TicketEvent.ticket_id.in_(chunk), TicketEvent.kind == "priority", TicketEvent.actor == SLA_ACTOR
                )
            )
        )
    return priorities, raised


def _event(ticket_id: int, at: datetime, kind: str, old: str | None, new: str | None) -> dict[str, Any]:
    return {
        "ticket_id": ticket_id,
        "at": at,
        "actor": SLA_ACTOR,
        "kind": kind,
        "old": old,
        "new": new,
        "article_id": None,
    }
