"""The guide's ``MetricsDashboard`` in plain Python: metric types, labelled series, what each event records,
alert management, and the snapshot that both views (the web page and ``dspyrt dashboard``) read.

    dashboard = MetricsDashboard(rules=load_rules_file(Path("alerts.toml")))
    dashboard.record_cycle_metrics(cycle_result)          # a CycleResult, or a cycle.completed payload
    dashboard.record_event(event)                          # any bus Event; unknown topics are ignored
    transitions = dashboard.evaluate_alerts()              # what fired / resolved since the last call
    view = dashboard.snapshot(SnapshotQuery(program="topic-classifier"))

Nothing here touches NATS; ``dspyrt.agents.dashboard.agent`` feeds it from the event stream.

Events and the series they feed (labels in braces):

=========================  =================================================================================
``cycle.completed``        score, baseline_score, improvement, cycle_cost {program, model, optimizer}: the
                           cycle's scores on its devset, improvement = score - baseline_score (points);
                           program_latency_p95 {program, model}; program_score {program, version} of the
                           version it deployed; validation_pass_rate {program} when the validation is known
``cycle.phase``            the program's running phase (views only)
``optimization.<status>``  optimization_duration {program, optimizer, model}
``lm.call``                lm_latency, lm_tokens, lm_cost, error_rate (0 ok / 1 failed) {model}
``deploy.completed``       program_score {program, version}; the program's active version / canary
``deploy.rejected``        the program's log
``deploy.rollback``        the program's active version / canary
``predict.served``         predictions (running count) {program, version, model}
``feedback.recorded``      feedback (corrections received, running count) and feedback_score (the share of
                           them that agreed with the recorded output, in %) {program, version}
``program.score``          program_score {program, version}: ``{program, version, score}`` from anything
                           that scores live traffic
``validation.completed``   validation_pass_rate {program}: ``{program, passed, score}``
``queue.depth``            queue_depth {kind}: ``{kind, depth}`` (published by the dashboard agent)
``metric.<name>``          the custom metric ``<name>``: ``{value, labels}``
every event                events (running count) {agent}: the publishing agent
=========================  =================================================================================
"""

from __future__ import annotations

import bisect
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import accumulate, islice
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, Field

from dspyrt.agents.dashboard.alerts import Alert, AlertManager, AlertRule, AlertTransition, parse_rules
from dspyrt.bus import DspyrtError, Event, Message

DEFAULT_MAX_POINTS = 2000
DEFAULT_MAX_SERIES = 5000
RATE_WINDOW = 300.0
"""Seconds of outcomes behind an error rate in the views and the exported gauge."""

Aggregate = Literal["last", "rate", "count"]


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
    ``{"value": float, "labels": {str: str}}`` feed it."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    unit: str = Field(default="", max_length=32)
    description: str = Field(default="", max_length=500)
    aggregate: Literal["last", "rate"] = "last"
    registered_at: float | None = None  # set by the dashboard that registers it

    def info(self) -> MetricTypeInfo:
        return MetricTypeInfo(
            name=self.name,
            unit=self.unit,
            description=self.description,
            aggregate=self.aggregate,
            custom=True,
            since=self.registered_at,
        )


# ------------------------------------------------------------------------------------------ series


class MetricPoint(NamedTuple):
    time: float
    value: float


LabelKey = tuple[tuple[str, str], ...]
SeriesKey = tuple[str, LabelKey]


def label_key(labels: Mapping[str, str]) -> LabelKey:
    return tuple(sorted(labels.items()))


class WindowTotal(NamedTuple):
    """The points of a trailing window: the sum of their values and how many there are."""

    total: float
    size: int

    @property
    def rate(self) -> float | None:
        """``total / size`` (failures / calls for an outcome metric); ``None`` for an empty window."""
        return self.total / self.size if self.size else None


def _time(point: MetricPoint) -> float:
    return point.time


