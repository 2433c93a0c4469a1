"""The dashboard core without a bus: series from scripted events, record_cycle_metrics, alert state transitions."""

from __future__ import annotations

import random
from typing import Any

import pytest

import dspyrt.agents.dashboard as dashboard_pkg
from dspyrt.agents.dashboard import (
    CustomMetricType,
    ErrorRateRule,
    MetricsDashboard,
    MetricSeries,
    MetricType,
    RegressionRule,
    SnapshotQuery,
    StalenessRule,
    ThresholdRule,
    alert_id,
)
from dspyrt.bus import Event

pytestmark = pytest.mark.timeout(10)

T0 = 1_800_000_000.0


def event(topic: str, data: dict[str, Any], at: float, source: str = "test") -> Event:
    return Event(topic=topic, source=source, time=at, data=data)


def cycle_event(cycle_id: str, score: float, baseline: float = 50.0, **changes: Any) -> dict[str, Any]:
    return {
        "cycle_id": cycle_id,
        "program": "topic-classifier",
        "model": "demo/fewshot",
        "optimizer": "labeled_fewshot",
        "baseline_score": baseline,
        "optimized_score": score,
        "improvement": score - baseline,
        "cost": 0.25,
        "latency_p95_ms": 12.5,
        "deployed": False,
        "version": None,
        "reasons": [],
        **changes,
    }


def values(series: MetricSeries) -> list[float]:
    return [p.value for p in series.points]


def only(dashboard: MetricsDashboard, metric: str, **labels: str) -> MetricSeries:
    found = dashboard.series(metric, labels)
    assert len(found) == 1, found
    return found[0]


def test_the_public_surface_is_sorted_and_importable() -> None:
    assert dashboard_pkg.__all__ == sorted(dashboard_pkg.__all__)
    assert all(hasattr(dashboard_pkg, name) for name in dashboard_pkg.__all__)


def test_every_completed_cycle_lands_in_its_series() -> None:
    d = MetricsDashboard()
    d.record_event(event("cycle.completed", cycle_event("c1", 80.0), T0))
    d.record_event(event("cycle.completed", cycle_event("c2", 90.0, deployed=True, version=1), T0 + 10))
    labels = {"program": "topic-classifier", "model": "demo/fewshot", "optimizer": "labeled_fewshot"}
    assert values(only(d, MetricType.SCORE, **labels)) == [80.0, 90.0]
    assert values(only(d, MetricType.BASELINE_SCORE, **labels)) == [50.0, 50.0]
    assert values(only(d, MetricType.IMPROVEMENT, **labels)) == [30.0, 40.0]
    assert values(only(d, MetricType.CYCLE_COST, **labels)) == [0.25, 0.25]
    assert [p.time for p in only(d, MetricType.SCORE).points] == [T0, T0 + 10]
    assert values(only(d, MetricType.PROGRAM_LATENCY_P95, program="topic-classifier")) == [12.5, 12.5]
    # Only the deployed cycle scores a version.
    assert values(only(d, MetricType.PROGRAM_SCORE, program="topic-classifier", version="1")) == [90.0]
    summary = d.program_summary("topic-classifier")
    assert summary.cycles == 2 and summary.last_score == 90.0 and summary.last_improvement == 40.0


def test_record_cycle_metrics_takes_a_cycle_result_too() -> None:
    evaluation = {"examples": 20, "shards": 1, "model": "m1"}
    result = {
        "cycle_id": "c9",
        "program_name": "qa",
        "create": {"program_hash": "h", "module": "predict", "predictors": ["p"], "input_fields": ["q"],
                   "output_fields": ["a"]},
        "baseline": {**evaluation, "score": 40.0, "cost": 0.1},
        "optimization": {"program_name": "qa", "program_hash": "h", "model": "m1", "optimizer": "mipro",
                         "metric": "exact_match", "improvement_score": 20.0, "cost": 0.3},
        "optimized": {**evaluation, "score": 60.0, "cost": 0.1, "latency_p95_ms": 30.0},
        "improvement_score": 20.0,
        "validation": {"passed": False, "score": 0.75},
        "verdict": {"deployed": True, "program_name": "qa", "version": 3},
    }  # fmt: skip
    d = MetricsDashboard()
    touched = d.record_cycle_metrics(result, at=T0)  # a CycleResult's JSON (a task record's result)
    assert {s.metric_type for s in touched} == {
        "score", "baseline_score", "improvement", "cycle_cost", "program_latency_p95", "program_score",
        "validation_pass_rate",
    }  # fmt: skip
    assert values(only(d, MetricType.CYCLE_COST, program="qa")) == [0.5]
    assert values(only(d, MetricType.SCORE, program="qa", model="m1", optimizer="mipro")) == [60.0]
    assert values(only(d, MetricType.VALIDATION_PASS_RATE, program="qa")) == [0.75]
    assert values(only(d, MetricType.PROGRAM_SCORE, program="qa", version="3")) == [60.0]


