"""The cycle coordinator (the guide's FourPartOptimizationLoop.run_cycle) for the durable ``cycle`` task.

create → evaluate the baseline → optimize → evaluate the optimized program → validate → deploy (the gate).
The cycle's scores are its two evaluations on the devset, and its improvement is their difference in percentage
points (what the gate, the result and the ``cycle.completed`` event use); the optimizer's own scores, on its
validation set, stay in the optimization's result.
Each finished phase's output is written to the ``cycles`` bucket before the next phase starts, so a coordinator
that dies mid-cycle is replaced (JetStream redelivers the task) and the cycle resumes at the phase it reached.
Phases that run elsewhere are durable tasks with ids derived from the cycle id, so a resumed phase attaches to
the run already under way instead of paying for it twice.

Data named by dataset reference is pinned to versions when the cycle starts, and the pins are kept in its state,
so a resumed cycle runs on the same versions; the phases get the references, never the rows. An evaluation comes
back as a summary whose per-example results, when many, are in the results object store: the state stays small.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

from nats.errors import MaxPayloadError
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from dspyrt.agents.loop.create import create_program
from dspyrt.agents.loop.evaluation import answered_results
from dspyrt.agents.loop.models import (
    EXAMPLE_FIELDS,
    PHASES,
    CreateResult,
    CycleCompleted,
    CyclePhase,
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
from dspyrt.agents.optimizers.core import program_inputs
from dspyrt.agents.optimizers.models import OptimizationRequest, OptimizationResult, improvement_points
from dspyrt.agents.programs import build_program
from dspyrt.agents.scoring import ExampleResult
from dspyrt.bus import PayloadTooLargeError
from dspyrt.bus.claims import ClaimStore
from dspyrt.bus.streams import key_value
from dspyrt.runtime.agent import Agent, TaskContext, task
from dspyrt.runtime.children import submit_child_and_wait
from dspyrt.runtime.config import IntegrationMode
from dspyrt.runtime.datasets import DatasetNotFoundError, DatasetRef, DatasetStore, references_in


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
            request = OptimizationRequest(
                program=req.program,
                program_name=req.program_name,
                trainset=await self.trainset(req, feedback or []),
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


# Room a KV record leaves under the server's max payload for its subject and headers.
STATE_HEADROOM = 4096


class KvCycleStore:
    """Cycle states in the ``cycles`` bucket, keyed by cycle id. A state over ``max_bytes`` fails the cycle with
    ``payload_too_large`` naming it (saving it again would fail again), not with an internal error."""

    def __init__(self, kv: KeyValue, max_bytes: int) -> None:
        self.kv = kv
        self.max_bytes = max_bytes

    async def load(self, cycle_id: str) -> CycleState:
        try:
            entry = await self.kv.get(cycle_id)
        except KeyNotFoundError:
            return CycleState(cycle_id=cycle_id)
        return CycleState.model_validate_json(entry.value) if entry.value else CycleState(cycle_id=cycle_id)

    async def save(self, state: CycleState) -> None:
        data = state.model_dump_json().encode()
        what = f"the state of cycle {state.cycle_id}"
        if len(data) > self.max_bytes:
            raise PayloadTooLargeError(len(data), self.max_bytes, what)
        try:
            await self.kv.put(state.cycle_id, data)
        except MaxPayloadError as exc:
            raise PayloadTooLargeError(len(data), self.max_bytes, what) from exc


MAX_VALIDATION_CASES = 5000  # the assertion framework's limit per request
# Room the validate request keeps under the server's max payload beside its cases.
VALIDATION_HEADROOM = 16 * 1024


class DevsetRows:
    """A pinned devset's rows by index: inline, or read from its dataset versions a chunk at a time (only the
    chunk in use is held). What the validate phase pairs with the results it checks."""

    CHUNK = 500

    def __init__(self, devset: Any, datasets: DatasetStore) -> None:
        self.devset = devset
        self.refs = references_in(devset)
        self.datasets = datasets
        self._parts: list[tuple[int, int, DatasetRef]] = []  # (index of its first row, rows, version)
        self._first = 0
        self._rows: list[dict[str, Any]] = []

    async def row(self, index: int) -> dict[str, Any]:
        if not self.refs:
            inline: dict[str, Any] = self.devset[index]
            return inline
        if not self._first <= index < self._first + len(self._rows):
            await self._load(index)
        return self._rows[index - self._first]

    async def _load(self, index: int) -> None:
        if not self._parts:
            base = 0
            for ref in self.refs:
                rows = (await self.datasets.manifest(ref)).rows
                self._parts.append((base, rows, ref))
                base += rows
        for base, rows, ref in self._parts:
            if base <= index < base + rows:
                start = index - base
                self._rows = await self.datasets.rows(ref, start, min(start + self.CHUNK, rows))
                self._first = index
                return
        raise IndexError(f"example {index} is not in the devset")


class BusPhases:
    """The phases carried out by the phase agents."""

    def __init__(self, agent: Agent, datasets: DatasetStore, validator_timeout: float = 120.0) -> None:
        self.agent = agent
        self.datasets = datasets
        self.validator_timeout = validator_timeout
        self._claims: ClaimStore | None = None

    async def claims(self) -> ClaimStore:
        """The results object store, opened when a first evaluation's results are there."""
        if self._claims is None:
            self._claims = await ClaimStore.open(self.agent.bus, self.agent.config.stream_layout)
        return self._claims

    async def create(self, req: CycleRequest) -> CreateResult:
        from dspyrt.agents.loop.models import CreateRequest

        return await self.agent.client.request(
            "loop-create", "create", CreateRequest(program=req.program), CreateResult, timeout=30
        )

    # A phase task that failed fails the cycle; one that died (out of attempts) has the cycle delivered again.
    async def evaluate(self, req: EvaluateRequest, key: str) -> EvaluationResult:
        return await submit_child_and_wait(
            self.agent.client, "evaluate", req, EvaluationResult, task_id=key, on_failure="fail", on_dead="retry"
        )

    async def optimize(self, req: OptimizationRequest, key: str) -> OptimizationResult:
        return await submit_child_and_wait(
            self.agent.client, "optimize", req, OptimizationResult, task_id=key, on_failure="fail", on_dead="retry"
        )

    async def validate(self, req: CycleRequest, evaluation: EvaluationResult) -> dict[str, Any] | None:
        payload: dict[str, Any] = {
            "cases": [],
            "output_schema": req.validation.output_schema,
            "invariants": req.validation.invariants,
            "code_fields": req.validation.code_fields,
            "objectives": {"max_latency_p95_ms": req.objectives.max_latency_p95_ms},
        }
        if req.validation.types is not None:
            payload["types"] = req.validation.types
        budget = self.agent.bus.max_payload - len(json.dumps(payload).encode()) - VALIDATION_HEADROOM
        payload["cases"] = await self._cases(req, evaluation, budget)
        raw = await self.agent.bus.request_raw(
            self.agent.bus.subjects.endpoint("assertions", "validate"),
            json.dumps(payload).encode(),
            timeout=self.validator_timeout,
        )
        report: dict[str, Any] = json.loads(raw.data)
        return report

    async def _cases(self, req: CycleRequest, evaluation: EvaluationResult, budget: int) -> list[dict[str, Any]]:
        """The first answered examples (up to MAX_VALIDATION_CASES, and as many as fit in ``budget`` bytes) with
        their inputs: only the results and the rows these need are read."""
        answered: list[ExampleResult]
        if evaluation.results_ref is not None:
            answered = await answered_results(await self.claims(), evaluation.results_ref, MAX_VALIDATION_CASES)
        else:
            answered = [r for r in evaluation.results if r.error is None][:MAX_VALIDATION_CASES]
        rows = DevsetRows(req.devset, self.datasets)
        inputs = req.input_fields or program_inputs(build_program(req.program)).names  # not the rows' labels
        cases: list[dict[str, Any]] = []
        size = 0
        for result in answered:
            row = await rows.row(result.index)
            case = {
                "inputs": {k: v for k, v in row.items() if k in inputs},
                "outputs": result.outputs,
                "latency_ms": result.latency_ms,
            }
            size += len(json.dumps(case).encode()) + 2
            if size > budget:  # the validators check what fits in one request
                break
            cases.append(case)
        return cases

    async def deploy(self, req: DeployRequest) -> DeployVerdict:
        return await self.agent.client.request("loop-deploy", "deploy", req, DeployVerdict, timeout=30)


