"""``dspyrt traces TASK_ID [--full]``: one task's spans from the local span files, as a tree that fits the console.

On top, one line for the task (duration, LM calls, errors, spans) and, for a ``cycle`` task, one line per phase.
Below, each trace's tree: sibling spans of the same name and shape are one line with their count and latency
percentiles, ``<times> N <name>  p50 …, p95 …, max …``, their children merged the same way; a span with an error
below it is never merged, and a failed span shows its error. ``--full`` prints every span. Lines are laid out for
the console's width (at most ``MAX_LAYOUT_WIDTH``): a long name loses its service, then its 32-hex ids are
shortened, then its leading subject tokens, then its middle; figures stay right-aligned.

TASK_ID may be a unique prefix of a task id found in the span files (``dspyrt.runtime.traces.resolve_task_id``).
Exit codes: 0 shown, 1 no single task matches (none, or an ambiguous prefix), 2 a configuration error.
``dspyrt.runtime.cli`` registers a command that imports this module and calls ``traces_command`` (this module reads
span files and imports the bus: ``dspyrt --help`` does not load it); ``up`` prints its example task's trace with
``print_trace(cfg, task_id, console=console)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from dspyrt.bus import DspyrtError, NotFoundError
from dspyrt.runtime.cli_common import ConfigOption, command_config
from dspyrt.runtime.cli_output import console as cli_console
from dspyrt.runtime.cli_output import err
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.stats import percentile
from dspyrt.runtime.traces import (
    AmbiguousTaskIdError,
    Figures,
    SpanGroup,
    TaskSummary,
    collapse,
    expand,
    read_spans,
    resolve_task_id,
    summarize,
    task_trees,
)

FullOption = Annotated[bool, typer.Option("--full", help="every span on a line of its own (no collapsing)")]

# Wider than this, durations far from their names are harder to read than they are useful.
MAX_LAYOUT_WIDTH = 120
ELLIPSIS = "…"
TIMES = "\N{MULTIPLICATION SIGN}"  # before a collapsed group's count
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_PHASE_LABEL = 20


def format_ms(ms: float) -> str:
    if ms < 10:
        return f"{ms:.1f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f} s"
    minutes, seconds = divmod(ms / 1000, 60)
    return f"{minutes:.0f}m {seconds:02.0f}s"


def middle_ellipsis(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters by replacing its middle with an ellipsis."""
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    tail = (width - 1) // 2
    return text[: width - 1 - tail] + ELLIPSIS + (text[-tail:] if tail else "")


def short_ids(name: str) -> str:
    """``name`` with each 32-hex id (a task or trace id) cut to its first 8 characters."""
    return _HEX_ID.sub(lambda m: m.group(0)[:8] + ELLIPSIS, name)


def shorten_name(name: str, width: int) -> str:
    """A span name in ``width`` characters, most telling part kept: 32-hex ids (task and trace ids) cut to 8, then
    the subject's leading dot-separated tokens dropped (``process …switcher.complete``), then its middle cut."""
    if len(name) <= width:
        return name
    name = short_ids(name)
    if len(name) <= width:
        return name
    operation, space, subject = name.rpartition(" ")
    tokens = subject.split(".")
    for keep in range(len(tokens) - 1, 0, -1):
        candidate = f"{operation}{space}{ELLIPSIS}{'.'.join(tokens[-keep:])}"
        if len(candidate) <= width:
            return candidate
    return middle_ellipsis(name, width)


def _figure_variants(group: SpanGroup) -> list[str]:
    """The right-hand figures, longest first: one span's duration, or a group's latency percentiles."""
    if group.count == 1:
        return [format_ms(group.first.duration_ms)]
    values = group.durations_ms
    p50, p95, top = (format_ms(v) for v in (percentile(values, 50), percentile(values, 95), max(values)))
    bare = [f.removesuffix(" ms") if f.endswith(" ms") else f for f in (p50, p95)]
    return [
        f"p50 {p50}, p95 {p95}, max {top}",
        f"p50 {bare[0]}, p95 {bare[1]}, max {top}",
        f"p50 {p50}, max {top}",
        f"p50 {p50}",
    ]


def _span_line(group: SpanGroup, guide: str, parent_service: str | None, width: int) -> Text:
    node = group.first
    mark = "✗ " if node.failed else ""
    count = f"{TIMES} {group.count} " if group.count > 1 else ""
    service = node.span.get("service")
    service_text = f"  {service}" if service and service != parent_service else ""
    variants = _figure_variants(group)
    wanted = len(short_ids(node.name))
    figures = variants[-1]  # the longest figures that leave the whole name room, else the shortest
    for variant in variants:
        if width - len(guide) - len(mark) - len(count) - len(variant) - 2 >= wanted:
            figures = variant
            break
    room = max(width - len(guide) - len(mark) - len(count) - len(figures) - 2, 1)
    if len(node.name) + len(service_text) > room:
        service_text = ""
    name = shorten_name(node.name, room)
    line = Text(guide, style="dim")
    if mark:
        line.append(mark, style="bold red")
    if count:
        line.append(count, style="bold cyan")
    line.append(name, style="red" if node.failed else "")
    line.append(service_text, style="dim")
    line.append(" " * max(width - line.cell_len - len(figures), 2))
    line.append(figures, style="dim" if group.count == 1 else "cyan")
    line.truncate(width, overflow="ellipsis")
    return line


