"""The evaluate phase, distributed.

``loop-evaluate`` takes the durable ``evaluate`` task, splits the devset into shards and submits one
``evaluate-shard`` task per shard with an id derived from the evaluation id; ``evaluator`` replicas (a queue
group of as many processes or machines as run) score the shards through the switcher. A replica that dies
mid-shard leaves its task unacknowledged, so JetStream hands it to another replica; shard results are merged by
example index, so no example is lost or counted twice, and a repeated evaluation reuses finished shards.

A devset named by dataset reference is never read whole: the coordinator pins it and reads its manifest (how
many rows, which fields), and each shard carries the reference with its row range; an evaluator reads only its
shard's rows (through a store that keeps a few parts cached, so its memory does not grow with the devset).
Shard results are merged as they arrive into counters and a spool file, and a large evaluation's per-example
results go to the results object store (``dspyrt.agents.loop.evaluation``).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from dspyrt.agents.artifacts import ArtifactStore
from dspyrt.agents.lm.bus_engine import Routing, UsageMeter, bus_lm
from dspyrt.agents.loop.evaluation import EvaluationAccumulator, store_results, to_examples
from dspyrt.agents.loop.models import EvaluateRequest, EvaluationResult, ProgramRef, ShardRequest, ShardResult
from dspyrt.agents.metrics import MetricRegistry
from dspyrt.agents.optimizers.core import program_inputs
from dspyrt.agents.programs import build_program, load_program_state
from dspyrt.agents.scoring import evaluate_examples
from dspyrt.agents.switcher.client import ask_switcher
from dspyrt.agents.switcher.models import SelectRequest
from dspyrt.bus import DspyrtError, MessageValidationError
from dspyrt.bus.claims import ClaimStore
from dspyrt.runtime.agent import Agent, TaskContext, task
from dspyrt.runtime.children import submit_child_and_wait
from dspyrt.runtime.config import IntegrationMode
from dspyrt.runtime.datasets import DatasetManifest, DatasetRef, DatasetStore, references_in

# Shards submitted and awaited at once: enough to keep every evaluator replica busy, without one subscription and
# one waiting task per shard of a 100,000-example devset.
MAX_SHARDS_IN_FLIGHT = 256


async def load_program(ref: ProgramRef, artifacts: ArtifactStore) -> Any:
    """The DSPy module a reference names: its spec with the optimized state (inline or from an artifact)."""
    state = ref.state
    if state is None and ref.artifact is not None:
        state = (await artifacts.get(ref.artifact))["state"]
    return load_program_state(ref.spec, state) if state is not None else build_program(ref.spec)


def input_fields_of(ref: ProgramRef, given: list[str] | None) -> list[str]:
    """The example keys that are the program's inputs: ``given``, else the program's own (``program_inputs``)."""
    if given:
        return given
    return program_inputs(build_program(ref.spec)).names


class EvaluatorAgent(Agent):
    """Scores one shard (``evaluate-shard`` tasks); run as many replicas as you like."""

    name = "evaluator"
    group = "loop"
    modes = frozenset({IntegrationMode.FULL, IntegrationMode.OPTIMIZATION_ONLY})
    description = "loop phase worker: scores devset shards through the switcher"

    artifacts: ArtifactStore
    datasets: DatasetStore

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self.artifacts = await ArtifactStore.open(self.bus, self.config.stream_layout)
        # One store for the agent's life: its part cache bounds what shard reads hold, whatever the devset's size.
        self.datasets = await DatasetStore.open(self.bus, self.config.stream_layout)
        yield

    @task("evaluate-shard", concurrency=2)
    async def evaluate_shard(self, shard: ShardRequest, ctx: TaskContext) -> ShardResult:
        program = await load_program(shard.program, self.artifacts)
        metric = MetricRegistry.installed().get(shard.metric, shard.metric_field, **shard.metric_params)
        rows = shard.examples if shard.examples is not None else await self._rows(shard)
        examples = to_examples(rows, shard.input_fields, shard.metric_field, start=shard.offset,
                               source=shard.dataset)  # fmt: skip
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

    async def _rows(self, shard: ShardRequest) -> list[dict[str, Any]]:
        """The shard's rows of its dataset (only the parts that hold them are read)."""
        if shard.dataset is None or shard.count is None:
            raise MessageValidationError("the shard names no dataset rows")
        first = shard.first_row
        rows = await self.datasets.rows(shard.dataset, first, first + shard.count)
        if len(rows) != shard.count:
            raise DspyrtError(
                f"{shard.dataset} has {len(rows)} row(s) from row {first}, the shard needs {shard.count}",
                code="corrupt_dataset",
            )
        return rows


class EvaluateAgent(Agent):
    """Splits an evaluation into shards, waits for them, merges (``evaluate`` tasks)."""

    name = "loop-evaluate"
    group = "loop"
    modes = frozenset({IntegrationMode.FULL, IntegrationMode.OPTIMIZATION_ONLY})
    description = "loop phase: distributed evaluation of a program on a devset"

    datasets: DatasetStore
    _claims: ClaimStore | None = None

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self.datasets = await DatasetStore.open(self.bus, self.config.stream_layout)
        yield

    async def claims(self) -> ClaimStore:
        """The results object store, opened when a first evaluation is too large to keep its results inline."""
        if self._claims is None:
            self._claims = await ClaimStore.open(self.bus, self.config.stream_layout)
        return self._claims

    @task("evaluate")
    async def evaluate(self, job: EvaluateRequest, ctx: TaskContext) -> EvaluationResult:
        return await run_evaluation(self, job, job.evaluation_id or ctx.task_id, ctx)


