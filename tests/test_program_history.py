"""Agents run programs with DSPy's call history off: a long-lived evaluator or serving process must not keep
every prompt it sent (DSPy keeps up to 10,000 per process and per module), or its memory grows with the work."""

from __future__ import annotations

import dspy
from dspy.clients import base_lm

from dspyrt.agents.lm.demo import demo_lm
from dspyrt.agents.metrics import MetricRegistry
from dspyrt.agents.scoring import run_one


def test_scoring_examples_keeps_no_dspy_history() -> None:
    program = dspy.Predict("text -> topic")
    metric = MetricRegistry.installed().get("exact_match")
    lm = demo_lm()
    before = len(base_lm.GLOBAL_HISTORY)
    for i in range(30):
        example = dspy.Example(text=f"the striker scored goal {i}", topic="sports").with_inputs("text")
        result = run_one(program, example, i, metric, lm)
        assert result.error is None
    assert len(base_lm.GLOBAL_HISTORY) == before
    assert program.history == [] and lm.history == []

    # The same program outside program_context does record (the test would catch the setting being lost).
    with dspy.context(lm=lm):
        program(text="a recorded call")
    assert len(base_lm.GLOBAL_HISTORY) == before + 1
