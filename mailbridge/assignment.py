"""Assignment: a new ticket without an owner (from a rule or the account manager) goes to one of its queue's
agents (config `agents[].queues`), taking turns (round_robin) or to the one with the fewest tickets not yet
closed (least_open)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailbridge.config import Agent
from mailbridge.models import Ticket, TicketStatus
from mailbridge.routing import Decision
from mailbridge.routing_rules import AssignmentSettings


class Assigner:
    def __init__(self, settings: AssignmentSettings, agents: Sequence[Agent]) -> None:
        self.strategy = settings.strategy
        self.by_queue: dict[str, list[str]] = {}
        for agent in agents:
            for queue in agent.queues:
                self.by_queue.setdefault(queue, []).append(agent.address.lower())

    def assign(self, session: Session, decisions: Sequence[Decision | None]) -> list[Decision | None]:
        if self.strategy == "none":
            return list(decisions)
        load: dict[str, int] = {}
        last: dict[str, str | None] = {}
        result: list[Decision | None] = []
        for decision in decisions:
            team = self.by_queue.get(decision.queue or "") if decision is not None else None
            if decision is None or decision.owner or not team or decision.queue is None:
                result.append(decision)
                continue
            queue = decision.queue
            if self.strategy == "least_open":
                if not load:
                    load.update(self._open_tickets(session))
                owner = min(team, key=lambda agent: (load.get(agent, 0), team.index(agent)))
                load[owner] = load.get(owner, 0) + 1
            else:
                if queue not in last:
                    last[queue] = session.scalars(
                        select(Ticket.owner)
                        .where(Ticket.queue == queue, Ticket.owner.in_(team))
                        .order_by(Ticket.id.desc())
                        .limit(1)
                    ).first()
                previous = last[queue]
                owner = team[(team.index(previous) + 1) % len(team)] if previous in team else team[0]
                last[queue] = owner
            result.append(replace(decision, owner=owner))
        return result

    def _open_tickets(self, session: Session) -> dict[str, int]:
        everyone = sorted({a for team in self.by_queue.values() for a in team})
        rows = session.execute(
            select(Ticket.owner, func.count())
            .where(Ticket.owner.in_(everyone), Ticket.status != TicketStatus.CLOSED)
            .group_by(Ticket.owner)
        )
        return {owner: int(count) for owner, count in rows if owner}
