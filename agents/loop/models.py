"""Payloads of the loop phases, the cycle task and serving."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, FiniteFloat, field_validator, model_validator

from dspyrt.agents.deployments import DeployedVersion, ProgramPointer
from dspyrt.agents.optimizers.models import ArtifactRef, OptimizationResult, OptimizationSpec
from dspyrt.agents.programs import ProgramSpec, parse_program_spec
from dspyrt.agents.scoring import DEFAULT_MAX_ERROR_RATE, ExampleResult
from dspyrt.bus import Message, MessageValidationError
from dspyrt.bus.claims import ObjectRef
from dspyrt.bus.events import EventData
from dspyrt.runtime.datasets import DatasetRef, Examples

Severity = Literal["info", "warning", "error", "critical"]
PROGRAM_NAME = r"^[A-Za-z0-9_-]{1,64}$"


def _spec(value: Any) -> Any:
    return value if isinstance(value, ProgramSpec) else parse_program_spec(value)


# ------------------------------------------------------------------------------------------ create


class CreateRequest(Message):
    program: ProgramSpec

    _check = field_validator("program", mode="before")(classmethod(lambda cls, v: _spec(v)))


class CreateResult(Message):
    program_hash: str
    module: str
    predictors: list[str]
    input_fields: list[str]
    output_fields: list[str]


# ---------------------------------------------------------------------------------------- evaluate


class ProgramRef(Message):
    """A program to run: its spec, plus an optimized state (inline, or an artifact in the object store)."""

    spec: ProgramSpec
    state: dict[str, Any] | None = None
    artifact: ArtifactRef | None = None

    _check = field_validator("spec", mode="before")(classmethod(lambda cls, v: _spec(v)))


class EvaluateRequest(Message):
    """Score a program on a devset; the devset is split into shards that evaluator replicas score."""

    program: ProgramRef
    # Rows inline, or "dataset:NAME[@VERSION]" (a list of references: their rows one after the other).
    devset: Examples
    input_fields: list[str] | None = None
    metric: str = "exact_match"
    metric_field: str | None = None
    metric_params: dict[str, Any] = Field(default_factory=dict)
    model: str | None = None
    shard_size: int = Field(default=25, ge=1, le=10_000)
    num_threads: int = Field(default=8, ge=1, le=256)
    # Evaluation id: shard task ids derive from it, so a repeated request reuses finished shards.
    evaluation_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,100}$")
    # More examples than this share whose LM call failed (after retries and fallback): provider_unreliable.
    max_error_rate: float = Field(default=DEFAULT_MAX_ERROR_RATE, ge=0, le=0.5)
    # Fall back along the model's declared chain when it fails; False: the model alone answers.
    allow_fallback: bool = True
    # Skip the switcher's response cache (answers are still stored).
    no_cache: bool = False


class ShardRequest(Message):
    """One shard of an evaluation: its rows inline (``examples``), or ``count`` rows of a pinned dataset version
    from row ``dataset_offset``, which the evaluator reads itself (a shard message stays small whatever the rows)."""

    program: ProgramRef
    examples: list[dict[str, Any]] | None = Field(default=None, min_length=1)
    dataset: str | None = None  # "dataset:NAME@VERSION"
    count: int | None = Field(default=None, ge=1)
    # The dataset row of the shard's first example (default: ``offset``, when the devset is that one dataset).
    dataset_offset: int | None = Field(default=None, ge=0)
    offset: int = Field(ge=0)  # the index of the shard's first example in the whole devset
    input_fields: list[str]
    metric: str
    metric_field: str | None = None
    metric_params: dict[str, Any] = Field(default_factory=dict)
    model: str
    num_threads: int = 8
    allow_fallback: bool = True
    no_cache: bool = False

    @model_validator(mode="after")
    def _rows_or_reference(self) -> ShardRequest:
        if (self.examples is None) == (self.dataset is None):
            raise ValueError("a shard holds either its examples or a dataset reference with a count, not both")
        if self.dataset is not None:
            if self.count is None:
                raise ValueError("a shard of a dataset says how many rows it takes (count)")
            try:
                ref = DatasetRef.parse(self.dataset)
            except MessageValidationError as exc:  # pydantic reports ValueErrors as field errors
                raise ValueError(exc.message) from None
            if not ref.pinned:
                raise ValueError(f"{self.dataset} is not pinned to a version: shards must read the same rows")
        return self

    @property
    def first_row(self) -> int:
        """The dataset row of the shard's first example."""
        return self.offset if self.dataset_offset is None else self.dataset_offset


