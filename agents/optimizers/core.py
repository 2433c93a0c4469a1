"""The guide's optimizers in plain Python: ``DSPyOptimizerManager``, ``LabeledFewShotOptimizer``,
``OptimizationResult``. ``dspyrt.agents.optimizers.agent`` puts the manager on the bus as the durable ``optimize`` task.

Every optimizer is DSPy's own (LabeledFewShot, BootstrapFewShot, BootstrapFewShotWithRandomSearch, MIPROv2,
COPRO, SIMBA, GEPA); third-party ones come from the entry-point group ``dspyrt.optimizers``. Parameters are
validated per optimizer (unknown or mistyped ones are errors, never passed through blindly).

A run is synchronous (DSPy optimizers are) and is meant for a worker thread: build the program from its spec,
split the data, score the baseline with ``dspy.Evaluate``, compile, score the result, dump the state.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal, Protocol

import dspy
from dspy.utils.callback import BaseCallback
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dspyrt.agents.lm.bus_engine import BudgetExhaustedError, UsageMeter, program_context
from dspyrt.agents.metrics import Metric, MetricRegistry
from dspyrt.agents.programs import ProgramSpec, build_program, dump_program_state, parse_program_spec, program_hash
from dspyrt.agents.scoring import DEFAULT_MAX_ERROR_RATE, Score, check_error_rate, evaluate_examples, summarize
from dspyrt.bus import ConfigurationError, FieldError, Message, MessageValidationError, NotFoundError, RemoteError
from dspyrt.bus.messages import MAX_FIELD_ERRORS, clip, field_errors_of
from dspyrt.runtime.datasets import Examples, references_in

ENTRY_POINT_GROUP = "dspyrt.optimizers"
DEFAULT_OPTIMIZER = "labeled_fewshot"

# ------------------------------------------------------------------------------------------- inputs


class Budget(Message):
    """Enforced: when spent, the run stops and reports what it measured so far."""

    max_lm_calls: int | None = Field(default=None, ge=1)
    max_cost: float | None = Field(default=None, gt=0)


class OptimizationRequest(Message):
    """The durable ``optimize`` task's input."""

    program: ProgramSpec
    program_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # Rows inline, or "dataset:NAME[@VERSION]" (a list of references: their rows one after the other).
    trainset: Examples
    valset: Examples | None = None
    val_fraction: float = Field(default=0.3, gt=0, lt=1)
    # Which example keys are inputs; default: the program's input fields.
    input_fields: list[str] | None = None
    metric: str = "exact_match"
    metric_field: str | None = None
    metric_params: dict[str, Any] = Field(default_factory=dict)
    optimizer: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    model: str | None = None
    budget: Budget = Field(default_factory=Budget)
    seed: int = 0
    num_threads: int = Field(default=4, ge=1, le=64)
    # Skip the optimization cache and the switcher's LM response cache (answers are still stored).
    no_cache: bool = False
    # Fall back along the model's declared chain when it fails; False: the model alone answers.
    allow_fallback: bool = True
    # More LM calls than this share failing (after retries and fallback) fails the run: provider_unreliable.
    max_error_rate: float = Field(default=DEFAULT_MAX_ERROR_RATE, ge=0, le=0.5)

    @field_validator("program", mode="before")
    @classmethod
    def _program(cls, value: Any) -> Any:
        return value if isinstance(value, ProgramSpec) else parse_program_spec(value)

    def cache_key(self, model: str) -> str:
        """Same spec, data, metric, optimizer, parameters, model and seed → same key."""
        material = self.model_dump(mode="json", exclude={"no_cache", "num_threads", "program_name", "budget"})
        material["program"] = program_hash(self.program)
        material["model"] = model
        canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()


class ArtifactRef(Message):
    store: str
    name: str
    version: str
    sha256: str  # of the artifact document (which also holds the task id and the time it was made)
    size: int
    # sha256 of the canonical JSON of the optimized state alone (``state_sha256``): equal for two runs that made
    # the same program, so a deploy can tell an identical program from a new one. None: not known.
    state_sha256: str | None = None


