"""Reading the local span files (``<state_dir>/traces/spans-*.jsonl``) back into one task's span tree.

Besides the tree itself (``task_trees``), what ``dspyrt traces`` shows is derived here, with no rendering:

- ``resolve_task_id``: a task id or a unique prefix of one, looked up among the task ids the spans carry;
- ``collapse``: sibling spans of the same name and the same shape of children merged into one ``SpanGroup``
  (a span whose subtree holds an error is never merged: it stays a group of its own);
- ``summarize``: a task's duration, LM calls and errors, and for a ``cycle`` task the same per phase.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dspyrt.bus import DspyrtError, NotFoundError

TASK_ATTRIBUTES = ("dspyrt.task.id", "messaging.message.id")
ERROR_STATUS = "ERROR"
# The switcher's ``complete`` endpoint answers every LM call of the agents (agents/switcher/agent.py); its process span
# carries the model, the tokens, the cost and ``dspyrt.lm.source`` (``cache`` or ``provider``).
LM_CALL_SUBJECT_SUFFIX = ".switcher.complete"
CYCLE_KIND = "cycle"


@dataclass
class SpanNode:
    span: dict[str, Any]
    children: list[SpanNode] = field(default_factory=list)

    @property
    def duration_ms(self) -> float:
        start, end = self.span.get("start") or 0, self.span.get("end") or 0
        return (end - start) / 1e6 if end and start else 0.0

    @property
    def name(self) -> str:
        return str(self.span.get("name") or "")

    @property
    def start(self) -> int:
        return int(self.span.get("start") or 0)

    @property
    def attributes(self) -> dict[str, Any]:
        return self.span.get("attributes") or {}

    @property
    def subject(self) -> str:
        """The NATS subject of a ``send``/``process`` span (else the span's name)."""
        return str(self.attributes.get("messaging.destination.name") or self.name.partition(" ")[2] or self.name)

    @property
    def failed(self) -> bool:
        return self.span.get("status") == ERROR_STATUS

    @property
    def error_text(self) -> str:
        """What is known of a failed span's error: ``error.type`` and the status message, when recorded."""
        kind = self.attributes.get("error.type")
        message = self.span.get("status_message") or self.span.get("status_description")
        return ": ".join(str(part) for part in (kind, message) if part)

    @property
    def is_lm_call(self) -> bool:
        return self.name.startswith("process ") and self.subject.endswith(LM_CALL_SUBJECT_SUFFIX)

    def walk(self) -> Iterator[SpanNode]:
        """This span and every span below it."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))


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


def _task_id_of(span: dict[str, Any]) -> Iterator[str]:
    attributes = span.get("attributes") or {}
    for attr in TASK_ATTRIBUTES:
        value = attributes.get(attr)
        if isinstance(value, str) and value:
            yield value


def task_trees(spans: list[dict[str, Any]], task_id: str) -> list[SpanNode]:
    """The span trees of every trace that touched ``task_id``, roots first by start time."""
    traces = {s["trace_id"] for s in spans if task_id in _task_id_of(s)}
    members = sorted((s for s in spans if s.get("trace_id") in traces), key=lambda s: s.get("start") or 0)
    nodes = {s["span_id"]: SpanNode(s) for s in members}
    roots: list[SpanNode] = []
    for node in nodes.values():
        parent = nodes.get(node.span.get("parent_id") or "")
        (parent.children if parent else roots).append(node)
    return roots


# ------------------------------------------------------------------------------------------ task ids


class AmbiguousTaskIdError(DspyrtError):
    """A task id prefix that more than one task's id starts with."""

    code = "ambiguous_task_id"

    def __init__(self, prefix: str, candidates: Iterable[str]) -> None:
        self.prefix = prefix
        self.candidates = tuple(sorted(candidates))
        super().__init__(f"{len(self.candidates)} tasks start with {prefix}: {', '.join(self.candidates)}")


def task_ids(spans: Iterable[dict[str, Any]]) -> set[str]:
    """Every task id the spans carry (``dspyrt.task.id`` on a task's process span, the message id on its send)."""
    return {task_id for span in spans for task_id in _task_id_of(span)}


def resolve_task_id(spans: Iterable[dict[str, Any]], prefix: str) -> str:
    """The one task id among the spans' that is ``prefix`` or starts with it.

    A phase task's id extends its cycle's (``<cycle id>-base``, ``-opt``, ``-opt-eval``): when one of the matches
    is a prefix of every other match, that one (the cycle) is meant. Raises ``NotFoundError`` when no id matches and
    ``AmbiguousTaskIdError`` when several unrelated ones do.
    """
    known = task_ids(spans)
    if prefix in known:
        return prefix
    matches = sorted((t for t in known if prefix and t.startswith(prefix)), key=lambda t: (len(t), t))
    if not matches:
        raise NotFoundError(f"no task id starts with {prefix}")
    if all(t.startswith(matches[0]) for t in matches):
        return matches[0]
    raise AmbiguousTaskIdError(prefix, matches)


# ------------------------------------------------------------------------------------------ collapsing


@dataclass
class SpanGroup:
    """Sibling spans shown as one line: one span, or several of the same name and shape of children.

    ``children`` are the groups made of every member's children together.
    """

    nodes: list[SpanNode]
    children: list[SpanGroup] = field(default_factory=list)

    @property
    def first(self) -> SpanNode:
        return self.nodes[0]

    @property
    def count(self) -> int:
        return len(self.nodes)

    @property
    def durations_ms(self) -> list[float]:
        return [n.duration_ms for n in self.nodes]


def collapse(nodes: Sequence[SpanNode]) -> list[SpanGroup]:
    """Group ``nodes`` (siblings) and, recursively, their children: same name and same set of child shapes merge.

    The shape ignores how often a child repeats (a shard of five LM calls merges with one of three). A span with
    an error anywhere in its subtree stays on its own, so the failure and its path are always shown. Groups are in
    the order of their first span's start.
    """
    shapes: dict[int, Hashable] = {}
    failing: dict[int, bool] = {}

    def shape(node: SpanNode) -> Hashable:
        key = id(node)
        if key not in shapes:
            shapes[key] = (node.name, frozenset(shape(c) for c in node.children))
        return shapes[key]

    def has_error(node: SpanNode) -> bool:
        key = id(node)
        if key not in failing:
            failing[key] = node.failed or any(has_error(c) for c in node.children)
        return failing[key]

    def group(pool: list[SpanNode]) -> list[SpanGroup]:
        entries: list[list[SpanNode]] = []
        by_shape: dict[Hashable, list[SpanNode]] = {}
        for node in sorted(pool, key=lambda n: n.start):
            if has_error(node):
                entries.append([node])
                continue
            members = by_shape.get(shape(node))
            if members is None:
                members = by_shape[shape(node)] = []
                entries.append(members)
            members.append(node)
        return [SpanGroup(members, group([c for m in members for c in m.children])) for members in entries]

    return group(list(nodes))


def expand(nodes: Sequence[SpanNode]) -> list[SpanGroup]:
    """Every span a group of its own (``dspyrt traces --full``), in start order."""
    return [SpanGroup([n], expand(n.children)) for n in sorted(nodes, key=lambda n: n.start)]


# ------------------------------------------------------------------------------------------ summaries

# The phases of a cycle, each recognised by the request or task the coordinator sends for it (agents/loop/cycle.py,
# BusPhases): (label, subject suffix, task id suffix appended to the cycle's id or None for a request).
CYCLE_PHASES: tuple[tuple[str, str, str | None], ...] = (
    ("create", ".loop-create.create", None),
    ("evaluate baseline", ".task.evaluate", "-base"),
    ("optimize", ".task.optimize", "-opt"),
    ("evaluate optimized", ".task.evaluate", "-opt-eval"),
    ("validate", ".assertions.validate", None),
    ("deploy", ".loop-deploy.deploy", None),
)


@dataclass
class Figures:
    """Duration, span count, LM calls (and how many the cache answered), errors and LM cost of some spans."""

    duration_ms: float = 0.0
    spans: int = 0
    lm_calls: int = 0
    cached: int = 0
    errors: int = 0
    cost: float = 0.0
    runs: int = 0

    def add(self, top: SpanNode) -> None:
        """Count ``top``'s subtree; its duration runs from its start to the last end below it."""
        end = top.start
        for node in top.walk():
            end = max(end, int(node.span.get("end") or 0))
            self.spans += 1
            self.errors += node.failed
            if node.is_lm_call:
                self.lm_calls += 1
                self.cached += node.attributes.get("dspyrt.lm.source") == "cache"
                cost = node.attributes.get("dspyrt.lm.cost")
                self.cost += float(cost) if isinstance(cost, int | float) else 0.0
        self.duration_ms += (end - top.start) / 1e6 if top.start else 0.0
        self.runs += 1


@dataclass
class PhaseSummary:
    name: str
    figures: Figures | None  # None: no span of this phase in the trace (skipped, or not reached)


@dataclass
class TaskSummary:
    task_id: str
    kind: str | None
    total: Figures
    phases: list[PhaseSummary] = field(default_factory=list)


def _kind(node: SpanNode) -> str | None:
    head, sep, kind = node.subject.rpartition(".task.")
    return kind if sep and head and "." not in kind else None


def summarize(roots: Sequence[SpanNode], task_id: str) -> TaskSummary:
    """The task's figures (over the subtrees of the spans carrying its id) and, for a cycle, each phase's."""
    carrying = [n for root in roots for n in root.walk() if task_id in _task_id_of(n.span)]
    tops: list[SpanNode] = []
    below: set[int] = set()
    for node in sorted(carrying, key=lambda n: n.start):
        if id(node) not in below:
            tops.append(node)
            below.update(id(n) for n in node.walk())
    total = Figures()
    for top in tops:
        total.add(top)
    start = min((n.start for n in tops), default=0)
    end = max((int(n.span.get("end") or 0) for top in tops for n in top.walk()), default=0)
    total.duration_ms = (end - start) / 1e6 if start and end > start else 0.0
    total.runs = sum(1 for n in carrying if n.name.startswith("process "))
    kind = next((k for n in carrying if (k := _kind(n))), None)
    summary = TaskSummary(task_id, kind, total)
    if kind != CYCLE_KIND:
        return summary
    attempts = [n for n in carrying if n.name.startswith("process ") and _kind(n) == CYCLE_KIND]
    for label, suffix, id_suffix in CYCLE_PHASES:
        figures: Figures | None = None
        for attempt in attempts:
            for child in attempt.children:
                if not child.subject.endswith(suffix):
                    continue
                if id_suffix is not None and f"{task_id}{id_suffix}" not in _task_id_of(child.span):
                    continue
                figures = figures or Figures()
                figures.add(child)
        summary.phases.append(PhaseSummary(label, figures))
    return summary
