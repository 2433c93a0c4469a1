"""``dspyrt``: run the system, submit tasks, look at it.

Commands other than ``up`` and ``agent`` find a system started by ``dspyrt up`` in the same folder (through
``<state_dir>/system.json``) or use the configured NATS URLs; with nothing reachable they say so and exit 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree

from bus import DspyrtError, TaskRecord, ensure_streams
from bus.streams import read_page
from bus.tasks import DeadLetter
from runtime.cli_dashboard import dashboard_command
from runtime.cli_datasets import datasets_app
from runtime.cli_feedback import feedback_command, predictions_command
from runtime.cli_lm_cache import lm_cache_command
from runtime.cli_optimizers import optimizers_command
from runtime.cli_roles import roles_app
from runtime.cli_tasks import tasks_app
from runtime.client import Client, connect_client
from runtime.config import CONFIG_FILE_ENV, IntegrationConfig, load_config
from runtime.registry import agents_for, available_agents
from runtime.supervisor import RunningSystem, serve
from runtime.system import collect_status
from runtime.telemetry import otlp_configured, setup_telemetry
from runtime.traces import SpanNode, read_spans, task_trees

app = typer.Typer(help="DSPy program optimization as a service, on NATS.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)
T = TypeVar("T")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML configuration file (else dspyrt.toml if present)")
]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _config(config_file: Path | None, **overrides: Any) -> IntegrationConfig:
    if config_file is not None:
        os.environ[CONFIG_FILE_ENV] = str(config_file)
    cfg = load_config(**overrides)
    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return cfg


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a command body; our errors become one line on stderr and exit code 2."""
    try:
        return anyio.run(fn)
    except DspyrtError as exc:
        err.print(f"[red]error[/red] {exc}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _with_client(config_file: Path | None, body: Callable[[Client], Awaitable[T]], **overrides: Any) -> T:
    def inner() -> Awaitable[T]:
        async def go() -> T:
            async with connect_client(cfg, identity=os.environ.get("USER") or "cli") as client:
                return await body(client)

        return go()

    try:
        cfg = _config(config_file, **overrides)
    except DspyrtError as exc:
        err.print(f"[red]error[/red] {exc}")
        raise typer.Exit(2) from None
    # With a collector configured, a submitted task's trace starts at the submit (`send dspy.task.<kind>`);
    # without one the CLI writes no span files of its own (it may run in any folder).
    telemetry = setup_telemetry(cfg.state_dir, service_name="dspyrt-cli") if otlp_configured() else None
    try:
        return _run(inner)
    finally:
        if telemetry is not None:
            telemetry.flush()


# --------------------------------------------------------------------------------------- running


@app.command()
def up(
    config_file: ConfigOption = None,
    example: Annotated[
        Path | None, typer.Option(help="a task file ({'kind':..., 'input':...}) to run once everything is up")
    ] = None,
    agents: Annotated[str | None, typer.Option(help="comma-separated agent names (default: by mode)")] = None,
) -> None:
    """Start the system: embedded NATS (unless a URL is configured) and every agent the mode enables."""
    try:
        cfg = _config(config_file, agents=agents)
        classes = agents_for(cfg)
    except DspyrtError as exc:
        err.print(f"[red]error[/red] {exc}")
        raise typer.Exit(2) from None

    async def ready(system: RunningSystem) -> None:
        console.print(f"[bold green]dspyrt is up[/bold green]  mode={cfg.mode.value}")
        console.print(f"  NATS       {system.nats_url}" + ("  (embedded)" if system.embedded else ""))
        console.print(f"  state dir  {cfg.state_dir.resolve()}")
        instrumented = system.telemetry.instrumentations
        console.print(
            f"  traces     {system.telemetry.span_destination}"
            + (f"  (instrumented: {', '.join(instrumented)})" if instrumented else "")
        )
        console.print(f"  agents     {', '.join(c.name for c in classes)}")
        dashboard = system.supervisor.hosts.get("dashboard")
        if dashboard is not None:
            for _ in range(50):  # the web view binds a moment after the agent is up
                url = getattr(dashboard.agent, "web_url", None)
                if url:
                    console.print(f"  dashboard  {url}")
                    break
                await anyio.sleep(0.1)
        if example is not None:
            kind, payload = _read_task_file(example)
            submission = await system.client.submit(kind, payload)
            console.print(f"\nexample task [bold]{kind}[/bold] submitted: {submission.task_id}")
            record = await _follow(system.client, submission.task_id, timeout=None)
            _print_record(record, as_json=False)
            system.telemetry.flush()
            _print_trace(cfg, submission.task_id)
        console.print("\nserving; Ctrl-C to stop")

    _run(lambda: serve(cfg, classes, on_ready=ready, process_name="dspyrt-up"))


@app.command()
def agent(
    name: Annotated[str, typer.Argument(help="the agent to run")],
    config_file: ConfigOption = None,
) -> None:
    """Run one agent against an existing NATS (configured URL, or the one 'dspyrt up' started here)."""
    from runtime.client import resolve_servers

    try:
        cfg = _config(config_file)
        known = available_agents()
        if name not in known:
            raise DspyrtError(f"unknown agent {name!r}; known: {', '.join(sorted(known))}", code="not_found")
        servers = resolve_servers(cfg)
        cfg = cfg.model_copy(update={"nats_urls": servers})
    except DspyrtError as exc:
        err.print(f"[red]error[/red] {exc}")
        raise typer.Exit(2) from None
    _run(lambda: serve(cfg, [known[name]], process_name=f"dspyrt-{name}"))


# ------------------------------------------------------------------------------------------ tasks


def _read_task_file(path: Path) -> tuple[str, dict[str, Any]]:
    """A task file: ``{"kind": ..., "input": {...}}``."""
    try:
        data = json.loads(path.read_text())
        return str(data["kind"]), dict(data["input"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DspyrtError(f"{path}: not a task file with 'kind' and 'input' ({exc})", code="invalid_message") from exc


def _read_input(source: str) -> dict[str, Any]:
    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DspyrtError(f"{source}: not JSON ({exc})", code="invalid_message") from exc
    if not isinstance(data, dict):
        raise DspyrtError(f"{source}: the task input must be a JSON object", code="invalid_message")
    # A full task file may be given too: take its input.
    if set(data) >= {"kind", "input"} and isinstance(data["input"], dict):
        return dict(data["input"])
    return data


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
    if as_json:
        console.print_json(record.model_dump_json())
        return
    colour = {"succeeded": "green", "failed": "red", "dead": "red"}.get(record.status.value, "yellow")
    console.print(f"task {record.id} [{colour}]{record.status.value}[/{colour}] after {record.attempts} attempt(s)")
    if record.error:
        console.print(f"  error {record.error.code}: {record.error.message}")
    if isinstance(record.result, dict) and "verdict" in record.result and "baseline" in record.result:
        _print_cycle(record.result)
    elif record.result is not None:
        console.print_json(json.dumps(record.result, default=str))


def _coverage(evaluation: dict[str, Any]) -> str:
    """", 2 errors (coverage 95.0%)" when some examples' LM calls failed; nothing when all were answered."""
    errors = evaluation.get("errors") or 0
    return f", {errors} errors (coverage {evaluation.get('coverage', 1.0):.1%})" if errors else ""


def _print_cycle(result: dict[str, Any]) -> None:
    """A cycle's outcome in a few lines (``--json`` has everything, per-example results included)."""
    opt = result.get("optimization") or {}
    optimized = result.get("optimized") or {}
    baseline = result.get("baseline") or {}
    table = Table("phase", "runs", "outcome")
    table.add_row(
        "create", str(result["phase_runs"].get("create", 0)), f"program {result['create']['program_hash'][:12]}"
    )
    table.add_row(
        "evaluate (baseline)",
        str(result["phase_runs"].get("evaluate_baseline", 0)),
        f"score {baseline.get('score')} on {baseline.get('examples')} examples in {baseline.get('shards')} shards"
        + _coverage(baseline),
    )
    table.add_row(
        "optimize",
        str(result["phase_runs"].get("optimize", 0)),
        f"{opt.get('optimizer')} on {opt.get('model')}: {opt.get('status')}, {opt.get('lm_calls')} LM calls"
        + (f" ({opt['cached_calls']} from the cache)" if opt.get("cached_calls") else ""),
    )
    if optimized:
        table.add_row(
            "evaluate (optimized)",
            str(result["phase_runs"].get("evaluate_optimized", 0)),
            f"score {optimized.get('score')}, p95 {optimized.get('latency_p95_ms')} ms" + _coverage(optimized),
        )
    validation = result.get("validation")
    if validation:
        table.add_row(
            "validate",
            str(result["phase_runs"].get("validate", 0)),
            f"{'passed' if validation.get('passed') else 'FAILED'} ({', '.join(validation.get('counts', {}))})",
        )
    verdict = result["verdict"]
    outcome = (
        f"[green]deployed v{verdict['version']}{' as canary' if verdict.get('canary') else ''}[/green]"
        if verdict["deployed"]
        else "[red]rejected[/red]"
    )
    table.add_row("deploy", str(result["phase_runs"].get("deploy", 0)), outcome)
    console.print(table)
    if result.get("mixed_models"):
        used = ", ".join(f"{m} ({n})" for m, n in sorted((result.get("models_used") or {}).items()))
        console.print(f"  [yellow]![/yellow] more than one model answered: {used}")
    for reason in verdict.get("reasons", []):
        console.print(f"  [red]✗[/red] {reason}")


@app.command()
def submit(
    kind: Annotated[str, typer.Argument(help="task kind, e.g. optimize, cycle")],
    source: Annotated[str, typer.Argument(help="JSON file with the task input, or - for stdin")],
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

    A kind no worker serves is refused (exit 2, with the served kinds). Exit codes with --wait: 0 succeeded,
    1 failed or dead, 124 timed out."""
    from rich.markup import escape

    from bus.tasks import new_task_id

    async def body(client: Client) -> int:
        payload = _read_input(source)
        the_id = task_id or new_task_id()
        try:
            submission = await client.submit(kind, payload, task_id=the_id)
        except DspyrtError:
            raise
        except Exception as exc:  # the server went away mid-submit, a timeout: say how to finish it
            reason = escape(f"{type(exc).__name__}: {exc}")
            err.print(
                f"[red]error[/red] submitting task {the_id} did not complete ({reason}). "
                f"It may not run until it is submitted again: repeat this command with --id {the_id} "
                "(a task that was queued is not run twice)."
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
                console.print(submission.task_id)
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
                f"It goes on; wait for it again with: dspyrt submit {kind} {source} --id {submission.task_id} --wait"
            )
            return 124
        _print_record(record, as_json)
        return 0 if record.status.value == "succeeded" else 1

    raise typer.Exit(_with_client(config_file, body))


# `dspyrt tasks` lists recent tasks; `dspyrt tasks show ID [--examples]` shows one (runtime.cli_tasks).
app.add_typer(tasks_app, name="tasks")


@app.command()
def dlq(
    replay: Annotated[str | None, typer.Option("--replay", help="task id to run again")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000, help="dead letters per page")] = 100,
    before: Annotated[
        int | None,
        typer.Option("--before", min=1, metavar="SEQ", help="only those with a stream sequence below SEQ (older)"),
    ] = None,
    as_json: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """Dead-lettered tasks, with reason and delivery count, newest --limit (100) of them; --before SEQ pages back
    to older ones; --replay ID runs one again."""

    async def body(client: Client) -> None:
        if replay:
            console.print(f"replayed {await client.replay(replay)}")
            return
        page = await read_page(client.bus, client.bus.subjects.dlq_stream, limit, before=before)
        letters = [(seq, DeadLetter.model_validate_json(data)) for seq, _, data in page.messages]
        if as_json:
            dead_letters = [{"seq": seq, **dl.model_dump(mode="json")} for seq, dl in letters]
            console.print_json(json.dumps({"dead_letters": dead_letters, "next_before": page.next_before}))
            return
        table = Table("seq", "task", "kind", "deliveries", "reason")
        for seq, dl in letters:
            table.add_row(str(seq), dl.task_id, dl.kind, str(dl.deliveries), f"{dl.reason.code}: {dl.reason.message}")
        below = f" below seq {before}" if before is not None else ""
        if not letters:
            console.print(f"no dead letters{below}")
            return
        console.print(table)
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
    config_file: ConfigOption = None,
) -> None:
    """The audit trail: who submitted, deployed, rolled back or promoted what, and when."""
    from bus.audit import read_audit

    async def body(client: Client) -> None:
        records = await read_audit(client.bus, limit)
        if as_json:
            console.print_json(json.dumps([r.model_dump(mode="json") for r in records]))
            return
        table = Table("when", "action", "target", "nats user", "identity", "detail")
        for r in records:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.time))
            detail = ", ".join(f"{k}={v}" for k, v in r.detail.items())
            table.add_row(when, r.action, r.target, r.nats_user or "-", r.identity or "-", detail)
        console.print(table)

    _with_client(config_file, body)


@app.command()
def status(as_json: JsonOption = False, config_file: ConfigOption = None) -> None:
    """Every agent instance: version, uptime, requests, errors, mean latency, health; mode and flags."""

    async def body(client: Client) -> bool:
        st = await collect_status(client.bus, cfg)
        if as_json:
            console.print_json(st.model_dump_json())
            return st.healthy
        console.print(
            f"mode [bold]{st.mode.value}[/bold]  optimizers={st.enable_optimizers} assertions={st.enable_assertions}"
            f" metrics={st.enable_metrics} auto_optimize={st.auto_optimize} auto_validate={st.auto_validate}"
        )
        table = Table("agent", "instance", "version", "uptime", "requests", "errors", "mean ms", "health")
        for a in st.agents:
            for i in a.instances:
                bad = ", ".join(k for k, v in i.checks.items() if not v.get("ok"))
                health = "[green]ok[/green]" if i.healthy else f"[red]unhealthy[/red] {bad}"
                table.add_row(a.name, i.id[-8:], i.version, f"{i.uptime_s:.0f}s", str(i.requests), str(i.errors),
                              f"{i.mean_latency_ms:.2f}", health)  # fmt: skip
        console.print(table)
        if not st.agents:
            console.print("[yellow]no agents answered[/yellow]")
        return st.healthy

    cfg = _config(config_file)
    healthy = _with_client(config_file, body)
    raise typer.Exit(0 if healthy else 1)


@app.command()
def streams(as_json: JsonOption = False, config_file: ConfigOption = None) -> None:
    """Create the deployment's streams and bring them to the configured settings (replicas, sizes, retention).

    Run it as a NATS user allowed to change streams (the deploy's ``admin``); agents only create missing ones.
    """

    async def body(client: Client) -> dict[str, str]:
        outcomes = await ensure_streams(client.bus, cfg.stream_layout, update=True)
        return {name: outcome.value for name, outcome in outcomes.items()}

    cfg = _config(config_file)
    outcomes = _with_client(config_file, body)
    if as_json:
        console.print_json(json.dumps(outcomes))
        return
    table = Table("stream", "outcome")
    for name, outcome in outcomes.items():
        table.add_row(name, outcome)
    console.print(table)
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


def _deploy_call(config_file: Path | None, endpoint: str, payload: dict[str, Any], as_json: bool) -> dict[str, Any]:
    async def body(client: Client) -> dict[str, Any]:
        return await client.call(DEPLOY_AGENT, endpoint, payload)

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
def programs_list(as_json: JsonOption = False, config_file: ConfigOption = None) -> None:
    """Every deployed program with its active version and canary."""
    data = _deploy_call(config_file, "list", {}, as_json)
    if as_json:
        return
    table = Table("program", "active", "canary", "updated", "note")
    for p in data["programs"]:
        canary = f"{_version_label(p.get('canary'))} ({p.get('canary_fraction')})" if p.get("canary") else "-"
        updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["updated_at"]))
        table.add_row(p["program"], _version_label(p.get("active")), canary, updated, p.get("note", ""))
    console.print(table)


@programs_app.command("show")
def programs_show(
    name: Annotated[str, typer.Argument(help="program name")],
    as_json: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """One program: its pointer and every version."""
    data = _deploy_call(config_file, "show", {"program": name}, as_json)
    if as_json:
        return
    pointer = data["pointer"]
    console.print(f"[bold]{name}[/bold] active {_version_label(pointer.get('active'))}  {pointer.get('note', '')}")
    table = Table("version", "score", "baseline", "model", "cycle", "artifact", "deployed")
    for v in data["versions"]:
        active = " *" if pointer.get("active") and pointer["active"]["version"] == v["version"] else ""
        table.add_row(f"v{v['version']}{active}", str(v.get("score")), str(v.get("baseline_score")),
                      str(v.get("model") or "-"), str(v.get("cycle_id") or "-"), v["artifact_name"],
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["deployed_at"])))  # fmt: skip
    console.print(table)


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
    inputs: Annotated[str, typer.Argument(help="the inputs as a JSON object, a JSON file, or - for stdin")],
    version: Annotated[int | None, typer.Option(help="run this version instead of the active one")] = None,
    as_json: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """Run a deployed program (its active version, or its canary for the canary's share) on the inputs."""
    text = inputs if inputs.lstrip().startswith("{") else None

    async def body(client: Client) -> dict[str, Any]:
        payload: dict[str, Any] = {"program": program, "inputs": json.loads(text) if text else _read_input(inputs)}
        if version is not None:
            payload["version"] = version
        return await client.call("serving", "predict", payload, timeout=60)

    data = _with_client(config_file, body)
    if as_json:
        console.print_json(json.dumps(data))
        return
    canary = " (canary)" if data.get("canary") else ""
    console.print(f"{program} v{data['version']}{canary} on {data['model']}")
    console.print_json(json.dumps(data["outputs"]))


# ------------------------------------------------------------------------------------------ traces


def _print_trace(cfg: IntegrationConfig, task_id: str) -> bool:
    roots = task_trees(read_spans(cfg.state_dir), task_id)
    if not roots:
        return False

    def add(tree: Tree, node: SpanNode) -> None:
        s = node.span
        mark = "[red]✗[/red] " if s.get("status") == "ERROR" else ""
        branch = tree.add(f"{mark}{s['name']}  [dim]{s.get('service')} {node.duration_ms:.1f} ms[/dim]")
        for child in node.children:
            add(branch, child)

    for root in roots:
        tree = Tree(f"trace {root.span['trace_id']}")
        add(tree, root)
        console.print(tree)
    return True


@app.command()
def traces(
    task_id: Annotated[str, typer.Argument(help="the task whose trace to show")],
    config_file: ConfigOption = None,
) -> None:
    """The span tree of one task, from the local span files (when no OTLP collector is configured)."""
    cfg = _config(config_file)
    if not _print_trace(cfg, task_id):
        err.print(f"no spans for task {task_id} under {cfg.state_dir / 'traces'}")
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
