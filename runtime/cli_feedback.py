"""``dspyrt predictions`` and ``dspyrt feedback``: production feedback, through the serving agent on the bus.

    dspyrt predictions PROGRAM --record 0.1          # record 10% of the program's predictions (0: off)
    dspyrt predictions PROGRAM [--limit N] [--json]  # its newest recorded predictions
    dspyrt feedback ID '{"label": "positive"}' [ID JSON ...]   # one batch of corrections
    dspyrt feedback --file corrections.jsonl         # {"prediction_id": ..., "outputs": {...}} per line

Each command is one request to ``<prefix>.serving.record | predictions | feedback``; payloads are plain JSON,
checked by the serving agent, whose error is printed as one line (exit code 1). Nothing here knows about DSPy or the
agents' code. ``dspyrt.runtime.cli`` registers the commands: ``app.command("predictions")(predictions_command)`` and
``app.command("feedback")(feedback_command)``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Column, Table
from rich.text import Text

from dspyrt.runtime.cli_common import ConfigOption, JsonOption, print_error, with_client
from dspyrt.runtime.cli_output import clipped_json, console, print_table

if TYPE_CHECKING:
    from dspyrt.runtime.client import Client

SERVING_AGENT = "serving"
# A correction is shown in this many characters beside its ✓ or ✗ (--json has it whole).
CORRECTION_CHARS = 40


def _fail(message: str, code: str = "invalid_input") -> typer.Exit:
    """``error <code>: <message>`` on stderr, in one line; the Exit (code 1) to raise."""
    print_error(code, message)
    return typer.Exit(1)


def _call(config_file: Path | None, endpoint: str, payload: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """One request to the serving agent; its error (or a missing agent) is one line and exit code 1."""

    async def body(client: Client) -> dict[str, Any]:
        return await client.call(SERVING_AGENT, endpoint, payload, timeout=timeout)

    return with_client(config_file, body, failure_exit=1)


def _rate(rate: float) -> str:
    return f"recording {rate:.0%} of its predictions" if rate > 0 else "recording off"


def predictions_command(
    program: Annotated[str, typer.Argument(help="deployed program name")],
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="how many (newest first)")] = 20,
    record: Annotated[
        float | None,
        typer.Option("--record", min=0.0, max=1.0, help="set the share of predictions recorded (0 turns it off)"),
    ] = None,
    as_json: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """A program's newest recorded predictions; with --record RATE, set the share of its predictions recorded."""
    if record is not None:
        settings = _call(config_file, "record", {"program": program, "sample_rate": record})
        if as_json:
            console.print_json(json.dumps(settings))
        else:
            console.print(f"{program}: {_rate(settings['sample_rate'])}")
        return
    data = _call(config_file, "predictions", {"program": program, "limit": limit})
    if as_json:
        console.print_json(json.dumps(data))
        return
    console.print(f"[bold]{escape(program)}[/bold]: {_rate(data['sample_rate'])}")
    if not data["predictions"]:
        hint = "" if data["sample_rate"] > 0 else f" (turn it on: dspyrt predictions {escape(program)} --record 0.1)"
        console.print(f"[yellow]no recorded predictions[/yellow]{hint}")
        return
    # The id is what `dspyrt feedback` takes: never cut.
    table = Table(Column("id", no_wrap=True, min_width=24), Column("time", no_wrap=True), "version", "model",
                  "inputs", "outputs", "corrected")  # fmt: skip
    for p in data["predictions"]:
        corrections = p.get("corrections")
        mark = "✓ " if p.get("agreed") else "✗ "
        corrected = "-" if corrections is None else mark + clipped_json(corrections, CORRECTION_CHARS)
        # Text cells: recorded values are user data, never rich markup.
        table.add_row(
            p["prediction_id"],
            time.strftime("%m-%d %H:%M:%S", time.localtime(p["time"])),
            f"v{p['version']}" + (" canary" if p.get("canary") else ""),
            Text(str(p["model"])),
            Text(clipped_json(p["inputs"])),
            Text(clipped_json(p["outputs"])),
            Text(corrected),
        )
    print_table(table)
    if data.get("truncated"):
        console.print("[yellow]more did not fit in one reply: ask for fewer (--limit)[/yellow]")


def _object(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise _fail(f"{where}: not JSON ({exc})", "invalid_json") from None
    if not isinstance(value, dict):
        raise _fail(f"{where}: a JSON object is needed")
    return value


def _read_items(pairs: list[str], file: str | None) -> list[dict[str, Any]]:
    """The batch: ``ID JSON`` pairs, then the lines of ``file`` (``-``: stdin)."""
    if len(pairs) % 2:
        raise _fail(f"{pairs[-1]!r} has no corrections: give PREDICTION_ID '{{\"field\": value}}' pairs")
    items = [
        {"prediction_id": pairs[i], "outputs": _object(pairs[i + 1], f"the corrections of {pairs[i]}")}
        for i in range(0, len(pairs), 2)
    ]
    if file is not None:
        try:
            text = sys.stdin.read() if file == "-" else Path(file).read_text()
        except OSError as exc:
            raise _fail(f"{file}: cannot read it ({exc.strerror or exc})", "unreadable_file") from None
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            item = _object(line, f"{file} line {number}")
            if set(item) != {"prediction_id", "outputs"}:
                raise _fail(f'{file} line {number}: write {{"prediction_id": ..., "outputs": {{...}}}}')
            items.append(item)
    if not items:
        raise _fail("no corrections: give PREDICTION_ID JSON pairs or --file FILE")
    return items


def feedback_command(
    pairs: Annotated[
        list[str] | None,
        typer.Argument(help='PREDICTION_ID \'{"output field": "correct value"}\' pairs', show_default=False),
    ] = None,
    file: Annotated[
        str | None, typer.Option("--file", "-f", help='JSON Lines {"prediction_id": ..., "outputs": {...}}; - stdin')
    ] = None,
    as_json: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """Correct recorded predictions: one batch, one new version of the program's feedback dataset (printed)."""
    items = _read_items(pairs or [], file)
    data = _call(config_file, "feedback", {"items": items}, timeout=60.0)
    if as_json:
        console.print_json(json.dumps(data))
        return
    console.print(data["dataset"], highlight=False)
    console.print(
        f"[dim]{data['count']} correction(s) of {data['program']}, {data['agreed']} agreed with its answer; "
        f"{data['rows']} rows[/dim]",
        highlight=False,
    )
