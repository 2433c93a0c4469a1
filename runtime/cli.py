"""``dspyrt``: run the system, submit tasks, look at it.

Commands other than ``up`` and ``agent`` find a system started by ``dspyrt up`` in the same folder (through
``<state_dir>/system.json``) or use the configured NATS URLs; with nothing reachable they say so and exit 2.

Errors are one line on stderr, ``error <code>: <message>`` (a validation error lists every field error); the
global ``--debug`` option (``dspyrt --debug submit ...``) prints the traceback too. Exit codes: 0 done; 1 a task
or command that ran and failed (and what each command's docstring says); 2 a usage or input error (a missing
file, bad JSON, a task file of another kind), a configuration error or no NATS reachable; 124 ``submit --wait``
timed out; 130 interrupted.

Startup time is every command's cost: this module and the ``cli_*`` modules it registers import only typer, rich
and the standard library at module level. NATS (``bus``), the configuration, telemetry and DSPy are imported by
the commands that use them (``tests/test_cli_errors.py`` checks that ``--help`` imports none of them).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import sys
import time
import traceback
import types
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich import box
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Column, Table

from dspyrt.runtime.cli_dashboard import dashboard_command
from dspyrt.runtime.cli_datasets import datasets_app
from dspyrt.runtime.cli_feedback import feedback_command, predictions_command
from dspyrt.runtime.cli_lm_cache import lm_cache_command
from dspyrt.runtime.cli_optimizers import optimizers_command
from dspyrt.runtime.cli_roles import roles_app
from dspyrt.runtime.cli_tasks import tasks_app

if TYPE_CHECKING:
    from dspyrt.bus import DspyrtError, TaskRecord
    from dspyrt.runtime.client import Client
    from dspyrt.runtime.config import IntegrationConfig
    from dspyrt.runtime.supervisor import RunningSystem

app = typer.Typer(
    help="DSPy program optimization as a service, on NATS.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # --debug tracebacks must not print configuration secrets
)
console = Console()
err = Console(stderr=True)
T = TypeVar("T")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML configuration file (else dspyrt.toml if present)")
]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]
WideOption = Annotated[bool, typer.Option("--wide", help="tables at their full width: one line per row, ids whole")]

# Field errors listed in an error line; the rest are counted.
MAX_LISTED_FIELD_ERRORS = 20
# An example of what predict's INPUTS look like, clipped to this many characters of what was given.
INPUT_EXAMPLE_CHARS = 40


@dataclass
class _GlobalOptions:
    debug: bool = False


options = _GlobalOptions()


@app.callback()
def _global_options(
    debug: Annotated[
        bool, typer.Option("--debug", help="on an error, print its traceback too (else one line: error <code>: ...)")
    ] = False,
) -> None:
    """DSPy program optimization as a service, on NATS."""
    options.debug = debug


# --------------------------------------------------------------------------------------- errors


def error_line(code: str, message: str, field_errors: Sequence[Any] = ()) -> str:
    """``<code>: <message>``, followed by every field error (``loc: message``), up to MAX_LISTED_FIELD_ERRORS.

    ``field_errors`` are ``FieldError``s or their JSON dicts. A message that names the first field error in
    parentheses at its end (``dspyrt.bus.messages.decode``'s) names it once."""
    listed = [
        f"{fe.get('loc')}: {fe.get('message')}" if isinstance(fe, dict) else f"{fe.loc}: {fe.message}"
        for fe in field_errors
    ]
    if listed:
        first = f" ({listed[0]})"
        if message.endswith(first):
            message = message[: -len(first)]
        more = len(listed) - MAX_LISTED_FIELD_ERRORS
        message += ": " + "; ".join(listed[:MAX_LISTED_FIELD_ERRORS]) + (f"; and {more} more" if more > 0 else "")
    return f"{code}: {message}"


def print_error(code: str, message: str, field_errors: Sequence[Any] = ()) -> None:
    """One line on stderr: ``error <code>: <message>`` (never wrapped, no markup read in it)."""
    err.print(f"[red]error[/red] {escape(error_line(code, message, field_errors))}", soft_wrap=True, highlight=False)


def report(exc: DspyrtError) -> None:
    """A DspyrtError as one line (after its traceback with ``--debug``)."""
    if options.debug:
        traceback.print_exception(exc)
    print_error(exc.code, exc.message, getattr(exc, "field_errors", None) or ())


def _dspyrt_error(exc: BaseException) -> DspyrtError | None:
    """``exc`` if it is a DspyrtError, or the one inside exception groups of a single exception (task groups')."""
    from dspyrt.bus import DspyrtError

    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, DspyrtError) else None


@contextmanager
def one_line_errors(exit_code: int = 2) -> Iterator[None]:
    """Within the block, a DspyrtError is printed as one line and the command exits with ``exit_code``."""
    try:
        yield
    except Exception as exc:
        error = _dspyrt_error(exc)
        if error is None:
            raise
        report(error)
        raise typer.Exit(exit_code) from None


