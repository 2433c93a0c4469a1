"""``dspyrt datasets``: put, list, show and remove dataset versions (:mod:`dspyrt.runtime.datasets`).

``put`` reads a file (:mod:`dspyrt.runtime.dataset_files`: JSON Lines, CSV, JSON, Parquet, or JSON Lines on stdin) and
prints ``NAME@VERSION``; the version is a hash of the content, so the same rows again print the same version.
``rm`` asks the deploy agent (``loop-deploy``, over the bus) which deployed program versions were built on the
dataset version, and refuses while an active or canary version was; without an answer it refuses unless ``--force``.

Exit codes: 0 done, 1 the command failed (one line on stderr: a bad file or row, an unknown dataset, a refused
``rm``), 2 a usage error or no NATS reachable. The datasets live in JetStream: run these as a user with JetStream
access (the deploy's ``admin``), not through the client gateway.

``dspyrt.runtime.cli`` registers ``datasets_app``: ``app.add_typer(datasets_app, name="datasets")``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Column, Table
from rich.text import Text

from dspyrt.runtime.cli_common import ConfigOption, JsonOption, fail, with_client
from dspyrt.runtime.cli_output import cell, console, err, plural, print_table, size, when

if TYPE_CHECKING:  # imported by the commands: runtime.cli starts without the bus (NATS)
    from dspyrt.runtime.client import Client
    from dspyrt.runtime.datasets import DatasetIndex, DatasetManifest, DatasetRef

DEPLOY_AGENT = "loop-deploy"
# How long rm waits for each answer of the deploy agent.
DEPLOY_TIMEOUT = 5.0
REMOVE_ACTION = "dataset.remove"
MAX_HEAD = 1000

datasets_app = typer.Typer(
    help="Datasets: versioned example sets in the object store (put, list, show, rm).", no_args_is_help=True
)


# ------------------------------------------------------------------------------------------- arguments


def _dataset_name(text: str) -> str:
    from dspyrt.runtime.datasets import NAME

    if not NAME.match(text):
        raise typer.BadParameter(f"{text[:80]!r}: a dataset name is 1-80 letters, digits, '_' or '-'")
    return text


def _reference(text: str) -> DatasetRef:
    """``NAME``, ``NAME@VERSION``, or the same with ``dataset:`` in front."""
    from dspyrt.bus import MessageValidationError
    from dspyrt.runtime.datasets import DatasetRef

    try:
        return DatasetRef.parse(text if text.startswith("dataset:") else f"dataset:{text}")
    except MessageValidationError as exc:
        raise typer.BadParameter(exc.message, param_hint="'NAME[@VERSION]'") from None


def _pinned_reference(text: str) -> DatasetRef:
    ref = _reference(text)
    if not ref.pinned:
        raise typer.BadParameter(
            f"say which version: {ref.name}@VERSION (see 'dspyrt datasets show {ref.name}')",
            param_hint="'NAME@VERSION'",
        )
    return ref


NameArgument = Annotated[
    str, typer.Argument(parser=_dataset_name, metavar="NAME", help="dataset name: letters, digits, '_' or '-'")
]


# -------------------------------------------------------------------------------------------- summaries


def manifest_summary(manifest: DatasetManifest) -> dict[str, Any]:
    """What ``put --json`` prints (and ``show --json`` starts with)."""
    return {
        "name": manifest.name,
        "version": manifest.version,
        "reference": str(manifest.ref),
        "rows": manifest.rows,
        "bytes": manifest.bytes,
        "fields": manifest.fields,
        "parts": len(manifest.parts),
        "created_at": manifest.created_at,
        "source": manifest.source,
    }


def _index_summary(index: DatasetIndex) -> dict[str, Any]:
    latest = index.versions[-1]
    return {
        "name": index.name,
        "version": latest.version,
        "versions": len(index.versions),
        "rows": latest.rows,
        "bytes": latest.bytes,
        "fields": latest.fields,
        "created_at": latest.created_at,
    }


# --------------------------------------------------------------------------------------------- commands


@datasets_app.command("put")
def put_command(
    name: NameArgument,
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="a .jsonl, .ndjson, .csv, .json or .parquet file; - reads stdin")
    ],
    as_json: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """Store FILE's rows as a version of NAME and print NAME@VERSION (the same content again: the same version)."""
    from dspyrt.bus import DspyrtError, MessageValidationError
    from dspyrt.runtime.dataset_files import STDIN, read_rows

    source = "<stdin>" if str(file) == STDIN else str(file)
    try:
        rows = read_rows(file)
    except DspyrtError as exc:
        raise fail(exc) from None

    async def body(client: Client) -> DatasetManifest:
        try:
            return await client.put_dataset(name, rows, source=source)
        except MessageValidationError as exc:  # bad rows: say which file they are in
            raise MessageValidationError(f"{source}: {exc.message}", exc.field_errors) from exc

    manifest = with_client(config_file, body, failure_exit=1)
    if as_json:
        console.print_json(json.dumps(manifest_summary(manifest)))
    else:
        console.print(manifest.ref.label, highlight=False)


