"""``dspyrt tasks``: recent tasks (the group's own listing, ``dspyrt tasks``), and ``dspyrt tasks show ID``.

``show`` prints one task's record as it is stored: its status, attempts, error and result (for a result too large
for the record, where it was put and its size, with the summary the record keeps). ``show --examples`` pages the
per-example results of an evaluation: an ``evaluate`` task's, or a ``cycle``'s optimized (``--phase baseline``:
its baseline) evaluation. An evaluation holds them inline (``results``, a list of ``ExampleResult`` objects) or
claim-checked (``results_ref``, an :class:`~dspyrt.bus.claims.ObjectRef` to a JSON Lines object in the results store,
one ``ExampleResult`` per line in index order), read here with :class:`~dspyrt.bus.claims.ClaimStore`.

Exit codes as for ``dspyrt datasets``: 1 the command failed (an unknown task, no such results), 2 a usage error
or no NATS reachable. ``dspyrt.runtime.cli`` registers ``tasks_app``.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Column, Table
from rich.text import Text

from dspyrt.runtime.cli_common import ConfigOption, JsonOption, error_line, with_client
from dspyrt.runtime.cli_output import cell, clip, console, listing, plural, print_table, size, when
from dspyrt.runtime.cli_results import coverage, is_cycle, print_cycle

if TYPE_CHECKING:  # the bus is imported by the commands: runtime.cli starts without it (NATS)
    from dspyrt.bus import TaskRecord
    from dspyrt.bus.claims import ObjectRef
    from dspyrt.runtime.client import Client

DEFAULT_EXAMPLES = 20
# Lists longer than this are shown as their length in a result's summary (--json has them whole).
SUMMARY_LIST_ITEMS = 10
SUMMARY_STRING_CHARS = 200

WideOption = Annotated[bool, typer.Option("--wide", help="the table at its full width: one line per task")]


class Phase(StrEnum):
    """A cycle's evaluations."""

    BASELINE = "baseline"
    OPTIMIZED = "optimized"


@dataclass(frozen=True)
class _GroupOptions:
    """The group's own options, for a subcommand given none of its own (``dspyrt tasks -c x.toml show ID``)."""

    config_file: Path | None
    as_json: bool


tasks_app = typer.Typer(invoke_without_command=True)


@tasks_app.callback()
def tasks_command(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="how many")] = 20,
    as_json: JsonOption = False,
    wide: WideOption = False,
    config_file: ConfigOption = None,
) -> None:
    """Recent tasks and their status; 'dspyrt tasks show ID' for one of them (ID: the id, or a unique prefix)."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = _GroupOptions(config_file, as_json)
        return

    async def body(client: Client) -> None:
        records = await client.tasks(limit)
        if as_json:
            console.print_json(json.dumps([r.model_dump(mode="json", exclude={"result"}) for r in records]))
            return
        if not records:
            console.print("no tasks yet (submit one: dspyrt submit KIND FILE)")
            return
        # The id is what `tasks show`, `traces` and `dlq --replay` take: never cut (nor a kind or a status).
        table = listing(Column("id", no_wrap=True), Column("kind", no_wrap=True), Column("status", no_wrap=True),
                        Column("tries", justify="right", no_wrap=True), Column("updated", no_wrap=True),
                        "error")  # fmt: skip
        for r in records:
            updated = time.strftime("%H:%M:%S", time.localtime(r.updated_at))
            table.add_row(r.id, r.kind, r.status.value, str(r.attempts), updated, r.error.code if r.error else "")
        print_table(table, wide=wide)

    with_client(config_file, body)


# ------------------------------------------------------------------------------------------------ show


async def stored_record(client: Client, task_id: str) -> TaskRecord:
    """The record as stored (a claim-checked result stays in the object store); through the gateway, what it
    shows. ``task_id`` may be a unique prefix of the id (``Client.resolve_task_id``)."""
    from dspyrt.bus import NotFoundError

    task_id = await client.resolve_task_id(task_id)
    if client.gateway is not None:
        return await client.task(task_id)
    record = await client.store.get(task_id)
    if record is None:
        raise NotFoundError(f"no task with id {task_id}")
    return record


@tasks_app.command("show")
def show_command(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(metavar="ID", help="the task's id, or a unique prefix of it")],
    examples: Annotated[
        bool, typer.Option("--examples", help="page the per-example results of an evaluate task or a cycle")
    ] = False,
    offset: Annotated[int, typer.Option("--offset", min=0, help="with --examples: the first one to show")] = 0,
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=10_000, help="with --examples: how many to show")
    ] = DEFAULT_EXAMPLES,
    phase: Annotated[
        Phase | None,
        typer.Option("--phase", help="with --examples, for a cycle: which evaluation (default: optimized)"),
    ] = None,
    as_json: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """One task: status, kind, attempts, error and result; --examples pages an evaluation's per-example results."""
    group = ctx.obj if isinstance(ctx.obj, _GroupOptions) else _GroupOptions(None, False)
    config_file = config_file or group.config_file
    as_json = as_json or group.as_json
    if not examples and (offset or limit != DEFAULT_EXAMPLES or phase is not None):
        raise typer.BadParameter("--offset, --limit and --phase page the per-example results: add --examples")
    if examples:
        _show_examples(task_id, offset, limit, phase, as_json, config_file)
        return
    record = with_client(config_file, lambda client: stored_record(client, task_id), failure_exit=1)
    if as_json:
        console.print_json(record.model_dump_json())
        return
    _print_record(record)


