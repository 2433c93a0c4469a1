"""The dashboard's messages: metric types, the snapshot both views show and the other replies of
``<prefix>.dashboard.*``, and the events the dashboard publishes (alerts, rules, custom metrics, queue depths) or
reads from publishers outside this project (live scores, validation results, custom metric points).

The events it reads from the other agents are defined where they are published (``dspyrt.agents.loop.models``,
``dspyrt.agents.optimizers.models``, ``dspyrt.agents.switcher.models``); :mod:`dspyrt.agents.dashboard.handlers`
says what each one records.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, model_validator

from dspyrt.agents.dashboard.alerts import Alert
from dspyrt.agents.loop.models import PROGRAM_NAME
from dspyrt.bus import Message
from dspyrt.bus.events import EventData

Aggregate = Literal["last", "rate", "count"]

# ------------------------------------------------------------------------------------------ metric types


class MetricType(StrEnum):
    """The built-in metric types."""

    SCORE = "score"
    BASELINE_SCORE = "baseline_score"
    IMPROVEMENT = "improvement"
    CYCLE_COST = "cycle_cost"
    PROGRAM_SCORE = "program_score"
    PROGRAM_LATENCY_P95 = "program_latency_p95"
    VALIDATION_PASS_RATE = "validation_pass_rate"
    OPTIMIZATION_DURATION = "optimization_duration"
    LM_LATENCY = "lm_latency"
    LM_TOKENS = "lm_tokens"
    LM_COST = "lm_cost"
    ERROR_RATE = "error_rate"
    PREDICTIONS = "predictions"
    FEEDBACK = "feedback"
    FEEDBACK_SCORE = "feedback_score"
    QUEUE_DEPTH = "queue_depth"
    EVENTS = "events"


class MetricTypeInfo(BaseModel):
    """What a metric type means. ``aggregate``: ``last`` (a value per point), ``rate`` (one 0/1 outcome per
    call; views show failures / calls over a window), ``count`` (a running count)."""

    name: str
    unit: str = ""
    description: str = ""
    aggregate: Aggregate = "last"
    custom: bool = False
    since: float | None = None  # custom types: events older than their registration are not theirs


def _info(metric: MetricType, unit: str, description: str, aggregate: Aggregate = "last") -> MetricTypeInfo:
    return MetricTypeInfo(name=metric.value, unit=unit, description=description, aggregate=aggregate)


BUILTIN_TYPES: dict[str, MetricTypeInfo] = {
    info.name: info
    for info in (
        _info(MetricType.SCORE, "%", "optimized score of each completed cycle"),
        _info(MetricType.BASELINE_SCORE, "%", "baseline score of each completed cycle"),
        _info(MetricType.IMPROVEMENT, "pp", "optimized minus baseline score of each completed cycle"),
        _info(MetricType.CYCLE_COST, "USD", "LM cost of each completed cycle"),
        _info(MetricType.PROGRAM_SCORE, "%", "score of a deployed version (deploys, program.score events)"),
        _info(MetricType.PROGRAM_LATENCY_P95, "ms", "p95 latency of the optimized program in its evaluation"),
        _info(MetricType.VALIDATION_PASS_RATE, "ratio", "fraction of validation checks passed"),
        _info(MetricType.OPTIMIZATION_DURATION, "s", "duration of each optimization run"),
        _info(MetricType.LM_LATENCY, "ms", "latency of each LM call"),
        _info(MetricType.LM_TOKENS, "tokens", "input + output tokens of each LM call"),
        _info(MetricType.LM_COST, "USD", "cost of each LM call"),
        _info(MetricType.ERROR_RATE, "ratio", "LM call outcomes (1 failed, 0 ok); shown as a rate", "rate"),
        _info(MetricType.PREDICTIONS, "predictions", "predictions served (running count)", "count"),
        _info(MetricType.FEEDBACK, "corrections", "corrections of recorded predictions (running count)", "count"),
        _info(MetricType.FEEDBACK_SCORE, "%", "share of corrections that agreed with the recorded output"),
        _info(MetricType.QUEUE_DEPTH, "tasks", "tasks waiting or running per task kind"),
        _info(MetricType.EVENTS, "events", "events published per agent (running count)", "count"),
    )
}


class CustomMetricType(Message):
    """A metric type added at run time (the guide's CustomMetricType); ``metric.<name>`` events
    (:class:`CustomMetricValue`) feed it."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$", description="the metric type's name")
    unit: str = Field(default="", max_length=32, description="the unit its values are in")
    description: str = Field(default="", max_length=500, description="what it measures")
    aggregate: Literal["last", "rate"] = Field(
        default="last", description="last: a value per point; rate: one 0/1 outcome per call"
    )
    registered_at: float | None = Field(default=None, description="when the dashboard registered it (Unix seconds)")

    def info(self) -> MetricTypeInfo:
        return MetricTypeInfo(
            name=self.name,
            unit=self.unit,
            description=self.description,
            aggregate=self.aggregate,
            custom=True,
            since=self.registered_at,
        )


