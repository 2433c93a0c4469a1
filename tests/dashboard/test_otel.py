"""The dashboard's OpenTelemetry metrics, and the Grafana dashboard's queries against the names Prometheus gets."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricReader

from dspyrt.agents.dashboard import Alert, MetricsDashboard
from dspyrt.agents.dashboard.otel import DashboardInstruments
from dspyrt.bus import Event

pytestmark = pytest.mark.timeout(20)

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana" / "dspyrt-dashboard.json"
T0 = 1_800_000_000.0


def points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    """Every data point by instrument name: (attributes, value or histogram count)."""
    out: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    value = getattr(p, "value", None)
                    out.setdefault(metric.name, []).append((dict(p.attributes or {}), getattr(p, "count", value)))
    return out


def feed(dashboard: MetricsDashboard, topic: str, data: dict[str, Any], at: float, source: str = "x") -> None:
    assert dashboard.record_event(Event(topic=topic, source=source, time=at, data=data))


def scenario(reader: MetricReader) -> tuple[MeterProvider, DashboardInstruments]:
    """A dashboard with history (replayed) and live events, exported through ``reader``."""
    provider = MeterProvider(metric_readers=[reader])
    d = MetricsDashboard()
    instruments = DashboardInstruments(provider.get_meter("dspyrt.dashboard"), d.metric_types)
    d.listeners.append(instruments)
    cycle = {"cycle_id": "c", "program": "qa", "model": "m", "optimizer": "o", "baseline_score": 40.0,
             "optimized_score": 70.0, "improvement": 30.0, "cost": 0.2, "latency_p95_ms": 9.0, "deployed": True,
             "version": 1, "validation": {"passed": True, "score": 0.8}}  # fmt: skip
    feed(d, "cycle.completed", cycle, T0, "cycle")
    feed(d, "predict.served", {"program": "qa", "version": 1, "model": "m"}, T0)  # replayed: not counted
    feed(d, "queue.depth", {"kind": "cycle", "depth": 4}, T0)
    instruments.live = True
    for i in range(2):
        feed(d, "predict.served", {"program": "qa", "version": 1, "model": "m"}, T0 + 10 + i, "serving")
    optimized = {"task_id": "t1", "status": "completed", "program_name": "qa", "optimizer": "o", "model": "m",
                 "duration_s": 3.5}  # fmt: skip
    feed(d, "optimization.completed", optimized, T0)
    for i, ok in enumerate([True, False, True, False]):
        feed(d, "lm.call", {"model": "m", "ok": ok, "latency_ms": 5.0}, T0 + i, "switcher")
    feed(d, "dashboard.metric_registered", {"name": "judge_score", "unit": "{point}"}, T0)
    feed(d, "metric.judge_score", {"value": 4.5, "labels": {"program": "qa"}}, T0 + 1)
    firing = Alert(id="a1", rule="slow", kind="threshold", metric="lm_latency", state="firing", severity="critical")
    instruments.alerts([firing, firing.model_copy(update={"id": "a2", "state": "resolved"})])
    return provider, instruments


def test_points_become_gauges_and_live_events_counters() -> None:
    reader = InMemoryMetricReader()
    provider, _ = scenario(reader)
    try:
        got = points(reader)
    finally:
        provider.shutdown()
    series = {"program": "qa", "model": "m", "optimizer": "o"}
    assert got["dspyrt.cycle.score"] == [(series, 70.0)]
    assert got["dspyrt.cycle.baseline_score"] == [(series, 40.0)]
    assert got["dspyrt.cycle.improvement"] == [(series, 30.0)]
    assert got["dspyrt.cycle.cost"] == [(series, 0.2)]
    assert got["dspyrt.program.score"] == [({"program": "qa", "version": "1"}, 70.0)]
    assert got["dspyrt.program.latency_p95"] == [({"program": "qa", "model": "m"}, 9.0)]
    assert got["dspyrt.validation.pass_rate"] == [({"program": "qa"}, 0.8)]
    assert got["dspyrt.queue.depth"] == [({"kind": "cycle"}, 4.0)]
    assert got["dspyrt.lm.error_rate"] == [({"model": "m"}, 0.5)]
    assert got["dspyrt.predictions"] == [({"program": "qa", "version": "1", "model": "m"}, 2)]  # live ones only
    assert got["dspyrt.optimization.duration"] == [({"program": "qa", "optimizer": "o", "model": "m"}, 1)]
    assert got["dspyrt.custom.judge_score"] == [({"program": "qa"}, 4.5)]
    assert got["dspyrt.alerts.firing"] == [({"rule": "slow", "severity": "critical"}, 1)]
    events = dict((a["agent"], v) for a, v in got["dspyrt.dashboard.events"])
    assert events == {"serving": 2, "x": 3, "switcher": 4}  # live events only: not the 3 replayed ones


def test_gauges_wait_for_the_replay_and_custom_gauges_are_made_once(monkeypatch: pytest.MonkeyPatch) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter("dspyrt.dashboard")
    made: list[str] = []
    create_gauge = meter.create_gauge

    def counting(name: str, unit: str = "", description: str = "") -> Any:
        made.append(name)
        return create_gauge(name, unit=unit, description=description)

    monkeypatch.setattr(meter, "create_gauge", counting)
    d = MetricsDashboard()
    instruments = DashboardInstruments(meter, d.metric_types)
    d.listeners.append(instruments)
    made.clear()
    try:
        feed(d, "dashboard.metric_registered", {"name": "judge_score"}, T0)
        for i in range(10):  # replayed history: 3 failures in 10 calls
            feed(d, "lm.call", {"model": "m", "ok": i % 4 != 0, "latency_ms": 5.0}, T0 + i)
            feed(d, "metric.judge_score", {"value": float(i), "labels": {}}, T0 + i)
        replayed = points(reader)
        assert "dspyrt.lm.error_rate" not in replayed and "dspyrt.custom.judge_score" not in replayed
        instruments.live = True  # caught up: each gauge set from its series' last point
        got = points(reader)
        assert got["dspyrt.lm.error_rate"] == [({"model": "m"}, 0.3)]
        assert got["dspyrt.custom.judge_score"] == [({}, 9.0)]
        for i in range(10, 13):
            feed(d, "lm.call", {"model": "m", "ok": True}, T0 + i)
            feed(d, "metric.judge_score", {"value": float(i), "labels": {}}, T0 + i)
        got = points(reader)
        assert got["dspyrt.lm.error_rate"] == [({"model": "m"}, 3 / 13)]
        assert got["dspyrt.custom.judge_score"] == [({}, 12.0)]
        assert made == ["dspyrt.custom.judge_score"]
    finally:
        provider.shutdown()


def _literal_instruments() -> Iterator[tuple[str, str, str]]:
    """``meter.create_<kind>("dspyrt...", unit=...)`` calls with literal names elsewhere in agents/ (the
    switcher's LM metrics): (kind, name, unit)."""
    for path in (ROOT / "agents").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            kind = node.func.attr.removeprefix("create_")
            if node.func.attr.startswith("create_") and node.args and isinstance(node.args[0], ast.Constant):
                name = node.args[0].value
                units = [k.value.value for k in node.keywords if k.arg == "unit" and isinstance(k.value, ast.Constant)]
                if isinstance(name, str) and name.startswith("dspyrt."):
                    yield kind, name, str(units[0]) if units else ""


def test_the_grafana_dashboard_queries_the_names_prometheus_gets() -> None:
    prometheus = pytest.importorskip("opentelemetry.exporter.prometheus", reason="needs the Prometheus exporter")
    from prometheus_client import REGISTRY, generate_latest

    reader = prometheus.PrometheusMetricReader()
    provider, _ = scenario(reader)
    try:
        meter = provider.get_meter("literal-instruments")
        found = list(_literal_instruments())
        assert {name for _, name, _ in found} >= {"dspyrt.lm.latency", "dspyrt.lm.tokens", "dspyrt.lm.cost"}
        for kind, name, unit in found:
            attributes = {"model": "m", "direction": "input", "error.type": "timeout"}
            if kind == "histogram":
                meter.create_histogram(name, unit=unit).record(1.0, attributes)
            elif kind == "counter":
                meter.create_counter(name, unit=unit).add(1, attributes)
        exposition = generate_latest(REGISTRY).decode()
    finally:
        provider.shutdown()
    samples = {line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if line.startswith("dspyrt_")}
    families = {re.sub(r"_(bucket|sum|count)$", "", s) for s in samples}

    board = json.loads(GRAFANA.read_text())
    text = json.dumps(board)
    used = set(re.findall(r"\bdspyrt_[A-Za-z0-9_]+", text))
    assert used <= samples, f"queried but never exported: {sorted(used - samples)}"
    # Every exported family appears on the board (custom metrics are the user's own).
    unused = {f for f in families if not f.startswith("dspyrt_custom_")} - {
        re.sub(r"_(bucket|sum|count)$", "", u) for u in used
    }
    assert unused == set(), f"exported but not on the board: {sorted(unused)}"
    assert "dspyrt_lm_latency_milliseconds_bucket" in used
    # Structure Grafana needs: a Prometheus datasource variable, unique panel ids, every target on it.
    assert board["templating"]["list"][0] == {**board["templating"]["list"][0], "type": "datasource",
                                              "query": "prometheus"}  # fmt: skip
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"} and target["expr"]
