"""The guide's ``FourPartOptimizationLoop`` with no bus: create → evaluate the baseline → optimize → evaluate the
optimized program → validate → deploy (the gate), each phase's output kept in the cycle's state before the next
starts, so a cycle resumes at the phase it reached.

The phases, the state store and the datasets are protocols; ``dspyrt.agents.loop.cycle`` gives their bus versions
(durable child tasks, the ``cycles`` KV bucket, the datasets store) and the ``cycle`` task's agent.
The cycle's scores are its two evaluations on the devset, and its improvement is their difference in percentage
points (what the gate, the result and the ``cycle.completed`` event use); the optimizer's own scores, on its
validation set, stay in the optimization's result.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

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


class FourPartOptimizationLoop:
    """Runs a cycle's phases in order, skipping the ones its state says are finished."""

    def __init__(
        self, phases: CyclePhases, store: CycleStore, datasets: Datasets, *, auto_validate: bool = True
    ) -> None:
        self.phases = phases
        self.store = store
        self.datasets = datasets
        self.auto_validate = auto_validate

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

    async def run_cycle(self, cycle_id: str, req: CycleRequest, progress: Progress | None = None) -> CycleResult:
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
