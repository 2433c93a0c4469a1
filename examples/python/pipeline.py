"""A deployed program inside your own dspy.Module, and the same program loaded locally.

Run it with `make run` serving (its cycle deploys `topic-classifier`), from the repository root:

    .venv/bin/python examples/python/pipeline.py

`client.program(name)` is a dspy.Module whose forward calls the deployed version through serving.predict; the
blocking client (connect_sync) can be called from any thread, a notebook cell's included.
"""

from __future__ import annotations

import dspy

import dspyrt


class Headline(dspy.Module):  # type: ignore[misc]
    """Your own program: a deployed classifier, then some plain Python."""

    def __init__(self, classify: dspy.Module) -> None:
        super().__init__()
        self.classify = classify

    def forward(self, text: str) -> dspy.Prediction:
        topic = self.classify(text=text).topic
        return dspy.Prediction(topic=topic, headline=f"[{topic.upper()}] {text}")


def main() -> None:
    with dspyrt.connect_sync() as client:
        pipeline = Headline(client.program("topic-classifier"))
        for text in ("stocks fell after the bank raised rates", "chop the onions and fry them in butter"):
            print(pipeline(text=text).headline)
        # The deployed version built here, its optimized state loaded: run it with your own dspy.LM.
        local = client.load("topic-classifier")
        print(f"loaded locally: {type(local).__name__} with {len(local.demos)} demos")


if __name__ == "__main__":
    main()
