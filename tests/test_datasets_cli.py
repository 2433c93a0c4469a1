"""``dspyrt datasets`` (put, list, show, rm) and ``dspyrt tasks show --examples``, as a user runs them: real
processes against a real nats-server, with a configuration file."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
from pydantic import BaseModel

from dspyrt.agents.deployments import DeployedVersion, DeployRegistry
from dspyrt.agents.loop.deploy import DeployAgent
from dspyrt.bus import Bus, Empty, Message, NotFoundError, TaskRecord, TaskStatus, TaskStore
from dspyrt.bus.audit import read_audit
from dspyrt.bus.claims import ClaimStore
from dspyrt.runtime.agent import Agent, endpoint
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.dataset_files import DatasetFileError, read_rows
from dspyrt.runtime.datasets import DatasetStore
from tests.helpers import serving

pytestmark = pytest.mark.timeout(120)

DSPYRT = Path(sys.executable).parent / "dspyrt"

ROWS = [{"question": f"what is {i} + {i}?", "answer": str(2 * i), "topic": "sums"} for i in range(12)]


async def dspyrt(config_file: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """``dspyrt ARGS --config FILE`` in its own process (without blocking this test's event loop)."""
    done = await anyio.run_process(
        [str(DSPYRT), *args, "--config", str(config_file)],
        input=stdin,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


def one_line_error(done: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The command failed with ``code``, saying why in one line and no traceback; that line."""
    assert done.returncode == code, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error ")
    return line


@pytest.fixture
def config_file(config: IntegrationConfig, tmp_path: Path) -> Path:
    path = tmp_path / "dspyrt.toml"
    path.write_text(
        f"nats_urls = {json.dumps(config.nats_urls)}\n"
        f'subject_prefix = "{config.subject_prefix}"\n'
        f'state_dir = "{config.state_dir}"\n'
        'log_level = "WARNING"\n'
    )
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------ files


def test_files_are_read_by_format(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    assert read_rows(jsonl) == ROWS[:2]
    (tmp_path / "a.ndjson").write_text("\n" + json.dumps(ROWS[0]) + "\n\n")  # blank lines are skipped
    assert read_rows(tmp_path / "a.ndjson") == ROWS[:1]
    assert read_rows(write_csv(tmp_path / "a.csv", ROWS[:3])) == ROWS[:3]
    (tmp_path / "list.json").write_text(json.dumps(ROWS[:2]))
    assert read_rows(tmp_path / "list.json") == ROWS[:2]
    for key in ("examples", "rows", "data"):
        (tmp_path / f"{key}.json").write_text(json.dumps({key: ROWS[:2], "about": "ignored"}))
        assert read_rows(tmp_path / f"{key}.json") == ROWS[:2]

    (tmp_path / "two.json").write_text(json.dumps({"rows": ROWS[:1], "data": ROWS[:1]}))
    with pytest.raises(DatasetFileError, match=r"exactly one of 'examples', 'rows', 'data' \(it has 'rows', 'data'\)"):
        read_rows(tmp_path / "two.json")
    (tmp_path / "bad.json").write_text('[\n  {"a": 1},\n  {"a": 2\n]')
    with pytest.raises(DatasetFileError, match=r"bad\.json line 4: not JSON") as caught:
        read_rows(tmp_path / "bad.json")
    assert caught.value.line == 4
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DatasetFileError, match=r"bad\.jsonl line 2: a JSON list, not an object"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "fewer.csv").write_text("a,b,c\n1,2,3\n4,5\n")
    with pytest.raises(DatasetFileError, match=r"fewer.csv line 3: 2 cells, fewer than the header's 3 \(a, b, c\)"):
        read_rows(tmp_path / "fewer.csv")
    (tmp_path / "header.csv").write_text("a,first name\n1,2\n")
    with pytest.raises(DatasetFileError, match="line 1: header column 2 'first name' is not a field name"):
        read_rows(tmp_path / "header.csv")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DatasetFileError, match=r"latin1\.jsonl line 2: not UTF-8"):
        read_rows(tmp_path / "latin1.jsonl")
    with pytest.raises(DatasetFileError, match="cannot read it"):
        read_rows(tmp_path / "missing.jsonl")


def test_parquet_needs_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rows.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
    else:
        pq.write_table(pa.Table.from_pylist(ROWS[:3]), path)
        assert read_rows(path) == ROWS[:3]
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DatasetFileError, match="reading Parquet needs pyarrow, which is not installed: pip install"):
        read_rows(path)


# ------------------------------------------------------------------------------------------ put


async def test_put_prints_the_version_and_the_same_content_is_the_same_version(
    config_file: Path, bus: Bus, tmp_path: Path
) -> None:
    jsonl = write_jsonl(tmp_path / "qa.jsonl", ROWS)
    label = ok(await dspyrt(config_file, "datasets", "put", "qa", str(jsonl))).strip()
    name, version = label.split("@")
    assert name == "qa" and len(version) == 12
    store = await DatasetStore.open(bus)
    assert str(await store.resolve("dataset:qa")) == f"dataset:{label}"
    assert await store.rows(f"dataset:{label}") == ROWS

    # The same rows from every format (all values are strings, as a CSV's are), and again: the same version.
    csv_file = write_csv(tmp_path / "qa.csv", ROWS)
    (tmp_path / "qa.json").write_text(json.dumps({"examples": ROWS}))
    for path in (jsonl, csv_file, tmp_path / "qa.json"):
        assert ok(await dspyrt(config_file, "datasets", "put", "qa", str(path))).strip() == label
    stdin = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    assert ok(await dspyrt(config_file, "datasets", "put", "qa", "-", stdin=stdin)).strip() == label
    [index] = await store.indexes()
    assert [v.version for v in index.versions] == [version]

    summary = json.loads(ok(await dspyrt(config_file, "datasets", "put", "qa", str(jsonl), "--json")))
    assert summary["name"] == "qa" and summary["version"] == version
    assert summary["rows"] == 12 and summary["fields"] == ["answer", "question", "topic"]
    assert summary["parts"] == 1 and summary["bytes"] > 0

    changed = write_jsonl(tmp_path / "more.jsonl", [*ROWS, {"question": "new", "answer": "1", "topic": "x"}])
    other = ok(await dspyrt(config_file, "datasets", "put", "qa", str(changed))).strip()
    assert other.startswith("qa@") and other != label


async def test_a_bad_file_or_row_is_one_line_naming_where(config_file: Path, bus: Bus, tmp_path: Path) -> None:
    bad_row = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], ROWS[1], {"question": "q", "bad field": 1}])
    line = one_line_error(await dspyrt(config_file, "datasets", "put", "qa", str(bad_row)))
    assert "bad.jsonl" in line and "row 3, field 'bad field'" in line

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ROWS[0]) + "\n" + '{"question": "q",\n')
    line = one_line_error(await dspyrt(config_file, "datasets", "put", "qa", str(broken)))
    assert "broken.jsonl line 2: not JSON" in line

    wide = tmp_path / "wide.csv"
    wide.write_text("question,answer\nq1,a1\nq2,a2,extra\n")
    line = one_line_error(await dspyrt(config_file, "datasets", "put", "qa", str(wide)))
    assert "wide.csv line 3: 3 cells, more than the header's 2 (question, answer)" in line

    unknown = tmp_path / "rows.txt"
    unknown.write_text("x")
    line = one_line_error(await dspyrt(config_file, "datasets", "put", "qa", str(unknown)))
    assert "unknown format '.txt'" in line and ".jsonl" in line and ".csv" in line and ".parquet" in line

    usage = await dspyrt(config_file, "datasets", "put", "no spaces", str(bad_row))
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    assert await (await DatasetStore.open(bus)).indexes() == []  # nothing was stored


# ------------------------------------------------------------------------------------ list, show


async def test_show_and_list(config_file: Path, bus: Bus, tmp_path: Path) -> None:
    assert "no datasets" in ok(await dspyrt(config_file, "datasets", "list"))
    first = ok(await dspyrt(config_file, "datasets", "put", "qa", str(write_jsonl(tmp_path / "a.jsonl", ROWS))))
    second = ok(await dspyrt(config_file, "datasets", "put", "qa", str(write_jsonl(tmp_path / "b.jsonl", ROWS[:5]))))
    ok(await dspyrt(config_file, "datasets", "put", "other", str(write_jsonl(tmp_path / "c.jsonl", ROWS[:1]))))
    first_version, second_version = first.strip().split("@")[1], second.strip().split("@")[1]

    shown = json.loads(ok(await dspyrt(config_file, "datasets", "show", "qa", "--head", "3", "--json")))
    assert shown["version"] == second_version and shown["rows"] == 5  # the newest
    assert shown["head"] == ROWS[:3]
    assert shown["versions"] == [second_version, first_version]
    assert shown["source"] == str(tmp_path / "b.jsonl")

    pinned = json.loads(ok(await dspyrt(config_file, "datasets", "show", f"dataset:qa@{first_version}", "--json")))
    assert pinned["version"] == first_version and pinned["rows"] == 12 and pinned["head"] == ROWS[:5]

    text = ok(await dspyrt(config_file, "datasets", "show", f"qa@{first_version}", "--head", "2"))
    assert f"dataset:qa@{first_version}" in text and "first 2 of 12 rows" in text
    assert "what is 1 + 1?" in text and "what is 2 + 2?" not in text
    assert f"2: {second_version} (newest), {first_version} (this one)" in text

    listed = json.loads(ok(await dspyrt(config_file, "datasets", "list", "--json")))
    assert [(d["name"], d["version"], d["versions"], d["rows"]) for d in listed] == [
        ("other", listed[0]["version"], 1, 1),
        ("qa", second_version, 2, 5),
    ]
    table = ok(await dspyrt(config_file, "datasets", "list"))
    assert "qa" in table and second_version in table and first_version not in table

    line = one_line_error(await dspyrt(config_file, "datasets", "show", "nosuch"))
    assert "no dataset 'nosuch'" in line
    line = one_line_error(await dspyrt(config_file, "datasets", "show", "qa@0123456789ab"))
    assert "no dataset version qa@0123456789ab" in line
    assert (await dspyrt(config_file, "datasets", "show", "qa@notaversion")).returncode == 2


# ------------------------------------------------------------------------------------------------ rm


class FakePrograms(BaseModel):
    programs: list[dict[str, Any]]


class FakeDetail(BaseModel):
    pointer: dict[str, Any]
    versions: list[dict[str, Any]]


class ProgramName(Message):
    program: str


class FakeDeploy(Agent):
    """``loop-deploy``'s list and show, answering with what the test set (versions carry ``datasets``)."""

    name = "loop-deploy"
    programs: ClassVar[dict[str, FakeDetail]] = {}

    @endpoint("list")
    async def list_programs(self, _: Empty) -> FakePrograms:
        return FakePrograms(programs=[detail.pointer for detail in self.programs.values()])

    @endpoint("show")
    async def show(self, request: ProgramName) -> FakeDetail:
        if request.program not in self.programs:
            raise NotFoundError(f"program {request.program} is not deployed")
        return self.programs[request.program]


def deployed(program: str, version: int, datasets: list[str]) -> dict[str, Any]:
    return {"program": program, "version": version, "artifact_store": "s", "artifact_name": "a", "datasets": datasets}


async def test_rm_asks_loop_deploy(
    config: IntegrationConfig, config_file: Path, bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    label = ok(await dspyrt(config_file, "datasets", "put", "qa", str(write_jsonl(tmp_path / "a.jsonl", ROWS)))).strip()
    other = ok(await dspyrt(config_file, "datasets", "put", "qa", str(write_jsonl(tmp_path / "b.jsonl", ROWS[:2]))))
    other = other.strip()
    store = await DatasetStore.open(bus)

    # No loop-deploy: refused, and nothing removed.
    line = one_line_error(await dspyrt(config_file, "datasets", "rm", label))
    assert "loop-deploy did not answer" in line and "--force" in line and label in line
    assert (await store.manifest(f"dataset:{label}")).rows == 12
    assert (await dspyrt(config_file, "datasets", "rm", "qa")).returncode == 2  # a version must be named

    active, canary = deployed("qa-bot", 3, [label]), deployed("qa-bot", 4, ["elsewhere@0123456789ab"])
    programs = {
        "qa-bot": FakeDetail(
            pointer={"program": "qa-bot", "active": active, "canary": canary},
            versions=[deployed("qa-bot", 1, [other]), active, canary],
        ),
        # A label written as a reference counts too.
        "sums": FakeDetail(
            pointer={"program": "sums", "canary": deployed("sums", 7, [f"dataset:{label}"])}, versions=[]
        ),
    }
    monkeypatch.setattr(FakeDeploy, "programs", programs)
    async with serving(config, [FakeDeploy]):
        line = one_line_error(await dspyrt(config_file, "datasets", "rm", label, "--force"))
        assert f"{label} is in use by deployed program qa-bot v3 (active), sums v7 (canary)" in line
        assert (await store.manifest(f"dataset:{label}")).rows == 12

        # Used by a version that is neither active nor canary: removed, with a note.
        removed = ok(await dspyrt(config_file, "datasets", "rm", other))
        assert f"removed {other} (2 rows, 1 part)" in removed and "qa-bot v1 (not active or canary now)" in removed
        with pytest.raises(NotFoundError):
            await store.manifest(f"dataset:{other}")

    # --force without an answer: removed, with a warning.
    forced = await dspyrt(config_file, "datasets", "rm", label, "--force", "--json")
    assert json.loads(ok(forced))["checked"] is False and "removing " + label + " unchecked" in forced.stderr
    assert await store.indexes() == []
    [record] = [r for r in await read_audit(bus) if r.action == "dataset.remove" and r.target == label]
    assert record.detail == {"rows": 12, "checked": False}
    line = one_line_error(await dspyrt(config_file, "datasets", "rm", label, "--force"))
    assert f"no dataset version {label}" in line


async def test_rm_with_the_real_deploy_agent(
    config: IntegrationConfig, config_file: Path, bus: Bus, tmp_path: Path
) -> None:
    label = ok(await dspyrt(config_file, "datasets", "put", "qa", str(write_jsonl(tmp_path / "a.jsonl", ROWS)))).strip()
    unused = ok(await dspyrt(config_file, "datasets", "put", "qa", str(write_jsonl(tmp_path / "b.jsonl", ROWS[:2]))))
    registry = await DeployRegistry.open(bus, config.stream_layout)
    await registry.deploy(DeployedVersion.model_validate(deployed("qa-bot", 1, [label])))
    async with serving(config, [DeployAgent]):
        line = one_line_error(await dspyrt(config_file, "datasets", "rm", label))
        assert f"{label} is in use by deployed program qa-bot v1 (active)" in line
        assert "removed" in ok(await dspyrt(config_file, "datasets", "rm", unused.strip()))


# --------------------------------------------------------------------------------------- tasks show


def example_result(i: int) -> dict[str, Any]:
    return {"index": i, "score": float(i % 2), "outputs": {"answer": f"answer {i}"}, "latency_ms": 10.0 + i,
            "error": None if i % 5 else f"ParseError: example {i}", "call_failed": i == 27}  # fmt: skip


def evaluation(score: float, **fields: Any) -> dict[str, Any]:
    return {"score": score, "examples": 45, "answered": 45, "errors": 0, "coverage": 1.0, "shards": 2,
            "model": "demo/model", "latency_p95_ms": 12.0, **fields}  # fmt: skip


@pytest.mark.timeout(180)  # some twenty CLI runs
async def test_tasks_show_pages_claim_checked_examples(config_file: Path, bus: Bus) -> None:
    claims = await ClaimStore.open(bus)
    lines = "".join(json.dumps(example_result(i)) + "\n" for i in range(45)).encode()
    results_ref = await claims.put("evaluate/ev1.results.jsonl", lines)

    # An evaluate task whose whole result is claim-checked too: the record keeps its summary.
    whole = evaluation(50.0, results=[], results_ref=results_ref.model_dump())
    result_ref = await claims.put("evaluate/ev1.json", json.dumps(whole).encode())
    summary = {k: v for k, v in whole.items() if k != "results"}
    store = await TaskStore.open(bus)
    await store.create(TaskRecord(id="ev1", kind="evaluate", status=TaskStatus.SUCCEEDED, attempts=1,
                                  result=summary, result_ref=result_ref))  # fmt: skip
    baseline = evaluation(40.0, results=[example_result(i) for i in range(3)])
    cycle = {
        "cycle_id": "cy1", "program_name": "qa-bot", "create": {"program_hash": "abcdef0123456789"},
        "baseline": baseline, "optimized": evaluation(60.0, results=[], results_ref=results_ref.model_dump()),
        "optimization": {"optimizer": "bootstrap", "model": "demo/model", "status": "completed", "lm_calls": 9},
        "verdict": {"deployed": True, "version": 2, "reasons": []},
        "phase_runs": {"create": 1, "evaluate_baseline": 1, "optimize": 1, "evaluate_optimized": 1, "deploy": 1},
        "datasets": {"devset": ["qa@0123456789ab"]},
    }  # fmt: skip
    await store.create(TaskRecord(id="cy1", kind="cycle", status=TaskStatus.SUCCEEDED, attempts=1, result=cycle))
    await store.create(TaskRecord(id="wc1", kind="wordcount", status=TaskStatus.SUCCEEDED, result={"words": 3}))
    tampered = evaluation(50.0, results=[], results_ref=results_ref.model_dump() | {"sha256": "0" * 64})
    await store.create(TaskRecord(id="ev2", kind="evaluate", status=TaskStatus.SUCCEEDED, result=tampered))

    shown = ok(await dspyrt(config_file, "tasks", "show", "ev1"))
    assert "task ev1 evaluate succeeded after 1 attempt" in shown
    assert f"claim-checked: evaluate/ev1.json in object store {claims.name}" in shown
    assert f"examples: claim-checked: evaluate/ev1.results.jsonl in object store {claims.name}" in shown
    assert "score 50.0 on 45 examples with demo/model" in shown
    assert "dspyrt tasks show ev1 --examples" in shown
    stored = json.loads(ok(await dspyrt(config_file, "tasks", "show", "ev1", "--json")))
    assert stored["result_ref"]["name"] == "evaluate/ev1.json" and stored["result"]["score"] == 50.0

    page = json.loads(ok(await dspyrt(config_file, "tasks", "show", "ev1", "--examples", "--json")))
    assert [r["index"] for r in page] == list(range(20))
    last = json.loads(ok(await dspyrt(config_file, "tasks", "show", "ev1", "--examples", "--offset", "40", "--json")))
    assert last == [example_result(i) for i in range(40, 45)]

    table = ok(await dspyrt(config_file, "tasks", "show", "ev1", "--examples", "--offset", "20", "--limit", "10"))
    assert "examples 20-29 of 45" in table and "answer 29" in table and "answer 30" not in table
    assert "ParseError: example 25" in table
    assert "not scored" in table and "LM call failed" in table  # example 27
    assert "next page: dspyrt tasks show ev1 --examples --offset 30 --limit 10" in table
    end = ok(await dspyrt(config_file, "tasks", "show", "ev1", "--examples", "--offset", "40"))
    assert "examples 40-44 of 45" in end and "next page" not in end
    assert "no examples from 50 on" in ok(await dspyrt(config_file, "tasks", "show", "ev1", "--examples",
                                                      "--offset", "50"))  # fmt: skip

    # A cycle: its optimized evaluation by default, or its baseline.
    shown = ok(await dspyrt(config_file, "tasks", "show", "cy1"))
    assert "deployed v2" in shown and "devset qa@0123456789ab" in shown
    assert "baseline examples: 3 inline" in shown and "optimized examples: claim-checked" in shown
    optimized = json.loads(ok(await dspyrt(config_file, "tasks", "show", "cy1", "--examples", "--limit", "5",
                                           "--json")))  # fmt: skip
    assert optimized == [example_result(i) for i in range(5)]
    base = json.loads(ok(await dspyrt(config_file, "tasks", "show", "cy1", "--examples", "--phase", "baseline",
                                      "--json")))  # fmt: skip
    assert base == baseline["results"]

    line = one_line_error(await dspyrt(config_file, "tasks", "show", "ev2", "--examples"))
    assert "evaluate/ev1.results.jsonl in" in line and "does not match its sha256" in line
    line = one_line_error(await dspyrt(config_file, "tasks", "show", "wc1", "--examples"))
    assert "task wc1 (wordcount) has no per-example results" in line
    assert '"words": 3' in ok(await dspyrt(config_file, "tasks", "show", "wc1"))
    assert "no task with id nosuch" in one_line_error(await dspyrt(config_file, "tasks", "show", "nosuch"))
    assert (await dspyrt(config_file, "tasks", "show", "ev1", "--offset", "5")).returncode == 2
    assert (await dspyrt(config_file, "tasks", "show", "cy1", "--examples", "--phase", "final")).returncode == 2

    # `dspyrt tasks` still lists.
    listed = json.loads(ok(await dspyrt(config_file, "tasks", "--json")))
    assert sorted(r["id"] for r in listed) == ["cy1", "ev1", "ev2", "wc1"]
    assert "wordcount" in ok(await dspyrt(config_file, "tasks", "--limit", "5"))
