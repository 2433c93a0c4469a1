"""The deploy gate: a candidate's measurements against the cycle's objectives, with every reason it fails."""

from __future__ import annotations

from typing import Any

from dspyrt.agents.loop.models import DeployRequest
from dspyrt.agents.optimizers.models import improvement_points

SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2, "critical": 3}


def blocking_count(validation: dict[str, Any], validator_type: str, severity: str) -> int:
    """How many results of ``validator_type`` failed at or above ``severity``, from the report's counts: its
    ``results`` list is cut to the worst few hundred, so it cannot decide on its own."""
    floor = SEVERITY_RANK.get(severity, 2)
    tally = (validation.get("counts") or {}).get(validator_type) or {}
    return sum(int(n) for sev, n in (tally.get("by_severity") or {}).items() if SEVERITY_RANK.get(sev, 2) >= floor)


def blocking_failures(validation: dict[str, Any] | None, validator_type: str, severity: str) -> list[dict[str, Any]]:
    """The listed failed results of ``validator_type`` at or above ``severity`` (for the reasons)."""
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
    improvement = improvement_points(req.baseline_score, req.optimized_score)
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
    checks["min_coverage"] = req.coverage >= o.min_coverage
    if not checks["min_coverage"]:
        reasons.append(
            f"coverage {req.coverage:.1%} is below the required {o.min_coverage:.1%}: some examples' LM calls "
            "failed, so the scores are not over the whole devset"
        )
    if len(req.models_used) > 1:
        checks["single_model"] = o.allow_mixed_models
        if not o.allow_mixed_models:
            used = ", ".join(f"{m} ({n} calls)" for m, n in sorted(req.models_used.items()))
            reasons.append(
                f"more than one model answered ({used}): the baseline and the optimized score are not a "
                "comparison of one model; set objectives.allow_mixed_models to deploy anyway"
            )
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
        blocked = blocking_count(req.validation, required.type, required.severity)
        failures = blocking_failures(req.validation, required.type, required.severity)
        checks[name] = ran and not blocked
        if not ran:
            reasons.append(f"validator {required.type} is required but did not run")
        for failure in failures:
            where = f" (example {failure['example']})" if failure.get("example") is not None else ""
            reasons.append(
                f"{required.type}/{failure.get('check')} {failure.get('severity')}: {failure.get('message')}{where}"
            )
        if blocked > len(failures):
            reasons.append(
                f"{required.type}: {blocked - len(failures)} more failure(s) at or above {required.severity} "
                "not listed in the report"
            )
    return checks, reasons
