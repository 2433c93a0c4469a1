"""Scoring a program on examples (one shard), and merging shards into one evaluation.

Each example is run once in a worker thread under ``dspy.context(lm=...)``; its score, outputs, latency and
error are kept, keyed by the example's index in the whole devset. Merging is by index, so a shard scored twice
(its first worker died after finishing) can never count an example twice.

How each example's failure counts is ``dspyrt.agents.scoring``'s rule: a failure of the example scores 0, an LM call
that failed after retries and fallback is an error left out of the score (and counted against coverage), anything else
fails the shard: scoring every example 0 would report a baseline of 0 and a huge improvement.

An evaluation of 100,000 examples must not hold 100,000 result objects: :class:`EvaluationAccumulator` merges
shards as they arrive into counters and a spool file (one JSON line per example). A small evaluation keeps its
results inline; a large one puts them in the results object store as JSON Lines sorted by index
(:func:`store_results`), which :func:`read_example_results` pages through.
"""

from __future__ import annotations

import tempfile
from array import array
from collections.abc import Awaitable, Callable, Iterable
from itertools import islice, pairwise
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import anyio
import dspy

from dspyrt.agents.loop.models import EvaluationResult, ShardResult
from dspyrt.agents.scoring import ExampleResult, check_error_rate
from dspyrt.bus import DspyrtError, MessageValidationError
from dspyrt.bus.claims import ClaimStore, ObjectRef
from dspyrt.runtime.stats import percentile

# Up to this many examples (and INLINE_RESULTS_BYTES of their JSON), results stay inline in the EvaluationResult;
# beyond, they go to the results object store. Both bounds keep an evaluation (and the cycle state holding two)
# well inside one message whatever the outputs weigh.
INLINE_RESULTS = 1000
INLINE_RESULTS_BYTES = 128 * 1024


def to_examples(
    rows: list[dict[str, Any]],
    inputs: list[str],
    metric_field: str | None = None,
    *,
    start: int = 0,
    source: str | None = None,
) -> list[Any]:
    """``dspy.Example``s of ``rows``; every row must hold the inputs and ``metric_field`` (if given), so a typo
    fails before any LM call is paid for. ``start`` is the first row's index and ``source`` the dataset it came
    from, for the error."""
    where = f" of {source}" if source else ""
    examples = []
    for i, row in enumerate(rows, start=start):
        missing = [k for k in inputs if k not in row]
        if missing:
            raise MessageValidationError(f"example {i}{where} lacks input field(s) {', '.join(missing)}")
        if metric_field is not None and metric_field not in row:
            raise MessageValidationError(f"example {i}{where} lacks the metric field {metric_field!r}")
        examples.append(dspy.Example(**row).with_inputs(*inputs))
    return examples


