"""The framework: fan-out over validators, aggregation, stats, custom validators and entry-point plugins."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from importlib.metadata import EntryPoint
from typing import Any

import anyio
import pytest

import dspyrt.agents.assertions as assertions_package
from dspyrt.agents.assertions import (
    ENTRY_POINT_GROUP,
    AssertionResult,
    AssertionType,
    CodeQualityValidator,
    CustomValidatorRegistry,
    DSPyAssertionFramework,
    LogicValidator,
    PerformanceValidator,
    SecurityValidator,
    Severity,
    ValidationReport,
    ValidationRequest,
    merge_reports,
)
from dspyrt.bus.errors import ConfigurationError, NotFoundError

pytestmark = pytest.mark.timeout(30)


class NoApologies:
    """A custom validator, as a plugin would ship it: outputs must not apologize."""

    name = "no-apologies"

    def validate(self, request: ValidationRequest) -> list[AssertionResult]:
        results = []
        for index, case in enumerate(request.cases):
            for field, value in case.outputs.items():
                if isinstance(value, str) and "sorry" in value.lower():
                    results.append(
                        AssertionResult(
                            type=AssertionType.CUSTOM,
                            check="no_apologies",
                            passed=False,
                            severity=Severity.WARNING,
                            message=f"{field} apologizes",
                            example=index,
                            field=field,
                        )
                    )
        if not results:
            results.append(
                AssertionResult(type=AssertionType.CUSTOM, check="no_apologies", passed=True, message="no apology")
            )
        return results


class DictResults:
    """A validator returning plain mappings; the framework fills in the type."""

    def validate(self, request: ValidationRequest) -> list[dict[str, Any]]:
        return [{"check": "length", "passed": len(request.cases) < 3, "severity": "error", "message": "few cases"}]


class Broken:
    def validate(self, request: ValidationRequest) -> list[AssertionResult]:
        raise KeyError("boom")


no_apologies = NoApologies()

REQUEST = ValidationRequest(
    cases=[
        {"inputs": {"q": "2+2"}, "outputs": {"answer": 4, "code": "def f():\n    return 1\n"}, "latency_ms": 100},  # type: ignore[list-item]
        {"inputs": {"q": "3+3"}, "outputs": {"answer": 600, "code": "import os\n"}, "latency_ms": 300},  # type: ignore[list-item]
    ],
    output_schema={"answer": {"type": "int", "max": 100}, "code": "str"},  # type: ignore[dict-item]
    code_fields=["code"],
    objectives={"max_latency_p95_ms": 1000},  # type: ignore[arg-type]
)


def builtins() -> dict[AssertionType, Sequence[Any]]:
    return {
        AssertionType.CODE_QUALITY: [CodeQualityValidator()],
        AssertionType.LOGIC: [LogicValidator()],
        AssertionType.PERFORMANCE: [PerformanceValidator()],
        AssertionType.SECURITY: [SecurityValidator()],
    }


def test_public_api_is_pinned() -> None:
    assert assertions_package.__all__ == sorted(assertions_package.__all__, key=lambda n: (not n.isupper(), n))
    assert set(assertions_package.__all__) == {
        "ENTRY_POINT_GROUP", "AssertionResult", "AssertionStats", "AssertionStatsRecorder", "AssertionType", "Case",
        "CheckSummary", "CodeQualityOptions", "CodeQualityValidator", "Comparison", "ConsistencyOptions",
        "CustomValidatorRegistry", "DSPyAssertionFramework", "FieldSchema", "Invariant", "LogicValidator",
        "Membership", "Objectives", "PassCounts", "PerformanceValidator", "ResultCollector", "SecurityOptions",
        "SecurityValidator", "Severity", "TypeCounts", "ValidationReport", "ValidationRequest", "ValidationReward",
        "Validator", "build_report", "default_validators", "merge_reports",
    }  # fmt: skip


def test_the_default_framework_has_the_four_builtins() -> None:
    registered = DSPyAssertionFramework().validators()
    kinds = {t: [type(v).__name__ for v in vs] for t, vs in registered.items() if t is not AssertionType.CUSTOM}
    assert kinds == {
        AssertionType.CODE_QUALITY: ["CodeQualityValidator"],
        AssertionType.LOGIC: ["LogicValidator"],
        AssertionType.PERFORMANCE: ["PerformanceValidator"],
        AssertionType.SECURITY: ["SecurityValidator"],
    }


async def test_validate_aggregates_every_type_into_one_report() -> None:
    framework = DSPyAssertionFramework(builtins())
    report = await framework.validate(REQUEST)
    assert not report.passed and report.cases == 2
    failed = {(r.type, r.check, r.example) for r in report.failures()}
    assert failed == {(AssertionType.LOGIC, "range", 1), (AssertionType.CODE_QUALITY, "lint", 1)}
    assert report.results[0].severity is Severity.ERROR and report.results[-1].passed  # failures first
    code = report.counts[AssertionType.CODE_QUALITY]
    assert (code.failed, code.checks, code.failed_checks, code.by_severity) == (1, 3, 1, {Severity.ERROR: 1})
    assert report.counts[AssertionType.PERFORMANCE].failed == 0
    assert {(s.type, s.check) for s in report.checks if s.blocking} == {
        (AssertionType.LOGIC, "range"),
        (AssertionType.CODE_QUALITY, "lint"),
    }
    total = len(report.checks)
    assert report.score == pytest.approx((total - 2) / total)


async def test_types_select_the_validators_that_run() -> None:
    report = await DSPyAssertionFramework(builtins()).validate(REQUEST.model_copy(update={"types": ["performance"]}))
    assert report.passed and report.score == 1.0
    assert set(report.counts) == {AssertionType.PERFORMANCE}


async def test_fail_on_sets_the_severity_that_fails_a_report() -> None:
    apologetic = ValidationRequest(cases=[{"outputs": {"answer": "Sorry, no idea"}}])  # type: ignore[list-item]
    framework = DSPyAssertionFramework({AssertionType.CUSTOM: [no_apologies]})
    lenient = await framework.validate(apologetic)
    assert lenient.passed and lenient.score == 1.0 and len(lenient.failures()) == 1  # a warning
    strict = await framework.validate(apologetic.model_copy(update={"fail_on": Severity.WARNING}))
    assert not strict.passed and strict.score == 0.0


async def test_add_validator_custom_runs_beside_the_builtins() -> None:
    framework = DSPyAssertionFramework({AssertionType.LOGIC: [LogicValidator()]})
    framework.add_validator(AssertionType.CUSTOM, no_apologies)
    framework.add_validator("custom", DictResults())
    request = ValidationRequest(
        cases=[{"outputs": {"answer": "Sorry!"}}, {"outputs": {"answer": 3}}],  # type: ignore[list-item]
        output_schema={"answer": "str"},  # type: ignore[dict-item]
    )
    report = await framework.validate(request)
    failed = {(r.type, r.check, r.example) for r in report.failures()}
    assert failed == {(AssertionType.LOGIC, "type", 1), (AssertionType.CUSTOM, "no_apologies", 0)}
    [length] = [r for r in report.results if r.check == "length"]
    assert length.type is AssertionType.CUSTOM and length.passed


def test_add_validator_refuses_what_cannot_validate() -> None:
    framework = DSPyAssertionFramework({})
    with pytest.raises(ConfigurationError, match="has no validate"):
        framework.add_validator(AssertionType.CUSTOM, object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="unknown assertion type 'style'"):
        framework.add_validator("style", no_apologies)


async def test_a_broken_validator_fails_its_check_and_the_others_still_run() -> None:
    framework = DSPyAssertionFramework({AssertionType.CUSTOM: [Broken(), no_apologies]})
    report = await framework.validate(ValidationRequest(cases=[{"outputs": {"a": "fine"}}]))  # type: ignore[list-item]
    assert not report.passed
    [error] = report.failures()
    assert error.check == "validator_error" and error.message == "validator Broken failed: KeyError: 'boom'"
    assert any(r.check == "no_apologies" and r.passed for r in report.results)


async def test_stats_keep_pass_rates_per_type_and_check() -> None:
    framework = DSPyAssertionFramework(builtins())
    await framework.validate(REQUEST)
    await framework.validate(REQUEST.model_copy(update={"cases": REQUEST.cases[:1]}))
    stats = framework.get_stats()
    assert (stats.validations, stats.passed, stats.failed, stats.pass_rate) == (2, 1, 1, 0.5)
    assert stats.by_type["logic"].model_dump() == {"runs": 2, "passed": 1, "failed": 1, "pass_rate": 0.5}
    assert stats.by_type["performance"].pass_rate == 1.0
    assert stats.by_check["logic.range"].pass_rate == 0.5
    assert stats.by_check["code_quality.syntax"].model_dump() == {
        "runs": 2, "passed": 2, "failed": 0, "pass_rate": 1.0,
    }  # fmt: skip
    framework.reset_stats()
    assert framework.get_stats().validations == 0


async def test_validators_run_in_parallel_worker_threads_without_blocking_the_loop() -> None:
    barrier = threading.Barrier(2, timeout=5)
    loop_alive = threading.Event()
    threads: list[int] = []

    class Rendezvous:
        """Passes only if the other validator runs at the same time and the event loop keeps running."""

        def validate(self, request: ValidationRequest) -> list[AssertionResult]:
            threads.append(threading.get_ident())
            barrier.wait()  # BrokenBarrierError if the validators ran one after the other
            ok = loop_alive.wait(timeout=5)
            return [AssertionResult(type=AssertionType.CUSTOM, check="rendezvous", passed=ok, message="met")]

    framework = DSPyAssertionFramework({AssertionType.CUSTOM: [Rendezvous(), Rendezvous()]})
    reports: list[ValidationReport] = []

    async def run() -> None:
        reports.append(await framework.validate(ValidationRequest(cases=[{}])))  # type: ignore[list-item]

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.sleep(0.05)  # reached only if validate() yields to the loop
        loop_alive.set()
    [report] = reports
    assert report.passed, report.failures()
    assert len(set(threads)) == 2 and threading.get_ident() not in threads


def test_max_results_per_check_summarizes_the_rest() -> None:
    cases = [{"outputs": {"n": "x"}} for _ in range(30)]
    request = ValidationRequest(cases=cases, output_schema={"n": "int"}, max_results_per_check=5)  # type: ignore[arg-type,dict-item]
    report = DSPyAssertionFramework({AssertionType.LOGIC: [LogicValidator()]}).check(request)
    typed = [r for r in report.results if r.check == "type"]
    assert len(typed) == 6 and typed[-1].message == "... and 25 more type failure(s) not listed"
    capped = DSPyAssertionFramework({AssertionType.LOGIC: [LogicValidator()]}).check(
        request.model_copy(update={"max_results": 3})
    )
    assert len(capped.results) == 3 and capped.omitted == 4  # 6 type failures + 1 passing presence check


def test_merged_per_type_reports_equal_one_report() -> None:
    framework = DSPyAssertionFramework(builtins())
    whole = framework.check(REQUEST)
    parts = [framework.check(REQUEST.model_copy(update={"types": [t]})) for t in AssertionType]
    merged = merge_reports(parts, fail_on=REQUEST.fail_on, cases=2)
    assert (merged.passed, merged.score, merged.counts) == (whole.passed, whole.score, whole.counts)
    assert sorted(map(repr, merged.checks)) == sorted(map(repr, whole.checks))
    assert sorted(map(repr, merged.results)) == sorted(map(repr, whole.results))


def entry(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


def test_plugins_load_from_entry_points_as_classes_or_objects() -> None:
    registry = CustomValidatorRegistry(
        [
            entry("by-class", "tests.assertions.test_framework:NoApologies"),
            entry("by-object", "tests.assertions.test_framework:no_apologies"),
        ]
    )
    assert registry.names() == ["by-class", "by-object"]
    loaded = registry.load_all()
    assert isinstance(loaded["by-class"], NoApologies) and loaded["by-object"] is no_apologies
    framework = DSPyAssertionFramework({AssertionType.CUSTOM: list(loaded.values())})
    report = framework.check(ValidationRequest(cases=[{"outputs": {"a": "so sorry"}}]))  # type: ignore[list-item]
    assert [r.check for r in report.failures()] == ["no_apologies", "no_apologies"]


def test_plugin_registry_errors() -> None:
    with pytest.raises(ConfigurationError, match="registered twice"):
        CustomValidatorRegistry([entry("x", "a:B"), entry("x", "c:D")])
    registry = CustomValidatorRegistry(
        [
            entry("missing", "tests.assertions.no_such_module:X"),
            entry("useless", "tests.assertions.test_framework:ENTRY_POINT_GROUP"),
        ]
    )
    with pytest.raises(NotFoundError, match="unknown validator 'nope'; known: missing, useless"):
        registry.load("nope")
    with pytest.raises(ConfigurationError, match="cannot be loaded"):
        registry.load("missing")
    with pytest.raises(ConfigurationError, match="has no validate"):
        registry.load("useless")