def _tree_lines(groups: Sequence[SpanGroup], lead: str, parent_service: str | None, width: int) -> list[Text]:
    lines: list[Text] = []
    for i, group in enumerate(groups):
        last = i == len(groups) - 1
        guide = lead + ("└─ " if last else "├─ ")
        below = lead + ("   " if last else "│  ")
        lines.append(_span_line(group, guide, parent_service, width))
        node = group.first
        if node.failed:
            detail = Text(below + ("│  " if group.children else "   "), style="dim")
            detail.append(node.error_text or "status ERROR", style="red")
            detail.truncate(width, overflow="ellipsis")
            lines.append(detail)
        lines.extend(_tree_lines(group.children, below, node.span.get("service"), width))
    return lines


def _figures_text(figures: Figures) -> Text:
    text = Text(f"{format_ms(figures.duration_ms):>9}  {figures.lm_calls:>4} LM calls")
    text.append(f" ({figures.cached} cached)" if figures.cached else "")
    if figures.errors:
        text.append(f"  {figures.errors} error{'s' if figures.errors > 1 else ''}", style="bold red")
    else:
        text.append("  no errors", style="green")
    if figures.cost:
        text.append(f"  ${figures.cost:.4f}")
    if figures.runs > 1:
        text.append(f"  ({figures.runs} runs)", style="yellow")
    return text


def summary_lines(summary: TaskSummary, width: int) -> list[Text]:
    """The task's line, then one per cycle phase (a phase with no span says so)."""
    head = Text(f"task {summary.task_id}", style="bold")
    head.append(f" ({summary.kind})" if summary.kind else "")
    lines = [head]
    for phase in summary.phases:
        line = Text(f"  {phase.name:<{_PHASE_LABEL}}")
        if phase.figures is None:
            line.append(f"{'—':>9}  not in this trace", style="dim")
        else:
            line.append_text(_figures_text(phase.figures))
        lines.append(line)
    total = Text(f"  {'total':<{_PHASE_LABEL}}", style="bold")
    total.append_text(_figures_text(summary.total))
    total.append(f"  {summary.total.spans} spans", style="dim")
    lines.append(total)
    for line in lines:
        line.truncate(width, overflow="ellipsis")
    return lines


def trace_lines(spans: list[dict[str, Any]], task_id: str, *, full: bool = False, width: int = 80) -> list[Text]:
    """What ``dspyrt traces`` prints for ``task_id`` (an exact id), each line at most ``width`` cells; none
    when no span carries the id."""
    roots = task_trees(spans, task_id)
    if not roots:
        return []
    layout = max(min(width, MAX_LAYOUT_WIDTH), 1)
    lines = summary_lines(summarize(roots, task_id), layout)
    for root in roots:
        head = Text(f"trace {root.span.get('trace_id')}", style="dim")
        head.truncate(layout, overflow="ellipsis")
        lines += [Text(""), head]
        lines += _tree_lines(expand([root]) if full else collapse([root]), "", None, layout)
    return lines


def _print(console: Console, lines: Sequence[Text]) -> None:
    for line in lines:
        console.print(line, no_wrap=True, overflow="ellipsis", crop=True, highlight=False)


def print_trace(cfg: IntegrationConfig, task_id: str, *, full: bool = False, console: Console | None = None) -> bool:
    """Print the trace of ``task_id`` (an exact id) from ``cfg.state_dir``'s span files; False when it has none."""
    out = console or Console()
    lines = trace_lines(read_spans(cfg.state_dir), task_id, full=full, width=out.width)
    _print(out, lines)
    return bool(lines)


def traces_command(
    task_id: Annotated[str, typer.Argument(help="the task whose trace to show (or a unique prefix of its id)")],
    full: FullOption = False,
    config_file: ConfigOption = None,
) -> None:
    """One task's span tree from the local span files (when no OTLP collector is configured): a summary per phase,
    repeated spans collapsed (--full: every span)."""
    try:
        cfg = command_config(config_file)
    except DspyrtError as exc:
        err.print(Text.assemble(("error", "red"), f" {exc}"), soft_wrap=True)
        raise typer.Exit(2) from None
    where = cfg.state_dir / "traces"
    spans = read_spans(cfg.state_dir)
    try:
        resolved = resolve_task_id(spans, task_id)
    except NotFoundError:
        err.print(Text(f"no spans for task {task_id} under {where}"), soft_wrap=True)
        raise typer.Exit(1) from None
    except AmbiguousTaskIdError as exc:
        err.print(Text(f"task id {task_id} is ambiguous: {', '.join(exc.candidates)}"), soft_wrap=True)
        raise typer.Exit(1) from None
    _print(cli_console, trace_lines(spans, resolved, full=full, width=cli_console.width))
