"""The assertion framework's core: what a validation request and its report look like, and the framework
that runs validators over them.

A :class:`ValidationRequest` holds a program's output records (:class:`Case`: inputs, outputs, latency,
tokens, cost) and what they must satisfy: a schema of the output fields, declared invariants between fields,
which fields hold Python code, performance objectives. Validators turn it into :class:`AssertionResult`
lists; :class:`DSPyAssertionFramework` runs them in parallel and aggregates a :class:`ValidationReport`::

    framework = DSPyAssertionFramework()           # built-in validators + installed plugins
    report = await framework.validate(request)
    report.passed, report.results, framework.get_stats()

A validator is any object with ``validate(request) -> list[AssertionResult]`` (:class:`Validator`). Validators
are synchronous: the framework runs each in a worker thread so the event loop never waits on analysis.

Nothing in a request is ever executed: code is analyzed statically, invariants are a small declarative form
(:class:`Comparison`, :class:`Membership`), and regular expressions are matched with a time limit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

import anyio
import anyio.to_thread
import regex
from pydantic import (
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from dspyrt.agents.programs import FieldType
from dspyrt.bus.errors import ConfigurationError
from dspyrt.bus.messages import Message

log = logging.getLogger(__name__)

MAX_PATTERN_LENGTH = 256
"""Longest regular expression a schema may declare."""
MAX_PATTERN_INPUT = 10_000
"""Longest value a pattern is matched against; longer values fail the ``pattern`` check unchecked."""
PATTERN_TIMEOUT = 0.1
"""Seconds one pattern match may take before it counts as catastrophic backtracking."""
MAX_TEXT = 500
"""Messages and evidence are clipped to this many characters."""
MAX_STAT_KEYS = 1_000
"""Distinct checks the stats keep; results of further checks are counted under their type only."""


class AssertionType(StrEnum):
    """The kinds of validator: one built-in validator for each of the first four, plugins for ``custom``."""

    CODE_QUALITY = "code_quality"
    LOGIC = "logic"
    PERFORMANCE = "performance"
    SECURITY = "security"
    CUSTOM = "custom"


class Severity(StrEnum):
    """How bad a failed assertion is, lowest first."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0 for ``info`` up to 3 for ``critical``."""
        return _SEVERITY_ORDER.index(self)

    def at_least(self, other: Severity) -> bool:
        """Whether this severity is ``other`` or worse."""
        return self.rank >= other.rank


_SEVERITY_ORDER = (Severity.INFO, Severity.WARNING, Severity.ERROR, Severity.CRITICAL)


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to ``limit`` characters, marked with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class AssertionResult(Message):
    """One assertion: which validator type and check, whether it passed, how bad a failure is, and where.

    ``example`` is the index of the case in the request (``None`` for a result about the whole request),
    ``field`` the output field concerned. ``message`` and ``evidence`` are clipped to ``MAX_TEXT`` characters;
    evidence of secrets and personal data is masked.
    """

    type: AssertionType
    check: str = Field(min_length=1, max_length=100)
    passed: bool
    severity: Severity = Severity.ERROR
    message: str
    evidence: str | None = None
    example: int | None = Field(default=None, ge=0)
    field: str | None = Field(default=None, max_length=200)

    @field_validator("message", "evidence")
    @classmethod
    def _clip(cls, value: str | None) -> str | None:
        return None if value is None else clip(value)


# --- the request ------------------------------------------------------------------------------------

FieldName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64)]
FieldRef = Annotated[
    str, StringConstraints(pattern=r"^(?:(?:inputs|outputs)\.)?[A-Za-z_][A-Za-z0-9_]*$", max_length=72)
]
"""An output field (``name`` or ``outputs.name``) or an input field (``inputs.name``)."""
Scalar = str | bool | int | float
RuleCode = Annotated[str, StringConstraints(pattern=r"^[A-Z]{1,4}[0-9]{0,4}$")]
"""A ruff rule code or prefix: ``F``, ``E9``, ``B006``."""
PiiKind = Literal["email", "phone", "credit_card", "ssn"]
_ALL_PII: tuple[PiiKind, ...] = ("email", "phone", "credit_card", "ssn")
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class Case(Message):
    """One run of the program: its inputs and outputs, and what the run cost.

    Cases sharing a ``group`` are the same input run several times; the logic validator checks their
    outputs agree (see :class:`ConsistencyOptions`).
    """

    inputs: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict)
    latency_ms: FiniteFloat | None = Field(default=None, ge=0)
    input_tokens: int | None = Field(default=None, ge=0)
    output_tokens: int | None = Field(default=None, ge=0)
    cost: FiniteFloat | None = Field(default=None, ge=0)
    group: str | None = Field(default=None, min_length=1, max_length=200)

    @property
    def tokens(self) -> int | None:
        """Input plus output tokens, or ``None`` when neither is recorded."""
        if self.input_tokens is None and self.output_tokens is None:
            return None
        return (self.input_tokens or 0) + (self.output_tokens or 0)


