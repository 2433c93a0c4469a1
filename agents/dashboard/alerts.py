"""Alert management: rules (threshold, regression, staleness, error rate), alerts with states, de-duplication.

A rule watches every series of one metric whose labels include the rule's ``labels``; each such series has at
most one alert, identified by the rule name and the series labels (:func:`alert_id`). An alert is ``firing``
while its rule's condition holds and ``resolved`` after; the :class:`AlertManager` reports only *transitions*,
so a condition that keeps holding never produces a second firing alert.

Rules come from a TOML file (``[[rules]]`` tables, see :func:`load_rules_file`) or from the dashboard's
``set_rules`` endpoint; every problem in them is reported at once by :class:`AlertRuleError`::

    [[rules]]
    name = "canary-regression"
    kind = "regression"
    metric = "program_score"
    labels = { program = "topic-classifier" }
    baseline_points = 5
    min_drop = 5.0
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import tomllib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Protocol

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, model_validator

from dspyrt.bus import ConfigurationError, FieldError, Message

AlertState = Literal["firing", "resolved"]
AlertSeverity = Literal["info", "warning", "critical"]
RULE_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class AlertRuleError(ConfigurationError):
    """Alert rules that cannot be used; ``problems`` lists every one, each naming the rule and the field."""

    def __init__(self, source: str, problems: Sequence[str], field_errors: Sequence[FieldError] = ()) -> None:
        self.source = source
        self.problems = list(problems)
        self.field_errors = list(field_errors)
        listed = "; ".join(self.problems)
        super().__init__(f"invalid alert rules in {source}: {listed}")


# ------------------------------------------------------------------------------------------ series


class PointLike(Protocol):
    @property
    def time(self) -> float: ...
    @property
    def value(self) -> float: ...


class SeriesLike(Protocol):
    """What a rule reads of a series (``dspyrt.agents.dashboard.series.MetricSeries`` is one)."""

    @property
    def metric_type(self) -> str: ...
    @property
    def labels(self) -> dict[str, str]: ...
    def ordered(self) -> Sequence[PointLike]: ...


SeriesLookup = Callable[[str, Mapping[str, str]], Iterable[SeriesLike]]
"""``lookup(metric, labels)``: every series of ``metric`` whose labels include ``labels``."""


class Verdict(NamedTuple):
    firing: bool
    value: float | None
    message: str


def _describe(series: SeriesLike) -> str:
    labels = ",".join(f"{k}={v}" for k, v in sorted(series.labels.items()))
    return f"{series.metric_type}{{{labels}}}"


def _fmt(value: float) -> str:
    return f"{value:.6g}"


# ------------------------------------------------------------------------------------------- rules


class _Rule(Message):
    name: str = Field(pattern=RULE_NAME, description="unique name; part of every alert's identity")
    metric: str = Field(min_length=1, max_length=64, description="the metric type the rule watches")
    labels: dict[str, str] = Field(default_factory=dict, description="only series whose labels include these")
    severity: AlertSeverity = "warning"
    description: str = ""
    actions: bool = Field(
        default=True, description="regression rules: roll back a regressing canary / re-optimize (auto_optimize)"
    )

    def check(self, series: SeriesLike, now: float) -> Verdict | None:
        """The rule's condition on one series; ``None`` when there is not enough data to tell."""
        raise NotImplementedError


class ThresholdRule(_Rule):
    """Fires while the latest value is above ``above`` or below ``below``."""

    kind: Literal["threshold"]
    above: float | None = None
    below: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> ThresholdRule:
        if self.above is None and self.below is None:
            raise ValueError("a threshold rule needs 'above' or 'below' (or both)")
        if self.above is not None and self.below is not None and self.below >= self.above:
            raise ValueError(f"'below' ({self.below}) must be less than 'above' ({self.above})")
        return self

    def check(self, series: SeriesLike, now: float) -> Verdict | None:
        points = series.ordered()
        if not points:
            return None
        value = points[-1].value
        if self.above is not None and value > self.above:
            return Verdict(True, value, f"{_describe(series)} = {_fmt(value)}, above {_fmt(self.above)}")
        if self.below is not None and value < self.below:
            return Verdict(True, value, f"{_describe(series)} = {_fmt(value)}, below {_fmt(self.below)}")
        return Verdict(False, value, f"{_describe(series)} = {_fmt(value)}, within bounds")


