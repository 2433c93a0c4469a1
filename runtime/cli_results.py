"""A submitted task's outcome in the terminal: waiting for it (a progress bar fed by its progress events) and
printing its record, a cycle's as a table of its phases.

Used by ``dspyrt submit --wait``, ``dspyrt up --example`` and ``dspyrt tasks show`` (a cycle's table).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from dspyrt.runtime.cli_common import print_error
from dspyrt.runtime.cli_output import console, err, print_table

if TYPE_CHECKING:
    from dspyrt.bus import TaskRecord
    from dspyrt.runtime.client import Client


async def follow(
    client: Client,
    task_id: str,
    timeout: float | None,
    *,
    notice_after: float | None = None,
    progress: bool = True,
) -> TaskRecord:
    """Wait for a task, with a progress bar fed by its progress events (unless ``progress`` is false).

    With ``notice_after``, say on stderr when no worker has picked the task up after that many seconds. After
    ``timeout`` seconds ``TimeoutError`` (the task itself goes on)."""
    import anyio
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=err, transient=True, disable=not progress,
    ) as bar:  # fmt: skip
        row = bar.add_task(f"{task_id} pending", total=None)
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                try:
                    async for event in client.progress(task_id):
                        d = event.data
                        label = str(d.get("phase", "working"))
                        if d.get("best_score") is not None:
                            label += f" best={d['best_score']}"
                        bar.update(row, description=label, completed=d.get("step") or 0, total=d.get("total"))
                except Exception as exc:  # the bar is a hint: losing it must not end the wait
                    logging.getLogger("dspyrt.cli").debug("progress of %s not followed: %s", task_id, exc)

            async def notice(after: float) -> None:
                await anyio.sleep(after)
                try:
                    record = await client.task(task_id)
                except Exception:  # the notice is a hint: a failed read must not end the wait
                    return
                if record.status.value == "pending" and not record.attempts:
                    err.print(
                        f"[yellow]notice[/yellow] no worker has picked up task {task_id} in {after:g}s: "
                        f"no worker may be serving kind {record.kind!r} (is its agent running? see 'dspyrt status'). "
                        + ("Still waiting." if timeout is None else f"Waiting up to {timeout:g}s in all.")
                    )

            if progress:
                tg.start_soon(watch)
            if notice_after:
                tg.start_soon(notice, notice_after)
            try:
                outcome: TaskRecord | Exception = await client.result(task_id, timeout=timeout)
            except Exception as exc:
                # Raised outside the task group, which would wrap it in an ExceptionGroup (a timeout, a DspyrtError
                # would no longer be told apart by the caller).
                outcome = exc
            tg.cancel_scope.cancel()
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def print_record(record: TaskRecord, as_json: bool) -> None:
    """A finished task: its status line, the result (a cycle's as a table); a failed task's error as one line on
    stderr, with every field error."""
    if as_json:
        console.print_json(record.model_dump_json())
        return
    colour = {"succeeded": "green", "failed": "red", "dead": "red"}.get(record.status.value, "yellow")
    console.print(
        f"task {record.id} [{colour}]{record.status.value}[/{colour}] after {record.attempts} attempt(s)",
        soft_wrap=True,
    )
    if record.error:
        print_error(record.error.code, record.error.message, record.error.field_errors)
    if isinstance(record.result, dict) and is_cycle(record.result):
        print_cycle(record.result)
    elif record.result is not None:
        console.print_json(json.dumps(record.result, default=str))


def is_cycle(result: dict[str, Any]) -> bool:
    """Whether a task's result is a cycle's (``FourPartOptimizationLoop``'s: a verdict over a baseline)."""
    return "verdict" in result and "baseline" in result


def coverage(evaluation: dict[str, Any]) -> str:
    """``, 2 errors (coverage 95.0%)`` when some examples' LM calls failed; nothing when all were answered."""
    errors = evaluation.get("errors") or 0
    return f", {errors} errors (coverage {evaluation.get('coverage', 1.0):.1%})" if errors else ""


def _improvement(result: dict[str, Any]) -> str:
    """`` (+20 points over the baseline)``: the cycle's ``improvement_score`` (optimized - baseline, percentage
    points, as the cycle computed it); nothing when the result has none."""
    value = result.get("improvement_score")
    return f" ({value:+g} points over the baseline)" if isinstance(value, int | float) else ""


def _optimization_outcome(opt: dict[str, Any]) -> str:
    """``LabeledFewShot on demo/fewshot: succeeded, 3 LM calls``; a cache hit: ``..., cached, 0 LM calls``."""
    head = f"{opt.get('optimizer')} on {opt.get('model')}: {opt.get('status')}"
    if opt.get("cached"):
        return f"{head}, cached, {opt.get('lm_calls', 0)} LM calls"
    calls = f"{head}, {opt.get('lm_calls')} LM calls"
    return calls + (f" ({opt['cached_calls']} from the cache)" if opt.get("cached_calls") else "")


def _deploy_outcome(verdict: dict[str, Any]) -> str:
    if not verdict.get("deployed"):
        return "[red]rejected[/red]"
    if verdict.get("unchanged"):
        return f"[green]unchanged: already deployed as v{verdict.get('version')}[/green]"
    return f"[green]deployed v{verdict.get('version')}{' as canary' if verdict.get('canary') else ''}[/green]"


def print_cycle(result: dict[str, Any], *, to: Console | None = None) -> None:
    """A cycle's outcome in a few lines (``--json`` has everything, per-example results included)."""
    target = to or console
    opt = result.get("optimization") or {}
    optimized = result.get("optimized") or {}
    baseline = result.get("baseline") or {}
    table = Table("phase", Column("runs", justify="right"), "outcome")
    table.add_row(
        "create", str(result["phase_runs"].get("create", 0)), f"program {result['create']['program_hash'][:12]}"
    )
    table.add_row(
        "evaluate (baseline)",
        str(result["phase_runs"].get("evaluate_baseline", 0)),
        f"score {baseline.get('score')} on {baseline.get('examples')} examples in {baseline.get('shards')} shards"
        + coverage(baseline),
    )
    table.add_row("optimize", str(result["phase_runs"].get("optimize", 0)), _optimization_outcome(opt))
    if optimized:
        table.add_row(
            "evaluate (optimized)",
            str(result["phase_runs"].get("evaluate_optimized", 0)),
            f"score {optimized.get('score')}{_improvement(result)}, p95 {optimized.get('latency_p95_ms')} ms"
            + coverage(optimized),
        )
    validation = result.get("validation")
    if validation:
        table.add_row(
            "validate",
            str(result["phase_runs"].get("validate", 0)),
            f"{'passed' if validation.get('passed') else 'FAILED'} ({', '.join(validation.get('counts', {}))})",
        )
    verdict = result["verdict"]
    table.add_row("deploy", str(result["phase_runs"].get("deploy", 0)), _deploy_outcome(verdict))
    print_table(table, to=target)
    if result.get("mixed_models"):
        used = ", ".join(f"{m} ({n})" for m, n in sorted((result.get("models_used") or {}).items()))
        target.print(f"  [yellow]![/yellow] more than one model answered: {used}")
    for reason in verdict.get("reasons", []):
        target.print(f"  [red]✗[/red] {escape(str(reason))}")
