"""The help-desk report over a history whose answers were worked out by hand (tests/report_history.py),
business time against the SLA calendar, and `mailbridge report` in each format."""

from __future__ import annotations

import csv
import io
import json
import os
import random
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from mailbridge.cli import app
from mailbridge.db import Database
from mailbridge.models import Ticket
from mailbridge.reporting import Report, build_report
from mailbridge.reporting.business import BusinessTimeline
from mailbridge.reporting.html import as_html
from mailbridge.reporting.model import Bin, Compliance, Count, Day, Flow, Stats
from mailbridge.sla.calendar import BusinessCalendar
from mailbridge.sla.settings import CalendarSettings, SlaSettings
from tests.report_history import NOW, SINCE, SLA, UNTIL, write_history
from tests.support.chromium import Chromium, find_chromium

HOUR = 3600.0


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database(database_url, fsync_each_commit=False)
    db.upgrade()
    write_history(db, SlaSettings.model_validate(SLA))
    yield db
    db.close()


def report_of(db: Database, queue: str | None = None) -> Report:
    with db.reader() as session:
        return build_report(session, SlaSettings.model_validate(SLA), "triage", SINCE, UNTIL, queue, NOW)


def test_counts_of_the_period(database: Database) -> None:
    r = report_of(database)
    assert (r.opened, r.closed) == (6, 5)  # T1-T6 opened; T1, T2, T4, T6 and T7 (opened before) closed
    assert (r.reopened, r.reopened_after_close, r.reopened_after_waiting) == (2, 1, 1)  # T6, T5
    assert r.reopen_rate == pytest.approx(2 / 6)
    assert (r.triaged, r.auto_closed) == (1, 1)  # T4 both
    assert r.by_queue == (Flow("billing", 3, 3), Flow("general", 2, 1), Flow("triage", 1, 1))
    assert r.by_mailbox == (Flow("support", 5, 5), Flow("sales", 1, 0))
    assert r.by_owner == (Flow("a@firma.example", 3, 2), Flow("b@firma.example", 2, 2), Flow("(unassigned)", 1, 1))


def test_first_response_times_wall_clock_and_business_hours(database: Database) -> None:
    fr = report_of(database).first_response
    # Wall clock: T6 30 min, T1 1 h, T5 4 h, T2 18 h (overnight), T3 65 h (over the weekend).
    assert fr.wall == Stats(5, 4 * HOUR, 318600 / 5, 64800 + 0.6 * (234000 - 64800), 65 * HOUR)
    # Business hours: T2 counts 1 h on Monday + 1 h on Tuesday, T3 30 min on Friday + 30 min on Monday.
    assert fr.business == Stats(5, HOUR, 30600 / 5, 2 * HOUR + 0.6 * 2 * HOUR, 4 * HOUR)


def test_resolution_times_wall_clock_and_business_hours(database: Database) -> None:
    res = report_of(database).resolution
    # T4 1 h (a Saturday: no business time), T1 5 h, T2 24 h, T6 26 h (to its last closing).
    assert res.wall == Stats(4, (5 + 24) / 2 * HOUR, 56 * HOUR / 4, 24 * HOUR + 0.7 * 2 * HOUR, 26 * HOUR)
    assert res.business == Stats(4, (5 + 8) / 2 * HOUR, 23 * HOUR / 4, 8 * HOUR + 0.7 * 2 * HOUR, 10 * HOUR)


def test_sla_compliance_met_breached_and_running(database: Database) -> None:
    r = report_of(database)
    # First response: T1, T2 (exactly on its deadline), T3, T6 met; T5 answered 2 h late; T4 was closed
    # on a Saturday before its clock started: neither.
    assert r.sla_first_response == Compliance(met=4, breached=1, running=1)
    assert r.sla_first_response.rate == pytest.approx(0.8)
    # Resolution: T1, T2, T4, T6 met (T6 after its reopening too); T3 and T5 are open past their deadline.
    assert r.sla_resolution == Compliance(met=4, breached=2, running=0)
    by_queue = {q.queue: (q.first_response, q.resolution) for q in r.sla_by_queue}
    assert by_queue == {
        "billing": (Compliance(3, 0, 0), Compliance(3, 0, 0)),
        "general": (Compliance(1, 1, 0), Compliance(0, 2, 0)),
        "triage": (Compliance(0, 0, 1), Compliance(1, 0, 0)),
    }


