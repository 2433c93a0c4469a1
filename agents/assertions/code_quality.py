"""The code-quality validator: Python in the request's ``code_fields``, analyzed statically — never run.

Checks, per code field of each case:

* ``syntax`` — the field holds Python source that parses (``ast.parse``);
* ``lint`` — ruff's findings (``ruff check --isolated --ignore-noqa``, so neither a config file nor a
  ``# noqa`` comment in the code can switch rules off) number at most ``max_findings``;
* ``complexity`` — no function, method or module body has a cyclomatic complexity (radon) above
  ``max_complexity``.

Ruff runs once per request over a temporary directory holding one file per code field, from the ``ruff``
executable beside ``sys.executable`` (or on ``PATH``).
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from radon.visitors import ComplexityVisitor

from dspyrt.agents.assertions.collector import ResultCollector
from dspyrt.agents.assertions.models import (
    AssertionResult,
    AssertionType,
    CodeQualityOptions,
    Severity,
    ValidationRequest,
    clip,
)

RUFF_TIMEOUT = 60.0
"""Seconds one ruff run may take."""

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
# ``warnings.catch_warnings`` changes process-wide state: analyses that silence the parser's warnings about
# the analyzed code (invalid escapes, ...) take turns.
_PARSE_LOCK = threading.Lock()
_SUMMARIES = {
    "syntax": "{n} code field(s) parse",
    "lint": "{n} code field(s) within the lint budget",
    "complexity": "{n} code field(s) within the complexity limit",
}


@dataclass(frozen=True)
class CodeItem:
    """The code of one field of one case: its source, or why there is none to analyze."""

    example: int
    field: str
    source: str | None
    problem: str | None = None

    @property
    def filename(self) -> str:
        return f"case{self.example}_{self.field}.py"


@dataclass(frozen=True)
class ParsedCode:
    """A code item that parses, with its syntax tree."""

    item: CodeItem
    tree: ast.Module


def code_items(request: ValidationRequest, options: CodeQualityOptions) -> list[CodeItem]:
    """Every code field of every case, fences stripped, or the reason it cannot be analyzed."""
    items: list[CodeItem] = []
    for index, case in enumerate(request.cases):
        for name in request.code_fields:
            value = case.outputs.get(name)
            if value is None:
                items.append(CodeItem(index, name, None, f"code field {name!r} is missing"))
            elif not isinstance(value, str):
                items.append(CodeItem(index, name, None, f"code field {name!r} holds a {type(value).__name__}"))
            else:
                source = _strip_fences(value) if options.strip_fences else value
                if len(source) > options.max_code_chars:
                    problem = (
                        f"code field {name!r} is {len(source)} characters, over the {options.max_code_chars} analyzed"
                    )
                    items.append(CodeItem(index, name, None, problem))
                else:
                    items.append(CodeItem(index, name, source))
    return items


def parse_code(item: CodeItem) -> ParsedCode | SyntaxError:
    """The item's syntax tree, or the syntax error (``ast.parse``: nothing is compiled or run)."""
    if item.source is None:
        raise ValueError("no source to parse")
    try:
        with quiet_parser():
            tree = ast.parse(item.source, filename=item.filename)
    except SyntaxError as exc:
        return exc
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, absurd nesting
        error = SyntaxError(f"{type(exc).__name__}: {exc}")
        error.lineno = None
        return error
    return ParsedCode(item, tree)


@contextlib.contextmanager
def quiet_parser() -> Iterator[None]:
    """Silence warnings the parser raises about the analyzed code (one thread at a time)."""
    with _PARSE_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def find_ruff() -> Path | None:
    """The ``ruff`` executable beside the running interpreter, else the one on ``PATH``."""
    beside = Path(sys.executable).parent / ("ruff.exe" if sys.platform == "win32" else "ruff")
    if beside.is_file():
        return beside
    found = shutil.which("ruff")
    return Path(found) if found else None


