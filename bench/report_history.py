"""A large, realistic ticket history written straight into a mailbridge SQLite database, for the
report benchmark: tickets with their SLA deadlines and timers and their history (ticket_events), in a
few INSERT … SELECT statements over a recursive counter, so a million tickets take about a minute
instead of hours through the pipeline.

Every value is a function of the ticket's number (multiplicative hashing), so the same N gives the
same database. The shape follows what the pipeline writes (lifecycle.py, agents.py, sla/planner.py):

* 5 queues (8 % triage, with a triage reason), 3 mailboxes, 25 agents;
* 85 % answered by an agent (`first_response_at`, a `first_response` event, new -> open), with a
  skewed first-response time (most within an hour, a tail of a day);
* 75 % closed; a closed ticket that was never answered is "auto-closed";
* 30 % wait on the customer for a while (open -> waiting_customer -> open), 6 % of the closed ones are
  reopened once (closed -> open) and closed again;
* an SLA for every ticket outside triage (first response due 4 h, resolution 40 h after creation,
  wall clock), with the planner's four timers (75 % reminder and breach, per target).

Articles are not generated: the report does not read them.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

START = "2025-11-01 00:00:00"  # a year of tickets from here
DAYS = 365

# Hashes of the ticket number i, each an independent-looking value in [0, 1000).
_H = {
    name: f"((i * {mult}) % 1000003) % 1000"
    for name, mult in {
        "h_queue": 2654435761,
        "h_box": 40503,
        "h_agent": 2246822519,
        "h_answer": 3266489917,
        "h_frt": 668265263,
        "h_close": 374761393,
        "h_res": 1597334677,
        "h_wait": 3812015801,
        "h_jitter": 2870177450,
    }.items()
}

_TICKET_FACTS = f"""
WITH RECURSIVE counter(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM counter WHERE i < :n),
hashed AS (SELECT i, {", ".join(f"{expr} AS {name}" for name, expr in _H.items())} FROM counter),
timed AS (
    SELECT *,
        unixepoch(:start) + (i - 1) * (:days * 86400 / :n) + h_jitter AS created,
        h_answer < 850 AS answered,
        60 + (h_frt * h_frt * h_frt * h_frt) / 12000000 AS frt,  -- 1 min … 23 h, half within 1.5 h
        h_close < 750 AS closed,
        600 + h_res * h_res / 4 AS ttr              -- 10 min … ~2.9 days after the answer
    FROM hashed
)
SELECT i, created, answered, frt, closed, ttr, h_queue, h_box, h_agent, h_wait FROM timed
"""


def _at(epoch: str) -> str:
    """SQLAlchemy's SQLite DATETIME text (UTC): what the models read and compare."""
    return f"strftime('%Y-%m-%d %H:%M:%S', {epoch}, 'unixepoch') || '.000000'"


def _tickets_sql() -> str:
    fr = "CASE WHEN answered THEN created + frt END"
    closed = "CASE WHEN closed THEN created + CASE WHEN answered THEN frt ELSE 0 END + ttr END"
    queue = (
        "CASE WHEN h_queue < 80 THEN 'triage' WHEN h_queue < 400 THEN 'general' WHEN h_queue < 650 THEN 'technical'"
        " WHEN h_queue < 850 THEN 'billing' ELSE 'sales' END"
    )
    status = (
        "CASE WHEN closed THEN 'closed' WHEN NOT answered THEN 'new'"
        " WHEN h_wait < 300 THEN 'waiting_customer' ELSE 'open' END"
    )
    sla = "h_queue >= 80"
    return f"""
    INSERT INTO tickets (id, number, status, subject, customer_id, mailbox, created_at, updated_at, closed_at,
        first_response_at, owner, priority, queue, tags, triage_reason, sla_policy, sla_priority,
        first_response_due_at, resolution_due_at)
    SELECT i, 'MB-' || printf('%07d', i), {status}, 'Zgłoszenie ' || i, 1 + i % 10000,
        CASE h_box % 3 WHEN 0 THEN 'support' WHEN 1 THEN 'billing-inbox' ELSE 'sales-inbox' END,
        {_at("created")}, {_at("created")},
        CASE WHEN closed THEN {_at(closed)} END,
        CASE WHEN answered THEN {_at(fr)} END,
        CASE WHEN h_queue < 80 THEN NULL ELSE 'agent' || (h_agent % 25) || '@firma.example' END,
        'P' || (1 + h_agent % 4), {queue}, '[]',
        CASE WHEN h_queue < 80 THEN 'routing unsure' END,
        CASE WHEN {sla} THEN 'P3' END, CASE WHEN {sla} THEN 'P3' END,
        CASE WHEN {sla} THEN {_at("created + 4 * 3600")} END,
        CASE WHEN {sla} THEN {_at("created + 40 * 3600")} END
    FROM ({_TICKET_FACTS})
    """