class MetricSeries:
    """The points of one metric type for one set of labels, oldest first, at most ``max_points`` of them.

    ``count`` and ``total`` cover every point ever added, including the ones dropped to stay under the limit.
    """

    def __init__(
        self,
        metric_type: str,
        labels: Mapping[str, str] | None = None,
        *,
        max_points: int = DEFAULT_MAX_POINTS,
    ) -> None:
        if max_points < 1:
            raise ValueError("max_points must be at least 1")
        self.metric_type = str(metric_type)
        self.labels: dict[str, str] = dict(sorted((labels or {}).items()))
        self.points: deque[MetricPoint] = deque(maxlen=max_points)
        self.count = 0
        self.total = 0.0
        # Running sums of the points' values (ints), kept while every value is a whole number small enough that
        # adding up any window of points in floats is exact (outcomes, counts): a window's sum is then the
        # difference of two running sums, the very float adding its points gives. ``None`` once one is not.
        self._sums: deque[int] | None = deque(maxlen=max_points)
        self._exact_below = 2.0**53 / max_points

    @property
    def key(self) -> SeriesKey:
        return self.metric_type, label_key(self.labels)

    def add(self, value: float, at: float | None = None, *, coalesce: float = 0.0) -> MetricPoint:
        """Add a point (now, unless ``at``). Points arriving out of order are put in place. With ``coalesce``,
        a point within that many seconds of the last one replaces it (running counts stay small)."""
        point = MetricPoint(time.time() if at is None else float(at), float(value))
        last = self.points[-1] if self.points else None
        exact = point.value.is_integer() and abs(point.value) < self._exact_below
        sums = self._sums if exact else None
        if coalesce and last is not None and 0 <= point.time - last.time < coalesce:
            self.points[-1] = MetricPoint(last.time, point.value)
            if sums is not None:
                sums[-1] += int(point.value) - int(last.value)
        elif last is None or point.time >= last.time:
            self.points.append(point)
            if sums is not None:
                sums.append((sums[-1] if sums else 0) + int(point.value))
        else:
            ordered = list(self.points)
            bisect.insort(ordered, point, key=_time)
            self.points = deque(ordered, maxlen=self.points.maxlen)
            if sums is not None:
                sums = deque(accumulate(int(p.value) for p in self.points), maxlen=self.points.maxlen)
        self._sums = sums
        self.count += 1
        self.total += point.value
        return point

    def ordered(self) -> list[MetricPoint]:
        """The points, oldest first, as a list (a copy)."""
        return list(self.points)

    def latest(self) -> MetricPoint | None:
        return self.points[-1] if self.points else None

    def window(self, seconds: float, now: float | None = None) -> list[MetricPoint]:
        """The points of the last ``seconds`` seconds."""
        start = (time.time() if now is None else now) - seconds
        return [p for p in self.points if p.time >= start]

    def window_total(self, seconds: float, now: float | None = None) -> WindowTotal:
        """Sum and count of the points of the last ``seconds`` seconds (those ``window`` returns), without
        copying them: points are kept in time order, so bisect finds where the window starts."""
        start = (time.time() if now is None else now) - seconds
        first = bisect.bisect_left(self.points, start, key=_time)
        count = len(self.points) - first
        if self._sums is not None and count:
            # The running sum before the window is the one at its first point, less that point's value.
            total = float(self._sums[-1] - self._sums[first] + int(self.points[first].value))
        else:
            # Oldest first, as ``sum(p.value for p in window(...))`` adds them: the same float.
            total = sum(p.value for p in islice(self.points, first, None))
        return WindowTotal(total, count)

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(self.labels.get(k) == v for k, v in labels.items())

    def __len__(self) -> int:
        return len(self.points)

    def __repr__(self) -> str:
        return f"MetricSeries({self.metric_type!r}, {self.labels!r}, {len(self.points)} points)"


def rolling_rate(points: Sequence[MetricPoint], window: float) -> list[MetricPoint]:
    """Each point replaced by the mean of the points in the ``window`` seconds up to it (failures / calls)."""
    out: list[MetricPoint] = []
    start, running = 0, 0.0
    for end, point in enumerate(points):
        running += point.value
        while points[start].time < point.time - window:
            running -= points[start].value
            start += 1
        out.append(MetricPoint(point.time, running / (end - start + 1)))
    return out


def downsample(points: Sequence[MetricPoint], limit: int) -> list[MetricPoint]:
    """At most ``limit`` of the points, evenly spread, always keeping the first and the last."""
    if len(points) <= limit:
        return list(points)
    if limit == 1:
        return [points[-1]]
    step = (len(points) - 1) / (limit - 1)
    return [points[round(i * step)] for i in range(limit)]


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# ------------------------------------------------------------------------------------------- views


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


# --------------------------------------------------------------------------------------- dashboard


