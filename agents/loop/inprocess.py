"""The loop's phases in this process, with no bus: what ``FourPartOptimizationLoop()`` runs by default.

create (``create_program``) → evaluate (``evaluate_examples``, merged as the distributed evaluation merges its
shards) → optimize (``DSPyOptimizerManager.optimize_program``, the optimizer agent's own routine) → validate
(``DSPyAssertionFramework``, given the live optimized module) → deploy (the gate of ``dspyrt.agents.loop.gate``
into an in-memory :class:`MemoryDeployRegistry`). Every LM call goes to the configured ``dspy.LM`` (``lm``, else
``dspy.settings.lm`` when the cycle starts) and is counted.

Programs are specs, as on the bus, or live: a ``dspy.Module`` class (the guide's ``module_class``) or instance,
registered with the phases under a name (:meth:`InProcessPhases.add_program`) and named in the request as
``{"registered": name}``. Optimized states are kept in memory (an ``ArtifactRef`` with ``store="memory"``); data
is inline rows (a dataset reference needs the bus's dataset store). :func:`cycle_request` reads the guide's
``run_cycle`` dict.
"""

from __future__ import annotations

import copy
import json
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import anyio.to_thread
import dspy

from dspyrt.agents.assertions.core import DSPyAssertionFramework
from dspyrt.agents.assertions.models import ValidationRequest
from dspyrt.agents.deployments import DeployedVersion, ProgramPointer
from dspyrt.agents.lm.bus_engine import UsageMeter
from dspyrt.agents.loop.create import create_program
from dspyrt.agents.loop.evaluation import EvaluationAccumulator, to_examples
from dspyrt.agents.loop.gate import check_objectives
from dspyrt.agents.loop.models import (
    CreateResult,
    CycleRequest,
    CycleState,
    DeployRequest,
    DeployVerdict,
    EvaluateRequest,
    EvaluationResult,
    Objectives,
    ProgramRef,
    ShardResult,
)
from dspyrt.agents.metrics import Metric
from dspyrt.agents.optimizers.core import DSPyOptimizerManager, program_inputs
from dspyrt.agents.optimizers.metering import configured_lm, metered_lm
from dspyrt.agents.optimizers.models import ArtifactRef, OptimizationRequest, OptimizationResult, state_sha256
from dspyrt.agents.programs import HasForward, ProgramSpec, build_program, load_program_state, program_hash
from dspyrt.agents.scoring import evaluate_examples
from dspyrt.bus import ConfigurationError, MessageValidationError, NotFoundError
from dspyrt.runtime.datasets import DatasetNotFoundError, DatasetRef

MEMORY_STORE = "memory"
MAX_VALIDATION_CASES = 5000  # as the bus's validate phase


class MemoryCycleStore:
    """Cycle states in a dict (a copy is kept, so a caller's later changes do not leak in)."""

    def __init__(self) -> None:
        self.states: dict[str, CycleState] = {}

    async def load(self, cycle_id: str) -> CycleState:
        state = self.states.get(cycle_id)
        return state.model_copy(deep=True) if state is not None else CycleState(cycle_id=cycle_id)

    async def save(self, state: CycleState) -> None:
        self.states[state.cycle_id] = state.model_copy(deep=True)


