"""Reading the local span files (``<state_dir>/traces/spans-*.jsonl``) back into one task's span tree."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASK_ATTRIBUTES = ("dspyrt.task.id", "messaging.message.id")


@dataclass
class SpanNode:
    span: dict[str, Any]
    children: list[SpanNode] = field(default_factory=list)

    @property
    def duration_ms(self) -> float:
        start, end = self.span.get("start") or 0, self.span.get("end") or 0
        return (end - start) / 1e6 if end and start else 0.0


def read_spans(state_dir: Path) -> list[dict[str, Any]]:
    spans: list[dict[str, Any]] = []
    for path in sorted((state_dir / "traces").glob("spans-*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    spans.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by a crash
    return spans


def task_trees(spans: list[dict[str, Any]], task_id: str) -> list[SpanNode]:
    """The span trees of every trace that touched ``task_id``, roots first by start time."""
    traces = {
        s["trace_id"]
        for s in spans
        if any((s.get("attributes") or {}).get(attr) == task_id for attr in TASK_ATTRIBUTES)
    }
    members = sorted((s for s in spans if s.get("trace_id") in traces), key=lambda s: s.get("start") or 0)
    nodes = {s["span_id"]: SpanNode(s) for s in members}
    roots: list[SpanNode] = []
    for node in nodes.values():
        parent = nodes.get(node.span.get("parent_id") or "")
        (parent.children if parent else roots).append(node)
    return roots
