"""Telemetry setup: installed instrumentors are turned on by name, and thread pools carry the trace context."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import dspy
import pytest
from dspy.utils.dummies import DummyLM
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from dspyrt.runtime.telemetry import INSTRUMENTOR_GROUP, Telemetry, instrument
from dspyrt.runtime.traces import read_spans

INSTRUMENTORS = """
from __future__ import annotations

calls: list[tuple[str, object]] = []


class Working:
    is_instrumented_by_opentelemetry = False

    def instrument(self, **kwargs: object) -> None:
        calls.append(("working", kwargs["tracer_provider"]))


class Broken:
    is_instrumented_by_opentelemetry = False

    def instrument(self, **kwargs: object) -> None:
        raise RuntimeError("needs a newer library")
"""


@pytest.fixture
def installed_instrumentors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    """A real distribution on sys.path declaring two instrumentor entry points, as a pip install would."""
    (tmp_path / "fake_instrumentors.py").write_text(INSTRUMENTORS)
    dist = tmp_path / "fake_instrumentors-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-instrumentors\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(f"""
        [{INSTRUMENTOR_GROUP}]
        fake-working = fake_instrumentors:Working
        fake-broken = fake_instrumentors:Broken
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_instrumentors  # type: ignore[import-not-found]

    return fake_instrumentors


def test_named_installed_instrumentors_are_turned_on_and_the_rest_skipped(
    installed_instrumentors: object, caplog: pytest.LogCaptureFixture
) -> None:
    provider = TracerProvider()
    with caplog.at_level(logging.DEBUG, logger="dspyrt.telemetry"):
        turned_on = instrument(["fake-working", "fake-broken", "fake-absent"], provider)
    assert turned_on == ["fake-working"]
    assert installed_instrumentors.calls == [("working", provider)]  # type: ignore[attr-defined]
    assert "instrumentation fake-broken not turned on: needs a newer library" in caplog.text
    assert "instrumentation fake-absent is not installed" in caplog.text
    # only the names asked for: an installed instrumentor that was not named stays off
    assert instrument([], provider) == []
    assert len(installed_instrumentors.calls) == 1  # type: ignore[attr-defined]


class SpanInForward(dspy.Module):
    """Makes a span where an instrumented DSPy module would: inside the program, on DSPy's worker thread."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("text -> topic")

    def forward(self, text: str) -> dspy.Prediction:
        with trace.get_tracer("test").start_as_current_span("program forward"):
            return self.predict(text=text)


def test_spans_on_dspy_evaluate_threads_join_the_callers_trace(telemetry: Telemetry) -> None:
    """dspy.Evaluate runs examples on a ThreadPoolExecutor, whose threads start with an empty context: without
    the propagation every span there began a trace of its own (seen in Phoenix: one trace per example)."""
    examples = [dspy.Example(text=f"t{i}", topic="x").with_inputs("text") for i in range(6)]
    tracer = trace.get_tracer("test")
    with dspy.context(lm=DummyLM([{"topic": "x"}] * 6)):
        with tracer.start_as_current_span("evaluate shard") as outer:
            dspy.Evaluate(devset=examples, num_threads=3, display_progress=False)(
                SpanInForward(), metric=lambda e, p, t=None: e.topic == p.topic
            )
    telemetry.flush()
    trace_id, span_id = f"{outer.get_span_context().trace_id:032x}", f"{outer.get_span_context().span_id:016x}"
    spans = read_spans(Path(telemetry.span_destination).parent.parent)
    forwards = [s for s in spans if s["name"] == "program forward" and s["trace_id"] == trace_id]
    assert len(forwards) == len(examples)
    assert {s["parent_id"] for s in forwards} == {span_id}
