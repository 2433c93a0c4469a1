"""Aggregation: validators' results into one :class:`ValidationReport`, and several reports into one.

The framework builds one report per validation (:func:`build_report`); the ``assertions`` agent merges the
reports of the per-type agents (:func:`merge_reports`), which equals one report built over all their results.
"""

from __future__ import annotations

from collections.abc import Iterable

from dspyrt.agents.assertions.models import (
    AssertionResult,
    AssertionType,
    CheckSummary,
    Severity,
    TypeCounts,
    ValidationReport,
)


def build_report(
    results: Iterable[AssertionResult],
    *,
    fail_on: Severity,
    cases: int,
    max_results: int = 500,
    duration_ms: float = 0.0,
) -> ValidationReport:
    """Aggregate ``results`` (from one or several validators) into a report."""
    results = list(results)
    summaries: dict[tuple[AssertionType, str], CheckSummary] = {}
    counts: dict[AssertionType, TypeCounts] = {}
    for result in results:
        key = (result.type, result.check)
        summary = summaries.get(key) or CheckSummary(
            type=result.type, check=result.check, results=0, failures=0, passed=True, blocking=False
        )
        summary.results += 1
        tally = counts.setdefault(result.type, TypeCounts())
        tally.results += 1
        if result.passed:
            tally.passed += 1
        else:
            tally.failed += 1
            tally.by_severity[result.severity] = tally.by_severity.get(result.severity, 0) + 1
            summary.failures += 1
            summary.passed = False
            if summary.worst is None or result.severity.at_least(summary.worst):
                summary.worst = result.severity
            summary.blocking = summary.blocking or result.severity.at_least(fail_on)
        summaries[key] = summary
    for summary in summaries.values():
        tally = counts[summary.type]
        tally.checks += 1
        tally.failed_checks += 0 if summary.passed else 1
    return _assemble(list(summaries.values()), counts, results, fail_on, cases, max_results, 0, duration_ms)


def merge_reports(
    reports: Iterable[ValidationReport],
    *,
    fail_on: Severity,
    cases: int,
    max_results: int = 500,
    duration_ms: float = 0.0,
) -> ValidationReport:
    """One report from several (e.g. one per validator type): checks and counts add up, results are
    re-ordered and cut to ``max_results``, and ``passed``/``score`` are judged again at ``fail_on``."""
    summaries: dict[tuple[AssertionType, str], CheckSummary] = {}
    counts: dict[AssertionType, TypeCounts] = {}
    results: list[AssertionResult] = []
    omitted = 0
    for report in reports:
        results.extend(report.results)
        omitted += report.omitted
        for part in report.checks:
            key = (part.type, part.check)
            known = summaries.get(key)
            if known is None:
                summaries[key] = part.model_copy()
                continue
            known.results += part.results
            known.failures += part.failures
            known.passed = known.passed and part.passed
            if part.worst is not None and (known.worst is None or part.worst.at_least(known.worst)):
                known.worst = part.worst
        for assertion_type, tally in report.counts.items():
            total = counts.setdefault(assertion_type, TypeCounts())
            total.results += tally.results
            total.passed += tally.passed
            total.failed += tally.failed
            total.checks += tally.checks
            total.failed_checks += tally.failed_checks
            for severity, number in tally.by_severity.items():
                total.by_severity[severity] = total.by_severity.get(severity, 0) + number
    checks = list(summaries.values())
    for summary in checks:
        summary.blocking = summary.worst is not None and summary.worst.at_least(fail_on)
    return _assemble(checks, counts, results, fail_on, cases, max_results, omitted, duration_ms)


def _assemble(
    checks: list[CheckSummary],
    counts: dict[AssertionType, TypeCounts],
    results: list[AssertionResult],
    fail_on: Severity,
    cases: int,
    max_results: int,
    omitted: int,
    duration_ms: float,
) -> ValidationReport:
    blocking = sum(1 for s in checks if s.blocking)
    ordered = sorted(results, key=lambda r: (r.passed, 0 if r.passed else -r.severity.rank))
    return ValidationReport(
        passed=blocking == 0,
        score=1.0 if not checks else (len(checks) - blocking) / len(checks),
        fail_on=fail_on,
        cases=cases,
        counts=counts,
        checks=checks,
        results=ordered[:max_results],
        omitted=omitted + max(len(ordered) - max_results, 0),
        duration_ms=duration_ms,
    )
