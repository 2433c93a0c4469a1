"""The framework's reward function with dspy.BestOfN and dspy.Refine, on the offline demo LM."""

from __future__ import annotations

from typing import Any

import dspy
import pytest

from dspyrt.agents.assertions import AssertionType, DSPyAssertionFramework, LogicValidator, SecurityValidator
from dspyrt.agents.assertions import ValidationRequest as Request
from dspyrt.agents.lm import demo_lm

pytestmark = pytest.mark.timeout(30)

QUESTION = "how many apples are in the basket"
TEMPLATE = Request(cases=[{}], output_schema={"answer": {"type": "int", "min": 0, "max": 100}})  # type: ignore[list-item,dict-item]


def predictor(answer: int) -> dspy.Predict:
    """A program the demo LM answers with ``answer``: its one demo resembles the question."""
    predict = dspy.Predict("question -> answer: int")
    predict.demos = [dspy.Example(question="how many apples are there", answer=answer)]
    return predict


class Variants(dspy.Module):  # type: ignore[misc]
    """Stands in for sampling at temperature 1.0: BestOfN/Refine give each attempt its own rollout id, and
    this program answers from a different demo set per rollout (the demo LM itself is deterministic)."""

    def __init__(self, answers: list[int]) -> None:
        super().__init__()
        self.variants = [predictor(a) for a in answers]

    def forward(self, question: str) -> dspy.Prediction:
        lm = self.variants[0].get_lm() or dspy.settings.lm
        rollout = int(lm.kwargs.get("rollout_id") or 0)
        result: dspy.Prediction = self.variants[rollout % len(self.variants)](question=question)
        return result


class Counting:
    """Wraps a reward to record what it scored."""

    def __init__(self, reward: Any) -> None:
        self.reward = reward
        self.scores: list[tuple[Any, float]] = []

    def __call__(self, args: dict[str, Any], pred: dspy.Prediction) -> float:
        score = float(self.reward(args, pred))
        self.scores.append((pred.answer, score))
        return score


def framework() -> DSPyAssertionFramework:
    return DSPyAssertionFramework(
        {AssertionType.LOGIC: [LogicValidator()], AssertionType.SECURITY: [SecurityValidator()]}
    )


def test_reward_is_one_for_a_passing_prediction_and_a_fraction_otherwise() -> None:
    reward = framework().reward_fn(TEMPLATE)
    assert reward({"question": QUESTION}, dspy.Prediction(answer=7)) == 1.0
    report = reward.report({"question": QUESTION}, dspy.Prediction(answer=150))
    assert not report.passed and [r.check for r in report.failures()] == ["range"]
    checks = len(report.checks)  # present, type, range (logic) and secret, pii (security)
    assert checks == 5
    assert reward({"question": QUESTION}, dspy.Prediction(answer=150)) == pytest.approx(4 / 5)
    leaky = dspy.Prediction(answer=150, note="key AKIAIOSFODNN7EXAMPLE")
    assert reward({"question": QUESTION}, leaky) == pytest.approx(3 / 5)


def test_reward_without_a_template_runs_the_chosen_validators() -> None:
    reward = framework().reward_fn(types=[AssertionType.SECURITY])
    assert reward({"q": "hi"}, dspy.Prediction(answer="hello")) == 1.0
    assert reward({"q": "hi"}, dspy.Prediction(answer="mail me at a.b@example.com")) == 0.5  # pii fails, secret ok


def test_best_of_n_picks_the_attempt_that_passes_validation() -> None:
    checked = framework()
    reward = Counting(checked.reward_fn(TEMPLATE))
    with dspy.context(lm=demo_lm()):
        best = dspy.BestOfN(Variants([150, 7, 9]), N=3, reward_fn=reward, threshold=1.0)(question=QUESTION)
    assert best.answer == 7
    assert reward.scores == [(150, pytest.approx(4 / 5)), (7, 1.0)]  # stopped at the first passing attempt
    stats = checked.get_stats()
    assert (stats.validations, stats.passed) == (2, 1) and stats.by_check["logic.range"].pass_rate == 0.5


def test_best_of_n_returns_the_best_failing_attempt_when_none_passes() -> None:
    reward = Counting(framework().reward_fn(TEMPLATE))
    with dspy.context(lm=demo_lm()):
        best = dspy.BestOfN(Variants([150, 200]), N=2, reward_fn=reward, threshold=1.0)(question=QUESTION)
    assert [answer for answer, _ in reward.scores] == [150, 200]
    assert best.answer == 150  # equal rewards: the first attempt is kept


def test_refine_retries_until_validation_passes() -> None:
    reward = Counting(framework().reward_fn(TEMPLATE))
    with dspy.context(lm=demo_lm()):
        refined = dspy.Refine(Variants([150, 42]), N=3, reward_fn=reward, threshold=1.0)(question=QUESTION)
    assert refined.answer == 42
    assert reward.scores == [(150, pytest.approx(4 / 5)), (42, 1.0)]