class ShardResult(Message):
    offset: int
    results: list[ExampleResult]
    lm_calls: int = 0
    cached_calls: int = 0
    provider_requests: int = 0
    models_used: dict[str, int] = Field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    worker: str = ""


class EvaluationResult(Message):
    score: float  # percent over the answered examples, as dspy.Evaluate reports
    examples: int
    # Examples whose LM call failed after retries and fallback are errors: left out of the score.
    answered: int | None = None
    errors: int = 0
    coverage: float = 1.0  # answered / examples
    # Per-example results, by index: inline for a small evaluation; else empty, and ``results_ref`` names a
    # JSON Lines object (one ExampleResult per line, by index) in the results object store.
    results: list[ExampleResult] = Field(default_factory=list)
    results_ref: ObjectRef | None = None
    # The dataset version(s) scored ("NAME@VERSION", comma-separated when several); None: the devset was inline.
    dataset: str | None = None
    shards: int
    model: str
    # Which models answered, and how many calls each; more than one: mixed_models.
    models_used: dict[str, int] = Field(default_factory=dict)
    mixed_models: bool = False
    lm_calls: int = 0
    cached_calls: int = 0  # answered from the switcher's cache (no tokens, no cost)
    provider_requests: int = 0  # requests the provider received, failed attempts included
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    # Nearest-rank percentiles (dspyrt.runtime.stats) of the answered examples; None: none was answered.
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    duration_s: float = 0.0

    def record_summary(self) -> dict[str, Any]:
        """What a task record keeps when the whole result is claim-checked: everything but the per-example results."""
        return self.model_dump(mode="json", exclude={"results"})


# ------------------------------------------------------------------------------------------ deploy


class RequiredValidator(Message):
    """A validator type whose failures at or above ``severity`` block the deploy."""

    type: str
    severity: Severity = "error"


class Objectives(Message):
    min_improvement: float | None = None  # percentage points over the baseline
    min_score: float | None = None  # percent
    max_cost: float | None = Field(default=None, ge=0)  # USD for the whole cycle
    max_latency_p95_ms: float | None = Field(default=None, gt=0)
    required_validators: list[RequiredValidator] = Field(default_factory=list)
    # Share of the evaluation examples that must have been answered (a failed LM call is an error, not a 0).
    min_coverage: float = Field(default=1.0, ge=0, le=1)
    # Deploy even when more than one model answered across baseline, optimization and the optimized evaluation.
    allow_mixed_models: bool = False


class ValidationSpec(Message):
    """What the validators check the optimized program's outputs against (see the assertion framework)."""

    output_schema: dict[str, Any] = Field(default_factory=dict)
    invariants: list[dict[str, Any]] = Field(default_factory=list)
    code_fields: list[str] = Field(default_factory=list)
    types: list[str] | None = None  # validator types to run; default: every enabled one


class DeployRequest(Message):
    program_name: str = Field(pattern=PROGRAM_NAME)
    program: ProgramSpec
    artifact: ArtifactRef
    model: str | None = None
    baseline_score: float | None = None
    optimized_score: float | None = None
    cost: float = 0.0
    latency_p95_ms: float | None = None
    # The lower coverage of the two evaluations, and every model that answered in the cycle (calls each).
    coverage: float = 1.0
    models_used: dict[str, int] = Field(default_factory=dict)
    validation: dict[str, Any] | None = None  # the aggregated validation report
    objectives: Objectives = Field(default_factory=Objectives)
    canary_fraction: float | None = Field(default=None, gt=0, lt=1)
    cycle_id: str | None = None
    # Every dataset version ("NAME@VERSION") the cycle used, recorded with the deployed version.
    datasets: list[str] = Field(default_factory=list)

    _check = field_validator("program", mode="before")(classmethod(lambda cls, v: _spec(v)))

    def deployed_version(self, version: int, program_hash: str) -> DeployedVersion:
        """The registry's record of this candidate as ``version`` (bus and in-process deploys write the same one)."""
        return DeployedVersion(
            program=self.program_name,
            version=version,
            artifact_store=self.artifact.store,
            artifact_name=self.artifact.name,
            artifact_sha256=self.artifact.sha256,
            state_sha256=self.artifact.state_sha256,
            program_hash=program_hash,
            model=self.model,
            score=self.optimized_score,
            baseline_score=self.baseline_score,
            cycle_id=self.cycle_id,
            datasets=self.datasets,
        )


