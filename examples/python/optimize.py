"""Optimize the bundled topic classifier from Python with the async client, following the task's progress.

Run it with `make run` serving, from the repository root:

    .venv/bin/python examples/python/optimize.py

The data is examples/optimize.json's, as dspy.Examples; the program is a dspy.Signature class, sent as its
declarative spec. Submitted twice, the second run is a cache hit (0 LM calls).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import dspy

import dspyrt

DATA = json.loads((Path(__file__).resolve().parent.parent / "optimize.json").read_text())["input"]


class Topic(dspy.Signature):  # type: ignore[misc]
    """Classify the text into one topic: sports, cooking, technology, finance or weather."""

    text: str = dspy.InputField()
    topic: str = dspy.OutputField()


async def main() -> None:
    trainset = [dspy.Example(**row).with_inputs("text") for row in DATA["trainset"]]
    valset = [dspy.Example(**row).with_inputs("text") for row in DATA["valset"]]
    async with dspyrt.connect() as client:
        run = client.optimize(
            Topic, trainset, valset, optimizer="labeled_fewshot", params={"k": 16}, program_name="topic-classifier"
        )
        async with run:  # submitted here; the progress stream ends when the task does
            print(f"task {run.task_id}")
            async for event in run.progress():
                print(f"  {event.phase} {event.step or 0}/{event.total or '?'}")
            result = await run.result()
    print(
        f"{result.optimizer} on {result.model}: {result.baseline_score} -> {result.optimized_score} "
        f"({result.improvement_score:+} points) on {result.valset_size} held-out examples, "
        f"{result.lm_calls} LM calls{' (cached)' if result.cached else ''}"
    )


if __name__ == "__main__":
    asyncio.run(main())