class FieldSchema(Message):
    """A declared output field: its type and optional constraints.

    ``min``/``max`` bound numbers (``int``, ``float``); ``min_length``/``max_length`` bound text and lists;
    ``pattern`` is searched in text (or each item of a ``list[str]``), so anchor it with ``^...$`` to match a
    whole value; ``choices`` lists the allowed values (of each item, for lists). A bare type string is
    accepted as shorthand: ``{"answer": "int"}``.
    """

    type: FieldType = "str"
    required: bool = True
    choices: list[Scalar] | None = Field(default=None, min_length=1, max_length=1_000)
    min: FiniteFloat | None = None
    max: FiniteFloat | None = None
    min_length: int | None = Field(default=None, ge=0)
    max_length: int | None = Field(default=None, ge=0)
    pattern: str | None = Field(default=None, min_length=1, max_length=MAX_PATTERN_LENGTH)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"type": data} if isinstance(data, str) else data

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                regex.compile(value)
            except regex.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _fits_type(self) -> FieldSchema:
        numeric = self.type in ("int", "float")
        sized = self.type in ("str", "list[str]")
        if (self.min is not None or self.max is not None) and not numeric:
            raise ValueError(f"min/max bound numbers; a {self.type} field takes min_length/max_length")
        if (self.min_length is not None or self.max_length is not None) and not sized:
            raise ValueError(f"min_length/max_length bound text and lists, not {self.type}")
        if self.pattern is not None and not sized:
            raise ValueError(f"a pattern applies to text, not {self.type}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        if self.min_length is not None and self.max_length is not None and self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} is above max_length {self.max_length}")
        return self


class Comparison(Message):
    """``left <op> right`` (another field) or ``left <op> value`` (a constant), e.g. ``start <= end``.

    Numbers compare with numbers and text with text (so ISO dates compare correctly); ``==``/``!=`` take
    any values.
    """

    left: FieldRef
    op: Literal["<", "<=", "==", "!=", ">", ">="]
    right: FieldRef | None = None
    value: Scalar | None = None
    name: str | None = Field(default=None, max_length=100)
    severity: Severity = Severity.ERROR

    @model_validator(mode="after")
    def _one_operand(self) -> Comparison:
        if (self.right is None) == (self.value is None):
            raise ValueError("give exactly one of right (a field) or value (a constant)")
        return self

    @property
    def label(self) -> str:
        """``name``, or the invariant written out."""
        return self.name or f"{self.left} {self.op} {self.right if self.right is not None else repr(self.value)}"


class Membership(Message):
    """``field in other`` (``op: in_field``) or ``not in`` (``not_in_field``).

    ``other`` is a list (item membership), a text (substring) or an object (key).
    """

    field: FieldRef
    op: Literal["in_field", "not_in_field"]
    other: FieldRef
    name: str | None = Field(default=None, max_length=100)
    severity: Severity = Severity.ERROR

    @property
    def label(self) -> str:
        """``name``, or the invariant written out."""
        return self.name or f"{self.field} {'in' if self.op == 'in_field' else 'not in'} {self.other}"


def _invariant_kind(data: Any) -> str:
    if isinstance(data, Membership) or (isinstance(data, Mapping) and "left" not in data):
        return "membership"
    return "comparison"


Invariant = Annotated[
    Annotated[Comparison, Tag("comparison")] | Annotated[Membership, Tag("membership")],
    Discriminator(_invariant_kind),
]
"""A declared relation between fields: a :class:`Comparison` (has ``left``) or a :class:`Membership`."""


