"""The web view: the JSON API serves the same snapshot as the bus endpoint, and in a real headless Chromium the
page draws the recorded points, keeps up with new ones, and fetches nothing from anywhere else."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from bus import Bus
from runtime.client import Client
from runtime.config import IntegrationConfig
from tests.dashboard.common import dashboard, emit, quick_settings, snapshot, wait_for_events

pytestmark = pytest.mark.timeout(45)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
RULES = """
[[rules]]
name = "score-regression"
kind = "regression"
metric = "program_score"
baseline_points = 3
min_drop = 10
actions = false
"""
SCORES = [81.0, 84.0, 83.0, 82.5, 61.0]


async def record_history(bus: Bus) -> None:
    for score in SCORES:
        await emit(bus, "program.score", {"program": "topic-classifier", "version": 2, "score": score}, "scorer")
    for i, latency in enumerate([120.0, 95.0, 140.0]):
        data = {"model": "demo/fewshot", "ok": i != 1, "latency_ms": latency, "input_tokens": 40, "output_tokens": 3,
                "cost": 0.0, "error": None if i != 1 else "timeout"}  # fmt: skip
        await emit(bus, "lm.call", data, "switcher")
    cycle = {"cycle_id": "c1", "program": "topic-classifier", "model": "demo/fewshot", "optimizer": "mipro",
             "baseline_score": 40.0, "optimized_score": 85.0, "improvement": 45.0, "deployed": False}  # fmt: skip
    await emit(bus, "cycle.completed", cycle, "cycle")


async def test_the_http_api_serves_the_same_snapshot_as_the_bus(
    config: IntegrationConfig, bus: Bus, client: Client, tmp_path: Path
) -> None:
    rules = tmp_path / "alerts.toml"
    rules.write_text(RULES)
    async with dashboard(config, quick_settings(alerts_file=rules, web=True)) as agent:
        await record_history(bus)
        await wait_for_events(bus, "alert.firing", 1)
        assert agent.web_url is not None and agent.web_url.startswith("http://127.0.0.1:")
        health = await agent.health_checks()
        assert health["web"].ok and health["web"].detail == agent.web_url
        async with httpx.AsyncClient(base_url=agent.web_url, timeout=5) as http:
            response = await http.get("api/snapshot", params={"program": "topic-classifier"})
            assert response.status_code == 200
            assert "default-src 'none'" in response.headers["content-security-policy"]
            over_http = response.json()
            over_bus = (await snapshot(client, program="topic-classifier")).model_dump(mode="json")
            assert over_http["web_url"] == over_bus["web_url"] == agent.web_url
            for key in ("series", "alerts", "programs", "events"):
                assert over_http[key] == over_bus[key], key
            bad = await http.get("api/snapshot", params={"max_points": "0"})
            assert bad.status_code == 400 and bad.json()["field_errors"][0]["loc"] == "max_points"
            page = await http.get("")
            assert page.status_code == 200 and 'data-poll-ms="300"' in page.text
            assert "http" not in page.text.replace(agent.web_url, "")  # no external reference in the page
            script = await http.get("static/dashboard.js")
            assert script.headers["content-type"].startswith("text/javascript") and "fetch(" in script.text
            assert (await http.get("static/secret.txt")).status_code == 404


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install -y chromium)")
async def test_the_page_draws_the_recorded_points_in_a_real_browser(
    config: IntegrationConfig, bus: Bus, tmp_path: Path
) -> None:
    playwright_api = pytest.importorskip("playwright.async_api", reason="the playwright package is not installed")
    expect = playwright_api.expect
    rules = tmp_path / "alerts.toml"
    rules.write_text(RULES)
    shots = Path(os.environ.get("DASHBOARD_SCREENSHOTS", tmp_path))
    async with dashboard(config, quick_settings(alerts_file=rules, web=True)) as agent:
        await record_history(bus)
        await wait_for_events(bus, "alert.firing", 1)
        url = agent.web_url
        assert url is not None
        requests: list[str] = []
        errors: list[str] = []
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 1100})
                page.on("request", lambda request: requests.append(request.url))
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
                await page.goto(url + "#programs/topic-classifier")

                scores = 'figure.chart[data-metric="program_score"] circle.point'
                # The page's CSP forbids eval, so waits go through locators (Playwright's own isolated world).
                await expect(page.locator(scores)).to_have_count(len(SCORES), timeout=10_000)
                drawn = await page.eval_on_selector_all(scores, "els => els.map(e => Number(e.dataset.v))")
                assert drawn == SCORES
                labels = await page.eval_on_selector(
                    'figure.chart[data-metric="program_score"] g.series', "g => JSON.parse(g.dataset.labels)"
                )
                assert labels == {"program": "topic-classifier", "version": "2"}
                cells = await page.eval_on_selector_all("main table td", "tds => tds.map(td => td.textContent)")
                assert "firing" in cells and "score-regression" in cells
                assert await page.text_content("#alert-count") == "1"
                await page.screenshot(path=str(shots / "dashboard-program.png"), full_page=True)

                # Live: a new point shows up without a reload.
                await emit(bus, "program.score", {"program": "topic-classifier", "version": 2, "score": 90.0})
                await expect(page.locator(scores)).to_have_count(len(SCORES) + 1, timeout=10_000)

                await page.goto(url + "#overview")
                await page.wait_for_selector('figure.chart[data-metric="lm_latency"] circle.point')
                latency: list[Any] = await page.eval_on_selector_all(
                    'figure.chart[data-metric="lm_latency"] circle.point', "els => els.map(e => Number(e.dataset.v))"
                )
                assert latency == [120.0, 140.0]  # the failed call has no latency; it is in the error rate
                rates = await page.eval_on_selector_all(
                    'figure.chart[data-metric="error_rate"] circle.point', "els => els.map(e => Number(e.dataset.v))"
                )
                assert rates == pytest.approx([0.0, 0.5, 1 / 3])
                await page.screenshot(path=str(shots / "dashboard-overview.png"), full_page=True)

                await page.goto(url + "#models/" + "demo%2Ffewshot")
                await expect(page.locator("main h2").first).to_have_text("Model demo/fewshot")
                await expect(page.locator('figure.chart[data-metric="error_rate"] circle.point')).to_have_count(3)
                cells = await page.eval_on_selector_all("main table td", "tds => tds.map(td => td.textContent)")
                assert cells[:4] == ["demo/fewshot", "3", "1", "33.3%"]
                await page.goto(url + "#alerts")
                await expect(page.locator("main h2").nth(1)).to_have_text("History")
                await expect(page.locator("main table tbody tr")).to_have_count(1 + 2 + 1)  # alert, history, rule
                await page.screenshot(path=str(shots / "dashboard-alerts.png"), full_page=True)
            finally:
                await browser.close()
        outside = [u for u in requests if not u.startswith(url)]
        assert outside == [], outside
        assert errors == []


async def test_a_busy_port_leaves_the_bus_side_serving(config: IntegrationConfig, client: Client) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        settings = quick_settings().model_copy(update={"dashboard_port": port})
        async with dashboard(config, settings) as agent:
            health = await agent.health_checks()
            assert not health["web"].ok and f"cannot listen on 127.0.0.1:{port}" in health["web"].detail
            assert (await snapshot(client)).web_url is None  # the bus endpoints still answer