def _events_sql() -> list[str]:
    """The history, one INSERT per kind of event (ordered by ticket, as the pipeline writes them)."""
    facts = f"FROM ({_TICKET_FACTS})"
    insert = "INSERT INTO ticket_events (ticket_id, at, actor, kind, old, new) "
    agent = "'agent' || (h_agent % 25) || '@firma.example'"
    waited = "answered AND h_wait < 300"
    reopened = "closed AND h_wait % 100 < 6"
    closed_at = "created + CASE WHEN answered THEN frt ELSE 0 END + ttr"
    return [
        insert + f"SELECT i, {_at('created')}, 'klient' || i || '@example.com', 'created', NULL, 'new' {facts}",
        insert + f"SELECT i, {_at('created + frt')}, {agent}, 'first_response', NULL, NULL {facts} WHERE answered",
        insert + f"SELECT i, {_at('created + frt')}, {agent}, 'status', 'new', 'open' {facts} WHERE answered",
        insert
        + f"SELECT i, {_at('created + frt + 60')}, {agent}, 'status', 'open', 'waiting_customer' {facts}"
        + f" WHERE {waited}",
        insert
        + f"SELECT i, {_at('created + frt + 60 + ttr / 3')}, 'klient' || i || '@example.com', 'status',"
        + f" 'waiting_customer', 'open' {facts} WHERE {waited} AND closed",
        insert
        + f"SELECT i, {_at(f'{closed_at} - ttr / 2')}, {agent}, 'status', CASE WHEN answered THEN 'open' ELSE 'new'"
        + f" END, 'closed' {facts} WHERE {reopened}",
        insert
        + f"SELECT i, {_at(f'{closed_at} - ttr / 4')}, 'klient' || i || '@example.com', 'status', 'closed', 'open'"
        + f" {facts} WHERE {reopened}",
        insert
        + f"SELECT i, {_at(closed_at)}, CASE WHEN answered THEN {agent} ELSE 'cli' END, 'status',"
        + f" CASE WHEN answered THEN 'open' ELSE 'new' END, 'closed' {facts} WHERE closed",
    ]


def _timers_sql() -> str:
    return """
    INSERT INTO sla_timers (ticket_id, target, share, fire_at, done_at)
    SELECT t.id, target.name, share.value, NULL,
        CASE WHEN target.name = 'first_response' AND t.first_response_at > t.first_response_due_at
            THEN t.first_response_due_at END
    FROM tickets AS t
    CROSS JOIN (SELECT 'first_response' AS name UNION ALL SELECT 'resolution') AS target
    CROSS JOIN (SELECT 0.75 AS value UNION ALL SELECT 1.0) AS share
    WHERE t.sla_policy IS NOT NULL
    ORDER BY t.id
    """


def fill(database: Path, count: int) -> dict[str, int]:
    """Write `count` tickets with their history into an empty, migrated database; returns row counts."""
    connection = sqlite3.connect(database, isolation_level=None)
    try:
        # A scratch database: no journal, no fsync while filling it.
        connection.execute("PRAGMA journal_mode=OFF")
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("BEGIN")
        connection.execute(
            "INSERT INTO contacts (id, address, name, created_at) WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL"
            " SELECT i + 1 FROM c WHERE i < 10000) SELECT i, 'klient' || i || '@example.com', '', :start FROM c",
            {"start": START},
        )
        params = {"n": count, "start": START, "days": DAYS}
        connection.execute(_tickets_sql(), params)
        for statement in _events_sql():
            connection.execute(statement, params)
        connection.execute(_timers_sql())
        connection.execute("COMMIT")
        connection.execute("PRAGMA journal_mode=WAL")
        return {
            table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("tickets", "ticket_events", "sla_timers")
        }
    finally:
        connection.close()
