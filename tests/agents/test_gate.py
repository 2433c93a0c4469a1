"""The deploy gate judges required validators on the report's full counts, not its cut list of results."""

from __future__ import annotations

from typing import Any

from dspyrt.agents.loop.gate import check_objectives
from dspyrt.agents.loop.models import DeployRequest

SPEC = {"signature": "text -> topic", "instructions": "Classify."}
ARTIFACT = {"store": "s", "name": "p/1.json", "version": "1", "sha256": "", "size": 0}


def request(validation: dict[str, Any]) -> DeployRequest:
    return DeployRequest.model_validate(
        {
            "program_name": "p",
            "program": SPEC,
            "artifact": ARTIFACT,
            "optimized_score": 90.0,
            "baseline_score": 10.0,
            "validation": validation,
            "objectives": {"required_validators": [{"type": "logic", "severity": "error"}]},
        }
    )


def counts(**by_severity: int) -> dict[str, Any]:
    failed = sum(by_severity.values())
    return {"logic": {"results": 600, "passed": 600 - failed, "by_severity": by_severity}}


def test_failures_cut_from_the_results_list_still_block() -> None:
    """The report lists the worst few hundred results: here the logic errors were all cut (warnings filled it)."""
    checks, reasons = check_objectives(request({"counts": counts(error=3, warning=400), "results": []}))
    assert checks["validator:logic"] is False
    assert reasons == ["logic: 3 more failure(s) at or above error not listed in the report"]


def test_listed_failures_are_the_reasons_and_only_the_rest_are_counted() -> None:
    listed = {"type": "logic", "check": "exact", "severity": "error", "passed": False, "message": "wrong", "example": 4}
    checks, reasons = check_objectives(request({"counts": counts(error=2), "results": [listed]}))
    assert checks["validator:logic"] is False
    assert reasons == [
        "logic/exact error: wrong (example 4)",
        "logic: 1 more failure(s) at or above error not listed in the report",
    ]


def test_failures_below_the_required_severity_pass() -> None:
    checks, reasons = check_objectives(request({"counts": counts(warning=5, info=2), "results": []}))
    assert checks["validator:logic"] is True and reasons == []


def measured(**fields: Any) -> DeployRequest:
    base = {"program_name": "p", "program": SPEC, "artifact": ARTIFACT, "optimized_score": 90.0, "baseline_score": 10.0}
    return DeployRequest.model_validate({**base, **fields})


def test_a_mixed_model_comparison_is_refused_unless_allowed() -> None:
    used = {"openai/x": 40, "demo/fewshot": 12}
    checks, reasons = check_objectives(measured(models_used=used))
    assert checks["single_model"] is False
    assert len(reasons) == 1 and "demo/fewshot (12 calls), openai/x (40 calls)" in reasons[0]
    checks, reasons = check_objectives(measured(models_used=used, objectives={"allow_mixed_models": True}))
    assert (checks["single_model"], reasons) == (True, [])
    checks, reasons = check_objectives(measured(models_used={"openai/x": 52}))
    assert "single_model" not in checks and reasons == []


def test_coverage_below_the_minimum_is_refused() -> None:
    checks, reasons = check_objectives(measured(coverage=0.975))
    assert checks["min_coverage"] is False and "coverage 97.5% is below the required 100.0%" in reasons[0]
    checks, reasons = check_objectives(measured(coverage=0.975, objectives={"min_coverage": 0.95}))
    assert (checks["min_coverage"], reasons) == (True, [])
