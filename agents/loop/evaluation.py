"""Scoring a program on examples (one shard), and merging shards into one evaluation.

Each example is run once in a worker thread under ``dspy.context(lm=...)``; its score, outputs, latency and
error are kept, keyed by the example's index in the whole devset. Merging is by index, so a shard scored twice
(its first worker died after finishing) can never count an example twice.

How each example's failure counts is ``agents.scoring``'s rule: a failure of the example scores 0, an LM call that
failed after retries and fallback is an error left out of the score (and counted against coverage), anything else
fails the shard: scoring every example 0 would report a baseline of 0 and a huge improvement.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import dspy

from agents.loop.models import EvaluationResult, ShardResult
from agents.scoring import ExampleResult, check_error_rate, summarize
from bus import MessageValidationError


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


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (rank - low), 3)


def merge_shards(
    shards: Iterable[ShardResult], *, total: int, model: str, duration_s: float, max_error_rate: float = 1.0
) -> EvaluationResult:
    """One evaluation from its shards: every index exactly once. More failed LM calls than ``max_error_rate``
    of the examples fail it with ``provider_unreliable``."""
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
    summary = summarize(results)
    check_error_rate(summary.errors, total, max_error_rate, model=model, what="evaluation")
    models_used: dict[str, int] = {}
    for shard in shard_list:
        for name, calls in shard.models_used.items():
            models_used[name] = models_used.get(name, 0) + calls
    return EvaluationResult(
        score=summary.score if summary.score is not None else 0.0,
        examples=total,
        answered=summary.answered,
        errors=summary.errors,
        coverage=summary.coverage,
        models_used=models_used,
        mixed_models=len(models_used) > 1,
        cached_calls=sum(s.cached_calls for s in shard_list),
        provider_requests=sum(s.provider_requests for s in shard_list),
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
