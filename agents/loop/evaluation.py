"""Scoring a program on examples (one shard), and merging shards into one evaluation.

Each example is run once in a worker thread under ``dspy.context(lm=...)``; its score, outputs, latency and
error are kept, keyed by the example's index in the whole devset. Merging is by index, so a shard scored twice
(its first worker died after finishing) can never count an example twice.

A failure of one example (the LM's answer could not be parsed, the metric raised on this prediction) scores it 0
and the shard goes on. A failure that is not about the example (one of the project's errors: the switcher
unreachable, a timeout, an error reply, a configuration error) fails the shard instead: scoring every example 0
would report a baseline of 0 and a huge improvement.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dspy

from agents.loop.models import EvaluationResult, ExampleResult, ShardResult
from agents.metrics import Metric
from bus import DspyrtError, MessageValidationError


def to_examples(rows: list[dict[str, Any]], inputs: list[str], metric_field: str | None = None) -> list[Any]:
    """``dspy.Example``s of ``rows``; every row must hold the inputs and ``metric_field`` (if given), so a typo
    fails before any LM call is paid for."""
    examples = []
    for i, row in enumerate(rows):
        missing = [k for k in inputs if k not in row]
        if missing:
            raise MessageValidationError(f"example {i} lacks input field(s) {', '.join(missing)}")
        if metric_field is not None and metric_field not in row:
            raise MessageValidationError(f"example {i} lacks the metric field {metric_field!r}")
        examples.append(dspy.Example(**row).with_inputs(*inputs))
    return examples


def jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def project_error(exc: BaseException) -> DspyrtError | None:
    """The project's error ``exc`` is or was raised from (DSPy wraps what the LM raises), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, DspyrtError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def run_one(program: Any, example: Any, index: int, metric: Metric, lm: Any) -> ExampleResult:
    """Score one example; a failure of the example scores 0, a failure of the bus or the setup is raised."""
    started = time.perf_counter()
    try:
        with dspy.context(lm=lm):
            prediction = program(**example.inputs())
        latency = (time.perf_counter() - started) * 1000
        score = float(metric(example, prediction))
        outputs = {k: jsonable(v) for k, v in prediction.items()}
        return ExampleResult(index=index, score=score, outputs=outputs, latency_ms=round(latency, 3))
    except Exception as exc:
        failure = exc
    # Raised outside the handler, so the project's error is not chained to DSPy's wrapper around it.
    error = project_error(failure)
    if error is not None:
        raise error
    latency = (time.perf_counter() - started) * 1000
    message = f"{type(failure).__name__}: {failure}"
    return ExampleResult(index=index, score=0.0, latency_ms=round(latency, 3), error=message)


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


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (rank - low), 3)


def merge_shards(shards: Iterable[ShardResult], *, total: int, model: str, duration_s: float) -> EvaluationResult:
    """One evaluation from its shards: every index exactly once."""
    by_index: dict[int, ExampleResult] = {}
    shard_list = list(shards)
    for shard in shard_list:
        for result in shard.results:
            by_index.setdefault(result.index, result)
    missing = sorted(set(range(total)) - set(by_index))
    if missing:
        raise MessageValidationError(f"evaluation incomplete: {len(missing)} example(s) missing, e.g. {missing[:5]}")
    results = [by_index[i] for i in range(total)]
    latencies = [r.latency_ms for r in results if r.error is None]
    return EvaluationResult(
        score=round(100.0 * sum(r.score for r in results) / total, 4),
        examples=total,
        results=results,
        shards=len(shard_list),
        model=model,
        lm_calls=sum(s.lm_calls for s in shard_list),
        input_tokens=sum(s.input_tokens for s in shard_list),
        output_tokens=sum(s.output_tokens for s in shard_list),
        cost=round(sum(s.cost for s in shard_list), 6),
        latency_p50_ms=percentile(latencies, 50),
        latency_p95_ms=percentile(latencies, 95),
        duration_s=round(duration_s, 3),
    )
