"""What a validation request and its report look like: the assertion framework's messages.

A :class:`ValidationRequest` holds a program's output records (:class:`Case`: inputs, outputs, latency,
tokens, cost) and what they must satisfy: a schema of the output fields, declared invariants between fields,
which fields hold Python code, performance objectives. Validators turn it into :class:`AssertionResult`
lists, aggregated into a :class:`ValidationReport` (``dspyrt.agents.assertions.report``); :class:`AssertionStats`
are the pass rates over many validations.

Nothing in a request is ever executed: code is analyzed statically, invariants are a small declarative form
(:class:`Comparison`, :class:`Membership`), and regular expressions are matched with a time limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal

import regex
from pydantic import Discriminator, Field, StringConstraints, Tag, field_validator, model_validator

from dspyrt.agents.programs import FieldType
from dspyrt.bus.messages import Message

MAX_PATTERN_LENGTH = 256
"""Longest regular expression a schema may declare."""
MAX_TEXT = 500
"""Messages and evidence are clipped to this many characters."""


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


# --- stats ------------------------------------------------------------------------------------------


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
