"""Scoring a program on examples, where a failed LM call is an error and never a wrong answer.

Used by the evaluate phase (one shard at a time) and by the optimizer (its baseline and optimized scores).
Each example runs once in a worker thread under ``dspy.context(lm=...)``:

* the program answered and the metric scored it: the score counts;
* the example itself failed (the LM's answer could not be parsed, the metric raised on this prediction): 0, as
  ``dspy.Evaluate`` scores it — the program's fault;
* its LM call failed after the switcher's retries, the fallback chain and one more try (``all_models_failed``,
  a rate limit, the provider unavailable): an *error*, left out of the score and counted against coverage;
* anything else that is not about one example (the switcher unreachable, a refused key, a spent budget): raised,
  so the run fails with that reason instead of scoring every example 0.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from dspyrt.agents.lm.bus_engine import program_context
from dspyrt.agents.lm.errors import TRANSIENT_CALL_CODES, ProviderUnreliableError, project_error
from dspyrt.agents.metrics import Metric
from dspyrt.bus import Message

# An evaluation or optimization whose failed LM calls pass this share fails with provider_unreliable.
DEFAULT_MAX_ERROR_RATE = 0.02


class ExampleResult(Message):
    index: int
    score: float
    outputs: dict[str, Any] = Field(default_factory=dict)
    latency_ms: float = 0.0
    error: str | None = None
    # The LM call failed (after retries and fallback): not scored, counted against coverage.
    call_failed: bool = False


@dataclass(frozen=True)
class Score:
    """A score over the answered examples, with how many there were."""

    score: float | None  # percent over answered examples; None when none was answered
    examples: int
    answered: int

    @property
    def errors(self) -> int:
        return self.examples - self.answered

    @property
    def coverage(self) -> float:
        return round(self.answered / self.examples, 6) if self.examples else 1.0


def summarize(results: list[ExampleResult]) -> Score:
    answered = [r for r in results if not r.call_failed]
    score = round(100.0 * sum(r.score for r in answered) / len(answered), 4) if answered else None
    return Score(score=score, examples=len(results), answered=len(answered))


def check_error_rate(failed: int, total: int, limit: float, *, model: str, what: str) -> None:
    """Fail with ``provider_unreliable`` when ``failed`` of ``total`` LM calls is over ``limit``."""
    if total and failed / total > limit:
        raise ProviderUnreliableError(
            f"{what}: {failed} of {total} LM calls to {model} failed after retries and fallback "
            f"({failed / total:.1%}, over the limit of {limit:.1%}); its scores would measure provider luck"
        )


def jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def run_one(program: Any, example: Any, index: int, metric: Metric, lm: Any) -> ExampleResult:
    """Score one example (see the module's docstring for what each kind of failure becomes)."""
    started = time.perf_counter()
    try:
        with program_context(lm):
            prediction = program(**example.inputs())
        latency = (time.perf_counter() - started) * 1000
        score = float(metric(example, prediction))
        outputs = {k: jsonable(v) for k, v in prediction.items()}
        return ExampleResult(index=index, score=score, outputs=outputs, latency_ms=round(latency, 3))
    except Exception as exc:
        failure = exc
    latency = round((time.perf_counter() - started) * 1000, 3)
    error = project_error(failure)
    if error is not None and error.code in TRANSIENT_CALL_CODES:
        return ExampleResult(index=index, score=0.0, latency_ms=latency, error=str(error), call_failed=True)
    if error is not None:
        # Raised outside the handler, so the project's error is not chained to DSPy's wrapper around it.
        raise error
    return ExampleResult(index=index, score=0.0, latency_ms=latency, error=f"{type(failure).__name__}: {failure}")


def evaluate_examples(
    program: Any, examples: list[Any], offset: int, metric: Metric, lm: Any, num_threads: int
) -> list[ExampleResult]:
    """Score ``examples`` (indices ``offset``...) with ``num_threads`` threads. Blocking: use a worker thread.

    The first error that is not about one example is raised, once the examples already running are done;
    the rest are not started."""
    with ThreadPoolExecutor(max_workers=max(1, min(num_threads, len(examples)))) as pool:
        futures = [pool.submit(run_one, program, ex, offset + i, metric, lm) for i, ex in enumerate(examples)]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
