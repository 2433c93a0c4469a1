"""The framework as a reward for ``dspy.Refine`` / ``dspy.BestOfN``: :class:`ValidationReward`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from dspyrt.agents.assertions.models import AssertionType, Case, ValidationReport, ValidationRequest
from dspyrt.bus.errors import ConfigurationError

RewardFn = Callable[[dict[str, Any], Any], float]


class RequestChecker(Protocol):
    """What a reward validates with: :class:`~dspyrt.agents.assertions.core.DSPyAssertionFramework`, or any
    object with its synchronous ``check`` (so the framework depends on rewards, never the other way)."""

    def check(self, request: ValidationRequest) -> ValidationReport: ...


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
        framework: RequestChecker,
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
