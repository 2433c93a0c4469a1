"""Dataset rows from a file: what ``dspyrt datasets put NAME FILE`` reads.

The format is the file's extension:

* ``.jsonl`` / ``.ndjson``: JSON Lines, one JSON object per line; blank lines are skipped.
* ``.csv``: a header row of field names, then one row per line; every value stays a string (``""`` for an empty
  cell). A row must have exactly as many cells as the header (blank lines are skipped).
* ``.json``: one JSON document, either a list of objects or an object holding that list under exactly one of the
  keys ``examples``, ``rows`` or ``data`` (other keys beside it are ignored).
* ``.parquet``: read with ``pyarrow`` when it is installed (``pip install pyarrow``); dates and times become ISO
  strings, decimals strings.
* ``-``: JSON Lines from standard input.

Files are read as UTF-8 (a leading byte-order mark is allowed). A file that cannot be parsed is a
:class:`DatasetFileError` naming the file and the line (or row). Whether each row is a valid dataset row (field
names, JSON values, sizes) is checked by :meth:`dspyrt.runtime.datasets.DatasetStore.put`, which numbers rows from 1 in
file order: for a CSV, row 1 is the first line after the header.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import io
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from dspyrt.bus import DspyrtError
from dspyrt.runtime.datasets import FIELD_NAME, MAX_ROW_BYTES

__all__ = ["FORMATS", "JSON_LIST_KEYS", "STDIN", "DatasetFileError", "read_rows"]

STDIN = "-"
FORMATS: dict[str, str] = {
    ".jsonl": "JSON Lines",
    ".ndjson": "JSON Lines",
    ".csv": "CSV with a header row",
    ".json": "a JSON list of objects (or an object with an 'examples', 'rows' or 'data' list)",
    ".parquet": "Parquet (needs pyarrow)",
}
# The keys under which a .json object may hold its rows.
JSON_LIST_KEYS = ("examples", "rows", "data")


class DatasetFileError(DspyrtError):
    """A dataset file that cannot be read or parsed; ``line`` is 1-based when one line is at fault."""

    code = "invalid_file"

    def __init__(self, source: str, problem: str, *, line: int | None = None) -> None:
        where = f"{source} line {line}" if line is not None else source
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.line = line


def read_rows(path: Path, *, stdin: TextIO | None = None) -> list[dict[str, Any]]:
    """The rows of a dataset file, by its extension (see the module's docstring); ``Path("-")`` reads JSON Lines
    from ``stdin`` (default: ``sys.stdin``)."""
    if str(path) == STDIN:
        source = stdin if stdin is not None else sys.stdin
        return _json_lines("<stdin>", source.read().splitlines())
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        known = "; ".join(f"{ext} ({what})" for ext, what in FORMATS.items())
        raise DatasetFileError(
            str(path), f"unknown format {suffix or '(no extension)'!r}: use {known}; or - for JSON Lines on stdin"
        )
    if suffix == ".parquet":
        return _parquet(path)
    text = _text(path)
    if suffix == ".csv":
        return _csv(str(path), text)
    if suffix == ".json":
        return _json(str(path), text)
    return _json_lines(str(path), text.splitlines())


def _text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetFileError(str(path), f"cannot read it ({exc.strerror or exc})") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetFileError(str(path), f"not UTF-8 text (byte {exc.start})", line=line) from exc


def _json_lines(source: str, lines: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DatasetFileError(source, f"not JSON ({_json_problem(exc)})", line=number) from exc
        if not isinstance(row, dict):
            raise DatasetFileError(source, f"a JSON {_json_type(row)}, not an object", line=number)
        rows.append(row)
    return rows


def _json(source: str, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetFileError(source, f"not JSON ({exc.msg}, column {exc.colno})", line=exc.lineno) from exc
    except ValueError as exc:
        raise DatasetFileError(source, f"not JSON ({exc})") from exc
    if isinstance(data, dict):
        keys = [k for k in JSON_LIST_KEYS if isinstance(data.get(k), list)]
        if len(keys) != 1:
            found = f"it has {', '.join(repr(k) for k in keys)}" if keys else "it has none"
            raise DatasetFileError(
                source,
                "a JSON object holds its rows as a list under exactly one of "
                f"{', '.join(repr(k) for k in JSON_LIST_KEYS)} ({found})",
            )
        data = data[keys[0]]
    if not isinstance(data, list):
        raise DatasetFileError(source, f"a JSON {_json_type(data)}: give a list of objects")
    # Items that are not objects are named by their row number when the rows are stored.
    return data


def _csv(source: str, text: str) -> list[dict[str, Any]]:
    # The module-wide limit (128 KiB by default) would refuse cells a row may hold.
    if csv.field_size_limit() < MAX_ROW_BYTES:
        csv.field_size_limit(MAX_ROW_BYTES)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise DatasetFileError(source, "empty: a CSV dataset starts with a header row of field names")
        _check_header(source, header)
        rows: list[dict[str, Any]] = []
        for cells in reader:
            if not cells:
                continue
            if len(cells) != len(header):
                more_or_fewer = "more" if len(cells) > len(header) else "fewer"
                raise DatasetFileError(
                    source,
                    f"{len(cells)} cells, {more_or_fewer} than the header's {len(header)} ({', '.join(header)})",
                    line=reader.line_num,
                )
            rows.append(dict(zip(header, cells, strict=True)))
    except csv.Error as exc:
        raise DatasetFileError(source, f"not CSV ({exc})", line=reader.line_num) from exc
    return rows


def _check_header(source: str, header: list[str]) -> None:
    seen: set[str] = set()
    for column, name in enumerate(header, start=1):
        if not FIELD_NAME.match(name):
            problem = "is empty" if not name.strip() else f"{name!r} is not a field name"
            raise DatasetFileError(
                source,
                f"header column {column} {problem} (letters, digits and '_', not starting with a digit)",
                line=1,
            )
        if name in seen:
            raise DatasetFileError(source, f"header column {column}: field {name!r} appears twice", line=1)
        seen.add(name)


def _parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DatasetFileError(
            str(path), "reading Parquet needs pyarrow, which is not installed: pip install pyarrow"
        ) from exc
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowIOError is an OSError, its ArrowInvalid a ValueError
        raise DatasetFileError(str(path), f"cannot read it as Parquet ({exc})") from exc
    return [{key: _plain(value) for key, value in row.items()} for row in table.to_pylist()]


def _plain(value: Any) -> Any:
    """Parquet's typed values as JSON's (the rest is left for the row check to name)."""
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _json_problem(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg}, column {exc.colno}"
    return str(exc)


def _json_type(value: Any) -> str:
    names = {list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