@dataclass
class _Program:
    name: str
    cycles: int = 0
    active_version: int | None = None
    canary_version: int | None = None
    phase: str | None = None
    log: deque[LogEntry] = field(default_factory=lambda: deque(maxlen=50))

    def note(self, at: float, topic: str, text: str) -> None:
        self.log.append(LogEntry(time=at, topic=topic, text=text))


def _num(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _text(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None or isinstance(value, dict | list):
        return None
    text = str(value)
    return text if text and len(text) <= 200 else None


def _labels(**values: str | None) -> dict[str, str]:
    return {k: v for k, v in values.items() if v is not None}


def _flat_cycle(cycle: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    """A ``cycle.completed`` payload from either that payload or a ``CycleResult``."""
    data: dict[str, Any] = cycle.model_dump(mode="json") if isinstance(cycle, BaseModel) else dict(cycle)
    if "verdict" not in data:
        return data
    optimization = data.get("optimization") or {}
    baseline = data.get("baseline") or {}
    optimized = data.get("optimized") or {}
    verdict = data.get("verdict") or {}
    costs = [_num(part, "cost") for part in (baseline, optimization, optimized)]
    return {
        "cycle_id": data.get("cycle_id"),
        "program": data.get("program_name"),
        "model": optimization.get("model"),
        "optimizer": optimization.get("optimizer"),
        "baseline_score": baseline.get("score"),
        "optimized_score": optimized.get("score") if optimized else None,
        "cost": round(sum(c for c in costs if c is not None), 6),
        "latency_p95_ms": optimized.get("latency_p95_ms") if optimized else None,
        "deployed": bool(verdict.get("deployed")),
        "version": verdict.get("version"),
        "reasons": verdict.get("reasons", []),
        "validation": data.get("validation"),
    }


def _improvement(data: Mapping[str, Any]) -> float | None:
    """A cycle's improvement: its optimized minus its baseline score, in percentage points, as
    ``dspyrt.agents.optimizers.core.improvement_points`` defines it (not imported: the dashboard stays free of DSPy).
    Derived from the two scores it records beside it, whatever figure the payload carries (an older coordinator sent the
    optimizer's, measured on its validation set); ``None`` without both scores."""
    baseline, optimized = _num(data, "baseline_score"), _num(data, "optimized_score")
    return None if baseline is None or optimized is None else round(optimized - baseline, 4)


PointListener = Callable[[MetricSeries, MetricPoint], None]
"""Called with every point recorded (the OpenTelemetry export listens)."""

_ALERT_EVENTS: dict[str, Literal["firing", "resolved", "action"]] = {
    "firing": "firing",
    "resolved": "resolved",
    "action": "action",
}


class MetricsDashboard:
    """Metric series by type and labels, alert management, and the views' data."""

    def __init__(
        self,
        *,
        rules: Iterable[AlertRule] = (),
        max_points: int = DEFAULT_MAX_POINTS,
        max_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        self.max_points = max_points
        self.max_series = max_series
        self.metric_types: dict[str, MetricTypeInfo] = dict(BUILTIN_TYPES)
        self.metric_series: dict[SeriesKey, MetricSeries] = {}
        self.base_rules: dict[str, AlertRule] = {r.name: r for r in rules}
        self.added_rules: dict[str, AlertRule] = {}
        self.alerts = AlertManager(self.base_rules.values())
        self.alert_log: deque[AlertLogEntry] = deque(maxlen=200)
        self.programs: dict[str, _Program] = {}
        self.stats: Counter[str] = Counter()
        self.last_event_at: float | None = None
        self._event_counts: Counter[str] = Counter()
        self._predictions: Counter[SeriesKey] = Counter()
        self._feedback: dict[tuple[str, str], list[int]] = {}  # (program, version) -> [corrections, agreed]
        self._deployed_scores: set[tuple[str, str]] = set()
        self.listeners: list[PointListener] = []
        self._handlers: dict[str, Callable[[Mapping[str, Any], float, str], None]] = {
            "cycle.completed": self._on_cycle,
            "cycle.phase": self._on_phase,
            "lm.call": self._on_lm_call,
            "deploy.completed": self._on_deploy,
            "deploy.rejected": self._on_rejected,
            "deploy.rollback": self._on_rollback,
            "predict.served": self._on_predict,
            "feedback.recorded": self._on_feedback,
            "program.score": self._on_program_score,
            "validation.completed": self._on_validation,
            "queue.depth": self._on_queue_depth,
            "dashboard.metric_registered": self._on_metric_registered,
            "dashboard.rules": self._on_rules,
        }

    # --- metric types and series -------------------------------------------------------------------

    def register_custom_metric(self, custom: CustomMetricType) -> MetricTypeInfo:
        """Add (or update) a custom metric type; a built-in name cannot be taken."""
        if custom.name in BUILTIN_TYPES:
            raise ValueError(f"{custom.name!r} is a built-in metric type")
        info = custom.info()
        known = self.metric_types.get(custom.name)
        if known is not None and known.since is not None and (info.since is None or known.since < info.since):
            info.since = known.since  # re-registering changes what it says, not since when it counts
        self.metric_types[custom.name] = info
        return info

    def rate_metrics(self) -> set[str]:
        return {name for name, info in self.metric_types.items() if info.aggregate == "rate"}

    def add_series(self, series: MetricSeries) -> MetricSeries:
        """Put a series in the dashboard (the guide's ``metric_series[...] = MetricSeries(...)``)."""
        if series.metric_type not in self.metric_types:
            raise ValueError(f"unknown metric type {series.metric_type!r}; register it first")
        self.metric_series[series.key] = series
        return series

    def record(
        self,
        metric: str,
        value: float,
        labels: Mapping[str, str] | None = None,
        at: float | None = None,
        *,
        coalesce: float = 0.0,
    ) -> MetricSeries | None:
        """Add one point to the series of ``metric`` with ``labels`` (made on first use). ``None`` when the
        dashboard already holds ``max_series`` series (counted in ``stats['dropped_series']``)."""
        metric = str(metric)
        if metric not in self.metric_types:
            raise ValueError(f"unknown metric type {metric!r}")
        key: SeriesKey = (metric, label_key(labels or {}))
        series = self.metric_series.get(key)
        if series is None:
            if len(self.metric_series) >= self.max_series:
                self.stats["dropped_series"] += 1
                return None
            series = self.metric_series[key] = MetricSeries(metric, labels, max_points=self.max_points)
        point = series.add(value, at, coalesce=coalesce)
        for listener in self.listeners:
            listener(series, point)
        return series

    def series(self, metric: str | None = None, labels: Mapping[str, str] | None = None) -> list[MetricSeries]:
        """Every series of ``metric`` (all metrics when ``None``) whose labels include ``labels``."""
        wanted = labels or {}
        return [
            s for s in self.metric_series.values() if (metric is None or s.metric_type == metric) and s.matches(wanted)
        ]

    def _lookup(self, metric: str, labels: Mapping[str, str]) -> Iterator[MetricSeries]:
        yield from self.series(metric, labels)

    # --- events ------------------------------------------------------------------------------------

    def record_event(self, event: Event) -> bool:
        """Record what one event says; ``False`` if its topic is not one the dashboard records."""
        self.stats["events"] += 1
        at = event.time
        self.last_event_at = at if self.last_event_at is None else max(self.last_event_at, at)
        if event.source:
            self._event_counts[event.source] += 1
            self.record(MetricType.EVENTS, self._event_counts[event.source], {"agent": event.source}, at, coalesce=1)
        topic = event.topic
        handler = self._handlers.get(topic)
        try:
            if handler is not None:
                handler(event.data, at, topic)
            elif topic.startswith("optimization."):
                self._on_optimization(event.data, at, topic)
            elif topic.startswith("metric."):
                self._on_custom(event.data, at, topic)
            elif topic.startswith("alert."):
                self._on_alert(event.data, at, topic)
            else:
                self.stats["ignored"] += 1
                return False
        except (TypeError, ValueError, AttributeError, DspyrtError):  # DspyrtError: bad rules (AlertRuleError)
            self.stats["malformed"] += 1
            return False
        return True

    def _program(self, name: str) -> _Program:
        program = self.programs.get(name)
        if program is None:
            program = self.programs[name] = _Program(name)
        return program

    def record_cycle_metrics(self, cycle: Mapping[str, Any] | BaseModel, at: float | None = None) -> list[MetricSeries]:
        """Every figure of a completed cycle as points in its series (the guide's ``record_cycle_metrics``).

        ``cycle`` is a ``cycle.completed`` payload or a ``CycleResult`` (or its dict)."""
        at = time.time() if at is None else at
        data = _flat_cycle(cycle)
        program = _text(data, "program")
        if program is None:
            raise ValueError("a cycle without a program name")
        model, optimizer = _text(data, "model"), _text(data, "optimizer")
        labels = _labels(program=program, model=model, optimizer=optimizer)
        touched: list[MetricSeries | None] = []
        data["improvement"] = _improvement(data)
        for metric, key in (
            (MetricType.SCORE, "optimized_score"),
            (MetricType.BASELINE_SCORE, "baseline_score"),
            (MetricType.IMPROVEMENT, "improvement"),
            (MetricType.CYCLE_COST, "cost"),
        ):
            value = _num(data, key)
            if value is not None:
                touched.append(self.record(metric, value, labels, at))
        latency = _num(data, "latency_p95_ms")
        if latency is not None:
            touched.append(
                self.record(MetricType.PROGRAM_LATENCY_P95, latency, _labels(program=program, model=model), at)
            )
        version = data.get("version")
        score = _num(data, "optimized_score")
        if data.get("deployed") and isinstance(version, int) and score is not None:
            touched.append(self._deployed_score(program, version, score, at))
        validation = data.get("validation")
        if isinstance(validation, Mapping):
            touched.append(self.record_validation(program, validation, at))
        state = self._program(program)
        state.cycles += 1
        state.phase = None
        baseline = _num(data, "baseline_score")
        outcome = (
            f"unchanged: already deployed as v{version}"
            if data.get("deployed") and data.get("unchanged")
            else f"deployed v{version}"
            if data.get("deployed")
            else "not deployed" + (f": {'; '.join(map(str, data.get('reasons') or []))}" if data.get("reasons") else "")
        )
        state.note(at, "cycle.completed", f"cycle {data.get('cycle_id', '?')}: {baseline} → {score}, {outcome}")
        return [s for s in touched if s is not None]

    def record_validation(
        self, program: str, report: Mapping[str, Any], at: float | None = None
    ) -> MetricSeries | None:
        """A validation report's pass rate (its ``score``: the fraction of checks passed) for ``program``."""
        rate = _num(report, "score")
        if rate is None:
            passed = report.get("passed")
            if not isinstance(passed, bool):
                raise ValueError("a validation report without 'score' or 'passed'")
            rate = 1.0 if passed else 0.0
        return self.record(MetricType.VALIDATION_PASS_RATE, rate, {"program": program}, at)

    def _deployed_score(self, program: str, version: int, score: float, at: float) -> MetricSeries | None:
        # A deploy made by a cycle is announced twice (deploy.completed, cycle.completed): one point.
        key = (program, str(version))
        if key in self._deployed_scores:
            return None
        self._deployed_scores.add(key)
        return self.record(MetricType.PROGRAM_SCORE, score, {"program": program, "version": str(version)}, at)

    def _on_cycle(self, data: Mapping[str, Any], at: float, topic: str) -> None:
        self.record_cycle_metrics(data, at)

    def _on_phase(self, data: Mapping[str, Any], at: float, topic: str) -> None:
        program = _text(data, "program")
        if program is None:
            raise ValueError("cycle.phase without a program")
        self._program(program).phase = _text(data, "phase")

    def _on_optimization(self, data: Mapping[str, Any], at: float, topic: str) -> None:
        program = _text(data, "program_name")
        if program is None:
            raise ValueError("optimization event without a program_name")
        labels = _labels(program=program, optimizer=_text(data, "optimizer"), model=_text(data, "model"))
        duration = _num(data, "duration_s")
        if duration is not None:
            self.record(MetricType.OPTIMIZATION_DURATION, duration, labels, at)
        status = topic.split(".", 1)[1]
        self._program(program).note(
            at, topic, f"optimization {status}: {data.get('baseline_score')} → {data.get('optimized_score')}"
        )

    def _on_lm_call(self, data: Mapping[str, Any], at: float, topic: str) -> None:
        model = _text(data, "model")
        if model is None:
            raise ValueError("lm.call without a model")
        labels = {"model": model}
        ok = data.get("ok") is True
        self.record(MetricType.ERROR_RATE, 0.0 if ok else 1.0, labels, at)
        if not ok:
            return
        latency = _num(data, "latency_ms")
        if latency is not None:
            self.record(MetricType.LM_LATENCY, latency, labels, at)
        tokens = (_num(data, "input_tokens") or 0.0) + (_num(data, "output_tokens") or 0.0)
        self.record(MetricType.LM_TOKENS, tokens, labels, at)
        cost = _num(data, "cost")
        if cost is not None:
            self.record(MetricType.LM_COST, cost, labels, at)

    def _on_deploy(self, data: Mapping[str, Any], at: float, topic: str) -> None:
        program = _text(data, "program")
        version = data.get("version")
        if program is None or not isinstance(version, int):
            raise ValueError("deploy.completed without program and version")
        state = self._program(program)
        if data.get("canary"):
            state.canary_version = version
        else:
            state.active_version, state.canary_version = version, None
        score = _num(data, "score")
        if score is not None:
            self._deployed_score(program, version, score, at)
        state.note(at, topic, f"v{version} deployed{' as canary' if data.get('canary') else ''} (score {score})")

    def _on_rejected(self, data: Mapping[str, Any], at: float, topic: str) -> None:
        program = _text(data, "program")
        if program is None:
            raise ValueError("deploy.rejected without a program")
        reasons = data.get("reasons") or []
        self._program(program).note(at, topic, "rejected: " + "; ".join(str(r) for r in reasons))

    def _on_rollback(self, data: Mapping[str, Any], at: float, topic: str) -> None:
        program = _text(data, "program")
        if program is None:
            raise ValueError("deploy.rollback without a program")
        state = self._program(program)
        note = str(data.get("note") or "")
        version = data.get("version")
        if "canary" in note:
            state.canary_version = None
        elif isinstance(version, int):
            state.active_version, state.canary_version = version, None
        state.note(at, topic, note or "rolled back")

    def _on_predict(self, data: Mapping[str, Any], at: float, topic: str) -> None:
        program = _text(data, "program")
        if program is None:
            raise ValueError("predict.served without a program")
        labels = _labels(program=program, version=_text(data, "version"), model=_text(data, "model"))
        key: SeriesKey = (MetricType.PREDICTIONS.value, label_key(labels))
        self._predictions[key] += 1
        self.record(MetricType.PREDICTIONS, self._predictions[key], labels, at, coalesce=1)

    def _on_feedback(self, data: Mapping[str, Any], at: float, topic: str) -> None:
        program, version = _text(data, "program"), _text(data, "version")
        count, agreed = _num(data, "count"), _num(data, "agreed")
        if program is None or version is None or count is None or agreed is None:
            raise ValueError("feedback.recorded needs program, version, count and agreed")
        if not (count >= 1 and 0 <= agreed <= count and count.is_integer() and agreed.is_integer()):
            raise ValueError("feedback.recorded: count >= 1 and 0 <= agreed <= count, whole numbers")
        tally = self._feedback.setdefault((program, version), [0, 0])
        tally[0] += int(count)
        tally[1] += int(agreed)
        labels = {"program": program, "version": version}
        self.record(MetricType.FEEDBACK, tally[0], labels, at, coalesce=1)
        self.record(MetricType.FEEDBACK_SCORE, 100.0 * tally[1] / tally[0], labels, at)
        self._program(program).note(
            at, topic, f"feedback on v{version}: {int(count)} correction(s), {int(agreed)} agreed with its answer"
        )

    def _on_program_score(self, data: Mapping[str, Any], at: float, topic: str) -> None:
        program, version, score = _text(data, "program"), _text(data, "version"), _num(data, "score")
        if program is None or version is None or score is None:
            raise ValueError("program.score needs program, version and score")
        self.record(MetricType.PROGRAM_SCORE, score, {"program": program, "version": version}, at)

    def _on_validation(self, data: Mapping[str, Any], at: float, topic: str) -> None:
        program = _text(data, "program")
        if program is None:
            raise ValueError("validation.completed without a program")
        self.record_validation(program, data, at)

    def _on_queue_depth(self, data: Mapping[str, Any], at: float, topic: str) -> None:
        kind, depth = _text(data, "kind"), _num(data, "depth")
        if kind is None or depth is None:
            raise ValueError("queue.depth needs kind and depth")
        self.record(MetricType.QUEUE_DEPTH, depth, {"kind": kind}, at)

    def _on_custom(self, data: Mapping[str, Any], at: float, topic: str) -> None:
        name = topic.split(".", 1)[1]
        info = self.metric_types.get(name)
        if info is None or not info.custom or (info.since is not None and at < info.since):
            # Not registered (yet): the same on every replica and after a restart, since registrations
            # carry their time.
            self.stats["unknown_metric"] += 1
            return
        value = _num(data, "value")
        labels = data.get("labels") or {}
        if value is None or not isinstance(labels, Mapping):
            raise ValueError(f"metric.{name} needs a numeric 'value' and a 'labels' table")
        if len(labels) > 16 or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ValueError(f"metric.{name}: labels must be at most 16 string pairs")
        self.record(name, value, labels, at)

    def _on_metric_registered(self, data: Mapping[str, Any], at: float, topic: str) -> None:
        self.register_custom_metric(CustomMetricType.model_validate(data))

    def _on_rules(self, data: Mapping[str, Any], at: float, topic: str) -> None:
        rules = parse_rules(data.get("rules", []), source="dashboard.rules event")
        self.set_rules(rules, replace=True)

    def _on_alert(self, data: Mapping[str, Any], at: float, topic: str) -> None:
        kind = _ALERT_EVENTS.get(topic.split(".", 1)[1])
        if kind is None:
            raise ValueError(f"unknown alert event {topic}")
        labels = data.get("labels") or {}
        self.alert_log.append(
            AlertLogEntry(
                time=at,
                event=kind,
                alert=str(data.get("id", "")),
                rule=str(data.get("rule", "")),
                labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {},
                message=str(data.get("message") or data.get("detail") or ""),
                action=data.get("action") if isinstance(data.get("action"), str) else None,
                ok=data.get("ok") if isinstance(data.get("ok"), bool) else None,
                task_id=data.get("task_id") if isinstance(data.get("task_id"), str) else None,
            )
        )

    # --- alerts ------------------------------------------------------------------------------------

    @property
    def rules(self) -> list[AlertRule]:
        """The rules in force: the configured ones, with rules set at run time replacing same-named ones."""
        return list({**self.base_rules, **self.added_rules}.values())

    def set_rules(self, rules: Iterable[AlertRule], *, replace: bool = False) -> None:
        """Add run-time rules (replacing same-named ones), or with ``replace`` make them the only run-time
        rules. Configured rules stay unless a run-time rule takes their name."""
        incoming = {r.name: r for r in rules}
        self.added_rules = incoming if replace else {**self.added_rules, **incoming}
        self.alerts.set_rules(self.rules)

    def configure_rules(self, rules: Iterable[AlertRule]) -> None:
        """Replace the configured (file) rules."""
        self.base_rules = {r.name: r for r in rules}
        self.alerts.set_rules(self.rules)

    def evaluate_alerts(self, now: float | None = None) -> list[AlertTransition]:
        """Check every rule now; the alerts that fired or resolved (an alert already firing is not repeated)."""
        return self.alerts.evaluate(self._lookup, now)

    # --- views -------------------------------------------------------------------------------------

    def _view(self, series: MetricSeries, max_points: int, since: float | None, now: float) -> SeriesView:
        info = self.metric_types.get(series.metric_type) or MetricTypeInfo(name=series.metric_type)
        points: Sequence[MetricPoint] = list(series.points)
        last: MetricPoint | None = points[-1] if points else None
        last_value = last.value if last else None
        if info.aggregate == "rate":
            points = rolling_rate(points, RATE_WINDOW)
            last_value = series.window_total(RATE_WINDOW, now).rate
        if since is not None:
            points = [p for p in points if p.time >= since]
        values = [p.value for p in series.points]
        return SeriesView(
            metric=series.metric_type,
            labels=dict(series.labels),
            unit=info.unit,
            aggregate=info.aggregate,
            points=[(p.time, p.value) for p in downsample(points, max_points)],
            count=series.count,
            last=last_value,
            last_at=last.time if last else None,
            min=min(values) if values else None,
            max=max(values) if values else None,
            mean=math.fsum(values) / len(values) if values else None,
        )

    def _latest(self, metric: str, labels: Mapping[str, str]) -> float | None:
        points = [p for s in self.series(metric, labels) if (p := s.latest()) is not None]
        return max(points, key=lambda p: p.time).value if points else None

    def program_summary(self, name: str) -> ProgramSummary:
        state = self.programs.get(name) or _Program(name)
        wanted = {"program": name}
        return ProgramSummary(
            program=name,
            cycles=state.cycles,
            last_score=self._latest(MetricType.SCORE, wanted),
            last_improvement=self._latest(MetricType.IMPROVEMENT, wanted),
            validation_pass_rate=self._latest(MetricType.VALIDATION_PASS_RATE, wanted),
            feedback=sum(c for (p, _), (c, _a) in self._feedback.items() if p == name),
            feedback_score=self._latest(MetricType.FEEDBACK_SCORE, wanted),
            active_version=state.active_version,
            canary_version=state.canary_version,
            phase=state.phase,
            log=list(state.log)[-20:],
        )

    def model_summary(self, model: str, now: float | None = None) -> ModelSummary:
        now = time.time() if now is None else now
        wanted = {"model": model}
        outcomes = self.series(MetricType.ERROR_RATE, wanted)
        recent = [s.window_total(RATE_WINDOW, now) for s in outcomes]
        calls = sum(w.size for w in recent)
        latencies = [p.value for s in self.series(MetricType.LM_LATENCY, wanted) for p in s.points]
        return ModelSummary(
            model=model,
            calls=sum(s.count for s in outcomes),
            failures=round(sum(s.total for s in outcomes)),
            # Outcomes are 0 or 1, so adding per-series sums gives the very float one sum over all points would.
            error_rate=sum(w.total for w in recent) / calls if calls else None,
            latency_p50_ms=_percentile(latencies, 0.5),
            latency_p95_ms=_percentile(latencies, 0.95),
            tokens=sum(s.total for s in self.series(MetricType.LM_TOKENS, wanted)),
            cost=round(sum(s.total for s in self.series(MetricType.LM_COST, wanted)), 6),
        )

    def program_names(self) -> list[str]:
        names = set(self.programs)
        names.update(s.labels["program"] for s in self.metric_series.values() if "program" in s.labels)
        return sorted(names)

    def model_names(self) -> list[str]:
        return sorted({s.labels["model"] for s in self.metric_series.values() if "model" in s.labels})

    def snapshot(
        self,
        query: SnapshotQuery | None = None,
        *,
        now: float | None = None,
        web_url: str | None = None,
        replaying: bool = False,
    ) -> DashboardSnapshot:
        """The dashboard (or the part ``query`` asks for) as both views show it."""
        q = query or SnapshotQuery()
        now = time.time() if now is None else now
        wanted = _labels(program=q.program, model=q.model)
        series = sorted(self.series(q.metric, wanted), key=lambda s: (s.metric_type, label_key(s.labels)))
        alerts = sorted(
            (a for a in self.alerts.alerts.values() if all(a.labels.get(k) == v for k, v in wanted.items())),
            key=lambda a: (a.state != "firing", -a.updated_at),
        )
        programs = [q.program] if q.program else self.program_names()
        models = [q.model] if q.model else ([] if q.program else self.model_names())
        queues = [
            QueueSummary(kind=s.labels.get("kind", "?"), depth=int(p.value))
            for s in self.series(MetricType.QUEUE_DEPTH)
            if (p := s.latest()) is not None
        ]
        log = [e for e in self.alert_log if all(e.labels.get(k) == v for k, v in wanted.items())]
        return DashboardSnapshot(
            generated_at=now,
            replaying=replaying,
            web_url=web_url,
            events=self.stats["events"],
            last_event_at=self.last_event_at,
            metric_types=sorted(self.metric_types.values(), key=lambda i: (i.custom, i.name)),
            series=[self._view(s, q.max_points, q.since, now) for s in series],
            alerts=alerts,
            alert_log=log[-50:],
            programs=[self.program_summary(p) for p in programs],
            models=[self.model_summary(m, now) for m in models],
            queues=sorted(queues, key=lambda x: x.kind),
            rules=[r.model_dump(mode="json") for r in self.rules],
            stats=dict(self.get_stats()),
        )

    def get_stats(self) -> dict[str, int]:
        """Counts for health and status: events, series, points, firing alerts, and what was skipped."""
        return {
            "events": 0,
            "ignored": 0,
            "malformed": 0,
            "failed": 0,
            "unknown_metric": 0,
            "dropped_series": 0,
            **dict(self.stats),
            "series": len(self.metric_series),
            "points": sum(len(s) for s in self.metric_series.values()),
            "alerts_firing": len(self.alerts.active()),
            "rules": len(self.rules),
        }
