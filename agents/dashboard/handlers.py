"""What each event records: the dashboard reads every event through its type's model (``Model.model_validate``)
and turns it into points in its series, program states and the alert log.

An event whose topic no type here has is ignored (``stats['ignored']``); one that does not validate against its
type, or says something impossible, is malformed (``stats['malformed']``) and skipped. Unknown extra fields are
kept by every event model, so a newer publisher's events are read as far as this dashboard knows them.

The models come from where they are published: ``loop.models`` (cycle, deploy, predict, feedback),
``optimizers.models``, ``switcher.models``, and this area's ``models`` (the rest).

===============================  =====================  =============================================================
topic                            model                  what it records (labels in braces)
===============================  =====================  =============================================================
``cycle.completed``              CycleCompleted         score, baseline_score, improvement, cycle_cost {program, model,
                                                        optimizer}: the cycle's scores on its devset, improvement =
                                                        score - baseline_score (points); program_latency_p95 {program,
                                                        model}; program_score {program, version} of the version it
                                                        deployed; validation_pass_rate {program} when it is known
``cycle.phase``                  CyclePhase             the program's running phase (views only)
``optimization.<status>``        OptimizationFinished   optimization_duration {program, optimizer, model}
``lm.call``                      LmCall                 lm_latency, lm_tokens, lm_cost, error_rate (0 ok / 1 failed)
                                                        {model}
``deploy.completed``             DeployCompleted        program_score {program, version}; active version / canary
``deploy.rejected``              DeployRejected         the program's log
``deploy.rollback``              DeployRollback         the program's active version / canary
``predict.served``               PredictServed          predictions (running count) {program, version, model}
``feedback.recorded``            FeedbackRecorded       feedback (corrections, running count) and feedback_score (the
                                                        share that agreed with the recorded output, %) {program,
                                                        version}
``program.score``                ProgramScore           program_score {program, version}
``validation.completed``         ValidationCompleted    validation_pass_rate {program}
``queue.depth``                  QueueDepth             queue_depth {kind} (published by the dashboard agent)
``metric.<name>``                CustomMetricValue      the custom metric ``<name>``, once registered
``dashboard.metric_registered``  MetricRegistered       the custom metric type
``dashboard.rules``              RulesChanged           the run-time alert rules
``alert.firing|resolved``        AlertChanged           the alert log
``alert.action``                 AlertAction            the alert log
every event                                             events (running count) {agent}: the publishing agent
===============================  =====================  =============================================================
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dspyrt.agents.dashboard.alerts import AlertRule, parse_rules
from dspyrt.agents.dashboard.models import (
    AlertAction,
    AlertChanged,
    AlertFiring,
    AlertLogEntry,
    AlertResolved,
    CustomMetricValue,
    LogEntry,
    MetricRegistered,
    MetricType,
    ProgramScore,
    QueueDepth,
    RulesChanged,
    ValidationCompleted,
)
from dspyrt.agents.dashboard.series import MetricSeries, SeriesKey, SeriesStore, label_key
from dspyrt.agents.loop.models import (
    CycleCompleted,
    CyclePhase,
    CycleResult,
    DeployCompleted,
    DeployRejected,
    DeployRollback,
    FeedbackRecorded,
    PredictServed,
)
from dspyrt.agents.optimizers.models import OptimizationFinished
from dspyrt.agents.switcher.models import LmCall
from dspyrt.bus import DspyrtError, Event
from dspyrt.bus.events import EventData, event_type_of

READS: tuple[type[EventData], ...] = (
    CycleCompleted,
    CyclePhase,
    OptimizationFinished,
    LmCall,
    DeployCompleted,
    DeployRejected,
    DeployRollback,
    PredictServed,
    FeedbackRecorded,
    ProgramScore,
    ValidationCompleted,
    QueueDepth,
    CustomMetricValue,
    MetricRegistered,
    RulesChanged,
    AlertFiring,
    AlertResolved,
    AlertAction,
)
"""The event types the dashboard records."""


@dataclass
class ProgramState:
    """What the views say of one program besides its series: cycles, versions, the running phase, a log."""

    name: str
    cycles: int = 0
    active_version: int | None = None
    canary_version: int | None = None
    phase: str | None = None
    log: deque[LogEntry] = field(default_factory=lambda: deque(maxlen=50))

    def note(self, at: float, topic: str, text: str) -> None:
        self.log.append(LogEntry(time=at, topic=topic, text=text))


def _labels(**values: str | None) -> dict[str, str]:
    return {k: v for k, v in values.items() if v}


def completed_cycle(cycle: CycleCompleted | CycleResult | Mapping[str, Any]) -> CycleCompleted:
    """A ``cycle.completed`` event from that event (or its payload) or from a ``CycleResult`` (or its JSON), whose
    validation report it then carries."""
    if isinstance(cycle, Mapping):
        cycle = CycleResult.model_validate(cycle) if "verdict" in cycle else CycleCompleted.model_validate(cycle)
    if isinstance(cycle, CycleResult):
        return CycleCompleted.of(cycle).model_copy(update={"validation": cycle.validation})
    return cycle


def improvement(cycle: CycleCompleted) -> float | None:
    """A cycle's improvement: its optimized minus its baseline score, in percentage points, as
    ``dspyrt.agents.optimizers.models.improvement_points`` defines it. Derived from the two scores recorded beside
    it, whatever figure the event carries (an older coordinator sent the optimizer's, measured on its validation
    set); ``None`` without both scores."""
    baseline, optimized = cycle.baseline_score, cycle.optimized_score
    return None if baseline is None or optimized is None else round(optimized - baseline, 4)


class EventRecorder:
    """Turns events into points in ``store``, program states and the alert log; ``apply_rules`` takes the
    run-time alert rules a ``dashboard.rules`` event sets."""

    def __init__(self, store: SeriesStore, apply_rules: Callable[[list[AlertRule]], None]) -> None:
        self.store = store
        self.apply_rules = apply_rules
        self.programs: dict[str, ProgramState] = {}
        self.alert_log: deque[AlertLogEntry] = deque(maxlen=200)
        self.stats: Counter[str] = Counter()
        self.last_event_at: float | None = None
        self._event_counts: Counter[str] = Counter()
        self._predictions: Counter[SeriesKey] = Counter()
        self._feedback: dict[tuple[str, str], list[int]] = {}  # (program, version) -> [corrections, agreed]
        self._deployed_scores: set[tuple[str, str]] = set()

    def record_event(self, event: Event) -> bool:
        """Record what one event says; ``False`` if its topic is not one the dashboard records, or it is malformed."""
        self.stats["events"] += 1
        at = event.time
        self.last_event_at = at if self.last_event_at is None else max(self.last_event_at, at)
        if event.source:
            self._event_counts[event.source] += 1
            counted = self._event_counts[event.source]
            self.store.record(MetricType.EVENTS, counted, {"agent": event.source}, at, coalesce=1)
        kind = event_type_of(event.topic, READS)
        if kind is None:
            self.stats["ignored"] += 1
            return False
        try:
            self._record(kind.model_validate(event.data), at, event.topic)
        except (ValueError, DspyrtError):  # pydantic's ValidationError is a ValueError; DspyrtError: AlertRuleError
            self.stats["malformed"] += 1
            return False
        return True

    def _record(self, data: EventData, at: float, topic: str) -> None:
        match data:
            case CycleCompleted():
                self.record_cycle(data, at)
            case CyclePhase():
                self.program(data.program).phase = data.phase
            case OptimizationFinished():
                self._optimization(data, at, topic)
            case LmCall():
                self._lm_call(data, at)
            case DeployCompleted():
                self._deployed(data, at, topic)
            case DeployRejected():
                self.program(data.program).note(at, topic, "rejected: " + "; ".join(data.reasons))
            case DeployRollback():
                self._rolled_back(data, at, topic)
            case PredictServed():
                self._served(data, at)
            case FeedbackRecorded():
                self._feedback_recorded(data, at, topic)
            case ProgramScore():
                labels = {"program": data.program, "version": str(data.version)}
                self.store.record(MetricType.PROGRAM_SCORE, data.score, labels, at)
            case ValidationCompleted():
                self.record_validation(data.program, data, at)
            case QueueDepth():
                self.store.record(MetricType.QUEUE_DEPTH, data.depth, {"kind": data.kind}, at)
            case CustomMetricValue():
                self._custom(data, at, topic)
            case MetricRegistered():
                self.store.register_custom_metric(data)
            case RulesChanged():
                self.apply_rules(parse_rules(data.rules, source="dashboard.rules event"))
            case AlertChanged() | AlertAction():
                self._alert_log(data, at)

    def program(self, name: str) -> ProgramState:
        program = self.programs.get(name)
        if program is None:
            program = self.programs[name] = ProgramState(name)
        return program

    def feedback_count(self, program: str) -> int:
        """Corrections received for ``program``, every version."""
        return sum(count for (p, _), (count, _agreed) in self._feedback.items() if p == program)

    # --- cycles and validations --------------------------------------------------------------------

    def record_cycle(self, cycle: CycleCompleted, at: float) -> list[MetricSeries]:
        """Every figure of a completed cycle as points in its series; the series it added to."""
        program = cycle.program
        labels = _labels(program=program, model=cycle.model, optimizer=cycle.optimizer)
        touched: list[MetricSeries | None] = []
        for metric, value in (
            (MetricType.SCORE, cycle.optimized_score),
            (MetricType.BASELINE_SCORE, cycle.baseline_score),
            (MetricType.IMPROVEMENT, improvement(cycle)),
            (MetricType.CYCLE_COST, cycle.cost),
        ):
            if value is not None:
                touched.append(self.store.record(metric, value, labels, at))
        if cycle.latency_p95_ms is not None:
            latency_labels = _labels(program=program, model=cycle.model)
            touched.append(self.store.record(MetricType.PROGRAM_LATENCY_P95, cycle.latency_p95_ms, latency_labels, at))
        if cycle.deployed and cycle.version is not None and cycle.optimized_score is not None:
            touched.append(self._deployed_score(program, cycle.version, cycle.optimized_score, at))
        if cycle.validation is not None:
            touched.append(self.record_validation(program, cycle.validation, at))
        state = self.program(program)
        state.cycles += 1
        state.phase = None
        outcome = (
            f"unchanged: already deployed as v{cycle.version}"
            if cycle.deployed and cycle.unchanged
            else f"deployed v{cycle.version}"
            if cycle.deployed
            else "not deployed" + (f": {'; '.join(cycle.reasons)}" if cycle.reasons else "")
        )
        text = f"cycle {cycle.cycle_id}: {cycle.baseline_score} → {cycle.optimized_score}, {outcome}"
        state.note(at, CycleCompleted.topic, text)
        return [s for s in touched if s is not None]

    def record_validation(
        self, program: str, report: ValidationCompleted | Mapping[str, Any], at: float
    ) -> MetricSeries | None:
        """A validation's pass rate (its ``score``: the fraction of checks passed; else ``passed``) for
        ``program``. ``report``: the event, or a validation report (``ValueError`` without either figure)."""
        if not isinstance(report, ValidationCompleted):
            report = ValidationCompleted.model_validate({**report, "program": program})
        return self.store.record(MetricType.VALIDATION_PASS_RATE, report.pass_rate, {"program": program}, at)

    def _deployed_score(self, program: str, version: int, score: float, at: float) -> MetricSeries | None:
        # A deploy made by a cycle is announced twice (deploy.completed, cycle.completed): one point.
        key = (program, str(version))
        if key in self._deployed_scores:
            return None
        self._deployed_scores.add(key)
        return self.store.record(MetricType.PROGRAM_SCORE, score, {"program": program, "version": str(version)}, at)

    # --- the other events ----------------------------------------------------------------------------

    def _optimization(self, data: OptimizationFinished, at: float, topic: str) -> None:
        labels = _labels(program=data.program_name, optimizer=data.optimizer, model=data.model)
        if data.duration_s is not None:
            self.store.record(MetricType.OPTIMIZATION_DURATION, data.duration_s, labels, at)
        text = f"optimization {data.status}: {data.baseline_score} → {data.optimized_score}"
        self.program(data.program_name).note(at, topic, text)

    def _lm_call(self, data: LmCall, at: float) -> None:
        labels = {"model": data.model}
        self.store.record(MetricType.ERROR_RATE, 0.0 if data.ok else 1.0, labels, at)
        if not data.ok:
            return
        if data.latency_ms is not None:
            self.store.record(MetricType.LM_LATENCY, data.latency_ms, labels, at)
        self.store.record(MetricType.LM_TOKENS, data.input_tokens + data.output_tokens, labels, at)
        if data.cost is not None:
            self.store.record(MetricType.LM_COST, data.cost, labels, at)

    def _deployed(self, data: DeployCompleted, at: float, topic: str) -> None:
        state = self.program(data.program)
        if data.canary:
            state.canary_version = data.version
        else:
            state.active_version, state.canary_version = data.version, None
        if data.score is not None:
            self._deployed_score(data.program, data.version, data.score, at)
        state.note(at, topic, f"v{data.version} deployed{' as canary' if data.canary else ''} (score {data.score})")

    def _rolled_back(self, data: DeployRollback, at: float, topic: str) -> None:
        state = self.program(data.program)
        if "canary" in data.note:
            state.canary_version = None
        elif data.version is not None:
            state.active_version, state.canary_version = data.version, None
        state.note(at, topic, data.note or "rolled back")

    def _served(self, data: PredictServed, at: float) -> None:
        labels = _labels(program=data.program, version=str(data.version), model=data.model)
        key: SeriesKey = (MetricType.PREDICTIONS.value, label_key(labels))
        self._predictions[key] += 1
        self.store.record(MetricType.PREDICTIONS, self._predictions[key], labels, at, coalesce=1)

    def _feedback_recorded(self, data: FeedbackRecorded, at: float, topic: str) -> None:
        version = str(data.version)
        tally = self._feedback.setdefault((data.program, version), [0, 0])
        tally[0] += data.count
        tally[1] += data.agreed
        labels = {"program": data.program, "version": version}
        self.store.record(MetricType.FEEDBACK, tally[0], labels, at, coalesce=1)
        self.store.record(MetricType.FEEDBACK_SCORE, 100.0 * tally[1] / tally[0], labels, at)
        text = f"feedback on v{version}: {data.count} correction(s), {data.agreed} agreed with its answer"
        self.program(data.program).note(at, topic, text)

    def _custom(self, data: CustomMetricValue, at: float, topic: str) -> None:
        name = topic.split(".", 1)[1]
        info = self.store.metric_types.get(name)
        if info is None or not info.custom or (info.since is not None and at < info.since):
            # Not registered (yet): the same on every replica and after a restart, since registrations
            # carry their time.
            self.stats["unknown_metric"] += 1
            return
        self.store.record(name, data.value, data.labels, at)

    def _alert_log(self, data: AlertChanged | AlertAction, at: float) -> None:
        if isinstance(data, AlertAction):
            entry = AlertLogEntry(
                time=at, event="action", alert=data.id, rule=data.rule, labels=data.labels, message=data.detail,
                action=data.action, ok=data.ok, task_id=data.task_id,
            )  # fmt: skip
        else:
            entry = AlertLogEntry(
                time=at, event=data.state, alert=data.id, rule=data.rule, labels=data.labels, message=data.message
            )
        self.alert_log.append(entry)
