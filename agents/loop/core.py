"""The guide's ``FourPartOptimizationLoop`` with no bus: create → evaluate the baseline → optimize → evaluate the
optimized program → validate → deploy (the gate), each phase's output kept in the cycle's state before the next
starts, so a cycle resumes at the phase it reached.

The phases, the state store and the datasets are protocols; ``dspyrt.agents.loop.cycle`` gives their bus versions
(durable child tasks, the ``cycles`` KV bucket, the datasets store) and the ``cycle`` task's agent, and
``dspyrt.agents.loop.inprocess`` their in-process versions, which ``FourPartOptimizationLoop()`` uses when given
none (no NATS: the configured ``dspy.LM``, an in-memory store and deploy registry).

``arun_cycle`` is the cycle (async: the bus agent awaits it); ``run_cycle`` is the guide's blocking call, usable
from plain scripts and from inside a running event loop (a notebook), and ``get_stats`` counts the cycles.
The cycle's scores are its two evaluations on the devset, and its improvement is their difference in percentage
points (what the gate, the result and the ``cycle.completed`` event use); the optimizer's own scores, on its
validation set, stay in the optimization's result.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from dspyrt.agents.loop.inprocess import InlineDatasets, InProcessPhases, MemoryCycleStore, cycle_request
from dspyrt.agents.loop.models import (
    EXAMPLE_FIELDS,
    PHASES,
    CreateResult,
    CycleRequest,
    CycleResult,
    CycleState,
    DeployRequest,
    DeployVerdict,
    EvaluateRequest,
    EvaluationResult,
    PhaseName,
    ProgramRef,
    feedback_dataset,
)
from dspyrt.agents.optimizers.models import OptimizationRequest, OptimizationResult, improvement_points
from dspyrt.bus import ConfigurationError
from dspyrt.runtime.datasets import DatasetNotFoundError, DatasetRef, references_in


class CycleStore(Protocol):
    async def load(self, cycle_id: str) -> CycleState: ...
    async def save(self, state: CycleState) -> None: ...


class CyclePhases(Protocol):
    """How each phase is carried out (over the bus in the agent; directly in a test)."""

    async def create(self, req: CycleRequest) -> CreateResult: ...
    async def evaluate(self, req: EvaluateRequest, key: str) -> EvaluationResult: ...
    async def optimize(self, req: OptimizationRequest, key: str) -> OptimizationResult: ...
    async def validate(self, req: CycleRequest, evaluation: EvaluationResult) -> dict[str, Any] | None: ...
    async def deploy(self, req: DeployRequest) -> DeployVerdict: ...


class Datasets(Protocol):
    """What the loop asks of the dataset store (``dspyrt.runtime.datasets.DatasetStore``)."""

    async def pin(self, value: Any) -> Any: ...
    async def resolve(self, ref: DatasetRef | str) -> DatasetRef: ...
    async def rows(self, ref: DatasetRef | str, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]: ...


Progress = Callable[[str, int, int], Awaitable[None]]


@dataclass
class LoopStats:
    """What a loop instance has run (the guide's ``get_stats``)."""

    cycles: int = 0
    succeeded: int = 0
    failed: int = 0
    deployed: int = 0
    rejected: int = 0
    last_cycle_id: str | None = None
    last_improvement: float | None = None
    last_error: str | None = None
    duration_total: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "cycles": self.cycles,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "deployed": self.deployed,
            "rejected": self.rejected,
            "last_cycle_id": self.last_cycle_id,
            "last_improvement": self.last_improvement,
            "last_error": self.last_error,
            "mean_duration_s": round(self.duration_total / self.cycles, 3) if self.cycles else None,
        }


CycleInput = CycleRequest | Mapping[str, Any]


