"""The guide's ``MetricsDashboard`` in plain Python: metric series from events, alert management, and the snapshot
that both views (the web page and ``dspyrt dashboard``) read.

    dashboard = MetricsDashboard(rules=load_rules_file(Path("alerts.toml")))
    dashboard.record_cycle_metrics(cycle_result)          # a CycleResult, or a cycle.completed event
    dashboard.record_event(event)                          # any bus Event; unknown topics are ignored
    transitions = dashboard.evaluate_alerts()              # what fired / resolved since the last call
    view = dashboard.snapshot(SnapshotQuery(program="topic-classifier"))

Nothing here touches NATS; ``dspyrt.agents.dashboard.agent`` feeds it from the event stream. The parts, one idea
each: :mod:`~dspyrt.agents.dashboard.series` (the time-series store), :mod:`~dspyrt.agents.dashboard.handlers`
(what each event records), :mod:`~dspyrt.agents.dashboard.alerts` (rules and alert states) and
:mod:`~dspyrt.agents.dashboard.views` (what the views show).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from dspyrt.agents.dashboard import views
from dspyrt.agents.dashboard.alerts import AlertManager, AlertRule, AlertTransition
from dspyrt.agents.dashboard.handlers import EventRecorder, ProgramState, completed_cycle
from dspyrt.agents.dashboard.models import (
    AlertLogEntry,
    CustomMetricType,
    DashboardSnapshot,
    MetricTypeInfo,
    ModelSummary,
    ProgramSummary,
    SnapshotQuery,
    ValidationCompleted,
)
from dspyrt.agents.dashboard.series import (
    DEFAULT_MAX_POINTS,
    DEFAULT_MAX_SERIES,
    MetricSeries,
    PointListener,
    SeriesKey,
    SeriesStore,
)
from dspyrt.agents.loop.models import CycleCompleted, CycleResult
from dspyrt.bus import Event


class MetricsDashboard:
    """Metric series by type and labels, alert management, and the views' data."""

    def __init__(
        self,
        *,
        rules: Iterable[AlertRule] = (),
        max_points: int = DEFAULT_MAX_POINTS,
        max_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        self.store = SeriesStore(max_points=max_points, max_series=max_series)
        self.recorder = EventRecorder(self.store, lambda rules: self.set_rules(rules, replace=True))
        self.base_rules: dict[str, AlertRule] = {r.name: r for r in rules}
        self.added_rules: dict[str, AlertRule] = {}
        self.alerts = AlertManager(self.base_rules.values())

    # --- what the store and the recorder hold --------------------------------------------------------

    @property
    def metric_types(self) -> dict[str, MetricTypeInfo]:
        return self.store.metric_types

    @property
    def metric_series(self) -> dict[SeriesKey, MetricSeries]:
        return self.store.metric_series

    @property
    def listeners(self) -> list[PointListener]:
        """Called with every point recorded (the OpenTelemetry export listens)."""
        return self.store.listeners

    @property
    def programs(self) -> dict[str, ProgramState]:
        return self.recorder.programs

    @property
    def alert_log(self) -> deque[AlertLogEntry]:
        return self.recorder.alert_log

    @property
    def stats(self) -> Counter[str]:
        """Events seen, ignored, malformed, failed (counted by the agent) and custom points of unknown types."""
        return self.recorder.stats

    @property
    def last_event_at(self) -> float | None:
        return self.recorder.last_event_at

    # --- metric types and series -------------------------------------------------------------------

    def register_custom_metric(self, custom: CustomMetricType) -> MetricTypeInfo:
        """Add (or update) a custom metric type; a built-in name cannot be taken."""
        return self.store.register_custom_metric(custom)

    def rate_metrics(self) -> set[str]:
        return self.store.rate_metrics()

    def add_series(self, series: MetricSeries) -> MetricSeries:
        """Put a series in the dashboard (the guide's ``metric_series[...] = MetricSeries(...)``)."""
        return self.store.add_series(series)

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
        dashboard already holds ``max_series`` series (counted in ``get_stats()['dropped_series']``)."""
        return self.store.record(metric, value, labels, at, coalesce=coalesce)

    def series(self, metric: str | None = None, labels: Mapping[str, str] | None = None) -> list[MetricSeries]:
        """Every series of ``metric`` (all metrics when ``None``) whose labels include ``labels``."""
        return self.store.series(metric, labels)

    def _lookup(self, metric: str, labels: Mapping[str, str]) -> Iterator[MetricSeries]:
        yield from self.store.series(metric, labels)

    # --- events ------------------------------------------------------------------------------------

    def record_event(self, event: Event) -> bool:
        """Record what one event says; ``False`` if its topic is not one the dashboard records, or it does not
        validate against its type (counted in ``stats``)."""
        return self.recorder.record_event(event)

    def record_cycle_metrics(
        self, cycle: CycleCompleted | CycleResult | Mapping[str, Any], at: float | None = None
    ) -> list[MetricSeries]:
        """Every figure of a completed cycle as points in its series (the guide's ``record_cycle_metrics``).

        ``cycle`` is a ``cycle.completed`` event (or its payload) or a ``CycleResult`` (or its JSON);
        ``ValueError`` (pydantic's ``ValidationError``) when it is neither."""
        return self.recorder.record_cycle(completed_cycle(cycle), time.time() if at is None else at)

    def record_validation(
        self, program: str, report: ValidationCompleted | Mapping[str, Any], at: float | None = None
    ) -> MetricSeries | None:
        """A validation report's pass rate (its ``score``: the fraction of checks passed) for ``program``."""
        return self.recorder.record_validation(program, report, time.time() if at is None else at)

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

    def program_summary(self, name: str) -> ProgramSummary:
        return views.program_summary(self.store, self.recorder, name)

    def model_summary(self, model: str, now: float | None = None) -> ModelSummary:
        return views.model_summary(self.store, model, now)

    def program_names(self) -> list[str]:
        return views.program_names(self.store, self.recorder)

    def model_names(self) -> list[str]:
        return views.model_names(self.store)

    def snapshot(
        self,
        query: SnapshotQuery | None = None,
        *,
        now: float | None = None,
        web_url: str | None = None,
        replaying: bool = False,
    ) -> DashboardSnapshot:
        """The dashboard (or the part ``query`` asks for) as both views show it."""
        return views.snapshot(
            self.store,
            self.recorder,
            self.alerts,
            self.rules,
            query or SnapshotQuery(),
            stats=self.get_stats(),
            now=time.time() if now is None else now,
            web_url=web_url,
            replaying=replaying,
        )

    def get_stats(self) -> dict[str, int]:
        """Counts for health and status: events, series, points, firing alerts, and what was skipped."""
        return {
            "events": 0,
            "ignored": 0,
            "malformed": 0,
            "failed": 0,
            "unknown_metric": 0,
            **dict(self.stats),
            "dropped_series": self.store.dropped_series,
            "series": len(self.store.metric_series),
            "points": sum(len(s) for s in self.store.metric_series.values()),
            "alerts_firing": len(self.alerts.active()),
            "rules": len(self.rules),
        }
