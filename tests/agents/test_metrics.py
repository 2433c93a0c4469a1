"""The metrics registry: built-ins, field selection, parameters, plugins, and use with dspy.Evaluate."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from typing import Any

import dspy
import pytest

from dspyrt.agents.lm import demo_lm
from dspyrt.agents.metrics import (
    BUILTIN_METRICS,
    ENTRY_POINT_GROUP,
    MetricRegistry,
    field_metric,
    get_metric,
)
from dspyrt.bus.errors import ConfigurationError, NotFoundError

pytestmark = pytest.mark.timeout(30)


def _length_ratio(expected: Any, predicted: Any, *, cap: float = 1.0) -> float:
    """A plugin comparator: how long the prediction is relative to the expected text, capped."""
    return min(len(str(predicted)) / max(len(str(expected)), 1), cap)


length_ratio = field_metric(_length_ratio, name="length_ratio")


def example(**fields: Any) -> Any:
    return dspy.Example(question="q", **fields).with_inputs("question")


def test_builtin_names() -> None:
    assert sorted(BUILTIN_METRICS) == ["contains", "exact_match", "f1", "normalized_match", "numeric"]


@pytest.mark.parametrize(
    ("name", "params", "expected", "predicted", "score"),
    [
        ("exact_match", {}, "Paris", " Paris\n", True),
        ("exact_match", {}, "Paris", "paris", False),
        ("exact_match", {}, 42, 42, True),
        ("normalized_match", {}, "The Eiffel Tower!", "eiffel   tower", True),
        ("normalized_match", {}, "Eiffel Tower", "Eiffel", False),
        ("f1", {}, "the quick brown fox", "quick brown dog", pytest.approx(2 / 3)),
        ("f1", {}, "alpha", "beta", 0.0),
        ("numeric", {}, "42", "The answer is 42.", True),
        ("numeric", {}, 1200, "$1,200.00", True),
        ("numeric", {"tolerance": 0.5}, "3.0", "3.4", True),
        ("numeric", {"tolerance": 0.5}, "3.0", "3.6", False),
        ("numeric", {}, "3", "three", False),
        ("contains", {}, "Blue Whale", "It is the blue   whale, surely", True),
        ("contains", {"ignore_case": False}, "Blue Whale", "the blue whale", False),
        ("contains", {}, "whale", "a shark", False),
    ],
)
def test_builtin_metrics(name: str, params: dict[str, Any], expected: Any, predicted: Any, score: Any) -> None:
    metric = get_metric(name, "answer", **params)
    assert metric(example(answer=expected), dspy.Prediction(answer=predicted)) == score


def test_default_field_is_every_label_field() -> None:
    gold = example(answer="Paris", country="France")
    assert get_metric("exact_match")(gold, dspy.Prediction(answer="Paris", country="France")) is True
    assert get_metric("exact_match")(gold, dspy.Prediction(answer="Paris", country="Spain")) is False
    assert get_metric("f1")(gold, dspy.Prediction(answer="Paris", country="Spain")) == pytest.approx(0.5)
    assert get_metric("exact_match", "answer")(gold, dspy.Prediction(answer="Paris", country="Spain")) is True


def test_missing_prediction_field_scores_zero_and_missing_example_field_is_an_error() -> None:
    assert get_metric("exact_match", "answer")(example(answer="x"), dspy.Prediction(other="x")) is False
    assert get_metric("f1", "answer")(example(answer="x"), dspy.Prediction()) == 0.0
    with pytest.raises(ConfigurationError, match="no field 'label'"):
        get_metric("exact_match", "label")(example(answer="x"), dspy.Prediction(label="x"))
    with pytest.raises(ConfigurationError, match="pass field="):
        get_metric("exact_match")(dspy.Example(answer="x"), dspy.Prediction(answer="x"))


def test_unknown_names_and_parameters_are_clear_errors() -> None:
    with pytest.raises(NotFoundError, match="unknown metric 'bleu'; known: contains, exact_match, f1") as unknown:
        get_metric("bleu")
    assert unknown.value.code == "not_found"
    with pytest.raises(ConfigurationError, match="takes parameters: tolerance; got: tolerence"):
        get_metric("numeric", "answer", tolerence=0.1)
    with pytest.raises(ConfigurationError, match="takes parameters: none"):
        get_metric("exact_match", "answer", strict=True)
    with pytest.raises(ConfigurationError, match=">= 0"):
        get_metric("numeric", tolerance=-1)
    with pytest.raises(ConfigurationError, match="finite number"):
        get_metric("numeric", tolerance="0.1")


def test_plugins_come_from_entry_points() -> None:
    registry = MetricRegistry(
        [EntryPoint(name="length_ratio", value=f"{__name__}:length_ratio", group=ENTRY_POINT_GROUP)]
    )
    assert "length_ratio" in registry.names() and "f1" in registry.names()
    metric = registry.get("length_ratio", "answer", cap=0.5)
    assert metric(example(answer="abcd"), dspy.Prediction(answer="ab")) == 0.5
    assert registry.get("length_ratio", "answer")(example(answer="abcd"), dspy.Prediction(answer="a")) == 0.25
    with pytest.raises(ConfigurationError, match="unexpected keyword argument 'bogus'"):
        registry.get("length_ratio", "answer", bogus=1)
    with pytest.raises(ConfigurationError, match="may not replace the built-in 'f1'"):
        MetricRegistry([EntryPoint(name="f1", value=f"{__name__}:length_ratio", group=ENTRY_POINT_GROUP)])
    with pytest.raises(NotFoundError, match="unknown metric 'length_ratio'"):
        get_metric("length_ratio")  # not installed in this environment


def test_metrics_drive_dspy_evaluate() -> None:
    devset = [
        dspy.Example(question="capital of france", answer="Paris").with_inputs("question"),
        dspy.Example(question="capital of japan", answer="Tokyo").with_inputs("question"),
    ]
    program = dspy.Predict("question -> answer")
    program.demos = [
        dspy.Example(question="the capital of france", answer="paris!").with_inputs("question"),
        dspy.Example(question="the capital of japan", answer="Kyoto").with_inputs("question"),
    ]
    with dspy.context(lm=demo_lm()):
        strict = dspy.Evaluate(devset=devset, metric=get_metric("exact_match", "answer"))(program)
        loose = dspy.Evaluate(devset=devset, metric=get_metric("normalized_match", "answer"))(program)
    assert (strict.score, loose.score) == (0.0, 50.0)