# ------------------------------------------------------------------------------------- running


def _config(config_file: Path | None, **overrides: Any) -> IntegrationConfig:
    from dspyrt.runtime.config import CONFIG_FILE_ENV, load_config

    if config_file is not None:
        os.environ[CONFIG_FILE_ENV] = str(config_file)
    cfg = load_config(**overrides)
    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return cfg


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a command body; our errors become one line on stderr and exit code 2."""
    import anyio

    try:
        with one_line_errors():
            return anyio.run(fn)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _with_client(
    config_file: Path | None,
    body: Callable[[Client], Awaitable[T]],
    *,
    config: IntegrationConfig | None = None,
    **overrides: Any,
) -> T:
    """Connect (to ``config``, else the configuration loaded from ``config_file`` with ``overrides``) and run
    ``body`` with the client; our errors are one line and exit code 2."""
    from dspyrt.runtime.client import connect_client

    def inner() -> Awaitable[T]:
        async def go() -> T:
            async with connect_client(cfg, identity=os.environ.get("USER") or "cli") as client:
                return await body(client)

        return go()

    with one_line_errors():
        cfg = config if config is not None else _config(config_file, **overrides)
    # With a collector configured, a submitted task's trace starts at the submit (`send dspy.task.<kind>`);
    # without one the CLI writes no span files of its own (it may run in any folder), and loads no SDK.
    telemetry = None
    if _otlp_configured():
        from dspyrt.runtime.telemetry import setup_telemetry

        telemetry = setup_telemetry(cfg.state_dir, service_name="dspyrt-cli")
    try:
        return _run(inner)
    finally:
        if telemetry is not None:
            telemetry.flush()


def _otlp_configured() -> bool:
    # runtime.telemetry.otlp_configured, without importing the OpenTelemetry SDK to find out that it is not needed.
    if not any(name.startswith("OTEL_EXPORTER_OTLP_") for name in os.environ):
        return False
    from dspyrt.runtime.telemetry import otlp_configured

    return otlp_configured()


def listing(*columns: Column | str, **options: Any) -> Table:
    """The table of a listing (tasks, agents, dead letters, programs): columns apart by two spaces under one rule,
    no borders, as ``docker ps`` prints them, so that an id is whole and double-clicks, greps and pastes as it is."""
    return Table(*columns, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True, **options)


def print_table(table: Table | Group, *, wide: bool = False, to: Console | None = None) -> None:
    """Print a table (or a group of them) without cutting a cell.

    Rich fits a table to the console by wrapping its cells, and cuts what it cannot wrap (``c8bb0b53244b…``). Here
    the ``no_wrap`` columns (ids, names, numbers) are kept whole and the others fold a word too long for them
    rather than cut it; when even that does not fit the console, the table is printed at its full width, one line
    per row (the terminal wraps the lines), as it is with ``wide`` (wide terminals, grep, copy-paste)."""
    from rich.measure import Measurement

    target = to or console
    tables = [table] if isinstance(table, Table) else [t for t in table.renderables if isinstance(t, Table)]
    for t in tables:
        for column in t.columns:
            if not column.no_wrap:
                column.overflow = "fold"
    if not wide and all(_narrowest(target, t) <= target.width for t in tables):
        target.print(table)
        return
    unlimited = target.options.update_width(100_000)
    width = max((Measurement.get(target, unlimited, t).maximum for t in tables), default=0)
    if width <= target.width:
        target.print(table)
        return
    wider = Console(
        file=target.file, width=width, force_terminal=target.is_terminal, no_color=target.no_color,
        color_system=target.color_system or None, highlight=False,  # type: ignore[arg-type]
    )  # fmt: skip
    wider.print(table)


# What print_table leaves a wrapping column at least (rich folds its words to fit).
MIN_FOLDED_WIDTH = 6


def _narrowest(target: Console, table: Table) -> int:
    """The narrowest width at which ``table``'s no_wrap columns are whole and every other is MIN_FOLDED_WIDTH."""
    from rich.measure import Measurement

    folding = [(column, column.max_width) for column in table.columns if not column.no_wrap]
    for column, _ in folding:
        column.max_width = MIN_FOLDED_WIDTH
    try:
        return Measurement.get(target, target.options.update_width(100_000), table).minimum
    finally:
        for column, max_width in folding:
            column.max_width = max_width


# ------------------------------------------------------------------------------------ reading input


def _read_text(source: str, what: str = "file") -> str:
    """A file's text (``-``: stdin); a missing or unreadable one is a DspyrtError naming it and why."""
    from dspyrt.bus import DspyrtError, NotFoundError

    if source == "-":
        return sys.stdin.read()
    path = Path(source)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFoundError(f"{source}: no such {what}") from None
    except IsADirectoryError:
        raise DspyrtError(f"{source} is a directory, not a {what}", code="unreadable_file") from None
    except UnicodeDecodeError as exc:
        message = f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise DspyrtError(message, code="unreadable_file") from None
    except OSError as exc:
        raise DspyrtError(f"{source}: cannot read it ({exc.strerror or exc})", code="unreadable_file") from None