def test_lm_calls_feed_latency_tokens_cost_and_outcomes() -> None:
    d = MetricsDashboard()
    ok = {"model": "m1", "ok": True, "latency_ms": 10.0, "input_tokens": 5, "output_tokens": 7, "cost": 0.01}
    for i in range(3):
        d.record_event(event("lm.call", {**ok, "latency_ms": 10.0 * (i + 1)}, T0 + i, source="switcher"))
    d.record_event(event("lm.call", {"model": "m1", "ok": False, "error": "timeout"}, T0 + 3, source="switcher"))
    assert values(only(d, MetricType.LM_LATENCY, model="m1")) == [10.0, 20.0, 30.0]
    assert values(only(d, MetricType.LM_TOKENS, model="m1")) == [12.0, 12.0, 12.0]
    assert values(only(d, MetricType.ERROR_RATE, model="m1")) == [0.0, 0.0, 0.0, 1.0]
    summary = d.model_summary("m1", now=T0 + 4)
    assert (summary.calls, summary.failures, summary.error_rate) == (4, 1, 0.25)
    assert summary.tokens == 36.0 and summary.cost == pytest.approx(0.03)
    assert summary.latency_p50_ms == 20.0 and summary.latency_p95_ms == 30.0
    # The agent label: every event counts for its publisher (a running count).
    assert only(d, MetricType.EVENTS, agent="switcher").latest() == (T0 + 3, 4.0)


def test_deploys_predictions_scores_queues_and_the_program_log() -> None:
    d = MetricsDashboard()
    d.record_event(event("deploy.completed", {"program": "p", "version": 1, "canary": False, "score": 70.0}, T0))
    d.record_event(event("deploy.completed", {"program": "p", "version": 2, "canary": True, "score": 75.0}, T0 + 1))
    for i in range(3):
        d.record_event(
            event("predict.served", {"program": "p", "version": 2, "canary": True, "model": "m"}, T0 + 5 * i)
        )
    d.record_event(event("program.score", {"program": "p", "version": 2, "score": 40.0}, T0 + 20))
    d.record_event(event("queue.depth", {"kind": "cycle", "depth": 3}, T0 + 21))
    d.record_event(event("deploy.rollback", {"program": "p", "version": 1, "note": "canary v2 rolled back"}, T0 + 22))
    assert values(only(d, MetricType.PROGRAM_SCORE, program="p", version="2")) == [75.0, 40.0]
    assert values(only(d, MetricType.PREDICTIONS, program="p", version="2")) == [1.0, 2.0, 3.0]
    assert values(only(d, MetricType.QUEUE_DEPTH, kind="cycle")) == [3.0]
    summary = d.program_summary("p")
    assert (summary.active_version, summary.canary_version) == (1, None)
    assert [e.topic for e in summary.log] == ["deploy.completed", "deploy.completed", "deploy.rollback"]


def test_malformed_and_unknown_events_are_counted_not_fatal() -> None:
    d = MetricsDashboard()
    assert d.record_event(event("lm.call", {"ok": True}, T0)) is False  # no model
    assert d.record_event(event("program.score", {"program": "p", "score": "high"}, T0)) is False
    assert d.record_event(event("task.progress.abc", {"phase": "x"}, T0)) is False
    assert d.record_event(event("metric.unregistered", {"value": 1.0}, T0)) is True
    stats = d.get_stats()
    assert (stats["malformed"], stats["ignored"], stats["unknown_metric"]) == (2, 1, 1)
    assert d.series(MetricType.PROGRAM_SCORE) == []


