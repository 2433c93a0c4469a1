"""The guide's ``DSPyOptimizerManager`` in plain Python: the registry of optimizers (one active), their statistics,
and the optimization run. ``dspyrt.agents.optimizers.agent`` puts it on the bus as the durable ``optimize`` task;
its messages (``OptimizationRequest``, ``OptimizationResult``) live in ``dspyrt.agents.optimizers.models``.

The built-in optimizers are DSPy's own (``dspyrt.agents.optimizers.builtin``: ``LabeledFewShotOptimizer`` ... GEPA);
third-party ones come from the entry-point group ``dspyrt.optimizers``. Parameters are validated per optimizer
(unknown or mistyped ones are errors, never passed through blindly).

A run is synchronous (DSPy optimizers are) and is meant for a worker thread: build the program from its spec,
split the data, score the baseline with ``dspy.Evaluate``, compile, score the result, dump the state.
"""

from __future__ import annotations

import inspect
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback

from dspyrt.agents.lm.bus_engine import BudgetExhaustedError, UsageMeter, program_context
from dspyrt.agents.metrics import Metric, MetricRegistry
from dspyrt.agents.optimizers.builtin import BUILTIN_OPTIMIZERS
from dspyrt.agents.optimizers.models import OptimizationRequest, OptimizationResult, improvement_points
from dspyrt.agents.optimizers.protocol import CompileContext, Optimizer, OptimizerFactory
from dspyrt.agents.programs import ProgramSpec, build_program, dump_program_state, program_hash
from dspyrt.agents.scoring import Score, check_error_rate, evaluate_examples, summarize
from dspyrt.bus import ConfigurationError, FieldError, MessageValidationError, NotFoundError, RemoteError
from dspyrt.bus.messages import MAX_FIELD_ERRORS, clip
from dspyrt.runtime.datasets import references_in
from dspyrt.runtime.plugins import EntryPointRegistry

ENTRY_POINT_GROUP = "dspyrt.optimizers"
DEFAULT_OPTIMIZER = "labeled_fewshot"

# ---------------------------------------------------------------------------------------- manager


@dataclass
class OptimizerStats:
    runs: int = 0
    successes: int = 0
    failures: int = 0
    improvement_total: float = 0.0
    duration_total: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "successes": self.successes,
            "failures": self.failures,
            "mean_improvement": round(self.improvement_total / self.successes, 6) if self.successes else None,
            "mean_duration_s": round(self.duration_total / self.runs, 3) if self.runs else None,
        }


Progress = Callable[[str, dict[str, Any]], None]


