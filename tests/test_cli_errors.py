"""A user's mistakes at the CLI: each is one line on stderr, ``error <code>: <message>``, with the right exit code
and no traceback (``--debug`` adds it). Every mistake runs the real ``dspyrt`` in its own process.

Also here: what ``dspyrt --help`` imports (a command starts fast when it loads neither NATS nor DSPy), task ids
given by a unique prefix, and the tables and cycle lines that must not hide or cut what the user needs.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from rich.console import Console
from rich.table import Column

from dspyrt.bus import Bus, ErrorBody, FieldError, Message, NotFoundError, TaskRecord, TaskStatus, TaskStore
from dspyrt.bus.errors import DspyrtError, RemoteError
from dspyrt.bus.tasks import pick_task_id
from dspyrt.runtime.agent import Agent, TaskContext, task
from dspyrt.runtime.cli_common import MAX_LISTED_FIELD_ERRORS, error_line
from dspyrt.runtime.cli_output import listing, print_table
from dspyrt.runtime.cli_results import print_cycle
from dspyrt.runtime.client import resolve_task_id
from dspyrt.runtime.config import IntegrationConfig
from tests.helpers import ROOT, hosting

pytestmark = pytest.mark.timeout(60)

DSPYRT = Path(sys.executable).parent / "dspyrt"
EXAMPLES = ROOT / "examples"
# What `dspyrt --help` must not import: NATS and the bus, the configuration, telemetry, DSPy and the agents.
NOT_AT_START = ("nats", "dspyrt.bus", "dspy", "dspyrt.agents", "litellm", "opentelemetry", "pydantic_settings",
                "dspyrt.runtime.config", "dspyrt.runtime.client", "dspyrt.runtime.telemetry",
                "dspyrt.runtime.traces")  # fmt: skip


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``dspyrt ARGS`` as a user runs it, in an 80-column terminal's environment."""
    return subprocess.run(
        [str(DSPYRT), *args], cwd=cwd, env={**os.environ, "COLUMNS": "80", **(env or {})}, input=stdin,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


async def arun(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``run``, without blocking the event loop (for tests whose agents run in this process)."""
    done = await anyio.run_process(
        [str(DSPYRT), *args], cwd=cwd, env={**os.environ, "COLUMNS": "80", **env}, check=False
    )
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def one_line_error(done: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """The command exited with ``exit_code`` and said why in one ``error <code>: ...`` line; that line."""
    assert done.returncode == exit_code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error "), lines[0]
    return lines[0]


def env_of(config: IntegrationConfig) -> dict[str, str]:
    return {
        "DSPYRT_NATS_URLS": ",".join(config.nats_urls),
        "DSPYRT_SUBJECT_PREFIX": config.subject_prefix,
        "DSPYRT_STATE_DIR": str(config.state_dir),
        "DSPYRT_LOG_LEVEL": "WARNING",
    }


# ----------------------------------------------------------------------------------------- startup


def test_help_imports_neither_nats_nor_dspy(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from dspyrt.runtime.cli import main\n"
        "sys.argv = ['dspyrt', '--help']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
        "import json\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {NOT_AT_START!r}"
        f" or m.startswith(tuple(p + '.' for p in {NOT_AT_START!r})) or m in {NOT_AT_START!r})), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "submit" in done.stdout and "status" in done.stdout
    loaded = json.loads(done.stderr.strip().splitlines()[-1])
    assert loaded == [], f"dspyrt --help imported {loaded}: import them inside the commands that use them"


def test_importing_the_cli_imports_no_agents_or_dspy(tmp_path: Path) -> None:
    code = "import sys, dspyrt.runtime.cli; print([m for m in sys.modules if m.startswith(('dspyrt.agents', 'dspy.'))])"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ inputs


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "bad.json").write_text('{\n  "program": {"signature": "text -> topic"},\n  "trainset": [1, 2,]\n}\n')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "cycle.json").write_text((EXAMPLES / "cycle.json").read_text())
    (tmp_path / "inputs.json").write_text('{"text": "stocks fell"}')
    (tmp_path / "a-folder").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["submit", "optimize", "examples/nope.json"], "error not_found: examples/nope.json: no such file"),
        (["submit", "optimize", "bad.json"], "error invalid_json: bad.json: not valid JSON: Expecting value at line 3"),
        (["submit", "optimize", "list.json"], "error invalid_input: list.json: the task input must be a JSON object"),
        (["submit", "optimize", "a-folder"], "error unreadable_file: a-folder is a directory"),
        (
            ["submit", "optimize", "cycle.json"],
            "error kind_mismatch: cycle.json is a 'cycle' task file; submit it as: dspyrt submit cycle cycle.json",
        ),
        (["predict", "topic-classifier", "stocks fell"], "\"stocks fell\" is not JSON"),
        (["predict", "topic-classifier", "inputs.json"], "to read the file inputs.json, write @inputs.json"),
        (["predict", "topic-classifier", "@nope.json"], "error not_found: nope.json: no such file"),
        (["predict", "topic-classifier", "[1, 2]"], "the inputs must be a JSON object of the program's input fields"),
        (["up", "--example", "nope.json"], "error not_found: nope.json: no such task file"),
        (["submit"], "error usage: Missing argument"),
        (["frobnicate"], "error usage: No such command 'frobnicate'"),
        (["status", "--frobnicate"], "error usage: No such option: --frobnicate"),
    ],
)
def test_an_input_mistake_is_one_line_and_exit_code_2(files: Path, args: list[str], expected: str) -> None:
    line = one_line_error(run(*args, cwd=files), 2)
    assert expected in line


def test_predict_names_what_to_write(files: Path) -> None:
    line = one_line_error(run("predict", "topic-classifier", "stocks fell", cwd=files), 2)
    assert "error invalid_input: INPUTS is a JSON object of the program's input fields" in line
    assert '\'{"<input field>": "stocks fell"}\'' in line and "@FILE" in line and "- from stdin" in line


def test_stdin_is_read_as_it_is_given(files: Path) -> None:
    done = run("submit", "optimize", "-", cwd=files, stdin='{"kind": "cycle", "input": {}}')
    assert "error kind_mismatch: stdin is a 'cycle' task file; submit it as: dspyrt submit cycle -" in one_line_error(
        done, 2
    )


def test_no_system_and_a_bad_configuration_are_one_line(tmp_path: Path) -> None:
    line = one_line_error(run("status", cwd=tmp_path), 2)
    assert line.startswith("error unavailable: no system found")
    (tmp_path / "dspyrt.toml").write_text('mode = "sideways"\n')
    line = one_line_error(run("tasks", cwd=tmp_path), 2)
    assert line.startswith("error invalid_config:")


def test_debug_shows_the_traceback_too(files: Path) -> None:
    done = run("--debug", "submit", "optimize", "nope.json", cwd=files)
    assert done.returncode == 2
    assert "Traceback" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error not_found: nope.json: no such file"


# ------------------------------------------------------------------------------- errors from the system


class Fields(Message):
    program_name: str
    trainset: list[dict[str, str]]
    devset: list[dict[str, str]]
    k: int


class Checker(Agent):
    name = "checker"

    @task("checked")
    async def checked(self, fields: Fields, ctx: TaskContext) -> Fields:
        return fields


async def test_a_task_that_failed_validation_lists_every_field_error(
    config: IntegrationConfig, bus: Bus, tmp_path: Path
) -> None:
    (tmp_path / "wrong.json").write_text(json.dumps({"kind": "checked", "input": {"k": "many", "extra": 1}}))
    async with hosting(Checker(config)):
        done = await arun("submit", "checked", "wrong.json", "--wait", cwd=tmp_path, env=env_of(config))
    line = one_line_error(done, 1)
    assert line.startswith("error invalid_message: ")
    for loc in ("program_name: Field required", "trainset: Field required", "devset: Field required", "k: ", "extra"):
        assert loc in line, line
    assert "failed" in done.stdout


def test_error_line_lists_every_field_error_once() -> None:
    errors = [FieldError(loc=f"f{i}", message="Field required") for i in range(3)]
    line = error_line("invalid_message", "Fields payload is invalid: 3 error(s) (f0: Field required)", errors)
    assert line == (
        "invalid_message: Fields payload is invalid: 3 error(s): f0: Field required; f1: Field required; "
        "f2: Field required"
    )
    many = [FieldError(loc=f"f{i}", message="bad") for i in range(MAX_LISTED_FIELD_ERRORS + 5)]
    assert error_line("invalid_message", "invalid", many).endswith("; and 5 more")
    remote = RemoteError(ErrorBody(code="invalid_message", message="inputs do not fit", field_errors=errors[:2]))
    assert error_line(remote.code, remote.message, remote.field_errors) == (
        "invalid_message: inputs do not fit: f0: Field required; f1: Field required"
    )


# ------------------------------------------------------------------------------------- task id prefixes


def test_a_task_wins_over_the_tasks_it_started() -> None:
    cycle = "c8bb0b53244b486a9b1c"
    started = [cycle, f"{cycle}-base", f"{cycle}-base-s0", f"{cycle}-opt-eval-s1"]
    assert pick_task_id("c8bb", started) == cycle
    with pytest.raises(DspyrtError) as ambiguous:
        pick_task_id("c8", [*started, "c8ff00", "c8ff00-opt"])
    assert ambiguous.value.code == "ambiguous_id"
    assert ambiguous.value.message == (
        "c8 is the start of 2 task ids: c8bb0b53244b486a9b1c, c8ff00 (and 4 tasks they started); give more of the id"
    )
    with pytest.raises(NotFoundError):
        pick_task_id("zz", [])


async def test_a_task_id_may_be_given_by_a_unique_prefix(config: IntegrationConfig, bus: Bus, tmp_path: Path) -> None:
    store = await TaskStore.open(bus)
    ids = ["aa11bb22cc33", "aa11bb22cc33-base", "aa11bb22cc33-opt-eval-s0", "aa11ff", "aa11ff2"]
    for task_id in ids:
        await store.create(TaskRecord(id=task_id, kind="optimize", status=TaskStatus.SUCCEEDED, result={"ok": 1}))
    failed = ErrorBody(code="invalid_message", message="payload is invalid: 3 error(s)", field_errors=[
        FieldError(loc="devset", message="Extra inputs are not permitted"),
        FieldError(loc="program", message="Field required"),
        FieldError(loc="trainset.0", message="Input should be an object"),
    ])  # fmt: skip
    await store.create(TaskRecord(id="ff0042", kind="cycle", status=TaskStatus.FAILED, error=failed))

    assert await resolve_task_id(store, "aa11b") == "aa11bb22cc33"
    assert await resolve_task_id(store, "aa11ff") == "aa11ff"  # an exact id wins over the longer ids it starts
    with pytest.raises(DspyrtError, match="aa11 is the start of 3 task ids: aa11bb22cc33, aa11ff, aa11ff2"):
        await resolve_task_id(store, "aa11")

    env = env_of(config)
    shown = await arun("tasks", "show", "aa11b", cwd=tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "task aa11bb22cc33 optimize succeeded" in shown.stdout
    line = one_line_error(await arun("tasks", "show", "aa11", cwd=tmp_path, env=env), 1)
    assert line.startswith("error ambiguous_id: aa11 is the start of 3 task ids")
    assert "(and 2 tasks they started)" in line
    line = one_line_error(await arun("tasks", "show", "zz", cwd=tmp_path, env=env), 1)
    assert line == "error not_found: no task with id zz, nor one whose id starts with it"

    failed_shown = await arun("tasks", "show", "ff00", cwd=tmp_path, env=env)
    assert failed_shown.returncode == 0, failed_shown.stderr
    flat = " ".join(failed_shown.stdout.split())
    for expected in ("devset: Extra inputs are not permitted", "program: Field required", "trainset.0: Input"):
        assert expected in flat, failed_shown.stdout

    listed = await arun("tasks", cwd=tmp_path, env=env)  # 80 columns: every id whole
    assert listed.returncode == 0, listed.stderr
    for task_id in ids:
        assert task_id in listed.stdout.split(), listed.stdout


# ------------------------------------------------------------------------------------------ output


def capture(width: int = 80) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=width, color_system=None, highlight=False), out


def test_a_table_never_cuts_an_id_or_a_name() -> None:
    console, out = capture(60)
    table = listing(Column("id", no_wrap=True), Column("agent", no_wrap=True), "health", "detail")
    ids = ["c8bb0b53244b486a9b1c2d3e4f5a6b7c", "0f1e2d3c4b5a69788796a5b4c3d2e1f0"]
    for task_id in ids:
        table.add_row(task_id, "validator-performance", "unhealthy web", "a long explanation " * 4)
    print_table(table, to=console)
    text = out.getvalue()
    assert "…" not in text
    words = text.split()
    assert all(task_id in words for task_id in ids) and "validator-performance" in words


def test_the_cycle_table_says_cached_unchanged_and_the_improvement() -> None:
    console, out = capture(120)
    result = {
        "phase_runs": {"create": 1, "evaluate_baseline": 1, "optimize": 1, "evaluate_optimized": 1, "deploy": 1},
        "create": {"program_hash": "a2e685583e6584c2"},
        "baseline": {"score": 0.0, "examples": 20, "shards": 4},
        "optimization": {"optimizer": "labeled_fewshot", "model": "demo/fewshot", "status": "completed",
                         "cached": True, "lm_calls": 0},
        "optimized": {"score": 60.0, "latency_p95_ms": 12.5},
        "improvement_score": 60.0,
        "verdict": {"deployed": True, "unchanged": True, "version": 3, "reasons": []},
    }  # fmt: skip
    print_cycle(result, to=console)
    text = out.getvalue()
    assert "completed, cached, 0 LM calls" in text
    assert "score 60.0 (+60 points over the baseline)" in text
    assert "unchanged: already deployed as v3" in text
    out.truncate(0)
    print_cycle(result | {"verdict": {"deployed": True, "version": 4}, "optimization": {"lm_calls": 24}}, to=console)
    assert "deployed v4" in out.getvalue() and "24 LM calls" in out.getvalue() and "cached" not in out.getvalue()