def test_events_are_read_through_their_models_extra_fields_tolerated_wrong_types_not() -> None:
    d = MetricsDashboard()
    newer = {"model": "m1", "ok": True, "latency_ms": 10.0, "region": "eu-1", "trace": {"id": "x"}}
    assert d.record_event(event("lm.call", newer, T0)) is True  # a newer publisher's extra fields
    assert d.record_event(event("lm.call", {"model": 7, "ok": True, "latency_ms": 99.0}, T0 + 1)) is False
    assert d.record_event(event("lm.call", {"model": "m1", "ok": "yes", "latency_ms": 99.0}, T0 + 2)) is False
    assert d.record_event(event("deploy.completed", {"program": "p", "version": "2"}, T0 + 3)) is False
    assert d.record_event(event("cycle.completed", {**cycle_event("c1", 80.0), "cost": "cheap"}, T0 + 4)) is False
    assert d.record_event(event("alert.firing", {"id": "a", "rule": "r", "kind": "threshold", "metric": "score",
                                                 "state": "resolved"}, T0 + 5)) is False  # fmt: skip
    assert d.get_stats()["malformed"] == 5
    assert values(only(d, MetricType.LM_LATENCY, model="m1")) == [10.0]
    assert d.series(MetricType.SCORE) == [] and d.programs == {}


def test_an_event_with_invalid_rules_is_counted_as_malformed() -> None:
    d = MetricsDashboard()
    assert d.record_event(event("dashboard.rules", {"rules": "x"}, T0)) is False  # AlertRuleError, a DspyrtError
    assert d.get_stats()["malformed"] == 1 and d.rules == []


def test_custom_metric_types_are_registered_and_fed_by_events() -> None:
    d = MetricsDashboard()
    with pytest.raises(ValueError, match="built-in"):
        d.register_custom_metric(CustomMetricType(name="score"))
    d.record_event(event("dashboard.metric_registered", {"name": "judge_score", "unit": "pts"}, T0))
    d.record_event(event("metric.judge_score", {"value": 4.5, "labels": {"program": "p"}}, T0 + 1))
    d.record_event(event("metric.judge_score", {"value": 3.0, "labels": {"program": "p"}}, T0 + 2))
    assert values(only(d, "judge_score", program="p")) == [4.5, 3.0]
    assert d.metric_types["judge_score"].custom and d.metric_types["judge_score"].unit == "pts"
    # The guide's extension pattern works too.
    d.register_custom_metric(CustomMetricType(name="custom_metric"))
    series = d.add_series(MetricSeries("custom_metric", {"team": "a"}))
    series.add(1.0, T0)
    assert d.series("custom_metric", {"team": "a"}) == [series]


def test_series_keep_order_a_bounded_length_and_totals() -> None:
    series = MetricSeries(MetricType.LM_COST, {"model": "m"}, max_points=3)
    for i in range(5):
        series.add(float(i), T0 + i)
    series.add(9.0, T0 + 2.5)  # late point: put in place, the oldest drops
    assert [(p.time - T0, p.value) for p in series.points] == [(2.5, 9.0), (3, 3.0), (4, 4.0)]
    assert (series.count, series.total) == (6, 19.0)


@pytest.mark.parametrize(
    "values", [[0.0, 1.0], [0.0, 1.0, 0.1, 1e17], [3.0, 7.0, 1e6]], ids=["outcomes", "any", "counts"]
)
def test_window_totals_are_the_sums_of_the_windows(values: list[float]) -> None:
    """Same float as summing ``window()`` (running sums for whole numbers, a plain sum otherwise), through late
    points, coalesced ones and points dropped to stay under ``max_points``."""
    rng = random.Random(7)
    series = MetricSeries(MetricType.ERROR_RATE, max_points=50)
    at = T0
    for step in range(400):
        at += rng.choice([0.0, 0.5, 1.0, 3.0])
        late = rng.random() < 0.1
        series.add(rng.choice(values), at - 20 if late else at, coalesce=1.0 if step % 7 == 0 else 0.0)
        for seconds in (0.0, 5.0, 30.0, 1e9):
            recent = series.window(seconds, at)
            got = series.window_total(seconds, at)
            assert (got.total, got.size) == (sum(p.value for p in recent), len(recent))
            assert got.rate == (sum(p.value for p in recent) / len(recent) if recent else None)
    assert series.window_total(10.0, at + 1000).rate is None