class ProgressCallback(BaseCallback):  # type: ignore[misc]
    """Turns DSPy's own callbacks into progress reports: LM calls, evaluations, best score so far (on the
    validation set: ``scored_on``).

    Reports are throttled (``every`` seconds) so a fast optimizer does not flood the bus.
    """

    def __init__(self, report: Progress, meter: UsageMeter, every: float = 0.5) -> None:
        self.report = report
        self.meter = meter
        self.every = every
        self.phase = "starting"
        self.evaluations = 0
        self.best_score: float | None = None
        self._last = 0.0
        self._lock = threading.Lock()

    def set_phase(self, phase: str, **data: Any) -> None:
        self.phase = phase
        self._emit(force=True, **data)

    def _emit(self, force: bool = False, **data: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last < self.every:
                return
            self._last = now
        self.report(
            self.phase,
            {
                "evaluations": self.evaluations,
                "lm_calls": self.meter.calls,
                "best_score": self.best_score,
                "scored_on": "valset",
                **data,
            },
        )

    def on_evaluate_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        score = getattr(outputs, "score", None)
        with self._lock:
            self.evaluations += 1
            if isinstance(score, int | float) and (self.best_score is None or score > self.best_score):
                self.best_score = float(score)
        self._emit()

    def on_lm_end(self, call_id: str, outputs: Any | None, exception: Exception | None = None) -> None:
        self._emit()


@dataclass
class RunOutcome:
    result: OptimizationResult
    state: dict[str, Any] | None
    program_spec: ProgramSpec


@dataclass
class DSPyOptimizerManager:
    """Registry of optimizers (one active), their statistics, and the optimization run itself."""

    metrics: MetricRegistry = field(default_factory=MetricRegistry.installed)
    optimizers: dict[str, OptimizerFactory] = field(default_factory=lambda: dict(BUILTIN_OPTIMIZERS))
    active: str = DEFAULT_OPTIMIZER
    stats: dict[str, OptimizerStats] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        installed = EntryPointRegistry(ENTRY_POINT_GROUP, "optimizer", _optimizer_factory)
        for name in installed.names():
            if name not in self.optimizers:  # a built-in keeps its name
                self.optimizers[name] = installed.get(name)

    def register_optimizer(self, name: str, factory: OptimizerFactory) -> None:
        """Add an optimizer (the guide's ``register_optimizer``); ``factory(params)`` makes one run's optimizer."""
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigurationError(f"optimizer name {name!r} must be letters, digits, '_' or '-'")
        self.optimizers[name] = factory

    def set_active_optimizer(self, name: str) -> None:
        self._factory(name)
        self.active = name

    def list_optimizers(self) -> list[str]:
        return sorted(self.optimizers)

    def get_stats(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: self.stats.get(name, OptimizerStats()).as_dict() for name in self.list_optimizers()}

    def _factory(self, name: str) -> OptimizerFactory:
        try:
            return self.optimizers[name]
        except KeyError:
            raise NotFoundError(f"unknown optimizer {name!r}; known: {', '.join(self.list_optimizers())}") from None

    def prepare(self, request: OptimizationRequest) -> tuple[Optimizer, Metric]:
        """Check everything that can be checked before spending anything: optimizer, parameters, metric."""
        name = request.optimizer or self.active
        optimizer = self._factory(name)(request.params)
        metric = self.metrics.get(request.metric, request.metric_field, **request.metric_params)
        return optimizer, metric

    def run(
        self, request: OptimizationRequest, lm: Any, meter: UsageMeter, progress: Progress, model: str
    ) -> RunOutcome:
        """The optimization itself (blocking; run it in a worker thread)."""
        name = request.optimizer or self.active
        optimizer, metric = self.prepare(request)
        started = time.perf_counter()
        spec = request.program
        student = build_program(spec)
        inputs = request.input_fields or program_inputs(student).names
        if not inputs:
            raise MessageValidationError("the program declares no input fields; give input_fields")
        trainset, valset = _split(request, inputs)
        result = OptimizationResult(
            program_name=request.program_name or f"program-{program_hash(spec)[:12]}",
            program_hash=program_hash(spec),
            optimizer=name,
            params=request.params,
            model=model,
            metric=request.metric,
            trainset_size=len(trainset),
            valset_size=len(valset),
            seed=request.seed,
        )
        state: dict[str, Any] | None = None
        with self._lock:
            self.stats.setdefault(name, OptimizerStats()).runs += 1
        feed = ProgressCallback(progress, meter)
        try:
            with program_context(lm, callbacks=[feed]):
                feed.set_phase("baseline", step=0, total=3)
                baseline = _score(student, valset, metric, request.num_threads, meter, lm)
                result.baseline_score, result.baseline_coverage = baseline.score, baseline.coverage
                feed.set_phase("optimizing", step=1, total=3, baseline_score=result.baseline_score)
                optimized = optimizer.compile(
                    CompileContext(student, trainset, valset, metric, request.seed, request.num_threads, lm)
                )
                _check_run(meter)
                feed.set_phase("evaluating", step=2, total=3, baseline_score=result.baseline_score)
                final = _score(optimized, valset, metric, request.num_threads, meter, lm)
                result.optimized_score, result.optimized_coverage = final.score, final.coverage
                result.improvement_score = improvement_points(baseline.score, final.score)
                # DSPy's optimizers score a failed call as a wrong answer inside compile(): past the limit, the
                # choice between candidates measured provider luck, so there is no result to trust.
                check_error_rate(meter.failed_calls, meter.calls, request.max_error_rate, model=model,
                                 what="optimization")  # fmt: skip
                state = dump_program_state(optimized)
                feed.best_score = max(feed.best_score or 0.0, result.optimized_score or 0.0)
                feed.set_phase("done", step=3, total=3)
        except Exception as exc:
            if meter.fatal is not None:
                # The provider refused: that is the reason, whatever DSPy's thread pools made of it.
                with self._lock:
                    self.stats[name].failures += 1
                raise RemoteError(meter.fatal.to_body()) from None
            if meter.exhausted is None and not isinstance(exc, BudgetExhaustedError):
                with self._lock:
                    self.stats[name].failures += 1
                raise
            result.status = "budget_exhausted"
            result.stopped_reason = meter.exhausted or str(exc)
        finally:
            result.lm_calls = meter.calls
            result.cached_calls = meter.cached_calls
            result.failed_calls = meter.failed_calls
            result.provider_requests = meter.provider_requests
            result.models_used = dict(meter.models)
            result.mixed_models = len(meter.models) > 1
            result.input_tokens = meter.input_tokens
            result.output_tokens = meter.output_tokens
            result.cost = round(meter.cost, 6)
            result.duration_s = round(time.perf_counter() - started, 3)
            with self._lock:
                self.stats[name].duration_total += result.duration_s
        with self._lock:
            if result.status == "completed":
                self.stats[name].successes += 1
                self.stats[name].improvement_total += result.improvement_score or 0.0
            else:
                self.stats[name].failures += 1
        return RunOutcome(result, state, spec)


def _optimizer_factory(loaded: Any) -> OptimizerFactory:
    if not callable(loaded):
        raise TypeError("is not an optimizer factory: a callable taking the run's params")
    factory: OptimizerFactory = loaded
    return factory


@dataclass(frozen=True)
class ProgramInputs:
    """What a program takes as input: every input field of its predictors, unless its ``forward`` names its
    parameters, which then say what is required and what has a default."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        """Every input, required ones first: what an example row of the program carries."""
        return [*self.required, *self.optional]

    def check(self, given: Any, what: str) -> None:
        """Raise :class:`MessageValidationError` (with a field error per name) when ``given`` (the input names of
        one call) lacks a required input or holds one the program does not take."""
        names = [str(n) for n in given]
        missing = [n for n in self.required if n not in names]
        unknown = [n for n in names if n not in self.required and n not in self.optional]
        if not missing and not unknown:
            return
        expected = ", ".join(self.required) or "none"
        if self.optional:
            expected += f" (optional: {', '.join(self.optional)})"
        problems = [f"missing {_quoted(missing)}"] if missing else []
        problems += [f"unknown {_quoted(unknown)}"] if unknown else []
        errors = [FieldError(loc=f"inputs.{n}", message=f"missing: {what} needs it", type="missing") for n in missing]
        errors += [
            FieldError(loc=clip(f"inputs.{n}", 200), message=clip(f"unknown: {what} takes {expected}"),
                       type="unknown_field")
            for n in unknown[:MAX_FIELD_ERRORS]
        ]  # fmt: skip
        raise MessageValidationError(
            clip(f"inputs do not fit {what}: {'; '.join(problems)}; it takes {expected}", 2000),
            errors[:MAX_FIELD_ERRORS],
        )


def _quoted(names: list[str], listed: int = 10) -> str:
    """Up to ``listed`` names quoted (each clipped: they may come from a hostile payload), and how many more."""
    text = ", ".join(repr(clip(n, 64)) for n in names[:listed])
    return text + (f" and {len(names) - listed} more" if len(names) > listed else "")


def program_inputs(program: Any) -> ProgramInputs:
    """The inputs of a built program (the one place that works them out: create, evaluate, optimize, serving).

    A module whose ``forward`` takes ``**kwargs`` only (``dspy.Predict``, ``dspy.ChainOfThought``) takes its
    predictors' input fields, all required; a module whose ``forward`` names its parameters takes those (a
    registered program that computes some inputs itself gives them defaults)."""
    parameters = _forward_parameters(program)
    target = getattr(program, "target", None)  # a registered object with only ``forward``, wrapped
    if target is not None and _pass_through(parameters):
        parameters = _forward_parameters(target) or parameters
    required: list[str] = []
    optional: list[str] = []
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for parameter in named:
        (required if parameter.default is inspect.Parameter.empty else optional).append(parameter.name)
    if named and not any(p.kind is p.VAR_KEYWORD for p in parameters):
        return ProgramInputs(tuple(required), tuple(optional))
    fields: list[str] = []
    for _, predictor in program.named_predictors():
        fields += [n for n in predictor.signature.input_fields if n not in fields]
    if named:  # named parameters and **kwargs: its predictors' other inputs may be given too
        optional += [n for n in fields if n not in required and n not in optional]
        return ProgramInputs(tuple(required), tuple(optional))
    return ProgramInputs(tuple(fields))


def _forward_parameters(obj: Any) -> list[inspect.Parameter]:
    """The parameters of ``obj.forward`` past ``self``, read from its class: DSPy warns when an instance's
    ``forward`` is read outside a call."""
    func = getattr(type(obj), "forward", None)
    if not callable(func):
        return []
    try:
        parameters = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return []
    if not isinstance(inspect.getattr_static(type(obj), "forward", None), staticmethod | classmethod):
        parameters = parameters[1:]  # self
    return parameters


def _pass_through(parameters: list[inspect.Parameter]) -> bool:
    """``forward(*args, **kwargs)``: a wrapper that hands everything on."""
    return bool(parameters) and all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters)


def _examples(rows: Any, inputs: list[str], what: str) -> list[Any]:
    if references_in(rows):  # the agent reads datasets (DatasetStore.examples); here rows are needed
        raise MessageValidationError(f"{what} names datasets ({rows}): read their rows first (DatasetStore.examples)")
    examples = []
    for i, row in enumerate(rows):
        missing = [k for k in inputs if k not in row]
        if missing:
            raise MessageValidationError(f"{what}[{i}] lacks input field(s) {', '.join(missing)}")
        if not set(row) - set(inputs):
            raise MessageValidationError(f"{what}[{i}] has no label (only input fields)")
        examples.append(dspy.Example(**row).with_inputs(*inputs))
    return examples


def _split(request: OptimizationRequest, inputs: list[str]) -> tuple[list[Any], list[Any]]:
    train = _examples(request.trainset, inputs, "trainset")
    if request.valset:
        return train, _examples(request.valset, inputs, "valset")
    if len(train) < 2:
        raise MessageValidationError("trainset needs at least 2 examples when no valset is given")
    shuffled = train[:]
    random.Random(request.seed).shuffle(shuffled)
    n_val = min(len(shuffled) - 1, max(1, round(len(shuffled) * request.val_fraction)))
    return shuffled[n_val:], shuffled[:n_val]


def _check_run(meter: UsageMeter) -> None:
    # DSPy counts a failed LM call as a failed example and carries on: a refused key or a spent budget must stop
    # the run with its own reason.
    if meter.fatal is not None:
        raise RemoteError(meter.fatal.to_body())
    if meter.exhausted is not None:
        raise BudgetExhaustedError(meter.exhausted)


def _score(program: Any, devset: list[Any], metric: Metric, num_threads: int, meter: UsageMeter, lm: Any) -> Score:
    """The percent of the metric over the answered examples (``dspyrt.agents.scoring``: a failed call is not a 0)."""
    results = evaluate_examples(program, devset, 0, metric, lm, num_threads)
    _check_run(meter)
    return summarize(results)
