"""The dashboard and the period report in a real browser: axe-core finds no violation on any page at 1280 and
375 px; chart text is at least 11 px on screen at 375 px; the period report's wide tables are focusable and
visibly scrollable; the overview lists the most severe open findings and a new deployment sees a 24-hour trend.

axe-core is vendored in tests/axe/ (version and licence in tests/axe/README.md). It is injected into each page with
the context's CSP bypassed (the dashboard's own CSP allows only its own scripts, and it has none).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_web import API_TOKEN, AUTH, Dashboard, dashboard, point, rpo_dashboard

from auditor.fake.fleet import fake_id
from auditor.render.compliance import compliance_html
from auditor.service.clock import utcnow
from auditor.service.compliance import read_period_report
from auditor.service.dashboard import default_trend_days
from auditor.web.charts import MAX_MARKS, compliance_chart

# The module-scoped fixtures: one dashboard each (real cycles, uvicorn) for this module.
__all__ = ["dashboard", "rpo_dashboard"]

AXE = Path(__file__).parent / "axe" / "axe.min.js"
WIDTHS = (1280, 375)
# Every rule axe runs by default (WCAG 2.0-2.2 A and AA, and best practices): no tag filter.
AXE_RUN = """async () => {
  const result = await axe.run(document, {resultTypes: ["violations"]});
  return result.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                      nodes: v.nodes.slice(0, 5).map(n => n.target.join(" "))}));
}"""


def pages() -> list[str]:
    return ["/", "/?days=1", "/?days=7", "/?days=90", "/findings", "/findings?status=all&sort=disk",
            "/runs", "/notifications", "/waivers", f"/disks/{fake_id('disk', 'demo:busy-volume')}",
            f"/disks/{fake_id('disk', 'demo:legacy-db-data')}", "/disks/disk_doesnotexist0"]


@pytest.fixture
def signed_in(browser: Any, dashboard: Dashboard, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A logged-in page at the width of the test's `width` parameter, its CSP bypassed so axe can be injected."""
    width = request.node.callspec.params["width"]
    context = browser.new_context(viewport={"width": width, "height": 900}, base_url=dashboard.url,
                                  bypass_csp=True)
    tab = context.new_page()
    tab.goto("/login")
    tab.fill("#token", API_TOKEN)
    tab.keyboard.press("Enter")
    tab.wait_for_url(f"{dashboard.url}/")
    try:
        yield tab
    finally:
        context.close()


def violations(page: Any) -> list[dict[str, Any]]:
    page.add_script_tag(path=str(AXE))
    found: list[dict[str, Any]] = page.evaluate(AXE_RUN)
    return found


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("width", WIDTHS)
def test_axe_finds_no_violation_on_any_page(signed_in: Any, browser: Any, dashboard: Dashboard,
                                            width: int) -> None:
    found = {}
    for path in pages():
        signed_in.goto(path)
        if v := violations(signed_in):
            found[path] = v
    # The login page, signed out.
    context = browser.new_context(viewport={"width": width, "height": 900}, base_url=dashboard.url,
                                  bypass_csp=True)
    try:
        login = context.new_page()
        login.goto("/login")
        if v := violations(login):
            found["/login"] = v
    finally:
        context.close()
    assert found == {}, found


