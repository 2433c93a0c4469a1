"""Pass-rate bookkeeping: :class:`AssertionStatsRecorder` accumulates :class:`AssertionStats` from reports."""

from __future__ import annotations

import threading

from dspyrt.agents.assertions.models import AssertionStats, PassCounts, ValidationReport

MAX_STAT_KEYS = 1_000
"""Distinct checks the stats keep; results of further checks are counted under their type only."""


class AssertionStatsRecorder:
    """Accumulates :class:`AssertionStats` from reports; safe to use from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = AssertionStats()

    def record(self, report: ValidationReport) -> None:
        """Count one validation."""
        types: dict[str, bool] = {}
        for summary in report.checks:
            types[summary.type.value] = types.get(summary.type.value, True) and summary.passed
        with self._lock:
            stats = self._stats
            stats.validations += 1
            stats.passed += int(report.passed)
            stats.failed += int(not report.passed)
            stats.pass_rate = stats.passed / stats.validations
            for name, passed in types.items():
                _count(stats.by_type.setdefault(name, PassCounts()), passed)
            for summary in report.checks:
                key = f"{summary.type.value}.{summary.check}"
                counts = stats.by_check.get(key)
                if counts is None:
                    if len(stats.by_check) >= MAX_STAT_KEYS:
                        continue
                    counts = stats.by_check[key] = PassCounts()
                _count(counts, summary.passed)

    def snapshot(self) -> AssertionStats:
        """A copy of the stats so far."""
        with self._lock:
            return self._stats.model_copy(deep=True)

    def reset(self) -> None:
        """Forget every recorded validation."""
        with self._lock:
            self._stats = AssertionStats()


def _count(counts: PassCounts, passed: bool) -> None:
    counts.runs += 1
    counts.passed += int(passed)
    counts.failed += int(not passed)
    counts.pass_rate = counts.passed / counts.runs