class FourPartOptimizationLoop:
    """Runs a cycle's phases in order, skipping the ones its state says are finished.

    With no arguments the phases run in this process (:class:`~dspyrt.agents.loop.inprocess.InProcessPhases`,
    an in-memory store, inline data): ``FourPartOptimizationLoop().run_cycle({...})`` as the guide writes it.
    The bus agent gives its own phases, store and datasets (all three, or none)."""

    def __init__(
        self,
        phases: CyclePhases | None = None,
        store: CycleStore | None = None,
        datasets: Datasets | None = None,
        *,
        auto_validate: bool = True,
    ) -> None:
        if phases is None and store is None and datasets is None:
            phases, store, datasets = InProcessPhases(), MemoryCycleStore(), InlineDatasets()
        if phases is None or store is None or datasets is None:
            raise ConfigurationError("give the loop its phases, store and datasets, or none (in-process)")
        self.phases = phases
        self.store = store
        self.datasets = datasets
        self.auto_validate = auto_validate
        self._stats = LoopStats()
        self._stats_lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        # A service, not a value: a dspy.Module holding one (the guide's pattern) shares it with the copies DSPy
        # makes while optimizing.
        return self

    def get_stats(self) -> dict[str, Any]:
        """Cycles run by this instance: how many, succeeded and failed (raised), deployed and rejected by the
        gate, the last cycle's id, improvement (points on the devset) and error, the mean duration."""
        with self._stats_lock:
            return self._stats.as_dict()

    def run_cycle(self, request: CycleInput, cycle_id: str | None = None) -> CycleResult:
        """Run a cycle to its end and return its result (blocking: the guide's call).

        ``request``: a :class:`CycleRequest`, or the guide's dict (``module_class``, ``test_data``,
        ``optimization_objectives`` ...; see :func:`~dspyrt.agents.loop.inprocess.cycle_request`).
        ``cycle_id``: default a new one. With no event loop running in this thread the cycle runs on a new one;
        inside a running loop (a notebook) it runs on its own loop in a worker thread while this thread waits.
        Async code should ``await arun_cycle(...)`` instead."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return anyio.run(self.arun_cycle, request, cycle_id)
        outcome: list[CycleResult] = []
        failure: list[BaseException] = []
        context = contextvars.copy_context()  # the caller's dspy.context (its LM) goes with the cycle

        def work() -> None:
            try:
                outcome.append(context.run(lambda: anyio.run(self.arun_cycle, request, cycle_id)))
            except BaseException as exc:  # handed to the waiting caller
                failure.append(exc)

        worker = threading.Thread(target=work, name="dspyrt-run-cycle")
        worker.start()
        worker.join()
        if failure:
            raise failure[0]
        return outcome[0]

    async def arun_cycle(
        self, request: CycleInput, cycle_id: str | None = None, progress: Progress | None = None
    ) -> CycleResult:
        """Run (or resume) cycle ``cycle_id`` (default: a new id) of ``request`` (a :class:`CycleRequest`, or a
        dict as :meth:`run_cycle` takes), counting it in :meth:`get_stats`."""
        started = time.perf_counter()
        cycle = cycle_id or f"cycle-{uuid.uuid4().hex[:12]}"
        try:
            if isinstance(request, CycleRequest):
                req = request
            else:
                req = cycle_request(request, self.phases if isinstance(self.phases, InProcessPhases) else None)
            result = await self._run_cycle(cycle, req, progress)
        except BaseException as exc:
            with self._stats_lock:
                self._count(cycle, started)
                self._stats.failed += 1
                self._stats.last_error = str(exc)
            raise
        with self._stats_lock:
            self._count(cycle, started)
            self._stats.succeeded += 1
            self._stats.deployed += result.verdict.deployed
            self._stats.rejected += not result.verdict.deployed
            self._stats.last_improvement = result.improvement_score
            self._stats.last_error = None
        return result

    def _count(self, cycle_id: str, started: float) -> None:
        self._stats.cycles += 1
        self._stats.last_cycle_id = cycle_id
        self._stats.duration_total += time.perf_counter() - started

    async def pin(self, state: CycleState, req: CycleRequest) -> None:
        """Pin the request's dataset references, and the feedback dataset when asked for, into ``state``."""
        if state.pinned is None:
            state.pinned = {
                name: await self.datasets.pin(getattr(req, name))
                for name in EXAMPLE_FIELDS
                if references_in(getattr(req, name))
            }
        if req.include_feedback and state.feedback is None:
            try:
                state.feedback = [str(await self.datasets.resolve(feedback_dataset(req.program_name)))]
            except DatasetNotFoundError:  # no feedback recorded yet: the cycle runs on the base data
                state.feedback = []

    async def trainset(self, req: CycleRequest, feedback: list[str]) -> Any:
        """The optimize phase's trainset: the request's, then the feedback dataset's rows (a reference after
        references, rows after inline rows)."""
        if not feedback:
            return req.trainset
        refs = references_in(req.trainset)
        if refs:
            return [str(ref) for ref in refs] + feedback
        rows = list(req.trainset)
        for ref in feedback:
            rows.extend(await self.datasets.rows(ref))
        return rows

    async def _run_cycle(self, cycle_id: str, req: CycleRequest, progress: Progress | None) -> CycleResult:
        state = await self.store.load(cycle_id)
        if state.pinned is None or (req.include_feedback and state.feedback is None):
            await self.pin(state, req)
            await self.store.save(state)
        req = req.model_copy(update=state.pinned or {})
        feedback = state.feedback if req.include_feedback else None
        used = datasets_used(req, feedback)

        async def phase(name: PhaseName, run: Callable[[], Awaitable[Any]]) -> Any:
            if name in state.phases:
                return state.phases[name]
            if progress is not None:
                await progress(name, PHASES.index(name), len(PHASES))
            state.runs[name] = state.runs.get(name, 0) + 1
            await self.store.save(state)  # the start is recorded too: a re-run would show
            result = await run()
            state.phases[name] = _dump(result)
            await self.store.save(state)
            return state.phases[name]

        def ref(state_artifact: dict[str, Any] | None = None) -> ProgramRef:
            return ProgramRef(spec=req.program, artifact=state_artifact)  # type: ignore[arg-type]

        def evaluation(program: ProgramRef, key: str) -> EvaluateRequest:
            return EvaluateRequest(
                program=program,
                devset=req.devset,
                input_fields=req.input_fields,
                metric=req.metric,
                metric_field=req.metric_field,
                metric_params=req.metric_params,
                model=req.model,
                shard_size=req.shard_size,
                evaluation_id=key,
                allow_fallback=req.allow_fallback,
                no_cache=req.no_cache,
                max_error_rate=req.max_error_rate,
            )

        create = CreateResult.model_validate(await phase("create", lambda: self.phases.create(req)))
        baseline = EvaluationResult.model_validate(
            await phase("evaluate_baseline", lambda: self.phases.evaluate(evaluation(ref(), f"{cycle_id}-base"),
                                                                          f"{cycle_id}-base"))
        )  # fmt: skip

        async def optimize() -> OptimizationResult:
            request = OptimizationRequest.from_spec(
                req,
                program_name=req.program_name,
                trainset=await self.trainset(req, feedback or []),
                model=req.model or baseline.model,
            )
            return await self.phases.optimize(request, f"{cycle_id}-opt")

        optimization = OptimizationResult.model_validate(await phase("optimize", optimize))
        optimized: EvaluationResult | None = None
        validation: dict[str, Any] | None = None
        if optimization.artifact is not None:
            optimized_ref = ProgramRef(spec=req.program, artifact=optimization.artifact)
            optimized = EvaluationResult.model_validate(
                await phase("evaluate_optimized", lambda: self.phases.evaluate(
                    evaluation(optimized_ref, f"{cycle_id}-opt-eval"), f"{cycle_id}-opt-eval"))
            )  # fmt: skip
            if self.auto_validate or req.objectives.required_validators:
                final = optimized
                validation = await phase("validate", lambda: self.phases.validate(req, final))
        verdict = DeployVerdict.model_validate(
            await phase("deploy", lambda: self._deploy(cycle_id, req, baseline, optimization, optimized, validation,
                                                       all_datasets(used)))
        )  # fmt: skip
        return CycleResult(
            cycle_id=cycle_id,
            program_name=req.program_name,
            create=create,
            baseline=baseline,
            optimization=optimization,
            optimized=optimized,
            improvement_score=improvement_points(baseline.score, optimized.score) if optimized else None,
            validation=validation,
            verdict=verdict,
            phase_runs=dict(state.runs),
            models_used=(models := models_used(baseline, optimization, optimized)),
            mixed_models=len(models) > 1,
            datasets=used,
        )

    async def _deploy(
        self,
        cycle_id: str,
        req: CycleRequest,
        baseline: EvaluationResult,
        optimization: OptimizationResult,
        optimized: EvaluationResult | None,
        validation: dict[str, Any] | None,
        datasets: list[str],
    ) -> DeployVerdict:
        if optimization.artifact is None or optimized is None:
            return DeployVerdict(
                deployed=False,
                program_name=req.program_name,
                reasons=[f"optimization ended {optimization.status}: {optimization.stopped_reason or 'no artifact'}"],
            )
        return await self.phases.deploy(
            DeployRequest(
                program_name=req.program_name,
                program=req.program,
                artifact=optimization.artifact,
                model=optimization.model,
                baseline_score=baseline.score,
                optimized_score=optimized.score,
                cost=round(baseline.cost + optimization.cost + optimized.cost, 6),
                latency_p95_ms=optimized.latency_p95_ms,
                coverage=min(baseline.coverage, optimized.coverage),
                models_used=models_used(baseline, optimization, optimized),
                validation=validation,
                objectives=req.objectives,
                canary_fraction=req.canary_fraction,
                cycle_id=cycle_id,
                datasets=datasets,
            )
        )