def test_axe_is_the_vendored_release() -> None:
    # The file the README names: axe-core 4.14.1, with its MPL-2.0 licence beside it.
    head = AXE.read_text(encoding="utf-8")[:200]
    assert head.startswith("/*! axe v4.14.1") and "Mozilla Public" in head
    assert "Mozilla Public License, version 2.0" in (AXE.parent / "LICENSE").read_text(encoding="utf-8")
    assert "4.14.1" in (AXE.parent / "README.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_axe_catches_a_violation(browser: Any) -> None:
    # The check can fail: a page with an unlabelled input and an image without alt text has violations.
    context = browser.new_context(bypass_csp=True)
    try:
        page = context.new_page()
        page.set_content('<!DOCTYPE html><html lang="en"><head><title>x</title></head><body><main>'
                         '<input type="text"><img src="data:,"></main></body></html>')
        assert {v["id"] for v in violations(page)} >= {"label", "image-alt"}
    finally:
        context.close()


# ---- the period report --------------------------------------------------------------------------------------


def period_report_html(dashboard: Dashboard) -> str:
    async def build() -> str:
        now = utcnow()
        report = await read_period_report(dashboard.world.runtime, start=now - timedelta(days=30), end=now)
        return compliance_html(report)

    html: str = dashboard.call(build())
    return html


@pytest.mark.slow
@pytest.mark.parametrize("width", WIDTHS)
def test_the_period_report_has_no_axe_violation_and_scrollable_tables_are_focusable(
        browser: Any, dashboard: Dashboard, width: int, tmp_path: Path) -> None:
    context = browser.new_context(viewport={"width": width, "height": 900}, bypass_csp=True)
    try:
        page = context.new_page()
        page.set_content(period_report_html(dashboard))
        assert violations(page) == []
        regions = page.locator(".scroll")
        assert regions.count() >= 3
        for i in range(regions.count()):
            region = regions.nth(i)
            # A keyboard user reaches it (tab stop) and it says what it holds.
            assert region.get_attribute("tabindex") == "0" and region.get_attribute("role") == "region"
            assert region.get_attribute("aria-label")
        if width == 375:
            wide = [i for i in range(regions.count())
                    if regions.nth(i).evaluate("e => e.scrollWidth > e.clientWidth")]
            assert wide, "at 375 px some table should need scrolling"
            region = regions.nth(wide[0])
            region.focus()
            assert page.evaluate("document.activeElement.classList.contains('scroll')")
            # Visibly scrollable: a shadow at the edge that has more, and a focus outline.
            style = region.evaluate("e => { const s = getComputedStyle(e); "
                                    "return [s.backgroundImage, s.outlineStyle]; }")
            assert "gradient" in style[0] and style[1] != "none", style
            page.keyboard.press("ArrowRight")
            page.wait_for_function("e => e.scrollLeft > 0", arg=region.element_handle(), timeout=5000)
            page.screenshot(path=str(tmp_path / "period-375.png"), full_page=True)
    finally:
        context.close()


# ---- the overview -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("width", [375])
def test_chart_text_is_at_least_11px_at_375px(signed_in: Any, width: int, tmp_path: Path) -> None:
    for path in ("/?days=1", "/?days=7", "/?days=90"):
        signed_in.goto(path)
        signed_in.locator("#chart-compliance").screenshot(path=str(tmp_path / f"chart-{path[7:]}.png"))
        sizes = signed_in.locator("svg.chart-svg text").evaluate_all(
            "ts => ts.map(t => parseFloat(getComputedStyle(t).fontSize) * t.getScreenCTM().a)")
        assert sizes and min(sizes) >= 11, (path, min(sizes))
        # ... and the axis labels of each chart do not overlap one another.
        for chart in ("#chart-compliance", "#chart-severity"):
            boxes = signed_in.locator(f"{chart} .tick-x").evaluate_all(
                "ts => ts.map(t => { const b = t.getBoundingClientRect(); return [b.left, b.right]; })")
            for (_, right), (left, _) in zip(boxes, boxes[1:], strict=False):
                assert right <= left, (path, chart, boxes)


@pytest.mark.slow
@pytest.mark.parametrize("width", [1280])
def test_a_new_deployment_sees_24_hours_with_failed_and_partial_runs_marked(signed_in: Any, dashboard: Dashboard,
                                                                           width: int) -> None:
    # The module's history spans 60 hours (< 7 days): the overview opens on the 24-hour trend.
    signed_in.goto("/")
    assert signed_in.locator("nav.tabs a[aria-current=page]").inner_text() == "24 hours"
    runs = [r for r in dashboard.api("/api/v1/runs", limit=500)["runs"]
            if r["started_at"] >= (utcnow() - timedelta(days=1)).isoformat().replace("+00:00", "Z")]
    points = signed_in.locator("#chart-compliance circle.point")
    assert points.count() == len(runs) >= 4
    assert signed_in.locator("#chart-compliance circle.point-failed").count() == sum(
        r["status"] == "failed" for r in runs)
    assert signed_in.locator("#chart-compliance circle.point-partial").count() == sum(
        r["status"] == "partial" for r in runs)
    labels = signed_in.locator("#chart-compliance .tick-x").evaluate_all("ts => ts.map(t => t.textContent)")
    assert labels and all(re.fullmatch(r"\d\d:00", t) for t in labels), labels


@pytest.mark.slow
@pytest.mark.parametrize("width", [1280])
def test_the_overview_lists_the_ten_most_severe_open_findings(signed_in: Any, dashboard: Dashboard,
                                                             width: int, tmp_path: Path) -> None:
    signed_in.goto("/")
    signed_in.locator("#top-findings").screenshot(path=str(tmp_path / "top-findings.png"))
    rows = signed_in.locator("#top-findings tbody tr")
    report = dashboard.api("/api/v1/report")
    open_findings = [f for f in report["findings"] if f["status"] == "open"]
    assert rows.count() == min(10, len(open_findings)) > 0
    order = ["critical", "high", "medium", "low"]
    shown = [rows.nth(i).locator("td").first.inner_text().strip().lower() for i in range(rows.count())]
    ranks = [order.index(next(s for s in order if s in text)) for text in shown]
    assert ranks == sorted(ranks)
    best = min(order.index(f["severity"]) for f in open_findings)
    assert ranks[0] == best
    # Each row links to its disk and to the rule's open findings.
    first = rows.first
    assert first.locator("a[href^='/disks/']").count() == 1
    assert first.locator("a[href^='/findings?status=open&rule=']").count() == 1
    first.locator("a[href^='/disks/']").click()
    signed_in.wait_for_url(re.compile(r".*/disks/disk_.*"))


@pytest.mark.slow
@pytest.mark.parametrize("width", WIDTHS)
def test_the_overview_shows_the_fleets_observed_rpo_p50_p95_and_max(browser: Any, rpo_dashboard: str, width: int,
                                                                   tmp_path: Path) -> None:
    context = browser.new_context(viewport={"width": width, "height": 900}, base_url=rpo_dashboard,
                                  bypass_csp=True)
    page = context.new_page()
    try:
        page.goto("/login")
        page.fill("#token", API_TOKEN)
        page.keyboard.press("Enter")
        page.wait_for_url(f"{rpo_dashboard}/")
        summary = httpx.get(f"{rpo_dashboard}/api/v1/report", headers=AUTH, timeout=10).json()["summary"]
        # RPOs of 1, 2 and 3 days: the median differs from the 95th percentile and the maximum.
        assert summary["observed_rpo"] == {"disks": 3, "p50_seconds": 2 * 86400, "p95_seconds": 3 * 86400,
                                           "max_seconds": 3 * 86400}
        card = page.locator(".card", has=page.locator('[data-metric="observed_rpo"]'))
        card.screenshot(path=str(tmp_path / f"observed-rpo-{width}.png"))
        shown = {k: page.locator(f'[data-metric="observed_rpo.{k}"]').inner_text() for k in ("p50", "p95", "max")}
        assert shown == {"p50": "2d 0h", "p95": "3d 0h", "max": "3d 0h"}
        assert card.locator("dt").first.inner_text().split() == ["Observed", "RPO,", "30", "days", "over", "3",
                                                                   "disks"]
        # Each figure is its own list item, named by its label (abbreviations expanded for assistive technology).
        items = card.locator("ul.rpo li")
        assert items.evaluate_all("ls => ls.map(l => l.innerText.replace(/\\s+/g, ' ').trim())") == [
            "p50 2d 0h", "p95 3d 0h", "max 3d 0h"]
        assert card.locator("abbr").evaluate_all("as => as.map(a => a.title)") == [
            "median (50th percentile)", "95th percentile", "maximum"]
        # It fits: no horizontal scroll, nothing of the card cut off or overflowing it.
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        assert card.evaluate("c => c.scrollWidth <= c.clientWidth")
        card_box = card.bounding_box()
        for box in items.evaluate_all("ls => ls.map(l => { const b = l.getBoundingClientRect();"
                                      " return [b.left, b.right]; })"):
            assert card_box["x"] <= box[0] and box[1] <= card_box["x"] + card_box["width"], (box, card_box)
        assert violations(page) == []
    finally:
        context.close()


# ---- the trend window and its marks, without a browser ------------------------------------------------------


def test_the_default_trend_is_24_hours_until_the_runs_span_7_days() -> None:
    end = datetime(2030, 1, 8, tzinfo=UTC)
    assert default_trend_days([], now=end) == 1
    assert default_trend_days([point(end - timedelta(days=6, hours=23))], now=end) == 1
    assert default_trend_days([point(end - timedelta(days=7)), point(end)], now=end) == 7


def test_a_24_hour_chart_has_hour_ticks_and_a_busy_window_keeps_its_failed_and_partial_marks() -> None:
    end = datetime(2030, 1, 8, 17, 40, tzinfo=UTC)
    day = [point(end - timedelta(minutes=45 * k), status="failed" if k % 3 == 0 else "complete",
                 total=0 if k % 3 == 0 else 10) for k in range(31, 0, -1)]
    chart = compliance_chart(day, start=end - timedelta(days=1), end=end, gap=timedelta(hours=1))
    assert [t.label for t in chart.x_ticks] == ["18:00", "00:00", "06:00", "12:00"]
    assert [m.css for m in chart.marks].count("point point-failed") == 10
    # 90 days of a 5-minute interval: too many runs for a point each, but the bad ones keep theirs.
    start = end - timedelta(days=90)
    busy = [point(start + timedelta(minutes=5 * k), status="partial" if k % 1000 == 7 else "complete")
            for k in range(90 * 288)]
    chart = compliance_chart(busy, start=start, end=end, gap=timedelta(minutes=10))
    assert len(busy) > MAX_MARKS and {m.css for m in chart.marks} == {"point point-partial"}
    assert len(chart.marks) == sum(p.status == "partial" for p in busy) == 26
