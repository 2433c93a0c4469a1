"""The logic validator: outputs have the declared fields, types and values, hold the declared invariants,
and agree across repeat runs of the same input.

Checks (``AssertionResult.check``):

* ``present`` — every required schema field is in each case's outputs and not null;
* ``type`` — its value has the declared type (``int`` excludes booleans; ``float`` accepts integers);
* ``choices``, ``range`` (``min``/``max``), ``length`` (``min_length``/``max_length``), ``pattern`` — the
  field's constraints; a pattern is searched with a time limit and never in values over
  ``MAX_PATTERN_INPUT`` characters, so a catastrophic expression cannot stall the validator;
* ``invariant`` — each declared :class:`~dspyrt.agents.assertions.models.Comparison` / ``Membership``;
* ``consistency`` — cases sharing a ``group`` have equal outputs
  (:class:`~dspyrt.agents.assertions.models.ConsistencyOptions`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any, ClassVar

import regex

from dspyrt.agents.assertions.collector import ResultCollector
from dspyrt.agents.assertions.models import (
    AssertionResult,
    AssertionType,
    Case,
    Comparison,
    ConsistencyOptions,
    FieldSchema,
    Invariant,
    Membership,
    ValidationRequest,
    clip,
)

MAX_PATTERN_INPUT = 10_000
"""Longest value a pattern is matched against; longer values fail the ``pattern`` check unchecked."""
PATTERN_TIMEOUT = 0.1
"""Seconds one pattern match may take before it counts as catastrophic backtracking."""

_ABSENT = object()
_SUMMARIES = {
    "present": "{n} required field value(s) present",
    "type": "{n} value(s) of their declared type",
    "choices": "{n} value(s) among their allowed choices",
    "range": "{n} value(s) within their range",
    "length": "{n} value(s) within their length bounds",
    "pattern": "{n} value(s) match their pattern",
    "invariant": "{n} invariant evaluation(s) hold",
    "consistency": "{n} field(s) agree across their repeat group",
}


class LogicValidator:
    """Schema, constraints, invariants and repeat-group consistency of the outputs."""

    name: ClassVar[str] = "logic"

    def validate(self, request: ValidationRequest) -> list[AssertionResult]:
        """Check every case against the request's schema and invariants, and the repeat groups."""
        collector = ResultCollector(AssertionType.LOGIC, limit=request.max_results_per_check, summaries=_SUMMARIES)
        patterns = _Patterns(request.output_schema)
        for index, case in enumerate(request.cases):
            for name, schema in request.output_schema.items():
                _check_field(collector, patterns, index, case, name, schema)
            for invariant in request.invariants:
                _check_invariant(collector, index, case, invariant)
        _check_consistency(collector, request)
        patterns.report(collector)
        return collector.results()


# --- fields --------------------------------------------------------------------------------------------


def _check_field(
    collector: ResultCollector, patterns: _Patterns, index: int, case: Case, name: str, schema: FieldSchema
) -> None:
    if schema.required:
        collector.checked("present")
    value = case.outputs.get(name, _ABSENT)
    if value is _ABSENT or value is None:
        if schema.required:
            what = "missing" if value is _ABSENT else "null"
            collector.fail("present", f"output field {name!r} is {what}", example=index, field=name)
        return
    collector.checked("type")
    if not _has_type(value, schema.type):
        collector.fail(
            "type",
            f"output field {name!r} should be {schema.type}, got {_kind(value)}",
            evidence=clip(repr(value), 200),
            example=index,
            field=name,
        )
        return
    items: list[Any] = list(value) if isinstance(value, list) else [value]
    if schema.choices is not None:
        collector.checked("choices")
        bad = [item for item in items if not any(_equal(item, choice) for choice in schema.choices)]
        if bad:
            collector.fail(
                "choices",
                f"output field {name!r} has {clip(repr(bad[0]), 80)}, not one of {clip(repr(schema.choices), 200)}",
                example=index,
                field=name,
            )
    if schema.min is not None or schema.max is not None:
        collector.checked("range")
        if (schema.min is not None and value < schema.min) or (schema.max is not None and value > schema.max):
            collector.fail(
                "range",
                f"output field {name!r} is {value}, outside [{_bound(schema.min)}, {_bound(schema.max)}]",
                example=index,
                field=name,
            )
    if schema.min_length is not None or schema.max_length is not None:
        collector.checked("length")
        size = len(value)
        if (schema.min_length is not None and size < schema.min_length) or (
            schema.max_length is not None and size > schema.max_length
        ):
            unit = "characters" if isinstance(value, str) else "items"
            collector.fail(
                "length",
                f"output field {name!r} has {size} {unit}, outside "
                f"[{_bound(schema.min_length)}, {_bound(schema.max_length)}]",
                example=index,
                field=name,
            )
    if schema.pattern is not None:
        for item in items:
            patterns.check(collector, index, name, item)


