"""The cycle coordinator (the guide's FourPartOptimizationLoop.run_cycle) for the durable ``cycle`` task.

create → evaluate the baseline → optimize → evaluate the optimized program → validate → deploy (the gate).
Each finished phase's output is written to the ``cycles`` bucket before the next phase starts, so a coordinator
that dies mid-cycle is replaced (JetStream redelivers the task) and the cycle resumes at the phase it reached.
Phases that run elsewhere are durable tasks with ids derived from the cycle id, so a resumed phase attaches to
the run already under way instead of paying for it twice.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from agents.loop.create import create_program
from agents.loop.models import (
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
)
from agents.optimizers import OptimizationRequest, OptimizationResult
from bus import PermanentError, RetryableError, TaskStatus
from bus.streams import key_value
from runtime.agent import Agent, TaskContext, task


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


Progress = Callable[[str, int, int], Awaitable[None]]


class FourPartOptimizationLoop:
    """Runs a cycle's phases in order, skipping the ones its state says are finished."""

    def __init__(self, phases: CyclePhases, store: CycleStore, *, auto_validate: bool = True) -> None:
        self.phases = phases
        self.store = store
        self.auto_validate = auto_validate

    async def run_cycle(self, cycle_id: str, req: CycleRequest, progress: Progress | None = None) -> CycleResult:
        state = await self.store.load(cycle_id)

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
        optimize_request = OptimizationRequest(
            program=req.program,
            program_name=req.program_name,
            trainset=req.trainset,
            valset=req.valset,
            input_fields=req.input_fields,
            metric=req.metric,
            metric_field=req.metric_field,
            metric_params=req.metric_params,
            optimizer=req.optimizer,
            params=req.params,
            model=req.model or baseline.model,
            budget=req.budget,
            seed=req.seed,
            allow_fallback=req.allow_fallback,
            no_cache=req.no_cache,
            max_error_rate=req.max_error_rate,
        )
        optimization = OptimizationResult.model_validate(
            await phase("optimize", lambda: self.phases.optimize(optimize_request, f"{cycle_id}-opt"))
        )
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
            await phase("deploy", lambda: self._deploy(cycle_id, req, baseline, optimization, optimized, validation))
        )
        return CycleResult(
            cycle_id=cycle_id,
            program_name=req.program_name,
            create=create,
            baseline=baseline,
            optimization=optimization,
            optimized=optimized,
            validation=validation,
            verdict=verdict,
            phase_runs=dict(state.runs),
            models_used=(used := models_used(baseline, optimization, optimized)),
            mixed_models=len(used) > 1,
        )

    async def _deploy(
        self,
        cycle_id: str,
        req: CycleRequest,
        baseline: EvaluationResult,
        optimization: OptimizationResult,
        optimized: EvaluationResult | None,
        validation: dict[str, Any] | None,
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
            )
        )


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


