"""What a firing regression alert does: roll a regressing canary back (through loop-deploy), or with
auto_optimize start one re-optimization cycle from the program's latest cycle request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from nats.js import api

from dspyrt.agents.dashboard.models import RuleList, SetRules
from dspyrt.agents.deployments import DeployedVersion, DeployRegistry
from dspyrt.agents.loop.cycle import last_cycle_key
from dspyrt.agents.loop.deploy import DeployAgent
from dspyrt.bus import Bus, TaskEnvelope, TaskStatus
from dspyrt.bus.streams import key_value
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.dashboard.common import dashboard, emit, snapshot, stream_events, wait_for_events
from tests.helpers import hosting, wait_until

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
CYCLE = json.loads((ROOT / "examples" / "cycle.json").read_text())["input"]
PROGRAM = CYCLE["program_name"]
REGRESSION = {
    "name": "score-regression",
    "kind": "regression",
    "metric": "program_score",
    "labels": {"program": PROGRAM},
    "baseline_points": 3,
    "min_drop": 10,
    "severity": "critical",
}


def version(n: int, score: float) -> DeployedVersion:
    return DeployedVersion(
        program=PROGRAM, version=n, artifact_store="artifacts", artifact_name=f"{PROGRAM}/v{n}.json", score=score
    )


async def scores(bus: Bus, ver: int, values: list[float]) -> None:
    for value in values:
        await emit(bus, "program.score", {"program": PROGRAM, "version": ver, "score": value}, source="scorer")


async def set_rule(client: Client, **changes: Any) -> None:
    reply = await client.request("dashboard", "set_rules", SetRules(rules=[{**REGRESSION, **changes}]), RuleList)
    assert [r["name"] for r in reply.rules] == ["score-regression"]


async def test_a_regressing_canary_is_rolled_back(config: IntegrationConfig, bus: Bus, client: Client) -> None:
    registry = await DeployRegistry.open(bus)
    await registry.deploy(version(1, 80.0))
    await registry.deploy(version(2, 85.0), canary_fraction=0.2)
    async with hosting(DeployAgent(config)), dashboard(config):
        await set_rule(client)
        await scores(bus, 2, [84.0, 86.0, 85.0, 60.0])  # the canary serves worse than its own baseline

        [firing] = await wait_for_events(bus, "alert.firing", 1)
        assert firing.data["labels"] == {"program": PROGRAM, "version": "2"}
        [action] = await wait_for_events(bus, "alert.action", 1)
        assert action.data["action"] == "rollback" and action.data["ok"] is True
        assert action.data["detail"] == f"canary v2 of {PROGRAM} rolled back; active v1"
        pointer = await registry.pointer(PROGRAM)
        assert pointer is not None and pointer.canary is None
        assert pointer.active is not None and pointer.active.version == 1
        [rollback] = await wait_for_events(bus, "deploy.rollback", 1)
        assert rollback.source == "loop-deploy" and rollback.data["note"] == "canary v2 rolled back"
        # No cycle: a canary is rolled back, not re-optimized.
        assert [r.kind for r in await client.tasks()] == []

        async def shown() -> bool:
            snap = await snapshot(client, program=PROGRAM)
            program = snap.programs[0]
            actions = [e.action for e in snap.alert_log if e.event == "action"]
            return (program.canary_version, actions) == (None, ["rollback"])

        await wait_until(shown, what="the dashboard shows the rollback")


async def test_auto_optimize_starts_one_cycle_for_a_regressing_program(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    registry = await DeployRegistry.open(bus)
    await registry.deploy(version(1, 80.0))
    cycles = await key_value(bus, bus.subjects.bucket("cycles"))
    await cycles.put(last_cycle_key(PROGRAM), json.dumps(CYCLE).encode())
    # The cycle agent has run here (its queue, the kind's durable consumer, exists); none runs now: the cycle
    # the dashboard starts waits in the queue.
    s = bus.subjects
    queue = api.ConsumerConfig(
        durable_name=s.task_consumer("cycle"), filter_subject=s.task("cycle"), ack_policy=api.AckPolicy.EXPLICIT
    )
    await bus.js.add_consumer(s.task_stream, queue)
    assert config.auto_optimize
    async with dashboard(config) as agent:
        await set_rule(client)
        await scores(bus, 1, [80.0, 81.0, 79.0, 50.0])

        [action] = await wait_for_events(bus, "alert.action", 1)
        [firing] = await stream_events(bus, "alert.firing")
        task_id = f"alert-{firing.data['id']}-1"
        assert action.data["action"] == "cycle" and action.data["ok"] is True
        assert action.data["task_id"] == task_id
        record = await client.task(task_id)
        assert (record.kind, record.status, record.submitted_by) == ("cycle", TaskStatus.PENDING, "dashboard")
        queued = await bus.js.get_last_msg(bus.subjects.task_stream, bus.subjects.task("cycle"))
        assert queued.data is not None
        envelope = TaskEnvelope.model_validate_json(queued.data)
        assert envelope.id == task_id and envelope.input == CYCLE  # the stored request, as it was

        # Still regressed: the same alert, no second cycle.
        await scores(bus, 1, [49.0])
        mark = agent.evaluations
        await wait_until(lambda: agent.evaluations > mark + 3, what="more evaluations")
        assert len(await stream_events(bus, "alert.action")) == 1
        assert [r.id for r in await client.tasks() if r.kind == "cycle"] == [task_id]


async def test_without_auto_optimize_a_regression_only_alerts(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    registry = await DeployRegistry.open(bus)
    await registry.deploy(version(1, 80.0))
    cycles = await key_value(bus, bus.subjects.bucket("cycles"))
    await cycles.put(last_cycle_key(PROGRAM), json.dumps(CYCLE).encode())
    async with dashboard(config.model_copy(update={"auto_optimize": False})):
        await set_rule(client)
        await scores(bus, 1, [80.0, 81.0, 79.0, 50.0])
        [action] = await wait_for_events(bus, "alert.action", 1)
        assert action.data["action"] == "none" and action.data["detail"] == "auto_optimize is off: no cycle started"
        assert await client.tasks() == []
