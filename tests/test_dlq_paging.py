"""``dspyrt dlq`` pages through the dead letters: the newest ``--limit`` (100), older ones with ``--before SEQ``,
and the output names the sequence to pass next; ``--replay`` still runs one again.

The dead letters are real: three wordcount tasks the example agent refuses (dead-lettered by its worker), then
letters published on the dead-letter subject exactly as a worker publishes them (250 in all).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio
import pytest
from typer.testing import CliRunner

from dspyrt.agents.example import ExampleAgent
from dspyrt.bus import Bus, DeadLetter, ErrorBody, TaskStatus
from dspyrt.bus.streams import read_page
from dspyrt.runtime.cli import app
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.helpers import dead_letters_of, hosting

pytestmark = pytest.mark.timeout(90)

REFUSED = 3  # real tasks, dead-lettered by the example agent's worker
TOTAL = 250


async def fill(config: IntegrationConfig, bus: Bus, client: Client) -> list[str]:
    """``TOTAL`` dead letters (sequences 1..TOTAL of the dead-letter stream); their task ids, oldest first."""
    task_ids: list[str] = []
    async with hosting(ExampleAgent(config)):
        for _ in range(REFUSED):
            record = await client.run("wordcount", {"text": ""}, timeout=20)  # refused: nothing to count
            assert record.status is TaskStatus.FAILED
            await dead_letters_of(client, record.id)
            task_ids.append(record.id)
    for i in range(TOTAL - REFUSED):
        reason = ErrorBody(code="permanent", message=f"letter {i} is refused")
        letter = DeadLetter(task_id=f"letter-{i:03d}", kind="wordcount", reason=reason, deliveries=1, envelope="")
        await bus.js.publish(bus.subjects.dlq("wordcount"), letter.model_dump_json().encode())
        task_ids.append(letter.task_id)
    info = await bus.js.stream_info(bus.subjects.dlq_stream)
    assert (info.state.first_seq, info.state.last_seq, info.state.messages) == (1, TOTAL, TOTAL)
    return task_ids


async def test_pages_of_the_stream_go_back_to_the_first_dead_letter(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    task_ids = await fill(config, bus, client)
    stream = bus.subjects.dlq_stream

    async def page(limit: int, before: int | None = None) -> tuple[list[int], int | None]:
        read = await read_page(bus, stream, limit, before=before)
        return [seq for seq, _, _ in read.messages], read.next_before

    assert await page(100) == (list(range(151, 251)), 151)
    assert await page(100, 151) == (list(range(51, 151)), 51)
    assert await page(100, 51) == (list(range(1, 51)), None)  # the last page
    assert await page(100, 1) == ([], None)
    assert await page(100, 10_000) == await page(100)
    assert await page(250) == (list(range(1, 251)), None)
    letters = [DeadLetter.model_validate_json(data) for _, _, data in (await read_page(bus, stream, 50)).messages]
    assert [letter.task_id for letter in letters] == task_ids[-50:]  # oldest first, as the table shows them

    # deleted (or expired) letters do not count: a page still holds `limit` letters, the next one starts below it
    for seq in (200, 201, 151):
        await bus.js.delete_msg(stream, seq)
    seqs, next_before = await page(100)
    assert seqs == [s for s in range(148, 251) if s not in (200, 201, 151)] and next_before == 148
    assert await page(100, 148) == (list(range(48, 148)), 48)
    with pytest.raises(ValueError, match="at least 1"):
        await read_page(bus, stream, 0)


async def _cli(config: IntegrationConfig, *args: str) -> tuple[int, str, str]:
    """``dspyrt dlq ARGS`` in its own process, against the test's server and subject prefix."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPYRT_")}
    env.update(
        DSPYRT_NATS_URLS=config.nats_urls[0],
        DSPYRT_SUBJECT_PREFIX=config.subject_prefix,
        DSPYRT_STATE_DIR=str(config.state_dir),
        DSPYRT_LOG_LEVEL="WARNING",
        COLUMNS="200",  # the table on one line per letter
    )
    result = await anyio.run_process(
        [sys.executable, "-m", "dspyrt.runtime.cli", "dlq", *args], env=env, check=False, cwd=config.state_dir.parent
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_the_cli_pages_says_how_to_get_the_next_page_and_still_replays(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    task_ids = await fill(config, bus, client)

    code, out, err = await _cli(config, "--json")
    assert code == 0, err
    first: dict[str, Any] = json.loads(out)
    assert [d["seq"] for d in first["dead_letters"]] == list(range(151, 251)) and first["next_before"] == 151
    assert [d["task_id"] for d in first["dead_letters"]] == task_ids[150:]
    assert first["dead_letters"][-1]["reason"] == {"code": "permanent", "message": "letter 246 is refused",
                                                   "field_errors": []}  # fmt: skip

    code, out, err = await _cli(config, "--json", "--before", str(first["next_before"]))
    assert code == 0, err
    second = json.loads(out)
    assert [d["seq"] for d in second["dead_letters"]] == list(range(51, 151)) and second["next_before"] == 51

    code, out, err = await _cli(config, "--before", str(second["next_before"]))  # the last page, as a table
    assert code == 0, err
    assert "50 dead letters below seq 51 (seq 1-50); no older ones" in out
    for task_id in task_ids[:REFUSED]:  # the refused tasks, with their reason
        assert task_id in out
    assert out.count("invalid_message") + out.count("permanent") >= 50

    code, out, err = await _cli(config, "--limit", "30")
    assert code == 0, err
    assert "30 dead letters (seq 221-250); older ones: dspyrt dlq --before 221 --limit 30" in out

    # --replay: the newest dead letter of a real task runs again, under its own id
    code, out, err = await _cli(config, "--replay", task_ids[0])
    assert code == 0, err
    assert f"replayed {task_ids[0]}" in out
    record = await client.task(task_ids[0])
    assert record.status is TaskStatus.PENDING and record.error is None
    tasks = await bus.js.stream_info(bus.subjects.task_stream, subjects_filter=bus.subjects.task("wordcount"))
    assert tasks.state.messages == 1  # waiting for a worker


def test_the_page_size_and_sequence_are_checked_before_anything_connects() -> None:
    runner = CliRunner()
    for args in (["--limit", "0"], ["--limit", "10001"], ["--before", "0"], ["--before", "x"]):
        result = runner.invoke(app, ["dlq", *args])
        assert result.exit_code == 2, (args, result.output)


def test_the_help_names_the_paging_options() -> None:
    result = CliRunner().invoke(app, ["dlq", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--limit", "--before", "SEQ", "--replay", "--json"):
        assert option in result.output