def _parse_json(text: str, where: str) -> Any:
    """JSON, or a DspyrtError ``invalid_json`` naming where, the line and the column."""
    from dspyrt.bus import DspyrtError

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DspyrtError(
            f"{where}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", code="invalid_json"
        ) from None


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _read_task_file(path: Path) -> tuple[str, dict[str, Any]]:
    """A task file: ``{"kind": ..., "input": {...}}``."""
    from dspyrt.bus import DspyrtError

    data = _parse_json(_read_text(str(path), "task file"), str(path))
    if not (isinstance(data, dict) and isinstance(data.get("kind"), str) and isinstance(data.get("input"), dict)):
        raise DspyrtError(
            f'{path}: not a task file: write {{"kind": "<task kind>", "input": {{...}}}}', code="invalid_input"
        )
    return data["kind"], dict(data["input"])


def _read_input(source: str, kind: str | None = None) -> dict[str, Any]:
    """A task's input: a JSON object, or a whole task file ``{"kind", "input"}`` whose kind must be ``kind``."""
    from dspyrt.bus import DspyrtError

    where = "stdin" if source == "-" else source
    data = _parse_json(_read_text(source), where)
    if not isinstance(data, dict):
        raise DspyrtError(
            f"{where}: the task input must be a JSON object, not {_json_type(data)}", code="invalid_input"
        )
    if set(data) >= {"kind", "input"} and isinstance(data["input"], dict):  # a whole task file: take its input
        if kind is not None and data["kind"] != kind:
            again = "-" if source == "-" else source
            article = "an" if str(data["kind"])[:1].lower() in "aeiou" else "a"
            raise DspyrtError(
                f"{where} is {article} {data['kind']!r} task file; submit it as: dspyrt submit {data['kind']} {again}",
                code="kind_mismatch",
            )
        return dict(data["input"])
    return data


def _predict_inputs(inputs: str) -> dict[str, Any]:
    """predict's INPUTS: a JSON object, ``@FILE`` (a file holding one) or ``-`` (stdin)."""
    from dspyrt.bus import DspyrtError

    if inputs == "-" or inputs.startswith("@"):
        where = "stdin" if inputs == "-" else inputs[1:]
        value = _parse_json(_read_text("-" if inputs == "-" else inputs[1:]), where)
    else:
        where = "INPUTS"
        try:
            value = json.loads(inputs)
        except ValueError:
            example = " ".join(inputs.split())[:INPUT_EXAMPLE_CHARS]
            hint = f"; to read the file {inputs}, write @{inputs}" if Path(inputs).is_file() else ""
            raise DspyrtError(
                "INPUTS is a JSON object of the program's input fields, such as "
                f"'{{\"<input field>\": {json.dumps(example)}}}' (or @FILE to read it from a file, - from stdin); "
                f"{json.dumps(inputs[: INPUT_EXAMPLE_CHARS * 2])} is not JSON{hint}",
                code="invalid_input",
            ) from None
    if not isinstance(value, dict):
        raise DspyrtError(
            f"{where}: the inputs must be a JSON object of the program's input fields, not {_json_type(value)}",
            code="invalid_input",
        )
    return value


# --------------------------------------------------------------------------------------- running


@app.command()
def up(
    config_file: ConfigOption = None,
    example: Annotated[
        Path | None, typer.Option(help="a task file ({'kind':..., 'input':...}) to run once everything is up")
    ] = None,
    agents: Annotated[str | None, typer.Option(help="comma-separated agent names (default: by mode)")] = None,
) -> None:
    """Start the system: embedded NATS (unless a URL is configured) and every agent the mode enables; print every
    URL it serves."""
    from dspyrt.runtime.registry import agents_for
    from dspyrt.runtime.supervisor import serve

    with one_line_errors():
        cfg = _config(config_file, agents=agents)
        task = _read_task_file(example) if example is not None else None  # a bad file fails before anything starts
        classes = agents_for(cfg)

    async def ready(system: RunningSystem) -> None:
        console.print(f"[bold green]dspyrt is up[/bold green]  mode={cfg.mode.value}")
        await _print_served(system, [c.name for c in classes])
        if task is not None:
            kind, payload = task
            submission = await system.client.submit(kind, payload)
            console.print(f"\nexample task [bold]{kind}[/bold] submitted: {submission.task_id}")
            record = await _follow(system.client, submission.task_id, timeout=None)
            _print_record(record, as_json=False)
            system.telemetry.flush()
            from dspyrt.runtime.cli_traces import print_trace

            print_trace(cfg, submission.task_id, console=console)
        console.print("\nserving; Ctrl-C to stop")

    _run(lambda: serve(cfg, classes, on_ready=ready, process_name="dspyrt-up"))