class RegressionRule(_Rule):
    """Fires while the latest point is worse than the mean of the ``baseline_points`` before it by more than
    ``min_drop`` (absolute) and/or ``min_drop_fraction`` (of the mean). ``direction = "up"`` for metrics where
    higher is worse (latency, cost)."""

    kind: Literal["regression"]
    baseline_points: int = Field(default=5, ge=1, le=1000)
    min_drop: float | None = Field(default=None, ge=0)
    min_drop_fraction: float | None = Field(default=None, gt=0, le=1)
    direction: Literal["down", "up"] = "down"

    @model_validator(mode="after")
    def _drop(self) -> RegressionRule:
        if self.min_drop is None and self.min_drop_fraction is None:
            raise ValueError("a regression rule needs 'min_drop' or 'min_drop_fraction' (or both)")
        return self

    def check(self, series: SeriesLike, now: float) -> Verdict | None:
        points = series.ordered()
        if len(points) < self.baseline_points + 1:
            return None
        latest = points[-1].value
        window = points[-1 - self.baseline_points : -1]
        baseline = math.fsum(p.value for p in window) / len(window)
        drop = baseline - latest if self.direction == "down" else latest - baseline
        regressed = drop > 0
        if self.min_drop is not None:
            regressed = regressed and drop > self.min_drop
        if self.min_drop_fraction is not None:
            regressed = regressed and drop > self.min_drop_fraction * abs(baseline)
        side = "below" if self.direction == "down" else "above"
        message = (
            f"{_describe(series)} = {_fmt(latest)}, {_fmt(abs(drop))} {side if drop > 0 else 'better than'} the mean "
            f"{_fmt(baseline)} of the previous {len(window)} points"
        )
        return Verdict(regressed, latest, message)


class StalenessRule(_Rule):
    """Fires while a series has had no new point for ``max_age`` seconds."""

    kind: Literal["staleness"]
    max_age: float = Field(gt=0)

    def check(self, series: SeriesLike, now: float) -> Verdict | None:
        points = series.ordered()
        if not points:
            return None
        age = max(0.0, now - points[-1].time)
        stale = age > self.max_age
        message = f"{_describe(series)}: last point {age:.0f}s ago (limit {_fmt(self.max_age)}s)"
        return Verdict(stale, age, message)


class ErrorRateRule(_Rule):
    """Fires while failures / calls over the last ``window`` seconds exceed ``max_rate`` (with at least
    ``min_calls`` calls). The metric is an outcome metric: one point per call, 1 for a failure, 0 for success."""

    kind: Literal["error_rate"]
    metric: str = Field(default="error_rate", min_length=1, max_length=64)
    window: float = Field(default=300.0, gt=0)
    max_rate: float = Field(ge=0, lt=1)
    min_calls: int = Field(default=1, ge=1)

    def check(self, series: SeriesLike, now: float) -> Verdict | None:
        recent = [p for p in series.ordered() if p.time >= now - self.window]
        if len(recent) < self.min_calls:
            return None
        failures = sum(1 for p in recent if p.value > 0)
        rate = failures / len(recent)
        message = (
            f"{_describe(series)}: {failures}/{len(recent)} calls failed in the last {_fmt(self.window)}s "
            f"({rate:.1%}, limit {self.max_rate:.1%})"
        )
        return Verdict(rate > self.max_rate, rate, message)


AlertRule = Annotated[ThresholdRule | RegressionRule | StalenessRule | ErrorRateRule, Field(discriminator="kind")]
RULE_KINDS = ("threshold", "regression", "staleness", "error_rate")
_RULES = TypeAdapter(list[AlertRule])