class EvaluationAccumulator:
    """Merges an evaluation's shard results as they arrive, in any order.

    It keeps what the summary needs (per-index scores, which examples were answered, latencies, the shards'
    counters) and appends each example's result as one JSON line to ``spool``; the first result of an index wins,
    so a shard scored twice counts once. Shards are contiguous index ranges, so the spool's per-shard segments
    ordered by their first index are the results by index (:meth:`write_sorted`).
    """

    def __init__(self, total: int, spool: Path) -> None:
        self.total = total
        self.spool = spool
        self.shards = 0
        self.lm_calls = 0
        self.cached_calls = 0
        self.provider_requests = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost = 0.0
        self.models_used: dict[str, int] = {}
        self.bytes = 0
        self._seen = bytearray(total)
        self._answered = bytearray(total)
        self._scores = array("d", bytes(8 * total))
        self._latencies: list[float] = []
        self._count = 0
        self._numbers: set[int] = set()
        self._segments: list[tuple[int, int, int, int]] = []  # (first index, last index, byte offset, length)
        self._file: BinaryIO | None = spool.open("wb")

    def __enter__(self) -> EvaluationAccumulator:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def add(self, number: int, shard: ShardResult) -> None:
        """Merge shard ``number`` (a number seen before is ignored: its examples are counted already)."""
        if self._file is None:
            raise RuntimeError("the accumulator is closed")
        if number in self._numbers:
            return
        self._numbers.add(number)
        self.shards += 1
        self.lm_calls += shard.lm_calls
        self.cached_calls += shard.cached_calls
        self.provider_requests += shard.provider_requests
        self.input_tokens += shard.input_tokens
        self.output_tokens += shard.output_tokens
        self.cost += shard.cost
        for name, calls in shard.models_used.items():
            self.models_used[name] = self.models_used.get(name, 0) + calls
        lines: list[bytes] = []
        kept: list[int] = []
        for result in sorted(shard.results, key=lambda r: r.index):
            i = result.index
            if not 0 <= i < self.total or self._seen[i]:
                continue
            self._seen[i] = 1
            self._count += 1
            if not result.call_failed:
                self._answered[i] = 1
                self._scores[i] = result.score
            if result.error is None:
                self._latencies.append(result.latency_ms)
            lines.append(result.model_dump_json().encode() + b"\n")
            kept.append(i)
        if lines:
            data = b"".join(lines)
            self._segments.append((kept[0], kept[-1], self.bytes, len(data)))
            self._file.write(data)
            self.bytes += len(data)

    def summary(self, *, model: str, duration_s: float, max_error_rate: float = 1.0) -> EvaluationResult:
        """The evaluation without its per-example results: every index exactly once, or it is incomplete. More
        failed LM calls than ``max_error_rate`` of the examples fail it with ``provider_unreliable``."""
        if self._count < self.total:
            missing = [i for i in range(self.total) if not self._seen[i]]
            raise MessageValidationError(
                f"evaluation incomplete: {len(missing)} example(s) missing, e.g. {missing[:5]}"
            )
        answered = sum(self._answered)
        # Summed in index order, as a list of results would be: the same float, whatever order shards came in.
        total_score = sum(s for s, a in zip(self._scores, self._answered, strict=True) if a)
        score = round(100.0 * total_score / answered, 4) if answered else 0.0
        errors = self.total - answered
        check_error_rate(errors, self.total, max_error_rate, model=model, what="evaluation")
        return EvaluationResult(
            score=score,
            examples=self.total,
            answered=answered,
            errors=errors,
            coverage=round(answered / self.total, 6) if self.total else 1.0,
            models_used=dict(self.models_used),
            mixed_models=len(self.models_used) > 1,
            cached_calls=self.cached_calls,
            provider_requests=self.provider_requests,
            shards=self.shards,
            model=model,
            lm_calls=self.lm_calls,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cost=round(self.cost, 6),
            # No answered example: no latency was measured (None, which fails a latency objective), not 0 ms.
            latency_p50_ms=percentile(self._latencies, 50) if self._latencies else None,
            latency_p95_ms=percentile(self._latencies, 95) if self._latencies else None,
            duration_s=round(duration_s, 3),
        )

    @property
    def inline(self) -> bool:
        """Whether the results are small enough to travel inline."""
        return self.total <= INLINE_RESULTS and self.bytes <= INLINE_RESULTS_BYTES

    def write_sorted(self, target: Path) -> int:
        """Write the results to ``target`` as JSON Lines sorted by index (blocking: run it in a worker thread);
        its size in bytes."""
        self.close()
        segments = sorted(self._segments)
        for before, after in pairwise(segments):
            if after[0] <= before[1]:  # two shards' ranges interleave: a shard broke the contiguity contract
                raise DspyrtError(f"shard results overlap at example {after[0]}", code="internal")
        with self.spool.open("rb") as source, target.open("wb") as out:
            for _, _, offset, length in segments:
                source.seek(offset)
                remaining = length
                while remaining:
                    block = source.read(min(remaining, 1 << 20))
                    out.write(block)
                    remaining -= len(block)
        return self.bytes

    def results(self) -> list[ExampleResult]:
        """Every result, by index (for an evaluation small enough to hold them: see :attr:`inline`)."""
        with tempfile.TemporaryDirectory(prefix="dspyrt-eval-") as tmp:
            path = Path(tmp) / "sorted.jsonl"
            self.write_sorted(path)
            return _read_lines(path, 0, None, None)