def test_a_threshold_alert_fires_once_is_deduplicated_and_resolves() -> None:
    rule = ThresholdRule(kind="threshold", name="slow", metric="lm_latency", above=100.0)
    d = MetricsDashboard(rules=[rule])
    d.record(MetricType.LM_LATENCY, 50.0, {"model": "a"}, T0)
    d.record(MetricType.LM_LATENCY, 50.0, {"model": "b"}, T0)
    assert d.evaluate_alerts(T0) == []

    d.record(MetricType.LM_LATENCY, 250.0, {"model": "a"}, T0 + 1)
    fired = d.evaluate_alerts(T0 + 1)
    assert [(t.alert.state, t.alert.labels, t.previous) for t in fired] == [("firing", {"model": "a"}, None)]
    alert = fired[0].alert
    assert alert.id == alert_id("slow", {"model": "a"}) and alert.episode == 1 and alert.value == 250.0
    assert "above 100" in alert.message

    d.record(MetricType.LM_LATENCY, 300.0, {"model": "a"}, T0 + 2)  # still breaching: no second alert
    assert d.evaluate_alerts(T0 + 2) == []
    assert d.alerts.active()[0].value == 300.0

    d.record(MetricType.LM_LATENCY, 20.0, {"model": "a"}, T0 + 3)
    resolved = d.evaluate_alerts(T0 + 3)
    assert [(t.alert.state, t.previous.state if t.previous else None) for t in resolved] == [("resolved", "firing")]
    assert resolved[0].alert.resolved_at == T0 + 3 and d.alerts.active() == []

    d.record(MetricType.LM_LATENCY, 500.0, {"model": "a"}, T0 + 4)
    again = d.evaluate_alerts(T0 + 4)
    assert [(t.alert.state, t.alert.episode, t.alert.id) for t in again] == [("firing", 2, alert.id)]


def test_a_regression_compares_the_latest_point_with_the_rolling_baseline() -> None:
    rule = RegressionRule(kind="regression", name="drop", metric="program_score", baseline_points=3, min_drop=5.0)
    d = MetricsDashboard(rules=[rule])
    labels = {"program": "p", "version": "2"}
    for i, score in enumerate([80.0, 82.0, 81.0]):
        d.record(MetricType.PROGRAM_SCORE, score, labels, T0 + i)
    assert d.evaluate_alerts(T0 + 3) == []  # not enough points before the latest one
    d.record(MetricType.PROGRAM_SCORE, 78.0, labels, T0 + 4)  # 3 below the mean 81: within min_drop
    assert d.evaluate_alerts(T0 + 4) == []
    d.record(MetricType.PROGRAM_SCORE, 60.0, labels, T0 + 5)  # mean of 82, 81, 78 is 80.33
    [fired] = d.evaluate_alerts(T0 + 5)
    assert fired.alert.state == "firing" and fired.alert.labels == labels
    assert "= 60, 20.3333 below the mean 80.3333 of the previous 3 points" in fired.alert.message
    d.record(MetricType.PROGRAM_SCORE, 85.0, labels, T0 + 6)
    assert [t.alert.state for t in d.evaluate_alerts(T0 + 6)] == ["resolved"]


def test_staleness_and_error_rate_depend_on_the_clock() -> None:
    stale = StalenessRule(kind="staleness", name="quiet", metric="score", max_age=60)
    errors = ErrorRateRule(kind="error_rate", name="errors", window=30, max_rate=0.4, min_calls=4)
    d = MetricsDashboard(rules=[stale, errors])
    d.record(MetricType.SCORE, 70.0, {"program": "p"}, T0)
    for i, failed in enumerate([0, 1, 1, 0, 1]):
        d.record(MetricType.ERROR_RATE, float(failed), {"model": "m"}, T0 + i)
    fired = d.evaluate_alerts(T0 + 5)  # 3/5 failed > 40%
    assert [(t.alert.rule, t.alert.state) for t in fired] == [("errors", "firing")]
    assert fired[0].alert.value == pytest.approx(0.6)
    fired = d.evaluate_alerts(T0 + 61)  # the score went quiet; the failures left the window
    assert sorted((t.alert.rule, t.alert.state) for t in fired) == [("errors", "resolved"), ("quiet", "firing")]
    d.record(MetricType.SCORE, 71.0, {"program": "p"}, T0 + 62)
    assert [(t.alert.rule, t.alert.state) for t in d.evaluate_alerts(T0 + 62)] == [("quiet", "resolved")]