def test_backlog_days_and_histogram(database: Database) -> None:
    r = report_of(database)
    assert r.backlog_by_status == (Count("new", 1), Count("open", 2))  # T8; T3, T5
    assert [c.tickets for c in r.backlog_by_age] == [1, 0, 0, 2, 0]  # T8 18 h old; T3, T5 two weeks
    assert r.days == (
        Day(date(2026, 11, 2), 2, 2),
        Day(date(2026, 11, 3), 1, 1),
        Day(date(2026, 11, 4), 1, 0),
        Day(date(2026, 11, 5), 0, 1),
        Day(date(2026, 11, 6), 1, 0),
        Day(date(2026, 11, 7), 1, 1),
        Day(date(2026, 11, 8), 0, 0),
    )
    bins = {b.label: (b.wall, b.business) for b in r.first_response_histogram}
    assert bins["30-60 min"] == (1, 1) and bins["1-2 h"] == (1, 2) and bins["2-4 h"] == (0, 1)
    assert bins["4-8 h"] == (1, 1) and bins["8-24 h"] == (1, 0) and bins["1-3 days"] == (1, 0)
    assert sum(b.wall for b in r.first_response_histogram) == r.first_response.wall.count


def test_one_queue(database: Database) -> None:
    r = report_of(database, queue="billing")
    assert (r.opened, r.closed, r.reopened, r.auto_closed) == (3, 3, 1, 0)
    assert r.first_response.wall.median == HOUR  # T6 30 min, T1 1 h, T2 18 h
    assert r.backlog_by_status == ()
    assert r.first_response_histogram[0] == Bin("< 15 min", 900.0, 0, 0)


def test_an_empty_period_and_a_reversed_one(database: Database) -> None:
    with database.reader() as session:
        sla = SlaSettings.model_validate(SLA)
        empty = build_report(session, sla, "triage", date(2027, 1, 1), date(2027, 1, 3), now=NOW)
        with pytest.raises(ValueError, match="ends"):
            build_report(session, sla, "triage", UNTIL, SINCE, now=NOW)
    assert (empty.opened, empty.closed, empty.first_response.wall) == (0, 0, Stats(0, None, None, None, None))
    assert empty.reopen_rate is None and empty.sla_first_response.rate is None and len(empty.days) == 3


def test_business_timeline_agrees_with_the_sla_calendar() -> None:
    """Warsaw office hours with Polish holidays, across the end of summer time and Christmas."""
    office = CalendarSettings(timezone="Europe/Warsaw", working_hours=["08:00-12:00", "13:00-16:00"], holidays="PL")
    calendar = office.build()
    rng = random.Random(6)
    first = datetime(2026, 10, 1, tzinfo=UTC).timestamp()
    starts = [first + rng.uniform(0, 90 * 86400) for _ in range(400)]
    ends = [s + rng.uniform(0, 20 * 86400) for s in starts]
    timeline = BusinessTimeline(calendar, min(starts), max(ends))
    fast = timeline.between(np.array(starts), np.array(ends))
    slow = [calendar.between(_utc(s), _utc(e)) for s, e in zip(starts, ends, strict=True)]
    assert fast.tolist() == pytest.approx(slow, abs=1e-6)


def test_business_timeline_over_days_without_working_time() -> None:
    calendar = BusinessCalendar("UTC", (0,), ((datetime.min.time(), None),))  # Mondays only
    saturday = datetime(2026, 11, 7, tzinfo=UTC).timestamp()
    timeline = BusinessTimeline(calendar, saturday, saturday + 3600)
    assert timeline.between(np.array([saturday]), np.array([saturday + 3600])).tolist() == [0.0]


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# --- the command ---------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def config_with_history(tmp_path: Path, database_url: str) -> Path:
    path = tmp_path / "mailbridge.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "storage": {"fsync": False}, "sla": SLA}))
    db = Database(database_url)  # the config's own: data_dir/mailbridge.db, or the run's PostgreSQL database
    db.upgrade()
    write_history(db, SlaSettings.model_validate(SLA))  # before any command starts the SLA planner's clock today
    db.close()
    return path


def report_cli(config: Path, *args: str) -> str:
    result = runner.invoke(
        app, ["report", "--since", "2026-11-02", "--until", "2026-11-08", "--config", str(config), *args]
    )
    assert result.exit_code == 0, result.output
    return result.stdout


def test_cli_json(config_with_history: Path) -> None:
    data = json.loads(report_cli(config_with_history, "--format", "json"))
    assert (data["opened"], data["closed"], data["reopened"], data["auto_closed"]) == (6, 5, 2, 1)
    assert data["first_response"]["business"]["median"] == HOUR
    assert data["sla_first_response"] == {"met": 4, "breached": 1, "running": 1, "rate": 0.8}
    assert data["days"][0] == {"day": "2026-11-02", "opened": 2, "closed": 2}
    assert data["timezone"] == "UTC" and data["since"] == "2026-11-02" and data["until"] == "2026-11-08"