def last_cycle_key(program_name: str) -> str:
    """Key in the ``cycles`` bucket of the program's most recent ``CycleRequest``."""
    return f"last.{program_name}"


class CycleAgent(Agent):
    """The cycle coordinator: replicas share ``cycle`` tasks; a dead one's cycle resumes elsewhere."""

    name = "cycle"
    group = "loop"
    modes = frozenset({IntegrationMode.FULL, IntegrationMode.OPTIMIZATION_ONLY})
    description = "optimization loop coordinator: create, evaluate, optimize, validate, deploy"
    publishes = (CyclePhase, CycleCompleted)

    loop: FourPartOptimizationLoop
    states: KeyValue

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        layout = self.config.stream_layout
        self.states = await key_value(self.bus, self.bus.subjects.bucket("cycles"), layout)
        datasets = await DatasetStore.open(self.bus, layout)
        self.loop = FourPartOptimizationLoop(
            BusPhases(self, datasets),
            KvCycleStore(self.states, self.bus.max_payload - STATE_HEADROOM),
            datasets,
            auto_validate=self.config.auto_validate,
        )
        yield

    @task("cycle")
    async def cycle(self, req: CycleRequest, ctx: TaskContext) -> CycleResult:
        async def progress(phase: str, step: int, total: int) -> None:
            await ctx.progress(phase, step=step, total=total)
            await self.publish_event(
                CyclePhase.topic, CyclePhase(cycle_id=ctx.task_id, program=req.program_name, phase=phase)
            )

        create_program(req.program)  # a spec that cannot build fails before anything is spent
        # The program's latest cycle request as it was sent (the cycle pins its data in its own state): what a
        # re-optimization (auto_optimize) runs again.
        await self.states.put(last_cycle_key(req.program_name), req.model_dump_json().encode())
        result = await self.loop.run_cycle(ctx.task_id, req, progress)
        await self.publish_event(CycleCompleted.topic, CycleCompleted.of(result))
        return result