def merge_shards(
    shards: Iterable[ShardResult], *, total: int, model: str, duration_s: float, max_error_rate: float = 1.0
) -> EvaluationResult:
    """One evaluation from its shards, with its results inline: every index exactly once. More failed LM calls
    than ``max_error_rate`` of the examples fail it with ``provider_unreliable``."""
    with tempfile.TemporaryDirectory(prefix="dspyrt-eval-") as tmp:
        with EvaluationAccumulator(total, Path(tmp) / "spool.jsonl") as accumulator:
            for number, shard in enumerate(shards):
                accumulator.add(number, shard)
            result = accumulator.summary(model=model, duration_s=duration_s, max_error_rate=max_error_rate)
            result.results = accumulator.results()
    return result


async def store_results(
    accumulator: EvaluationAccumulator,
    result: EvaluationResult,
    claims: Callable[[], Awaitable[ClaimStore]],
    evaluation_id: str,
) -> EvaluationResult:
    """``result`` with its per-example results: inline when small, else uploaded (JSON Lines by index) as
    ``evaluations/<evaluation_id>.jsonl`` to the results object store (``claims()`` opens it) and named by
    ``results_ref``."""
    if accumulator.inline:
        return result.model_copy(update={"results": await anyio.to_thread.run_sync(accumulator.results)})
    target = accumulator.spool.with_name(accumulator.spool.name + ".sorted")
    try:
        await anyio.to_thread.run_sync(accumulator.write_sorted, target)
        ref = await (await claims()).put(f"evaluations/{evaluation_id}.jsonl", target)
    finally:
        target.unlink(missing_ok=True)
    return result.model_copy(update={"results": [], "results_ref": ref})


# ------------------------------------------------------------------------------------------ reading


def _read_lines(
    path: Path, offset: int, limit: int | None, keep: Callable[[ExampleResult], bool] | None
) -> list[ExampleResult]:
    with path.open("rb") as source:
        parsed = (ExampleResult.model_validate_json(line) for line in islice(source, offset, None) if line.strip())
        chosen = parsed if keep is None else (r for r in parsed if keep(r))
        return list(islice(chosen, limit))


async def _read_results(
    claims: ClaimStore,
    ref: ObjectRef,
    offset: int,
    limit: int | None,
    keep: Callable[[ExampleResult], bool] | None = None,
) -> list[ExampleResult]:
    if offset < 0 or (limit is not None and limit < 0):
        raise MessageValidationError("offset and limit cannot be negative")
    # Downloaded to a temporary file rather than held: the object may be hundreds of megabytes.
    with tempfile.TemporaryDirectory(prefix="dspyrt-results-") as tmp:
        path = Path(tmp) / "results.jsonl"
        await claims.download(ref, path)
        return await anyio.to_thread.run_sync(_read_lines, path, offset, limit, keep)


async def read_example_results(
    claims: ClaimStore, ref: ObjectRef, offset: int = 0, limit: int | None = None
) -> list[ExampleResult]:
    """Per-example results of an evaluation whose ``results_ref`` is ``ref``: the ones with index ``offset`` to
    ``offset + limit - 1`` (to the end when ``limit`` is None), by index. The object is checked against the
    reference's sha256 (``corrupt_result``); an expired one is a ``NotFoundError``."""
    return await _read_results(claims, ref, offset, limit)


async def answered_results(claims: ClaimStore, ref: ObjectRef, limit: int) -> list[ExampleResult]:
    """The first ``limit`` results (by index) whose program answered without error."""
    return await _read_results(claims, ref, 0, limit, lambda r: r.error is None)
