"""The dashboard beside the whole optimization loop: a real cycle lands in its series, serving shows up as
predictions, and a regression of the deployed version re-optimizes the program through a real second cycle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dspyrt.agents.dashboard.agent import DashboardAgent
from dspyrt.agents.dashboard.models import RuleList, SetRules
from dspyrt.agents.loop.models import PredictReply, PredictRequest
from dspyrt.bus import TaskStatus
from dspyrt.bus.events import event_type_of
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.events import TaskProgress
from dspyrt.runtime.registry import available_agents
from tests.dashboard.common import emit, snapshot, stream_events, wait_for_events
from tests.helpers import serving, wait_until

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
CYCLE = json.loads((ROOT / "examples" / "cycle.json").read_text())["input"]
PROGRAM = CYCLE["program_name"]
LOOP = ["switcher", "optimizer", "loop-create", "loop-evaluate", "evaluator", "loop-deploy", "cycle", "serving"]


def cycle_request() -> dict[str, Any]:
    return {**CYCLE, "objectives": {**CYCLE["objectives"], "required_validators": []}}


async def test_a_real_cycle_lands_in_the_dashboard_and_a_regression_reoptimizes(config: IntegrationConfig) -> None:
    known = available_agents()
    classes = [known[name] for name in LOOP] + [DashboardAgent]
    settings = {"auto_validate": False, "dashboard_port": None, "dashboard_eval_interval": 0.1}
    async with serving(config.model_copy(update=settings), classes) as system:
        client = system.client
        record = await client.run("cycle", cycle_request(), timeout=45)
        assert record.status is TaskStatus.SUCCEEDED, record.error
        result = record.result
        assert result["verdict"]["deployed"] is True and result["verdict"]["version"] == 1
        optimized = result["optimized"]["score"]
        for text in ("the striker scored a late goal", "heavy rain and snow tomorrow"):
            reply = await client.request(
                "serving", "predict", PredictRequest(program=PROGRAM, inputs={"text": text}), PredictReply, timeout=30
            )
            assert reply.version == 1

        async def recorded() -> bool:
            snap = await snapshot(client, program=PROGRAM)
            by_metric = {s.metric: s for s in snap.series}
            predictions = by_metric.get("predictions")
            return (
                bool(snap.programs)
                and snap.programs[0].cycles == 1
                and snap.programs[0].active_version == 1
                and "score" in by_metric
                and [v for _, v in by_metric["score"].points] == [optimized]
                and [v for _, v in by_metric["program_score"].points] == [optimized]
                and by_metric["program_score"].labels == {"program": PROGRAM, "version": "1"}
                and predictions is not None
                and predictions.last == 2
            )

        await wait_until(recorded, what="the cycle and the predictions in the dashboard")
        model = (await snapshot(client, model="demo/fewshot")).models[0]
        assert model.calls > 0 and model.failures == 0

        rule = {"name": "live-regression", "kind": "regression", "metric": "program_score",
                "labels": {"program": PROGRAM}, "baseline_points": 3, "min_drop": 10}  # fmt: skip
        await client.request("dashboard", "set_rules", SetRules(rules=[rule]), RuleList)
        for score in (optimized, optimized - 1, optimized - 30):
            await emit(system.bus, "program.score", {"program": PROGRAM, "version": 1, "score": score}, "scorer")

        [action] = await wait_for_events(system.bus, "alert.action", 1)
        assert action.data["action"] == "cycle" and action.data["ok"] is True, action.data
        second = await client.result(action.data["task_id"], timeout=45)
        assert second.status is TaskStatus.SUCCEEDED, second.error
        # The same request on the same data makes the same program: v1 stays, and the verdict says so.
        assert (second.result["verdict"]["version"], second.result["verdict"]["unchanged"]) == (1, True)

        async def two_cycles() -> bool:
            snap = await snapshot(client, program=PROGRAM)
            return snap.programs[0].cycles == 2 and snap.programs[0].active_version == 1

        await wait_until(two_cycles, what="the second cycle in the dashboard")
        # Every event the agents published is of a type its publisher declares, and reads back as that type.
        published = [e for e in await stream_events(system.bus, ">") if e.source != "scorer"]
        assert {"cycle.completed", "deploy.completed", "lm.call", "alert.action"} <= {e.topic for e in published}
        declared = {cls.name: cls.publishes for cls in classes}
        for event in published:
            if event.topic.startswith("task.progress."):
                TaskProgress.model_validate(event.data)
                continue
            kind = event_type_of(event.topic, declared[event.source])
            assert kind is not None, f"{event.source} published {event.topic}, not among its declared events"
            kind.model_validate(event.data)
