"""The Report as JSON, as CSV (one figure a row: section, name, metric, value, for a spreadsheet's pivot
table) and as a text table for the terminal. Durations are seconds in JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from mailbridge.reporting.model import Compliance, Report, Stats

MEASURES = ("count", "median", "mean", "p90", "max")


def as_json_data(report: Report) -> dict[str, Any]:
    data = asdict(report)
    data.update(
        since=report.since.isoformat(),
        until=report.until.isoformat(),
        generated_at=report.generated_at.isoformat(),
        days=[{**day, "day": day["day"].isoformat()} for day in data["days"]],
        reopen_rate=report.reopen_rate,
        triage_share=report.triage_share,
        auto_closed_share=report.auto_closed_share,
    )
    data["sla_first_response"]["rate"] = report.sla_first_response.rate
    data["sla_resolution"]["rate"] = report.sla_resolution.rate
    for queue, row in zip(report.sla_by_queue, data["sla_by_queue"], strict=True):
        row["first_response"]["rate"] = queue.first_response.rate
        row["resolution"]["rate"] = queue.resolution.rate
    return data


def as_json(report: Report) -> str:
    return json.dumps(as_json_data(report), indent=2, ensure_ascii=False)


def _figures(report: Report) -> Iterator[tuple[str, str, str, Any]]:
    yield from (
        ("period", "", "since", report.since.isoformat()),
        ("period", "", "until", report.until.isoformat()),
        ("period", "", "queue", report.queue or ""),
        ("period", "", "timezone", report.timezone),
        ("tickets", "", "opened", report.opened),
        ("tickets", "", "closed", report.closed),
        ("tickets", "", "reopened", report.reopened),
        ("tickets", "", "reopened_after_close", report.reopened_after_close),
        ("tickets", "", "reopened_after_waiting", report.reopened_after_waiting),
        ("tickets", "", "triaged", report.triaged),
        ("tickets", "", "auto_closed", report.auto_closed),
    )
    for section, times in (("first_response", report.first_response), ("resolution", report.resolution)):
        for clock, stats in (("wall", times.wall), ("business", times.business)):
            yield from ((section, clock, f"{m}_seconds" if m != "count" else m, getattr(stats, m)) for m in MEASURES)
    for name, compliance in (("first_response", report.sla_first_response), ("resolution", report.sla_resolution)):
        yield from _compliance_figures("sla", name, compliance)
    for queue in report.sla_by_queue:
        yield from _compliance_figures("sla_first_response", queue.queue, queue.first_response)
        yield from _compliance_figures("sla_resolution", queue.queue, queue.resolution)
    for section, flows in (("queue", report.by_queue), ("mailbox", report.by_mailbox), ("owner", report.by_owner)):
        for flow in flows:
            yield (section, flow.name, "opened", flow.opened)
            yield (section, flow.name, "closed", flow.closed)
    yield from (("backlog_status", c.name, "tickets", c.tickets) for c in report.backlog_by_status)
    yield from (("backlog_age", c.name, "tickets", c.tickets) for c in report.backlog_by_age)
    for day in report.days:
        yield ("day", day.day.isoformat(), "opened", day.opened)
        yield ("day", day.day.isoformat(), "closed", day.closed)
    for b in report.first_response_histogram:
        yield ("first_response_histogram", b.label, "wall", b.wall)
        yield ("first_response_histogram", b.label, "business", b.business)


def _compliance_figures(section: str, name: str, c: Compliance) -> Iterator[tuple[str, str, str, Any]]:
    yield from ((section, name, "met", c.met), (section, name, "breached", c.breached))
    yield from ((section, name, "running", c.running), (section, name, "rate", c.rate))


def as_csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("section", "name", "metric", "value"))
    writer.writerows((*row[:3], "" if row[3] is None else row[3]) for row in _figures(report))
    return out.getvalue()


def duration(seconds: float | None) -> str:
    """3d 4h, 2h 05m, 12m 30s, 45s."""
    if seconds is None:
        return "-"
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _table(headers: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    """Lines of a table: the first column left-aligned, the figures right-aligned."""
    cells = [headers, *(tuple(str(v) for v in row) for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  " + "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]


def _stats_row(name: str, s: Stats) -> tuple[Any, ...]:
    return (name, s.count, duration(s.median), duration(s.mean), duration(s.p90), duration(s.max))


def _sla_row(name: str, first_response: Compliance, resolution: Compliance) -> tuple[Any, ...]:
    return (
        name,
        percent(first_response.rate),
        f"{first_response.met}/{first_response.breached}",
        percent(resolution.rate),
        f"{resolution.met}/{resolution.breached}",
    )


def _head(r: Report) -> list[str]:
    return [
        f"Help-desk report {r.since} .. {r.until} ({r.timezone})"
        + (f", queue {r.queue}" if r.queue else "")
        + f", as of {r.generated_at:%Y-%m-%d %H:%M} UTC",
        f"Opened {r.opened}, closed {r.closed}; reopened {r.reopened} ({percent(r.reopen_rate)}: "
        f"{r.reopened_after_close} after closing, {r.reopened_after_waiting} after waiting)",
        f"Triage {r.triaged} ({percent(r.triage_share)}); closed without an agent's answer {r.auto_closed}"
        f" ({percent(r.auto_closed_share)})",
    ]


def as_table(report: Report) -> str:
    r = report
    lines = [*_head(r), "", "Times (tickets opened in the period, as of now)"]
    lines += _table(
        ("", "tickets", "median", "mean", "p90", "max"),
        [
            _stats_row("first response, wall clock", r.first_response.wall),
            _stats_row("first response, business hours", r.first_response.business),
            _stats_row("resolution, wall clock", r.resolution.wall),
            _stats_row("resolution, business hours", r.resolution.business),
        ],
    )
    lines += ["", "SLA compliance (met / breached; running ones not counted)"]
    lines += _table(
        ("queue", "first response", "met/breached", "resolution", "met/breached"),
        [_sla_row(q.queue, q.first_response, q.resolution) for q in r.sla_by_queue]
        + [_sla_row("all", r.sla_first_response, r.sla_resolution)],
    )
    for title, flows in (("queue", r.by_queue), ("mailbox", r.by_mailbox), ("agent", r.by_owner)):
        lines += ["", f"Per {title} (closed: in the period, whenever opened)"]
        lines += _table((title, "opened", "closed"), [(f.name, f.opened, f.closed) for f in flows])
    lines += ["", "Backlog now (not closed)"]
    lines += _table(("status", "tickets"), [(c.name, c.tickets) for c in r.backlog_by_status])
    lines += _table(("age", "tickets"), [(c.name, c.tickets) for c in r.backlog_by_age])
    return "\n".join(lines) + "\n"