class InlineDatasets:
    """The loop's datasets with no dataset store: rows inline only; a reference is refused with the reason."""

    async def pin(self, value: Any) -> Any:
        raise MessageValidationError(
            f"{value} names datasets: the in-process loop takes rows (lists of dicts or dspy.Examples); "
            "datasets live in the bus's dataset store"
        )

    async def resolve(self, ref: DatasetRef | str) -> DatasetRef:
        raise DatasetNotFoundError(f"{ref}: the in-process loop has no dataset store")

    async def rows(self, ref: DatasetRef | str, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        raise DatasetNotFoundError(f"{ref}: the in-process loop has no dataset store")


class MemoryDeployRegistry:
    """Deployed versions in memory, behind the same gate as the deploy agent: a candidate that meets every
    objective becomes the program's next active version (idempotent per cycle; one identical to the active
    version is ``unchanged``); one that does not is rejected with every reason. :meth:`program` is the deployed
    ``dspy.Module``."""

    def __init__(self) -> None:
        self.versions: dict[str, list[DeployedVersion]] = {}
        self.pointers: dict[str, ProgramPointer] = {}
        self.modules: dict[tuple[str, int], Any] = {}

    def deploy(self, req: DeployRequest, module: Any) -> DeployVerdict:
        name = req.program_name
        for existing in self.versions.get(name, []):
            if req.cycle_id and existing.cycle_id == req.cycle_id:
                return DeployVerdict(deployed=True, program_name=name, version=existing.version)
        checks, reasons = check_objectives(req)
        if reasons:
            return DeployVerdict(deployed=False, program_name=name, reasons=reasons, checks=checks)
        spec_hash = program_hash(req.program)
        pointer = self.pointers.get(name)
        active = pointer.active if pointer is not None else None
        if active is not None and active.same_program(req.artifact.state_sha256, spec_hash, req.model):
            note = f"unchanged: already deployed as v{active.version}: the same program, optimized state and model"
            return DeployVerdict(deployed=True, unchanged=True, program_name=name, version=active.version,
                                 note=note, checks=checks)  # fmt: skip
        version = len(self.versions.get(name, [])) + 1
        deployed = req.deployed_version(version, spec_hash)
        self.versions.setdefault(name, []).append(deployed)
        self.pointers[name] = ProgramPointer(program=name, active=deployed)
        self.modules[(name, version)] = module
        return DeployVerdict(deployed=True, program_name=name, version=version, checks=checks)

    def program(self, name: str, version: int | None = None) -> Any:
        """The deployed module of ``name`` (its active version, or ``version``): a copy to call."""
        pointer = self.pointers.get(name)
        if pointer is None or pointer.active is None:
            raise NotFoundError(f"program {name} is not deployed")
        chosen = version if version is not None else pointer.active.version
        module = self.modules.get((name, chosen))
        if module is None:
            raise NotFoundError(f"program {name} has no version {chosen}")
        return copy.deepcopy(module)


class InProcessPhases:
    """The loop's phases in this process (see the module's docstring)."""

    def __init__(
        self,
        *,
        manager: DSPyOptimizerManager | None = None,
        framework: DSPyAssertionFramework | None = None,
        registry: MemoryDeployRegistry | None = None,
        lm: Any = None,
    ) -> None:
        self.manager = manager if manager is not None else DSPyOptimizerManager()
        self.framework = framework if framework is not None else DSPyAssertionFramework()
        self.registry = registry if registry is not None else MemoryDeployRegistry()
        self.lm = lm
        self.programs: dict[str, Callable[[], Any]] = {}
        self.metrics: dict[str, Metric] = {}
        self.states: dict[str, dict[str, Any]] = {}

    # --- live programs and metrics --------------------------------------------------------------------

    def add_program(self, name: str, program: Any) -> ProgramSpec:
        """Make a live program available as ``{"registered": name}``: a class (or factory) called with no
        arguments, or an instance (copied for each build). Returns its spec."""
        if isinstance(program, type) or not isinstance(program, HasForward):
            if not callable(program) or not callable(getattr(program, "forward", None)):
                raise ConfigurationError(f"{_label(program)} is not a program: it needs a forward method")
            self.programs[name] = program
        else:
            instance = program
            self.programs[name] = lambda: copy.deepcopy(instance)
        return ProgramSpec(registered=name)

    def add_metric(self, name: str, metric: Metric) -> str:
        """Make a callable metric ``(example, prediction, trace=None)`` available by ``name``."""
        self.metrics[name] = metric
        return name

    def build(self, spec: ProgramSpec, state: Mapping[str, Any] | None = None) -> Any:
        """A fresh program for ``spec`` (a live one by its name, else built from the spec), with ``state``."""
        factory = self.programs.get(spec.registered or "")
        if factory is None:
            return load_program_state(spec, state) if state is not None else build_program(spec)
        program = factory()
        if not isinstance(program, dspy.Module):
            raise ConfigurationError(f"program {spec.registered!r} is a {_label(program)}, not a dspy.Module")
        if state is not None:
            program.load_state(copy.deepcopy(dict(state)))
        return program

    def metric(self, name: str, field: str | None, params: Mapping[str, Any]) -> Metric:
        found = self.metrics.get(name)
        return found if found is not None else self.manager.metrics.get(name, field, **params)

    # --- the phases -----------------------------------------------------------------------------------

    async def create(self, req: CycleRequest) -> CreateResult:
        if req.program.registered not in self.programs:
            return create_program(req.program)[1]
        program = self.build(req.program)
        outputs: list[str] = []
        for _, predictor in program.named_predictors():
            outputs += [n for n in predictor.signature.output_fields if n not in outputs]
        return CreateResult(
            program_hash=program_hash(req.program),
            module=type(program).__name__,
            predictors=[name for name, _ in program.named_predictors()],
            input_fields=program_inputs(program).names,
            output_fields=outputs,
        )

    async def evaluate(self, req: EvaluateRequest, key: str) -> EvaluationResult:
        started = time.perf_counter()
        program = self.program_of(req.program)
        inputs = req.input_fields or program_inputs(program).names
        rows: list[dict[str, Any]] = req.devset  # type: ignore[assignment]  # inline: references were refused
        examples = to_examples(rows, inputs, req.metric_field)
        metric = self.metric(req.metric, req.metric_field, req.metric_params)
        base_lm = self._lm()
        meter = UsageMeter()
        lm = metered_lm(base_lm, meter)
        results = await anyio.to_thread.run_sync(
            evaluate_examples, program, examples, 0, metric, lm, req.num_threads, abandon_on_cancel=True
        )
        shard = ShardResult(offset=0, results=results, lm_calls=meter.calls, cached_calls=meter.cached_calls,
                            provider_requests=meter.provider_requests, models_used=dict(meter.models),
                            input_tokens=meter.input_tokens, output_tokens=meter.output_tokens,
                            cost=round(meter.cost, 6), worker="in-process")  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="eval-") as tmp:
            # The bus's merge, so both count alike (scores, coverage, the error-rate limit, percentiles).
            with EvaluationAccumulator(len(examples), Path(tmp) / "results.jsonl") as accumulator:
                accumulator.add(0, shard)
                result = accumulator.summary(model=str(base_lm.model), duration_s=time.perf_counter() - started,
                                             max_error_rate=req.max_error_rate)  # fmt: skip
        result.results = results
        return result

    async def optimize(self, req: OptimizationRequest, key: str) -> OptimizationResult:
        student = self.build(req.program)
        metric: Metric | str = self.metrics.get(req.metric) or req.metric
        base_lm = self._lm()

        def run() -> OptimizationResult:
            return self.manager.optimize_program(
                student,
                req.trainset,  # type: ignore[arg-type]  # inline rows
                metric,
                optimizer=req.optimizer,
                params=req.params,
                valset=req.valset,  # type: ignore[arg-type]
                input_fields=req.input_fields,
                metric_field=req.metric_field,
                metric_params=req.metric_params,
                program_name=req.program_name,
                seed=req.seed,
                num_threads=req.num_threads,
                val_fraction=req.val_fraction,
                budget=req.budget,
                max_error_rate=req.max_error_rate,
                lm=base_lm,
            )

        result = await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
        result.program_hash = program_hash(req.program)
        if result.program is not None:
            state = result.program.dump_state()
            name = f"{result.program_name}/{key}.json"
            self.states[name] = state
            size = len(json.dumps(state, default=str).encode())
            digest = state_sha256(state)
            result.artifact = ArtifactRef(store=MEMORY_STORE, name=name, version="1", sha256=digest, size=size,
                                          state_sha256=digest)  # fmt: skip
        return result

    async def validate(self, req: CycleRequest, evaluation: EvaluationResult) -> dict[str, Any] | None:
        # The evaluation that called this is the optimized program's: its module is the latest state stored.
        module = self._latest_module(req)
        rows: list[dict[str, Any]] = req.devset  # type: ignore[assignment]
        inputs = req.input_fields or program_inputs(module).names
        cases = [
            {"inputs": {k: v for k, v in rows[r.index].items() if k in inputs}, "outputs": r.outputs,
             "latency_ms": r.latency_ms}
            for r in evaluation.results
            if r.error is None
        ][:MAX_VALIDATION_CASES]  # fmt: skip
        if not cases:
            return None
        payload = {**req.validation_fields(), "cases": cases}
        report = await self.framework.validate(ValidationRequest.model_validate(payload), module=module)
        dumped: dict[str, Any] = report.model_dump(mode="json")
        return dumped

    async def deploy(self, req: DeployRequest) -> DeployVerdict:
        return self.registry.deploy(req, self.program_of(ProgramRef(spec=req.program, artifact=req.artifact)))

    # --- helpers --------------------------------------------------------------------------------------

    def program_of(self, ref: ProgramRef) -> Any:
        """The module a reference names: its spec with its state (inline, or kept here by the optimize phase)."""
        state = ref.state
        if state is None and ref.artifact is not None:
            if ref.artifact.store != MEMORY_STORE or ref.artifact.name not in self.states:
                raise NotFoundError(f"artifact {ref.artifact.name} is not in this process")
            state = self.states[ref.artifact.name]
        return self.build(ref.spec, state)

    def _latest_module(self, req: CycleRequest) -> Any:
        prefix = f"{req.program_name}/"
        names = [n for n in self.states if n.startswith(prefix)]
        return self.build(req.program, self.states[names[-1]] if names else None)

    def _lm(self) -> Any:
        return self.lm if self.lm is not None else configured_lm()


