"""A small ticket history with answers worked out by hand, for the report tests.

Business hours: Monday to Friday 09:00-17:00 UTC. SLA P3: first response 2 h, resolution 8 h, in
business hours; the clock stops while the ticket waits on the customer or is closed. The deadlines are
written by the real SLA planner from the history, as in the daemon.

The period is Monday 2 to Sunday 8 November 2026; the report runs on Friday 20 November, 12:00.

| ticket | opened       | queue / mailbox / owner | first answer | history                                       |
|--------|--------------|-------------------------|--------------|-----------------------------------------------|
| T1     | Mon 02 10:00 | billing / support / a   | Mon 11:00    | closed Mon 15:00                              |
| T2     | Mon 02 16:00 | billing / support / b   | Tue 10:00    | closed Tue 16:00 (both on their deadlines)    |
| T3     | Fri 06 16:30 | general / sales / a     | Mon 09 09:30 | still open                                    |
| T4     | Sat 07 12:00 | triage / support / -    | none         | closed Sat 13:00 without an answer            |
| T5     | Tue 03 09:00 | general / support / b   | Tue 13:00    | waiting Tue 14:00, customer answers Wed 09:00 |
| T6     | Wed 04 09:00 | billing / support / a   | Wed 09:30    | closed Wed 12:00, reopened Thu 10, closed 11  |
| T7     | Fri Oct 30   | general / support / b   | Fri 30 11:00 | closed Mon 02 12:00 (closed in the period)    |
| T8     | Thu 19 18:00 | general / support / a   | none         | new (after the period)                        |
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy.orm import Session

from mailbridge.db import Database
from mailbridge.models import Contact, Ticket, TicketEvent
from mailbridge.sla.planner import SlaPlanner
from mailbridge.sla.settings import SlaSettings

SINCE, UNTIL = date(2026, 11, 2), date(2026, 11, 8)
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
A, B = "a@firma.example", "b@firma.example"
SLA = {
    "calendar": {"timezone": "UTC", "working_hours": ["09:00-17:00"]},
    "policies": {"P3": {"first_response": "2h", "resolution": "8h"}},
}


def at(month: int, day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=UTC)


# number: (created, queue, mailbox, owner, first response, [(when, old, new) status changes])
TICKETS: dict[int, tuple[datetime, str, str, str | None, datetime | None, list[tuple[datetime, str, str]]]] = {
    1: (at(11, 2, 10), "billing", "support", A, at(11, 2, 11), [(at(11, 2, 15), "open", "closed")]),
    2: (at(11, 2, 16), "billing", "support", B, at(11, 3, 10), [(at(11, 3, 16), "open", "closed")]),
    3: (at(11, 6, 16, 30), "general", "sales", A, at(11, 9, 9, 30), []),
    4: (at(11, 7, 12), "triage", "support", None, None, [(at(11, 7, 13), "new", "closed")]),
    5: (
        at(11, 3, 9),
        "general",
        "support",
        B,
        at(11, 3, 13),
        [(at(11, 3, 14), "open", "waiting_customer"), (at(11, 4, 9), "waiting_customer", "open")],
    ),
    6: (
        at(11, 4, 9),
        "billing",
        "support",
        A,
        at(11, 4, 9, 30),
        [(at(11, 4, 12), "open", "closed"), (at(11, 5, 10), "closed", "open"), (at(11, 5, 11), "open", "closed")],
    ),
    7: (at(10, 30, 10), "general", "support", B, at(10, 30, 11), [(at(11, 2, 12), "open", "closed")]),
    8: (at(11, 19, 18), "general", "support", A, None, []),
}


def write_history(db: Database, sla: SlaSettings) -> None:
    """The tickets and their events as the pipeline and the agents' commands record them, then the SLA
    planner's deadlines, planned as the daemon plans them: after the history was committed (on PostgreSQL
    the planner reads only the events of finished transactions)."""
    planner = SlaPlanner(sla)
    with db.unit_of_work() as session:
        planner.start(session, at(10, 1, 0))  # SLAs on since before the first ticket
        _write_tickets(session)
    with db.unit_of_work() as session:
        planner.catch_up(session, NOW)


def _write_tickets(session: Session) -> None:
    customer = Contact(address="klient@example.com", name="Klient")
    session.add(customer)
    session.flush()
    for number, (created, queue, mailbox, owner, answered, changes) in TICKETS.items():
        status = changes[-1][2] if changes else ("open" if answered else "new")
        ticket = Ticket(
            number=f"MB-{number:06d}",
            status=status,
            subject=f"T{number}",
            customer_id=customer.id,
            mailbox=mailbox,
            created_at=created,
            updated_at=created,
            closed_at=changes[-1][0] if status == "closed" else None,
            first_response_at=answered,
            owner=owner,
            priority="P3",
            queue=queue,
            triage_reason="routing unsure" if queue == "triage" else None,
        )
        session.add(ticket)
        session.flush()
        events = [TicketEvent(ticket_id=ticket.id, at=created, actor="klient@example.com", kind="created", new="new")]
        if answered is not None:
            events.append(TicketEvent(ticket_id=ticket.id, at=answered, actor=owner or A, kind="first_response"))
            events.append(
                TicketEvent(ticket_id=ticket.id, at=answered, actor=owner or A, kind="status", old="new", new="open")
            )
        events += [
            TicketEvent(ticket_id=ticket.id, at=when, actor=owner or "cli", kind="status", old=old, new=new)
            for when, old, new in changes
        ]
        session.add_all(events)
