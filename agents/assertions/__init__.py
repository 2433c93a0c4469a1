"""The guide's assertion framework: validators of a DSPy program's outputs, and the framework that runs them.

    from dspyrt.agents.assertions import AssertionType, DSPyAssertionFramework, ValidationRequest

    framework = DSPyAssertionFramework()
    framework.add_validator(AssertionType.CUSTOM, MyValidator())
    report = await framework.validate(ValidationRequest(cases=[...], output_schema={"answer": "int"}))

    best = dspy.BestOfN(program, N=3, reward_fn=framework.reward_fn(template), threshold=1.0)

Built-in validators: :class:`CodeQualityValidator`, :class:`LogicValidator`, :class:`PerformanceValidator`,
:class:`SecurityValidator`; plugins come from the entry-point group ``dspyrt.validators``
(:class:`CustomValidatorRegistry`). ``dspyrt.agents.assertions.agent`` puts them on the bus.
"""

from dspyrt.agents.assertions.code_quality import CodeQualityValidator
from dspyrt.agents.assertions.core import (
    AssertionResult,
    AssertionStats,
    AssertionStatsRecorder,
    AssertionType,
    Case,
    CheckSummary,
    CodeQualityOptions,
    Comparison,
    ConsistencyOptions,
    DSPyAssertionFramework,
    FieldSchema,
    Invariant,
    Membership,
    Objectives,
    PassCounts,
    ResultCollector,
    SecurityOptions,
    Severity,
    TypeCounts,
    ValidationReport,
    ValidationRequest,
    ValidationReward,
    Validator,
    default_validators,
)
from dspyrt.agents.assertions.custom import ENTRY_POINT_GROUP, CustomValidatorRegistry
from dspyrt.agents.assertions.logic import LogicValidator
from dspyrt.agents.assertions.performance import PerformanceValidator
from dspyrt.agents.assertions.security import SecurityValidator

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
    "default_validators",
]