class _Patterns:
    """Each field's compiled pattern; a field whose pattern timed out once is not matched again."""

    def __init__(self, schema: Mapping[str, FieldSchema]) -> None:
        self._compiled = {name: regex.compile(s.pattern) for name, s in schema.items() if s.pattern is not None}
        self._skipped: dict[str, int] = defaultdict(int)

    def check(self, collector: ResultCollector, index: int, name: str, text: str) -> None:
        pattern = self._compiled[name]
        if name in self._skipped:
            self._skipped[name] += 1
            return
        collector.checked("pattern")
        if len(text) > MAX_PATTERN_INPUT:
            collector.fail(
                "pattern",
                f"output field {name!r} is {len(text)} characters, too long to match against its pattern "
                f"(limit {MAX_PATTERN_INPUT})",
                example=index,
                field=name,
            )
            return
        try:
            found = pattern.search(text, timeout=PATTERN_TIMEOUT)
        except TimeoutError:
            self._skipped[name] = 0
            collector.fail(
                "pattern",
                f"the pattern of {name!r} took over {PATTERN_TIMEOUT:g}s on this value (catastrophic "
                f"backtracking?); it is not matched against the remaining values",
                evidence=pattern.pattern,
                example=index,
                field=name,
            )
            return
        if found is None:
            collector.fail(
                "pattern",
                f"output field {name!r} does not match /{pattern.pattern}/",
                evidence=clip(repr(text), 200),
                example=index,
                field=name,
            )

    def report(self, collector: ResultCollector) -> None:
        for name, count in self._skipped.items():
            if count:
                collector.fail(
                    "pattern",
                    f"{count} value(s) of {name!r} were not matched against its pattern after it timed out",
                    field=name,
                )


def _has_type(value: Any, declared: str) -> bool:
    if declared == "str":
        return isinstance(value, str)
    if declared == "bool":
        return isinstance(value, bool)
    if declared == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if declared == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if declared == "list[str]":
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return False


def _kind(value: Any) -> str:
    if isinstance(value, list):
        kinds = sorted({type(item).__name__ for item in value})
        return f"list[{' | '.join(kinds)}]" if kinds else "list"
    return type(value).__name__


