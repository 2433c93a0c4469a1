"""The evaluate phase, distributed.

``loop-evaluate`` takes the durable ``evaluate`` task, splits the devset into shards and submits one
``evaluate-shard`` task per shard with an id derived from the evaluation id; ``evaluator`` replicas (a queue
group of as many processes or machines as run) score the shards through the switcher. A replica that dies
mid-shard leaves its task unacknowledged, so JetStream hands it to another replica; shard results are merged by
example index, so no example is lost or counted twice, and a repeated evaluation reuses finished shards.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from agents.artifacts import ArtifactStore
from agents.lm.bus_engine import Routing, UsageMeter, bus_lm
from agents.loop.evaluation import merge_shards, to_examples
from agents.loop.models import EvaluateRequest, EvaluationResult, ProgramRef, ShardRequest, ShardResult
from agents.metrics import MetricRegistry
from agents.programs import build_program, load_program_state
from agents.scoring import evaluate_examples
from agents.switcher_core import Selection, SelectRequest
from bus import PermanentError, TaskStatus
from runtime.agent import Agent, TaskContext, task


async def load_program(ref: ProgramRef, artifacts: ArtifactStore) -> Any:
    """The DSPy module a reference names: its spec with the optimized state (inline or from an artifact)."""
    state = ref.state
    if state is None and ref.artifact is not None:
        state = (await artifacts.get(ref.artifact))["state"]
    return load_program_state(ref.spec, state) if state is not None else build_program(ref.spec)


def input_fields_of(ref: ProgramRef, given: list[str] | None) -> list[str]:
    if given:
        return given
    names: list[str] = []
    for _, predictor in build_program(ref.spec).named_predictors():
        names += [n for n in predictor.signature.input_fields if n not in names]
    return names


class EvaluatorAgent(Agent):
    """Scores one shard (``evaluate-shard`` tasks); run as many replicas as you like."""

    name = "evaluator"
    group = "loop"
    description = "loop phase worker: scores devset shards through the switcher"

    artifacts: ArtifactStore

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self.artifacts = await ArtifactStore.open(self.bus, self.config.stream_layout)
        yield

    @task("evaluate-shard", concurrency=2)
    async def evaluate_shard(self, shard: ShardRequest, ctx: TaskContext) -> ShardResult:
        program = await load_program(shard.program, self.artifacts)
        metric = MetricRegistry.installed().get(shard.metric, shard.metric_field, **shard.metric_params)
        examples = to_examples(shard.examples, shard.input_fields, shard.metric_field)
        meter = UsageMeter()
        routing = Routing(model=shard.model, task_kind="evaluate", fallback=shard.allow_fallback,
                          no_cache=shard.no_cache)  # fmt: skip
        lm = bus_lm(self.client, routing, meter)
        try:
            # A failure that is not about one example (the switcher unreachable, a timeout, an error reply)
            # fails the shard: the task worker retries it, or fails it at once if its code cannot heal.
            results = await anyio.to_thread.run_sync(
                evaluate_examples, program, examples, shard.offset, metric, lm, shard.num_threads,
                abandon_on_cancel=True,
            )  # fmt: skip
        finally:
            meter.exhausted = meter.exhausted or "shard abandoned"
        return ShardResult(
            offset=shard.offset,
            results=results,
            lm_calls=meter.calls,
            cached_calls=meter.cached_calls,
            provider_requests=meter.provider_requests,
            models_used=dict(meter.models),
            input_tokens=meter.input_tokens,
            output_tokens=meter.output_tokens,
            cost=round(meter.cost, 6),
            worker=ctx.run.msg.metadata.consumer or "",
        )


class EvaluateAgent(Agent):
    """Splits an evaluation into shards, waits for them, merges (``evaluate`` tasks)."""

    name = "loop-evaluate"
    group = "loop"
    description = "loop phase: distributed evaluation of a program on a devset"

    @task("evaluate")
    async def evaluate(self, job: EvaluateRequest, ctx: TaskContext) -> EvaluationResult:
        return await run_evaluation(self, job, job.evaluation_id or ctx.task_id, ctx)


async def select_model(agent: Agent, model: str | None, task_kind: str) -> str:
    if model is not None:
        return model
    selection = await agent.client.request("switcher", "select", SelectRequest(task_kind=task_kind), Selection)
    return selection.model


async def run_evaluation(agent: Agent, job: EvaluateRequest, evaluation_id: str, ctx: TaskContext) -> EvaluationResult:
    started = time.perf_counter()
    inputs = input_fields_of(job.program, job.input_fields)
    to_examples(job.devset, inputs, job.metric_field)  # a bad devset fails before any shard is paid for
    model = await select_model(agent, job.model, "evaluate")
    shards = [
        ShardRequest(
            program=job.program,
            examples=job.devset[offset : offset + job.shard_size],
            offset=offset,
            input_fields=inputs,
            metric=job.metric,
            metric_field=job.metric_field,
            metric_params=job.metric_params,
            model=model,
            num_threads=job.num_threads,
            allow_fallback=job.allow_fallback,
            no_cache=job.no_cache,
        )
        for offset in range(0, len(job.devset), job.shard_size)
    ]
    results: dict[int, ShardResult] = {}
    failures: list[Exception] = []

    async def one(shard: ShardRequest, number: int) -> None:
        shard_id = f"{evaluation_id}-s{number}"
        try:
            await agent.client.submit("evaluate-shard", shard, task_id=shard_id)
            record = await agent.client.result(shard_id, kind="evaluate-shard")
            if record.status is not TaskStatus.SUCCEEDED:
                # Its id is fixed, so a retry would read the same finished record: retrying cannot help.
                error = record.error
                raise PermanentError(
                    f"shard {number} of {evaluation_id} ended {record.status.value}: "
                    + (error.message if error else "no error recorded"),
                    code=error.code if error else None,
                )
            results[number] = ShardResult.model_validate(record.result)
            await ctx.progress("evaluating", step=len(results), total=len(shards))
        except Exception as exc:
            failures.append(exc)
            tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for number, shard in enumerate(shards):
            tg.start_soon(one, shard, number)
    if failures:
        # Raised outside the task group, which would wrap it in an ExceptionGroup (code "internal") and so hide
        # whether it is permanent, retryable or the switcher's error.
        raise failures[0]
    return merge_shards(
        results.values(),
        total=len(job.devset),
        model=model,
        duration_s=time.perf_counter() - started,
        max_error_rate=job.max_error_rate,
    )
