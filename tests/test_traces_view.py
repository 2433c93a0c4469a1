"""``dspyrt traces``: collapsed span trees, phase summaries, task id prefixes, lines that fit the console.

The span files are written here in the exporter's own format (``dspyrt.runtime.telemetry.span_to_dict``, one JSON object
a line), shaped like a cycle's trace: the coordinator's phase requests and tasks, evaluation shards, LM calls.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from dspyrt.bus import NotFoundError
from dspyrt.runtime.cli_traces import print_trace, trace_lines, traces_command
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.stats import percentile
from dspyrt.runtime.traces import (
    AmbiguousTaskIdError,
    SpanNode,
    collapse,
    read_spans,
    resolve_task_id,
    summarize,
    task_trees,
)

pytestmark = pytest.mark.timeout(30)

CYCLE = "c8bb0b53" + "a1" * 12  # 32 hex characters, as the runtime's task ids
OTHER = "c8bb0b53" + "f0" * 12  # shares the first 8 characters with CYCLE
LONELY = "0123abcd" * 4
MS = 1_000_000  # nanoseconds
TIMES = "\N{MULTIPLICATION SIGN}"


class Spans:
    """Builds one trace's spans (``span_to_dict``'s shape), each child starting after the previous one."""

    def __init__(self, trace_id: str = "ab" * 16) -> None:
        self.trace_id = trace_id
        self.spans: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._clock = itertools.count(1_800_000_000_000 * MS, MS)

    def add(
        self,
        name: str,
        parent: dict[str, Any] | None = None,
        *,
        ms: float = 1.0,
        status: str = "UNSET",
        **attributes: Any,
    ) -> dict[str, Any]:
        start = next(self._clock)
        op, _, subject = name.partition(" ")
        attrs = {"messaging.system": "nats", "messaging.destination.name": subject, "messaging.operation.type": op}
        attrs.update({k.replace("__", "."): v for k, v in attributes.items()})
        span = {
            "trace_id": self.trace_id,
            "span_id": f"{next(self._ids):016x}",
            "parent_id": parent["span_id"] if parent else None,
            "name": name,
            "kind": "PRODUCER" if op == "send" else "CONSUMER",
            "start": start,
            "end": start + int(ms * MS),
            "status": status,
            "service": "dspyrt-up",
            "attributes": attrs,
        }
        self.spans.append(span)
        return span

    def hop(self, subject: str, parent: dict[str, Any], *, ms: float = 1.0, task_id: str | None = None,
            **attributes: Any) -> dict[str, Any]:  # fmt: skip
        """``send subject`` and its ``process subject`` child; returns the process span."""
        send_attrs = {"messaging__message__id": task_id} if task_id else {}
        sent = self.add(f"send {subject}", parent, ms=ms / 2, **send_attrs)
        process_attrs = {"dspyrt__task__id": task_id} if task_id else {}
        return self.add(f"process {subject}", sent, ms=ms, **process_attrs, **attributes)

    def lm_call(self, parent: dict[str, Any], ms: float, *, fail: bool = False, cached: bool = False) -> None:
        if fail:
            sent = self.add("send dspy.switcher.complete", parent, ms=ms)
            failed = self.add("process dspy.switcher.complete", sent, ms=ms, status="ERROR", error__type="rate_limited")
            # The status description, if the exporter records it (span_to_dict writes the status code only today).
            failed["status_message"] = "429 from provider, 3 attempts"
            return
        process = self.hop("dspy.switcher.complete", parent, ms=ms,
                           dspyrt__lm__source="cache" if cached else "provider", dspyrt__lm__cost=0.001)  # fmt: skip
        self.add("send dspy.event.lm.call", process, ms=0.1)


def cycle_trace(task_id: str = CYCLE, *, failing_call: bool = True) -> Spans:
    """A cycle with 20 + 24 + 20 LM calls; one baseline call fails (when ``failing_call``)."""
    t = Spans()
    cycle = t.hop("dspy.task.cycle", None, ms=900, task_id=task_id)  # type: ignore[arg-type]
    t.add(f"send dspy.event.task.progress.cycle.{task_id}", cycle, ms=0.1)
    t.hop("dspy.loop-create.create", cycle, ms=2)
    for key, durations in (("-base", [3.0] * 15 + [9.0] * 4 + [12.0]), ("-opt-eval", [5.0] * 20)):
        t.add(f"send dspy.event.task.progress.cycle.{task_id}", cycle, ms=0.1)
        evaluate = t.hop("dspy.task.evaluate", cycle, ms=150, task_id=f"{task_id}{key}")
        for shard in range(4):
            process = t.hop("dspy.task.evaluate-shard", evaluate, ms=40)
            for i, ms in enumerate(durations[shard * 5 : shard * 5 + 5]):
                t.lm_call(process, ms, fail=failing_call and key == "-base" and shard == 2 and i == 1)
        if key == "-base":
            t.add(f"send dspy.event.task.progress.cycle.{task_id}", cycle, ms=0.1)
            optimize = t.hop("dspy.task.optimize", cycle, ms=300, task_id=f"{task_id}-opt")
            for i in range(24):
                t.lm_call(optimize, 3.0 + (i % 4), cached=i < 6)
    validate = t.hop("dspy.assertions.validate", cycle, ms=30)
    for name in ("code", "logic", "security"):
        t.hop(f"dspy.validator-{name}.validate", validate, ms=5)
    t.hop("dspy.loop-deploy.deploy", cycle, ms=4)
    t.add("send dspy.event.cycle.completed", cycle, ms=0.1)
    return t


def write(state_dir: Path, *traces: Spans) -> None:
    folder = state_dir / "traces"
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(traces):
        lines = "".join(json.dumps(s) + "\n" for s in t.spans)
        (folder / f"spans-{1000 + i}.jsonl").write_text(lines + '{"cut short', encoding="utf-8")


def plain(lines: list[Any]) -> list[str]:
    return [line.plain for line in lines]


# ------------------------------------------------------------------------------------ the data layer


def test_percentile_is_nearest_rank() -> None:
    values = [3.0] * 15 + [9.0] * 4 + [12.0]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 100)) == (3.0, 9.0, 12.0)
    assert percentile([7.0], 95) == 7.0


def test_sibling_spans_of_one_shape_merge_and_a_failing_one_stays_apart() -> None:
    t = cycle_trace()
    [root] = task_trees(t.spans, CYCLE)
    [sent] = collapse([root])
    [cycle] = sent.children
    evaluations = [g for g in cycle.children if g.first.name == "send dspy.task.evaluate"]
    assert [g.count for g in evaluations] == [1, 1]  # baseline has an error below it: never merged
    [baseline_process] = evaluations[0].children
    shards = [(g.count, g.first.name) for g in baseline_process.children]
    assert shards == [(3, "send dspy.task.evaluate-shard"), (1, "send dspy.task.evaluate-shard")]
    [merged_shards, failing_shard] = baseline_process.children
    [merged_process] = merged_shards.children
    [calls] = merged_process.children  # the three shards' 15 calls, merged across shards
    assert (calls.count, calls.first.name) == (15, "send dspy.switcher.complete")
    [failing_process] = failing_shard.children
    assert sorted(g.count for g in failing_process.children) == [1, 4]
    [failed] = [g for g in failing_process.children if g.count == 1]
    assert failed.children[0].first.failed
    progress = [g for g in cycle.children if ".progress." in g.first.name]
    assert [g.count for g in progress] == [4]


def test_cycle_summary_per_phase() -> None:
    t = cycle_trace()
    summary = summarize(task_trees(t.spans, CYCLE), CYCLE)
    assert summary.kind == "cycle"
    phases = {p.name: p.figures for p in summary.phases}
    assert list(phases) == ["create", "evaluate baseline", "optimize", "evaluate optimized", "validate", "deploy"]
    assert all(f is not None for f in phases.values())
    base, opt, opt_eval = phases["evaluate baseline"], phases["optimize"], phases["evaluate optimized"]
    assert base is not None and opt is not None and opt_eval is not None
    assert (base.lm_calls, base.errors) == (20, 1)
    assert (opt.lm_calls, opt.cached, opt.errors) == (24, 6, 0)
    assert (opt_eval.lm_calls, opt_eval.errors) == (20, 0)
    assert (summary.total.lm_calls, summary.total.errors, summary.total.spans) == (64, 1, len(t.spans))
    assert 900 <= summary.total.duration_ms < 2000


# ------------------------------------------------------------------------------------ task id prefixes


def test_task_id_prefixes() -> None:
    spans = cycle_trace(CYCLE).spans + cycle_trace(OTHER).spans
    for s in spans[len(spans) // 2 :]:
        s["trace_id"] = "cd" * 16
    assert resolve_task_id(spans, CYCLE) == CYCLE
    assert resolve_task_id(spans, CYCLE[:12]) == CYCLE  # the cycle, not its -base/-opt/-opt-eval phase tasks
    assert resolve_task_id(spans, f"{CYCLE}-opt-") == f"{CYCLE}-opt-eval"
    with pytest.raises(AmbiguousTaskIdError) as ambiguous:
        resolve_task_id(spans, "c8bb0b53")
    assert ambiguous.value.candidates[:1] == (CYCLE,) and OTHER in ambiguous.value.candidates
    with pytest.raises(NotFoundError):
        resolve_task_id(spans, "ffff")


# ------------------------------------------------------------------------------------ rendering


def test_collapsed_view_counts_percentiles_and_keeps_the_error() -> None:
    t = cycle_trace()
    lines = plain(trace_lines(t.spans, CYCLE, width=100))
    assert lines[0] == f"task {CYCLE} (cycle)"
    baseline_line = next(line for line in lines if line.startswith("  evaluate baseline"))
    assert "20 LM calls" in baseline_line and "1 error" in baseline_line
    assert "(6 cached)" in next(line for line in lines if line.startswith("  optimize"))
    calls = [line for line in lines if re.search(rf"{TIMES} 24 send dspy\.switcher\.complete\b", line)]
    assert len(calls) == 1
    assert re.search(r"p50 [\d.]+ ms", calls[0])
    # the three error-free baseline shards' calls, merged across shards: 10 of 3 ms, 4 of 9 ms, one of 12 ms
    assert any(
        re.search(rf"{TIMES} 15 process dspy\.switcher\.complete\b.*p50 3\.0 ms.*max 12 ms", line) for line in lines
    )
    failed = [i for i, line in enumerate(lines) if "✗ process dspy.switcher.complete" in line]
    assert len(failed) == 1
    assert "rate_limited: 429 from provider, 3 attempts" in lines[failed[0] + 1]
    assert len(lines) < 70  # collapsed: far fewer lines than the trace has spans
    assert len(t.spans) > 200


def test_full_view_shows_every_span() -> None:
    t = cycle_trace()
    lines = plain(trace_lines(t.spans, CYCLE, full=True, width=100))
    tree = lines[lines.index(f"trace {t.trace_id}") + 1 :]
    assert len(tree) == len(t.spans) + 1  # one line a span, and the failed span's error line
    assert not any(TIMES in line for line in tree)
    assert sum("send dspy.switcher.complete" in line for line in tree) == 64


@pytest.mark.parametrize("width", [60, 80, 100])
@pytest.mark.parametrize("full", [False, True])
def test_no_line_wider_than_the_console(width: int, full: bool) -> None:
    lines = trace_lines(cycle_trace().spans, CYCLE, full=full, width=width)
    assert lines and max(line.cell_len for line in lines) <= width
    # the long progress subjects are shortened, not wrapped; durations end at the right edge
    if width <= 80:
        assert not any(CYCLE in line.plain for line in lines[1:])
        assert any(f"progress.cycle.{CYCLE[:8]}…" in line.plain for line in lines)
    span_lines = [line.plain for line in lines if "─ " in line.plain and "✗" not in line.plain]
    assert all(re.search(r"\d ms$", line) and len(line) == width for line in span_lines)


def test_print_trace_for_up(tmp_path: Path) -> None:
    state = tmp_path / "state"
    trace = cycle_trace(failing_call=False)
    write(state, trace)
    out = io.StringIO()
    cfg = IntegrationConfig(state_dir=state)
    assert print_trace(cfg, CYCLE, console=Console(file=out, width=80, color_system=None))
    text = out.getvalue().splitlines()
    assert text[0] == f"task {CYCLE} (cycle)"
    assert max(len(line) for line in text) <= 80
    assert "no errors" in text[1]
    assert not print_trace(cfg, LONELY, console=Console(file=io.StringIO()))
    assert len(read_spans(state)) == len(trace.spans)  # the line cut short is skipped


# ------------------------------------------------------------------------------------ the command


@pytest.fixture
def traces_cli(tmp_path: Path) -> typer.Typer:
    """``dspyrt traces`` as ``dspyrt.runtime.cli`` registers it; spans under ``./.dspyrt`` (the test's cwd)."""
    assert Path.cwd() == tmp_path
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("traces")(traces_command)
    other = Spans("cd" * 16)
    other.hop("dspy.task.wordcount", None, ms=3, task_id=OTHER)  # type: ignore[arg-type]
    write(tmp_path / ".dspyrt", cycle_trace(), other)
    return app


def test_command_resolves_a_prefix_and_fits_80_columns(traces_cli: typer.Typer) -> None:
    result = CliRunner().invoke(traces_cli, ["traces", CYCLE[:12]])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"task {CYCLE} (cycle)"
    assert max(len(line) for line in lines) <= 80
    assert any(f"{TIMES} 24 send" in line for line in lines)
    full = CliRunner().invoke(traces_cli, ["traces", CYCLE, "--full"])
    assert full.exit_code == 0
    assert len(full.output.splitlines()) > len(cycle_trace().spans) > 4 * len(lines)
    other = CliRunner().invoke(traces_cli, ["traces", OTHER[:10]])
    assert other.exit_code == 0 and other.output.splitlines()[0] == f"task {OTHER} (wordcount)"


def test_command_ambiguous_and_unknown_prefixes(traces_cli: typer.Typer) -> None:
    ambiguous = CliRunner().invoke(traces_cli, ["traces", "c8bb0b53"])
    assert ambiguous.exit_code == 1
    assert ambiguous.stdout == ""
    assert ambiguous.stderr.count("\n") == 1
    assert CYCLE in ambiguous.stderr and OTHER in ambiguous.stderr and "ambiguous" in ambiguous.stderr
    unknown = CliRunner().invoke(traces_cli, ["traces", "ffff"])
    assert unknown.exit_code == 1
    assert unknown.stderr.startswith("no spans for task ffff under ") and unknown.stderr.count("\n") == 1


def test_span_node_reads_the_exported_fields() -> None:
    t = Spans()
    span = t.add("process dspy.switcher.complete", None, ms=2.5, status="ERROR", error__type="timeout")
    node = SpanNode(span)
    assert (node.subject, node.failed, node.error_text, node.is_lm_call) == (
        "dspy.switcher.complete", True, "timeout", True
    )  # fmt: skip
    assert node.duration_ms == pytest.approx(2.5)
