"""The guide's assertion framework: validators of a DSPy program's outputs, and the framework that runs them.

    from dspyrt.agents.assertions import AssertionType, DSPyAssertionFramework, ValidationRequest

    framework = DSPyAssertionFramework()
    framework.add_validator(AssertionType.CUSTOM, MyValidator())
    report = await framework.validate(ValidationRequest(cases=[...], output_schema={"answer": "int"}))

    best = dspy.BestOfN(program, N=3, reward_fn=framework.reward_fn(template), threshold=1.0)

Built-in validators: :class:`CodeQualityValidator`, :class:`LogicValidator`, :class:`PerformanceValidator`,
:class:`SecurityValidator`; plugins come from the entry-point group ``dspyrt.validators``
(:class:`CustomValidatorRegistry`). ``dspyrt.agents.assertions.agent`` puts them on the bus.

Modules: ``models`` (the request, results, report and stats messages), ``core`` (the framework), ``report``
(aggregation), ``collector`` (what validators gather results with), ``validator`` (the protocol), ``stats``,
``reward``, one module per built-in validator, ``custom`` (plugins) and ``agent``.
"""

from dspyrt.agents.assertions.code_quality import CodeQualityValidator
from dspyrt.agents.assertions.collector import ResultCollector
from dspyrt.agents.assertions.core import DSPyAssertionFramework, default_validators
from dspyrt.agents.assertions.custom import ENTRY_POINT_GROUP, CustomValidatorRegistry
from dspyrt.agents.assertions.logic import LogicValidator
from dspyrt.agents.assertions.models import (
    AssertionResult,
    AssertionStats,
    AssertionType,
    Case,
    CheckSummary,
    CodeQualityOptions,
    Comparison,
    ConsistencyOptions,
    FieldSchema,
    Invariant,
    Membership,
    Objectives,
    PassCounts,
    SecurityOptions,
    Severity,
    TypeCounts,
    ValidationReport,
    ValidationRequest,
)
from dspyrt.agents.assertions.performance import PerformanceValidator
from dspyrt.agents.assertions.report import build_report, merge_reports
from dspyrt.agents.assertions.reward import ValidationReward
from dspyrt.agents.assertions.security import SecurityValidator
from dspyrt.agents.assertions.stats import AssertionStatsRecorder
from dspyrt.agents.assertions.validator import Validator

__all__ = [
    "ENTRY_POINT_GROUP",
    "AssertionResult",
    "AssertionStats",
    "AssertionStatsRecorder",
    "AssertionType",
    "Case",
    "CheckSummary",
    "CodeQualityOptions",
    "CodeQualityValidator",
    "Comparison",
    "ConsistencyOptions",
    "CustomValidatorRegistry",
    "DSPyAssertionFramework",
    "FieldSchema",
    "Invariant",
    "LogicValidator",
    "Membership",
    "Objectives",
    "PassCounts",
    "PerformanceValidator",
    "ResultCollector",
    "SecurityOptions",
    "SecurityValidator",
    "Severity",
    "TypeCounts",
    "ValidationReport",
    "ValidationRequest",
    "ValidationReward",
    "Validator",
    "build_report",
    "default_validators",
    "merge_reports",
]
