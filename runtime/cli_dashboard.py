"""``dspyrt dashboard``: the metrics dashboard in the terminal, live.

It reads the dashboard agent's ``snapshot`` endpoint (``<prefix>.dashboard.snapshot``) over the bus: the same
data the agent's web page shows. The runtime knows nothing of the agent's types, so the reply is read as JSON.
``dspyrt.runtime.cli`` registers it: ``app.command("dashboard")(dashboard_command)``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.table import Column, Table
from rich.text import Text

from dspyrt.runtime.cli_common import ConfigOption, command_config, one_line_errors, with_client
from dspyrt.runtime.cli_output import console, print_table

if TYPE_CHECKING:  # the bus and the client are imported by the command (runtime.cli starts without them)
    from dspyrt.runtime.client import Client

DASHBOARD_AGENT = "dashboard"
SNAPSHOT_ENDPOINT = "snapshot"
_BLOCKS = "▁▂▃▄▅▆▇█"
_MAX_SERIES_ROWS = 40


async def fetch_snapshot(
    client: Client,
    *,
    program: str | None = None,
    model: str | None = None,
    max_points: int = 40,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """The dashboard agent's snapshot as JSON (``BusUnavailableError`` when no dashboard agent runs)."""
    query: dict[str, Any] = {"max_points": max_points}
    if program:
        query["program"] = program
    if model:
        query["model"] = model
    return await client.call(DASHBOARD_AGENT, SNAPSHOT_ENDPOINT, query, timeout=timeout)


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """The last ``width`` values as block characters, scaled between their minimum and maximum."""
    tail = [v for v in values if isinstance(v, int | float) and math.isfinite(v)][-width:]
    if not tail:
        return ""
    low, high = min(tail), max(tail)
    if high == low:
        return _BLOCKS[len(_BLOCKS) // 2] * len(tail)
    scale = (len(_BLOCKS) - 1) / (high - low)
    return "".join(_BLOCKS[round((v - low) * scale)] for v in tail)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _labels(labels: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (labels or {}).items()) or "-"


def _clock(at: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) if at else "-"


def _values(series: dict[str, Any]) -> list[float]:
    return [float(p[1]) for p in series.get("points") or []]


def render_snapshot(data: dict[str, Any]) -> Group:
    """One frame: alerts, programs, models, queues and series of a snapshot."""
    parts: list[RenderableType] = []
    head = Text.assemble(
        ("dspyrt dashboard", "bold"),
        f"  {data.get('events', 0)} events · updated {_clock(data.get('generated_at'))}",
        (" · replaying history" if data.get("replaying") else "", "yellow"),
        f" · web {data['web_url']}" if data.get("web_url") else "",
    )
    parts.append(head)

    alerts = data.get("alerts") or []
    table = Table("state", Column("rule", no_wrap=True), "severity", "labels", "message", "since", title="Alerts",
                  title_justify="left")  # fmt: skip
    for alert in alerts[:20]:
        firing = alert.get("state") == "firing"
        state = Text(str(alert.get("state")), style="bold red" if firing else "green")
        since = alert.get("fired_at") if firing else alert.get("resolved_at")
        table.add_row(state, alert.get("rule", ""), alert.get("severity", ""), _labels(alert.get("labels")),
                      alert.get("message", ""), _clock(since))  # fmt: skip
    parts.append(table if alerts else Text("no alerts", style="dim"))

    series = data.get("series") or []
    programs = data.get("programs") or []
    if programs:
        table = Table(Column("program", no_wrap=True), "cycles", "score", "improvement", "feedback", "active",
                      "canary", "phase", "score trend", title="Programs", title_justify="left")  # fmt: skip
        for p in programs:
            trend = [v for s in series if s.get("metric") == "score" and (s.get("labels") or {}).get("program")
                     == p.get("program") for v in _values(s)]  # fmt: skip
            table.add_row(
                p.get("program", ""),
                str(p.get("cycles", 0)),
                _fmt(p.get("last_score")),
                _fmt(p.get("last_improvement")),
                f"{p.get('feedback', 0)} ({_fmt(p.get('feedback_score'))}% agreed)" if p.get("feedback") else "-",
                f"v{p['active_version']}" if p.get("active_version") else "-",
                f"v{p['canary_version']}" if p.get("canary_version") else "-",
                p.get("phase") or "-",
                sparkline(trend),
            )
        parts.append(table)

    models = data.get("models") or []
    if models:
        table = Table(Column("model", no_wrap=True), "calls", "failures", "error rate", "p50 ms", "p95 ms", "tokens",
                      "cost", "latency", title="Models", title_justify="left")  # fmt: skip
        for m in models:
            latency = [v for s in series if s.get("metric") == "lm_latency" and (s.get("labels") or {}).get("model")
                       == m.get("model") for v in _values(s)]  # fmt: skip
            rate = m.get("error_rate")
            table.add_row(
                m.get("model", ""),
                str(m.get("calls", 0)),
                str(m.get("failures", 0)),
                "-" if rate is None else f"{rate:.1%}",
                _fmt(m.get("latency_p50_ms")),
                _fmt(m.get("latency_p95_ms")),
                _fmt(m.get("tokens"), 6),
                _fmt(m.get("cost")),
                sparkline(latency),
            )
        parts.append(table)

    queues = data.get("queues") or []
    if queues:
        parts.append(Text("queues  " + "  ".join(f"{q['kind']}={q['depth']}" for q in queues)))

    if series:
        table = Table(Column("metric", no_wrap=True), "labels", "last", "points", "trend", title="Series",
                      title_justify="left")  # fmt: skip
        for s in series[:_MAX_SERIES_ROWS]:
            unit = f" {s['unit']}" if s.get("unit") else ""
            table.add_row(s.get("metric", ""), _labels(s.get("labels")), _fmt(s.get("last")) + unit,
                          str(s.get("count", 0)), sparkline(_values(s)))  # fmt: skip
        if len(series) > _MAX_SERIES_ROWS:
            table.caption = f"{len(series) - _MAX_SERIES_ROWS} more series: use --program / --model, or the web view"
        parts.append(table)
    return Group(*parts)


def dashboard_command(
    config_file: ConfigOption = None,
    program: Annotated[str | None, typer.Option(help="only this program")] = None,
    model: Annotated[str | None, typer.Option(help="only this model")] = None,
    interval: Annotated[
        float | None, typer.Option(min=0.2, help="seconds between refreshes (default: dashboard_poll, as the page)")
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="print one frame and exit")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the snapshot as JSON and exit")] = False,
) -> None:
    """Live metrics, alerts, programs and models from the dashboard agent (Ctrl-C to stop)."""
    import anyio
    from rich.live import Live
    from rich.panel import Panel

    from dspyrt.bus import DspyrtError

    with one_line_errors():
        config = command_config(config_file)
    every = interval if interval is not None else config.dashboard_poll  # the web page's refresh, by default

    async def body(client: Client) -> None:
        data = await fetch_snapshot(client, program=program, model=model)
        if as_json:
            console.print_json(json.dumps(data))
            return
        if once:
            print_table(render_snapshot(data))
            return
        with Live(render_snapshot(data), console=console, refresh_per_second=4) as live:
            while True:
                await anyio.sleep(every)
                try:
                    data = await fetch_snapshot(client, program=program, model=model)
                    live.update(render_snapshot(data))
                except DspyrtError as exc:  # the agent restarting, say: keep the last frame, say why
                    live.update(Group(render_snapshot(data), Panel(str(exc), title="not updated", style="red")))

    with_client(config_file, body, config=config)
