"""The dashboard agent over a real nats-server: series from published events, alerts as events (de-duplicated,
also across replicas), alert states surviving a restart, custom metrics, rules over the bus, queue depth,
validation results read from the cycle task's record, and bad events or stored values that must not stop it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from dspyrt.agents.dashboard.agent import DashboardAgent
from dspyrt.agents.dashboard.models import CustomMetricType, MetricTypeList, RuleList, SetRules
from dspyrt.bus import Bus, Event, RemoteError, TaskRecord, TaskStatus
from dspyrt.bus.streams import key_value
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.dashboard.common import dashboard, emit, snapshot, stream_events, wait_for_events
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(30)

SLOW_LM = """
[[rules]]
name = "slow-lm"
kind = "threshold"
metric = "lm_latency"
above = 100
severity = "critical"
"""


def lm_call(latency: float, model: str = "demo/a") -> dict[str, object]:
    return {"model": model, "ok": True, "latency_ms": latency, "input_tokens": 3, "output_tokens": 4, "cost": 0.001}


async def latency_points(client: Client, model: str = "demo/a") -> list[float]:
    snap = await snapshot(client, model=model, metric="lm_latency")
    return [v for s in snap.series for _, v in s.points]


async def test_published_events_become_series_and_alerts_fire_once_and_resolve(
    config: IntegrationConfig, bus: Bus, client: Client, tmp_path: Path
) -> None:
    rules = tmp_path / "alerts.toml"
    rules.write_text(SLOW_LM)
    async with dashboard(config, alerts_file=rules) as agent:
        for latency in (20.0, 30.0, 40.0):
            await emit(bus, "lm.call", lm_call(latency), source="switcher")

        async def three_points() -> bool:
            return await latency_points(client) == [20.0, 30.0, 40.0]

        await wait_until(three_points, what="three latency points")

        await emit(bus, "lm.call", lm_call(250.0), source="switcher")
        [firing] = await wait_for_events(bus, "alert.firing", 1)
        assert firing.source == "dashboard"
        assert firing.data["rule"] == "slow-lm" and firing.data["labels"] == {"model": "demo/a"}
        assert firing.data["state"] == "firing" and firing.data["value"] == 250.0 and firing.data["episode"] == 1

        await emit(bus, "lm.call", lm_call(300.0), source="switcher")  # still breaching: the same alert

        async def updated() -> bool:
            alerts = (await snapshot(client)).alerts
            return [(a.state, a.value) for a in alerts] == [("firing", 300.0)]

        await wait_until(updated, what="the firing alert follows the new value")
        await emit(bus, "lm.call", lm_call(10.0), source="switcher")
        [resolved] = await wait_for_events(bus, "alert.resolved", 1)
        assert resolved.data["id"] == firing.data["id"] and resolved.data["resolved_at"] is not None
        assert len(await stream_events(bus, "alert.firing")) == 1

        snap = await snapshot(client)
        assert [a.state for a in snap.alerts] == ["resolved"]
        assert [(e.event, e.rule) for e in snap.alert_log] == [("firing", "slow-lm"), ("resolved", "slow-lm")]
        [model] = snap.models
        assert (model.model, model.calls, model.failures, model.latency_p95_ms) == ("demo/a", 6, 0, 300.0)
        assert agent.evaluations > 0


async def test_alert_states_and_history_survive_a_restart(
    config: IntegrationConfig, bus: Bus, client: Client, tmp_path: Path
) -> None:
    rules = tmp_path / "alerts.toml"
    rules.write_text(SLOW_LM)
    async with dashboard(config, alerts_file=rules):
        for latency in (20.0, 500.0):
            await emit(bus, "lm.call", lm_call(latency))
        [firing] = await wait_for_events(bus, "alert.firing", 1)
        before = (await snapshot(client)).alerts

    async with dashboard(config, alerts_file=rules) as again:
        # History rebuilt from the stream, the alert's state from KV: firing since the first fire, not again.
        assert await latency_points(client) == [20.0, 500.0]
        snap = await snapshot(client)
        assert [(a.id, a.state, a.episode, a.fired_at) for a in snap.alerts] == [
            (firing.data["id"], "firing", 1, before[0].fired_at)
        ]
        assert [e.event for e in snap.alert_log] == ["firing"]
        await wait_until(lambda: again.evaluations >= 2, what="evaluations after the restart")
        assert await again.evaluate() == []

    # The latency recovers while no dashboard runs: the next one resolves the stored alert (once).
    await emit(bus, "lm.call", lm_call(5.0))
    async with dashboard(config, alerts_file=rules):
        [resolved] = await wait_for_events(bus, "alert.resolved", 1)
        assert resolved.data["id"] == firing.data["id"] and resolved.data["episode"] == 1
        assert [(a.state, a.fired_at) for a in (await snapshot(client)).alerts] == [("resolved", before[0].fired_at)]
    assert len(await stream_events(bus, "alert.firing")) == 1
    assert len(await stream_events(bus, "alert.resolved")) == 1


async def test_two_replicas_publish_each_transition_once(
    config: IntegrationConfig, bus: Bus, client: Client, tmp_path: Path
) -> None:
    rules = tmp_path / "alerts.toml"
    rules.write_text(SLOW_LM)
    async with dashboard(config, alerts_file=rules) as one, dashboard(config, alerts_file=rules) as two:
        await emit(bus, "lm.call", lm_call(900.0))
        await wait_for_events(bus, "alert.firing", 1)
        marks = (one.evaluations, two.evaluations)
        await wait_until(lambda: one.evaluations > marks[0] + 2 and two.evaluations > marks[1] + 2, what="evals")
        await emit(bus, "lm.call", lm_call(1.0))
        await wait_for_events(bus, "alert.resolved", 1)
        marks = (one.evaluations, two.evaluations)
        await wait_until(lambda: one.evaluations > marks[0] + 2 and two.evaluations > marks[1] + 2, what="evals")
        assert len(await stream_events(bus, "alert.firing")) == 1
        assert len(await stream_events(bus, "alert.resolved")) == 1
        for agent in (one, two):
            assert [a.state for a in agent.dashboard.alerts.alerts.values()] == ["resolved"]


async def test_custom_metric_types_are_registered_at_run_time(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    async with dashboard(config):
        await emit(bus, "metric.judge_score", {"value": 1.0, "labels": {"program": "p"}})  # not registered yet
        reply = await client.request(
            "dashboard", "register_metric", CustomMetricType(name="judge_score", unit="pts"), MetricTypeList
        )
        assert [t.name for t in reply.metric_types if t.custom] == ["judge_score"]
        with pytest.raises(RemoteError, match="built-in"):
            await client.request("dashboard", "register_metric", CustomMetricType(name="score"), MetricTypeList)
        for value in (4.0, 4.5):
            await emit(bus, "metric.judge_score", {"value": value, "labels": {"program": "p"}})

        async def recorded() -> bool:
            return [v for s in (await snapshot(client, metric="judge_score")).series for _, v in s.points] == [4.0, 4.5]

        await wait_until(recorded, what="custom metric points")
        # A rule on the custom metric is accepted now; one on an unknown metric is not.
        rule = {"name": "judge-low", "kind": "threshold", "metric": "judge_score", "below": 2}
        rules = await client.request("dashboard", "set_rules", SetRules(rules=[rule]), RuleList)
        assert [r["name"] for r in rules.rules] == ["judge-low"]
    async with dashboard(config):  # the type and the rule are kept
        metrics = await client.request("dashboard", "metrics", {}, MetricTypeList)
        assert "judge_score" in {t.name for t in metrics.metric_types}
        assert [r["name"] for r in (await client.request("dashboard", "rules", {}, RuleList)).rules] == ["judge-low"]
        assert [v for s in (await snapshot(client, metric="judge_score")).series for _, v in s.points] == [4.0, 4.5]


async def test_bad_rules_over_the_bus_get_a_clear_error(config: IntegrationConfig, client: Client) -> None:
    async with dashboard(config):
        bad: list[dict[str, Any]] = [
            {"name": "r1", "kind": "threshold", "metric": "lm_latency"},
            {"name": "r2", "kind": "regression", "metric": "scroe", "min_drop": 1},
        ]
        with pytest.raises(RemoteError) as info:
            await client.request("dashboard", "set_rules", SetRules(rules=bad), RuleList)
        error = info.value
        assert error.code == "invalid_config"
        assert error.message.startswith("invalid alert rules in set_rules request: ")
        assert "rules[0] ('r1'): a threshold rule needs 'above' or 'below' (or both)" in error.message
        assert [e.loc for e in error.field_errors] == ["rules.0"]
        # Once the shape is right, the metric names are checked: a typo would never fire.
        with pytest.raises(RemoteError, match=r"rules\[0\] \('r2'\): unknown metric 'scroe'; known: "):
            await client.request("dashboard", "set_rules", SetRules(rules=bad[1:]), RuleList)
        assert (await client.request("dashboard", "rules", {}, RuleList)).rules == []


async def test_queue_depth_is_read_from_the_task_stream(config: IntegrationConfig, client: Client) -> None:
    for n in range(3):
        await client.submit("ghost", {"n": n}, require_worker=False)  # queued for a worker yet to come
    async with dashboard(config):

        async def three() -> bool:
            snap = await snapshot(client)
            return [(q.kind, q.depth) for q in snap.queues] == [("ghost", 3)]

        await wait_until(three, what="queue depth of ghost tasks")
    assert [e.data for e in await stream_events(client.bus, "queue.depth")] == [{"kind": "ghost", "depth": 3}]


async def test_validation_pass_rates_come_from_the_cycle_task_record(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    done = TaskRecord(id="cyc-done", kind="cycle", status=TaskStatus.SUCCEEDED,
                      result={"validation": {"passed": True, "score": 0.9}})  # fmt: skip
    await client.store.create(done)
    await client.store.create(TaskRecord(id="cyc-late", kind="cycle", status=TaskStatus.RUNNING))
    cycle = {"program": "p", "model": "m", "optimizer": "o", "baseline_score": 10.0, "optimized_score": 20.0}
    async with dashboard(config):
        await emit(bus, "cycle.completed", {**cycle, "cycle_id": "cyc-done"}, source="cycle")
        await emit(bus, "cycle.completed", {**cycle, "cycle_id": "cyc-late"}, source="cycle")
        await wait_until(lambda: _program_cycles(client, 2), what="two cycles recorded")

        def finish(record: TaskRecord | None) -> TaskRecord | None:
            assert record is not None
            return record.model_copy(update={"status": TaskStatus.SUCCEEDED,
                                             "result": {"validation": {"passed": False, "score": 0.5}}})  # fmt: skip

        await client.store.transition("cyc-late", finish, kind="cycle")

        async def rates() -> bool:
            snap = await snapshot(client, metric="validation_pass_rate")
            return [v for s in snap.series for _, v in s.points] == [0.9, 0.5]

        await wait_until(rates, what="both validation pass rates")


async def _program_cycles(client: Client, count: int) -> bool:
    snap = await snapshot(client, program="p")
    return bool(snap.programs) and snap.programs[0].cycles == count


async def test_a_bad_rules_event_is_counted_and_survives_restarts(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    async with dashboard(config) as agent:
        await emit(bus, "dashboard.rules", {"rules": "x"})  # parse_rules raises AlertRuleError (a DspyrtError)
        await emit(bus, "lm.call", lm_call(20.0))

        async def counted() -> bool:
            return await latency_points(client) == [20.0]

        await wait_until(counted, what="the event after the bad one recorded")
        assert (await snapshot(client)).stats["malformed"] == 1
        assert agent.dashboard.rules == []
    # The stream is replayed from the start, the bad event last: the next instance still catches up.
    await emit(bus, "dashboard.rules", {"rules": "x"})
    async with dashboard(config):
        snap = await snapshot(client)
        assert snap.stats["malformed"] == 2 and not snap.replaying
        assert await latency_points(client) == [20.0]


async def test_an_event_whose_handling_fails_is_logged_and_skipped(
    config: IntegrationConfig,
    bus: Bus,
    client: Client,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with dashboard(config) as agent:
        record = agent.dashboard.record_event

        def failing(event: Event) -> bool:
            if event.topic == "test.boom":
                raise RuntimeError("a bug in the dashboard")
            return record(event)

        monkeypatch.setattr(agent.dashboard, "record_event", failing)
        with caplog.at_level(logging.WARNING, logger="dspyrt.dashboard"):
            await emit(bus, "test.boom", {})
            await emit(bus, "lm.call", lm_call(30.0))

            async def recorded() -> bool:
                return await latency_points(client) == [30.0]

            await wait_until(recorded, what="the event after the failing one recorded")
        assert (await snapshot(client)).stats["failed"] == 1
        assert any("test.boom" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_an_undecodable_last_event_does_not_hold_the_replay(config: IntegrationConfig, bus: Bus) -> None:
    await emit(bus, "lm.call", lm_call(20.0))
    await bus.nc.publish(bus.subjects.event("lm.call"), b"not json")
    await bus.flush()
    async with dashboard(config) as agent:
        assert agent.dashboard.get_stats()["malformed"] == 1


async def test_bad_stored_values_do_not_stop_start_up(config: IntegrationConfig, bus: Bus, client: Client) -> None:
    kv = await key_value(bus, bus.subjects.bucket("dashboard"), config.stream_layout)
    await kv.put("metric.broken", b"{not json")
    await kv.put("metric.score", CustomMetricType(name="score").model_dump_json().encode())  # a built-in name
    await kv.put("metric.judge_score", CustomMetricType(name="judge_score", unit="pts").model_dump_json().encode())
    await kv.put("alert.broken", b'{"id": 1}')
    async with dashboard(config) as agent:
        assert isinstance(agent, DashboardAgent) and agent.dashboard.alerts.alerts == {}
        snap = await snapshot(client)
        assert [t.name for t in snap.metric_types if t.custom] == ["judge_score"]
