"""Metrics by name: built-ins plus plugins from the entry-point group ``dspyrt.metrics``.

Every metric has DSPy's metric signature, ``metric(example, prediction, trace=None) -> float | bool``, and
compares one configured output field, or, with ``field=None``, every label field of the example (its
non-input fields): boolean metrics then require all fields to match, scored metrics average them.
A field the prediction lacks is a miss: ``False``, or ``0.0`` for scored metrics.

Built-ins (:func:`get_metric` names):

* ``exact_match`` — equal values (strings compared after trimming surrounding whitespace);
* ``normalized_match`` — equal after DSPy's ``normalize_text`` (case, punctuation, whitespace and
  English articles ignored);
* ``f1`` — token-overlap F1 after the same normalization (DSPy's ``f1_score``);
* ``numeric`` — numbers within ``tolerance`` (absolute); numbers are read from text like ``"42"`` or ``"$1,200.5"``;
* ``contains`` — the expected text appears in the prediction (``ignore_case`` by default).

A plugin entry point names a :class:`MetricFactory`: a callable ``(field=None, **params) -> metric``.
:func:`field_metric` makes one from a plain comparator ``(expected, predicted, **params) -> float | bool``.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import EntryPoint
from types import MappingProxyType
from typing import Any, Protocol

from dspy.evaluate.metrics import f1_score, normalize_text

from dspyrt.bus.errors import ConfigurationError
from dspyrt.runtime.plugins import EntryPointRegistry

ENTRY_POINT_GROUP = "dspyrt.metrics"

Score = float | bool
Compare = Callable[[Any, Any], Score]
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*)?\.?\d+(?:[eE][-+]?\d+)?")


class Metric(Protocol):
    """DSPy's metric signature."""

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> Score: ...


MetricFactory = Callable[..., Metric]
"""What a metric name resolves to: ``factory(field=None, **params) -> Metric``."""


class FieldMetric:
    """A metric comparing the example's and the prediction's values of one field (or every label field)."""

    def __init__(self, name: str, compare: Compare, field: str | None = None, *, miss: Score = False) -> None:
        self.name = name
        self.field = field
        self._compare = compare
        self._miss = miss
        # DSPy logs metric names; give instances one like a function's.
        self.__name__ = name if field is None else f"{name}[{field}]"

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> Score:
        """Score ``prediction`` against ``example``; ``trace`` is accepted for DSPy's optimizers and unused."""
        fields = [self.field] if self.field is not None else _label_fields(example)
        scores: list[Score] = []
        for name in fields:
            if name not in example:
                raise ConfigurationError(f"metric {self.__name__}: the example has no field {name!r}")
            predicted = _get(prediction, name)
            scores.append(self._miss if predicted is None else self._compare(example[name], predicted))
        if all(isinstance(s, bool) for s in scores):
            return all(scores)
        return sum(float(s) for s in scores) / len(scores)

    def __repr__(self) -> str:
        return f"FieldMetric({self.__name__})"


def exact_match(field: str | None = None, /) -> FieldMetric:
    """Equal values; strings are compared after trimming surrounding whitespace."""
    return FieldMetric("exact_match", _exact, field)


def normalized_match(field: str | None = None, /) -> FieldMetric:
    """Equal after normalization: case, punctuation, whitespace and English articles are ignored."""
    return FieldMetric("normalized_match", _normalized, field)


def f1(field: str | None = None, /) -> FieldMetric:
    """Token-overlap F1 (0..1) between the normalized texts."""
    return FieldMetric("f1", _f1, field, miss=0.0)