def state_sha256(state: Any) -> str:
    """The sha256 (hex) of a program state's canonical JSON: keys sorted, no whitespace. The state is read back
    from JSON first, so a state and its stored copy (tuples made lists, keys made strings) hash alike."""
    canonical = json.dumps(json.loads(json.dumps(state)), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def improvement_points(baseline: float | None, optimized: float | None) -> float | None:
    """The one definition of improvement: optimized minus baseline score, in percentage points, both measured
    on the same examples; ``None`` when either is missing."""
    if baseline is None or optimized is None:
        return None
    return round(optimized - baseline, 4)


class OptimizationResult(Message):
    """What an optimization produced, with what it cost.

    Its scores are the optimizer's own, measured on the validation set (``scored_on``: the request's ``valset``,
    or the ``val_fraction`` of the trainset held out when none was given), in percent over the answered
    examples; ``improvement_score`` is ``optimized_score - baseline_score`` in percentage points. A cycle scores
    the baseline and the optimized program again on its devset: those are the cycle's figures.

    A cache hit (``cached``) made no LM call: ``lm_calls``, ``cached_calls``, ``failed_calls``,
    ``provider_requests``, the tokens and ``cost`` are 0 and ``duration_s`` is the lookup's; the run that made the
    result is described by ``original_lm_calls``, ``original_cost`` and ``original_duration_s`` (and by
    ``models_used``, which names the models that made its program).
    """

    status: Literal["completed", "budget_exhausted"] = "completed"
    stopped_reason: str | None = None
    program_name: str
    program_hash: str
    optimizer: str
    params: dict[str, Any] = Field(default_factory=dict)
    model: str
    metric: str
    baseline_score: float | None = None  # percent over the answered validation examples
    optimized_score: float | None = None
    improvement_score: float | None = None  # optimized - baseline, percentage points (improvement_points)
    scored_on: Literal["valset"] = "valset"  # what the three scores above were measured on
    # answered / validation examples of each score (an example whose LM call failed is not a wrong answer)
    baseline_coverage: float | None = None
    # The dataset versions each examples field used ({"trainset": ["qa@1a2b3c4d5e6f"]}); inline data is not listed.
    datasets: dict[str, list[str]] = Field(default_factory=dict)
    optimized_coverage: float | None = None
    trainset_size: int = 0
    valset_size: int = 0
    lm_calls: int = 0
    cached_calls: int = 0  # answered from the switcher's cache: no tokens, no cost
    failed_calls: int = 0  # failed after retries and fallback (within max_error_rate)
    provider_requests: int = 0  # requests the provider received, failed attempts included
    # Which models answered, and how many calls each; more than one: mixed_models.
    models_used: dict[str, int] = Field(default_factory=dict)
    mixed_models: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    duration_s: float = 0.0
    seed: int = 0
    cached: bool = False
    # A cache hit's figures of the run that made the result (None: this run made it).
    original_lm_calls: int | None = None
    original_cost: float | None = None
    original_duration_s: float | None = None
    artifact: ArtifactRef | None = None

    def as_cache_hit(self, duration_s: float) -> OptimizationResult:
        """This stored result returned again without running: no LM call, no token, no cost."""
        original = self if not self.cached else None
        return self.model_copy(
            update={
                "cached": True,
                "lm_calls": 0,
                "cached_calls": 0,
                "failed_calls": 0,
                "provider_requests": 0,
                "input_tokens": 0,
                "output_tokens": 0,
                "cost": 0.0,
                "duration_s": round(duration_s, 3),
                "original_lm_calls": original.lm_calls if original else self.original_lm_calls,
                "original_cost": original.cost if original else self.original_cost,
                "original_duration_s": original.duration_s if original else self.original_duration_s,
            }
        )


# -------------------------------------------------------------------------------------- optimizers


@dataclass
class CompileContext:
    """Everything an optimizer may use: the student program, the data, the metric and the LM."""

    student: Any
    trainset: list[Any]
    valset: list[Any]
    metric: Metric
    seed: int
    num_threads: int
    lm: Any


class Optimizer(Protocol):
    """An optimizer plugin: validated parameters in, a compiled program out."""

    def compile(self, ctx: CompileContext) -> Any: ...


OptimizerFactory = Callable[[dict[str, Any]], Optimizer]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _params(model: type[_Params], params: dict[str, Any], optimizer: str) -> Any:
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        raise MessageValidationError(f"invalid parameters for optimizer {optimizer}", field_errors_of(exc)) from exc


class LabeledFewShotParams(_Params):
    k: int = Field(default=16, ge=1, le=1000)
    sample: bool = True


class LabeledFewShotOptimizer:
    """DSPy's LabeledFewShot with k=16 by default: up to k labelled examples become each predictor's demos."""

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params: LabeledFewShotParams = _params(LabeledFewShotParams, params or {}, "labeled_fewshot")

    def compile(self, ctx: CompileContext) -> Any:
        teleprompter = dspy.LabeledFewShot(k=self.params.k)
        return teleprompter.compile(ctx.student, trainset=ctx.trainset, sample=self.params.sample)


class BootstrapParams(_Params):
    max_bootstrapped_demos: int = Field(default=4, ge=0, le=64)
    max_labeled_demos: int = Field(default=16, ge=0, le=256)
    max_rounds: int = Field(default=1, ge=1, le=10)
    metric_threshold: float | None = None


class BootstrapFewShotOptimizer:
    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params: BootstrapParams = _params(BootstrapParams, params or {}, "bootstrap_fewshot")

    def compile(self, ctx: CompileContext) -> Any:
        p = self.params
        teleprompter = dspy.BootstrapFewShot(
            metric=ctx.metric,
            metric_threshold=p.metric_threshold,
            max_bootstrapped_demos=p.max_bootstrapped_demos,
            max_labeled_demos=p.max_labeled_demos,
            max_rounds=p.max_rounds,
        )
        return teleprompter.compile(ctx.student, trainset=ctx.trainset)


class RandomSearchParams(BootstrapParams):
    num_candidate_programs: int = Field(default=8, ge=1, le=64)
    stop_at_score: float | None = None


class RandomSearchOptimizer:
    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params: RandomSearchParams = _params(RandomSearchParams, params or {}, "random_search")

    def compile(self, ctx: CompileContext) -> Any:
        p = self.params
        teleprompter = dspy.BootstrapFewShotWithRandomSearch(
            metric=ctx.metric,
            max_bootstrapped_demos=p.max_bootstrapped_demos,
            max_labeled_demos=p.max_labeled_demos,
            max_rounds=p.max_rounds,
            num_candidate_programs=p.num_candidate_programs,
            num_threads=ctx.num_threads,
            stop_at_score=p.stop_at_score,
            metric_threshold=p.metric_threshold,
        )
        return teleprompter.compile(ctx.student, trainset=ctx.trainset, valset=ctx.valset)


class MiproParams(_Params):
    auto: Literal["light", "medium", "heavy"] | None = "light"
    num_candidates: int | None = Field(default=None, ge=1, le=64)
    num_trials: int | None = Field(default=None, ge=1, le=500)
    max_bootstrapped_demos: int = Field(default=4, ge=0, le=64)
    max_labeled_demos: int = Field(default=4, ge=0, le=256)
    minibatch: bool = True
    minibatch_size: int = Field(default=35, ge=1)

    @model_validator(mode="after")
    def _auto_or_counts(self) -> MiproParams:
        if self.auto is None and (self.num_candidates is None or self.num_trials is None):
            raise ValueError("with auto=null give num_candidates and num_trials")
        return self


class MiproV2Optimizer:
    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params: MiproParams = _params(MiproParams, params or {}, "mipro_v2")

    def compile(self, ctx: CompileContext) -> Any:
        p = self.params
        teleprompter = dspy.MIPROv2(
            metric=ctx.metric,
            auto=p.auto,
            num_candidates=p.num_candidates,
            max_bootstrapped_demos=p.max_bootstrapped_demos,
            max_labeled_demos=p.max_labeled_demos,
            num_threads=ctx.num_threads,
            seed=ctx.seed,
            verbose=False,
        )
        return teleprompter.compile(
            ctx.student,
            trainset=ctx.trainset,
            valset=ctx.valset,
            num_trials=p.num_trials,
            minibatch=p.minibatch and len(ctx.valset) > p.minibatch_size,
            minibatch_size=p.minibatch_size,
            seed=ctx.seed,
        )


class CoproParams(_Params):
    breadth: int = Field(default=4, ge=2, le=64)
    depth: int = Field(default=2, ge=1, le=10)
    init_temperature: float = Field(default=1.4, ge=0, le=2)


class CoproOptimizer:
    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params: CoproParams = _params(CoproParams, params or {}, "copro")

    def compile(self, ctx: CompileContext) -> Any:
        p = self.params
        teleprompter = dspy.COPRO(
            metric=ctx.metric, breadth=p.breadth, depth=p.depth, init_temperature=p.init_temperature
        )
        return teleprompter.compile(
            ctx.student, trainset=ctx.trainset, eval_kwargs={"num_threads": ctx.num_threads, "display_progress": False}
        )


class SimbaParams(_Params):
    bsize: int = Field(default=8, ge=1, le=256)
    num_candidates: int = Field(default=4, ge=1, le=64)
    max_steps: int = Field(default=4, ge=1, le=100)
    max_demos: int = Field(default=4, ge=0, le=64)


class SimbaOptimizer:
    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params: SimbaParams = _params(SimbaParams, params or {}, "simba")

    def compile(self, ctx: CompileContext) -> Any:
        p = self.params
        teleprompter = dspy.SIMBA(
            metric=ctx.metric,
            bsize=min(p.bsize, len(ctx.trainset)),
            num_candidates=p.num_candidates,
            max_steps=p.max_steps,
            max_demos=p.max_demos,
            num_threads=ctx.num_threads,
        )
        return teleprompter.compile(ctx.student, trainset=ctx.trainset, seed=ctx.seed)


class GepaParams(_Params):
    auto: Literal["light", "medium", "heavy"] | None = "light"
    max_metric_calls: int | None = Field(default=None, ge=1)
    reflection_minibatch_size: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _one_budget(self) -> GepaParams:
        if (self.auto is None) == (self.max_metric_calls is None):
            raise ValueError("give exactly one of auto or max_metric_calls")
        return self


class GepaOptimizer:
    """DSPy's GEPA; the run's own LM doubles as the reflection LM."""

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params: GepaParams = _params(GepaParams, params or {}, "gepa")

    def compile(self, ctx: CompileContext) -> Any:
        p = self.params
        metric = ctx.metric

        def feedback_metric(
            gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
        ) -> Any:
            return float(metric(gold, pred, trace))

        teleprompter = dspy.GEPA(
            metric=feedback_metric,
            auto=p.auto,
            max_metric_calls=p.max_metric_calls,
            reflection_lm=ctx.lm,
            reflection_minibatch_size=p.reflection_minibatch_size,
            num_threads=ctx.num_threads,
            seed=ctx.seed,
        )
        return teleprompter.compile(ctx.student, trainset=ctx.trainset, valset=ctx.valset)


BUILTIN_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "labeled_fewshot": LabeledFewShotOptimizer,
    "bootstrap_fewshot": BootstrapFewShotOptimizer,
    "random_search": RandomSearchOptimizer,
    "mipro_v2": MiproV2Optimizer,
    "copro": CoproOptimizer,
    "simba": SimbaOptimizer,
    "gepa": GepaOptimizer,
}


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
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            self.optimizers.setdefault(ep.name, ep.load())

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