def test_cli_csv(config_with_history: Path) -> None:
    rows = list(csv.DictReader(io.StringIO(report_cli(config_with_history, "--format", "csv"))))
    figures = {(r["section"], r["name"], r["metric"]): r["value"] for r in rows}
    assert figures[("tickets", "", "opened")] == "6"
    assert figures[("first_response", "wall", "median_seconds")] == "14400.0"
    assert figures[("sla_resolution", "general", "breached")] == "2"
    assert figures[("owner", "(unassigned)", "closed")] == "1"
    assert figures[("day", "2026-11-07", "opened")] == "1"


def test_cli_table(config_with_history: Path) -> None:
    text = report_cli(config_with_history)  # table is the default
    assert "Opened 6, closed 5; reopened 2 (33.3%: 1 after closing, 1 after waiting)" in text
    assert any(line.split()[:3] == ["first", "response,", "wall"] and "4h 00m" in line for line in text.splitlines())
    assert "billing" in text and "(unassigned)" in text


def test_cli_html_is_one_file_that_fetches_nothing(config_with_history: Path, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    report_cli(config_with_history, "--format", "json", "--html", str(page))
    html = page.read_text(encoding="utf-8")
    assert html.count("<svg") == 3 and html.count('class="bar"') > 0
    assert "<script" not in html and "<link" not in html and " src=" not in html and " href=" not in html
    assert "default-src 'none'" in html


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "2026-11-31", "--until", "2026-12-01"], "--since '2026-11-31'"),
        (["--since", "2026-11-08", "--until", "2026-11-02"], "is before --since"),
        (["--since", "2026-11-02", "--until", "2026-11-08", "--format", "xml"], "use table, json or csv"),
    ],
)
def test_cli_bad_input_is_named(config_with_history: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["report", *args, "--config", str(config_with_history)])
    assert result.exit_code == 2 and message in result.output


# --- the HTML report in a browser -----------------------------------------------------------------

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHARTS = """JSON.stringify([...document.querySelectorAll('svg.chart')].map(svg => {
    const box = svg.getBoundingClientRect();
    const bars = [...svg.querySelectorAll('rect.bar')].filter(b => b.getBoundingClientRect().height > 0);
    return {width: box.width, height: box.height, bars: bars.length};
}))"""


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    binary = find_chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (scripts/install-test-deps.sh installs it)")
        pytest.skip("chromium is not installed (scripts/install-test-deps.sh installs it)")
    browser = Chromium(binary, tmp_path / "chromium-profile")
    yield browser
    browser.close()


def test_html_report_renders_its_charts_in_chromium(
    config_with_history: Path, tmp_path: Path, chromium: Chromium
) -> None:
    page = tmp_path / "report.html"
    report_cli(config_with_history, "--format", "csv", "--html", str(page))
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "report.png"
    visit = chromium.visit(page.as_uri(), CHARTS, screenshot)
    assert visit.errors == []
    charts = json.loads(visit.value)
    assert len(charts) == 3
    assert all(c["width"] > 300 and c["height"] > 100 for c in charts)
    # Bars taller than nothing: per day 5 days with tickets opened + 4 with tickets closed; the histogram
    # 5 wall-clock + 4 business-hours bins with answers; SLA: billing 2, general 1 (0 % resolution),
    # triage 1 (no first-response target decided).
    assert [c["bars"] for c in charts] == [9, 9, 4]
    assert screenshot.stat().st_size > 10_000


def test_the_browser_check_sees_errors_and_fetches(tmp_path: Path, chromium: Chromium) -> None:
    """The check above would notice a script error and a resource from the network."""
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="default-src \'none\'">'
        '</head><body><img src="https://cdn.invalid/chart.png"><p>x</p></body></html>',
        encoding="utf-8",
    )
    visit = chromium.visit(page.as_uri(), "document.querySelectorAll('p').length", tmp_path / "broken.png")
    assert visit.value == 1
    assert any("cdn.invalid" in error or "Content Security Policy" in error for error in visit.errors), visit.errors


def test_names_from_mail_are_escaped_in_the_html(database: Database) -> None:
    """An agent's #assign or a rule can put any text in an owner or a queue."""
    hostile = '<img src=x onerror="alert(1)">'
    with database.unit_of_work() as session:
        ticket = session.get(Ticket, 1)
        assert ticket is not None
        ticket.owner, ticket.queue = f"{hostile}@x", hostile
    html = as_html(report_of(database))
    assert "<img" not in html and 'onerror="alert' not in html
    assert html.count("&lt;img src=x onerror=") >= 3  # the owner's and the queue's rows, the SLA chart's label
