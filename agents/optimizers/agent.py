"""The optimizer agent: the durable ``optimize`` task, and ``<prefix>.optimizer.list | set_active | stats``.

A run pins one model (the request's, or the switcher's choice for task kind ``optimize``), sends every LM call
through the switcher with a per-run budget, feeds progress events from DSPy's callbacks, stores the optimized
program's ``dump_state()`` JSON as a versioned artifact in the object store (its reference carries the sha256 of
the state alone, ``state_sha256``), and caches the result by (program hash, data, metric, optimizer, parameters,
model, seed) so an identical request returns at once: ``cached`` true, with 0 LM calls, tokens and cost (what the
original run spent is kept as ``original_lm_calls``, ``original_cost``, ``original_duration_s``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from dspyrt.agents.artifacts import ArtifactStore
from dspyrt.agents.lm.bus_engine import Routing, UsageMeter, bus_lm
from dspyrt.agents.optimizers.core import DSPyOptimizerManager, RunOutcome
from dspyrt.agents.optimizers.models import (
    ArtifactRef,
    OptimizationFinished,
    OptimizationRequest,
    OptimizationResult,
    OptimizerList,
    OptimizerStatsReply,
    SetActive,
    state_sha256,
)
from dspyrt.agents.switcher.client import ask_switcher
from dspyrt.agents.switcher.models import SelectRequest
from dspyrt.bus import Empty
from dspyrt.bus.streams import key_value
from dspyrt.runtime.agent import Agent, CheckResult, TaskContext, endpoint, task
from dspyrt.runtime.config import IntegrationMode
from dspyrt.runtime.datasets import DatasetStore, load_fields, pin_fields

ACTIVE_KEY = "active"
EXAMPLE_FIELDS = ("trainset", "valset")


class OptimizerAgent(Agent):
    """The guide's DSPyOptimizerManager on the bus."""

    name = "optimizer"
    group = "optimizers"
    modes = frozenset({IntegrationMode.FULL, IntegrationMode.OPTIMIZATION_ONLY})
    switch = "enable_optimizers"
    description = "DSPy optimizers: optimize tasks, registry, stats"
    publishes = (OptimizationFinished,)

    manager: DSPyOptimizerManager
    cache: KeyValue
    settings: KeyValue
    artifacts: ArtifactStore
    datasets: DatasetStore

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self.manager = DSPyOptimizerManager()
        layout = self.config.stream_layout
        self.cache = await key_value(self.bus, self.bus.subjects.bucket("optcache"), layout)
        self.settings = await key_value(self.bus, self.bus.subjects.bucket("optimizer"), layout)
        self.artifacts = await ArtifactStore.open(self.bus, layout)
        self.datasets = await DatasetStore.open(self.bus, layout)
        yield

    async def _active(self) -> str:
        """The active optimizer is shared by every replica through KV."""
        try:
            entry = await self.settings.get(ACTIVE_KEY)
            if entry.value:
                return entry.value.decode()
        except KeyNotFoundError:  # not set yet (a KV timeout must not silently pick the local default)
            pass
        return self.manager.active

    # --- endpoints ---------------------------------------------------------------------------------

    @endpoint("list")
    async def list(self, _: Empty) -> OptimizerList:
        """Known optimizers and the active one."""
        return OptimizerList(active=await self._active(), optimizers=self.manager.list_optimizers())

    @endpoint("set_active")
    async def set_active(self, request: SetActive) -> OptimizerList:
        """Make an installed optimizer the default for requests that name none."""
        self.manager.set_active_optimizer(request.name)
        await self.settings.put(ACTIVE_KEY, request.name.encode())
        return await self.list(Empty())

    @endpoint("stats")
    async def stats(self, _: Empty) -> OptimizerStatsReply:
        """Runs, successes, failures, mean improvement and mean duration per optimizer (this instance)."""
        return OptimizerStatsReply(active=await self._active(), stats=self.manager.get_stats())

    # --- the task ----------------------------------------------------------------------------------

    @task("optimize")
    async def optimize(self, job: OptimizationRequest, ctx: TaskContext) -> OptimizationResult:
        started = time.perf_counter()
        if job.optimizer is None:
            job = job.model_copy(update={"optimizer": await self._active()})
        self.manager.prepare(job)  # fail fast: optimizer, parameters and metric exist
        # Keyed on the pinned versions (content hashes) of the data, read after the cache missed.
        job = await pin_fields(self.datasets, job, EXAMPLE_FIELDS)
        model = job.model or await self._select_model()
        key = job.cache_key(model)
        if not job.no_cache:
            cached = await self._cached(key)
            if cached is not None:
                await ctx.progress("cached", step=1, total=1, best_score=cached.optimized_score, scored_on="valset")
                return cached.as_cache_hit(time.perf_counter() - started)

        job, used = await load_fields(self.datasets, job, EXAMPLE_FIELDS)
        meter = UsageMeter(max_calls=job.budget.max_lm_calls, max_cost=job.budget.max_cost)
        routing = Routing(model=model, task_kind="optimize", fallback=job.allow_fallback, no_cache=job.no_cache)
        lm = bus_lm(self.client, routing, meter)
        token = anyio.lowlevel.current_token()

        def progress(phase: str, data: dict[str, Any]) -> None:
            try:
                anyio.from_thread.run(lambda: ctx.progress(phase, **data), token=token)
            except Exception:  # progress is best effort; never fail the run for it
                pass

        try:
            outcome: RunOutcome = await anyio.to_thread.run_sync(
                self.manager.run, job, lm, meter, progress, model, abandon_on_cancel=True
            )
        finally:
            # A run abandoned by shutdown must stop spending: its next LM call fails at once.
            meter.exhausted = meter.exhausted or "run abandoned"
        result = outcome.result
        result.datasets = used
        if outcome.state is not None:
            result.artifact = await self._store_artifact(ctx.task_id, outcome)
        if result.status == "completed":
            await self.cache.put(key, result.model_dump_json().encode())
        await self.publish_event(f"optimization.{result.status}", OptimizationFinished.of(ctx.task_id, result))
        return result

    async def _select_model(self) -> str:
        return (await ask_switcher(self.client, SelectRequest(task_kind="optimize"))).model

    async def _cached(self, key: str) -> OptimizationResult | None:
        """The stored result of an identical run, as that run reported it (``as_cache_hit`` makes it this one's)."""
        try:
            entry = await self.cache.get(key)
        except Exception:
            return None
        if not entry.value:
            return None
        result = OptimizationResult.model_validate_json(entry.value)
        if result.artifact is not None and result.artifact.state_sha256 is None:
            # Stored before artifacts carried their state's hash: the deploy needs it to see an unchanged program.
            try:
                state = (await self.artifacts.get(result.artifact))["state"]
            except Exception:  # the artifact is gone or unreadable: run again rather than return it
                return None
            result.artifact = result.artifact.model_copy(update={"state_sha256": state_sha256(state)})
            await self.cache.put(key, result.model_dump_json().encode())
        return result

    async def _store_artifact(self, task_id: str, outcome: RunOutcome) -> ArtifactRef:
        result = outcome.result
        document = {
            "program_name": result.program_name,
            "program_hash": result.program_hash,
            "spec": outcome.program_spec.model_dump(mode="json"),
            "state": outcome.state,
            "optimizer": result.optimizer,
            "params": result.params,
            "model": result.model,
            "metric": result.metric,
            "optimized_score": result.optimized_score,
            "task_id": task_id,
            "created_at": time.time(),
        }
        ref = await self.artifacts.put(f"{result.program_name}/{task_id}.json", document)
        return ref.model_copy(update={"state_sha256": state_sha256(outcome.state)})

    async def health_checks(self) -> dict[str, CheckResult]:
        return {"optimizers": CheckResult(ok=True, detail=f"{len(self.manager.optimizers)} installed")}
