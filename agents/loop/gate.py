"""The deploy gate: a candidate's measurements against the cycle's objectives, with every reason it fails."""

from __future__ import annotations

from typing import Any

from agents.loop.models import DeployRequest

SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2, "critical": 3}


def blocking_failures(validation: dict[str, Any] | None, validator_type: str, severity: str) -> list[dict[str, Any]]:
    """Failed results of ``validator_type`` at or above ``severity`` in an aggregated validation report."""
    if not validation:
        return []
    floor = SEVERITY_RANK.get(severity, 2)
    return [
        r
        for r in validation.get("results", [])
        if r.get("type") == validator_type
        and not r.get("passed", True)
        and SEVERITY_RANK.get(str(r.get("severity", "error")), 2) >= floor
    ]


def check_objectives(req: DeployRequest) -> tuple[dict[str, bool], list[str]]:
    """Each objective's outcome, and a human reason for every one that fails."""
    o = req.objectives
    checks: dict[str, bool] = {}
    reasons: list[str] = []
    if req.optimized_score is None:
        checks["measured"] = False
        reasons.append("the optimized program was not measured")
    improvement = (
        (req.optimized_score - req.baseline_score)
        if req.optimized_score is not None and req.baseline_score is not None
        else None
    )
    if o.min_improvement is not None:
        ok = improvement is not None and improvement >= o.min_improvement
        checks["min_improvement"] = ok
        if not ok:
            reasons.append(f"improvement {improvement} is below the required {o.min_improvement} points")
    if o.min_score is not None:
        ok = req.optimized_score is not None and req.optimized_score >= o.min_score
        checks["min_score"] = ok
        if not ok:
            reasons.append(f"score {req.optimized_score} is below the required {o.min_score}")
    if o.max_cost is not None:
        ok = req.cost <= o.max_cost
        checks["max_cost"] = ok
        if not ok:
            reasons.append(f"cost ${req.cost:.6f} is over the limit of ${o.max_cost}")
    if o.max_latency_p95_ms is not None:
        ok = req.latency_p95_ms is not None and req.latency_p95_ms <= o.max_latency_p95_ms
        checks["max_latency_p95_ms"] = ok
        if not ok:
            reasons.append(f"latency p95 {req.latency_p95_ms} ms is over the limit of {o.max_latency_p95_ms} ms")
    for required in o.required_validators:
        name = f"validator:{required.type}"
        if req.validation is None:
            checks[name] = False
            reasons.append(f"validator {required.type} is required but no validation ran")
            continue
        ran = required.type in (req.validation.get("counts") or {})
        failures = blocking_failures(req.validation, required.type, required.severity)
        checks[name] = ran and not failures
        if not ran:
            reasons.append(f"validator {required.type} is required but did not run")
        for failure in failures:
            where = f" (example {failure['example']})" if failure.get("example") is not None else ""
            reasons.append(
                f"{required.type}/{failure.get('check')} {failure.get('severity')}: {failure.get('message')}{where}"
            )
    return checks, reasons