class Objectives(Message):
    """Performance targets; an objective left out is not checked."""

    max_latency_p50_ms: FiniteFloat | None = Field(default=None, gt=0)
    max_latency_p95_ms: FiniteFloat | None = Field(default=None, gt=0)
    max_tokens_per_call: int | None = Field(default=None, gt=0)
    max_cost_per_call: FiniteFloat | None = Field(default=None, gt=0)
    severity: Severity = Severity.ERROR


class ConsistencyOptions(Message):
    """How outputs of a repeat group (cases sharing ``group``) are compared.

    ``fields``: which outputs must agree (default: the schema's fields, or every output field without a
    schema). Text is compared case- and whitespace-insensitively unless ``normalize_text`` is off; numbers
    within ``tolerance``.
    """

    fields: list[FieldName] | None = Field(default=None, max_length=100)
    normalize_text: bool = True
    tolerance: FiniteFloat = Field(default=0.0, ge=0)
    severity: Severity = Severity.WARNING


class CodeQualityOptions(Message):
    """Thresholds of the code-quality validator.

    ``select``/``ignore``: ruff rule codes or prefixes. A code field fails ``lint`` with more than
    ``max_findings`` findings (its severity is ``error`` when a finding is a pyflakes ``F`` or syntax ``E9``
    rule, else ``warning``), and ``complexity`` when a function (or the module body) has a cyclomatic
    complexity above ``max_complexity``. With ``strip_fences`` a Markdown code fence around the code is removed.
    """

    select: list[RuleCode] = Field(default_factory=lambda: ["E", "F", "W", "B"], min_length=1, max_length=50)
    ignore: list[RuleCode] = Field(default_factory=list, max_length=50)
    line_length: int = Field(default=120, ge=40, le=1_000)
    max_findings: int = Field(default=0, ge=0)
    max_complexity: int = Field(default=10, ge=1)
    complexity_severity: Severity = Severity.WARNING
    max_code_chars: int = Field(default=100_000, ge=1, le=1_000_000)
    strip_fences: bool = True


class SecurityOptions(Message):
    """What the security validator looks for.

    ``dangerous_code``: bandit over the code fields (bandit's LOW/MEDIUM/HIGH severity become
    ``warning``/``error``/``critical``; findings below ``min_confidence`` are dropped). ``secrets``:
    detect-secrets' pattern detectors over every output (``entropy_secrets`` adds its high-entropy string
    detectors, noisy on hashes and ids). ``pii``: the kinds of personal data to look for. ``injection_echo``:
    prompt-injection phrases of an input that reach an output (``injection_phrases`` adds literal phrases).
    """

    dangerous_code: bool = True
    min_confidence: Literal["low", "medium", "high"] = "low"
    secrets: bool = True
    entropy_secrets: bool = False
    pii: list[PiiKind] = Field(default_factory=lambda: list(_ALL_PII))
    pii_severity: Severity = Severity.ERROR
    injection_echo: bool = True
    injection_phrases: list[Annotated[str, StringConstraints(min_length=3, max_length=200)]] = Field(
        default_factory=list, max_length=50
    )
    injection_severity: Severity = Severity.ERROR


class ValidationRequest(Message):
    """What to validate: the program's output records and what they must satisfy.

    ``types`` restricts which validator types run (default: all). The report passes when no failed result
    has a severity of ``fail_on`` or worse. At most ``max_results_per_check`` failures are listed per check
    (the rest are counted in one summary result) and at most ``max_results`` results in all.
    """

    cases: list[Case] = Field(min_length=1, max_length=5_000)
    output_schema: dict[FieldName, FieldSchema] = Field(default_factory=dict, max_length=200)
    invariants: list[Invariant] = Field(default_factory=list, max_length=200)
    code_fields: list[FieldName] = Field(default_factory=list, max_length=20)
    objectives: Objectives = Field(default_factory=Objectives)
    consistency: ConsistencyOptions = Field(default_factory=ConsistencyOptions)
    code_quality: CodeQualityOptions = Field(default_factory=CodeQualityOptions)
    security: SecurityOptions = Field(default_factory=SecurityOptions)
    types: list[AssertionType] | None = None
    fail_on: Severity = Severity.ERROR
    max_results_per_check: int = Field(default=20, ge=1, le=1_000)
    max_results: int = Field(default=500, ge=1, le=10_000)


# --- the report ------------------------------------------------------------------------------------


class CheckSummary(Message):
    """One check over one request: how many results, how many failed, the worst failure.

    ``passed``: no failed result; ``blocking``: a failed result at or above the request's ``fail_on``.
    """

    type: AssertionType
    check: str
    results: int
    failures: int
    worst: Severity | None = None
    passed: bool
    blocking: bool


