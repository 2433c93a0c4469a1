"""The Python API against a real system: dspyrt.connect / connect_sync, RemoteProgram, and the README's example.

Every test runs real agents on a real nats-server; the user's side is what a DSPy user writes: Signature classes,
dspy.Example lists, their own dspy.Module around a deployed program, a notebook cell inside a running event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import anyio
import dspy
import pytest
from anyio.from_thread import start_blocking_portal
from opentelemetry import trace

import dspyrt
from dspyrt.agents.optimizers.agent import OptimizerAgent
from dspyrt.agents.optimizers.models import OptimizationResult, state_sha256
from dspyrt.agents.switcher.agent import SwitcherAgent
from dspyrt.bus import Bus, DspyrtError, TaskStatus
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.events import TaskProgress
from dspyrt.runtime.registry import available_agents
from dspyrt.runtime.telemetry import Telemetry
from dspyrt.runtime.traces import read_spans
from tests.helpers import ROOT, cycle, serving

pytestmark = pytest.mark.timeout(120)

OPTIMIZE = json.loads((ROOT / "examples" / "optimize.json").read_text())["input"]
LOOP = ["switcher", "optimizer", "loop-create", "loop-evaluate", "evaluator", "loop-deploy", "cycle", "serving"]


class Topic(dspy.Signature):  # type: ignore[misc]
    """Classify the text into one topic: sports, cooking, technology, finance or weather."""

    text: str = dspy.InputField()
    topic: str = dspy.OutputField()


def examples(rows: list[dict[str, Any]]) -> list[dspy.Example]:
    return [dspy.Example(**row).with_inputs("text") for row in rows]


def comparable(result: OptimizationResult) -> dict[str, Any]:
    """What two runs on the same data must agree on: scores, program, examples used, the optimized state."""
    fields = {"program_hash", "optimizer", "params", "model", "metric", "baseline_score", "optimized_score",
              "improvement_score", "trainset_size", "valset_size", "status", "seed"}  # fmt: skip
    data = result.model_dump(include=fields)
    data["state_sha256"] = result.artifact.state_sha256 if result.artifact else None
    return data


async def test_optimize_from_a_signature_class_and_examples_equals_the_raw_dict_path(config: IntegrationConfig) -> None:
    async with serving(config, [SwitcherAgent, OptimizerAgent]) as system, dspyrt.connect(config) as client:
        raw = await system.client.run("optimize", {**OPTIMIZE, "no_cache": True}, timeout=60)
        assert raw.status is TaskStatus.SUCCEEDED, raw.error
        events: list[TaskProgress] = []
        result = await client.optimize(
            Topic, examples(OPTIMIZE["trainset"]), examples(OPTIMIZE["valset"]),
            optimizer="labeled_fewshot", params={"k": 16}, program_name="topic-classifier", no_cache=True,
            progress=events.append, timeout=60,
        )  # fmt: skip
    assert isinstance(result, OptimizationResult) and not result.cached
    assert comparable(result) == comparable(OptimizationResult.model_validate(raw.result))
    assert result.optimized_score is not None and result.baseline_score is not None
    assert result.optimized_score > result.baseline_score
    assert events and all(isinstance(e, TaskProgress) for e in events)


async def test_progress_is_an_async_iterator_that_ends_with_the_task(config: IntegrationConfig) -> None:
    small = {"trainset": OPTIMIZE["trainset"][:10], "valset": OPTIMIZE["valset"][:4]}
    async with serving(config, [SwitcherAgent, OptimizerAgent]), dspyrt.connect(config) as client:
        with anyio.fail_after(60):
            async with client.optimize(Topic, examples(small["trainset"]), small["valset"], params={"k": 4}) as run:
                assert run.task_id is not None
                phases = [event.phase async for event in run.progress()]  # ends: the task ended
                result = await run.result()
        record = await client.client.task(run.task_id)
    assert phases and record.status is TaskStatus.SUCCEEDED
    assert result.trainset_size == 10 and result.valset_size == 4


async def test_a_failed_task_raises_task_failed_with_its_code(config: IntegrationConfig) -> None:
    rows = [{"text": "a"}, {"text": "b"}]  # no label: the optimizer refuses the data
    async with serving(config, [SwitcherAgent, OptimizerAgent]), dspyrt.connect(config) as client:
        with pytest.raises(dspyrt.TaskFailed) as failed:
            await client.optimize(Topic, rows, timeout=60)
    assert failed.value.code == "invalid_message" and failed.value.kind == "optimize"
    assert "label" in failed.value.message and not isinstance(failed.value, dspyrt.ProviderError)


class Unsupported(dspy.Signature):  # type: ignore[misc]
    """Count the words of each kind."""

    text: str = dspy.InputField()
    counts: dict[str, int] = dspy.OutputField()


async def test_a_signature_with_an_unsupported_type_is_refused_before_submit(
    config: IntegrationConfig, bus: Bus
) -> None:
    seen: list[str] = []

    async def record(msg: Any) -> None:
        seen.append(msg.subject)

    task_subject = config.subjects.task("optimize")
    sub = await bus.nc.subscribe(task_subject, cb=record)
    async with serving(config, [SwitcherAgent, OptimizerAgent]), dspyrt.connect(config) as client:
        with pytest.raises(dspyrt.SignatureNotSupported) as refused:
            await client.optimize(Unsupported, [{"text": "a b", "counts": "{}"}])
        await bus.nc.flush()
        await anyio.sleep(0.3)
        assert seen == [] and await client.client.tasks() == []
        # The same call with a type the spec can express is submitted, and seen: the checks above could fail.
        with pytest.raises(dspyrt.TaskFailed):
            await client.optimize("text -> counts", [{"text": "a"}], timeout=30)
        assert len(await client.client.tasks()) == 1 and seen == [task_subject]
    await sub.unsubscribe()
    assert refused.value.code == "unsupported_signature"
    assert [e.loc for e in refused.value.field_errors] == ["counts"]
    assert "'counts'" in refused.value.message and "dict[str, int]" in refused.value.message


class Pipeline(dspy.Module):  # type: ignore[misc]
    """A user's own program around a deployed one."""

    def __init__(self, classify: dspy.Module) -> None:
        super().__init__()
        self.classify = classify

    def forward(self, text: str) -> dspy.Prediction:
        topic = self.classify(text=text).topic
        return dspy.Prediction(topic=topic, headline=f"[{topic.upper()}] {text}")

    async def aforward(self, text: str) -> dspy.Prediction:
        topic = (await self.classify.acall(text=text)).topic
        return dspy.Prediction(topic=topic, headline=f"[{topic.upper()}] {text}")


