"""The performance validator: latency percentiles, tokens and cost per call against the request's objectives.

Checks: ``latency_p50`` and ``latency_p95`` (nearest-rank percentiles of ``latency_ms`` over the cases that
recorded it), ``tokens_per_call`` (input plus output tokens of every call) and ``cost_per_call`` (every call).
Only objectives the request sets are checked. An objective that no case has data for fails with severity
``warning``: it could not be verified.
"""

from __future__ import annotations

from typing import ClassVar

from dspyrt.agents.assertions.collector import ResultCollector
from dspyrt.agents.assertions.models import AssertionResult, AssertionType, Severity, ValidationRequest
from dspyrt.runtime.stats import percentile


class PerformanceValidator:
    """Latency, tokens and cost of the recorded calls against :class:`~dspyrt.agents.assertions.models.Objectives`."""

    name: ClassVar[str] = "performance"

    def validate(self, request: ValidationRequest) -> list[AssertionResult]:
        """Compare the cases' measurements with the objectives the request sets."""
        collector = ResultCollector(AssertionType.PERFORMANCE, limit=request.max_results_per_check)
        objectives = request.objectives
        total = len(request.cases)
        latencies = [c.latency_ms for c in request.cases if c.latency_ms is not None]
        for check, pct, limit in (
            ("latency_p50", 50, objectives.max_latency_p50_ms),
            ("latency_p95", 95, objectives.max_latency_p95_ms),
        ):
            if limit is None:
                continue
            if not latencies:
                _no_data(collector, check, "latency_ms", f"p{pct} <= {limit:g} ms")
                continue
            value = percentile(latencies, pct)
            coverage = f"{len(latencies)} of {total} cases"
            if value > limit:
                collector.fail(
                    check,
                    f"p{pct} latency is {value:g} ms, over the {limit:g} ms objective ({coverage})",
                    severity=objectives.severity,
                    evidence=f"p50={percentile(latencies, 50):g} ms p95={percentile(latencies, 95):g} "
                    f"ms max={max(latencies):g} ms",
                )
            else:
                collector.checked(check, summary=f"p{pct} latency {value:g} ms <= {limit:g} ms ({coverage})")

        tokens: list[float | None] = [c.tokens for c in request.cases]
        costs: list[float | None] = [c.cost for c in request.cases]
        per_call: list[tuple[str, str, float | None, list[float | None], str]] = [
            ("tokens_per_call", "tokens", objectives.max_tokens_per_call, tokens, ""),
            ("cost_per_call", "cost", objectives.max_cost_per_call, costs, "$"),
        ]
        for check, what, cap, values, unit in per_call:
            if cap is None:
                continue
            measured = [(i, v) for i, v in enumerate(values) if v is not None]
            if not measured:
                _no_data(collector, check, what, f"<= {unit}{cap:g} per call")
                continue
            over = [(i, v) for i, v in measured if v > cap]
            worst_index, worst = max(measured, key=lambda item: item[1])
            mean = sum(v for _, v in measured) / len(measured)
            if over:
                collector.fail(
                    check,
                    f"{len(over)} of {len(measured)} calls used more than {unit}{cap:g} {what} "
                    f"(worst {unit}{worst:g} in case {worst_index})",
                    severity=objectives.severity,
                    evidence=f"cases over: {', '.join(str(i) for i, _ in over[:50])}; mean {unit}{mean:g}",
                    example=over[0][0],
                )
            else:
                collector.checked(
                    check,
                    summary=f"every call within {unit}{cap:g} {what} (max {unit}{worst:g}, mean {unit}{mean:g}, "
                    f"{len(measured)} of {total} cases measured)",
                )
        return collector.results()


def _no_data(collector: ResultCollector, check: str, what: str, objective: str) -> None:
    collector.fail(
        check,
        f"no case records {what}: the objective {objective} cannot be verified",
        severity=Severity.WARNING,
    )
