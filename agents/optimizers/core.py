"""The guide's ``DSPyOptimizerManager`` in plain Python: the registry of optimizers (one active), their statistics,
and the optimization run. ``dspyrt.agents.optimizers.agent`` puts it on the bus as the durable ``optimize`` task;
its messages (``OptimizationRequest``, ``OptimizationResult``) live in ``dspyrt.agents.optimizers.models``.

The built-in optimizers are DSPy's own (``dspyrt.agents.optimizers.builtin``: ``LabeledFewShotOptimizer`` ... GEPA);
third-party ones come from the entry-point group ``dspyrt.optimizers``. Parameters are validated per optimizer
(unknown or mistyped ones are errors, never passed through blindly).

A run is synchronous (DSPy optimizers are) and is meant for a worker thread. One routine, two adapters:
:meth:`DSPyOptimizerManager.execute` scores the baseline on the validation set, compiles, scores the result and
dumps the state; the bus agent reaches it through :meth:`~DSPyOptimizerManager.run` (the program built from the
request's spec, every LM call through the switcher), a Python caller through
:meth:`~DSPyOptimizerManager.optimize_program` (a live module, the configured ``dspy.LM``, metered in process).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback

from dspyrt.agents.lm.bus_engine import BudgetExhaustedError, UsageMeter, program_context
from dspyrt.agents.metrics import Metric, MetricRegistry
from dspyrt.agents.optimizers.builtin import BUILTIN_OPTIMIZERS
from dspyrt.agents.optimizers.metering import configured_lm, metered_lm
from dspyrt.agents.optimizers.models import Budget, OptimizationRequest, OptimizationResult, improvement_points
from dspyrt.agents.optimizers.protocol import CompileContext, Optimizer, OptimizerFactory, optimizer_factory
from dspyrt.agents.programs import (
    HasForward,
    ProgramSpec,
    _ForwardModule,
    build_program,
    dump_program_state,
    program_hash,
)
from dspyrt.agents.scoring import DEFAULT_MAX_ERROR_RATE, Score, check_error_rate, evaluate_examples, summarize
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
class OptimizationRun:
    """One run, whoever asked: the live student program, its data as ``dspy.Example``s, the metric and the
    optimizer. The bus agent builds it from an ``OptimizationRequest`` (:meth:`DSPyOptimizerManager.run`), a
    caller in Python from a live module (:meth:`DSPyOptimizerManager.optimize_program`); both run
    :meth:`DSPyOptimizerManager.execute`."""

    optimizer_name: str
    optimizer: Optimizer
    metric: Metric
    metric_name: str
    student: Any
    trainset: list[Any]
    valset: list[Any]
    program_name: str
    program_hash: str
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    num_threads: int = 4
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE


@dataclass
class DSPyOptimizerManager:
    """Registry of optimizers (one active), their statistics, and the optimization run itself.

    In Python, :meth:`optimize_program` optimizes a live ``dspy.Module`` with the configured ``dspy.LM``; the
    bus agent runs :meth:`run` on a request. Both are :meth:`execute`."""

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

    def register_optimizer(self, name: str, optimizer: Any) -> None:
        """Add an optimizer (the guide's ``register_optimizer``): a class called with one run's params (or a
        factory function), or a ready optimizer object, with ``compile(ctx)`` or the guide's ``optimize(program,
        test_data, metric)`` (adapted). Anything else is refused here with a :class:`ConfigurationError`."""
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigurationError(f"optimizer name {name!r} must be letters, digits, '_' or '-'")
        self.optimizers[name] = optimizer_factory(optimizer, f"optimizer {name!r}")

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
        """The bus agent's run (blocking; run it in a worker thread): build the program from the request's spec,
        split its data, and :meth:`execute`."""
        optimizer, metric = self.prepare(request)
        spec = request.program
        student = build_program(spec)
        inputs = request.input_fields or program_inputs(student).names
        if not inputs:
            raise MessageValidationError("the program declares no input fields; give input_fields")
        trainset, valset = split_examples(
            _examples(request.trainset, inputs, "trainset"),
            _examples(request.valset, inputs, "valset") if request.valset else None,
            request.seed,
            request.val_fraction,
        )
        run = OptimizationRun(
            optimizer_name=request.optimizer or self.active,
            optimizer=optimizer,
            metric=metric,
            metric_name=request.metric,
            student=student,
            trainset=trainset,
            valset=valset,
            program_name=request.program_name or f"program-{program_hash(spec)[:12]}",
            program_hash=program_hash(spec),
            params=request.params,
            seed=request.seed,
            num_threads=request.num_threads,
            max_error_rate=request.max_error_rate,
        )
        result, _, state = self.execute(run, lm, meter, progress, model)
        return RunOutcome(result, state, spec)

    def optimize_program(
        self,
        program: HasForward,
        trainset: Iterable[Any],
        metric: Metric | str = "exact_match",
        *,
        optimizer: str | None = None,
        params: dict[str, Any] | None = None,
        valset: Iterable[Any] | None = None,
        input_fields: list[str] | None = None,
        metric_field: str | None = None,
        metric_params: dict[str, Any] | None = None,
        program_name: str | None = None,
        seed: int = 0,
        num_threads: int = 4,
        val_fraction: float = 0.3,
        budget: Budget | None = None,
        max_error_rate: float = DEFAULT_MAX_ERROR_RATE,
        lm: Any = None,
        progress: Progress | None = None,
    ) -> OptimizationResult:
        """Optimize a live program in this process (the guide's ``optimize_program(program, test_data, metric)``).

        ``program``: a ``dspy.Module`` (anything with ``forward``: ``HasForward``); it is not changed, the
        optimized copy is ``result.program``. ``trainset`` / ``valset``: ``dspy.Example``s (their input keys
        kept) or dicts (inputs: ``input_fields``, else the program's). With no ``valset`` a ``val_fraction`` of
        the trainset is held out. ``metric``: a callable ``(example, prediction, trace=None) -> float | bool`` or
        a registered metric name. ``lm``: default the configured ``dspy.LM`` (``dspy.configure`` /
        ``dspy.context``), whose calls, tokens and cost the result counts (``budget`` caps them). Blocking: in
        async code run it in a worker thread.

        Returns the :class:`OptimizationResult` (scores in percent on the validation set), with the optimized
        program as ``result.program`` (in this process only: it is not part of the result's JSON)."""
        name = optimizer or self.active
        run_optimizer = self._factory(name)(params or {})
        if isinstance(metric, str):
            metric_name = metric
            scorer = self.metrics.get(metric, metric_field, **(metric_params or {}))
        elif callable(metric):
            metric_name = str(getattr(metric, "__name__", type(metric).__name__))
            scorer = metric
        else:
            raise ConfigurationError(f"metric must be a callable or a metric name, not {type(metric).__name__}")
        student = program if isinstance(program, dspy.Module) else _ForwardModule(program)
        inputs = input_fields or program_inputs(student).names
        if not inputs:
            raise MessageValidationError("the program declares no input fields; give input_fields")
        train, val = split_examples(
            _examples(list(trainset), inputs, "trainset"),
            _examples(list(valset), inputs, "valset") if valset is not None else None,
            seed,
            val_fraction,
        )
        base_lm = lm if lm is not None else configured_lm()
        limits = budget or Budget()
        meter = UsageMeter(max_calls=limits.max_lm_calls, max_cost=limits.max_cost)
        digest = live_program_hash(student)
        run = OptimizationRun(
            optimizer_name=name,
            optimizer=run_optimizer,
            metric=scorer,
            metric_name=metric_name,
            student=student,
            trainset=train,
            valset=val,
            program_name=program_name or type(program).__name__,
            program_hash=digest,
            params=dict(params or {}),
            seed=seed,
            num_threads=num_threads,
            max_error_rate=max_error_rate,
        )
        result, optimized, _ = self.execute(
            run, metered_lm(base_lm, meter), meter, progress or _no_progress, str(base_lm.model)
        )
        result.program = optimized
        return result

    def execute(
        self, run: OptimizationRun, lm: Any, meter: UsageMeter, progress: Progress, model: str
    ) -> tuple[OptimizationResult, Any, dict[str, Any] | None]:
        """The optimization itself, for every caller (blocking): score the baseline on the validation set,
        compile, score the result, dump its state. Returns the result, the optimized program (``None`` when the
        run stopped early) and its state."""
        name = run.optimizer_name
        started = time.perf_counter()
        result = OptimizationResult(
            program_name=run.program_name,
            program_hash=run.program_hash,
            optimizer=name,
            params=run.params,
            model=model,
            metric=run.metric_name,
            trainset_size=len(run.trainset),
            valset_size=len(run.valset),
            seed=run.seed,
        )
        state: dict[str, Any] | None = None
        optimized: Any = None
        with self._lock:
            self.stats.setdefault(name, OptimizerStats()).runs += 1
        feed = ProgressCallback(progress, meter)
        try:
            with program_context(lm, callbacks=[feed]):
                feed.set_phase("baseline", step=0, total=3)
                baseline = _score(run.student, run.valset, run.metric, run.num_threads, meter, lm)
                result.baseline_score, result.baseline_coverage = baseline.score, baseline.coverage
                feed.set_phase("optimizing", step=1, total=3, baseline_score=result.baseline_score)
                optimized = run.optimizer.compile(
                    CompileContext(run.student, run.trainset, run.valset, run.metric, run.seed, run.num_threads, lm)
                )
                _check_run(meter)
                feed.set_phase("evaluating", step=2, total=3, baseline_score=result.baseline_score)
                final = _score(optimized, run.valset, run.metric, run.num_threads, meter, lm)
                result.optimized_score, result.optimized_coverage = final.score, final.coverage
                result.improvement_score = improvement_points(baseline.score, final.score)
                # DSPy's optimizers score a failed call as a wrong answer inside compile(): past the limit, the
                # choice between candidates measured provider luck, so there is no result to trust.
                check_error_rate(meter.failed_calls, meter.calls, run.max_error_rate, model=model,
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
            optimized = None
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
        return result, optimized, state


def _no_progress(phase: str, data: dict[str, Any]) -> None:
    """Progress nobody listens to."""


def live_program_hash(program: Any) -> str:
    """A sha256 (hex) of a live program: its class and its state before optimization (it has no spec)."""
    cls = type(getattr(program, "target", program))
    try:
        state = json.dumps(program.dump_state(), sort_keys=True, default=str)
    except Exception:  # a program whose state cannot be dumped is named by its class alone
        state = ""
    return hashlib.sha256(f"{cls.__module__}.{cls.__qualname__}\n{state}".encode()).hexdigest()


def _optimizer_factory(loaded: Any) -> OptimizerFactory:
    """An installed plugin, adapted or refused as :meth:`DSPyOptimizerManager.register_optimizer` does."""
    try:
        return optimizer_factory(loaded, "optimizer plugin")
    except ConfigurationError as exc:
        raise TypeError(exc.message) from None


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
    """``dspy.Example``s of ``rows``: an Example keeps the input keys it was given (``with_inputs``), else takes
    ``inputs``; a dict must hold the inputs and at least one label."""
    if references_in(rows):  # the agent reads datasets (DatasetStore.examples); here rows are needed
        raise MessageValidationError(f"{what} names datasets ({rows}): read their rows first (DatasetStore.examples)")
    examples = []
    for i, row in enumerate(rows):
        if isinstance(row, dspy.Example):
            try:
                row.inputs()
                examples.append(row)
                continue
            except ValueError:  # no input keys set: the program's, as for a dict
                row = row.toDict()
        missing = [k for k in inputs if k not in row]
        if missing:
            raise MessageValidationError(f"{what}[{i}] lacks input field(s) {', '.join(missing)}")
        if not set(row) - set(inputs):
            raise MessageValidationError(f"{what}[{i}] has no label (only input fields)")
        examples.append(dspy.Example(**row).with_inputs(*inputs))
    return examples


def split_examples(
    train: list[Any], valset: list[Any] | None, seed: int, val_fraction: float
) -> tuple[list[Any], list[Any]]:
    """The trainset and the validation set: ``valset`` when given, else ``val_fraction`` of the trainset held out
    (shuffled with ``seed``)."""
    if valset:
        return train, valset
    if len(train) < 2:
        raise MessageValidationError("trainset needs at least 2 examples when no valset is given")
    shuffled = train[:]
    random.Random(seed).shuffle(shuffled)
    n_val = min(len(shuffled) - 1, max(1, round(len(shuffled) * val_fraction)))
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