def ancestors(spans: list[dict[str, Any]], span: dict[str, Any]) -> list[str]:
    by_id = {s["span_id"]: s for s in spans}
    chain: list[str] = []
    parent = by_id.get(span["parent_id"] or "")
    while parent is not None:
        chain.append(parent["name"])
        parent = by_id.get(parent["parent_id"] or "")
    return chain


async def test_a_remote_program_composes_in_a_user_pipeline_under_the_callers_trace(
    loop_config: IntegrationConfig, telemetry: Telemetry
) -> None:
    known = available_agents()
    texts = ["stocks fell after the bank raised rates", "chop the onions and fry them in butter"]
    async with serving(loop_config, [known[n] for n in LOOP]), dspyrt.connect(loop_config) as client:
        data = cycle()
        deployed = await client.cycle(
            data["program"], data["trainset"], data["devset"], program_name=data["program_name"],
            optimizer=data["optimizer"], params=data["params"], objectives=data["objectives"],
            shard_size=data["shard_size"], timeout=90,
        )  # fmt: skip
        assert deployed.verdict.deployed and deployed.verdict.version == 1
        direct = [(await client.predict("topic-classifier", {"text": t})).outputs["topic"] for t in texts]
        pipeline = Pipeline(client.program("topic-classifier"))

        with trace.get_tracer("user").start_as_current_span("user-pipeline") as span:
            answers = [(await pipeline.acall(text=t)).topic for t in texts]
            # forward blocks: called from a worker thread (dspy.Parallel's way), never from this loop's thread.
            threaded = await anyio.to_thread.run_sync(lambda: pipeline(text=texts[0]))
            trace_id = f"{span.get_span_context().trace_id:032x}"
        with pytest.raises(DspyrtError) as blocked:
            pipeline(text=texts[0])
        loaded = await client.load("topic-classifier")

    assert answers == direct and "unknown" not in answers
    assert threaded.topic == direct[0] and threaded.headline == f"[{direct[0].upper()}] {texts[0]}"
    assert blocked.value.code == "blocking_call_on_loop"
    assert deployed.optimization.artifact is not None
    assert state_sha256(loaded.dump_state()) == deployed.optimization.artifact.state_sha256
    telemetry.flush()
    spans = read_spans(Path(telemetry.span_destination).parent.parent)
    served = [
        s for s in spans
        if s["name"] == f"process {loop_config.subjects.endpoint('serving', 'predict')}" and s["trace_id"] == trace_id
    ]  # fmt: skip
    assert len(served) == len(texts) + 1  # the threaded call's too
    for span_data in served:
        assert ancestors(spans, span_data)[-1] == "user-pipeline"