async def select_model(agent: Agent, model: str | None, task_kind: str) -> str:
    if model is not None:
        return model
    return (await ask_switcher(agent.client, SelectRequest(task_kind=task_kind))).model


@dataclass(frozen=True)
class DevsetPart:
    """One dataset version of a devset named by reference, and where its rows start in the devset."""

    ref: DatasetRef
    rows: int
    base: int


def check_fields(manifest: DatasetManifest, inputs: list[str], metric_field: str | None) -> None:
    """The dataset's rows carry the program's inputs and the metric field: checked on its manifest, before any
    LM call is paid for (a field only some rows lack fails that row's shard)."""
    missing = [name for name in inputs if name not in manifest.fields]
    if metric_field is not None and metric_field not in manifest.fields:
        missing.append(metric_field)
    if missing:
        what = "the metric field" if missing == [metric_field] else "field(s) the program needs"
        raise MessageValidationError(
            f"dataset {manifest.ref.label} has no {what} {', '.join(repr(m) for m in missing)} "
            f"(its fields: {', '.join(manifest.fields) or 'none'})"
        )


async def devset_parts(
    store: DatasetStore, devset: Any, inputs: list[str], metric_field: str | None
) -> list[DevsetPart]:
    """The pinned versions a referenced devset names, each checked on its manifest (no row is read)."""
    parts: list[DevsetPart] = []
    base = 0
    for ref in references_in(devset):
        pinned = await store.resolve(ref)  # a raw client may send an unpinned one: every shard reads this version
        manifest = await store.manifest(pinned)
        check_fields(manifest, inputs, metric_field)
        parts.append(DevsetPart(pinned, manifest.rows, base))
        base += manifest.rows
    return parts


def plan_shards(job: EvaluateRequest, parts: list[DevsetPart], common: dict[str, Any]) -> Iterator[ShardRequest]:
    """The shards in index order: slices of an inline devset, or row ranges of each dataset version."""
    size = job.shard_size
    if not parts:
        rows = job.devset
        for offset in range(0, len(rows), size):
            yield ShardRequest(examples=rows[offset : offset + size], offset=offset, **common)  # type: ignore[arg-type]
        return
    for part in parts:
        for first in range(0, part.rows, size):
            yield ShardRequest(
                dataset=str(part.ref),
                dataset_offset=first,
                count=min(size, part.rows - first),
                offset=part.base + first,
                **common,
            )


async def run_evaluation(
    agent: EvaluateAgent, job: EvaluateRequest, evaluation_id: str, ctx: TaskContext
) -> EvaluationResult:
    started = time.perf_counter()
    inputs = input_fields_of(job.program, job.input_fields)
    # A bad devset fails before any shard is paid for: inline rows are checked here, a dataset on its manifest.
    parts = await devset_parts(agent.datasets, job.devset, inputs, job.metric_field)
    if parts:
        total = sum(p.rows for p in parts)
    else:
        to_examples(job.devset, inputs, job.metric_field)  # type: ignore[arg-type]
        total = len(job.devset)
    model = await select_model(agent, job.model, "evaluate")
    common = {
        "program": job.program,
        "input_fields": inputs,
        "metric": job.metric,
        "metric_field": job.metric_field,
        "metric_params": job.metric_params,
        "model": model,
        "num_threads": job.num_threads,
        "allow_fallback": job.allow_fallback,
        "no_cache": job.no_cache,
    }
    shards = sum(-(-rows // job.shard_size) for rows in ([p.rows for p in parts] or [total]))  # ceil per part
    spool_dir = agent.config.state_dir / "spool"
    spool_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="eval-", dir=spool_dir) as tmp:
        with EvaluationAccumulator(total, Path(tmp) / "results.jsonl") as accumulator:
            await _run_shards(agent, plan_shards(job, parts, common), shards, evaluation_id, accumulator, ctx)
            result = accumulator.summary(
                model=model, duration_s=time.perf_counter() - started, max_error_rate=job.max_error_rate
            )
            result.dataset = ",".join(p.ref.label for p in parts) or None
            return await store_results(accumulator, result, agent.claims, evaluation_id)


async def _run_shards(
    agent: Agent,
    plan: Iterator[ShardRequest],
    total_shards: int,
    evaluation_id: str,
    accumulator: EvaluationAccumulator,
    ctx: TaskContext,
) -> None:
    """Submit every shard (at most MAX_SHARDS_IN_FLIGHT waiting at once) and merge each result as it arrives."""
    failures: list[Exception] = []
    limiter = anyio.Semaphore(MAX_SHARDS_IN_FLIGHT)

    async def one(shard: ShardRequest, number: int) -> None:
        shard_id = f"{evaluation_id}-s{number}"
        try:
            # Its id is fixed, so a retry would read the same finished record: retrying cannot help.
            result = await submit_child_and_wait(
                agent.client, "evaluate-shard", shard, ShardResult, task_id=shard_id, on_failure="fail"
            )
            accumulator.add(number, result)
            await ctx.progress("evaluating", step=accumulator.shards, total=total_shards)
        except Exception as exc:
            failures.append(exc)
            tg.cancel_scope.cancel()
        finally:
            limiter.release()

    async with anyio.create_task_group() as tg:
        for number, shard in enumerate(plan):
            await limiter.acquire()
            tg.start_soon(one, shard, number)
    if failures:
        # Raised outside the task group, which would wrap it in an ExceptionGroup (code "internal") and so hide
        # whether it is permanent, retryable or the switcher's error.
        raise failures[0]