async def _print_served(system: RunningSystem, agent_names: list[str], *, bind_wait: float = 5.0) -> None:
    """What ``up`` serves and where: the NATS URL, every web page an agent serves (or why it does not), where
    traces and metrics go, the state dir and the agents; one line each, for copying."""
    import anyio

    lines = [("NATS", system.nats_url + ("  (embedded)" if system.embedded else ""))]
    # An agent serving a web page (the dashboard) says where (`web_url`) or why not (`web_error`) a moment after
    # it is up: wait for each to say one or the other.
    hosts = sorted(system.supervisor.hosts.items())
    served = {name: host.agent for name, host in hosts if hasattr(host.agent, "web_url")}
    with anyio.move_on_after(bind_wait):
        while any(not (a.web_url or getattr(a, "web_error", None)) for a in served.values()):
            await anyio.sleep(0.05)
    for name, agent in served.items():
        why = getattr(agent, "web_error", None) or "not listening yet"
        lines.append((name, agent.web_url or f"not served: {why}"))
    instrumented = ", ".join(system.telemetry.instrumentations)
    traces = system.telemetry.span_destination
    lines.append(("traces", traces + (f"  (instrumented: {instrumented})" if instrumented else "")))
    metrics = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    lines.append(("metrics", f"OTLP {metrics}" if metrics else "not exported (no OTLP endpoint set)"))
    lines.append(("state dir", str(system.config.state_dir.resolve())))
    lines.append(("agents", ", ".join(agent_names)))
    for label, value in lines:
        console.print(f"  {label:<10} {escape(value)}", soft_wrap=True, highlight=False)


@app.command()
def agent(
    name: Annotated[str, typer.Argument(help="the agent to run")],
    config_file: ConfigOption = None,
) -> None:
    """Run one agent against an existing NATS (configured URL, or the one 'dspyrt up' started here)."""
    from dspyrt.bus import DspyrtError
    from dspyrt.runtime.client import resolve_servers
    from dspyrt.runtime.registry import available_agents
    from dspyrt.runtime.supervisor import serve

    with one_line_errors():
        cfg = _config(config_file)
        known = available_agents()
        if name not in known:
            raise DspyrtError(f"unknown agent {name!r}; known: {', '.join(sorted(known))}", code="not_found")
        servers = resolve_servers(cfg)
        cfg = cfg.model_copy(update={"nats_urls": servers})
    _run(lambda: serve(cfg, [known[name]], process_name=f"dspyrt-{name}"))


# ------------------------------------------------------------------------------------------ tasks


