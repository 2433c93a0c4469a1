"""``dspyrt programs list | show | rollback | promote`` (through ``loop-deploy``) and ``dspyrt predict`` (through
``serving``): the deployed programs, their versions, and running one.

An unknown program's error names the deployed ones. Payloads are plain JSON, checked by the agents.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Column

from dspyrt.runtime.cli_common import ConfigOption, JsonOption, WideOption, one_line_errors, with_client
from dspyrt.runtime.cli_input import json_type, parse_json, read_text
from dspyrt.runtime.cli_output import console, listing, print_table, when

if TYPE_CHECKING:
    from dspyrt.runtime.client import Client

DEPLOY_AGENT = "loop-deploy"
SERVING_AGENT = "serving"
# How long an unknown program's error waits for the list of deployed ones.
KNOWN_PROGRAMS_TIMEOUT = 3.0
PREDICT_TIMEOUT = 60.0
# An example of what predict's INPUTS look like, clipped to this many characters of what was given.
INPUT_EXAMPLE_CHARS = 40

programs_app = typer.Typer(help="Deployed programs: list, show, rollback, promote.", no_args_is_help=True)


async def _with_known_programs(client: Client, call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """``call``; when it fails with ``not_found`` (an unknown program), the same error naming the deployed ones."""
    from dspyrt.bus import DspyrtError

    try:
        return await call
    except DspyrtError as exc:
        if exc.code != "not_found":
            raise
        try:
            deployed = await client.call(DEPLOY_AGENT, "list", {}, timeout=KNOWN_PROGRAMS_TIMEOUT)
            names = sorted(str(p["program"]) for p in deployed.get("programs", []))
        except Exception:  # the names are a hint: without them the error stands as it came
            raise exc from None
        known = f"deployed: {', '.join(names)}" if names else "no program is deployed yet"
        raise DspyrtError(f"{exc.message} ({known})", code=exc.code) from None


def _deploy_call(config_file: Path | None, endpoint: str, payload: dict[str, Any], as_json: bool) -> dict[str, Any]:
    async def body(client: Client) -> dict[str, Any]:
        return await _with_known_programs(client, client.call(DEPLOY_AGENT, endpoint, payload))

    data = with_client(config_file, body)
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
        table.add_row(p["program"], _version_label(p.get("active")), canary, when(p["updated_at"]), p.get("note", ""))
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
                      when(v["deployed_at"]))  # fmt: skip
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


# ---------------------------------------------------------------------------------------------- predict


def _predict_inputs(inputs: str) -> dict[str, Any]:
    """predict's INPUTS: a JSON object, ``@FILE`` (a file holding one) or ``-`` (stdin)."""
    from dspyrt.bus import DspyrtError

    if inputs == "-" or inputs.startswith("@"):
        where = "stdin" if inputs == "-" else inputs[1:]
        value = parse_json(read_text("-" if inputs == "-" else inputs[1:]), where)
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
            f"{where}: the inputs must be a JSON object of the program's input fields, not {json_type(value)}",
            code="invalid_input",
        )
    return value


def predict_command(
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
        call = client.call(SERVING_AGENT, "predict", payload, timeout=PREDICT_TIMEOUT)
        return await _with_known_programs(client, call)

    data = with_client(config_file, body)
    if as_json:
        console.print_json(json.dumps(data))
        return
    canary = " (canary)" if data.get("canary") else ""
    console.print(f"{program} v{data['version']}{canary} on {data['model']}", soft_wrap=True)
    console.print_json(json.dumps(data["outputs"]))