class DeployVerdict(Message):
    """The deploy gate's answer. ``deployed`` with ``unchanged``: the candidate is the program already deployed as
    ``version`` (same program, same optimized state, same model), so nothing was written; ``note`` says so."""

    deployed: bool
    program_name: str
    version: int | None = None
    canary: bool = False
    unchanged: bool = False
    note: str = ""
    reasons: list[str] = Field(default_factory=list)  # why it was rejected (every one)
    checks: dict[str, bool] = Field(default_factory=dict)


# ------------------------------------------------------------------------------------------- cycle


class CycleRequest(OptimizationSpec):
    """The durable ``cycle`` task (the guide's run_cycle input): what its optimize phase runs (the fields of
    ``OptimizationSpec``, flat beside these), plus the devset both evaluations score and what the deploy gate asks.

    Dataset references in ``trainset``, ``valset`` and ``devset`` are pinned at the cycle's start. ``model``,
    ``allow_fallback``, ``no_cache`` and ``max_error_rate`` are passed to every phase."""

    program_name: str = Field(pattern=PROGRAM_NAME)
    # Rows inline, or "dataset:NAME[@VERSION]" (or a list of references).
    devset: Examples
    objectives: Objectives = Field(default_factory=Objectives)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    canary_fraction: float | None = Field(default=None, gt=0, lt=1)
    shard_size: int = Field(default=25, ge=1)
    # Append the program's feedback dataset ("dataset:<program_name>-feedback", its newest version at the cycle's
    # start) to the trainset of the optimize phase; nothing when it does not exist yet.
    include_feedback: bool = False

    def validation_fields(self) -> dict[str, Any]:
        """This cycle's validation request without its cases: the checks it asked for and its latency objective
        (the bus and the in-process validate phases add the cases they can afford)."""
        fields: dict[str, Any] = {
            "cases": [],
            "output_schema": self.validation.output_schema,
            "invariants": self.validation.invariants,
            "code_fields": self.validation.code_fields,
            "objectives": {"max_latency_p95_ms": self.objectives.max_latency_p95_ms},
        }
        if self.validation.types is not None:
            fields["types"] = self.validation.types
        return fields


EXAMPLE_FIELDS = ("trainset", "valset", "devset")


def feedback_dataset(program_name: str) -> str:
    """The reference of a program's feedback dataset."""
    return f"dataset:{program_name}-feedback"


PhaseName = Literal["create", "evaluate_baseline", "optimize", "evaluate_optimized", "validate", "deploy"]
PHASES: tuple[PhaseName, ...] = ("create", "evaluate_baseline", "optimize", "evaluate_optimized", "validate", "deploy")


class CycleState(Message):
    """Kept in KV per cycle: what each finished phase produced, so a replacement coordinator resumes."""

    cycle_id: str
    phases: dict[str, dict[str, Any]] = Field(default_factory=dict)
    runs: dict[str, int] = Field(default_factory=dict)  # how often each phase was executed (never re-run)
    # The request's dataset references pinned at the cycle's start (inline fields are not listed), so a resumed
    # cycle runs on the same versions; None: not pinned yet.
    pinned: dict[str, str | list[str]] | None = None
    # The feedback dataset pinned at the start ([]: it did not exist); None: not asked for.
    feedback: list[str] | None = None


