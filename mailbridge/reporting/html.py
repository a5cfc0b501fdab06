"""The Report as one self-contained HTML page: inline CSS and server-drawn SVG charts, no script, and a
Content-Security-Policy that forbids fetching anything, so it opens the same offline as online."""

from __future__ import annotations

from importlib.resources import files

from jinja2 import Environment, select_autoescape
from markupsafe import Markup

from mailbridge.reporting.charts import Series, bar_chart
from mailbridge.reporting.model import Report
from mailbridge.reporting.render import duration, percent

OPENED, CLOSED, WALL, BUSINESS = "#3b6fd8", "#7cc48a", "#3b6fd8", "#e59a3c"


def _charts(r: Report) -> dict[str, Markup]:
    days = [d.day.isoformat() for d in r.days]
    bins = [b.label for b in r.first_response_histogram]
    queues = [q.queue for q in r.sla_by_queue]
    return {
        "per_day": Markup(
            bar_chart(
                "Tickets opened and closed per day",
                days,
                [
                    Series("opened", [d.opened for d in r.days], OPENED),
                    Series("closed", [d.closed for d in r.days], CLOSED),
                ],
            )
        ),
        "first_response": Markup(
            bar_chart(
                "First response time (tickets per bin)",
                bins,
                [
                    Series("wall clock", [b.wall for b in r.first_response_histogram], WALL),
                    Series("business hours", [b.business for b in r.first_response_histogram], BUSINESS),
                ],
            )
        ),
        "sla": Markup(
            bar_chart(
                "SLA compliance per queue (% met of met + breached)",
                queues,
                [
                    Series("first response", [100 * (q.first_response.rate or 0) for q in r.sla_by_queue], WALL),
                    Series("resolution", [100 * (q.resolution.rate or 0) for q in r.sla_by_queue], CLOSED),
                ],
                value_label=lambda v: f"{v:.0f}%",
                top=100,
            )
        ),
    }


def as_html(report: Report) -> str:
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    template = env.from_string(files("mailbridge.reporting").joinpath("report.html.j2").read_text(encoding="utf-8"))
    r = report
    return template.render(
        r=r,
        charts=_charts(r),
        duration=duration,
        percent=percent,
        times=[
            ("first response, wall clock", r.first_response.wall),
            ("first response, business hours", r.first_response.business),
            ("resolution, wall clock", r.resolution.wall),
            ("resolution, business hours", r.resolution.business),
        ],
        sla_rows=[(q.queue, q.first_response, q.resolution) for q in r.sla_by_queue]
        + [("all", r.sla_first_response, r.sla_resolution)],
        flows=[("queue", r.by_queue), ("mailbox", r.by_mailbox), ("agent", r.by_owner)],
    )
