"""What the user hands a command: a file's text (``-``: stdin), JSON, a task file, a task's input.

Every mistake is a DspyrtError that says where it is (the file, the line and column) and what to write instead,
printed by the command as one line (exit code 2). The bus is imported when a mistake is raised, not at start.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def read_text(source: str, what: str = "file") -> str:
    """A file's text (``-``: stdin); a missing or unreadable one is a DspyrtError naming it and why."""
    from dspyrt.bus import DspyrtError, NotFoundError

    if source == "-":
        return sys.stdin.read()
    path = Path(source)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFoundError(f"{source}: no such {what}") from None
    except IsADirectoryError:
        raise DspyrtError(f"{source} is a directory, not a {what}", code="unreadable_file") from None
    except UnicodeDecodeError as exc:
        message = f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise DspyrtError(message, code="unreadable_file") from None
    except OSError as exc:
        raise DspyrtError(f"{source}: cannot read it ({exc.strerror or exc})", code="unreadable_file") from None


def parse_json(text: str, where: str) -> Any:
    """JSON, or a DspyrtError ``invalid_json`` naming where, the line and the column."""
    from dspyrt.bus import DspyrtError

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DspyrtError(
            f"{where}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", code="invalid_json"
        ) from None


def json_type(value: Any) -> str:
    """What a JSON value that is not an object is, for an error message: ``an array``, ``a string``, ..."""
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def read_task_file(path: Path) -> tuple[str, dict[str, Any]]:
    """A task file: ``{"kind": ..., "input": {...}}``."""
    from dspyrt.bus import DspyrtError

    data = parse_json(read_text(str(path), "task file"), str(path))
    if not (isinstance(data, dict) and isinstance(data.get("kind"), str) and isinstance(data.get("input"), dict)):
        raise DspyrtError(
            f'{path}: not a task file: write {{"kind": "<task kind>", "input": {{...}}}}', code="invalid_input"
        )
    return data["kind"], dict(data["input"])


def read_task_input(source: str, kind: str | None = None) -> dict[str, Any]:
    """A task's input: a JSON object, or a whole task file ``{"kind", "input"}`` whose kind must be ``kind``."""
    from dspyrt.bus import DspyrtError

    where = "stdin" if source == "-" else source
    data = parse_json(read_text(source), where)
    if not isinstance(data, dict):
        raise DspyrtError(f"{where}: the task input must be a JSON object, not {json_type(data)}", code="invalid_input")
    if set(data) >= {"kind", "input"} and isinstance(data["input"], dict):  # a whole task file: take its input
        if kind is not None and data["kind"] != kind:
            again = "-" if source == "-" else source
            article = "an" if str(data["kind"])[:1].lower() in "aeiou" else "a"
            raise DspyrtError(
                f"{where} is {article} {data['kind']!r} task file; submit it as: dspyrt submit {data['kind']} {again}",
                code="kind_mismatch",
            )
        return dict(data["input"])
    return data