def datasets_used(req: CycleRequest, feedback: list[str] | None) -> dict[str, list[str]]:
    """The versions ("NAME@VERSION") each examples field of a pinned request names (inline fields are not listed),
    and the feedback dataset's (``[]``: there was none) when it was asked for."""
    used = {name: [ref.label for ref in references_in(getattr(req, name))] for name in EXAMPLE_FIELDS}
    used = {name: labels for name, labels in used.items() if labels}
    if feedback is not None:
        used["feedback"] = [DatasetRef.parse(ref).label for ref in feedback]
    return used


def all_datasets(used: dict[str, list[str]]) -> list[str]:
    """Every version in ``used`` once, in the order first named."""
    return list(dict.fromkeys(label for labels in used.values() for label in labels))


def models_used(
    baseline: EvaluationResult, optimization: OptimizationResult, optimized: EvaluationResult | None
) -> dict[str, int]:
    """Every model that answered a call in the cycle's measured phases, with its calls."""
    used: dict[str, int] = {}
    for phase in (baseline.models_used, optimization.models_used, optimized.models_used if optimized else {}):
        for model, calls in phase.items():
            used[model] = used.get(model, 0) + calls
    return used


def _dump(result: Any) -> dict[str, Any]:
    if result is None:
        return {}
    if hasattr(result, "model_dump"):
        dumped: dict[str, Any] = result.model_dump(mode="json")
        return dumped
    return dict(result)
