"""Is the daemon healthy: every mailbox connected (or failing for less than a while), the database
answering, the outbox moving. `assess` is a pure function of what the daemon knows; `read_outbox` is
the one database read behind it (and behind the outbox gauges)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from mailbridge.config import HttpSettings
from mailbridge.db import Database
from mailbridge.ingest.ledger import SourceHealth
from mailbridge.models import OutboxMail, OutboxStatus, utcnow

CrmFailing = Callable[[], tuple[datetime, str] | None]


@dataclass(frozen=True, slots=True)
class OutboxSnapshot:
    depth: Mapping[str, int]  # unsent mails, by mailbox
    oldest: Mapping[str, datetime]  # when the oldest of them was queued, by mailbox

    def oldest_age(self, now: datetime, mailbox: str | None = None) -> float:
        """Seconds since the oldest unsent mail (of one mailbox, or of all) was queued; 0 when none waits."""
        queued = [at for box, at in self.oldest.items() if mailbox is None or box == mailbox]
        return max(0.0, (now - min(queued)).total_seconds()) if queued else 0.0


@dataclass(frozen=True, slots=True)
class Probe:
    """One database check: the outbox as it stood, or why it could not be read."""

    at: datetime
    outbox: OutboxSnapshot | None
    error: str | None = None


def read_outbox(db: Database) -> OutboxSnapshot:
    """The unsent mail, grouped by mailbox: one statement over the `ix_outbox_due (status, …)` index, so it
    reads only the pending rows, however many have been sent."""
    with db.reader() as session:
        rows = session.execute(
            select(OutboxMail.mailbox, func.count(), func.min(OutboxMail.created_at))
            .where(OutboxMail.status == OutboxStatus.PENDING)
            .group_by(OutboxMail.mailbox)
        ).all()
    return OutboxSnapshot(
        depth={mailbox: int(count) for mailbox, count, _ in rows},
        oldest={mailbox: oldest for mailbox, _, oldest in rows if oldest is not None},
    )


def assess(
    settings: HttpSettings,
    mailboxes: Mapping[str, SourceHealth],
    probe: Probe,
    crm_failing: CrmFailing | None,
    now: datetime | None = None,
) -> tuple[bool, dict[str, Any]]:
    """(healthy, the body of /healthz). Every problem is named in `problems`, one line each."""
    now = now or utcnow()
    problems: list[str] = []
    boxes: dict[str, Any] = {}
    for name, health in mailboxes.items():
        entry = _mailbox(settings, health, now)
        boxes[name] = entry
        if not entry["ok"]:
            problems.append(
                f"mailbox {name}: {entry['state']} since {_iso(health.since)}: {health.error or 'no session'}"
            )
    checks: dict[str, Any] = {"mailboxes": boxes}
    if probe.outbox is None:
        checks["database"] = {"ok": False, "error": probe.error}
        problems.append(f"database: {probe.error}")
    else:
        checks["database"] = {"ok": True}
        age = probe.outbox.oldest_age(now)
        stuck = age > settings.outbox_stuck_seconds
        checks["outbox"] = {
            "ok": not stuck,
            "unsent": sum(probe.outbox.depth.values()),
            "oldest_age_seconds": age,
            "stuck_after_seconds": settings.outbox_stuck_seconds,
        }
        if stuck:
            problems.append(
                f"outbox: stuck, the oldest unsent mail was queued {age:.0f} s ago "
                f"(more than {settings.outbox_stuck_seconds:g} s)"
            )
    if crm_failing is not None:
        failing = crm_failing()
        # Not a reason for 503: mail still flows (tickets are routed by the rules and flagged).
        checks["crm"] = (
            {"ok": True} if failing is None else {"ok": False, "since": _iso(failing[0]), "error": failing[1]}
        )
    return not problems, {"status": "ok" if not problems else "failing", "problems": problems, "checks": checks}


def _mailbox(settings: HttpSettings, health: SourceHealth, now: datetime) -> dict[str, Any]:
    entry: dict[str, Any] = {"since": _iso(health.since)}
    if health.state in ("connected", "stopped", "standby"):
        return {"ok": True, "state": health.state, **entry}
    over = (now - health.since).total_seconds() > settings.mailbox_failing_seconds
    if health.state == "starting":
        return {"ok": not over, "state": "not connected yet" if over else "connecting", **entry}
    # Failing for less than the threshold: the watcher is reconnecting with its back-off.
    return {"ok": not over, "state": "failing" if over else "reconnecting", "error": health.error, **entry}


class LeasedMailboxes(Mapping[str, SourceHealth]):
    """The mailboxes' health as this instance sees it: one it has not started because another instance
    holds its lease is on standby, not "not connected yet"."""

    def __init__(self, health: Mapping[str, SourceHealth], running: Callable[[], Collection[str]]) -> None:
        self._health = health
        self._running = running

    def __getitem__(self, name: str) -> SourceHealth:
        health = self._health[name]
        if health.state == "starting" and name not in self._running():
            return SourceHealth(state="standby", since=health.since)
        return health

    def __iter__(self) -> Iterator[str]:
        return iter(self._health)

    def __len__(self) -> int:
        return len(self._health)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")