class CodeQualityValidator:
    """Syntax, ruff lint findings and cyclomatic complexity of the code fields.

    ``ruff``: the executable to run (default: :func:`find_ruff`). Thresholds come from each request's
    :class:`~dspyrt.agents.assertions.models.CodeQualityOptions`.
    """

    name: ClassVar[str] = "code_quality"

    def __init__(self, ruff: Path | str | None = None, *, timeout: float = RUFF_TIMEOUT) -> None:
        self.ruff = Path(ruff) if ruff is not None else find_ruff()
        self.timeout = timeout

    def validate(self, request: ValidationRequest) -> list[AssertionResult]:
        """Analyze every code field of every case."""
        options = request.code_quality
        collector = ResultCollector(
            AssertionType.CODE_QUALITY, limit=request.max_results_per_check, summaries=_SUMMARIES
        )
        parsed: list[ParsedCode] = []
        for item in code_items(request, options):
            collector.checked("syntax")
            if item.source is None:
                collector.fail("syntax", item.problem or "no code", example=item.example, field=item.field)
                continue
            outcome = parse_code(item)
            if isinstance(outcome, SyntaxError):
                collector.fail(
                    "syntax",
                    f"code field {item.field!r} does not parse: {outcome.msg}"
                    + (f" (line {outcome.lineno})" if outcome.lineno else ""),
                    evidence=(outcome.text or "").strip() or None,
                    example=item.example,
                    field=item.field,
                )
                continue
            parsed.append(outcome)
        if parsed:
            self._lint(parsed, options, collector)
            for code in parsed:
                _complexity(code, options, collector)
        return collector.results()

    def _lint(self, parsed: list[ParsedCode], options: CodeQualityOptions, collector: ResultCollector) -> None:
        try:
            findings = self.run_ruff([p.item for p in parsed], options)
        except RuntimeError as exc:
            collector.fail("lint", f"lint not run: {exc}")
            return
        for code in parsed:
            item = code.item
            collector.checked("lint")
            found = findings.get(item.filename, [])
            if len(found) <= options.max_findings:
                continue
            rules = sorted({str(f.get("code") or "syntax") for f in found})
            worst = max((_rule_severity(f.get("code")) for f in found), key=lambda s: s.rank)
            collector.fail(
                "lint",
                f"code field {item.field!r} has {len(found)} lint finding(s), over the {options.max_findings} "
                f"allowed: {', '.join(rules)}",
                severity=worst,
                evidence="; ".join(_describe_finding(f) for f in found),
                example=item.example,
                field=item.field,
            )

    def run_ruff(self, items: list[CodeItem], options: CodeQualityOptions) -> dict[str, list[dict[str, Any]]]:
        """Ruff's JSON findings for ``items``, by file name; ``RuntimeError`` when ruff cannot run."""
        if self.ruff is None:
            raise RuntimeError("the ruff executable was not found (install ruff)")
        with tempfile.TemporaryDirectory(prefix="dspyrt-ruff-") as folder:
            root = Path(folder)
            for item in items:
                source = item.source or ""
                (root / item.filename).write_text(source if source.endswith("\n") else source + "\n", encoding="utf-8")
            command = [
                str(self.ruff),
                "check",
                "--isolated",
                "--no-cache",
                "--ignore-noqa",
                "--no-respect-gitignore",
                "--exit-zero",
                "--output-format",
                "json",
                "--line-length",
                str(options.line_length),
                "--select",
                ",".join(options.select),
                *(["--ignore", ",".join(options.ignore)] if options.ignore else []),
                "--",
                str(root),
            ]
            try:
                # A fixed argument list and no shell: the analyzed code is only ever read, by ruff.
                done = subprocess.run(command, cwd=root, capture_output=True, timeout=self.timeout, check=False)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"ruff took more than {self.timeout:g}s") from None
            except OSError as exc:
                raise RuntimeError(f"ruff could not be started: {exc}") from exc
        if done.returncode != 0:
            raise RuntimeError(f"ruff failed (exit {done.returncode}): {clip(done.stderr.decode(errors='replace'))}")
        try:
            reported = json.loads(done.stdout or b"[]")
        except ValueError as exc:
            raise RuntimeError(f"ruff printed no JSON: {exc}") from exc
        by_file: dict[str, list[dict[str, Any]]] = {}
        for finding in reported if isinstance(reported, list) else []:
            if isinstance(finding, dict):
                by_file.setdefault(Path(str(finding.get("filename", ""))).name, []).append(finding)
        return by_file


def _strip_fences(text: str) -> str:
    match = _FENCE.search(text)
    return match.group(1) if match else text


def _rule_severity(code: Any) -> Severity:
    rule = str(code or "")
    return Severity.ERROR if not rule or rule.startswith(("F", "E9")) else Severity.WARNING


def _describe_finding(finding: dict[str, Any]) -> str:
    location = finding.get("location") or {}
    row = location.get("row") if isinstance(location, dict) else None
    return f"line {row}: {finding.get('code') or 'syntax'} {finding.get('message', '')}"


def _complexity(code: ParsedCode, options: CodeQualityOptions, collector: ResultCollector) -> None:
    item = code.item
    collector.checked("complexity")
    visitor = ComplexityVisitor.from_ast(code.tree)
    blocks: list[tuple[str, int, int]] = [("<module>", 1, int(visitor.complexity))]
    blocks.extend(_functions(visitor.functions, ""))
    for klass in visitor.classes:
        blocks.extend(_class_blocks(klass, ""))
    over = sorted((b for b in blocks if b[2] > options.max_complexity), key=lambda b: -b[2])
    if over:
        listed = ", ".join(f"{name} ({value}, line {line})" for name, line, value in over)
        collector.fail(
            "complexity",
            f"code field {item.field!r}: cyclomatic complexity over {options.max_complexity} in {listed}",
            severity=options.complexity_severity,
            evidence=listed,
            example=item.example,
            field=item.field,
        )


def _functions(functions: Any, prefix: str) -> Iterator[tuple[str, int, int]]:
    for function in functions:
        name = f"{prefix}{function.name}"
        yield name, int(function.lineno), int(function.complexity)
        yield from _functions(function.closures, f"{name}.")


def _class_blocks(klass: Any, prefix: str) -> Iterator[tuple[str, int, int]]:
    name = f"{prefix}{klass.name}"
    yield from _functions(klass.methods, f"{name}.")
    for inner in klass.inner_classes:
        yield from _class_blocks(inner, f"{name}.")