async def test_the_sync_facade_works_inside_a_running_event_loop(config: IntegrationConfig) -> None:
    """A notebook cell: a running event loop on this thread, blocking calls on it (the system runs elsewhere)."""
    asyncio.get_running_loop()  # this test body is a coroutine on a running loop, as a notebook cell is
    small = examples(OPTIMIZE["trainset"][:10])
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(serving(config, [SwitcherAgent, OptimizerAgent])),
    ):
        client = dspyrt.connect_sync(config)
        with client:
            ticks: list[str] = []
            result = client.optimize(Topic, small, params={"k": 4}, progress=lambda e: ticks.append(e.phase),
                                     timeout=60)  # fmt: skip
            # No assertions agent runs here: a blocking request ends with an error, not a hang.
            with pytest.raises(DspyrtError) as unanswered:
                client.validate([{"inputs": {"text": "a"}, "outputs": {"topic": "sports"}}], timeout=2)
        with pytest.raises(DspyrtError) as closed:
            client.optimize(Topic, small)
    assert isinstance(result, OptimizationResult) and result.trainset_size + result.valset_size == 10 and ticks
    assert unanswered.value.code in {"unavailable", "timeout"}
    assert closed.value.code == "closed"


# ------------------------------------------------------------------------------------------ the README


README = ROOT / "README.md"


def readme_example() -> str | None:
    """The python block of the README's "Python API" section, or None without one."""
    text = README.read_text()
    section = re.search(r"^## Python API\n(.*?)(?=^## )", text, re.S | re.M)
    if section is None:
        return None
    block = re.search(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)
    return block.group(1) if block else None


def user_env(config: IntegrationConfig, tmp_path: Path) -> dict[str, str]:
    """A user's shell pointed at the test's system (as `make run`'s is found through its system file)."""
    return {
        **os.environ,
        "DSPYRT_NATS_URLS": ",".join(config.nats_urls),
        "DSPYRT_SUBJECT_PREFIX": config.subject_prefix,
        "DSPYRT_STATE_DIR": str(tmp_path / "user-state"),
    }


async def run_script(script: Path, config: IntegrationConfig, tmp_path: Path) -> str:
    """Run ``script`` as a user would (its own process); its stdout, once it exited 0."""
    with anyio.fail_after(100):
        done = await anyio.run_process(
            [sys.executable, str(script)], env=user_env(config, tmp_path), cwd=tmp_path, check=False
        )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return str(done.stdout.decode())


async def test_the_readme_example_runs_as_written(loop_config: IntegrationConfig, tmp_path: Path) -> None:
    code = readme_example()
    if code is None:
        pytest.skip("README.md has no '## Python API' section with a python block (yet)")
    script = tmp_path / "example.py"
    script.write_text(code)
    known = available_agents()
    async with serving(loop_config, [known[n] for n in LOOP]):
        output = await run_script(script, loop_config, tmp_path)
    assert "deployed v1" in output and output.strip().endswith("cooking")


async def test_the_python_examples_run(loop_config: IntegrationConfig, tmp_path: Path) -> None:
    known = available_agents()
    async with serving(loop_config, [known[n] for n in LOOP]) as system:
        record = await system.client.run("cycle", cycle(), timeout=90)  # what `make run` deploys
        assert record.status is TaskStatus.SUCCEEDED, record.error
        optimized = await run_script(ROOT / "examples" / "python" / "optimize.py", loop_config, tmp_path)
        pipeline = await run_script(ROOT / "examples" / "python" / "pipeline.py", loop_config, tmp_path)
    assert "labeled_fewshot on demo/fewshot" in optimized and "held-out examples" in optimized
    assert "[FINANCE] stocks fell" in pipeline and "[COOKING] chop the onions" in pipeline
    assert "loaded locally: Predict with 16 demos" in pipeline
