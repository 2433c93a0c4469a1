"""The performance validator: latency percentiles, tokens and cost per call against objectives."""

from __future__ import annotations

from typing import Any

import pytest

from dspyrt.agents.assertions import AssertionResult, PerformanceValidator, Severity, ValidationRequest
from dspyrt.runtime.stats import percentile

pytestmark = pytest.mark.timeout(30)


def validate(cases: list[dict[str, Any]], **objectives: Any) -> list[AssertionResult]:
    return PerformanceValidator().validate(ValidationRequest(cases=cases, objectives=objectives))  # type: ignore[arg-type]


def failures(results: list[AssertionResult]) -> list[AssertionResult]:
    return [r for r in results if not r.passed]


def test_nearest_rank_percentiles() -> None:
    values = [float(v) for v in range(100, 0, -1)]
    assert percentile(values, 50) == 50 and percentile(values, 95) == 95 and percentile(values, 100) == 100
    assert percentile([7.0], 95) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0


def test_latency_percentiles_against_objectives() -> None:
    cases = [{"latency_ms": float(ms)} for ms in range(1, 101)]
    passing = validate(cases, max_latency_p50_ms=50, max_latency_p95_ms=95)
    assert failures(passing) == []
    assert [r.message for r in passing] == [
        "p50 latency 50 ms <= 50 ms (100 of 100 cases)",
        "p95 latency 95 ms <= 95 ms (100 of 100 cases)",
    ]
    [slow] = failures(validate(cases, max_latency_p50_ms=60, max_latency_p95_ms=90))
    assert slow.check == "latency_p95" and slow.severity is Severity.ERROR
    assert slow.message == "p95 latency is 95 ms, over the 90 ms objective (100 of 100 cases)"
    assert slow.evidence == "p50=50 ms p95=95 ms max=100 ms"


def test_tokens_and_cost_per_call() -> None:
    cases = [
        {"input_tokens": 300, "output_tokens": 100, "cost": 0.001},
        {"input_tokens": 900, "output_tokens": 300, "cost": 0.004},
        {"input_tokens": 200, "cost": 0.0005},
    ]
    results = validate(cases, max_tokens_per_call=1000, max_cost_per_call=0.002)
    tokens, cost = failures(results)
    assert tokens.check == "tokens_per_call" and tokens.example == 1
    assert tokens.message == "1 of 3 calls used more than 1000 tokens (worst 1200 in case 1)"
    assert (
        cost.check == "cost_per_call"
        and cost.message == "1 of 3 calls used more than $0.002 cost (worst $0.004 in case 1)"
    )
    assert failures(validate(cases, max_tokens_per_call=1200, max_cost_per_call=0.004)) == []


def test_an_objective_without_measurements_is_a_warning() -> None:
    request = ValidationRequest(cases=[{"outputs": {"a": 1}}], objectives={"max_latency_p95_ms": 100})  # type: ignore[list-item,arg-type]
    [unverified] = PerformanceValidator().validate(request)
    assert not unverified.passed and unverified.severity is Severity.WARNING
    assert unverified.message == "no case records latency_ms: the objective p95 <= 100 ms cannot be verified"


def test_no_objectives_means_nothing_to_check() -> None:
    assert validate([{"latency_ms": 10_000.0, "input_tokens": 10**6}]) == []


def test_impossible_measurements_are_refused() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        ValidationRequest(cases=[{"latency_ms": -1}])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="finite number"):
        ValidationRequest.model_validate_json('{"cases": [{"cost": "Infinity"}]}')