def numeric(field: str | None = None, /, *, tolerance: float = 0.0) -> FieldMetric:
    """Numbers equal within ``tolerance`` (absolute, >= 0). Text that holds no number scores False."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not math.isfinite(tolerance):
        raise ConfigurationError(f"numeric: tolerance must be a finite number, got {tolerance!r}")
    if tolerance < 0:
        raise ConfigurationError(f"numeric: tolerance must be >= 0, got {tolerance}")
    return FieldMetric("numeric", functools.partial(_numeric, tolerance=float(tolerance)), field)


def contains(field: str | None = None, /, *, ignore_case: bool = True) -> FieldMetric:
    """The expected text appears in the predicted text (whitespace-collapsed; case-insensitive by default)."""
    if not isinstance(ignore_case, bool):
        raise ConfigurationError(f"contains: ignore_case must be true or false, got {ignore_case!r}")
    return FieldMetric("contains", functools.partial(_contains, ignore_case=ignore_case), field)


BUILTIN_METRICS: Mapping[str, MetricFactory] = MappingProxyType(
    {
        "contains": contains,
        "exact_match": exact_match,
        "f1": f1,
        "normalized_match": normalized_match,
        "numeric": numeric,
    }
)


def field_metric(compare: Callable[..., Score], name: str | None = None, *, miss: Score = 0.0) -> MetricFactory:
    """A :class:`MetricFactory` from a comparator ``(expected, predicted, **params) -> float | bool``.

    Parameters are checked against the comparator's keyword parameters when the metric is made; ``miss`` is
    the score of a prediction that lacks the field.
    """
    metric_name = name or str(getattr(compare, "__name__", "metric"))

    def factory(field: str | None = None, /, **params: Any) -> Metric:
        try:
            inspect.signature(compare).bind(None, None, **params)
        except TypeError as exc:
            raise ConfigurationError(f"metric {metric_name!r}: {exc}") from None
        return FieldMetric(metric_name, functools.partial(compare, **params), field, miss=miss)

    return factory


class MetricRegistry:
    """Built-in metrics plus plugin factories from entry points; plugins may not shadow a built-in."""

    def __init__(self, entries: Iterable[EntryPoint] | None = ()) -> None:
        """``entries``: the plugins' entry points (``None``: those installed; by default none, built-ins only)."""
        self._factories = EntryPointRegistry(
            ENTRY_POINT_GROUP, "metric", _metric_factory, entries=entries, builtins=BUILTIN_METRICS
        )

    @classmethod
    def installed(cls) -> MetricRegistry:
        """Built-ins plus everything installed under ``dspyrt.metrics``."""
        return cls(None)

    def names(self) -> list[str]:
        """Every metric name, sorted."""
        return self._factories.names()

    def get(self, name: str, field: str | None = None, **params: Any) -> Metric:
        """The metric ``name`` for ``field`` with ``params``; unknown names and parameters are errors."""
        factory = self._factories.get(name)
        try:
            inspect.signature(factory).bind(field, **params)
        except TypeError:
            accepted = [p.name for p in inspect.signature(factory).parameters.values() if p.kind is p.KEYWORD_ONLY]
            raise ConfigurationError(
                f"metric {name!r} takes parameters: {', '.join(accepted) or 'none'}; got: {', '.join(sorted(params))}"
            ) from None
        return factory(field, **params)


def _metric_factory(loaded: Any) -> MetricFactory:
    if not callable(loaded):
        raise TypeError("is not a metric factory")
    factory: MetricFactory = loaded
    return factory


def get_metric(name: str, field: str | None = None, **params: Any) -> Metric:
    """A metric by name: a built-in, or a plugin installed under ``dspyrt.metrics``."""
    if name in BUILTIN_METRICS:
        return MetricRegistry().get(name, field, **params)  # no need to scan installed packages
    return MetricRegistry.installed().get(name, field, **params)


def _label_fields(example: Any) -> list[str]:
    try:
        labels = list(example.labels().keys())
    except ValueError as exc:  # dspy.Example without with_inputs(): no way to tell inputs from labels
        raise ConfigurationError(f"cannot tell the example's output fields; pass field= ({exc})") from None
    if not labels:
        raise ConfigurationError("the example has no output fields to compare")
    return labels


def _get(prediction: Any, name: str) -> Any:
    if isinstance(prediction, Mapping):
        return prediction.get(name)
    getter = getattr(prediction, "get", None)
    return getter(name) if callable(getter) else getattr(prediction, name, None)


def _text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value)
    return str(value)


def _exact(expected: Any, predicted: Any) -> bool:
    if isinstance(expected, str) or isinstance(predicted, str):
        return _text(expected).strip() == _text(predicted).strip()
    return bool(expected == predicted)


def _normalized(expected: Any, predicted: Any) -> bool:
    return bool(normalize_text(_text(expected)) == normalize_text(_text(predicted)))


def _f1(expected: Any, predicted: Any) -> float:
    gold, pred = normalize_text(_text(expected)), normalize_text(_text(predicted))
    if not gold and not pred:
        return 1.0  # both empty: identical (DSPy's f1_score says 0 and prints a notice)
    return float(f1_score(pred, gold))


def _numeric(expected: Any, predicted: Any, *, tolerance: float) -> bool:
    gold, pred = _number(expected), _number(predicted)
    return gold is not None and pred is not None and abs(gold - pred) <= tolerance


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    match = _NUMBER.search(str(value))
    if match is None:
        return None
    try:
        number = float(match.group().replace(",", ""))
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _contains(expected: Any, predicted: Any, *, ignore_case: bool) -> bool:
    gold, pred = " ".join(_text(expected).split()), " ".join(_text(predicted).split())
    if ignore_case:
        gold, pred = gold.casefold(), pred.casefold()
    return gold in pred