def test_alerts_of_a_removed_rule_resolve_and_restored_alerts_are_not_repeated() -> None:
    rule = ThresholdRule(kind="threshold", name="low", metric="score", below=50)
    d = MetricsDashboard(rules=[rule])
    d.record(MetricType.SCORE, 10.0, {"program": "p"}, T0)
    [fired] = d.evaluate_alerts(T0)

    # A new dashboard (a restart) given the stored alert does not fire it a second time.
    restarted = MetricsDashboard(rules=[rule])
    restarted.alerts.restore([fired.alert])
    restarted.record(MetricType.SCORE, 10.0, {"program": "p"}, T0)
    assert restarted.evaluate_alerts(T0 + 1) == []

    restarted.set_rules([], replace=True)
    restarted.configure_rules([])
    [gone] = restarted.evaluate_alerts(T0 + 2)
    assert gone.alert.state == "resolved" and "rule removed" in gone.alert.message


def test_the_snapshot_filters_by_program_and_model_and_shows_rates() -> None:
    d = MetricsDashboard(rules=[ThresholdRule(kind="threshold", name="low", metric="score", below=50)])
    d.record_event(event("cycle.completed", cycle_event("c1", 40.0), T0))
    d.record_event(event("cycle.completed", {**cycle_event("c2", 90.0), "program": "other"}, T0))
    for i in range(4):
        d.record_event(event("lm.call", {"model": "m2", "ok": i % 2 == 0, "latency_ms": 5.0}, T0 + i))
    d.evaluate_alerts(T0 + 5)
    snap = d.snapshot(SnapshotQuery(program="topic-classifier"), now=T0 + 5)
    assert {s.labels["program"] for s in snap.series} == {"topic-classifier"}
    assert [p.program for p in snap.programs] == ["topic-classifier"] and snap.models == []
    assert [a.labels["program"] for a in snap.alerts] == ["topic-classifier"]
    rates = d.snapshot(SnapshotQuery(model="m2", metric="error_rate"), now=T0 + 5)
    [view] = rates.series
    assert view.aggregate == "rate" and view.last == 0.5
    assert [v for _, v in view.points] == [0.0, 0.5, pytest.approx(1 / 3), 0.5]
    small = d.snapshot(SnapshotQuery(metric="error_rate", max_points=2), now=T0 + 5)
    assert [t - T0 for t, _ in small.series[0].points] == [0, 3]


def test_a_custom_metric_counts_events_from_its_registration_on() -> None:
    d = MetricsDashboard()
    d.record_event(event("metric.latency_budget", {"value": 1.0, "labels": {}}, T0))  # not registered yet
    registration = {"name": "latency_budget", "registered_at": T0 + 5}
    d.record_event(event("dashboard.metric_registered", registration, T0 + 5))
    d.record_event(event("metric.latency_budget", {"value": 2.0, "labels": {}}, T0 + 3))  # older than it
    d.record_event(event("metric.latency_budget", {"value": 3.0, "labels": {}}, T0 + 6))
    # Registering again (new unit) keeps the original time, so a replay decides the same way.
    d.record_event(
        event("dashboard.metric_registered", {**registration, "unit": "ms", "registered_at": T0 + 9}, T0 + 9)
    )
    d.record_event(event("metric.latency_budget", {"value": 4.0, "labels": {}}, T0 + 7))
    assert values(only(d, "latency_budget")) == [3.0, 4.0]
    assert d.metric_types["latency_budget"].since == T0 + 5 and d.metric_types["latency_budget"].unit == "ms"
    assert d.get_stats()["unknown_metric"] == 2
