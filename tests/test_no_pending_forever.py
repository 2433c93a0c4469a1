"""Chaos: no task stays pending forever (issue 11).

300 tasks are submitted by several submitters at once while agent processes (``python -m tests.agent_proc``, the
``sleeper``) are SIGKILLed at random and replaced, and the nats-server is SIGKILLed and started again twice (same
port, same store), each time just as one submit's task publish goes by (a TCP proxy in front of the server sees
it), so that submit has written its record and never publishes; the others in flight are cut off wherever they
are. A submit that fails is submitted again with the same id, as a user does after a failed ``dspyrt submit``
(its error message says so). In the end every task has reached a terminal state and the work queue is empty:
nothing is pending forever, no message is left behind.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from dspyrt.bus import Bus, EmbeddedServer, TaskRecord, TaskStore
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.agent_proc import SleepJob
from tests.helpers import AgentProcess, restartable_server, wait_until
from tests.test_task_submit import CuttingProxy

pytestmark = pytest.mark.timeout(120)  # it takes ~25 s here; a failure shows within ~90 s

TASKS = 300
SUBMITTERS = 8
AGENTS = 3


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    with restartable_server(tmp_path) as server:
        yield server


def launch(processes: list[AgentProcess], config: IntegrationConfig, workdir: Path, markers: Path) -> AgentProcess:
    """A sleeper process, started (not yet ready)."""
    # Deliveries cut short by kills and restarts are retried: 20 deliveries are plenty (the default is 5).
    process = AgentProcess(config, workdir, markers, agent_concurrency=4, task_max_deliver=20).start()
    processes.append(process)
    return process


async def test_no_task_is_pending_forever_across_agent_kills_and_server_restarts(
    nats_server: EmbeddedServer,
    config: IntegrationConfig,
    bus: Bus,
    client: Client,
    tmp_path: Path,
    processes: list[AgentProcess],
) -> None:
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    config = config.model_copy(update={"task_ack_wait": 2.0})
    markers = tmp_path / "markers"
    began = time.monotonic()
    alive = [launch(processes, config, tmp_path / f"agent{i}", markers) for i in range(AGENTS)]
    for process in alive:
        await process.ready(timeout=30)

    ids = [f"chaos-{i:03d}" for i in range(TASKS)]
    failed_submits: Counter[str] = Counter()
    submitted: set[str] = set()
    requeued: set[str] = set()  # re-submits that found the task recorded but never queued, and queued it
    kills = 0
    restarts = 0

    async def connect() -> tuple[Bus, Client]:
        """What one ``dspyrt submit`` does first (through the proxy), retried while there is no server."""
        while True:
            submitter_bus = Bus(config.connection_options([proxy.url], name="chaos-submitter"), config.subjects)
            try:
                await submitter_bus.connect()
                return submitter_bus, Client(submitter_bus, await TaskStore.open(submitter_bus), identity="chaos")
            except Exception:
                await _abandon(submitter_bus)
                await anyio.sleep(0.3)

    async def submitter(todo: list[str]) -> None:
        """Submits like a user at a terminal: after a failed submit its process is gone (so is anything its
        connection still held), and the user runs the same command, with the same id, again."""
        connection: tuple[Bus, Client] | None = None
        try:
            while todo:
                task_id = todo.pop()
                job = SleepJob(seconds=rng.choice((0.0, 0.1, 0.2, 0.4)))
                while True:
                    if connection is None:
                        connection = await connect()
                    try:
                        with anyio.fail_after(15):
                            submission = await connection[1].submit("sleep", job, task_id=task_id)
                    except Exception:
                        failed_submits[task_id] += 1
                        await _abandon(connection[0])
                        connection = None
                        continue
                    if submission.requeued:
                        requeued.add(task_id)
                    submitted.add(task_id)
                    break
        finally:
            if connection is not None:
                await _abandon(connection[0])

    async def wave(wave_ids: list[str]) -> None:
        todo = list(reversed(wave_ids))
        async with anyio.create_task_group() as tg:
            for _ in range(SUBMITTERS):
                tg.start_soon(submitter, todo)

    async def crash_server_on_a_publish(wave_size: int, outage: float) -> None:
        """The proxy kills the server just as one submit's task publish goes by (that submit has written its
        record); the other submits in flight are cut off wherever they are. The server is back after ``outage``."""
        nonlocal restarts
        proxy.arm(after=rng.randrange(wave_size // 4, wave_size // 2))
        await proxy.cut.wait()
        await anyio.sleep(outage)
        nats_server.start()  # same port, same store
        restarts += 1

    async def kill_an_agent(step: int) -> None:
        nonlocal kills
        await anyio.sleep(rng.random())  # while the queue is worked on: it holds up to 4 deliveries
        victim = rng.choice(alive)
        alive.remove(victim)
        victim.signal(signal.SIGKILL)
        assert await victim.wait() == -signal.SIGKILL
        kills += 1
        replacement = launch(processes, config, tmp_path / f"replacement{step}", markers)
        await replacement.ready(timeout=30)
        alive.append(replacement)

    third = TASKS // 3
    async with anyio.create_task_group() as proxying:
        proxy = CuttingProxy(nats_server.port, config.subjects.task("sleep"), nats_server.kill)
        await proxying.start(proxy.serve)
        # a short outage: the submits cut off fail, and their connections come back before they give up
        async with anyio.create_task_group() as tg:
            tg.start_soon(crash_server_on_a_publish, third, 0.5 + rng.random())
            tg.start_soon(wave, ids[:third])
        await kill_an_agent(1)
        # a long one: a submit cut off gives up (its process exits) while the server is still gone
        async with anyio.create_task_group() as tg:
            tg.start_soon(crash_server_on_a_publish, third, 9.5)  # > publish timeout (5 s) + giving up (2 s)
            tg.start_soon(wave, ids[third : 2 * third])
        await kill_an_agent(2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(wave, ids[2 * third :])
            tg.start_soon(kill_an_agent, 3)
        proxying.cancel_scope.cancel()
    assert submitted == set(ids)
    submit_time = time.monotonic() - began

    records: dict[str, TaskRecord | None] = {}

    async def all_ended() -> bool:
        for task_id in ids:
            if not _ended(records.get(task_id)):
                try:
                    records[task_id] = await client.store.get(task_id)
                except Exception:  # a read cut off while the connection comes back
                    return False
        return all(_ended(records.get(i)) for i in ids)

    try:
        await wait_until(all_ended, timeout=45, what="every task ended")
        await wait_until(lambda: _queue_empty(bus), timeout=15, what="the work queue empty")
    finally:
        statuses = Counter(r.status.value if r else "no record" for r in (records.get(i) for i in ids))
        done = Counter(p.name.split("-")[1] for p in markers.glob("done-*"))
        pending_forever = [i for i in ids if not _ended(records.get(i))]
        print(
            f"chaos seed={seed}: submitted={len(submitted)} terminal={TASKS - len(pending_forever)} "
            f"{dict(statuses)} re-submitted={len(failed_submits)} (failed submits {sum(failed_submits.values())}; "
            f"re-submits that queued a task recorded but never queued: {len(requeued)}) "
            f"pending_forever={len(pending_forever)} agents_killed={kills} server_restarts={restarts} "
            f"redelivered={sum(1 for r in records.values() if r and r.attempts > 1)} "
            f"ran_to_completion_more_than_once={sum(1 for n in done.values() if n > 1)} "
            f"submitting={submit_time:.1f}s total={time.monotonic() - began:.1f}s"
        )
    assert (kills, restarts) == (3, 2)
    assert pending_forever == []
    assert statuses == Counter({"succeeded": TASKS}), statuses
    assert requeued  # the long outage left a task recorded and never queued: its re-submit queued it


async def _abandon(bus: Bus) -> None:
    """Close a connection the way a process that exits does, without waiting for a server that is gone."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(3):
        try:
            await bus.close()
        except Exception:
            pass


def _ended(record: TaskRecord | None) -> bool:
    return record is not None and record.status.terminal


async def _queue_empty(bus: Bus) -> bool:
    try:
        return (await bus.js.stream_info(bus.subjects.task_stream)).state.messages == 0
    except Exception:
        return False