# ------------------------------------------------------------------------------------------------ views


class LogEntry(BaseModel):
    time: float
    topic: str
    text: str


class AlertLogEntry(BaseModel):
    """A line of alert history: a transition (``firing`` / ``resolved``) or an ``action`` taken."""

    time: float
    event: Literal["firing", "resolved", "action"]
    alert: str = ""
    rule: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    message: str = ""
    action: str | None = None
    ok: bool | None = None
    task_id: str | None = None


class SeriesView(BaseModel):
    metric: str
    labels: dict[str, str]
    unit: str = ""
    aggregate: Aggregate = "last"
    points: list[tuple[float, float]] = Field(default_factory=list)
    count: int = 0
    last: float | None = None
    last_at: float | None = None
    min: float | None = None
    max: float | None = None
    mean: float | None = None


class ProgramSummary(BaseModel):
    program: str
    cycles: int = 0
    last_score: float | None = None
    last_improvement: float | None = None
    validation_pass_rate: float | None = None
    feedback: int = 0  # corrections received, every version
    feedback_score: float | None = None  # % of them that agreed with the program's answer, latest version's
    active_version: int | None = None
    canary_version: int | None = None
    phase: str | None = None
    log: list[LogEntry] = Field(default_factory=list)


class ModelSummary(BaseModel):
    model: str
    calls: int = 0
    failures: int = 0
    error_rate: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    tokens: float = 0.0
    cost: float = 0.0


class QueueSummary(BaseModel):
    kind: str
    depth: int


class SnapshotQuery(Message):
    """Which part of the dashboard to return: everything, or one program / model / metric."""

    program: str | None = None
    model: str | None = None
    metric: str | None = None
    max_points: int = Field(default=120, ge=1, le=2000)
    since: float | None = None


class DashboardSnapshot(BaseModel):
    """The dashboard as both views show it."""

    generated_at: float
    replaying: bool = False
    web_url: str | None = None
    events: int = 0
    last_event_at: float | None = None
    metric_types: list[MetricTypeInfo] = Field(default_factory=list)
    series: list[SeriesView] = Field(default_factory=list)
    alerts: list[Alert] = Field(default_factory=list)
    alert_log: list[AlertLogEntry] = Field(default_factory=list)
    programs: list[ProgramSummary] = Field(default_factory=list)
    models: list[ModelSummary] = Field(default_factory=list)
    queues: list[QueueSummary] = Field(default_factory=list)
    rules: list[dict[str, Any]] = Field(default_factory=list)
    stats: dict[str, int] = Field(default_factory=dict)


# -------------------------------------------------------------------------------------------- endpoints


class AlertList(Message):
    alerts: list[Alert]


class RuleList(Message):
    rules: list[dict[str, Any]]


class SetRules(Message):
    """Rules to add (same name: replace) or, with ``replace``, the complete set of run-time rules. Rules from
    the alerts file stay unless a run-time rule takes their name."""

    rules: list[dict[str, Any]] = Field(default_factory=list, max_length=500)
    replace: bool = False


class MetricTypeList(Message):
    metric_types: list[MetricTypeInfo]


# ------------------------------------------------------------------------------- events it publishes