async def _follow(
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


def _print_record(record: TaskRecord, as_json: bool) -> None:
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
    if isinstance(record.result, dict) and "verdict" in record.result and "baseline" in record.result:
        _print_cycle(record.result)
    elif record.result is not None:
        console.print_json(json.dumps(record.result, default=str))


def _coverage(evaluation: dict[str, Any]) -> str:
    """", 2 errors (coverage 95.0%)" when some examples' LM calls failed; nothing when all were answered."""
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


def _print_cycle(result: dict[str, Any]) -> None:
    """A cycle's outcome in a few lines (``--json`` has everything, per-example results included)."""
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
        + _coverage(baseline),
    )
    table.add_row("optimize", str(result["phase_runs"].get("optimize", 0)), _optimization_outcome(opt))
    if optimized:
        table.add_row(
            "evaluate (optimized)",
            str(result["phase_runs"].get("evaluate_optimized", 0)),
            f"score {optimized.get('score')}{_improvement(result)}, p95 {optimized.get('latency_p95_ms')} ms"
            + _coverage(optimized),
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
    print_table(table)
    if result.get("mixed_models"):
        used = ", ".join(f"{m} ({n})" for m, n in sorted((result.get("models_used") or {}).items()))
        console.print(f"  [yellow]![/yellow] more than one model answered: {used}")
    for reason in verdict.get("reasons", []):
        console.print(f"  [red]✗[/red] {escape(str(reason))}")


@app.command()
def submit(
    kind: Annotated[str, typer.Argument(help="task kind, e.g. optimize, cycle")],
    source: Annotated[
        str, typer.Argument(help="JSON file with the task input (or a task file of this kind), or - for stdin")
    ],
    wait: Annotated[bool, typer.Option("--wait", help="wait for the result (progress bar)")] = False,
    task_id: Annotated[
        str | None,
        typer.Option("--id", help="task id: submitting it again runs nothing twice, and completes a failed submit"),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="with --wait: give up after this many seconds (exit 124; the task goes on)")
    ] = None,
    notice_after: Annotated[
        float,
        typer.Option(help="with --wait: say so if no worker has picked the task up after this many seconds (0: never)"),
    ] = 30.0,
    as_json: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """Submit a durable task; print its id, or with --wait its result.

    A missing or invalid file, or a task file of another kind, is refused before anything is sent (exit 2); so is
    a kind no worker serves (with the served kinds). Exit codes with --wait: 0 succeeded, 1 failed or dead (its
    error on stderr, every field error listed), 124 timed out."""
    import anyio

    with one_line_errors():
        payload = _read_input(source, kind)

    async def body(client: Client) -> int:
        from dspyrt.bus import DspyrtError
        from dspyrt.bus.tasks import new_task_id

        the_id = task_id or new_task_id()
        try:
            submission = await client.submit(kind, payload, task_id=the_id)
        except DspyrtError:
            raise
        except Exception as exc:  # the server went away mid-submit, a timeout: say how to finish it
            print_error(
                "submit_incomplete",
                f"submitting task {the_id} did not complete ({type(exc).__name__}: {exc}). "
                f"It may not run until it is submitted again: repeat this command with --id {the_id} "
                "(a task that was queued is not run twice).",
            )
            return 2
        if submission.requeued and not as_json:
            err.print(f"task {the_id} was recorded but never queued (an earlier submit failed): queued now")
        if not wait:
            if as_json:
                console.print_json(
                    json.dumps(
                        {"task_id": submission.task_id, "created": submission.created, "requeued": submission.requeued}
                    )
                )
            else:
                console.print(submission.task_id, soft_wrap=True)
            return 0
        try:
            record = await _follow(
                client, submission.task_id, timeout, notice_after=notice_after or None, progress=not as_json
            )
        except TimeoutError:
            if timeout is None:
                raise
            status = "not finished"
            with anyio.move_on_after(2):
                try:
                    status = (await client.task(submission.task_id)).status.value
                except Exception:
                    pass
            err.print(
                f"[red]timed out[/red] after {timeout:g}s: task {submission.task_id} ({kind}) is still {status}. "
                f"It goes on; wait for it again with: dspyrt submit {kind} {source} --id {submission.task_id} --wait",
                soft_wrap=True,
            )
            return 124
        _print_record(record, as_json)
        return 0 if record.status.value == "succeeded" else 1

    raise typer.Exit(_with_client(config_file, body))


# `dspyrt tasks` lists recent tasks; `dspyrt tasks show ID [--examples]` shows one (runtime.cli_tasks).
app.add_typer(tasks_app, name="tasks")


@app.command()
def dlq(
    replay: Annotated[
        str | None, typer.Option("--replay", help="task id (or a unique prefix of one) to run again")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000, help="dead letters per page")] = 100,
    before: Annotated[
        int | None,
        typer.Option("--before", min=1, metavar="SEQ", help="only those with a stream sequence below SEQ (older)"),
    ] = None,
    as_json: JsonOption = False,
    wide: WideOption = False,
    config_file: ConfigOption = None,
) -> None:
    """Dead-lettered tasks, with reason and delivery count, newest --limit (100) of them; --before SEQ pages back
    to older ones; --replay ID runs one again."""

    async def body(client: Client) -> None:
        from dspyrt.bus import NotFoundError
        from dspyrt.bus.streams import read_page
        from dspyrt.bus.tasks import DeadLetter

        if replay:
            try:
                replayed = await client.replay(replay)
            except NotFoundError:
                full = await client.resolve_task_id(replay)
                if full == replay:
                    raise
                replayed = await client.replay(full)
            console.print(f"replayed {replayed}", soft_wrap=True)
            return
        page = await read_page(client.bus, client.bus.subjects.dlq_stream, limit, before=before)
        letters = [(seq, DeadLetter.model_validate_json(data)) for seq, _, data in page.messages]
        if as_json:
            dead_letters = [{"seq": seq, **dl.model_dump(mode="json")} for seq, dl in letters]
            console.print_json(json.dumps({"dead_letters": dead_letters, "next_before": page.next_before}))
            return
        table = listing(Column("seq", justify="right", no_wrap=True), Column("task", no_wrap=True),
                        Column("kind", no_wrap=True), Column("deliveries", justify="right", no_wrap=True),
                        "reason")  # fmt: skip
        for seq, dl in letters:
            table.add_row(str(seq), dl.task_id, dl.kind, str(dl.deliveries), f"{dl.reason.code}: {dl.reason.message}")
        below = f" below seq {before}" if before is not None else ""
        if not letters:
            console.print(f"no dead letters{below}")
            return
        print_table(table, wide=wide)
        oldest, newest = letters[0][0], letters[-1][0]
        span = f"seq {oldest}" if oldest == newest else f"seq {oldest}-{newest}"
        shown = f"{len(letters)} dead letter{'s' if len(letters) != 1 else ''}{below} ({span})"
        if page.next_before is None:
            console.print(f"{shown}; no older ones")
        else:
            more = f" --limit {limit}" if limit != 100 else ""
            console.print(f"{shown}; older ones: dspyrt dlq --before {page.next_before}{more}", soft_wrap=True)

    _with_client(config_file, body)


