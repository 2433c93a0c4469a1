"""What the loop reports agrees with itself, over a real nats-server with the loop's agents in process: one
improvement (optimized minus baseline, in points, on the scores it sits beside) in the result, the event and the
dashboard; a cached optimization says it made no LM call; a cycle that makes the deployed program again leaves
one version; a predict whose input fields do not fit the program is refused before any LM call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dspyrt.agents.dashboard.agent import DashboardAgent
from dspyrt.agents.dashboard.core import MetricsDashboard
from dspyrt.agents.dashboard.models import MetricType
from dspyrt.agents.deployments import DeployedVersion
from dspyrt.agents.loop.models import (
    DeployRequest,
    DeployVerdict,
    PredictReply,
    PredictRequest,
    ProgramDetail,
    ProgramList,
    ProgramName,
)
from dspyrt.agents.optimizers.core import ProgramInputs, program_inputs
from dspyrt.agents.optimizers.models import ArtifactRef, improvement_points, state_sha256
from dspyrt.agents.programs import build_program, parse_program_spec
from dspyrt.agents.switcher.models import SwitcherStats
from dspyrt.bus import Empty, Event, MessageValidationError, RemoteError, TaskStatus
from dspyrt.bus.audit import read_audit
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.registry import available_agents
from tests.dashboard.common import snapshot, wait_for_events
from tests.helpers import serving, wait_until

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
CYCLE = json.loads((ROOT / "examples" / "cycle.json").read_text())["input"]
PROGRAM = CYCLE["program_name"]
LOOP = ["switcher", "optimizer", "loop-create", "loop-evaluate", "evaluator", "loop-deploy", "cycle", "serving"]


def cycle_request(**changes: Any) -> dict[str, Any]:
    return {**CYCLE, "objectives": {**CYCLE["objectives"], "required_validators": []}, **changes}


def loop_agents(*extra: str) -> list[Any]:
    known = available_agents()
    return [known[name] for name in (*LOOP, *extra)]


@pytest.fixture
def loop_config(config: IntegrationConfig, monkeypatch: pytest.MonkeyPatch) -> IntegrationConfig:
    monkeypatch.setenv("DSPYRT_DASHBOARD_PORT", "off")
    return config.model_copy(update={"auto_validate": False, "dashboard_port": None})


async def test_two_identical_cycles_agree_on_their_numbers_and_leave_one_version(
    loop_config: IntegrationConfig,
) -> None:
    async with serving(loop_config, [*loop_agents(), DashboardAgent]) as system:
        client = system.client
        first = await client.run("cycle", cycle_request(), timeout=60)
        assert first.status is TaskStatus.SUCCEEDED, first.error
        one = first.result
        shown = await client.request("loop-deploy", "show", ProgramName(program=PROGRAM), ProgramDetail)
        second = await client.run("cycle", cycle_request(), timeout=60)
        assert second.status is TaskStatus.SUCCEEDED, second.error
        two = second.result

        # One improvement: the cycle's is its own two devset scores' difference, in points.
        assert one["scored_on"] == "devset" and one["optimization"]["scored_on"] == "valset"
        assert one["improvement_score"] == pytest.approx(one["optimized"]["score"] - one["baseline"]["score"])
        opt = one["optimization"]
        assert opt["improvement_score"] == pytest.approx(opt["optimized_score"] - opt["baseline_score"])
        # The example's valset (12 held-out trainset rows) is not its devset (20 rows): the two figures differ,
        # so a result that reported the optimizer's figure as the cycle's would fail here.
        assert opt["valset_size"] == 12 and one["baseline"]["examples"] == 20
        assert one["improvement_score"] != opt["improvement_score"]
        events = await wait_for_events(system.bus, "cycle.completed", 2)
        assert [e.data["improvement"] for e in events] == [one["improvement_score"], two["improvement_score"]]
        assert {e.data["scored_on"] for e in events} == {"devset"}

        # The second optimization is the first one's, from the cache: no LM call, token or cost of its own.
        cached = two["optimization"]
        assert (opt["cached"], cached["cached"]) == (False, True)
        assert opt["lm_calls"] > 0 and opt["input_tokens"] > 0
        assert (cached["lm_calls"], cached["cached_calls"], cached["provider_requests"]) == (0, 0, 0)
        assert (cached["input_tokens"], cached["output_tokens"], cached["cost"]) == (0, 0, 0.0)
        assert (cached["original_lm_calls"], cached["original_cost"]) == (opt["lm_calls"], opt["cost"])
        assert cached["original_duration_s"] == opt["duration_s"]
        assert cached["artifact"] == opt["artifact"] and opt["artifact"]["state_sha256"]
        assert opt["original_lm_calls"] is None

        # The second deploy is the first version again: said so, nothing written.
        assert one["verdict"]["version"] == 1 and one["verdict"]["unchanged"] is False
        verdict = two["verdict"]
        assert {k: verdict[k] for k in ("deployed", "unchanged", "version", "canary")} == {
            "deployed": True, "unchanged": True, "version": 1, "canary": False
        }  # fmt: skip
        assert "already deployed as v1" in verdict["note"] and verdict["reasons"] == []
        detail = await client.request("loop-deploy", "show", ProgramName(program=PROGRAM), ProgramDetail)
        assert [v.version for v in detail.versions] == [1]
        assert detail.pointer == shown.pointer  # not even its time changed
        assert detail.versions[0].state_sha256 == opt["artifact"]["state_sha256"]
        listing = await client.request("loop-deploy", "list", Empty(), ProgramList)
        assert [(p.program, p.active.version if p.active else None) for p in listing.programs] == [(PROGRAM, 1)]
        deploys = [r for r in await read_audit(system.bus) if r.action == "deploy"]
        assert [r.detail["version"] for r in deploys] == [1]
        [unchanged] = await wait_for_events(system.bus, "deploy.unchanged", 1)
        assert unchanged.data["version"] == 1 and unchanged.data["cycle_id"] == second.id

        # The dashboard shows the same figures: improvement = score - baseline, the cycle's.
        async def both_cycles() -> bool:
            snap = await snapshot(client, program=PROGRAM)
            return bool(snap.programs) and snap.programs[0].cycles == 2

        await wait_until(both_cycles, what="both cycles in the dashboard")
        snap = await snapshot(client, program=PROGRAM)
        by_metric = {s.metric: [v for _, v in s.points] for s in snap.series}
        assert by_metric["improvement"] == [one["improvement_score"], two["improvement_score"]]
        assert by_metric["improvement"] == [
            pytest.approx(s - b) for s, b in zip(by_metric["score"], by_metric["baseline_score"], strict=True)
        ]
        summary = snap.programs[0]
        assert summary.last_improvement == two["improvement_score"] and summary.active_version == 1
        assert "unchanged: already deployed as v1" in summary.log[-1].text


async def test_a_changed_program_is_a_new_version_and_a_fresh_run_of_the_same_one_is_not(
    loop_config: IntegrationConfig,
) -> None:
    async with serving(loop_config, loop_agents()) as system:
        client = system.client
        runs = [
            await client.run("cycle", cycle_request(**changes), timeout=60)
            for changes in ({}, {"no_cache": True}, {"params": {"k": 40}})
        ]
    assert [r.status for r in runs] == [TaskStatus.SUCCEEDED] * 3, [r.error for r in runs]
    first, fresh, changed = (r.result for r in runs)
    # Run again without the cache, LabeledFewShot makes the same state: the same program, not a new version.
    assert fresh["optimization"]["cached"] is False and fresh["optimization"]["lm_calls"] > 0
    assert fresh["optimization"]["artifact"]["name"] != first["optimization"]["artifact"]["name"]
    assert fresh["optimization"]["artifact"]["state_sha256"] == first["optimization"]["artifact"]["state_sha256"]
    assert (fresh["verdict"]["unchanged"], fresh["verdict"]["version"]) == (True, 1)
    # More demos: another state, a new version.
    assert (changed["verdict"]["unchanged"], changed["verdict"]["version"]) == (False, 2)


async def test_the_deploy_gate_sees_an_unchanged_program_only_with_the_same_state_spec_and_model(
    loop_config: IntegrationConfig,
) -> None:
    spec = parse_program_spec(CYCLE["program"])
    state = {"demos": [{"text": "rain", "topic": "weather"}], "signature": {}}
    artifact = ArtifactRef(store="s", name="p/a.json", version="a", sha256="0" * 64, size=1,
                           state_sha256=state_sha256(state))  # fmt: skip

    def request(**changes: Any) -> DeployRequest:
        data: dict[str, Any] = {"program_name": "gate", "program": spec, "artifact": artifact, "model": "m1",
                                "baseline_score": 10.0, "optimized_score": 50.0}  # fmt: skip
        return DeployRequest(**{**data, **changes})

    other_spec = parse_program_spec({**CYCLE["program"], "instructions": "Say the topic."})
    other_state = artifact.model_copy(update={"state_sha256": state_sha256({**state, "demos": []})})
    variants: dict[str, dict[str, Any]] = {
        "same": {},
        "model": {"model": "m2"},
        "spec": {"program": other_spec},
        "state": {"artifact": other_state},
        "unknown-state": {"artifact": artifact.model_copy(update={"state_sha256": None})},
        "as-canary": {"canary_fraction": 0.5},
    }
    outcomes: dict[str, tuple[int | None, bool]] = {}
    async with serving(loop_config, [available_agents()["loop-deploy"]]) as system:
        for name, changes in variants.items():
            program = f"gate-{name}"
            first = await system.client.request("loop-deploy", "deploy", request(program_name=program), DeployVerdict)
            assert (first.deployed, first.version, first.unchanged) == (True, 1, False)
            again = await system.client.request(
                "loop-deploy", "deploy", request(program_name=program, **changes), DeployVerdict
            )
            assert again.deployed, again.reasons
            outcomes[name] = (again.version, again.unchanged)
    assert outcomes == {
        "same": (1, True), "model": (2, False), "spec": (2, False), "state": (2, False),
        "unknown-state": (2, False), "as-canary": (1, True),
    }  # fmt: skip


def test_state_sha256_is_the_states_and_not_its_key_order_or_tuples() -> None:
    assert state_sha256({"a": [1, 2], "b": {"c": "d"}}) == state_sha256({"b": {"c": "d"}, "a": (1, 2)})
    assert state_sha256({"a": [1, 2]}) != state_sha256({"a": [2, 1]})
    assert improvement_points(0.0, 58.3333) == 58.3333 and improvement_points(None, 60.0) is None
    version = DeployedVersion(program="p", version=1, artifact_store="s", artifact_name="a", state_sha256="x",
                              program_hash="h", model="m")  # fmt: skip
    assert version.same_program("x", "h", "m") and not version.same_program(None, "h", "m")
    assert not DeployedVersion(program="p", version=1, artifact_store="s", artifact_name="a").same_program(
        None, "h", None
    )


# ----------------------------------------------------------------------------------------- predict


def test_program_inputs_are_the_signatures_or_what_forward_names() -> None:
    predict = build_program(parse_program_spec({"signature": "text -> topic"}))
    assert program_inputs(predict) == ProgramInputs(("text",))
    cot = build_program(parse_program_spec({"signature": "question, context -> answer", "module": "ChainOfThought"}))
    assert program_inputs(cot).names == ["question", "context"]
    refiner = program_inputs(build_program(parse_program_spec({"registered": "role_refiner"})))
    assert refiner.required == ("role", "focus", "context", "responsibilities")
    assert set(refiner.optional) == {"target_context", "keep", "flagged"}
    refiner.check({"role": 1, "focus": 1, "context": 1, "responsibilities": 1, "keep": 1}, "p")
    with pytest.raises(MessageValidationError) as refused:
        ProgramInputs(("text",)).check({"txt": "x", "lang": "en"}, "program p v1")
    error = refused.value
    assert "missing 'text'" in error.message and "unknown 'txt', 'lang'" in error.message
    assert "it takes text" in error.message
    assert [(f.loc, f.type) for f in error.field_errors] == [
        ("inputs.text", "missing"), ("inputs.txt", "unknown_field"), ("inputs.lang", "unknown_field")
    ]  # fmt: skip


async def test_predict_refuses_inputs_that_do_not_fit_the_program_before_any_lm_call(
    loop_config: IntegrationConfig,
) -> None:
    async with serving(loop_config, loop_agents()) as system:
        client = system.client
        record = await client.run("cycle", cycle_request(), timeout=60)
        assert record.status is TaskStatus.SUCCEEDED, record.error

        async def calls() -> int:
            return (await client.request("switcher", "stats", Empty(), SwitcherStats)).instance_calls

        async def predict(inputs: dict[str, Any]) -> PredictReply:
            request = PredictRequest(program=PROGRAM, inputs=inputs)
            return await client.request("serving", "predict", request, PredictReply, timeout=30)

        before = await calls()
        refused = []
        for inputs in ({"txt": "the striker scored a late goal"}, {}, {"text": "rain", "topic": "weather"}):
            with pytest.raises(RemoteError) as caught:
                await predict(inputs)
            refused.append(caught.value)
        assert await calls() == before  # the switcher answered no complete call
        wrong, empty, extra = refused
        assert {e.code for e in refused} == {"invalid_message"}
        assert all("it takes text" in e.message for e in refused)
        assert "missing 'text'" in wrong.message and "unknown 'txt'" in wrong.message
        assert {(f.loc, f.type) for f in wrong.field_errors} == {("inputs.text", "missing"),
                                                                 ("inputs.txt", "unknown_field")}  # fmt: skip
        assert [f.loc for f in empty.field_errors] == ["inputs.text"]
        assert [(f.loc, f.type) for f in extra.field_errors] == [("inputs.topic", "unknown_field")]

        served = await predict({"text": "the striker scored a late goal in the cup match"})
        assert served.outputs["topic"] == "sports" and await calls() > before


def test_the_dashboard_improvement_is_the_difference_of_the_scores_it_records() -> None:
    """An older coordinator's cycle.completed carried the optimizer's valset figure (58.33 beside 0 → 60), and a
    replayed stream still holds such events: the series shows the difference of the scores beside it."""
    d = MetricsDashboard()
    old = {"cycle_id": "c1", "program": "p", "model": "m", "optimizer": "o", "baseline_score": 0.0,
           "optimized_score": 60.0, "improvement": 58.3333, "deployed": True, "version": 1}  # fmt: skip
    d.record_event(Event(topic="cycle.completed", source="cycle", time=1.0, data=old))
    unmeasured = {**old, "cycle_id": "c2", "optimized_score": None, "improvement": 12.0, "deployed": False}
    d.record_event(Event(topic="cycle.completed", source="cycle", time=2.0, data=unmeasured))
    [series] = d.series(MetricType.IMPROVEMENT, {"program": "p"})
    assert [p.value for p in series.points] == [60.0]
    assert d.program_summary("p").last_improvement == 60.0