def parse_rules(
    data: Any,
    *,
    source: str = "alert rules",
    known_metrics: Collection[str] | None = None,
    rate_metrics: Collection[str] | None = None,
) -> list[AlertRule]:
    """Validate rules given as a list of tables (or ``{"rules": [...]}``); raise :class:`AlertRuleError` naming
    every problem. With ``known_metrics``, a rule on another metric is an error (a typo would never fire); with
    ``rate_metrics``, so is an ``error_rate`` rule on a metric that is not an outcome (0/1 per call) metric."""
    if isinstance(data, Mapping):
        extra = sorted(set(data) - {"rules"})
        if extra:
            raise AlertRuleError(source, [f"unknown top-level key(s) {', '.join(extra)}; put rules in [[rules]]"])
        data = data.get("rules", [])
    if not isinstance(data, list):
        raise AlertRuleError(source, ["expected a list of rules ([[rules]] tables)"])
    problems: list[str] = []
    field_errors: list[FieldError] = []

    def where(index: int) -> str:
        item = data[index] if index < len(data) else None
        name = item.get("name") if isinstance(item, Mapping) else None
        return f"rules[{index}]" + (f" ({name!r})" if name else "")

    try:
        rules = _RULES.validate_python(data)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = list(err["loc"])
            index = loc.pop(0) if loc and isinstance(loc[0], int) else None
            if loc and loc[0] in RULE_KINDS:  # the union's branch name adds nothing for the reader
                loc.pop(0)
            field = ".".join(str(p) for p in loc)
            message = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "union_tag_invalid" or err["type"] == "union_tag_not_found":
                message = f"'kind' must be one of {', '.join(RULE_KINDS)}"
                field = "kind"
            head = where(index) if isinstance(index, int) else "rules"
            problems.append(f"{head}: {field + ': ' if field else ''}{message}")
            field_errors.append(FieldError(loc=f"rules.{index}.{field}".rstrip("."), message=message, type=err["type"]))
        raise AlertRuleError(source, problems, field_errors) from exc
    seen: dict[str, int] = {}
    for index, rule in enumerate(rules):
        if rule.name in seen:
            problems.append(f"{where(index)}: name {rule.name!r} is already used by rules[{seen[rule.name]}]")
        seen.setdefault(rule.name, index)
        if known_metrics is not None and rule.metric not in known_metrics:
            problems.append(
                f"{where(index)}: unknown metric {rule.metric!r}; known: {', '.join(sorted(known_metrics))}"
            )
        elif isinstance(rule, ErrorRateRule) and rate_metrics is not None and rule.metric not in rate_metrics:
            problems.append(
                f"{where(index)}: an error_rate rule needs an outcome metric (one 0/1 point per call) such as "
                f"{', '.join(sorted(rate_metrics))}; {rule.metric!r} is not one"
            )
    if problems:
        raise AlertRuleError(source, problems, [FieldError(loc="rules", message=p) for p in problems])
    return rules


def load_rules_file(
    path: Path, *, known_metrics: Collection[str] | None = None, rate_metrics: Collection[str] | None = None
) -> list[AlertRule]:
    """Read ``[[rules]]`` tables from a TOML file; every problem is one :class:`AlertRuleError`."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AlertRuleError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise AlertRuleError(str(path), [f"not valid TOML: {exc}"]) from exc
    return parse_rules(data, source=str(path), known_metrics=known_metrics, rate_metrics=rate_metrics)


def dump_rules(rules: Iterable[AlertRule]) -> list[dict[str, Any]]:
    return [r.model_dump(mode="json", exclude_defaults=False) for r in rules]


# ------------------------------------------------------------------------------------------ alerts


def alert_id(rule: str, labels: Mapping[str, str]) -> str:
    """One alert per rule and series: the same rule on the same labels is always the same alert."""
    key = json.dumps([rule, sorted(labels.items())], separators=(",", ":"))
    return hashlib.sha256(key.encode()).hexdigest()[:20]


class Alert(BaseModel):
    """One alert: a rule's condition on one series. ``episode`` counts how often it has fired."""

    id: str = Field(description="the alert's identity: its rule and its series' labels (alert_id)")
    rule: str = Field(description="the rule's name")
    kind: str = Field(description="the rule's kind: threshold, regression, staleness or error_rate")
    metric: str = Field(description="the metric type the rule watches")
    labels: dict[str, str] = Field(default_factory=dict, description="the labels of the series it is about")
    severity: AlertSeverity = Field(default="warning", description="the rule's severity")
    state: AlertState = Field(description="firing while the condition holds, resolved after")
    value: float | None = Field(default=None, description="the figure the rule last judged")
    message: str = Field(default="", description="what the rule found, in words")
    episode: int = Field(default=0, ge=0, description="how often this alert has fired")
    fired_at: float | None = Field(default=None, description="when it last fired (Unix seconds)")
    resolved_at: float | None = Field(default=None, description="when it last resolved (Unix seconds)")
    updated_at: float = Field(default_factory=time.time, description="when its state last changed (Unix seconds)")

    @property
    def key(self) -> tuple[str, int]:
        return self.state, self.episode