def _bound(value: float | None) -> str:
    if value is None:
        return "…"
    return str(int(value)) if float(value).is_integer() else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equal(left: Any, right: Any) -> bool:
    """Equality that keeps booleans apart from numbers (``True != 1`` here)."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if _is_number(left) and _is_number(right):
        return bool(left == right)
    return type(left) is type(right) and bool(left == right)


# --- invariants ----------------------------------------------------------------------------------------


def _resolve(case: Case, ref: str) -> Any:
    source: Mapping[str, Any]
    if ref.startswith("inputs."):
        source, key = case.inputs, ref.removeprefix("inputs.")
    else:
        source, key = case.outputs, ref.removeprefix("outputs.")
    value = source.get(key, _ABSENT)
    return _ABSENT if value is None else value


def _check_invariant(collector: ResultCollector, index: int, case: Case, invariant: Invariant) -> None:
    collector.checked("invariant")
    if isinstance(invariant, Comparison):
        refs = [invariant.left] + ([invariant.right] if invariant.right is not None else [])
        values = [_resolve(case, ref) for ref in refs]
        if invariant.right is None:
            values.append(invariant.value)
    else:
        refs = [invariant.field, invariant.other]
        values = [_resolve(case, ref) for ref in refs]
    missing = [ref for ref, value in zip(refs, values, strict=False) if value is _ABSENT]
    if missing:
        problem: str | None = f"{', '.join(repr(m) for m in missing)} missing"
    elif isinstance(invariant, Comparison):
        problem = _compare(invariant, values[0], values[1])
    else:
        problem = _membership(invariant, values[0], values[1])
    if problem is not None:
        shown = ", ".join(
            f"{ref}={clip(repr(v), 80)}" for ref, v in zip(refs, values, strict=False) if v is not _ABSENT
        )
        collector.fail(
            "invariant",
            f"invariant {invariant.label!r} does not hold" + (f": {problem}" if problem else ""),
            severity=invariant.severity,
            evidence=shown or None,
            example=index,
            field=refs[0].removeprefix("outputs."),
        )


def _compare(invariant: Comparison, left: Any, right: Any) -> str | None:
    op = invariant.op
    if op in ("==", "!="):
        return None if _equal(left, right) == (op == "==") else ""
    comparable = (_is_number(left) and _is_number(right)) or (isinstance(left, str) and isinstance(right, str))
    if not comparable:
        return f"cannot order {type(left).__name__} against {type(right).__name__}"
    holds = {"<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right}[op]
    return None if holds else ""


def _membership(invariant: Membership, item: Any, container: Any) -> str | None:
    if isinstance(container, list):
        found = any(_equal(item, other) for other in container)
    elif isinstance(container, str):
        if not isinstance(item, str):
            return f"cannot look for a {type(item).__name__} in text"
        found = item in container
    elif isinstance(container, Mapping):
        found = isinstance(item, str) and item in container
    else:
        return f"{invariant.other!r} is a {type(container).__name__}, not a list, text or object"
    return None if found == (invariant.op == "in_field") else ""


# --- repeat groups ---------------------------------------------------------------------------------------


def _check_consistency(collector: ResultCollector, request: ValidationRequest) -> None:
    groups: dict[str, list[int]] = defaultdict(list)
    for index, case in enumerate(request.cases):
        if case.group is not None:
            groups[case.group].append(index)
    options = request.consistency
    for group, members in groups.items():
        if len(members) < 2:
            continue
        cases = [request.cases[i] for i in members]
        fields = options.fields or list(request.output_schema) or sorted({k for c in cases for k in c.outputs})
        for name in fields:
            collector.checked("consistency")
            clusters: list[tuple[Any, list[int]]] = []
            for index, case in zip(members, cases, strict=True):
                value = case.outputs.get(name, _ABSENT)
                for representative, indices in clusters:
                    if _same(representative, value, options):
                        indices.append(index)
                        break
                else:
                    clusters.append((value, [index]))
            if len(clusters) > 1:
                described = "; ".join(
                    f"{'(missing)' if value is _ABSENT else clip(repr(value), 60)} "
                    f"(case{'s' if len(indices) > 1 else ''} {', '.join(map(str, indices))})"
                    for value, indices in clusters
                )
                collector.fail(
                    "consistency",
                    f"repeat group {group!r}: {name!r} has {len(clusters)} different values over {len(members)} runs",
                    severity=options.severity,
                    evidence=described,
                    example=clusters[1][1][0],
                    field=name,
                )


def _same(left: Any, right: Any, options: ConsistencyOptions) -> bool:
    if _is_number(left) and _is_number(right):
        return bool(abs(left - right) <= options.tolerance)
    return bool(_canonical(left, options.normalize_text) == _canonical(right, options.normalize_text))


def _canonical(value: Any, normalize: bool) -> Any:
    if isinstance(value, str):
        return " ".join(value.split()).casefold() if normalize else value
    if isinstance(value, list):
        return ("list", tuple(_canonical(v, normalize) for v in value))
    if isinstance(value, Mapping):
        return ("dict", tuple(sorted((str(k), repr(_canonical(v, normalize))) for k, v in value.items())))
    if isinstance(value, bool):
        return ("bool", value)
    return value
