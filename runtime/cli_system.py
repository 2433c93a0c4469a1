"""The running system as an operator sees it: ``dspyrt status`` (every agent instance, the mode and flags),
``dspyrt streams`` (create and update the deployment's streams), ``dspyrt dlq`` (dead letters, replay) and
``dspyrt audit`` (who did what)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Column, Table

from dspyrt.runtime.cli_common import ConfigOption, JsonOption, WideOption, command_config, one_line_errors, with_client
from dspyrt.runtime.cli_output import console, listing, print_table, when

if TYPE_CHECKING:
    from dspyrt.runtime.client import Client

SYSTEM_AGENT = "system"
# How long status waits for the system agent's answer (it gathers every instance's stats for up to a second).
STATUS_TIMEOUT = 5.0
# The flags `status` shows beside the mode.
STATUS_FLAGS = ("enable_optimizers", "enable_assertions", "enable_metrics", "auto_optimize", "auto_validate")
DEFAULT_DLQ_PAGE = 100


def status_command(as_json: JsonOption = False, wide: WideOption = False, config_file: ConfigOption = None) -> None:
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
        cfg = command_config(config_file)
    st = with_client(config_file, body, config=cfg)
    if as_json:
        console.print_json(json.dumps(st))
    else:
        _print_status(st, wide)
    raise typer.Exit(0 if st.get("healthy") else 1)


def _print_status(st: dict[str, Any], wide: bool) -> None:
    """``SystemStatus`` (as JSON) as a listing; a version shared by every instance is said once, above it."""
    instances = [(a["name"], i) for a in st.get("agents", []) for i in a.get("instances", [])]
    versions = {str(i.get("version")) for _, i in instances}
    shared = len(versions) == 1 and not wide
    console.print(
        f"mode [bold]{st.get('mode')}[/bold]  "
        + " ".join(f"{name.removeprefix('enable_')}={st.get(name)}" for name in STATUS_FLAGS)
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


def streams_command(as_json: JsonOption = False, config_file: ConfigOption = None) -> None:
    """Create the deployment's streams and bring them to the configured settings (replicas, sizes, retention).

    Run it as a NATS user allowed to change streams (the deploy's ``admin``); agents only create missing ones.
    """

    async def body(client: Client) -> dict[str, str]:
        from dspyrt.bus import ensure_streams

        outcomes = await ensure_streams(client.bus, cfg.stream_layout, update=True)
        return {name: outcome.value for name, outcome in outcomes.items()}

    with one_line_errors():
        cfg = command_config(config_file)
    outcomes = with_client(config_file, body, config=cfg)
    if as_json:
        console.print_json(json.dumps(outcomes))
        return
    table = Table(Column("stream", no_wrap=True), "outcome")
    for name, outcome in outcomes.items():
        table.add_row(name, outcome)
    print_table(table)
    console.print(f"replicas {cfg.stream_replicas}, event stream {cfg.event_stream_max_mb} MB")


def dlq_command(
    replay: Annotated[
        str | None, typer.Option("--replay", help="task id (or a unique prefix of one) to run again")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000, help="dead letters per page")] = DEFAULT_DLQ_PAGE,
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
            more = f" --limit {limit}" if limit != DEFAULT_DLQ_PAGE else ""
            console.print(f"{shown}; older ones: dspyrt dlq --before {page.next_before}{more}", soft_wrap=True)

    with_client(config_file, body)


def audit_command(
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
            detail = ", ".join(f"{k}={v}" for k, v in r.detail.items())
            table.add_row(when(r.time), r.action, r.target, r.nats_user or "-", r.identity or "-", detail)
        print_table(table, wide=wide)

    with_client(config_file, body)