@app.command()
def audit(
    limit: Annotated[int, typer.Option(help="how many of the newest records")] = 50,
    as_json: JsonOption = False,
    wide: WideOption = False,
    config_file: ConfigOption = None,
) -> None:
    """The audit trail: who submitted, deployed, rolled back or promoted what, and when."""

    async def body(client: Client) -> None:
        from dspyrt.bus.audit import read_audit

        records = await read_audit(client.bus, limit)
        if as_json:
            console.print_json(json.dumps([r.model_dump(mode="json") for r in records]))
            return
        table = listing(Column("when", no_wrap=True), Column("action", no_wrap=True), Column("target", no_wrap=True),
                        Column("nats user", no_wrap=True), "identity", "detail")  # fmt: skip
        for r in records:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.time))
            detail = ", ".join(f"{k}={v}" for k, v in r.detail.items())
            table.add_row(when, r.action, r.target, r.nats_user or "-", r.identity or "-", detail)
        print_table(table, wide=wide)

    _with_client(config_file, body)


SYSTEM_AGENT = "system"
# How long status waits for the system agent's answer (it gathers every instance's stats for up to a second).
STATUS_TIMEOUT = 5.0


@app.command()
def status(as_json: JsonOption = False, wide: WideOption = False, config_file: ConfigOption = None) -> None:
    """Every agent instance: version, uptime, requests, errors, mean latency, health; the system's mode and flags.

    Asked of the system agent (``<prefix>.system.status``), which reports its own configuration; without one, the
    instances are gathered here and the mode is this configuration's. Exit 1 if anything is unhealthy. Instances
    show the end of their id (--wide: all of it)."""

    async def body(client: Client) -> dict[str, Any]:
        from dspyrt.bus import BusUnavailableError, DspyrtError

        try:
            return await client.call(SYSTEM_AGENT, "status", {}, timeout=STATUS_TIMEOUT)
        except (BusUnavailableError, DspyrtError) as exc:
            if not isinstance(exc, BusUnavailableError) and exc.code != "timeout":
                raise
        from dspyrt.runtime.system import collect_status  # no system agent answered: gather here

        return (await collect_status(client.bus, cfg)).model_dump(mode="json")

    with one_line_errors():
        cfg = _config(config_file)
    st = _with_client(config_file, body, config=cfg)
    if as_json:
        console.print_json(json.dumps(st))
    else:
        _print_status(st, wide)
    raise typer.Exit(0 if st.get("healthy") else 1)


def _print_status(st: dict[str, Any], wide: bool) -> None:
    """``SystemStatus`` (as JSON) as a listing; a version shared by every instance is said once, above it."""
    flags = ("enable_optimizers", "enable_assertions", "enable_metrics", "auto_optimize", "auto_validate")
    instances = [(a["name"], i) for a in st.get("agents", []) for i in a.get("instances", [])]
    versions = {str(i.get("version")) for _, i in instances}
    shared = len(versions) == 1 and not wide
    console.print(
        f"mode [bold]{st.get('mode')}[/bold]  "
        + " ".join(f"{name.removeprefix('enable_')}={st.get(name)}" for name in flags)
        + (f"  version {escape(versions.pop())}" if shared else ""),
    )
    table = listing(Column("agent", no_wrap=True), Column("instance", no_wrap=True),
                    *([] if shared else [Column("version", no_wrap=True)]),
                    Column("uptime", justify="right", no_wrap=True), Column("requests", justify="right", no_wrap=True),
                    Column("errors", justify="right", no_wrap=True), Column("mean ms", justify="right", no_wrap=True),
                    "health")  # fmt: skip
    for name, i in instances:
        bad = ", ".join(k for k, v in (i.get("checks") or {}).items() if not (v or {}).get("ok"))
        health = "[green]ok[/green]" if i.get("healthy") else f"[red]unhealthy[/red] {escape(bad)}"
        table.add_row(name, str(i.get("id")) if wide else str(i.get("id"))[-8:],
                      *([] if shared else [str(i.get("version"))]), f"{i.get('uptime_s', 0):.0f}s",
                      str(i.get("requests", 0)), str(i.get("errors", 0)), f"{i.get('mean_latency_ms', 0):.2f}",
                      health)  # fmt: skip
    if instances:
        print_table(table, wide=wide)
    else:
        console.print("[yellow]no agents answered[/yellow]")


@app.command()
def streams(as_json: JsonOption = False, config_file: ConfigOption = None) -> None:
    """Create the deployment's streams and bring them to the configured settings (replicas, sizes, retention).

    Run it as a NATS user allowed to change streams (the deploy's ``admin``); agents only create missing ones.
    """

    async def body(client: Client) -> dict[str, str]:
        from dspyrt.bus import ensure_streams

        outcomes = await ensure_streams(client.bus, cfg.stream_layout, update=True)
        return {name: outcome.value for name, outcome in outcomes.items()}

    with one_line_errors():
        cfg = _config(config_file)
    outcomes = _with_client(config_file, body, config=cfg)
    if as_json:
        console.print_json(json.dumps(outcomes))
        return
    table = Table(Column("stream", no_wrap=True), "outcome")
    for name, outcome in outcomes.items():
        table.add_row(name, outcome)
    print_table(table)
    console.print(f"replicas {cfg.stream_replicas}, event stream {cfg.event_stream_max_mb} MB")