class CycleResult(Message):
    """A finished cycle. Its scores are ``baseline.score`` and ``optimized.score``, both measured on the devset
    (``scored_on``); ``improvement_score`` is their difference in percentage points (None without an optimized
    evaluation). ``optimization`` keeps the optimizer's own scores, measured on its validation set
    (``optimization.scored_on``), which is not the devset: they may differ."""

    cycle_id: str
    program_name: str
    create: CreateResult
    baseline: EvaluationResult
    optimization: OptimizationResult
    optimized: EvaluationResult | None = None
    improvement_score: float | None = None  # optimized.score - baseline.score, percentage points, on the devset
    scored_on: Literal["devset"] = "devset"
    validation: dict[str, Any] | None = None
    verdict: DeployVerdict
    phase_runs: dict[str, int] = Field(default_factory=dict)
    # Every model that answered in the cycle; more than one: the comparison mixed models.
    models_used: dict[str, int] = Field(default_factory=dict)
    mixed_models: bool = False
    # The dataset versions each examples field used ({"devset": ["qa@1a2b3c4d5e6f"]}; inline fields are not
    # listed), and "feedback" when the request asked for it ([]: there was no feedback dataset).
    datasets: dict[str, list[str]] = Field(default_factory=dict)

    def record_summary(self) -> dict[str, Any]:
        """What a task record keeps when the whole result is claim-checked: no per-example results."""
        return self.model_dump(mode="json", exclude={"baseline": {"results"}, "optimized": {"results"}})


# ------------------------------------------------------------------------------------------ serving


class PredictRequest(Message):
    program: str = Field(pattern=PROGRAM_NAME)
    inputs: dict[str, Any]
    version: int | None = Field(default=None, ge=1)


class PredictReply(Message):
    program: str
    version: int
    model: str
    outputs: dict[str, Any]
    canary: bool = False
    prediction_id: str | None = None


# ------------------------------------------------------------------------------------------- events


class CyclePhase(EventData):
    """A cycle started a phase (``cycle.phase``): the dashboard shows the program's running phase."""

    topic: ClassVar[str] = "cycle.phase"

    cycle_id: str = Field(description="the cycle task's id")
    program: str = Field(pattern=PROGRAM_NAME, description="the program the cycle optimizes")
    phase: str = Field(max_length=64, description=f"the phase now running: {', '.join(PHASES)}")


class CycleCompleted(EventData):
    """A cycle finished (``cycle.completed``; the guide's ``record_cycle_metrics`` input). Its scores are the
    cycle's own, both on the devset (``scored_on``), and ``improvement`` is their difference; the optimizer's own
    figures, on its validation set, are in the ``optimization.*`` event."""

    topic: ClassVar[str] = "cycle.completed"

    cycle_id: str = Field(description="the cycle task's id")
    program: str = Field(pattern=PROGRAM_NAME, description="the program the cycle optimized")
    model: str | None = Field(default=None, max_length=200, description="the model the optimizer ran on")
    optimizer: str | None = Field(default=None, max_length=200, description="the optimizer that ran")
    baseline_score: FiniteFloat | None = Field(default=None, description="percent, the program before, on the devset")
    optimized_score: FiniteFloat | None = Field(default=None, description="percent, the program after, on the devset")
    improvement: FiniteFloat | None = Field(default=None, description="optimized - baseline score, in points")
    scored_on: Literal["devset"] = Field(default="devset", description="what the scores were measured on")
    cost: FiniteFloat | None = Field(default=None, ge=0, description="USD of the whole cycle's LM calls")
    latency_p95_ms: FiniteFloat | None = Field(default=None, ge=0, description="the optimized program's p95")
    coverage: FiniteFloat = Field(default=1.0, ge=0, le=1, description="the lower answered share of both evaluations")
    mixed_models: bool = Field(default=False, description="more than one model answered in the cycle")
    deployed: bool = Field(default=False, description="the candidate passed the deploy gate")
    unchanged: bool = Field(default=False, description="deployed, and identical to the version already deployed")
    version: int | None = Field(default=None, ge=1, description="the version deployed (or already deployed)")
    reasons: list[str] = Field(default_factory=list, description="why the deploy gate rejected it (every reason)")
    validation: dict[str, Any] | None = Field(
        default=None, description="the validation report, when included (the coordinator leaves it in the task record)"
    )

    @classmethod
    def of(cls, result: CycleResult) -> CycleCompleted:
        """The event of a finished cycle: the cycle's own scores, on the devset, and their difference (not the
        optimizer's figures on its validation set)."""
        optimized, verdict = result.optimized, result.verdict
        return cls(
            cycle_id=result.cycle_id,
            program=result.program_name,
            model=result.optimization.model,
            optimizer=result.optimization.optimizer,
            baseline_score=result.baseline.score,
            optimized_score=optimized.score if optimized else None,
            improvement=result.improvement_score,
            scored_on=result.scored_on,
            cost=round(result.baseline.cost + result.optimization.cost + (optimized.cost if optimized else 0.0), 6),
            latency_p95_ms=optimized.latency_p95_ms if optimized else None,
            coverage=min(result.baseline.coverage, optimized.coverage if optimized else 1.0),
            mixed_models=result.mixed_models,
            deployed=verdict.deployed,
            unchanged=verdict.unchanged,
            version=verdict.version,
            reasons=verdict.reasons,
        )