@dataclass(frozen=True)
class AlertTransition:
    """An alert changed state: ``alert`` is the new state, ``previous`` what it was (``None``: never seen)."""

    alert: Alert
    previous: Alert | None


class AlertManager:
    """Evaluates rules over series and keeps each alert's state; reports transitions only."""

    def __init__(self, rules: Iterable[AlertRule] = ()) -> None:
        self.rules: dict[str, AlertRule] = {r.name: r for r in rules}
        self.alerts: dict[str, Alert] = {}

    def set_rules(self, rules: Iterable[AlertRule]) -> None:
        """Replace the rules. Alerts of removed rules resolve at the next evaluation."""
        self.rules = {r.name: r for r in rules}

    def restore(self, alerts: Iterable[Alert]) -> None:
        """Take alert states kept elsewhere (the dashboard's KV bucket), e.g. after a restart."""
        for alert in alerts:
            self.adopt(alert)

    def adopt(self, alert: Alert) -> None:
        """Take another instance's newer state of one alert."""
        self.alerts[alert.id] = alert

    def active(self) -> list[Alert]:
        return sorted((a for a in self.alerts.values() if a.state == "firing"), key=lambda a: a.fired_at or 0.0)

    def evaluate(self, lookup: SeriesLookup, now: float | None = None) -> list[AlertTransition]:
        """Check every rule on every matching series; update states; return what changed."""
        now = time.time() if now is None else now
        transitions: list[AlertTransition] = []
        seen: set[str] = set()
        for rule in self.rules.values():
            for series in lookup(rule.metric, rule.labels):
                aid = alert_id(rule.name, series.labels)
                seen.add(aid)
                verdict = rule.check(series, now)
                current = self.alerts.get(aid)
                firing = verdict is not None and verdict.firing
                if firing and verdict is not None:
                    if current is not None and current.state == "firing":
                        current.value, current.message = verdict.value, verdict.message  # de-duplicated
                        continue
                    alert = Alert(
                        id=aid,
                        rule=rule.name,
                        kind=rule.kind,
                        metric=rule.metric,
                        labels=dict(series.labels),
                        severity=rule.severity,
                        state="firing",
                        value=verdict.value,
                        message=verdict.message,
                        episode=(current.episode if current else 0) + 1,
                        fired_at=now,
                        updated_at=now,
                    )
                    transitions.append(self._set(alert, current))
                elif current is not None and current.state == "firing":
                    message = verdict.message if verdict is not None else f"{rule.name}: no recent data"
                    value = verdict.value if verdict is not None else current.value
                    transitions.append(self._resolve(current, now, message, value))
        for aid, current in list(self.alerts.items()):
            if aid not in seen and current.state == "firing":
                reason = "rule removed" if current.rule not in self.rules else "series no longer matches the rule"
                transitions.append(self._resolve(current, now, f"{current.rule}: {reason}", current.value))
        return transitions

    def _resolve(self, current: Alert, now: float, message: str, value: float | None) -> AlertTransition:
        resolved = current.model_copy(
            update={"state": "resolved", "resolved_at": now, "updated_at": now, "message": message, "value": value}
        )
        return self._set(resolved, current)

    def _set(self, alert: Alert, previous: Alert | None) -> AlertTransition:
        self.alerts[alert.id] = alert
        return AlertTransition(alert, previous)
