"""``dspyrt asyncapi [--output FILE]``: the AsyncAPI 3.0 document of the wire protocol, from the installed agents.

Generated in this process by ``dspyrt.runtime.asyncapi`` (no NATS, no running system). It loads every agent class,
so DSPy and the agents are imported inside the command, never when the CLI starts. Registered in
``dspyrt.runtime.cli`` with ``app.command("asyncapi")(asyncapi_command)``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from dspyrt.runtime.cli_common import print_error

OutputOption = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="write the document to this file (else print it)", dir_okay=False),
]


def asyncapi_command(output: OutputOption = None) -> None:
    """Print the AsyncAPI 3.0 document of the protocol (every installed agent's endpoints, tasks and events),
    or write it to a file; docs/asyncapi.yaml is its output: dspyrt asyncapi -o docs/asyncapi.yaml."""
    from dspyrt.runtime.asyncapi import generate

    text = generate()
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        print_error("unwritable_file", f"{output}: cannot write it ({exc.strerror or exc})")
        raise typer.Exit(2) from None
    typer.echo(f"wrote {output}", err=True)
