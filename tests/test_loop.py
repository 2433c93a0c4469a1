"""The optimization loop over a real nats-server: cycles, the deploy gate, serving, rollback, and faults
(a coordinator killed mid-cycle, an evaluator replica killed mid-evaluation)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dspy
import pytest

from dspyrt.agents.deployments import ProgramPointer
from dspyrt.agents.loop.models import (
    CycleState,
    PredictReply,
    PredictRequest,
    ProgramDetail,
    ProgramList,
    ProgramName,
    RollbackRequest,
)
from dspyrt.agents.optimizers.models import OptimizerStatsReply
from dspyrt.agents.programs import build_program, dump_program_state, parse_program_spec
from dspyrt.bus import Empty, TaskStatus
from dspyrt.bus.streams import key_value
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.registry import available_agents
from dspyrt.runtime.system import collect_status
from tests.helpers import cycle, serving, wait_until

ROOT = Path(__file__).resolve().parent.parent
CYCLE = json.loads((ROOT / "examples" / "cycle.json").read_text())["input"]
OPTIMIZE = json.loads((ROOT / "examples" / "optimize.json").read_text())["input"]

pytestmark = pytest.mark.timeout(120)

LOOP = ["switcher", "optimizer", "loop-create", "loop-evaluate", "evaluator", "loop-deploy", "cycle", "serving"]
SLOW_MODELS = """
[[models]]
model = "demo/fewshot"
max_concurrency = 64
faults = { latency = { kind = "fixed", seconds = 0.1 } }
"""


def agents(*names: str) -> list[Any]:
    known = available_agents()
    return [known[n] for n in names]


async def predict(client: Client, text: str, version: int | None = None) -> PredictReply:
    request = PredictRequest(program="topic-classifier", inputs={"text": text}, version=version)
    return await client.request("serving", "predict", request, PredictReply, timeout=30)


async def test_a_cycle_deploys_an_improved_program_that_predict_serves(loop_config: IntegrationConfig) -> None:
    async with serving(loop_config, agents(*LOOP)) as system:
        record = await system.client.run("cycle", cycle(), timeout=90)
        assert record.status is TaskStatus.SUCCEEDED, record.error
        result = record.result
        assert result["verdict"]["deployed"] is True and result["verdict"]["version"] == 1
        assert result["optimized"]["score"] > result["baseline"]["score"]
        assert result["baseline"]["shards"] == 4 and result["baseline"]["examples"] == 20
        assert result["phase_runs"] == {
            "create": 1,
            "evaluate_baseline": 1,
            "optimize": 1,
            "evaluate_optimized": 1,
            "deploy": 1,
        }
        listing = await system.client.request("loop-deploy", "list", Empty(), ProgramList)
        assert [p.program for p in listing.programs] == ["topic-classifier"]
        assert listing.programs[0].active is not None and listing.programs[0].active.version == 1
        served = await predict(system.client, "the striker scored a late goal in the cup match")
        assert served.version == 1 and served.outputs["topic"] == "sports"
        assert served.model == "demo/fewshot"


async def test_the_gate_rejects_a_program_below_its_objectives_with_every_reason(
    loop_config: IntegrationConfig,
) -> None:
    async with serving(loop_config, agents(*LOOP)) as system:
        record = await system.client.run(
            "cycle",
            cycle(objectives={"min_score": 99, "min_improvement": 95, "max_latency_p95_ms": 0.001}),
            timeout=90,
        )
        verdict = record.result["verdict"]
        assert verdict["deployed"] is False and verdict["version"] is None
        joined = " | ".join(verdict["reasons"])
        assert "below the required 99" in joined and "below the required 95" in joined and "latency p95" in joined
        assert verdict["checks"] == {
            "min_improvement": False, "min_score": False, "max_latency_p95_ms": False, "min_coverage": True
        }
        listing = await system.client.request("loop-deploy", "list", Empty(), ProgramList)
        assert listing.programs == []


async def test_rollback_restores_the_previous_version_for_predict(loop_config: IntegrationConfig) -> None:
    async with serving(loop_config, agents(*LOOP)) as system:
        first = await system.client.run("cycle", cycle(), timeout=90)
        second = await system.client.run("cycle", cycle(params={"k": 40}), timeout=90)
        assert (first.result["verdict"]["version"], second.result["verdict"]["version"]) == (1, 2)
        assert (await predict(system.client, "heavy rain and snow tomorrow")).version == 2
        pointer = await system.client.request(
            "loop-deploy", "rollback", RollbackRequest(program="topic-classifier"), ProgramPointer
        )
        assert pointer.active is not None and pointer.active.version == 1
        assert (await predict(system.client, "heavy rain and snow tomorrow")).version == 1
        detail = await system.client.request(
            "loop-deploy", "show", ProgramName(program="topic-classifier"), ProgramDetail
        )
        assert [v.version for v in detail.versions] == [1, 2] and "rolled back" in detail.pointer.note


async def test_a_canary_takes_its_share_and_rolls_back(loop_config: IntegrationConfig) -> None:
    async with serving(loop_config, agents(*LOOP)) as system:
        await system.client.run("cycle", cycle(), timeout=90)
        canary = await system.client.run("cycle", cycle(params={"k": 40}, canary_fraction=0.5), timeout=90)
        assert canary.result["verdict"] == {**canary.result["verdict"], "deployed": True, "canary": True, "version": 2}
        versions = [(await predict(system.client, f"sunny weekend {i}")).version for i in range(40)]
        assert set(versions) == {1, 2}  # both serve (40 draws at 50 %: all one side has odds 2e-12)
        await system.client.request(
            "loop-deploy", "rollback", RollbackRequest(program="topic-classifier"), ProgramPointer
        )
        assert {(await predict(system.client, f"sunny weekend {i}")).version for i in range(10)} == {1}


# ----------------------------------------------------------------------------------------- faults


@contextmanager
def agent_processes(config: IntegrationConfig, workdir: Path, *names: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``dspyrt agent NAME`` processes against the test's server, as an operator would run them."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "DSPYRT_NATS_URLS": ",".join(config.nats_urls),
        "DSPYRT_SUBJECT_PREFIX": config.subject_prefix,
        "DSPYRT_EVENT_STREAM_MAX_MB": str(config.event_stream_max_mb),
        "DSPYRT_STATE_DIR": str(workdir / "state"),
        "DSPYRT_TASK_ACK_WAIT": str(config.task_ack_wait),
        "DSPYRT_AUTO_VALIDATE": "false",
        "DSPYRT_LOG_LEVEL": "WARNING",
        **({"DSPYRT_MODELS_FILE": str(config.models_file)} if config.models_file else {}),
    }
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for i, name in enumerate(names):
            with open(workdir / f"{name}-{i}.log", "ab") as log:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "dspyrt.runtime.cli", "agent", name], cwd=ROOT, env=env,
                            stdout=log, stderr=log
                    )
                )
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(10)


async def instances(client: Client, config: IntegrationConfig, name: str) -> int:
    status = await collect_status(client.bus, config, window=0.5)
    return sum(len(a.instances) for a in status.agents if a.name == name)


@pytest.fixture
def slow_config(loop_config: IntegrationConfig, tmp_path: Path) -> IntegrationConfig:
    path = tmp_path / "models.toml"
    path.write_text(SLOW_MODELS)
    return loop_config.model_copy(update={"models_file": path, "task_ack_wait": 3.0})


async def test_a_coordinator_killed_mid_cycle_is_replaced_and_the_cycle_resumes(
    slow_config: IntegrationConfig, tmp_path: Path
) -> None:
    others = agents("switcher", "optimizer", "loop-create", "loop-evaluate", "evaluator", "loop-deploy")
    async with serving(slow_config, others) as system:
        cycles = await key_value(system.bus, system.bus.subjects.bucket("cycles"))

        async def state(cycle_id: str) -> CycleState:
            try:
                entry = await cycles.get(cycle_id)
            except Exception:
                return CycleState(cycle_id=cycle_id)
            return CycleState.model_validate_json(entry.value or b"{}")

        with agent_processes(slow_config, tmp_path / "first", "cycle") as (first,):
            await wait_until(lambda: instances(system.client, slow_config, "cycle"), timeout=30, what="coordinator")
            submission = await system.client.submit("cycle", cycle())
            await wait_until(
                lambda: _started(state(submission.task_id), "optimize"), timeout=60, what="optimize phase started"
            )
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        before = await state(submission.task_id)
        assert "create" in before.phases and "evaluate_baseline" in before.phases and "deploy" not in before.phases
        with agent_processes(slow_config, tmp_path / "second", "cycle"):
            record = await system.client.result(submission.task_id, timeout=90)
        assert record.status is TaskStatus.SUCCEEDED, record.error
        runs = record.result["phase_runs"]
        # Finished phases never ran again; the interrupted one was re-entered and attached to its task.
        assert runs["create"] == 1 and runs["evaluate_baseline"] == 1 and runs["optimize"] == 2
        assert record.attempts == 2
        stats = await system.client.request("optimizer", "stats", Empty(), OptimizerStatsReply)
        assert stats.stats["labeled_fewshot"]["runs"] == 1  # the optimization was paid for once
        assert record.result["verdict"]["deployed"] is True


async def _started(state: Any, phase: str) -> bool:
    return phase in (await state).runs


async def test_an_evaluator_killed_mid_evaluation_gives_the_same_score(
    slow_config: IntegrationConfig, tmp_path: Path
) -> None:
    spec = parse_program_spec(OPTIMIZE["program"])
    trained = dspy.LabeledFewShot(k=16).compile(
        build_program(spec), trainset=[dspy.Example(**r).with_inputs("text") for r in OPTIMIZE["trainset"]]
    )
    job = {
        "program": {"spec": OPTIMIZE["program"], "state": dump_program_state(trained)},
        "devset": OPTIMIZE["valset"],
        "shard_size": 5,
        # One example at a time: a shard takes 5 LM latencies, so the evaluator killed once 3 shards run is still
        # inside its shard when the signal lands (with 2 threads a loaded machine let it finish first).
        "num_threads": 1,
    }
    async with serving(slow_config, agents("switcher", "loop-evaluate", "evaluator")) as system:
        undisturbed = await system.client.run("evaluate", job, timeout=60)
    assert undisturbed.status is TaskStatus.SUCCEEDED, undisturbed.error

    async with serving(slow_config, agents("switcher", "loop-evaluate")) as system:
        with agent_processes(slow_config, tmp_path / "evaluators", "evaluator", "evaluator") as (doomed, _spare):
            await wait_until(lambda: _count(system.client, slow_config, "evaluator", 2), timeout=30, what="evaluators")
            submission = await system.client.submit("evaluate", job)
            store = system.client.store
            await wait_until(lambda: _running_shards(store, submission.task_id), timeout=30, what="shards running")
            doomed.send_signal(signal.SIGKILL)
            disturbed = await system.client.result(submission.task_id, timeout=90)
            shards = [await store.get(f"{submission.task_id}-s{i}") for i in range(4)]
    assert disturbed.status is TaskStatus.SUCCEEDED, disturbed.error
    assert disturbed.result["score"] == undisturbed.result["score"] > 0
    assert [r["score"] for r in disturbed.result["results"]] == [r["score"] for r in undisturbed.result["results"]]
    assert [r["index"] for r in disturbed.result["results"]] == list(range(20))
    # At least one shard had to be delivered again after its evaluator died.
    assert any(s is not None and s.attempts > 1 for s in shards)


async def _count(client: Client, config: IntegrationConfig, name: str, n: int) -> bool:
    return await instances(client, config, name) >= n


async def _running_shards(store: Any, evaluation_id: str) -> bool:
    records = [await store.get(f"{evaluation_id}-s{i}") for i in range(4)]
    running = [r for r in records if r is not None and r.status is TaskStatus.RUNNING]
    return len(running) >= 3


async def test_a_program_failing_a_required_validator_is_not_deployed(config: IntegrationConfig) -> None:
    validators = [
        "assertions",
        "validator-code",
        "validator-logic",
        "validator-performance",
        "validator-security",
        "validator-custom",
    ]
    async with serving(config, agents(*LOOP, *validators)) as system:
        bad = cycle(
            objectives={"required_validators": [{"type": "logic", "severity": "error"}]},
            validation={"output_schema": {"topic": {"type": "int"}}},
        )
        rejected = await system.client.run("cycle", bad, timeout=90)
        assert rejected.status is TaskStatus.SUCCEEDED, rejected.error
        verdict = rejected.result["verdict"]
        assert verdict["deployed"] is False
        assert verdict["checks"] == {
            "min_improvement": True, "min_score": True, "validator:logic": False, "min_coverage": True
        }
        assert any("logic/" in r and "should be int" in r for r in verdict["reasons"])
        assert rejected.result["validation"]["passed"] is False
        # The same cycle with the right schema passes the same validator and deploys.
        good = cycle(
            objectives={"required_validators": [{"type": "logic", "severity": "error"}]},
            validation={
                "output_schema": {
                    "topic": {"type": "str", "choices": ["sports", "cooking", "technology", "finance", "weather"]}
                }
            },
        )
        accepted = await system.client.run("cycle", good, timeout=90)
        assert accepted.result["verdict"]["deployed"] is True, accepted.result["verdict"]["reasons"]
        assert accepted.result["verdict"]["checks"]["validator:logic"] is True
