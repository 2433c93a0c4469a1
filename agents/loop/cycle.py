"""The ``cycle`` task: the guide's FourPartOptimizationLoop (``dspyrt.agents.loop.core``) on the bus.

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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from nats.errors import MaxPayloadError
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from dspyrt.agents.loop.core import (
    FourPartOptimizationLoop,
)
from dspyrt.agents.loop.create import create_program
from dspyrt.agents.loop.evaluation import answered_results
from dspyrt.agents.loop.models import (
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
)
from dspyrt.agents.optimizers.core import program_inputs
from dspyrt.agents.optimizers.models import OptimizationRequest, OptimizationResult
from dspyrt.agents.programs import build_program
from dspyrt.agents.scoring import ExampleResult
from dspyrt.bus import PayloadTooLargeError
from dspyrt.bus.claims import ClaimStore
from dspyrt.bus.streams import key_value
from dspyrt.runtime.agent import Agent, TaskContext, task
from dspyrt.runtime.children import submit_child_and_wait
from dspyrt.runtime.config import IntegrationMode
from dspyrt.runtime.datasets import DatasetRef, DatasetStore, references_in

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
        payload = req.validation_fields()
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
        result = await self.loop.arun_cycle(req, ctx.task_id, progress)
        await self.publish_event(CycleCompleted.topic, CycleCompleted.of(result))
        return result