# ---------------------------------------------------------------------------------------- programs

programs_app = typer.Typer(help="Deployed programs: list, show, rollback, promote.", no_args_is_help=True)
app.add_typer(programs_app, name="programs")
app.add_typer(roles_app, name="roles")
app.add_typer(datasets_app, name="datasets")
app.command("dashboard")(dashboard_command)
app.command("optimizers")(optimizers_command)
app.command("lm-cache")(lm_cache_command)
app.command("predictions")(predictions_command)
app.command("feedback")(feedback_command)
DEPLOY_AGENT = "loop-deploy"
# How long an unknown program's error waits for the list of deployed ones.
KNOWN_PROGRAMS_TIMEOUT = 3.0


async def _with_known_programs(client: Client, call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """``call``; when it fails with ``not_found`` (an unknown program), the same error naming the deployed ones."""
    from dspyrt.bus import DspyrtError

    try:
        return await call
    except DspyrtError as exc:
        if exc.code != "not_found":
            raise
        try:
            listing = await client.call(DEPLOY_AGENT, "list", {}, timeout=KNOWN_PROGRAMS_TIMEOUT)
            names = sorted(str(p["program"]) for p in listing.get("programs", []))
        except Exception:  # the names are a hint: without them the error stands as it came
            raise exc from None
        known = f"deployed: {', '.join(names)}" if names else "no program is deployed yet"
        raise DspyrtError(f"{exc.message} ({known})", code=exc.code) from None


def _deploy_call(config_file: Path | None, endpoint: str, payload: dict[str, Any], as_json: bool) -> dict[str, Any]:
    async def body(client: Client) -> dict[str, Any]:
        return await _with_known_programs(client, client.call(DEPLOY_AGENT, endpoint, payload))

    data = _with_client(config_file, body)
    if as_json:
        console.print_json(json.dumps(data))
    return data


def _version_label(v: dict[str, Any] | None) -> str:
    if not v:
        return "-"
    score = f" score={v['score']}" if v.get("score") is not None else ""
    return f"v{v['version']}{score}" + (f" model={v['model']}" if v.get("model") else "")


@programs_app.command("list")
def programs_list(as_json: JsonOption = False, wide: WideOption = False, config_file: ConfigOption = None) -> None:
    """Every deployed program with its active version and canary."""
    data = _deploy_call(config_file, "list", {}, as_json)
    if as_json:
        return
    table = listing(Column("program", no_wrap=True), "active", "canary", Column("updated", no_wrap=True), "note")
    for p in data["programs"]:
        canary = f"{_version_label(p.get('canary'))} ({p.get('canary_fraction')})" if p.get("canary") else "-"
        updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["updated_at"]))
        table.add_row(p["program"], _version_label(p.get("active")), canary, updated, p.get("note", ""))
    print_table(table, wide=wide)


@programs_app.command("show")
def programs_show(
    name: Annotated[str, typer.Argument(help="program name")],
    as_json: JsonOption = False,
    wide: WideOption = False,
    config_file: ConfigOption = None,
) -> None:
    """One program: its pointer and every version."""
    data = _deploy_call(config_file, "show", {"program": name}, as_json)
    if as_json:
        return
    pointer = data["pointer"]
    console.print(f"[bold]{name}[/bold] active {_version_label(pointer.get('active'))}  {pointer.get('note', '')}")
    table = listing(Column("version", no_wrap=True), Column("score", no_wrap=True), Column("baseline", no_wrap=True),
                    Column("model", no_wrap=True), Column("cycle", no_wrap=True), Column("artifact", no_wrap=True),
                    Column("deployed", no_wrap=True))  # fmt: skip
    for v in data["versions"]:
        active = " *" if pointer.get("active") and pointer["active"]["version"] == v["version"] else ""
        table.add_row(f"v{v['version']}{active}", str(v.get("score")), str(v.get("baseline_score")),
                      str(v.get("model") or "-"), str(v.get("cycle_id") or "-"), v["artifact_name"],
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["deployed_at"])))  # fmt: skip
    print_table(table, wide=wide)