class AlertChanged(Alert, EventData):
    """An alert changed state: its new state, as kept in the dashboard's KV bucket."""

    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="after")
    def _state_of_the_topic(self) -> AlertChanged:
        if self.topic and self.topic.rpartition(".")[2] != self.state:
            raise ValueError(f"an alert in state {self.state!r} on {self.topic}")
        return self

    @staticmethod
    def of(alert: Alert) -> AlertChanged:
        """The event of ``alert``'s new state: :class:`AlertFiring` or :class:`AlertResolved`."""
        kind = AlertFiring if alert.state == "firing" else AlertResolved
        return kind.model_validate(alert.model_dump())


class AlertFiring(AlertChanged):
    """An alert fired (``alert.firing``): one instance of the dashboard publishes it, once per episode."""

    topic: ClassVar[str] = "alert.firing"


class AlertResolved(AlertChanged):
    """A firing alert resolved (``alert.resolved``)."""

    topic: ClassVar[str] = "alert.resolved"


class AlertAction(EventData):
    """What the dashboard did about a firing alert (``alert.action``): roll a canary back, start a cycle, or
    nothing (and why)."""

    topic: ClassVar[str] = "alert.action"

    id: str = Field(description="the alert's id")
    rule: str = Field(description="the alert's rule")
    labels: dict[str, str] = Field(default_factory=dict, description="the labels of the alert's series")
    episode: int = Field(default=0, ge=0, description="the alert's episode the action answers")
    action: Literal["rollback", "cycle", "none"] = Field(description="what was done")
    ok: bool = Field(description="whether it was done")
    detail: str = Field(default="", description="what happened, in words")
    task_id: str | None = Field(default=None, description="the cycle task started (action cycle)")


class RulesChanged(EventData):
    """The run-time alert rules changed (``dashboard.rules``): every replica applies them."""

    topic: ClassVar[str] = "dashboard.rules"

    rules: list[dict[str, Any]] = Field(description="the complete set of run-time rules, as set_rules takes them")


class MetricRegistered(CustomMetricType, EventData):
    """A custom metric type was registered (``dashboard.metric_registered``): every replica learns it."""

    model_config = ConfigDict(extra="allow", strict=True)

    topic: ClassVar[str] = "dashboard.metric_registered"


class QueueDepth(EventData):
    """Tasks of one kind waiting or running changed (``queue.depth``; read from the task stream)."""

    topic: ClassVar[str] = "queue.depth"

    kind: str = Field(max_length=200, description="the task kind")
    depth: int = Field(ge=0, description="tasks of that kind waiting or running")


# ------------------------------------------------------------------- events it reads from anyone


class ProgramScore(EventData):
    """A live score of a deployed version (``program.score``), from anything that scores live traffic."""

    topic: ClassVar[str] = "program.score"

    program: str = Field(pattern=PROGRAM_NAME, description="the program")
    version: int = Field(ge=1, description="the deployed version scored")
    score: FiniteFloat = Field(description="its score, percent")


class ValidationCompleted(EventData):
    """A validation of a program's outputs finished (``validation.completed``): its ``score`` (the fraction of
    checks passed) or, without one, ``passed``."""

    topic: ClassVar[str] = "validation.completed"

    program: str = Field(pattern=PROGRAM_NAME, description="the program validated")
    passed: bool | None = Field(default=None, description="no blocking failure")
    score: FiniteFloat | None = Field(default=None, ge=0, le=1, description="the fraction of checks passed")

    @model_validator(mode="after")
    def _score_or_passed(self) -> ValidationCompleted:
        if self.score is None and self.passed is None:
            raise ValueError("a validation result needs 'score' or 'passed'")
        return self

    @property
    def pass_rate(self) -> float:
        """The fraction of checks passed: ``score``, else 1 or 0 as ``passed`` says."""
        return self.score if self.score is not None else float(bool(self.passed))


class CustomMetricValue(EventData):
    """A point of a custom metric type (``metric.<name>``; counted from the type's registration on)."""

    topic: ClassVar[str] = "metric.*"

    value: FiniteFloat = Field(description="the point's value")
    labels: dict[str, str] = Field(default_factory=dict, max_length=16, description="its series' labels")
