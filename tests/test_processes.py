"""Agents as real OS processes (``python -m tests.agent_proc``): SIGKILL one replica mid-task, SIGTERM to drain.

Each process leaves ``started-<task>-<pid>-<attempt>`` / ``done-...`` marker files, so the test sees which
process held which delivery without asking the processes anything.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from dspyrt.bus import TaskStatus
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.agent_proc import SleepJob
from tests.helpers import AgentProcess, dead_letters_of, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    path = tmp_path / "markers"
    path.mkdir()
    return path


def marked(markers: Path, stage: str, task_id: str) -> list[tuple[int, int]]:
    """(pid, attempt) of every ``stage`` marker of ``task_id``."""
    found = []
    for path in markers.glob(f"{stage}-{task_id}-*"):
        pid, attempt = path.name.rsplit("-", 2)[1:]
        found.append((int(pid), int(attempt)))
    return sorted(found)


async def start(
    processes: list[AgentProcess], config: IntegrationConfig, workdir: Path, markers: Path, **settings: object
) -> AgentProcess:
    process = AgentProcess(config, workdir, markers, **settings).start()
    processes.append(process)
    await process.ready()
    return process


async def test_sigkill_replica_mid_task_redelivers_to_the_other(
    config: IntegrationConfig, client: Client, tmp_path: Path, markers: Path, processes: list[AgentProcess]
) -> None:
    config = config.model_copy(update={"task_ack_wait": 2.0})
    replicas = [await start(processes, config, tmp_path / f"replica{i}", markers) for i in range(2)]

    submission = await client.submit("sleep", SleepJob(seconds=2.0))
    await wait_until(lambda: bool(marked(markers, "started", submission.task_id)))
    [(holder_pid, attempt)] = marked(markers, "started", submission.task_id)
    assert attempt == 1
    [holder] = [r for r in replicas if r.pid == holder_pid]
    [other] = [r for r in replicas if r is not holder]
    holder.signal(signal.SIGKILL)
    assert await holder.wait() == -signal.SIGKILL

    record = await client.result(submission.task_id, timeout=30)
    assert record.status is TaskStatus.SUCCEEDED
    assert record.attempts == 2
    assert record.result == {"pid": other.pid, "attempt": 2}
    assert marked(markers, "started", submission.task_id) == sorted([(holder.pid, 1), (other.pid, 2)])
    assert marked(markers, "done", submission.task_id) == [(other.pid, 2)]


async def test_killed_worker_on_last_delivery_is_dead_lettered(
    config: IntegrationConfig, client: Client, tmp_path: Path, markers: Path, processes: list[AgentProcess]
) -> None:
    """With one delivery allowed, a worker killed mid-task leaves nobody to answer: JetStream gives up and
    the surviving replica's advisory watcher dead-letters the task instead of it sitting in the queue."""
    config = config.model_copy(update={"task_ack_wait": 2.0})
    replicas = [await start(processes, config, tmp_path / f"r{i}", markers, task_max_deliver=1) for i in range(2)]

    submission = await client.submit("sleep", SleepJob(seconds=5.0))
    await wait_until(lambda: bool(marked(markers, "started", submission.task_id)))
    [(holder_pid, _)] = marked(markers, "started", submission.task_id)
    [holder] = [r for r in replicas if r.pid == holder_pid]
    holder.signal(signal.SIGKILL)

    record = await client.result(submission.task_id, timeout=30)
    assert record.status is TaskStatus.DEAD
    assert record.error is not None
    assert record.error.code == "exhausted"
    [letter] = await dead_letters_of(client, submission.task_id)
    assert letter.deliveries == 1
    assert letter.reason.code == "exhausted"
    assert len(marked(markers, "started", submission.task_id)) == 1  # never run again
    assert marked(markers, "done", submission.task_id) == []


async def test_sigterm_drains_and_a_new_process_finishes_the_rest(
    config: IntegrationConfig, client: Client, tmp_path: Path, markers: Path, processes: list[AgentProcess]
) -> None:
    ids = [(await client.submit("sleep", SleepJob(seconds=1.0), require_worker=False)).task_id for _ in range(6)]
    first = await start(processes, config, tmp_path / "first", markers, agent_concurrency=2, shutdown_grace=30)

    await wait_until(lambda: sum(len(marked(markers, "started", i)) for i in ids) == 2)
    first.signal(signal.SIGTERM)
    assert await first.wait() == 0, first.log
    in_flight = [i for i in ids if marked(markers, "started", i)]
    assert len(in_flight) == 2
    # what the first process had started, it finished before exiting; the rest it never took
    for task_id in ids:
        record = await client.task(task_id)
        if task_id in in_flight:
            assert record.status is TaskStatus.SUCCEEDED
            assert marked(markers, "done", task_id) == [(first.pid, 1)]
        else:
            assert record.status is TaskStatus.PENDING

    second = await start(processes, config, tmp_path / "second", markers, agent_concurrency=2)
    records = [await client.result(task_id, timeout=30) for task_id in ids]
    assert [r.status for r in records] == [TaskStatus.SUCCEEDED] * 6
    # every task ran to completion exactly once, on one of the two processes
    for task_id in ids:
        [(pid, attempt)] = marked(markers, "done", task_id)
        assert attempt == 1
        assert pid == (first.pid if task_id in in_flight else second.pid)
