"""Alert rules from TOML: good ones load, bad ones are refused with every problem named."""

from __future__ import annotations

from pathlib import Path

import pytest

from dspyrt.agents.dashboard import (
    AlertRuleError,
    ErrorRateRule,
    RegressionRule,
    ThresholdRule,
    load_rules_file,
    parse_rules,
)
from dspyrt.agents.dashboard.models import BUILTIN_TYPES
from dspyrt.bus import ConfigurationError

pytestmark = pytest.mark.timeout(10)

KNOWN = set(BUILTIN_TYPES)
RATES = {"error_rate"}

GOOD = """
[[rules]]
name = "canary-regression"
kind = "regression"
metric = "program_score"
labels = { program = "topic-classifier" }
baseline_points = 3
min_drop = 5.0
severity = "critical"

[[rules]]
name = "slow-lm"
kind = "threshold"
metric = "lm_latency"
above = 2000

[[rules]]
name = "lm-errors"
kind = "error_rate"
max_rate = 0.2
window = 120
min_calls = 10

[[rules]]
name = "no-cycles"
kind = "staleness"
metric = "score"
max_age = 86400
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "alerts.toml"
    path.write_text(text)
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(AlertRuleError) as info:
        load_rules_file(write(tmp_path, text), known_metrics=KNOWN, rate_metrics=RATES)
    assert str(tmp_path / "alerts.toml") in info.value.message
    return info.value.problems


def test_a_good_rules_file_loads(tmp_path: Path) -> None:
    rules = load_rules_file(write(tmp_path, GOOD), known_metrics=KNOWN, rate_metrics=RATES)
    assert [r.name for r in rules] == ["canary-regression", "slow-lm", "lm-errors", "no-cycles"]
    regression, threshold, errors = rules[0], rules[1], rules[2]
    assert isinstance(regression, RegressionRule) and regression.labels == {"program": "topic-classifier"}
    assert regression.severity == "critical" and regression.min_drop == 5.0 and regression.actions is True
    assert isinstance(threshold, ThresholdRule) and threshold.above == 2000 and threshold.below is None
    assert isinstance(errors, ErrorRateRule) and errors.metric == "error_rate" and errors.window == 120


def test_every_problem_is_named_with_its_rule_and_field(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        """
[[rules]]
name = "no-bounds"
kind = "threshold"
metric = "lm_latency"

[[rules]]
name = "typo"
kind = "treshold"
metric = "score"

[[rules]]
name = "negative"
kind = "staleness"
metric = "score"
max_age = -5

[[rules]]
name = "extra"
kind = "regression"
metric = "score"
min_drop = 1
baseline = 3
""",
    )
    assert problems == [
        "rules[0] ('no-bounds'): a threshold rule needs 'above' or 'below' (or both)",
        "rules[1] ('typo'): kind: 'kind' must be one of threshold, regression, staleness, error_rate",
        "rules[2] ('negative'): max_age: Input should be greater than 0",
        "rules[3] ('extra'): baseline: Extra inputs are not permitted",
    ]


def test_unknown_metrics_duplicate_names_and_wrong_metric_kinds_are_refused(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        """
[[rules]]
name = "a"
kind = "threshold"
metric = "lm_latncy"
above = 1

[[rules]]
name = "a"
kind = "error_rate"
metric = "score"
max_rate = 0.5
""",
    )
    assert problems[0].startswith("rules[0] ('a'): unknown metric 'lm_latncy'; known: baseline_score, cycle_cost")
    assert problems[1:] == [
        "rules[1] ('a'): name 'a' is already used by rules[0]",
        "rules[1] ('a'): an error_rate rule needs an outcome metric (one 0/1 point per call) such as error_rate; "
        "'score' is not one",
    ]


def test_files_that_are_not_rules_at_all(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "[[rules]\nname=")[0].startswith("not valid TOML:")
    assert problems_of(tmp_path, "[alerts]\nx = 1\n") == ["unknown top-level key(s) alerts; put rules in [[rules]]"]
    with pytest.raises(AlertRuleError, match="cannot read the file"):
        load_rules_file(tmp_path / "missing.toml")


def test_rule_errors_are_configuration_errors_with_field_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_rules([{"name": "bad name!", "kind": "threshold", "metric": "score", "above": 1}], source="request")
    error = info.value
    assert error.code == "invalid_config"
    assert error.to_body().field_errors[0].loc == "rules.0.name"
    assert "invalid alert rules in request: rules[0] ('bad name!'): name: String should match pattern" in str(error)


def test_band_and_drop_constraints() -> None:
    with pytest.raises(AlertRuleError, match=r"'below' \(5.0\) must be less than 'above' \(1.0\)"):
        parse_rules([{"name": "band", "kind": "threshold", "metric": "score", "above": 1, "below": 5}])
    with pytest.raises(AlertRuleError, match="needs 'min_drop' or 'min_drop_fraction'"):
        parse_rules([{"name": "r", "kind": "regression", "metric": "score"}])
