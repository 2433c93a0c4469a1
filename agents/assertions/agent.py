"""The assertion framework on the bus: one agent per validator type, and the ``assertions`` agent that fans out.

=====================  ==========================================================================
agent                  endpoints (``<prefix>.<agent>.<endpoint>``)
=====================  ==========================================================================
validator-code         ``validate`` (ValidationRequest → ValidationReport), ``stats``
validator-logic        ``validate``, ``stats``
validator-performance  ``validate``, ``stats``
validator-security     ``validate``, ``stats``
validator-custom       ``validate``, ``stats`` (plugins installed under ``dspyrt.validators``)
assertions             ``validate``: asks the per-type agents in parallel and aggregates; ``stats``
=====================  ==========================================================================

Each per-type agent runs its validator in worker threads, so one replica serves requests while another
request's analysis runs; replicas of an agent share its requests (queue group). A malformed request gets
the structured ``invalid_message`` error with field errors; the agent keeps serving.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import ClassVar

import anyio

from dspyrt.agents.assertions import (
    AssertionResult,
    AssertionStats,
    AssertionStatsRecorder,
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
    Validator,
    build_report,
    merge_reports,
)
from dspyrt.bus import DspyrtError, Empty
from dspyrt.runtime.agent import Agent, CheckResult, endpoint
from dspyrt.runtime.config import IntegrationMode

AGENT_FOR_TYPE: dict[AssertionType, str] = {
    AssertionType.CODE_QUALITY: "validator-code",
    AssertionType.LOGIC: "validator-logic",
    AssertionType.PERFORMANCE: "validator-performance",
    AssertionType.SECURITY: "validator-security",
    AssertionType.CUSTOM: "validator-custom",
}
"""Which agent serves each validator type."""

FANOUT_TIMEOUT = 60.0
"""Seconds the ``assertions`` agent waits for each per-type agent."""


class ValidatorAgent(Agent):
    """Base of the per-type agents: one :class:`DSPyAssertionFramework` holding that type's validators."""

    group = "validators"
    modes = frozenset({IntegrationMode.FULL, IntegrationMode.OPTIMIZATION_ONLY})
    switch = "enable_assertions"
    assertion_type: ClassVar[AssertionType]

    framework: DSPyAssertionFramework

    def make_validators(self) -> list[Validator]:
        """The validators this agent runs."""
        raise NotImplementedError

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self.framework = DSPyAssertionFramework({self.assertion_type: self.make_validators()})
        yield

    @endpoint("validate")
    async def validate(self, request: ValidationRequest) -> ValidationReport:
        """Run this agent's validators over the request (nothing when ``types`` excludes its type)."""
        return await self.framework.validate(request)

    @endpoint("stats")
    async def stats(self, _: Empty) -> AssertionStats:
        """Pass rates per check over the validations this instance ran."""
        return self.framework.get_stats()


class CodeValidatorAgent(ValidatorAgent):
    """The guide's CodeQualityValidator on the bus."""

    name = "validator-code"
    description = "code-quality assertions: syntax, ruff lint, cyclomatic complexity"
    assertion_type = AssertionType.CODE_QUALITY

    def make_validators(self) -> list[Validator]:
        return [CodeQualityValidator()]

    async def health_checks(self) -> dict[str, CheckResult]:
        ruff = CodeQualityValidator().ruff
        return {"ruff": CheckResult(ok=ruff is not None, detail=str(ruff) if ruff else "ruff executable not found")}


class LogicValidatorAgent(ValidatorAgent):
    """The guide's LogicValidator on the bus."""

    name = "validator-logic"
    description = "logic assertions: schema, constraints, invariants, repeat-group consistency"
    assertion_type = AssertionType.LOGIC

    def make_validators(self) -> list[Validator]:
        return [LogicValidator()]


class PerformanceValidatorAgent(ValidatorAgent):
    """The guide's PerformanceValidator on the bus."""

    name = "validator-performance"
    description = "performance assertions: latency percentiles, tokens and cost per call"
    assertion_type = AssertionType.PERFORMANCE

    def make_validators(self) -> list[Validator]:
        return [PerformanceValidator()]


class SecurityValidatorAgent(ValidatorAgent):
    """The guide's SecurityValidator on the bus."""

    name = "validator-security"
    description = "security assertions: dangerous code, secrets, personal data, prompt-injection echoes"
    assertion_type = AssertionType.SECURITY

    def make_validators(self) -> list[Validator]:
        return [SecurityValidator()]


class CustomValidatorAgent(ValidatorAgent):
    """Custom validators (entry-point group ``dspyrt.validators``) on the bus."""

    name = "validator-custom"
    description = "custom assertions from installed dspyrt.validators plugins"
    assertion_type = AssertionType.CUSTOM
    registry: CustomValidatorRegistry | None = None

    def make_validators(self) -> list[Validator]:
        registry = self.registry if self.registry is not None else CustomValidatorRegistry.installed()
        return list(registry.load_all().values())

    async def health_checks(self) -> dict[str, CheckResult]:
        names = [type(v).__name__ for v in self.framework.validators().get(AssertionType.CUSTOM, [])]
        return {"plugins": CheckResult(ok=True, detail=", ".join(names) or "none installed")}


class AssertionsAgent(Agent):
    """The guide's DSPyAssertionFramework on the bus: fans a request out to the per-type agents."""

    name = "assertions"
    group = "validators"
    modes = frozenset({IntegrationMode.FULL, IntegrationMode.OPTIMIZATION_ONLY})
    switch = "enable_assertions"
    description = "validation fan-out over the validator-* agents, aggregated report, stats"

    recorder: AssertionStatsRecorder

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self.recorder = AssertionStatsRecorder()
        yield

    @endpoint("validate")
    async def validate(self, request: ValidationRequest) -> ValidationReport:
        """Ask every requested type's agent in parallel; one report over all their results.

        A type whose agent does not answer (not running, timed out, failed) yields a failed ``unavailable``
        result of severity ``error``: a validation that could not run never passes silently.
        """
        started = time.perf_counter()
        types = [t for t in AssertionType if request.types is None or t in request.types]
        parts: dict[AssertionType, ValidationReport] = {}

        async def ask(assertion_type: AssertionType) -> None:
            agent = AGENT_FOR_TYPE[assertion_type]
            # Defaults left out: written out for each of 5,000 cases they made the part larger than the request
            # it came from, and over the message limit when that one was near it.
            part = request.model_copy(update={"types": [assertion_type]}).model_dump(mode="json", exclude_defaults=True)
            try:
                parts[assertion_type] = await self.client.request(
                    agent, "validate", part, ValidationReport, timeout=FANOUT_TIMEOUT
                )
            except DspyrtError as exc:
                failure = AssertionResult(
                    type=assertion_type,
                    check="unavailable",
                    passed=False,
                    severity=Severity.ERROR,
                    message=f"{agent} did not validate: {exc}",
                )
                parts[assertion_type] = build_report([failure], fail_on=request.fail_on, cases=len(request.cases))

        async with anyio.create_task_group() as tg:
            for assertion_type in types:
                tg.start_soon(ask, assertion_type)
        report = merge_reports(
            [parts[t] for t in types],
            fail_on=request.fail_on,
            cases=len(request.cases),
            max_results=request.max_results,
            duration_ms=(time.perf_counter() - started) * 1000,
        )
        self.recorder.record(report)
        return report

    @endpoint("stats")
    async def stats(self, _: Empty) -> AssertionStats:
        """Pass rates overall, per type and per check over the validations this instance aggregated."""
        return self.recorder.snapshot()