class DeployCompleted(EventData):
    """A version was deployed (``deploy.completed``): as the program's active version, or as its canary."""

    topic: ClassVar[str] = "deploy.completed"

    program: str = Field(pattern=PROGRAM_NAME, description="the deployed program")
    version: int = Field(ge=1, description="its new version")
    canary: bool = Field(default=False, description="deployed as the canary (a share of the traffic)")
    score: FiniteFloat | None = Field(default=None, description="the version's score, percent on the devset")
    model: str | None = Field(default=None, max_length=200, description="the model it was optimized for")
    cycle_id: str | None = Field(default=None, description="the cycle that made it")


class DeployRejected(EventData):
    """A candidate failed the deploy gate (``deploy.rejected``)."""

    topic: ClassVar[str] = "deploy.rejected"

    program: str = Field(pattern=PROGRAM_NAME, description="the program")
    reasons: list[str] = Field(default_factory=list, description="every objective it missed")
    cycle_id: str | None = Field(default=None, description="the cycle that made the candidate")


class DeployUnchanged(EventData):
    """A candidate identical to the deployed version was not deployed again (``deploy.unchanged``)."""

    topic: ClassVar[str] = "deploy.unchanged"

    program: str = Field(pattern=PROGRAM_NAME, description="the program")
    version: int = Field(ge=1, description="the version it already is")
    canary: bool = Field(default=False, description="that version is the canary")
    cycle_id: str | None = Field(default=None, description="the cycle that made the candidate")
    state_sha256: str | None = Field(default=None, description="the optimized state's hash both share")


class DeployRollback(EventData):
    """A program's canary was dropped, or an earlier version made active again (``deploy.rollback``)."""

    topic: ClassVar[str] = "deploy.rollback"

    program: str = Field(pattern=PROGRAM_NAME, description="the program")
    version: int | None = Field(default=None, ge=1, description="its active version now")
    note: str = Field(default="", description="what the registry did, in words")


class PredictServed(EventData):
    """A deployed program answered a prediction request (``predict.served``)."""

    topic: ClassVar[str] = "predict.served"

    program: str = Field(pattern=PROGRAM_NAME, description="the program")
    version: int = Field(ge=1, description="the version that answered")
    canary: bool = Field(default=False, description="that version is the canary")
    model: str | None = Field(default=None, max_length=200, description="the model it ran on")


class FeedbackRecorded(EventData):
    """Corrections of recorded predictions of one program version were stored (``feedback.recorded``)."""

    topic: ClassVar[str] = "feedback.recorded"

    program: str = Field(pattern=PROGRAM_NAME, description="the program")
    version: int = Field(ge=1, description="the version whose predictions were corrected")
    count: int = Field(ge=1, description="new corrections in the batch")
    agreed: int = Field(ge=0, description="of them, those that agreed with the recorded answer")
    dataset: str | None = Field(default=None, description="the feedback dataset's new version (NAME@VERSION)")

    @model_validator(mode="after")
    def _agreed_within_count(self) -> FeedbackRecorded:
        if self.agreed > self.count:
            raise ValueError(f"agreed ({self.agreed}) is more than count ({self.count})")
        return self


# ------------------------------------------------------------------------------------ the deploy registry


class ProgramName(Message):
    program: str = Field(pattern=PROGRAM_NAME)


class RollbackRequest(Message):
    program: str = Field(pattern=PROGRAM_NAME)
    version: int | None = Field(default=None, ge=1)


class ProgramList(Message):
    programs: list[ProgramPointer]


class ProgramDetail(Message):
    pointer: ProgramPointer
    versions: list[DeployedVersion]
