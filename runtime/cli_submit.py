"""``dspyrt submit KIND FILE [--wait]``: submit a durable task; print its id, or with ``--wait`` its result."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from dspyrt.runtime.cli_common import ConfigOption, JsonOption, one_line_errors, print_error, with_client
from dspyrt.runtime.cli_input import read_task_input
from dspyrt.runtime.cli_output import console, err
from dspyrt.runtime.cli_results import follow, print_record

if TYPE_CHECKING:
    from dspyrt.runtime.client import Client

# Exit code of `submit --wait` when the wait timed out (the task goes on), as timeout(1)'s.
TIMED_OUT = 124


def submit_command(
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
        payload = read_task_input(source, kind)

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
            record = await follow(
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
            return TIMED_OUT
        print_record(record, as_json)
        return 0 if record.status.value == "succeeded" else 1

    raise typer.Exit(with_client(config_file, body))
