"""Help-desk reports: response and resolution times (wall clock and business hours), SLA compliance,
throughput per queue, mailbox and agent, backlog, reopens, triage and tickets closed without an agent.

`build_report(session, …) -> Report` reads; `render` writes the Report as a table, JSON, CSV or HTML.
"""

from mailbridge.reporting.build import build_report
from mailbridge.reporting.model import Report

__all__ = ["Report", "build_report"]
