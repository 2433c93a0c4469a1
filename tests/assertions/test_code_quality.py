"""The code-quality validator: syntax, ruff findings and complexity of code outputs, analyzed but never run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dspyrt.agents.assertions import AssertionResult, AssertionType, CodeQualityValidator, Severity, ValidationRequest

pytestmark = pytest.mark.timeout(30)

CLEAN = '''def mean(values: list[float]) -> float:
    """The arithmetic mean."""
    if not values:
        return 0.0
    return sum(values) / len(values)
'''

LINT_ERRORS = """import os


def total(values):
    return sum(values) + offset
"""

COMPLEX = """def classify(x):
    if x < 0:
        return "negative"
    elif x == 0:
        return "zero"
    elif x < 10:
        return "small"
    elif x < 100:
        return "medium"
    return "large"
"""


def validate(*codes: Any, field: str = "code", **options: Any) -> list[AssertionResult]:
    request = ValidationRequest(
        cases=[{"inputs": {}, "outputs": {field: code}} for code in codes],  # type: ignore[misc]
        code_fields=[field],
        code_quality=options,  # type: ignore[arg-type]
    )
    return CodeQualityValidator().validate(request)


def failures(results: list[AssertionResult], check: str | None = None) -> list[AssertionResult]:
    return [r for r in results if not r.passed and (check is None or r.check == check)]


def test_clean_code_passes_every_check() -> None:
    results = validate(CLEAN)
    assert failures(results) == []
    assert {r.check for r in results} == {"syntax", "lint", "complexity"}
    assert all(r.type is AssertionType.CODE_QUALITY and r.severity is Severity.INFO for r in results)


def test_lint_errors_are_found_with_rule_codes_and_lines() -> None:
    results = validate(CLEAN, LINT_ERRORS)
    [lint] = failures(results)
    assert lint.check == "lint" and lint.example == 1 and lint.field == "code"
    assert lint.severity is Severity.ERROR  # pyflakes findings are errors
    assert "2 lint finding(s)" in lint.message and "F401" in lint.message and "F821" in lint.message
    assert lint.evidence is not None
    assert "line 1: F401 `os` imported but unused" in lint.evidence
    assert "line 5: F821 Undefined name `offset`" in lint.evidence


def test_noqa_comments_in_the_analyzed_code_do_not_hide_findings() -> None:
    [lint] = failures(validate("import os  # noqa\n"))
    assert "F401" in lint.message


def test_style_findings_are_warnings_and_the_rule_set_is_configurable() -> None:
    code = "x = 1; y = 2\n"  # E702: two statements on one line
    [lint] = failures(validate(code))
    assert lint.severity is Severity.WARNING and "E702" in lint.message
    assert failures(validate(code, select=["F"])) == []
    assert failures(validate(code, ignore=["E702"])) == []
    assert failures(validate(code, max_findings=1)) == []


def test_a_syntax_error_fails_syntax_and_skips_the_other_checks() -> None:
    results = validate("def broken(:\n    pass\n")
    [syntax] = failures(results)
    assert syntax.check == "syntax" and syntax.severity is Severity.ERROR
    assert syntax.message.startswith("code field 'code' does not parse: invalid syntax (line 1)")
    assert syntax.evidence == "def broken(:"
    assert {r.check for r in results} == {"syntax"}


def test_missing_or_non_text_code_fails_syntax() -> None:
    request = ValidationRequest(
        cases=[{"outputs": {}}, {"outputs": {"code": 42}}],  # type: ignore[list-item]
        code_fields=["code"],
    )
    messages = [r.message for r in failures(CodeQualityValidator().validate(request), "syntax")]
    assert messages == ["code field 'code' is missing", "code field 'code' holds a int"]


def test_complexity_over_the_threshold_names_the_function() -> None:
    assert failures(validate(COMPLEX)) == []  # complexity 5 <= default 10
    [complexity] = failures(validate(COMPLEX, max_complexity=3))
    assert complexity.check == "complexity" and complexity.severity is Severity.WARNING
    assert "cyclomatic complexity over 3 in classify (5, line 1)" in complexity.message


def test_markdown_fences_around_code_are_stripped() -> None:
    assert failures(validate(f"Here you go:\n```python\n{CLEAN}```\n")) == []
    assert failures(validate("```python\nimport os\n```"), "lint")


def test_code_too_large_is_not_analyzed() -> None:
    [too_big] = failures(validate("x = 1\n" * 100, max_code_chars=50))
    assert too_big.check == "syntax" and "over the 50 analyzed" in too_big.message


def test_without_ruff_lint_fails_instead_of_passing(tmp_path: Path) -> None:
    request = ValidationRequest(cases=[{"outputs": {"code": CLEAN}}], code_fields=["code"])  # type: ignore[list-item]
    results = CodeQualityValidator(ruff=tmp_path / "no-ruff-here").validate(request)
    [lint] = failures(results)
    assert lint.check == "lint" and lint.message.startswith("lint not run: ruff could not be started")


def test_the_analyzed_code_is_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\nraise SystemExit(3)\n"
    results = validate(code)
    assert failures(results) == []
    assert not marker.exists()
