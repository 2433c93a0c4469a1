"""The assertion framework: :class:`DSPyAssertionFramework` runs validators over a request and keeps stats.

::

    framework = DSPyAssertionFramework()           # built-in validators + installed plugins
    report = await framework.validate(request)
    report.passed, report.results, framework.get_stats()

A validator is any object with ``validate(request) -> list[AssertionResult]`` (:class:`Validator`), or the
guide's ``validate(module, test_inputs)``, adapted at registration (``dspyrt.agents.assertions.custom``), which
runs when the framework is given the live module: :meth:`DSPyAssertionFramework.validate_module` runs the module
on the inputs and validates what it answered, ``validate(request, module=...)`` checks outputs already recorded.
Validators are synchronous: the framework runs each in a worker thread so the event loop never waits on analysis. The
messages live in ``dspyrt.agents.assertions.models``, the aggregation in ``dspyrt.agents.assertions.report``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import anyio
import anyio.to_thread

from dspyrt.agents.assertions.code_quality import CodeQualityValidator
from dspyrt.agents.assertions.custom import CustomValidatorRegistry, ModuleValidator, as_validator
from dspyrt.agents.assertions.logic import LogicValidator
from dspyrt.agents.assertions.models import (
    AssertionResult,
    AssertionStats,
    AssertionType,
    Case,
    ValidationReport,
    ValidationRequest,
)
from dspyrt.agents.assertions.performance import PerformanceValidator
from dspyrt.agents.assertions.report import build_report
from dspyrt.agents.assertions.reward import ValidationReward
from dspyrt.agents.assertions.security import SecurityValidator
from dspyrt.agents.assertions.stats import AssertionStatsRecorder
from dspyrt.agents.assertions.validator import Validator, run_validator
from dspyrt.agents.scoring import jsonable
from dspyrt.bus.errors import ConfigurationError


def default_validators() -> dict[AssertionType, list[Validator]]:
    """The four built-in validators, plus every plugin installed under ``dspyrt.validators`` as ``custom``."""
    return {
        AssertionType.CODE_QUALITY: [CodeQualityValidator()],
        AssertionType.LOGIC: [LogicValidator()],
        AssertionType.PERFORMANCE: [PerformanceValidator()],
        AssertionType.SECURITY: [SecurityValidator()],
        AssertionType.CUSTOM: list(CustomValidatorRegistry.installed().load_all().values()),
    }


class DSPyAssertionFramework:
    """Runs validators over a :class:`ValidationRequest` and keeps pass-rate stats.

    ``validators`` maps each type to its validators; by default the built-ins plus installed plugins
    (:func:`default_validators`). Add more with :meth:`add_validator`.
    """

    def __init__(self, validators: Mapping[AssertionType, Iterable[Validator]] | None = None) -> None:
        self._validators: dict[AssertionType, list[Validator]] = {t: [] for t in AssertionType}
        self._stats = AssertionStatsRecorder()
        chosen = default_validators() if validators is None else validators
        for assertion_type, items in chosen.items():
            for validator in items:
                self.add_validator(assertion_type, validator)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        # A service, not a value: a dspy.Module holding one (the guide's pattern) shares it with the copies DSPy
        # makes while optimizing.
        return self

    def add_validator(self, assertion_type: AssertionType | str, validator: Any) -> None:
        """Run ``validator`` for ``assertion_type`` too (``AssertionType.CUSTOM`` for your own checks): one with
        ``validate(request)``, or the guide's ``validate(module, test_inputs)`` (adapted); anything else is
        refused here with a :class:`ConfigurationError` naming both interfaces."""
        try:
            kind = AssertionType(assertion_type)
        except ValueError:
            known = ", ".join(t.value for t in AssertionType)
            raise ConfigurationError(f"unknown assertion type {assertion_type!r}; known: {known}") from None
        self._validators[kind].append(as_validator(validator))

    def validators(self) -> dict[AssertionType, list[Validator]]:
        """The registered validators by type (types without one are left out)."""
        return {t: list(v) for t, v in self._validators.items() if v}

    async def validate(self, request: ValidationRequest, *, module: Any = None) -> ValidationReport:
        """Run every validator of the requested types in parallel (each in a worker thread); aggregate.

        ``module``: the live program that produced the request's outputs, for validators of a module (without
        it they report a ``needs_module`` warning)."""
        started = time.perf_counter()
        jobs = self._jobs(request, module)
        chunks: list[list[AssertionResult]] = [[] for _ in jobs]

        async def run(index: int, assertion_type: AssertionType, validator: Validator) -> None:
            chunks[index] = await anyio.to_thread.run_sync(run_validator, assertion_type, validator, request)

        async with anyio.create_task_group() as tg:
            for index, (assertion_type, validator) in enumerate(jobs):
                tg.start_soon(run, index, assertion_type, validator)
        return self._report(request, [r for chunk in chunks for r in chunk], started)

    def reward_fn(
        self, template: ValidationRequest | None = None, *, types: Iterable[AssertionType] | None = None
    ) -> ValidationReward:
        """A ``dspy.Refine`` / ``dspy.BestOfN`` reward ``(args, prediction) -> float``: :class:`ValidationReward`."""
        return ValidationReward(self, template, types)

    def get_stats(self) -> AssertionStats:
        """Pass rates over every validation so far (this instance)."""
        return self._stats.snapshot()

    def reset_stats(self) -> None:
        """Forget the recorded validations."""
        self._stats.reset()

    def check(self, request: ValidationRequest, *, module: Any = None) -> ValidationReport:
        """Run the validators one after another in the calling thread (what a reward function needs).

        Prefer :meth:`validate` in async code: it runs them in parallel off the event loop.
        """
        started = time.perf_counter()
        results = [r for t, v in self._jobs(request, module) for r in run_validator(t, v, request)]
        return self._report(request, results, started)

    def validate_module(
        self, module: Any, test_inputs: Iterable[Mapping[str, Any]], **options: Any
    ) -> ValidationReport:
        """Run ``module`` (a live program, on the configured ``dspy.LM``) on each of ``test_inputs`` and validate
        what it answered, module validators included. ``options``: the other fields of a
        :class:`ValidationRequest` (``output_schema``, ``invariants``, ``types``, ``fail_on`` ...). Blocking."""
        cases: list[Case] = []
        for inputs in test_inputs:
            started = time.perf_counter()
            prediction = module(**inputs)
            latency_ms = (time.perf_counter() - started) * 1000
            items = prediction.items() if hasattr(prediction, "items") else []
            outputs = {str(k): jsonable(v) for k, v in items}
            cases.append(Case(inputs=dict(inputs), outputs=outputs, latency_ms=round(latency_ms, 3)))
        return self.check(ValidationRequest(cases=cases, **options), module=module)

    def _jobs(self, request: ValidationRequest, module: Any = None) -> list[tuple[AssertionType, Validator]]:
        wanted = set(request.types) if request.types is not None else set(AssertionType)
        return [
            (t, v.bind(module) if module is not None and isinstance(v, ModuleValidator) else v)
            for t in AssertionType
            if t in wanted
            for v in self._validators[t]
        ]

    def _report(self, request: ValidationRequest, results: list[AssertionResult], started: float) -> ValidationReport:
        report = build_report(
            results,
            fail_on=request.fail_on,
            cases=len(request.cases),
            max_results=request.max_results,
            duration_ms=(time.perf_counter() - started) * 1000,
        )
        self._stats.record(report)
        return report
