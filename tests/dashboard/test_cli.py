"""``dspyrt dashboard`` reads the dashboard agent's snapshot over the bus and shows it in the terminal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from dspyrt.bus import Bus
from dspyrt.runtime.cli_dashboard import dashboard_command, render_snapshot, sparkline
from dspyrt.runtime.config import IntegrationConfig
from tests.dashboard.common import dashboard, emit, wait_for_events

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]

RULE = """
[[rules]]
name = "slow-lm"
kind = "threshold"
metric = "lm_latency"
above = 100
"""


def cli() -> typer.Typer:
    """The command as ``dspyrt.runtime.cli`` registers it."""
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("dashboard")(dashboard_command)
    return app


def test_sparklines_scale_between_the_extremes() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([5.0, 5.0]) == "▅▅"
    assert sparkline([]) == ""
    assert len(sparkline(list(range(100)), width=10)) == 10


def test_a_frame_shows_alerts_programs_models_and_series() -> None:
    frame = {
        "events": 7,
        "generated_at": 1_800_000_000.0,
        "web_url": "http://127.0.0.1:8765/",
        "alerts": [{"state": "firing", "rule": "slow-lm", "severity": "critical", "labels": {"model": "m"},
                    "message": "lm_latency{model=m} = 250, above 100", "fired_at": 1_800_000_000.0}],
        "programs": [{"program": "qa", "cycles": 2, "last_score": 91.5, "active_version": 3, "canary_version": 4}],
        "models": [{"model": "m", "calls": 10, "failures": 1, "error_rate": 0.1, "latency_p50_ms": 20.0}],
        "queues": [{"kind": "cycle", "depth": 2}],
        "series": [{"metric": "score", "labels": {"program": "qa"}, "unit": "%", "last": 91.5, "count": 2,
                    "points": [[1.0, 80.0], [2.0, 91.5]]}],
    }  # fmt: skip
    console = Console(width=160, record=True)
    console.print(render_snapshot(frame))
    text = console.export_text()
    for expected in ("7 events", "http://127.0.0.1:8765/", "firing", "slow-lm", "above 100", "qa", "v3", "v4",
                     "10.0%", "cycle=2", "91.5 %", "▁█"):  # fmt: skip
        assert expected in text, expected


async def test_the_command_reads_the_agents_snapshot_over_the_bus(
    config: IntegrationConfig, bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = tmp_path / "alerts.toml"
    rules.write_text(RULE)
    monkeypatch.setenv("DSPYRT_NATS_URLS", config.nats_urls[0])
    monkeypatch.setenv("DSPYRT_SUBJECT_PREFIX", config.subject_prefix)
    monkeypatch.setenv("DSPYRT_LOG_LEVEL", "WARNING")
    runner = CliRunner()
    async with dashboard(config, alerts_file=rules):
        for latency in (40.0, 400.0):
            await emit(bus, "lm.call", {"model": "demo/x", "ok": True, "latency_ms": latency}, source="switcher")
        await wait_for_events(bus, "alert.firing", 1)

        # The command runs its own event loop (anyio.run), so it runs in a worker thread here.
        as_json = await anyio.to_thread.run_sync(runner.invoke, cli(), ["dashboard", "--json", "--model", "demo/x"])
        assert as_json.exit_code == 0, as_json.output
        data = json.loads(as_json.output)
        assert [a["rule"] for a in data["alerts"]] == ["slow-lm"]
        [shown] = [s for s in data["series"] if s["metric"] == "lm_latency"]
        assert [v for _, v in shown["points"]] == [40.0, 400.0]

        frame = await anyio.to_thread.run_sync(runner.invoke, cli(), ["dashboard", "--once"])
        assert frame.exit_code == 0, frame.output
        assert "slow-lm" in frame.output and "demo/x" in frame.output and "firing" in frame.output

    # No dashboard agent: one clear line and exit code 2.
    gone = await anyio.to_thread.run_sync(runner.invoke, cli(), ["dashboard", "--once"])
    assert gone.exit_code == 2
    assert f"no agent is serving {config.subject_prefix}.dashboard.snapshot" in gone.output


def test_the_command_module_stays_out_of_agents_and_dspy() -> None:
    code = (
        "import sys, dspyrt.runtime.cli_dashboard; "
        "print([m for m in sys.modules if m.startswith(('dspyrt.agents', 'dspy.'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