class TypeCounts(Message):
    """Results of one validator type: passed and failed, failures by severity, checks and failed checks."""

    results: int = 0
    passed: int = 0
    failed: int = 0
    by_severity: dict[Severity, int] = Field(default_factory=dict)
    checks: int = 0
    failed_checks: int = 0


class ValidationReport(Message):
    """The aggregated outcome of one validation.

    ``passed``: no failed result at or above ``fail_on``. ``score``: the fraction of checks without such a
    failure (1.0 when passed, or when nothing was checked). ``checks`` summarizes every check that ran;
    ``results`` lists failures first (worst first), then passes, up to the request's ``max_results``
    (``omitted`` counts the rest).
    """

    passed: bool
    score: float
    fail_on: Severity
    cases: int
    counts: dict[AssertionType, TypeCounts] = Field(default_factory=dict)
    checks: list[CheckSummary] = Field(default_factory=list)
    results: list[AssertionResult] = Field(default_factory=list)
    omitted: int = 0
    duration_ms: float = 0.0

    def failures(self, at_least: Severity = Severity.INFO) -> list[AssertionResult]:
        """The listed failed results with a severity of ``at_least`` or worse."""
        return [r for r in self.results if not r.passed and r.severity.at_least(at_least)]

    @classmethod
    def build(
        cls,
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
        return cls._assemble(list(summaries.values()), counts, results, fail_on, cases, max_results, 0, duration_ms)

    @classmethod
    def merge(
        cls,
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
        return cls._assemble(checks, counts, results, fail_on, cases, max_results, omitted, duration_ms)

    @classmethod
    def _assemble(
        cls,
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
        return cls(
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


# --- helpers for validators ------------------------------------------------------------------------


class ResultCollector:
    """Gathers one validator's results: each failure, and one passing result per check that found none.

    A validator calls :meth:`checked` for every value it examines and :meth:`fail` for every problem;
    :meth:`results` lists at most ``limit`` failures per check plus a summary of the rest. ``summaries``
    words the passing result of a check, ``{n}`` standing for the number of values checked.
    """

    def __init__(
        self, assertion_type: AssertionType, *, limit: int = 20, summaries: Mapping[str, str] | None = None
    ) -> None:
        self.type = assertion_type
        self.limit = limit
        self._summaries = dict(summaries or {})
        self._checked: dict[str, int] = {}
        self._passing: dict[str, str] = {}
        self._failures: dict[str, list[AssertionResult]] = {}
        self._extra: dict[str, tuple[int, Severity]] = {}

    def checked(self, check: str, count: int = 1, *, summary: str | None = None) -> None:
        """Note that ``check`` examined ``count`` more values; ``summary`` words its passing result."""
        self._checked[check] = self._checked.get(check, 0) + count
        if summary is not None:
            self._passing[check] = summary

    def fail(
        self,
        check: str,
        message: str,
        *,
        severity: Severity = Severity.ERROR,
        evidence: str | None = None,
        example: int | None = None,
        field: str | None = None,
    ) -> None:
        """Record a failed assertion of ``check``."""
        self._checked.setdefault(check, 0)
        listed = self._failures.setdefault(check, [])
        if len(listed) < self.limit:
            listed.append(
                AssertionResult(
                    type=self.type,
                    check=check,
                    passed=False,
                    severity=severity,
                    message=message,
                    evidence=evidence,
                    example=example,
                    field=field,
                )
            )
            return
        count, worst = self._extra.get(check, (0, severity))
        self._extra[check] = (count + 1, severity if severity.at_least(worst) else worst)

    def results(self) -> list[AssertionResult]:
        """Failures per check (with a summary of those over the limit), and a pass for each clean check."""
        out: list[AssertionResult] = []
        for check, count in self._checked.items():
            failures = self._failures.get(check)
            if failures:
                out.extend(failures)
                extra = self._extra.get(check)
                if extra is not None:
                    out.append(
                        AssertionResult(
                            type=self.type,
                            check=check,
                            passed=False,
                            severity=extra[1],
                            message=f"... and {extra[0]} more {check} failure(s) not listed",
                        )
                    )
                continue
            template = self._summaries.get(check, "{n} value(s) checked, no problem found")
            out.append(
                AssertionResult(
                    type=self.type,
                    check=check,
                    passed=True,
                    severity=Severity.INFO,
                    message=self._passing.get(check) or template.replace("{n}", str(count)),
                )
            )
        return out


def text_leaves(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """``(path, text)`` for every string (and number) inside ``value``: ``answer``, ``items[0]``, ``a.b``."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int | float):
        yield path, str(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from text_leaves(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from text_leaves(item, f"{path}[{index}]")
    else:
        yield path, str(value)


# --- validators and the framework --------------------------------------------------------------------


@runtime_checkable
class Validator(Protocol):
    """Anything with ``validate(request) -> list[AssertionResult]``: the built-ins, plugins, your own.

    ``validate`` runs in a worker thread and may be called for several requests at once. Results may also
    be plain mappings with the fields of :class:`AssertionResult`; their ``type`` is set to the type the
    validator is registered under.
    """

    def validate(self, request: ValidationRequest) -> Sequence[AssertionResult | Mapping[str, Any]]: ...


def validator_name(validator: object) -> str:
    """A validator's ``name`` attribute, or its class name."""
    name = getattr(validator, "name", None)
    return name if isinstance(name, str) and name else type(validator).__name__


def run_validator(
    assertion_type: AssertionType, validator: Validator, request: ValidationRequest
) -> list[AssertionResult]:
    """Run one validator; a validator that raises or returns something else yields one failed result."""
    name = validator_name(validator)
    try:
        produced = validator.validate(request)
        return [_as_result(item, assertion_type) for item in produced]
    except Exception as exc:  # a broken validator is a failed check, never a crashed agent
        log.warning("validator %s failed", name, exc_info=True)
        return [
            AssertionResult(
                type=assertion_type,
                check="validator_error",
                passed=False,
                severity=Severity.ERROR,
                message=f"validator {name} failed: {type(exc).__name__}: {exc}",
            )
        ]


def _as_result(item: Any, assertion_type: AssertionType) -> AssertionResult:
    if isinstance(item, AssertionResult):
        return item if item.type == assertion_type else item.model_copy(update={"type": assertion_type})
    if isinstance(item, Mapping):
        try:
            return AssertionResult.model_validate({**item, "type": assertion_type})
        except ValidationError as exc:
            raise TypeError(f"returned an invalid result: {exc.errors(include_url=False)[0]['msg']}") from None
    raise TypeError(f"returned {type(item).__name__}, not an AssertionResult")


def default_validators() -> dict[AssertionType, list[Validator]]:
    """The four built-in validators, plus every plugin installed under ``dspyrt.validators`` as ``custom``."""
    from dspyrt.agents.assertions.code_quality import CodeQualityValidator
    from dspyrt.agents.assertions.custom import CustomValidatorRegistry
    from dspyrt.agents.assertions.logic import LogicValidator
    from dspyrt.agents.assertions.performance import PerformanceValidator
    from dspyrt.agents.assertions.security import SecurityValidator

    return {
        AssertionType.CODE_QUALITY: [CodeQualityValidator()],
        AssertionType.LOGIC: [LogicValidator()],
        AssertionType.PERFORMANCE: [PerformanceValidator()],
        AssertionType.SECURITY: [SecurityValidator()],
        AssertionType.CUSTOM: list(CustomValidatorRegistry.installed().load_all().values()),
    }


class PassCounts(Message):
    """How often something ran and passed; ``pass_rate`` is ``None`` before it ever ran."""

    runs: int = 0
    passed: int = 0
    failed: int = 0
    pass_rate: float | None = None


class AssertionStats(Message):
    """Pass rates over every validation recorded: overall (report passed), per type and per check.

    A type or check passes in a validation when none of its results failed, whatever the severity; checks
    are keyed ``<type>.<check>``.
    """

    validations: int = 0
    passed: int = 0
    failed: int = 0
    pass_rate: float | None = None
    by_type: dict[str, PassCounts] = Field(default_factory=dict)
    by_check: dict[str, PassCounts] = Field(default_factory=dict)


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

    def add_validator(self, assertion_type: AssertionType | str, validator: Validator) -> None:
        """Run ``validator`` for ``assertion_type`` too (``AssertionType.CUSTOM`` for your own checks)."""
        try:
            kind = AssertionType(assertion_type)
        except ValueError:
            known = ", ".join(t.value for t in AssertionType)
            raise ConfigurationError(f"unknown assertion type {assertion_type!r}; known: {known}") from None
        if not callable(getattr(validator, "validate", None)):
            raise ConfigurationError(f"{validator_name(validator)} has no validate(request) method")
        self._validators[kind].append(validator)

    def validators(self) -> dict[AssertionType, list[Validator]]:
        """The registered validators by type (types without one are left out)."""
        return {t: list(v) for t, v in self._validators.items() if v}

    async def validate(self, request: ValidationRequest) -> ValidationReport:
        """Run every validator of the requested types in parallel (each in a worker thread); aggregate."""
        started = time.perf_counter()
        jobs = self._jobs(request)
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

    def check(self, request: ValidationRequest) -> ValidationReport:
        """Run the validators one after another in the calling thread (what a reward function needs).

        Prefer :meth:`validate` in async code: it runs them in parallel off the event loop.
        """
        started = time.perf_counter()
        results = [r for t, v in self._jobs(request) for r in run_validator(t, v, request)]
        return self._report(request, results, started)

    def _jobs(self, request: ValidationRequest) -> list[tuple[AssertionType, Validator]]:
        wanted = set(request.types) if request.types is not None else set(AssertionType)
        return [(t, v) for t in AssertionType if t in wanted for v in self._validators[t]]

    def _report(self, request: ValidationRequest, results: list[AssertionResult], started: float) -> ValidationReport:
        report = ValidationReport.build(
            results,
            fail_on=request.fail_on,
            cases=len(request.cases),
            max_results=request.max_results,
            duration_ms=(time.perf_counter() - started) * 1000,
        )
        self._stats.record(report)
        return report


RewardFn = Callable[[dict[str, Any], Any], float]


class ValidationReward:
    """A reward for ``dspy.Refine`` / ``dspy.BestOfN``: ``reward(args, prediction) -> float``.

    Each call validates one case (``args`` as inputs, the prediction's fields as outputs, its LM usage as
    tokens when DSPy tracked it) against ``template`` (schema, invariants, code fields, options; its cases
    are ignored) with the chosen validator ``types`` (default: all but ``performance``, since a single
    prediction has no latency). It returns 1.0 when the report passes, else the report's score: the
    fraction of checks without a failure at or above ``fail_on``.
    """

    def __init__(
        self,
        framework: DSPyAssertionFramework,
        template: ValidationRequest | None = None,
        types: Iterable[AssertionType] | None = None,
    ) -> None:
        chosen: list[AssertionType] = (
            list(types) if types is not None else [t for t in AssertionType if t is not AssertionType.PERFORMANCE]
        )
        self.framework = framework
        self.template = template
        self.types = chosen

    def report(self, args: Mapping[str, Any], prediction: Any) -> ValidationReport:
        """The full validation report of one prediction."""
        input_tokens, output_tokens = _usage(prediction)
        case = Case(
            inputs=dict(args),
            outputs=_prediction_outputs(prediction),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
        )
        if self.template is None:
            request = ValidationRequest(cases=[case], types=self.types)
        else:
            request = self.template.model_copy(update={"cases": [case], "types": self.types})
        return self.framework.check(request)

    def __call__(self, args: dict[str, Any], prediction: Any) -> float:
        """1.0 when the prediction passes validation, else the fraction of checks that passed."""
        report = self.report(args, prediction)
        return 1.0 if report.passed else report.score


def _prediction_outputs(prediction: Any) -> dict[str, Any]:
    if isinstance(prediction, Mapping):
        return dict(prediction)
    to_dict = getattr(prediction, "toDict", None)
    if callable(to_dict):
        data = to_dict()
        if isinstance(data, Mapping):
            return dict(data)
    raise ConfigurationError(f"cannot read the output fields of a {type(prediction).__name__}")


def _usage(prediction: Any) -> tuple[int | None, int | None]:
    """Input and output tokens from DSPy's usage tracking (``dspy.configure(track_usage=True)``), if any."""
    getter = getattr(prediction, "get_lm_usage", None)
    usage = getter() if callable(getter) else None
    if not isinstance(usage, Mapping) or not usage:
        return None, None
    totals = [0, 0]
    for per_model in usage.values():
        if isinstance(per_model, Mapping):
            for slot, key in enumerate(("prompt_tokens", "completion_tokens")):
                value = per_model.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    totals[slot] += value
    return totals[0], totals[1]
