"""The web view: the JSON API serves the same snapshot as the bus endpoint, and in a real headless Chromium the
page draws the recorded points, keeps up with new ones, and fetches nothing from anywhere else."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from pydantic import ValidationError

from dspyrt.agents.dashboard.web import SESSION_COOKIE
from dspyrt.bus import Bus
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.dashboard.common import dashboard, emit, snapshot, wait_for_events

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
    async with dashboard(config, alerts_file=rules, web=True) as agent:
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
    async with dashboard(config, alerts_file=rules, web=True) as agent:
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
        async with dashboard(config, dashboard_port=port) as agent:
            health = await agent.health_checks()
            assert not health["web"].ok and f"cannot listen on 127.0.0.1:{port}" in health["web"].detail
            assert (await snapshot(client)).web_url is None  # the bus endpoints still answer


# --------------------------------------------------------------------------------------- Host and token

TOKEN_ENV = "DASHBOARD_TEST_TOKEN"


async def get(url: str, path: str, *, host: str | None = None, **kwargs: Any) -> httpx.Response:
    headers = {**kwargs.pop("headers", {}), **({"Host": host} if host is not None else {})}
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        return await http.get(path, headers=headers, **kwargs)


async def raw_request(url: str, request: bytes) -> bytes:
    """Bytes in, bytes out: for requests httpx will not send (no Host at all)."""
    parsed = httpx.URL(url)
    async with await anyio.connect_tcp(parsed.host, parsed.port or 80) as stream:
        await stream.send(request)
        received = b""
        with anyio.fail_after(5):
            while not received.endswith(b"}") and b"\r\n\r\n" not in received[-4:]:
                try:
                    received += await stream.receive()
                except anyio.EndOfStream:
                    break
        return received


def test_the_settings_normalize_the_host_names_and_refuse_what_is_not_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert IntegrationConfig().dashboard_hosts == ["localhost", "127.0.0.1", "[::1]"]
    monkeypatch.setenv("DSPYRT_DASHBOARD_HOSTS", " Dash.Example.com. , ::1,[0:0::1], *.corp.example,10.0.0.7")
    monkeypatch.setenv("DSPYRT_DASHBOARD_TOKEN_ENV", TOKEN_ENV)
    settings = IntegrationConfig()
    assert settings.dashboard_hosts == ["dash.example.com", "[::1]", "[::1]", "*.corp.example", "10.0.0.7"]
    assert settings.dashboard_token_env == TOKEN_ENV
    for bad in ("dash.example.com:8765", "http://dash.example.com", "dash.example.com/x", "a.*.example", ""):
        with pytest.raises(ValidationError):
            IntegrationConfig(dashboard_hosts=[bad])
    with pytest.raises(ValidationError, match="not an environment variable name"):
        IntegrationConfig(dashboard_token_env="s3cr3t-t0ken value")


async def test_the_page_answers_only_to_its_host_names(config: IntegrationConfig, client: Client) -> None:
    async with dashboard(config, web=True) as agent:
        url = agent.web_url
        assert url is not None
        port = httpx.URL(url).port
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", f"LocalHost.:{port}"):
            response = await get(url, "healthz", host=host)
            assert response.status_code == 200, host
        for host in (f"evil.example:{port}", f"127.0.0.1.nip.io:{port}", "localhost.evil.example", f"[::2]:{port}",
                     f"localhost:{port}:1", "", f"*.localhost:{port}", f"localhost:{port}/x"):  # fmt: skip
            response = await get(url, "api/snapshot", host=host)
            assert response.status_code == 400, host
            assert response.json()["code"] == "invalid_host"
            assert "default-src 'none'" in response.headers["content-security-policy"]
        no_host = await raw_request(url, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert no_host.startswith(b"HTTP/1.1 400"), no_host

    # its own names replace the loopback ones; the address it listens on stays allowed
    async with dashboard(config, web=True, dashboard_hosts="dashboard.example.com,*.dash.example") as agent:
        url = agent.web_url
        assert url is not None
        for host, status in (("dashboard.example.com", 200), ("eu.dash.example", 200), ("dash.example", 400),
                             ("localhost", 400), (httpx.URL(url).netloc.decode(), 200)):  # fmt: skip
            assert (await get(url, "healthz", host=host)).status_code == status, host


async def test_with_a_token_every_route_needs_it_and_a_browser_gets_a_cookie(
    config: IntegrationConfig, client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    token = secrets.token_hex(32)
    monkeypatch.setenv(TOKEN_ENV, token)
    caplog.set_level(logging.DEBUG)
    async with dashboard(config, web=True, dashboard_token_env=TOKEN_ENV) as agent:
        url = agent.web_url
        assert url is not None
        bearer = {"Authorization": f"Bearer {token}"}
        # ?token= is the browser's way in on / only: elsewhere it is an unknown query parameter (400 once let in)
        for path, ok in (("", 200), ("api/snapshot", 200), ("healthz", 200), ("static/dashboard.js", 200),
                         ("static/nope.js", 404), ("api/snapshot?token=" + token, 400)):  # fmt: skip
            missing = await get(url, path)
            assert missing.status_code == 401, path
            assert missing.headers["www-authenticate"] == 'Bearer realm="dspyrt dashboard"'
            assert missing.json()["code"] == "unauthorized" and "no-store" in missing.headers["cache-control"]
            for wrong in (f"Bearer {token[:-1]}x", f"Bearer {token}{token}", "Bearer", f"Basic {token}", token):
                refused = await get(url, path, headers={"Authorization": wrong})
                assert refused.status_code == 401, (path, wrong)
                assert 'error="invalid_token"' in refused.headers["www-authenticate"]
            assert (await get(url, path, headers=bearer)).status_code == ok, path
        assert (await get(url, "healthz", headers=bearer, host="evil.example")).status_code == 400  # Host first
        assert (await get(url, "healthz", headers={"Authorization": "Bearer caf\u00e9".encode()})).status_code == 401

        # a browser: /?token= once, then the cookie; the cookie is not the token
        assert (await get(url, "", params={"token": "nope"})).status_code == 401
        async with httpx.AsyncClient(base_url=url, timeout=5) as browser:
            login = await browser.get("", params={"token": token})
            assert login.status_code == 200 and 'http-equiv="refresh" content="0; url=./"' in login.text
            cookie = login.headers["set-cookie"]
            attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
            assert {"httponly", "samesite", "max-age"} <= attributes and "samesite=strict" in cookie.lower()
            assert "secure" not in attributes and "path" not in attributes  # plain http; the page's own path
            assert token not in cookie
            page = await browser.get("")
            assert page.status_code == 200 and "data-poll-ms" in page.text
            over_http = (await browser.get("api/snapshot")).json()
            assert over_http["web_url"] == url and token not in json.dumps(over_http)
            browser.cookies.set(SESSION_COOKIE, "0" * 64)
            forged = await browser.get("api/snapshot")
            assert forged.status_code == 401 and 'error="invalid_token"' in forged.headers["www-authenticate"]
        health = await agent.health_checks()
        assert health["web"].ok and token not in health["web"].detail
        assert (await snapshot(client)).web_url == url
    server_side = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("dspyrt", "uvicorn")))
    assert TOKEN_ENV in server_side  # the log names the variable...
    assert token not in server_side  # ...never the token (the test's own httpx logs its URLs, ?token= too)


async def test_beyond_loopback_the_page_is_served_only_with_a_token(
    config: IntegrationConfig, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = (
        ({"dashboard_host": "0.0.0.0"}, "listen on 0.0.0.0 without a token"),
        ({"dashboard_token_env": "DASHBOARD_TOKEN_NOT_SET"}, "DASHBOARD_TOKEN_NOT_SET, which is not set"),
        ({"dashboard_token_env": "DASHBOARD_SHORT_TOKEN"}, "fewer than 16 characters"),
    )
    monkeypatch.setenv("DASHBOARD_SHORT_TOKEN", "short")
    for settings, why in cases:
        async with dashboard(config, web=True, **settings) as agent:
            health = await agent.health_checks()
            assert not health["web"].ok and why in health["web"].detail, health["web"].detail
            assert agent.web_url is None and (await snapshot(client)).web_url is None  # the bus side answers
    token = secrets.token_hex(16)
    monkeypatch.setenv(TOKEN_ENV, f"{token}\n")  # a Secret mounted from a file ends in a newline
    async with dashboard(config, web=True, dashboard_host="0.0.0.0", dashboard_token_env=TOKEN_ENV) as agent:
        assert agent.web_url is not None
        url = f"http://127.0.0.1:{httpx.URL(agent.web_url).port}/"
        assert (await get(url, "healthz")).status_code == 401
        assert (await get(url, "healthz", headers={"Authorization": f"Bearer {token}"})).status_code == 200
        wildcard = await get(url, "healthz", headers={"Authorization": f"Bearer {token}"}, host="0.0.0.0")
        assert wildcard.status_code == 400  # a wildcard is where it listens, not a name it answers to


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install -y chromium)")
async def test_the_page_works_with_a_token_in_a_real_browser(
    config: IntegrationConfig, bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opened once with ?token=, the page moves on to itself without it and draws its charts from the API with the
    cookie; without the token the browser gets 401."""
    playwright_api = pytest.importorskip("playwright.async_api", reason="the playwright package is not installed")
    expect = playwright_api.expect
    token = secrets.token_hex(32)
    monkeypatch.setenv(TOKEN_ENV, token)
    async with dashboard(config, web=True, dashboard_token_env=TOKEN_ENV) as agent:
        await record_history(bus)
        url = agent.web_url
        assert url is not None
        statuses: list[tuple[str, int]] = []
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                page.on("response", lambda response: statuses.append((response.url, response.status)))
                refused = await page.goto(url)
                assert refused is not None and refused.status == 401
                await page.goto(f"{url}?token={token}")
                await page.wait_for_url(url)  # the token has left the address bar
                scores = 'figure.chart[data-metric="program_score"] circle.point'
                await page.goto(url + "#programs/topic-classifier")
                await expect(page.locator(scores)).to_have_count(len(SCORES), timeout=10_000)
                cookies = await page.context.cookies()
                assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
                    (SESSION_COOKIE, True, "Strict")
                ]
                assert token not in cookies[0]["value"]
            finally:
                await browser.close()
        api = [status for u, status in statuses if "/api/snapshot" in u]
        assert api and set(api) == {200}, statuses
