"""What the CLI prints with: its two consoles, the tables of its listings, and how a value becomes a cell.

Every command module prints through ``console`` (stdout) and ``err`` (stderr, where errors and notices go), so a
command's output can be captured in one place (typer's ``CliRunner`` swaps ``sys.stdout``; the consoles follow).
Imports only rich and the standard library: ``dspyrt --help`` loads it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.measure import Measurement
from rich.table import Column, Table
from rich.text import Text

console = Console()
err = Console(stderr=True)

# What print_table leaves a wrapping column at least (rich folds its words to fit).
MIN_FOLDED_WIDTH = 6
# A cell shows this many characters of a value (--json has it whole).
CELL_CHARS = 60
# Measuring a table's natural width: wider than any terminal.
_UNLIMITED = 100_000


def listing(*columns: Column | str, **options: Any) -> Table:
    """The table of a listing (tasks, agents, dead letters, programs): columns apart by two spaces under one rule,
    no borders, as ``docker ps`` prints them, so that an id is whole and double-clicks, greps and pastes as it is."""
    return Table(*columns, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True, **options)


def print_table(table: Table | Group, *, wide: bool = False, to: Console | None = None) -> None:
    """Print a table (or a group of them) without cutting a cell.

    Rich fits a table to the console by wrapping its cells, and cuts what it cannot wrap (``c8bb0b53244b…``). Here
    the ``no_wrap`` columns (ids, names, numbers) are kept whole and the others fold a word too long for them
    rather than cut it; when even that does not fit the console, the table is printed at its full width, one line
    per row (the terminal wraps the lines), as it is with ``wide`` (wide terminals, grep, copy-paste)."""
    target = to or console
    tables = [table] if isinstance(table, Table) else [t for t in table.renderables if isinstance(t, Table)]
    for t in tables:
        for column in t.columns:
            if not column.no_wrap:
                column.overflow = "fold"
    if not wide and all(_narrowest(target, t) <= target.width for t in tables):
        target.print(table)
        return
    unlimited = target.options.update_width(_UNLIMITED)
    width = max((Measurement.get(target, unlimited, t).maximum for t in tables), default=0)
    if width <= target.width:
        target.print(table)
        return
    wider = Console(
        file=target.file, width=width, force_terminal=target.is_terminal, no_color=target.no_color,
        color_system=target.color_system or None, highlight=False,  # type: ignore[arg-type]
    )  # fmt: skip
    wider.print(table)


def _narrowest(target: Console, table: Table) -> int:
    """The narrowest width at which ``table``'s no_wrap columns are whole and every other is MIN_FOLDED_WIDTH."""
    folding = [(column, column.max_width) for column in table.columns if not column.no_wrap]
    for column, _ in folding:
        column.max_width = MIN_FOLDED_WIDTH
    try:
        return Measurement.get(target, target.options.update_width(_UNLIMITED), table).minimum
    finally:
        for column, max_width in folding:
            column.max_width = max_width


# ------------------------------------------------------------------------------------------------ values


def clip(text: str, limit: int = CELL_CHARS) -> str:
    """``text`` on one line (its whitespace runs made one space), cut to ``limit`` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clipped_json(value: Any, limit: int = CELL_CHARS) -> str:
    """A JSON value on one line, clipped: a string as it is, anything else as JSON."""
    return clip(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False), limit)


def cell(value: Any) -> Text:
    """A JSON value as a table cell (``clipped_json``; nothing for null), never read as markup."""
    return Text("") if value is None else Text(clipped_json(value))


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def size(n: float) -> str:
    """A byte count for reading: ``512 B``, ``1.5 KiB``, ``3.0 MiB``."""
    units = ("B", "KiB", "MiB", "GiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def duration(seconds: float) -> str:
    """``90 s``, ``1.5 min``, ``2 h``."""
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def when(timestamp: float) -> str:
    """A Unix time as local ``YYYY-MM-DD HH:MM:SS``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
