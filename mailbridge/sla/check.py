"""The SLA check, run by the scheduler every `check_interval_seconds`: bring the plans up to date with the
ticket history, then fire every reminder and escalation that is due.

Each timer is marked done in the transaction that queues its mail, and a write transaction holds the
database's writer lock from its first statement (SQLite: BEGIN IMMEDIATE under the writer flock;
PostgreSQL: the due rows are locked with SKIP LOCKED), so two instances never send the same one, and a
restart neither forgets nor repeats one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailbridge.db import Database
from mailbridge.models import SlaTimer, Ticket, TicketEvent
from mailbridge.notify.sla_alerts import SlaAlerts
from mailbridge.sla.plan import BREACH, policy_for
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
        while True:
            with db.unit_of_work() as session:
                planned = self.planner.catch_up(session, now, limit=_PLAN_BATCH)
            report.planned_tickets += planned.tickets
            if planned.events < _PLAN_BATCH:
                break
        while True:
            with db.unit_of_work() as session:
                fired = self.fire_due(session, now, limit=_FIRE_BATCH)
            report.reminders += fired.reminders
            report.escalations += fired.escalations
            report.skipped += fired.skipped
            if fired.reminders + fired.escalations + fired.skipped < _FIRE_BATCH:
                break
        if report.mails or report.skipped:
            log.info(
                "SLA check: %d reminder(s), %d escalation(s), %d skipped",
                report.reminders,
                report.escalations,
                report.skipped,
            )
        return report

    def fire_due(self, session: Session, now: datetime, limit: int = _FIRE_BATCH) -> CheckReport:
        report = CheckReport()
        due = session.execute(
            select(SlaTimer, Ticket)
            .join(Ticket, Ticket.id == SlaTimer.ticket_id)
            .where(SlaTimer.done_at.is_(None), SlaTimer.fire_at <= now)
            .order_by(SlaTimer.fire_at, SlaTimer.id)
            .limit(limit)
            .with_for_update(of=SlaTimer, skip_locked=True)
        ).all()
        breached = {(t.ticket_id, t.target) for t, _ in due if t.share >= BREACH}
        for timer, ticket in due:
            timer.done_at = now
            if timer.share < BREACH and (ticket.id, timer.target) in breached:
                # The daemon was down past the deadline: the escalation says it all.
                timer.outcome = "skipped: the deadline passed before the reminder was due to be sent"
                report.skipped += 1
                continue
            due_at = ticket.first_response_due_at if timer.target == "first_response" else ticket.resolution_due_at
            timer.outcome = self.alerts.send(session, ticket, timer.target, timer.share, due_at or now, now)
            if timer.share >= BREACH:
                report.escalations += 1
                self._breached(session, ticket, timer.target, now)
            else:
                report.reminders += 1
                session.add(
                    TicketEvent(ticket_id=ticket.id, at=now, actor=SLA_ACTOR, kind="sla_reminder", new=timer.target)
                )
        return report

    def _breached(self, session: Session, ticket: Ticket, target: str, now: datetime) -> None:
        session.add(TicketEvent(ticket_id=ticket.id, at=now, actor=SLA_ACTOR, kind="sla_breach", new=target))
        priority = ticket.sla_priority or ticket.priority or self.settings.default_priority
        policy = policy_for(self.settings, priority, ticket.queue, ticket.tier)
        current = ticket.priority or priority
        if policy is None or not policy.raise_priority or current == PRIORITIES[0]:
            return
        raised = PRIORITIES[max(0, PRIORITIES.index(current) - 1)] if current in PRIORITIES else current
        session.add(TicketEvent(ticket_id=ticket.id, at=now, actor=SLA_ACTOR, kind="priority", old=current, new=raised))
        ticket.priority = raised
        log.info("%s breached its %s target: priority raised %s -> %s", ticket.number, target, current, raised)
