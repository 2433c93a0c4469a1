"""What both views (the web page and ``dspyrt dashboard``) show: series views, program and model summaries, and
the snapshot that holds them, read from the series store, the recorder's program states and the alerts."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence

from dspyrt.agents.dashboard.alerts import AlertManager, AlertRule
from dspyrt.agents.dashboard.handlers import EventRecorder, ProgramState
from dspyrt.agents.dashboard.models import (
    DashboardSnapshot,
    MetricType,
    MetricTypeInfo,
    ModelSummary,
    ProgramSummary,
    QueueSummary,
    SeriesView,
    SnapshotQuery,
)
from dspyrt.agents.dashboard.series import (
    RATE_WINDOW,
    MetricPoint,
    MetricSeries,
    SeriesStore,
    downsample,
    label_key,
    rolling_rate,
)
from dspyrt.runtime.stats import percentile


def series_view(
    store: SeriesStore, series: MetricSeries, max_points: int, since: float | None, now: float
) -> SeriesView:
    """One series as the views draw it: rates as rolling rates, at most ``max_points`` points from ``since``."""
    info = store.metric_types.get(series.metric_type) or MetricTypeInfo(name=series.metric_type)
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


def program_summary(store: SeriesStore, recorder: EventRecorder, name: str) -> ProgramSummary:
    state = recorder.programs.get(name) or ProgramState(name)
    wanted = {"program": name}
    return ProgramSummary(
        program=name,
        cycles=state.cycles,
        last_score=store.latest(MetricType.SCORE, wanted),
        last_improvement=store.latest(MetricType.IMPROVEMENT, wanted),
        validation_pass_rate=store.latest(MetricType.VALIDATION_PASS_RATE, wanted),
        feedback=recorder.feedback_count(name),
        feedback_score=store.latest(MetricType.FEEDBACK_SCORE, wanted),
        active_version=state.active_version,
        canary_version=state.canary_version,
        phase=state.phase,
        log=list(state.log)[-20:],
    )


def model_summary(store: SeriesStore, model: str, now: float | None = None) -> ModelSummary:
    now = time.time() if now is None else now
    wanted = {"model": model}
    outcomes = store.series(MetricType.ERROR_RATE, wanted)
    recent = [s.window_total(RATE_WINDOW, now) for s in outcomes]
    calls = sum(w.size for w in recent)
    latencies = [p.value for s in store.series(MetricType.LM_LATENCY, wanted) for p in s.points]
    return ModelSummary(
        model=model,
        calls=sum(s.count for s in outcomes),
        failures=round(sum(s.total for s in outcomes)),
        # Outcomes are 0 or 1, so adding per-series sums gives the very float one sum over all points would.
        error_rate=sum(w.total for w in recent) / calls if calls else None,
        latency_p50_ms=percentile(latencies, 50) if latencies else None,
        latency_p95_ms=percentile(latencies, 95) if latencies else None,
        tokens=sum(s.total for s in store.series(MetricType.LM_TOKENS, wanted)),
        cost=round(sum(s.total for s in store.series(MetricType.LM_COST, wanted)), 6),
    )


def program_names(store: SeriesStore, recorder: EventRecorder) -> list[str]:
    names = set(recorder.programs)
    names.update(s.labels["program"] for s in store.metric_series.values() if "program" in s.labels)
    return sorted(names)


def model_names(store: SeriesStore) -> list[str]:
    return sorted({s.labels["model"] for s in store.metric_series.values() if "model" in s.labels})


def _matches(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in wanted.items())


def snapshot(
    store: SeriesStore,
    recorder: EventRecorder,
    alerts: AlertManager,
    rules: Iterable[AlertRule],
    query: SnapshotQuery,
    *,
    stats: Mapping[str, int],
    now: float,
    web_url: str | None = None,
    replaying: bool = False,
) -> DashboardSnapshot:
    """The dashboard (or the part ``query`` asks for) as both views show it."""
    q = query
    wanted = {k: v for k, v in (("program", q.program), ("model", q.model)) if v is not None}
    series = sorted(store.series(q.metric, wanted), key=lambda s: (s.metric_type, label_key(s.labels)))
    shown_alerts = sorted(
        (a for a in alerts.alerts.values() if _matches(a.labels, wanted)),
        key=lambda a: (a.state != "firing", -a.updated_at),
    )
    programs = [q.program] if q.program else program_names(store, recorder)
    models = [q.model] if q.model else ([] if q.program else model_names(store))
    queues = [
        QueueSummary(kind=s.labels.get("kind", "?"), depth=int(p.value))
        for s in store.series(MetricType.QUEUE_DEPTH)
        if (p := s.latest()) is not None
    ]
    log = [e for e in recorder.alert_log if _matches(e.labels, wanted)]
    return DashboardSnapshot(
        generated_at=now,
        replaying=replaying,
        web_url=web_url,
        events=recorder.stats["events"],
        last_event_at=recorder.last_event_at,
        metric_types=sorted(store.metric_types.values(), key=lambda i: (i.custom, i.name)),
        series=[series_view(store, s, q.max_points, q.since, now) for s in series],
        alerts=shown_alerts,
        alert_log=log[-50:],
        programs=[program_summary(store, recorder, p) for p in programs],
        models=[model_summary(store, m, now) for m in models],
        queues=sorted(queues, key=lambda x: x.kind),
        rules=[r.model_dump(mode="json") for r in rules],
        stats=dict(stats),
    )
