"""The dashboard's figures as OpenTelemetry metrics, for a collector → Prometheus → Grafana stack.

============================== ============ =========================== ==========================================
instrument                     kind         labels                      Prometheus name (collector's conversion)
============================== ============ =========================== ==========================================
dspyrt.cycle.score             gauge, %     program, model, optimizer   dspyrt_cycle_score_percent
dspyrt.cycle.baseline_score    gauge, %     program, model, optimizer   dspyrt_cycle_baseline_score_percent
dspyrt.cycle.improvement       gauge, %     program, model, optimizer   dspyrt_cycle_improvement_percent
dspyrt.cycle.cost              gauge, USD   program, model, optimizer   dspyrt_cycle_cost_USD
dspyrt.program.score           gauge, %     program, version            dspyrt_program_score_percent
dspyrt.program.latency_p95     gauge, ms    program, model              dspyrt_program_latency_p95_milliseconds
dspyrt.validation.pass_rate    gauge        program                     dspyrt_validation_pass_rate
dspyrt.lm.error_rate           gauge        model                       dspyrt_lm_error_rate
dspyrt.queue.depth             gauge        kind                        dspyrt_queue_depth
dspyrt.feedback.corrections    gauge        program, version            dspyrt_feedback_corrections
dspyrt.feedback.score          gauge, %     program, version            dspyrt_feedback_score_percent
dspyrt.alerts.firing           gauge        rule, severity              dspyrt_alerts_firing
dspyrt.predictions             counter      program, version, model     dspyrt_predictions_total
dspyrt.dashboard.events        counter      agent                       dspyrt_dashboard_events_total
dspyrt.optimization.duration   histogram, s program, optimizer, model   dspyrt_optimization_duration_seconds_*
dspyrt.custom.<name>           gauge        the metric's own labels     dspyrt_custom_<name>[_<unit>]
============================== ============ =========================== ==========================================

The switcher records the per-call LM figures itself (``dspyrt.lm.latency`` / ``tokens`` / ``cost`` /
``failures``); they are not exported twice. Gauges follow the last point of each series, replayed history
included, so they are right again after a restart (while the history is replayed only each series' last point
is kept, and set once caught up); counters and histograms count live events only, so a restart never counts
the replayed past a second time. Dimensionless units are written in braces
(``{ratio}``), which both the collector and the Python Prometheus exporter drop from the name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from opentelemetry.metrics import Counter as OtelCounter
from opentelemetry.metrics import Histogram, Meter
from opentelemetry.metrics import _Gauge as Gauge  # the synchronous gauge's public name (in __all__)

from dspyrt.agents.dashboard.alerts import Alert
from dspyrt.agents.dashboard.models import MetricType, MetricTypeInfo
from dspyrt.agents.dashboard.series import RATE_WINDOW, MetricPoint, MetricSeries

# metric type -> (instrument name, unit, description)
GAUGES: dict[str, tuple[str, str, str]] = {
    MetricType.SCORE: ("dspyrt.cycle.score", "%", "optimized score of the latest completed cycle"),
    MetricType.BASELINE_SCORE: ("dspyrt.cycle.baseline_score", "%", "baseline score of the latest cycle"),
    MetricType.IMPROVEMENT: ("dspyrt.cycle.improvement", "%", "improvement of the latest cycle (points)"),
    MetricType.CYCLE_COST: ("dspyrt.cycle.cost", "USD", "LM cost of the latest cycle"),
    MetricType.PROGRAM_SCORE: ("dspyrt.program.score", "%", "latest score of a deployed program version"),
    MetricType.PROGRAM_LATENCY_P95: ("dspyrt.program.latency_p95", "ms", "p95 latency of the optimized program"),
    MetricType.VALIDATION_PASS_RATE: ("dspyrt.validation.pass_rate", "{ratio}", "fraction of checks passed"),
    MetricType.ERROR_RATE: ("dspyrt.lm.error_rate", "{ratio}", "failed / all LM calls in the last 5 minutes"),
    MetricType.QUEUE_DEPTH: ("dspyrt.queue.depth", "{task}", "tasks waiting or running per task kind"),
    MetricType.FEEDBACK: ("dspyrt.feedback.corrections", "{correction}", "corrections of recorded predictions"),
    MetricType.FEEDBACK_SCORE: ("dspyrt.feedback.score", "%", "share of corrections that agreed with the answer"),
}
ALERTS_FIRING = "dspyrt.alerts.firing"
PREDICTIONS = "dspyrt.predictions"
EVENTS = "dspyrt.dashboard.events"
OPTIMIZATION_DURATION = "dspyrt.optimization.duration"
CUSTOM_PREFIX = "dspyrt.custom."


class DashboardInstruments:
    """Mirrors recorded points into OpenTelemetry instruments (``MetricsDashboard.listeners``)."""

    def __init__(self, meter: Meter, metric_types: dict[str, MetricTypeInfo]) -> None:
        self.meter = meter
        self.metric_types = metric_types
        self._live = False
        self._pending: dict[MetricSeries, MetricPoint] = {}  # by identity: no label key to build per point
        self._custom: dict[tuple[str, str, str], Gauge] = {}
        self._gauges = {
            metric: meter.create_gauge(name, unit=unit, description=description)
            for metric, (name, unit, description) in GAUGES.items()
        }
        self._alerts = meter.create_gauge(ALERTS_FIRING, unit="{alert}", description="firing alerts per rule")
        self._predictions: OtelCounter = meter.create_counter(
            PREDICTIONS, unit="{prediction}", description="predictions served"
        )
        self._events: OtelCounter = meter.create_counter(EVENTS, unit="{event}", description="events seen per agent")
        self._duration: Histogram = meter.create_histogram(
            OPTIMIZATION_DURATION, unit="s", description="duration of optimization runs"
        )
        self._alert_rules: set[tuple[str, str]] = set()

    @property
    def live(self) -> bool:
        """``False`` while the history is replayed: counters and histograms count only events seen live, and
        gauges wait; set to ``True`` once caught up, it sets each gauge from its series' last point."""
        return self._live

    @live.setter
    def live(self, live: bool) -> None:
        self._live = live
        if live:
            pending, self._pending = self._pending, {}
            for series, point in pending.items():
                self._set_gauge(series, point)

    def __call__(self, series: MetricSeries, point: MetricPoint) -> None:
        metric, labels = series.metric_type, series.labels
        if metric == MetricType.PREDICTIONS:
            if self._live:
                self._predictions.add(1, labels)
        elif metric == MetricType.EVENTS:
            if self._live:
                self._events.add(1, labels)
        elif metric == MetricType.OPTIMIZATION_DURATION:
            if self._live:
                self._duration.record(point.value, labels)
        elif self._live:
            self._set_gauge(series, point)
        else:
            # Only a gauge's last value is exported: during a replay remember the last point of each series
            # rather than set (and, for the error rate, recompute) every replayed one.
            self._pending[series] = point

    def _set_gauge(self, series: MetricSeries, point: MetricPoint) -> None:
        metric, labels = series.metric_type, series.labels
        if metric == MetricType.ERROR_RATE:
            rate = series.window_total(RATE_WINDOW, point.time).rate
            self._gauges[metric].set(0.0 if rate is None else rate, labels)
        elif metric in self._gauges:
            self._gauges[metric].set(point.value, labels)
        else:
            info = self.metric_types.get(metric)
            if info is not None and info.custom:
                self._custom_gauge(metric, info).set(point.value, labels)

    def _custom_gauge(self, metric: str, info: MetricTypeInfo) -> Gauge:
        # Keyed like the SDK's own instrument registry (name, unit, description): a re-registration that
        # changes the unit or description gets the instrument the SDK would have made for it.
        key = (CUSTOM_PREFIX + metric, info.unit, info.description)
        gauge = self._custom.get(key)
        if gauge is None:
            gauge = self._custom[key] = self.meter.create_gauge(key[0], unit=info.unit, description=info.description)
        return gauge

    def alerts(self, alerts: Iterable[Alert]) -> None:
        """Set the firing count of every rule seen so far (0 once its alerts resolve)."""
        firing: Counter[tuple[str, str]] = Counter()
        for alert in alerts:
            key = (alert.rule, alert.severity)
            self._alert_rules.add(key)
            if alert.state == "firing":
                firing[key] += 1
        for rule, severity in self._alert_rules:
            self._alerts.set(firing[(rule, severity)], {"rule": rule, "severity": severity})
