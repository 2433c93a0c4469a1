"""The logic validator: declared fields, types and constraints, invariants between fields, repeat groups."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from dspyrt.agents.assertions import AssertionResult, LogicValidator, Severity, ValidationRequest

pytestmark = pytest.mark.timeout(30)

SCHEMA = {
    "answer": {"type": "int", "min": 0, "max": 100},
    "label": {"type": "str", "choices": ["positive", "negative"]},
    "code": {"type": "str", "pattern": r"^[A-Z]{3}-\d{4}$"},
    "tags": {"type": "list[str]", "max_length": 3},
    "score": "float",
    "note": {"type": "str", "required": False},
}
CLEAN = {"answer": 42, "label": "positive", "code": "ABC-1234", "tags": ["a", "b"], "score": 1}


def validate(*outputs: dict[str, Any], **request: Any) -> list[AssertionResult]:
    cases = request.pop("cases", None) or [{"inputs": {}, "outputs": o} for o in outputs]
    request.setdefault("output_schema", SCHEMA)
    return LogicValidator().validate(ValidationRequest(cases=cases, **request))


def failures(results: list[AssertionResult], check: str | None = None) -> list[AssertionResult]:
    return [r for r in results if not r.passed and (check is None or r.check == check)]


def test_clean_outputs_pass_every_check() -> None:
    results = validate(CLEAN, {**CLEAN, "score": 0.5, "note": "fine"})
    assert failures(results) == []
    assert {r.check for r in results} == {"present", "type", "choices", "range", "length", "pattern"}
    by_check = {r.check: r.message for r in results}
    assert by_check["present"] == "10 required field value(s) present"  # 2 cases x 5 required fields
    assert by_check["range"] == "2 value(s) within their range"


def test_a_wrong_type_is_found() -> None:
    [wrong] = failures(validate({**CLEAN, "answer": "42"}))
    assert (wrong.check, wrong.field, wrong.example, wrong.severity) == ("type", "answer", 0, Severity.ERROR)
    assert wrong.message == "output field 'answer' should be int, got str"
    assert wrong.evidence == "'42'"


@pytest.mark.parametrize(
    ("field", "value", "declared"),
    [
        ("answer", True, "int"),  # a boolean is not an int here
        ("answer", 4.5, "int"),
        ("score", "1.0", "float"),
        ("tags", ["a", 1], "list[str]"),
        ("label", 3, "str"),
    ],
)
def test_type_check_is_strict(field: str, value: Any, declared: str) -> None:
    [wrong] = failures(validate({**CLEAN, field: value}), "type")
    assert wrong.field == field and f"should be {declared}" in wrong.message


def test_a_violated_range_is_found() -> None:
    results = validate(CLEAN, {**CLEAN, "answer": 150})
    [out_of_range] = failures(results)
    assert out_of_range.check == "range" and out_of_range.example == 1
    assert out_of_range.message == "output field 'answer' is 150, outside [0, 100]"


def test_choices_length_and_pattern_violations() -> None:
    results = validate({**CLEAN, "label": "neutral", "tags": ["a", "b", "c", "d"], "code": "abc-12"})
    found = {r.check: r.message for r in failures(results)}
    assert found == {
        "choices": "output field 'label' has 'neutral', not one of ['positive', 'negative']",
        "length": "output field 'tags' has 4 items, outside […, 3]",
        "pattern": "output field 'code' does not match /^[A-Z]{3}-\\d{4}$/",
    }


def test_missing_and_null_required_fields_fail_but_optional_ones_may_be_absent() -> None:
    results = validate({k: v for k, v in CLEAN.items() if k != "label"}, {**CLEAN, "answer": None})
    assert [(r.example, r.message) for r in failures(results)] == [
        (0, "output field 'label' is missing"),
        (1, "output field 'answer' is null"),
    ]


def test_a_catastrophic_pattern_is_cut_off_and_not_retried() -> None:
    schema = {"text": {"type": "str", "pattern": r"^(a+)+$"}}
    evil = "a" * 5_000 + "!"
    results = validate({"text": evil}, {"text": evil}, {"text": evil}, output_schema=schema)
    found = failures(results, "pattern")
    assert "took over 0.1s" in found[0].message and found[0].example == 0
    assert found[1].message == "2 value(s) of 'text' were not matched against its pattern after it timed out"
    assert len(found) == 2


def test_a_value_too_long_for_pattern_matching_fails() -> None:
    [too_long] = failures(validate({"text": "x" * 20_000}, output_schema={"text": {"type": "str", "pattern": "x"}}))
    assert "too long to match" in too_long.message


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "str", "pattern": "("}, "invalid regular expression"),
        ({"type": "str", "pattern": "a" * 300}, "at most 256 characters"),
        ({"type": "str", "min": 1}, "min/max bound numbers"),
        ({"type": "int", "max_length": 3}, "min_length/max_length bound text"),
        ({"type": "int", "min": 5, "max": 1}, "min 5.0 is above max 1.0"),
        ({"type": "decimal"}, "Input should be"),
    ],
)
def test_a_bad_schema_is_refused_up_front(schema: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        ValidationRequest(cases=[{"outputs": {}}], output_schema={"x": schema})  # type: ignore[list-item,dict-item]


INVARIANTS = [
    {"left": "start", "op": "<=", "right": "end"},
    {"field": "answer", "op": "in_field", "other": "options"},
    {"field": "quote", "op": "in_field", "other": "inputs.document"},
    {"left": "confidence", "op": "<=", "value": 1},
    {"left": "language", "op": "!=", "value": "unknown", "name": "language detected"},
]
GOOD = {
    "start": "2024-01-05",
    "end": "2024-02-01",
    "answer": "b",
    "options": ["a", "b"],
    "quote": "lazy dog",
    "confidence": 0.9,
    "language": "en",
}


def invariant_failures(outputs: dict[str, Any]) -> list[AssertionResult]:
    case = {"inputs": {"document": "the quick brown fox jumps over the lazy dog"}, "outputs": outputs}
    return failures(validate(cases=[case], output_schema={}, invariants=INVARIANTS), "invariant")


def test_invariants_that_hold_pass() -> None:
    assert invariant_failures(GOOD) == []


def test_each_violated_invariant_is_reported() -> None:
    bad = {**GOOD, "end": "2023-12-31", "answer": "c", "quote": "lazy cat", "confidence": 1.5, "language": "unknown"}
    assert [(r.message, r.evidence) for r in invariant_failures(bad)] == [
        ("invariant 'start <= end' does not hold", "start='2024-01-05', end='2023-12-31'"),
        ("invariant 'answer in options' does not hold", "answer='c', options=['a', 'b']"),
        (
            "invariant 'quote in inputs.document' does not hold",
            "quote='lazy cat', inputs.document='the quick brown fox jumps over the lazy dog'",
        ),
        ("invariant 'confidence <= 1' does not hold", "confidence=1.5"),
        ("invariant 'language detected' does not hold", "language='unknown'"),
    ]


def test_an_invariant_over_missing_or_incomparable_fields_fails() -> None:
    messages = [r.message for r in invariant_failures({**GOOD, "end": 5, "options": None})]
    assert messages == [
        "invariant 'start <= end' does not hold: cannot order str against int",
        "invariant 'answer in options' does not hold: 'options' missing",
    ]


@pytest.mark.parametrize(
    "invariant",
    [
        {"left": "a", "op": "<=", "right": "b", "value": 3},  # two right-hand sides
        {"left": "a", "op": "=~", "right": "b"},
        {"left": "__import__('os').system('true')", "op": "==", "value": 0},  # not a field name: never evaluated
        {"field": "a", "op": "in_field"},
    ],
)
def test_malformed_invariants_are_refused(invariant: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ValidationRequest(cases=[{"outputs": {}}], invariants=[invariant])  # type: ignore[list-item]


def test_repeat_groups_must_agree() -> None:
    cases = [
        {"outputs": {"answer": "Paris"}, "group": "capital"},
        {"outputs": {"answer": " paris "}, "group": "capital"},  # same after normalization
        {"outputs": {"answer": "Lyon"}, "group": "capital"},
        {"outputs": {"answer": "4"}, "group": "sum"},
        {"outputs": {"answer": "4"}, "group": "sum"},
        {"outputs": {"answer": "anything"}},  # no group: not compared
    ]
    results = validate(cases=cases, output_schema={"answer": "str"})
    [inconsistent] = failures(results)
    assert inconsistent.check == "consistency" and inconsistent.severity is Severity.WARNING
    assert inconsistent.message == "repeat group 'capital': 'answer' has 2 different values over 3 runs"
    assert inconsistent.evidence == "'Paris' (cases 0, 1); 'Lyon' (case 2)"
    assert inconsistent.example == 2
    strict = validate(cases=cases, output_schema={"answer": "str"}, consistency={"normalize_text": False})
    assert len(failures(strict, "consistency")) == 1
    assert "3 different values" in failures(strict, "consistency")[0].message


def test_numbers_in_repeat_groups_agree_within_the_tolerance() -> None:
    cases = [{"outputs": {"score": s}, "group": "g"} for s in (0.50, 0.52, 0.49)]
    assert failures(validate(cases=cases, output_schema={"score": "float"}))
    assert not failures(validate(cases=cases, output_schema={"score": "float"}, consistency={"tolerance": 0.05}))
