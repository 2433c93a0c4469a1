"""The dashboard's time-series store: metric types, and the points of each metric type by labels.

``MetricSeries`` is one metric type with one set of labels (the guide's name); ``SeriesStore`` holds every series
of a dashboard, at most ``max_series`` of them, and tells its listeners (the OpenTelemetry export) of each point.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from itertools import accumulate, islice
from typing import NamedTuple

from dspyrt.agents.dashboard.models import BUILTIN_TYPES, CustomMetricType, MetricTypeInfo

DEFAULT_MAX_POINTS = 2000
DEFAULT_MAX_SERIES = 5000
RATE_WINDOW = 300.0
"""Seconds of outcomes behind an error rate in the views and the exported gauge."""


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


PointListener = Callable[[MetricSeries, MetricPoint], None]
"""Called with every point recorded (the OpenTelemetry export listens)."""


class SeriesStore:
    """Every series of a dashboard by metric type and labels, and the metric types they may be of."""

    def __init__(self, *, max_points: int = DEFAULT_MAX_POINTS, max_series: int = DEFAULT_MAX_SERIES) -> None:
        self.max_points = max_points
        self.max_series = max_series
        self.metric_types: dict[str, MetricTypeInfo] = dict(BUILTIN_TYPES)
        self.metric_series: dict[SeriesKey, MetricSeries] = {}
        self.listeners: list[PointListener] = []
        self.dropped_series = 0  # points refused because ``max_series`` series exist

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
        """Put a series in the store (the guide's ``metric_series[...] = MetricSeries(...)``)."""
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
        store already holds ``max_series`` series (counted in ``dropped_series``)."""
        metric = str(metric)
        if metric not in self.metric_types:
            raise ValueError(f"unknown metric type {metric!r}")
        key: SeriesKey = (metric, label_key(labels or {}))
        series = self.metric_series.get(key)
        if series is None:
            if len(self.metric_series) >= self.max_series:
                self.dropped_series += 1
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

    def latest(self, metric: str, labels: Mapping[str, str]) -> float | None:
        """The newest value among the series of ``metric`` whose labels include ``labels``."""
        points = [p for s in self.series(metric, labels) if (p := s.latest()) is not None]
        return max(points, key=lambda p: p.time).value if points else None