# The guide's run_cycle keys, beside CycleRequest's own fields.
GUIDE_KEYS = ("module_class", "test_data", "optimization_objectives")
_NAME = re.compile(r"[^A-Za-z0-9_-]+")


def cycle_request(data: Mapping[str, Any], phases: InProcessPhases | None) -> CycleRequest:
    """A :class:`CycleRequest` from the guide's ``run_cycle`` dict or a request's own fields.

    * ``module_class`` (or ``program``): a live ``dspy.Module`` class or instance (in-process phases only, which
      it is registered with), or a program spec (a ``ProgramSpec``, its dict, or a signature string);
    * ``test_data``: the examples (``dspy.Example``s or dicts): without ``trainset`` and ``devset`` a third
      (at least one) is held out as the devset (shuffled with ``seed``), the rest is the trainset;
    * ``optimization_objectives``: the deploy gate's :class:`Objectives` (a dict of its fields);
    * ``metric``: a name, or (in-process) a callable ``(example, prediction, trace=None)``;
    * ``program_name``: default the class's name; every other key is a ``CycleRequest`` field."""
    fields = dict(data)
    program = fields.pop("module_class", None)
    if program is not None and "program" in fields:
        raise MessageValidationError("give module_class or program, not both")
    program = fields.pop("program", program)
    if program is None:
        raise MessageValidationError("the cycle needs a program: module_class (or program)")
    live = isinstance(program, type | HasForward)  # a class, or an instance with forward
    name = fields.get("program_name") or _program_name(program)
    fields["program_name"] = name
    if live:
        if phases is None:
            raise ConfigurationError("a live program runs in-process only: on the bus, give a program spec")
        fields["program"] = phases.add_program(name, program)
    else:
        fields["program"] = {"signature": program} if isinstance(program, str) else program
    metric = fields.get("metric")
    if callable(metric):
        if phases is None:
            raise ConfigurationError("a callable metric runs in-process only: on the bus, name a metric")
        fields["metric"] = phases.add_metric(str(getattr(metric, "__name__", "metric")), metric)
    objectives = fields.pop("optimization_objectives", None)
    if objectives is not None:
        if "objectives" in fields:
            raise MessageValidationError("give optimization_objectives or objectives, not both")
        fields["objectives"] = Objectives.model_validate(objectives)
    test_data = fields.pop("test_data", None)
    input_keys: list[str] | None = None
    for key in ("trainset", "valset", "devset"):
        if isinstance(fields.get(key), list):
            fields[key], input_keys = _rows(fields[key], input_keys)
    if test_data is not None:
        rows, input_keys = _rows(list(test_data), input_keys)
        if "trainset" in fields and "devset" in fields:
            raise MessageValidationError("test_data is split into trainset and devset: give it or both of those")
        if "trainset" not in fields and "devset" not in fields:
            fields["trainset"], fields["devset"] = _hold_out(rows, int(fields.get("seed", 0)))
        else:
            fields["devset" if "trainset" in fields else "trainset"] = rows
    if input_keys and not fields.get("input_fields"):
        fields["input_fields"] = input_keys
    return CycleRequest.model_validate(fields)


def _rows(examples: Iterable[Any], input_keys: list[str] | None) -> tuple[list[dict[str, Any]], list[str] | None]:
    """Plain rows of ``examples``, and the input keys their ``dspy.Example``s declare (the first seen)."""
    rows: list[dict[str, Any]] = []
    for example in examples:
        if isinstance(example, dspy.Example):
            if input_keys is None:
                try:
                    input_keys = list(example.inputs().keys())
                except ValueError:  # no input keys set
                    pass
            rows.append(example.toDict())
        else:
            rows.append(dict(example))
    return rows, input_keys


def _hold_out(rows: list[dict[str, Any]], seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if len(rows) < 2:
        raise MessageValidationError("test_data needs at least 2 examples (a trainset and a devset)")
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    n_dev = min(len(rows) - 1, max(1, round(len(rows) / 3)))
    return shuffled[n_dev:], shuffled[:n_dev]


def _program_name(program: Any) -> str:
    label = program.__name__ if isinstance(program, type) else type(program).__name__
    if not isinstance(program, type) and not isinstance(program, HasForward):
        label = "program"
    return (_NAME.sub("-", label).strip("-") or "program")[:64]


def _label(obj: Any) -> str:
    return obj.__name__ if isinstance(obj, type) else type(obj).__name__