@programs_app.command("rollback")
def programs_rollback(
    name: Annotated[str, typer.Argument(help="program name")],
    version: Annotated[int | None, typer.Argument(help="version to restore (default: the one before)")] = None,
    as_json: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """Drop the canary, or make an earlier version active again."""
    payload: dict[str, Any] = {"program": name} | ({"version": version} if version is not None else {})
    data = _deploy_call(config_file, "rollback", payload, as_json)
    if not as_json:
        console.print(f"{name}: {data.get('note')}; active {_version_label(data.get('active'))}")


@programs_app.command("promote")
def programs_promote(
    name: Annotated[str, typer.Argument(help="program name")],
    as_json: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """Make the canary the active version."""
    data = _deploy_call(config_file, "promote", {"program": name}, as_json)
    if not as_json:
        console.print(f"{name}: {data.get('note')}; active {_version_label(data.get('active'))}")


@app.command()
def predict(
    program: Annotated[str, typer.Argument(help="deployed program name")],
    inputs: Annotated[
        str,
        typer.Argument(
            help='the inputs as a JSON object (\'{"text": "stocks fell"}\'), @FILE to read them from a file, or - '
            "for stdin"
        ),
    ],
    version: Annotated[int | None, typer.Option(help="run this version instead of the active one")] = None,
    as_json: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """Run a deployed program (its active version, or its canary for the canary's share) on the inputs.

    Inputs that are not a JSON object are refused before anything is sent (exit 2); the serving agent's error
    (an unknown program, inputs that do not fit its signature) is one line, exit 2."""
    with one_line_errors():
        payload: dict[str, Any] = {"program": program, "inputs": _predict_inputs(inputs)}
    if version is not None:
        payload["version"] = version

    async def body(client: Client) -> dict[str, Any]:
        return await _with_known_programs(client, client.call("serving", "predict", payload, timeout=60))

    data = _with_client(config_file, body)
    if as_json:
        console.print_json(json.dumps(data))
        return
    canary = " (canary)" if data.get("canary") else ""
    console.print(f"{program} v{data['version']}{canary} on {data['model']}", soft_wrap=True)
    console.print_json(json.dumps(data["outputs"]))


# ------------------------------------------------------------------------------------------ traces


@app.command()
def traces(
    task_id: Annotated[str, typer.Argument(help="the task whose trace to show (or a unique prefix of its id)")],
    full: Annotated[bool, typer.Option("--full", help="every span, none collapsed")] = False,
    config_file: ConfigOption = None,
) -> None:
    """One task's span tree from the local span files (when no OTLP collector is configured): a summary per phase,
    repeated spans collapsed (--full: every span)."""
    from dspyrt.runtime.cli_traces import traces_command  # span files and the bus: loaded when a trace is printed

    traces_command(task_id, full, config_file)


# Imported by a dependency at start but used by few commands: loaded on first use instead. nats-py imports aiohttp
# for its WebSocket transport alone (ws:// URLs); importing it costs a CLI command about a fifth of a second.
DEFERRED_IMPORTS = ("aiohttp",)
# Commands that run agents (which use aiohttp through DSPy's LM clients): they import everything as usual.
AGENT_COMMANDS = frozenset({"up", "agent"})


class _DeferredModule(types.ModuleType):
    """Stands in ``sys.modules`` for a module until one of its attributes is used, then imports it and answers
    from it. It has the real module's ``__spec__`` (what ``import`` reads of a module it finds in ``sys.modules``)
    and nothing else of it, so every other attribute goes through ``__getattr__``, which imports the module (once:
    the real one then replaces the stand-in in ``sys.modules``)."""

    def __init__(self, spec: ModuleSpec) -> None:
        super().__init__(spec.name)
        self.__spec__ = spec

    def __getattr__(self, attr: str) -> Any:
        module = sys.modules.get(self.__name__)
        if module is self or module is None:
            sys.modules.pop(self.__name__, None)
            module = importlib.import_module(self.__name__)
        return getattr(module, attr)


def _defer_imports(argv: Sequence[str]) -> None:
    """Defer DEFERRED_IMPORTS for a command that does not run agents (the first argument that is not an option)."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command in AGENT_COMMANDS:
        return
    for name in DEFERRED_IMPORTS:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is not None:
            sys.modules[name] = _DeferredModule(spec)


def main() -> None:
    """The ``dspyrt`` command: every error one line (usage errors too), tracebacks only with ``--debug``."""
    _defer_imports(sys.argv[1:])
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors (a missing argument, an unknown option...)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `dspyrt`, `dspyrt tasks`...: the help, as typer shows it
            exc.show()  # type: ignore[attr-defined]
            sys.exit(getattr(exc, "exit_code", 2))
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print_error("usage", f"{exc.format_message()}{hint}")
        sys.exit(getattr(exc, "exit_code", 2))
    except typer.Abort:
        print_error("aborted", "aborted")
        sys.exit(1)
    except Exception as exc:
        error = _dspyrt_error(exc)
        if options.debug:
            raise
        if error is not None:
            report(error)
            sys.exit(2)
        print_error("internal", f"{type(exc).__name__}: {exc} (a bug: run it again with --debug for the traceback)")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # `python -m dspyrt.runtime.cli`: run the module's own copy (the cli_* modules import it)
    from dspyrt.runtime.cli import main as _main

    _main()