class KvCycleStore:
    """Cycle states in the ``cycles`` bucket, keyed by cycle id."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def load(self, cycle_id: str) -> CycleState:
        try:
            entry = await self.kv.get(cycle_id)
        except KeyNotFoundError:
            return CycleState(cycle_id=cycle_id)
        return CycleState.model_validate_json(entry.value) if entry.value else CycleState(cycle_id=cycle_id)

    async def save(self, state: CycleState) -> None:
        await self.kv.put(state.cycle_id, state.model_dump_json().encode())


MAX_VALIDATION_CASES = 5000  # the assertion framework's limit per request


class BusPhases:
    """The phases carried out by the phase agents."""

    def __init__(self, agent: Agent, validator_timeout: float = 120.0) -> None:
        self.agent = agent
        self.validator_timeout = validator_timeout

    async def create(self, req: CycleRequest) -> CreateResult:
        from agents.loop.models import CreateRequest

        return await self.agent.client.request(
            "loop-create", "create", CreateRequest(program=req.program), CreateResult, timeout=30
        )

    async def _task(self, kind: str, payload: Any, task_id: str) -> dict[str, Any]:
        await self.agent.client.submit(kind, payload, task_id=task_id)
        record = await self.agent.client.result(task_id, kind=kind)
        if record.status is TaskStatus.SUCCEEDED:
            return dict(record.result or {})
        error = record.error
        message = f"{kind} task {task_id} ended {record.status.value}: {error.message if error else ''}"
        if record.status is TaskStatus.FAILED:
            raise PermanentError(message, code=error.code if error else "permanent")
        raise RetryableError(message)

    async def evaluate(self, req: EvaluateRequest, key: str) -> EvaluationResult:
        return EvaluationResult.model_validate(await self._task("evaluate", req, key))

    async def optimize(self, req: OptimizationRequest, key: str) -> OptimizationResult:
        return OptimizationResult.model_validate(await self._task("optimize", req, key))

    async def validate(self, req: CycleRequest, evaluation: EvaluationResult) -> dict[str, Any] | None:
        cases = [
            {
                "inputs": {
                    k: v for k, v in req.devset[r.index].items() if k in (req.input_fields or req.devset[r.index])
                },
                "outputs": r.outputs,
                "latency_ms": r.latency_ms,
            }
            for r in evaluation.results
            if r.error is None
        ][:MAX_VALIDATION_CASES]
        payload: dict[str, Any] = {
            "cases": cases,
            "output_schema": req.validation.output_schema,
            "invariants": req.validation.invariants,
            "code_fields": req.validation.code_fields,
            "objectives": {"max_latency_p95_ms": req.objectives.max_latency_p95_ms},
        }
        if req.validation.types is not None:
            payload["types"] = req.validation.types
        raw = await self.agent.bus.request_raw(
            self.agent.bus.subjects.endpoint("assertions", "validate"),
            json.dumps(payload).encode(),
            timeout=self.validator_timeout,
        )
        report: dict[str, Any] = json.loads(raw.data)
        return report

    async def deploy(self, req: DeployRequest) -> DeployVerdict:
        return await self.agent.client.request("loop-deploy", "deploy", req, DeployVerdict, timeout=30)


def last_cycle_key(program_name: str) -> str:
    """Key in the ``cycles`` bucket of the program's most recent ``CycleRequest``."""
    return f"last.{program_name}"


class CycleAgent(Agent):
    """The cycle coordinator: replicas share ``cycle`` tasks; a dead one's cycle resumes elsewhere."""

    name = "cycle"
    group = "loop"
    description = "optimization loop coordinator: create, evaluate, optimize, validate, deploy"

    loop: FourPartOptimizationLoop
    states: KeyValue

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self.states = await key_value(self.bus, self.bus.subjects.bucket("cycles"), self.config.stream_layout)
        self.loop = FourPartOptimizationLoop(
            BusPhases(self), KvCycleStore(self.states), auto_validate=self.config.auto_validate
        )
        yield

    @task("cycle")
    async def cycle(self, req: CycleRequest, ctx: TaskContext) -> CycleResult:
        async def progress(phase: str, step: int, total: int) -> None:
            await ctx.progress(phase, step=step, total=total)
            await self.publish_event("cycle.phase", {"cycle_id": ctx.task_id, "program": req.program_name,
                                                     "phase": phase})  # fmt: skip

        create_program(req.program)  # a spec that cannot build fails before anything is spent
        # The program's latest cycle request: what a re-optimization (auto_optimize) runs again.
        await self.states.put(last_cycle_key(req.program_name), req.model_dump_json().encode())
        result = await self.loop.run_cycle(ctx.task_id, req, progress)
        await self.publish_event("cycle.completed", _cycle_event(result))
        return result


def _cycle_event(result: CycleResult) -> dict[str, Any]:
    """What the dashboard records of a finished cycle (the guide's record_cycle_metrics input)."""
    return {
        "cycle_id": result.cycle_id,
        "program": result.program_name,
        "model": result.optimization.model,
        "optimizer": result.optimization.optimizer,
        "baseline_score": result.baseline.score,
        "optimized_score": result.optimized.score if result.optimized else None,
        "improvement": result.optimization.improvement_score,
        "cost": round(result.baseline.cost + result.optimization.cost + (result.optimized.cost if result.optimized
                                                                          else 0.0), 6),
        "latency_p95_ms": result.optimized.latency_p95_ms if result.optimized else None,
        "coverage": min(result.baseline.coverage, result.optimized.coverage if result.optimized else 1.0),
        "mixed_models": result.mixed_models,
        "deployed": result.verdict.deployed,
        "version": result.verdict.version,
        "reasons": result.verdict.reasons,
    }  # fmt: skip
