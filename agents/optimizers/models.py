"""The optimizer's messages: the ``optimize`` task's input and result, the artifact it stores, and the replies of
``<prefix>.optimizer.list | set_active | stats``.

``OptimizationSpec`` holds the fields an ``optimize`` task and a ``cycle`` task (``dspyrt.agents.loop.models``)
share: what to optimize, on which data, by which measure, with which optimizer and model. Both requests extend it,
so the two stay one definition while their JSON stays flat.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal

from pydantic import Field, FiniteFloat, PrivateAttr, field_validator

from dspyrt.agents.programs import ProgramSpec, parse_program_spec, program_hash
from dspyrt.agents.scoring import DEFAULT_MAX_ERROR_RATE
from dspyrt.bus import Message
from dspyrt.bus.events import EventData
from dspyrt.runtime.datasets import Examples

# -------------------------------------------------------------------------------------------- inputs


class Budget(Message):
    """Enforced: when spent, the run stops and reports what it measured so far."""

    max_lm_calls: int | None = Field(default=None, ge=1)
    max_cost: float | None = Field(default=None, gt=0)


class OptimizationSpec(Message):
    """What to optimize and how: the fields an ``optimize`` task and a ``cycle`` task share."""

    program: ProgramSpec
    # Rows inline, or "dataset:NAME[@VERSION]" (a list of references: their rows one after the other).
    trainset: Examples
    valset: Examples | None = None
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


class OptimizationRequest(OptimizationSpec):
    """The durable ``optimize`` task's input."""

    program_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    val_fraction: float = Field(default=0.3, gt=0, lt=1)
    num_threads: int = Field(default=4, ge=1, le=64)

    @classmethod
    def from_spec(cls, spec: OptimizationSpec, **fields: Any) -> OptimizationRequest:
        """The optimize task of ``spec`` (e.g. a cycle's request): its shared fields, then ``fields`` over them."""
        shared = {name: getattr(spec, name) for name in OptimizationSpec.model_fields}
        return cls(**{**shared, **fields})

    def cache_key(self, model: str) -> str:
        """Same spec, data, metric, optimizer, parameters, model and seed → same key."""
        material = self.model_dump(mode="json", exclude={"no_cache", "num_threads", "program_name", "budget"})
        material["program"] = program_hash(self.program)
        material["model"] = model
        canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()


# ------------------------------------------------------------------------------------------- results


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
    # The optimized dspy.Module of an in-process run (DSPyOptimizerManager.optimize_program); never serialized.
    _program: Any = PrivateAttr(default=None)

    @property
    def program(self) -> Any:
        """The optimized program, when this result was made in this process by ``optimize_program`` (``None``
        for a result read from JSON: load its ``artifact`` instead)."""
        return self._program

    @program.setter
    def program(self, value: Any) -> None:
        self._program = value

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


# ----------------------------------------------------------------------------------------- endpoints


class OptimizerList(Message):
    active: str
    optimizers: list[str]


class SetActive(Message):
    name: str = Field(min_length=1, max_length=64)


class OptimizerStatsReply(Message):
    active: str
    stats: dict[str, dict[str, Any]]


# ------------------------------------------------------------------------------------------- events


class OptimizationFinished(EventData):
    """An ``optimize`` task's result, published as ``optimization.<status>`` (``completed``, ``budget_exhausted``):
    its scores are the optimizer's own, on its validation set (see :class:`OptimizationResult`)."""

    topic: ClassVar[str] = "optimization.*"

    task_id: str = Field(description="the optimize task's id")
    status: Literal["completed", "budget_exhausted"] = Field(description="how the run ended (the topic's last token)")
    stopped_reason: str | None = Field(default=None, description="why a run stopped early")
    program_name: str = Field(description="the optimized program")
    program_hash: str | None = Field(default=None, description="the program spec's hash")
    optimizer: str = Field(description="the optimizer that ran")
    model: str = Field(description="the model it ran on")
    metric: str | None = Field(default=None, description="the metric it optimized")
    baseline_score: FiniteFloat | None = Field(default=None, description="percent, on the validation set")
    optimized_score: FiniteFloat | None = Field(default=None, description="percent, on the validation set")
    improvement_score: FiniteFloat | None = Field(default=None, description="optimized - baseline, in points")
    lm_calls: int = Field(default=0, ge=0, description="LM calls the run made (0 for a cache hit)")
    cached_calls: int = Field(default=0, ge=0, description="of them, answered from the switcher's cache")
    failed_calls: int = Field(default=0, ge=0, description="of them, failed after retries and fallback")
    input_tokens: int = Field(default=0, ge=0, description="prompt tokens of the run")
    output_tokens: int = Field(default=0, ge=0, description="completion tokens of the run")
    cost: FiniteFloat = Field(default=0.0, ge=0, description="USD the run cost")
    duration_s: FiniteFloat | None = Field(default=None, ge=0, description="seconds the run took")
    cached: bool = Field(default=False, description="the result of an identical earlier run, from the cache")

    @classmethod
    def of(cls, task_id: str, result: OptimizationResult) -> OptimizationFinished:
        """The event of ``result``, the outcome of task ``task_id``."""
        return cls(task_id=task_id, **result.model_dump(include=set(cls.model_fields) - {"task_id"}))
