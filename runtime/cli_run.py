"""``dspyrt up`` (the whole system, long-lived) and ``dspyrt agent NAME`` (one agent against a running NATS)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from dspyrt.runtime.cli_common import ConfigOption, command_config, one_line_errors, run
from dspyrt.runtime.cli_input import read_task_file
from dspyrt.runtime.cli_output import console
from dspyrt.runtime.cli_results import follow, print_record

if TYPE_CHECKING:
    from dspyrt.runtime.supervisor import RunningSystem

# How long `up` waits for each agent serving a web page to say where (or why not) before printing the URLs.
BIND_WAIT = 5.0


def up_command(
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
        cfg = command_config(config_file, agents=agents)
        task = read_task_file(example) if example is not None else None  # a bad file fails before anything starts
        classes = agents_for(cfg)

    async def ready(system: RunningSystem) -> None:
        console.print(f"[bold green]dspyrt is up[/bold green]  mode={cfg.mode.value}")
        await print_served(system, [c.name for c in classes])
        if task is not None:
            kind, payload = task
            submission = await system.client.submit(kind, payload)
            console.print(f"\nexample task [bold]{kind}[/bold] submitted: {submission.task_id}")
            record = await follow(system.client, submission.task_id, timeout=None)
            print_record(record, as_json=False)
            system.telemetry.flush()
            from dspyrt.runtime.cli_traces import print_trace

            print_trace(cfg, submission.task_id, console=console)
        console.print("\nserving; Ctrl-C to stop")

    run(lambda: serve(cfg, classes, on_ready=ready, process_name="dspyrt-up"))


async def print_served(system: RunningSystem, agent_names: list[str], *, bind_wait: float = BIND_WAIT) -> None:
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


def agent_command(
    name: Annotated[str, typer.Argument(help="the agent to run")],
    config_file: ConfigOption = None,
) -> None:
    """Run one agent against an existing NATS (configured URL, or the one 'dspyrt up' started here)."""
    from dspyrt.bus import DspyrtError
    from dspyrt.runtime.client import resolve_servers
    from dspyrt.runtime.registry import available_agents
    from dspyrt.runtime.supervisor import serve

    with one_line_errors():
        cfg = command_config(config_file)
        known = available_agents()
        if name not in known:
            raise DspyrtError(f"unknown agent {name!r}; known: {', '.join(sorted(known))}", code="not_found")
        servers = resolve_servers(cfg)
        cfg = cfg.model_copy(update={"nats_urls": servers})
    run(lambda: serve(cfg, [known[name]], process_name=f"dspyrt-{name}"))
