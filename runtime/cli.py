"""``dspyrt``: run the system, submit tasks, look at it. This module assembles the app from the command modules.

Commands other than ``up`` and ``agent`` find a system started by ``dspyrt up`` in the same folder (through
``<state_dir>/system.json``) or use the configured NATS URLs; with nothing reachable they say so and exit 2.

Errors are one line on stderr, ``error <code>: <message>`` (a validation error lists every field error); the
global ``--debug`` option (``dspyrt --debug submit ...``) prints the traceback too. Exit codes: 0 done; 1 a task
or command that ran and failed (and what each command's docstring says); 2 a usage or input error (a missing
file, bad JSON, a task file of another kind), a configuration error or no NATS reachable; 124 ``submit --wait``
timed out; 130 interrupted.

The modules, each imported by the ones after it and never the other way round:
``cli_output`` (consoles, tables, cells), ``cli_common`` (options, configuration, connecting, one-line errors),
``cli_input`` (files, JSON, task inputs), ``cli_results`` (waiting for a task, printing its record), then one module
per command or command group (``cli_run``: up, agent; ``cli_submit``; ``cli_tasks``; ``cli_system``: status,
streams, dlq, audit; ``cli_programs``: programs, predict; ``cli_roles``, ``cli_datasets``, ``cli_dashboard``,
``cli_optimizers``, ``cli_asyncapi``, ``cli_lm_cache``, ``cli_feedback``, ``cli_traces``), and this one.

Startup time is every command's cost: these modules import only typer, rich and the standard library at module
level. NATS (``bus``), the configuration, telemetry and DSPy are imported by the commands that use them
(``tests/test_cli_errors.py`` checks that ``--help`` imports none of them).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from dspyrt.runtime.cli_asyncapi import asyncapi_command
from dspyrt.runtime.cli_common import ConfigOption, dspyrt_error_of, options, print_error, report
from dspyrt.runtime.cli_dashboard import dashboard_command
from dspyrt.runtime.cli_datasets import datasets_app
from dspyrt.runtime.cli_deferred import defer_imports
from dspyrt.runtime.cli_feedback import feedback_command, predictions_command
from dspyrt.runtime.cli_lm_cache import lm_cache_command
from dspyrt.runtime.cli_optimizers import optimizers_command
from dspyrt.runtime.cli_programs import predict_command, programs_app
from dspyrt.runtime.cli_roles import roles_app
from dspyrt.runtime.cli_run import agent_command, up_command
from dspyrt.runtime.cli_submit import submit_command
from dspyrt.runtime.cli_system import audit_command, dlq_command, status_command, streams_command
from dspyrt.runtime.cli_tasks import tasks_app

app = typer.Typer(
    help="DSPy program optimization as a service, on NATS.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # --debug tracebacks must not print configuration secrets
)

# The commands that run agents: they import everything as usual (see cli_deferred).
AGENT_COMMANDS = frozenset({"up", "agent"})


@app.callback()
def _global_options(
    debug: Annotated[
        bool, typer.Option("--debug", help="on an error, print its traceback too (else one line: error <code>: ...)")
    ] = False,
) -> None:
    """DSPy program optimization as a service, on NATS."""
    options.debug = debug


def traces(
    task_id: Annotated[str, typer.Argument(help="the task whose trace to show (or a unique prefix of its id)")],
    full: Annotated[bool, typer.Option("--full", help="every span, none collapsed")] = False,
    config_file: ConfigOption = None,
) -> None:
    """One task's span tree from the local span files (when no OTLP collector is configured): a summary per phase,
    repeated spans collapsed (--full: every span)."""
    from dspyrt.runtime.cli_traces import traces_command  # span files and the bus: loaded when a trace is printed

    traces_command(task_id, full, config_file)


# Commands, then groups, each in the order `dspyrt --help` lists them.
app.command("up")(up_command)
app.command("agent")(agent_command)
app.command("submit")(submit_command)
app.command("dlq")(dlq_command)
app.command("audit")(audit_command)
app.command("status")(status_command)
app.command("streams")(streams_command)
app.command("dashboard")(dashboard_command)
app.command("optimizers")(optimizers_command)
app.command("asyncapi")(asyncapi_command)
app.command("lm-cache")(lm_cache_command)
app.command("predictions")(predictions_command)
app.command("feedback")(feedback_command)
app.command("predict")(predict_command)
app.command("traces")(traces)
# `dspyrt tasks` lists recent tasks; `dspyrt tasks show ID [--examples]` shows one (runtime.cli_tasks).
app.add_typer(tasks_app, name="tasks")
app.add_typer(programs_app, name="programs")
app.add_typer(roles_app, name="roles")
app.add_typer(datasets_app, name="datasets")


def main() -> None:
    """The ``dspyrt`` command: every error one line (usage errors too), tracebacks only with ``--debug``."""
    defer_imports(sys.argv[1:], agent_commands=AGENT_COMMANDS)
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
        error = dspyrt_error_of(exc)
        if options.debug:
            raise
        if error is not None:
            report(error)
            sys.exit(2)
        print_error("internal", f"{type(exc).__name__}: {exc} (a bug: run it again with --debug for the traceback)")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # `python -m dspyrt.runtime.cli`
    main()
