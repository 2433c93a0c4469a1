"""``dspyrt roles``: list, show and refine agent roles, through the ``roles`` agent on the bus.

Nothing here knows about DSPy or the agents' code: payloads are plain JSON, validated by the roles agent, whose
structured errors (code, message, field errors) are printed as they come.

``dspyrt.runtime.cli`` registers ``roles_app``: ``app.add_typer(roles_app, name="roles")``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Column, Table

from dspyrt.runtime.cli_common import ConfigOption, JsonOption, one_line_errors, print_error, with_client
from dspyrt.runtime.cli_input import json_type, parse_json, read_text
from dspyrt.runtime.cli_output import console, print_table, when

if TYPE_CHECKING:
    from dspyrt.runtime.client import Client

ROLES_AGENT = "roles"
REFINE_TASK = "refine-role"

roles_app = typer.Typer(help="Agent roles: list, show and refine them (through the roles agent).", no_args_is_help=True)


def _call(config_file: Path | None, endpoint: str, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One request to the roles agent; its error reply is one line with every field error (exit code 2)."""

    async def body(client: Client) -> dict[str, Any]:
        return await client.call(ROLES_AGENT, endpoint, payload, timeout=timeout)

    return with_client(config_file, body)


def _read_role_file(source: str) -> dict[str, Any]:
    """A role definition (JSON object), or ``{"role": {...}, "target_context": ...}``; ``-`` reads stdin."""
    from dspyrt.bus import DspyrtError

    where = "stdin" if source == "-" else source
    data = parse_json(read_text(source, "role file"), where)
    if not isinstance(data, dict):
        raise DspyrtError(f"{where}: a role file holds a JSON object, not {json_type(data)}", code="invalid_input")
    return data if isinstance(data.get("role"), dict) else {"role": data}


def _label(pointer: dict[str, Any]) -> str:
    return f"v{pointer['latest']}"


@roles_app.command("list")
def roles_list(as_json: JsonOption = False, config_file: ConfigOption = None) -> None:
    """Every stored role with its latest version and score."""
    data = _call(config_file, "list", {})
    if as_json:
        console.print_json(json.dumps(data))
        return
    table = Table(Column("role", no_wrap=True), "latest", "type", "target context", "score",
                  Column("updated", no_wrap=True))  # fmt: skip
    for p in data["roles"]:
        score = f"{p['score']:.2f}"
        table.add_row(p["name"], _label(p), p["role_type"], p["target_context"], score, when(p["updated_at"]))
    print_table(table)
    if not data["roles"]:
        console.print("[yellow]no roles stored yet[/yellow] (dspyrt roles refine FILE)")


@roles_app.command("show")
def roles_show(
    name: Annotated[str, typer.Argument(help="role name")],
    version: Annotated[int | None, typer.Option("--version", help="this version instead of the latest")] = None,
    as_json: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """One stored role: the refined definition, and how it was refined."""
    payload: dict[str, Any] = {"name": name} | ({"version": version} if version is not None else {})
    data = _call(config_file, "get", payload)
    if as_json:
        console.print_json(json.dumps(data))
        return
    console.print(
        f"[bold]{data['name']}[/bold] v{data['version']} (latest v{data['latest']}; "
        f"versions {', '.join(f'v{v}' for v in data['versions'])})"
    )
    _print_role(data["role"])
    _print_refinement(data["refinement"])


@roles_app.command("refine")
def roles_refine(
    file: Annotated[str, typer.Argument(help="a role definition (JSON file), or - for stdin")],
    context: Annotated[
        str | None, typer.Option("--context", help="target context (default: the file's, else 'solo developer')")
    ] = None,
    model: Annotated[str | None, typer.Option(help="pin a model (default: the switcher selects)")] = None,
    no_lm: Annotated[bool, typer.Option("--no-lm", help="run the deterministic checks alone")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="do not store a new version")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the result")] = 300.0,
    as_json: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """Refine a role for a target context, as a durable refine-role task; store it as the role's next version."""
    with one_line_errors():
        payload = _read_role_file(file)
    if context is not None:
        payload["target_context"] = context
    payload |= {"use_lm": not no_lm, "save": not dry_run} | ({"model": model} if model else {})

    async def body(client: Client) -> dict[str, Any]:
        # The role is checked first: a bad definition fails at once, with its field errors, and no task.
        await client.call(ROLES_AGENT, "check", {"role": payload["role"]})
        record = await client.run(REFINE_TASK, payload, timeout=timeout)
        return record.model_dump(mode="json")

    record = with_client(config_file, body)
    if record["status"] != "succeeded":
        error = record.get("error") or {}
        print_error(
            str(error.get("code")),
            f"refine-role task {record['id']} {record['status']}: {error.get('message')}",
            error.get("field_errors") or [],
        )
        raise typer.Exit(1)
    result = record["result"]
    if as_json:
        console.print_json(json.dumps(result))
        return
    stored = f"stored as v{result['version']}" if result.get("version") else "not stored (--dry-run)"
    console.print(f"[bold]{result['name']}[/bold] refined for '{result['target_context']}': {stored}")
    _print_role(result["after"])
    _print_refinement(result)


def _print_role(role: dict[str, Any]) -> None:
    console.print(f"  type    {role.get('custom_name') or role['role_type']}")
    console.print(f"  focus   {role['focus']}")
    console.print(f"  context {role['context']}")
    console.print("  responsibilities")
    for item in role["responsibilities"]:
        console.print(f"    - {item}")


def _print_refinement(result: dict[str, Any]) -> None:
    found = ", ".join(result["patterns_found"]) or "none"
    remaining = ", ".join(result["patterns_remaining"]) or "none"
    lm = (
        f"LM proposal {result['lm_score']:.2f} ({result['lm_calls']} call(s) on {result.get('model') or '-'})"
        if result.get("lm_used")
        else "no LM (checks only)"
    )
    console.print(f"  corporate patterns found: {found}; remaining: {remaining}")
    console.print(f"  score {result['score']:.2f}; {lm}")
    table = Table("change", "before", "after", "by", "note")
    for change in result["changes"]:
        if change["kind"] == "kept" and not change["note"]:
            continue
        table.add_row(
            change["kind"],
            change.get("before") or "",
            change.get("after") or "",
            change["source"],
            change.get("note") or "",
        )
    console.print(table)
    for warning in result.get("warnings") or []:
        console.print(f"  [yellow]![/yellow] {warning}")