def _print_record(record: TaskRecord) -> None:
    from dspyrt.bus import TaskStatus

    colour = {"succeeded": "green", "failed": "red", "dead": "red"}.get(record.status.value, "yellow")
    console.print(
        f"task {escape(record.id)} [bold]{escape(record.kind)}[/bold] [{colour}]{record.status.value}[/{colour}] "
        f"after {plural(record.attempts, 'attempt')}",
        soft_wrap=True,
    )
    facts = Table.grid(padding=(0, 2))
    by = f" by {record.submitted_by}" if record.submitted_by else ""
    facts.add_row("  submitted", Text(when(record.submitted_at) + by))
    facts.add_row("  updated", when(record.updated_at))
    if record.worker:
        facts.add_row("  worker", Text(record.worker))
    if record.trace_id:
        facts.add_row("  trace", record.trace_id)
    if record.error:
        error = record.error
        facts.add_row("  error", Text(error_line(error.code, error.message, error.field_errors)))
    if record.result_ref is not None:
        ref = record.result_ref
        kept = "its summary below" if record.result is not None else "no summary kept in the record"
        where = f"claim-checked: {ref.name} in object store {ref.store}, {size(ref.size)}"
        facts.add_row("  result", Text(f"{where} ({kept})"))
    elif record.result is None and record.status is TaskStatus.SUCCEEDED:
        facts.add_row("  result", "none")
    console.print(facts)
    result = record.result
    claim_checked = record.result_ref is not None
    if isinstance(result, dict) and is_cycle(result):
        if not _print_cycle(result):
            _print_summary(result)
        used = result.get("datasets")
        if isinstance(used, dict) and used:
            console.print(Text("  datasets: " + "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in used.items())))
        for p in Phase:
            evaluation = result.get(p.value)
            if isinstance(evaluation, dict):
                console.print(Text(f"  {p.value} examples: {_where(evaluation, claim_checked)}"))
    elif isinstance(result, dict) and _is_evaluation(result):
        console.print(Text(f"  {_evaluation_line(result)}"))
        if result.get("dataset"):
            console.print(Text(f"  dataset: {result['dataset']}"))
        console.print(Text(f"  examples: {_where(result, claim_checked)}"))
    elif result is not None:
        _print_summary(result)
    if record.kind in ("evaluate", "cycle") and record.status is TaskStatus.SUCCEEDED:
        console.print(f"per-example results: dspyrt tasks show {record.id} --examples", highlight=False, soft_wrap=True)


def _is_evaluation(result: dict[str, Any]) -> bool:
    return "results" in result or "results_ref" in result


def _print_cycle(result: dict[str, Any]) -> bool:
    """A cycle's table (``cli_results.print_cycle``); False when the result (a summary) lacks what it needs."""
    try:
        print_cycle(result)
    except (KeyError, TypeError, AttributeError):
        return False
    return True


def _evaluation_line(evaluation: dict[str, Any]) -> str:
    model = f" with {evaluation['model']}" if evaluation.get("model") else ""
    return f"score {evaluation.get('score')} on {evaluation.get('examples')} examples{model}{coverage(evaluation)}"


def _where(evaluation: dict[str, Any], claim_checked: bool) -> str:
    """Where an evaluation's per-example results are (``claim_checked``: the record keeps a summary of the result)."""
    ref = evaluation.get("results_ref")
    if isinstance(ref, dict) and ref.get("name"):
        return f"claim-checked: {ref['name']} in object store {ref.get('store')}, {size(int(ref.get('size') or 0))}"
    results = evaluation.get("results")
    if isinstance(results, list):
        return f"{len(results)} inline"
    return "in the claim-checked result" if claim_checked else "none"


def _print_summary(result: Any) -> None:
    console.print_json(json.dumps(_collapsed(result), default=str))


def _collapsed(value: Any) -> Any:
    """A result for reading: long lists become their length, long strings are clipped (--json has them whole)."""
    if isinstance(value, dict):
        return {k: _collapsed(v) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) > SUMMARY_LIST_ITEMS:
            return f"<{len(value)} items>"
        return [_collapsed(v) for v in value]
    if isinstance(value, str) and len(value) > SUMMARY_STRING_CHARS:
        return value[: SUMMARY_STRING_CHARS - 1] + "…"
    return value


# -------------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class ExamplesPage:
    """Rows ``[offset, offset + len(rows))`` of ``total`` per-example results, and where they were read."""

    rows: list[dict[str, Any]]
    total: int
    where: str
    what: str  # "evaluate task ID", "optimized evaluation of cycle ID"


def evaluation_of(record: TaskRecord, result: Any, phase: Phase | None) -> tuple[dict[str, Any], str]:
    """The evaluation a task's (whole) result holds, and what it is, for ``--examples``."""
    from dspyrt.bus import DspyrtError, TaskStatus

    if record.status is not TaskStatus.SUCCEEDED:
        error = f" ({record.error.code}: {record.error.message})" if record.error else ""
        raise DspyrtError(f"task {record.id} is {record.status.value}{error}: it has no results", code="no_results")
    if isinstance(result, dict) and (record.kind == "cycle" or is_cycle(result)):
        chosen = phase or Phase.OPTIMIZED
        evaluation = result.get(chosen.value)
        if not isinstance(evaluation, dict):
            other = " (try --phase baseline)" if chosen is Phase.OPTIMIZED else ""
            raise DspyrtError(f"cycle {record.id} has no {chosen.value} evaluation{other}", code="no_results")
        return evaluation, f"{chosen.value} evaluation of cycle {record.id}"
    if phase is not None:
        raise DspyrtError(f"--phase is for cycle tasks; task {record.id} is a {record.kind} task", code="no_results")
    if isinstance(result, dict) and _is_evaluation(result):
        return result, f"{record.kind} task {record.id}"
    raise DspyrtError(
        f"task {record.id} ({record.kind}) has no per-example results: an evaluate task or a cycle has",
        code="no_results",
    )


async def examples_page(client: Client, evaluation: dict[str, Any], offset: int, limit: int, what: str) -> ExamplesPage:
    """Per-example results ``[offset, offset + limit)`` of an evaluation: inline, or from the claim-checked JSON
    Lines object (downloaded to a temporary file and checked against its sha256; only the page's lines are
    parsed)."""
    import anyio
    from pydantic import ValidationError

    from dspyrt.bus import DspyrtError
    from dspyrt.bus.claims import ClaimStore, ObjectRef

    raw_ref = evaluation.get("results_ref")
    if raw_ref:
        try:
            ref = ObjectRef.model_validate(raw_ref)
        except ValidationError as exc:
            raise DspyrtError(f"the {what} names its results oddly: {raw_ref!r}", code="invalid_result") from exc
        if client.gateway is not None:
            raise DspyrtError(
                f"the {what} keeps its per-example results in object store {ref.store}: reading them needs "
                "JetStream access (a user other than the gateway's clients, such as admin)",
                code="invalid_config",
            )
        claims = await ClaimStore.open(client.bus)
        # Downloaded to a temporary file rather than held: the object may be hundreds of megabytes.
        with tempfile.TemporaryDirectory(prefix="dspyrt-examples-") as tmp:
            path = Path(tmp) / "results.jsonl"
            await claims.download(ref, path)  # checked against its sha256
            rows, total = await anyio.to_thread.run_sync(_page_of_file, path, ref, offset, limit)
        return ExamplesPage(rows, total, f"{ref.name} in object store {ref.store}, {size(ref.size)}", what)
    results = evaluation.get("results")
    if not isinstance(results, list):
        raise DspyrtError(f"the {what} has no per-example results", code="no_results")
    return ExamplesPage(results[offset : offset + limit], len(results), "inline in the task's result", what)


def _page_of_file(path: Path, ref: ObjectRef, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Lines ``[offset, offset + limit)`` of a downloaded JSON Lines object, parsed, and how many lines it has."""
    from dspyrt.bus import DspyrtError

    rows: list[dict[str, Any]] = []
    total = 0
    with path.open("rb") as source:
        for line in source:
            if not line.strip():
                continue
            if offset <= total < offset + limit:
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    message = f"{ref.name} in {ref.store}: line {total + 1} is not JSON ({exc})"
                    raise DspyrtError(message, code="invalid_result") from exc
            total += 1
    return rows, total


def _show_examples(
    task_id: str, offset: int, limit: int, phase: Phase | None, as_json: bool, config_file: Path | None
) -> None:
    async def body(client: Client) -> tuple[ExamplesPage, str]:
        record = await stored_record(client, task_id)
        evaluation, what = evaluation_of(record, await client.full_result(record), phase)
        return await examples_page(client, evaluation, offset, limit, what), record.id

    page, full_id = with_client(config_file, body, failure_exit=1)
    if as_json:
        console.print_json(json.dumps(page.rows))
        return
    if not page.rows:
        console.print(f"no examples from {offset} on: the {page.what} has {page.total}", highlight=False)
        return
    table = Table("index", "score", "error", "latency ms", "outputs")
    for row in page.rows:
        score = row.get("score")
        error = str(row.get("error") or "")
        if row.get("call_failed"):  # left out of the score, counted against coverage
            score, error = "not scored", f"LM call failed: {error}"
        table.add_row(
            str(row.get("index", "")),
            f"{score:g}" if isinstance(score, int | float) else cell(score),
            Text(clip(error, 40)),
            f"{row.get('latency_ms', 0):.1f}" if isinstance(row.get("latency_ms"), int | float) else "",
            cell(row.get("outputs")),
        )
    console.print(table)
    last = offset + len(page.rows)
    console.print(Text(f"examples {offset}-{last - 1} of {page.total}, the {page.what} ({page.where})"), soft_wrap=True)
    if last < page.total:
        more = (f" --limit {limit}" if limit != DEFAULT_EXAMPLES else "") + (
            f" --phase {phase.value}" if phase is not None else ""
        )
        console.print(Text(f"next page: dspyrt tasks show {full_id} --examples --offset {last}{more}"), soft_wrap=True)