@datasets_app.command("list")
def list_command(as_json: JsonOption = False, config_file: ConfigOption = None) -> None:
    """Every dataset: its newest version, how many versions, rows, size and when it was stored."""

    async def body(client: Client) -> list[DatasetIndex]:
        return await (await client.datasets()).indexes()

    indexes = with_client(config_file, body, failure_exit=1)
    if as_json:
        console.print_json(json.dumps([_index_summary(index) for index in indexes]))
        return
    if not indexes:
        console.print("no datasets (store one with 'dspyrt datasets put NAME FILE')")
        return
    table = Table(Column("name", no_wrap=True), Column("newest version", no_wrap=True), "versions", "rows", "size",
                  Column("created", no_wrap=True))  # fmt: skip
    for index in indexes:
        latest = index.versions[-1]
        table.add_row(index.name, latest.version, str(len(index.versions)), str(latest.rows), size(latest.bytes),
                      when(latest.created_at))  # fmt: skip
    print_table(table)


@datasets_app.command("show")
def show_command(
    reference: Annotated[
        str, typer.Argument(metavar="NAME[@VERSION]", help="a dataset (its newest version) or a version")
    ],
    head: Annotated[int, typer.Option("--head", min=0, max=MAX_HEAD, help="how many of its first rows to show")] = 5,
    as_json: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """One dataset version: rows, size, fields, where it came from, the name's other versions, and its first rows."""

    ref = _reference(reference)  # parsed here: the signature's types must not need runtime.datasets (NATS) at start

    async def body(client: Client) -> tuple[DatasetManifest, DatasetIndex | None, list[dict[str, Any]]]:
        store = await client.datasets()
        manifest = await store.manifest(ref)
        index = next((i for i in await store.indexes() if i.name == manifest.name), None)
        return manifest, index, await store.rows(manifest.ref, 0, head)

    manifest, index, rows = with_client(config_file, body, failure_exit=1)
    versions = [v.version for v in reversed(index.versions)] if index else []  # newest first
    if as_json:
        console.print_json(json.dumps(manifest_summary(manifest) | {"versions": versions, "head": rows}))
        return
    console.print(Text.assemble((str(manifest.ref), "bold")))
    facts = Table.grid(padding=(0, 2))
    facts.add_row("  rows", str(manifest.rows))
    facts.add_row("  size", f"{size(manifest.bytes)} in {plural(len(manifest.parts), 'part')}")
    facts.add_row("  fields", Text(", ".join(manifest.fields)))
    facts.add_row("  created", when(manifest.created_at))
    if manifest.source:
        facts.add_row("  source", Text(manifest.source))
    facts.add_row("  versions", _versions_line(manifest.version, versions))
    console.print(facts)
    if not rows:
        return
    console.print(f"first {len(rows)} of {plural(manifest.rows, 'row')}")
    table = Table("row", *manifest.fields)
    for number, row in enumerate(rows, start=1):
        table.add_row(str(number), *(cell(row.get(f)) for f in manifest.fields))
    console.print(table)


def _versions_line(version: str, versions: list[str], shown: int = 8) -> str:
    """``3: 1a2b3c4d5e6f (newest, this one), ...``; versions newest first."""
    if not versions:
        return "this one is no longer in the index"
    marks = []
    for i, v in enumerate(versions[:shown]):
        notes = (["newest"] if i == 0 else []) + (["this one"] if v == version else [])
        marks.append(v + (f" ({', '.join(notes)})" if notes else ""))
    more = f", and {len(versions) - shown} older" if len(versions) > shown else ""
    return f"{len(versions)}: {', '.join(marks)}{more}"


# ----------------------------------------------------------------------------------------------- remove


@dataclass
class DatasetUses:
    """The deployed program versions built on one dataset version, as the deploy agent reports them."""

    deployed: list[str] = field(default_factory=list)  # "qa-bot v3 (active)", "qa-bot v4 (canary)"
    earlier: list[str] = field(default_factory=list)  # versions no longer active or canary: "qa-bot v1"


def _labels(version: dict[str, Any]) -> set[str]:
    return {str(label).removeprefix("dataset:") for label in version.get("datasets") or []}


async def dataset_uses(client: Client, ref: DatasetRef) -> DatasetUses:
    """Ask ``loop-deploy`` which program versions name ``ref`` among their datasets (its active and canary
    versions, and the others). Raises when it does not answer, or answers something unexpected."""
    from dspyrt.bus import DspyrtError

    uses = DatasetUses()
    listing = await client.call(DEPLOY_AGENT, "list", {}, timeout=DEPLOY_TIMEOUT)
    for listed in listing["programs"]:
        program = str(listed["program"])
        try:
            detail = await client.call(DEPLOY_AGENT, "show", {"program": program}, timeout=DEPLOY_TIMEOUT)
        except DspyrtError as exc:
            if exc.code == "not_found":  # undeployed since the list
                continue
            raise
        pointer = detail.get("pointer") or listed
        live: set[int] = set()
        for role in ("active", "canary"):
            version = pointer.get(role)
            if version and ref.label in _labels(version):
                uses.deployed.append(f"{program} v{version['version']} ({role})")
                live.add(int(version["version"]))
        for version in detail.get("versions", []):
            if int(version["version"]) not in live and ref.label in _labels(version):
                uses.earlier.append(f"{program} v{version['version']}")
    return uses


@datasets_app.command("rm")
def rm_command(
    reference: Annotated[str, typer.Argument(metavar="NAME@VERSION", help="the version to remove")],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="remove it even when loop-deploy does not answer (a version it reports in use is never removed)",
        ),
    ] = False,
    as_json: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """Remove one dataset version; refused while a deployed program's active or canary version was built on it.

    Tasks already submitted with it (pinned at submit) fail when they read it afterwards."""
    from dspyrt.bus import DspyrtError
    from dspyrt.bus.audit import record_audit

    ref = _pinned_reference(reference)

    async def body(client: Client) -> tuple[DatasetManifest, DatasetUses | None]:
        store = await client.datasets()
        await store.manifest(ref)  # an unknown version fails before anyone is asked
        try:
            uses: DatasetUses | None = await dataset_uses(client, ref)
        except (DspyrtError, KeyError, TypeError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, DspyrtError) else f"an unexpected answer: {type(exc).__name__} {exc}"
            if not force:
                raise DspyrtError(
                    f"{DEPLOY_AGENT} did not answer ({reason}): cannot tell whether a deployed program uses "
                    f"{ref.label}; nothing was removed. Start {DEPLOY_AGENT}, or pass --force to remove it unchecked",
                    code="unchecked",
                ) from exc
            warning = f"{DEPLOY_AGENT} did not answer ({reason}): removing {ref.label} unchecked"
            err.print(f"[yellow]warning[/yellow] {escape(warning)}", soft_wrap=True)
            uses = None
        if uses is not None and uses.deployed:
            raise DspyrtError(
                f"{ref.label} is in use by deployed program {', '.join(uses.deployed)}: nothing was removed. "
                "Roll back or promote a version built on other data first ('dspyrt programs show PROGRAM')",
                code="dataset_in_use",
            )
        removed = await store.remove(ref)
        try:
            await record_audit(
                client.bus, REMOVE_ACTION, ref.label, identity=client.identity,
                detail={"rows": removed.rows, "checked": uses is not None},
            )  # fmt: skip
        except Exception as exc:  # removed already: say so, and that the audit trail does not show it
            raise DspyrtError(
                f"{ref.label} was removed, but recording it in the audit trail failed ({type(exc).__name__}: {exc})",
                code="audit_failed",
            ) from exc
        return removed, uses

    removed, uses = with_client(config_file, body, failure_exit=1)
    if as_json:
        outcome = {"removed": True, "checked": uses is not None, "earlier_versions": uses.earlier if uses else []}
        console.print_json(json.dumps(manifest_summary(removed) | outcome))
        return
    console.print(
        f"removed {ref.label} ({plural(removed.rows, 'row')}, {plural(len(removed.parts), 'part')})", highlight=False
    )
    if uses is not None and uses.earlier:
        console.print(
            f"note: {', '.join(uses.earlier)} (not active or canary now) {'was' if len(uses.earlier) == 1 else 'were'}"
            f" built on it", highlight=False,
        )  # fmt: skip
